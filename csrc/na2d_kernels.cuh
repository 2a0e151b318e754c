// 2-D neighborhood attention (DESIGN 3.4): the CUDA kernels. No torch headers here, so
// bench/cuda_report.py can compile them standalone (nvcc -cubin -Xptxas -v); the host code that
// checks, allocates and launches is na2d_cuda.cu.
//
// Work split: a group of kGroup = 8 lanes owns one query (forward, dQ) or one key (dK, dV); lane
// l holds head-dim elements l, l + 8, l + 16, ... (coalesced loads across the group), and dot
// products are finished with a butterfly of shuffles inside the group. A group never waits on
// another group, so groups past the end simply return. Per-element math (windows, inverse
// windows, bias index, online softmax, logit gradient) comes from na2d.h and is the code the CPU
// kernels run and the CPU tests check.
//
// The backward is deterministic: dQ per query, dK/dV gathered per key over its inverse
// neighbourhood, and the bias gradient gathered per bias entry by one block with a fixed-order
// reduction; no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifndef DCAL_NA2D_MATH_ONLY
#define DCAL_NA2D_MATH_ONLY
#endif
#include "na2d.h"

namespace dcal {
namespace na2d_cuda {

constexpr int kGroup = 8;                     // lanes per query (or key)
constexpr int kThreads = 128;                 // threads per block
// Kernels say __launch_bounds__(kThreads, 1): with the block size alone, ptxas for sm_90 caps
// registers for full occupancy and spills a few bytes; one block per SM lets it keep them.
constexpr int kItems = kThreads / kGroup;     // queries (or keys) per block

// One struct for every kernel; pointers a kernel does not use are null.
template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const T* rpb;   // [H, 2*ks-1, 2*ks-1] or null
  const T* out;   // forward output (backward input)
  const T* dout;
  T* o;           // forward output
  float* lse;     // [B, H, X, Y]
  float* delta;   // [B, H, X, Y], rowsum(dO * O)
  T* dq;
  T* dk;
  T* dv;
  float* drpb;    // [H, 2*ks-1, 2*ks-1]
  int B, H, X, Y, D, ks, border;
  float scale;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Lanes of the calling thread's group inside its warp.
__device__ __forceinline__ unsigned group_mask() {
  return 0xffu << ((threadIdx.x & 31) & ~(kGroup - 1));
}

// Sum over the group's lanes. Every lane ends with the same bits (float addition commutes, and
// the butterfly pairs the same partial sums on every lane).
__device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off >>= 1) x += __shfl_xor_sync(mask, x, off);
  return x;
}

// This lane's slice of one head-dim row: elements lane + kGroup * e for e < D / kGroup.
template <int kE, typename T>
__device__ __forceinline__ void load_slice(float (&dst)[kE], const T* row, int lane, int E) {
#pragma unroll
  for (int e = 0; e < kE; ++e) dst[e] = e < E ? to_float(row[lane + e * kGroup]) : 0.f;
}

template <int kE, typename T>
__device__ __forceinline__ void store_slice(T* row, const float (&src)[kE], float mul, int lane, int E) {
#pragma unroll
  for (int e = 0; e < kE; ++e)
    if (e < E) row[lane + e * kGroup] = from_float<T>(src[e] * mul);
}

// [E] . row[E] over this lane's slice, then over the group -> full dot product.
template <int kE, typename T>
__device__ __forceinline__ float group_dot(const float (&a)[kE], const T* row, int lane, int E, unsigned mask) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kE; ++e)
    if (e < E) s += a[e] * to_float(row[lane + e * kGroup]);
  return group_sum(s, mask);
}

// Forward: out and lse of one query per group, one online-softmax pass over its window.
template <typename T, int kHeadDim, bool kHasRpb>
__global__ void __launch_bounds__(kThreads, 1) na2d_fwd_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  const int64_t tok = (int64_t)blockIdx.x * kItems + threadIdx.x / kGroup;
  if (tok >= n) return;
  const int lane = threadIdx.x % kGroup, E = p.D / kGroup;
  const unsigned mask = group_mask();
  const int j = (int)(tok % p.Y), i = (int)((tok / p.Y) % p.X);
  const int64_t bh = tok / ((int64_t)p.X * p.Y), map = bh * p.X * p.Y;
  const int R = 2 * p.ks - 1;
  const T* bias = kHasRpb ? p.rpb + (bh % p.H) * R * R : nullptr;
  const T* kb = p.k + map * p.D;
  const T* vb = p.v + map * p.D;

  float qv[kE], acc[kE];
  load_slice<kE>(qv, p.q + tok * p.D, lane, E);  // [E] of q
#pragma unroll
  for (int e = 0; e < kE; ++e) acc[e] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int si = na2d::window_start(i, p.X, p.ks, p.border);
  const int sj = na2d::window_start(j, p.Y, p.ks, p.border);
  for (int ki = si; ki < si + p.ks; ++ki) {
    const bool row_on = ki >= 0 && ki < p.X;
    if (!row_on && p.border == na2d::kMask) continue;
    for (int kj = sj; kj < sj + p.ks; ++kj) {
      const bool on = row_on && kj >= 0 && kj < p.Y;
      if (!on && p.border == na2d::kMask) continue;
      const int64_t key = ((int64_t)ki * p.Y + kj) * p.D;
      // [E] . [E] summed over the group; an off-map key of zero mode is a zero vector
      float s = on ? group_dot<kE>(qv, kb + key, lane, E, mask) * p.scale : 0.f;
      if (kHasRpb) s += to_float(bias[na2d::rpb_index(ki, kj, i, j, p.ks)]);
      float alpha, pr;
      if (na2d::softmax_update(m, l, s, &alpha, &pr)) {
#pragma unroll
        for (int e = 0; e < kE; ++e) acc[e] *= alpha;
      }
      if (on) {
        // [E] += p * v[E]
#pragma unroll
        for (int e = 0; e < kE; ++e)
          if (e < E) acc[e] += pr * to_float(vb[key + lane + e * kGroup]);
      }
    }
  }
  store_slice<kE>(p.o + tok * p.D, acc, 1.f / l, lane, E);
  if (lane == 0) p.lse[tok] = na2d::softmax_lse(m, l);
}

// Backward pass 1: delta = rowsum(dO * O) and dQ of one query per group.
template <typename T, int kHeadDim, bool kHasRpb>
__global__ void __launch_bounds__(kThreads, 1) na2d_bwd_dq_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  const int64_t tok = (int64_t)blockIdx.x * kItems + threadIdx.x / kGroup;
  if (tok >= n) return;
  const int lane = threadIdx.x % kGroup, E = p.D / kGroup;
  const unsigned mask = group_mask();
  const int j = (int)(tok % p.Y), i = (int)((tok / p.Y) % p.X);
  const int64_t bh = tok / ((int64_t)p.X * p.Y), map = bh * p.X * p.Y;
  const int R = 2 * p.ks - 1;
  const T* bias = kHasRpb ? p.rpb + (bh % p.H) * R * R : nullptr;
  const T* kb = p.k + map * p.D;
  const T* vb = p.v + map * p.D;

  float qv[kE], dov[kE], dqv[kE];
  load_slice<kE>(qv, p.q + tok * p.D, lane, E);      // [E] of q
  load_slice<kE>(dov, p.dout + tok * p.D, lane, E);  // [E] of dO
#pragma unroll
  for (int e = 0; e < kE; ++e) dqv[e] = 0.f;
  const float delta = group_dot<kE>(dov, p.out + tok * p.D, lane, E, mask);
  if (lane == 0) p.delta[tok] = delta;
  const float L = p.lse[tok];
  const int si = na2d::window_start(i, p.X, p.ks, p.border);
  const int sj = na2d::window_start(j, p.Y, p.ks, p.border);
  for (int ki = si; ki < si + p.ks; ++ki) {
    const bool row_on = ki >= 0 && ki < p.X;
    if (!row_on) continue;
    for (int kj = sj; kj < sj + p.ks; ++kj) {
      // Off-map keys of zero mode are in the stored lse but add nothing to dQ (their k is 0).
      if (kj < 0 || kj >= p.Y) continue;
      const int64_t key = ((int64_t)ki * p.Y + kj) * p.D;
      float kv[kE];
      load_slice<kE>(kv, kb + key, lane, E);  // [E] of k
      float part = 0.f;
#pragma unroll
      for (int e = 0; e < kE; ++e) part += qv[e] * kv[e];
      float s = group_sum(part, mask) * p.scale;
      if (kHasRpb) s += to_float(bias[na2d::rpb_index(ki, kj, i, j, p.ks)]);
      const float pr = na2d::softmax_prob(s, L);
      const float dp = group_dot<kE>(dov, vb + key, lane, E, mask);  // dO . v
      const float ds = na2d::logit_grad(pr, dp, delta);
#pragma unroll
      for (int e = 0; e < kE; ++e) dqv[e] += ds * kv[e];  // [E] += dS * k[E]
    }
  }
  store_slice<kE>(p.dq + tok * p.D, dqv, p.scale, lane, E);
}

// Backward pass 2: dK and dV of one key per group, gathered over the queries whose window holds
// the key (its inverse neighbourhood, na2d::inverse_range).
template <typename T, int kHeadDim, bool kHasRpb>
__global__ void __launch_bounds__(kThreads, 1) na2d_bwd_dkdv_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  const int64_t tok = (int64_t)blockIdx.x * kItems + threadIdx.x / kGroup;
  if (tok >= n) return;
  const int lane = threadIdx.x % kGroup, E = p.D / kGroup;
  const unsigned mask = group_mask();
  const int kj = (int)(tok % p.Y), ki = (int)((tok / p.Y) % p.X);
  const int64_t bh = tok / ((int64_t)p.X * p.Y), map = bh * p.X * p.Y;
  const int R = 2 * p.ks - 1;
  const T* bias = kHasRpb ? p.rpb + (bh % p.H) * R * R : nullptr;

  float kv[kE], vv[kE], dkv[kE], dvv[kE];
  load_slice<kE>(kv, p.k + tok * p.D, lane, E);  // [E] of k
  load_slice<kE>(vv, p.v + tok * p.D, lane, E);  // [E] of v
#pragma unroll
  for (int e = 0; e < kE; ++e) dkv[e] = dvv[e] = 0.f;
  int ilo, ihi, jlo, jhi;
  na2d::inverse_range(ki, p.X, p.ks, p.border, &ilo, &ihi);
  na2d::inverse_range(kj, p.Y, p.ks, p.border, &jlo, &jhi);
  for (int i = ilo; i <= ihi; ++i) {
    for (int j = jlo; j <= jhi; ++j) {
      const int64_t qt = map + (int64_t)i * p.Y + j;
      float qx[kE], dox[kE];
      load_slice<kE>(qx, p.q + qt * p.D, lane, E);      // [E] of q
      load_slice<kE>(dox, p.dout + qt * p.D, lane, E);  // [E] of dO
      float ps = 0.f, pd = 0.f;
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        ps += kv[e] * qx[e];
        pd += vv[e] * dox[e];
      }
      float s = group_sum(ps, mask) * p.scale;
      if (kHasRpb) s += to_float(bias[na2d::rpb_index(ki, kj, i, j, p.ks)]);
      const float pr = na2d::softmax_prob(s, p.lse[qt]);
      const float ds = na2d::logit_grad(pr, group_sum(pd, mask), p.delta[qt]);
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        dvv[e] += pr * dox[e];  // [E] += P * dO[E]
        dkv[e] += ds * qx[e];   // [E] += dS * q[E]
      }
    }
  }
  store_slice<kE>(p.dk + tok * p.D, dkv, p.scale, lane, E);
  store_slice<kE>(p.dv + tok * p.D, dvv, 1.f, lane, E);
}

// Backward pass 3 (with a bias): grid (R*R, H); block (entry, h) sums dS of that bias entry over
// every query of every batch whose window holds the key at that offset, then reduces its groups'
// sums in group order.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1) na2d_bwd_drpb_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int R = 2 * p.ks - 1;
  const int entry = blockIdx.x, h = blockIdx.y;
  const int di = entry / R - (p.ks - 1), dj = entry % R - (p.ks - 1);
  const int group = threadIdx.x / kGroup, lane = threadIdx.x % kGroup, E = p.D / kGroup;
  const unsigned mask = group_mask();
  const float bias = to_float(p.rpb[(int64_t)h * R * R + entry]);
  const int64_t per_map = (int64_t)p.X * p.Y, n = (int64_t)p.B * per_map;
  float sum = 0.f;
  for (int64_t t = group; t < n; t += kItems) {
    const int64_t b = t / per_map;
    const int i = (int)((t / p.Y) % p.X), j = (int)(t % p.Y);
    const int ki = i + di, kj = j + dj;
    if (!na2d::in_window(ki, i, p.X, p.ks, p.border) || !na2d::in_window(kj, j, p.Y, p.ks, p.border)) continue;
    const bool on = ki >= 0 && ki < p.X && kj >= 0 && kj < p.Y;
    if (!on && p.border == na2d::kMask) continue;
    const int64_t map = (b * p.H + h) * per_map;
    const int64_t qt = map + (int64_t)i * p.Y + j;
    float s = bias, dp = 0.f;
    if (on) {
      const int64_t key = map + (int64_t)ki * p.Y + kj;
      float qx[kE], dox[kE];
      load_slice<kE>(qx, p.q + qt * p.D, lane, E);      // [E] of q
      load_slice<kE>(dox, p.dout + qt * p.D, lane, E);  // [E] of dO
      s += group_dot<kE>(qx, p.k + key * p.D, lane, E, mask) * p.scale;
      dp = group_dot<kE>(dox, p.v + key * p.D, lane, E, mask);
    }
    sum += na2d::logit_grad(na2d::softmax_prob(s, p.lse[qt]), dp, p.delta[qt]);
  }
  __shared__ float partial[kItems];
  if (lane == 0) partial[group] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int g = 0; g < kItems; ++g) total += partial[g];
    p.drpb[(int64_t)h * R * R + entry] = total;
  }
}

}  // namespace na2d_cuda
}  // namespace dcal
