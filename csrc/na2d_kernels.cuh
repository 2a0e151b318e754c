// 2-D neighborhood attention (docs/contract.md, neighborhood_attention2d): the CUDA kernels. No torch headers here, so
// bench/cuda_report.py can compile them standalone (nvcc -cubin -Xptxas -v); the host code that
// checks, allocates and launches is na2d_cuda.cu.
//
// Work split: a group of kGroup = 8 lanes owns one query (forward, dQ) or one key (dK, dV); lane
// l holds head-dim elements l, l + 8, l + 16, ... (coalesced loads across the group when the
// head dim has unit stride), and dot products are finished with a butterfly of shuffles inside
// the group. A group never waits on another group, so groups past the end simply return.
// Per-element math (dilated windows, inverse windows, bias index, online softmax, logit
// gradient) comes from na2d.h and is the code the CPU kernels run and the CPU tests check.
//
// Layouts: q, k, v, dout and out are read in place through their own element strides (Strides,
// 64-bit), so contiguous [B, H, X, Y, D], NATTEN's [B, X, Y, H, D], slices of a fused qkv
// projection and channels-first [B, C, X, Y] maps (head-dim stride X*Y) need no copy; kUnitD
// (every input's and output's head-dim stride is 1, the common case) makes that stride a
// constant. Outputs and gradients are written through their strides too: the host allocates
// them in the dim order of their input (out and dq like q, dk like k, dv like v), so they come
// back in the caller's layout; lse and delta are contiguous [B, H, X, Y], indexed by the token
// number.
//
// Dilation (docs/contract.md, Dilation): window keys are start + dil * u, u in [0, ks), so the loops step by dil
// (window_start, in_window, inverse_range and rpb_index of na2d.h take the same dil).
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

constexpr int kGroup = 8;      // lanes per query (or key)
constexpr int kThreads = 128;  // threads per block
// Kernels say __launch_bounds__(kThreads, 1): with the block size alone, ptxas for sm_90 caps
// registers for full occupancy and spills a few bytes; one block per SM lets it keep them.
constexpr int kItems = kThreads / kGroup;  // queries (or keys) per block

// Element strides of a [B, H, X, Y, D] view (0 along a broadcast dimension).
struct Strides {
  int64_t b, h, x, y, d;
};

// One struct for every kernel; pointers a kernel does not use are null.
template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const T* rpb;  // [H, 2*ks-1, 2*ks-1] contiguous, or null
  const T* out;  // forward output (backward input)
  const T* dout;
  Strides sq, sk, sv, sout, sdo;  // of q, k, v, out (forward output or backward input), dout
  Strides sdq, sdk, sdv;          // of the gradients
  T* o;                           // forward output, strides sout
  float* lse;                     // [B, H, X, Y] contiguous
  float* delta;                   // [B, H, X, Y] contiguous, rowsum(dO * O)
  T* dq;                          // gradients [B, H, X, Y, D], strides sdq, sdk, sdv
  T* dk;
  T* dv;
  float* drpb;  // [H, 2*ks-1, 2*ks-1]
  int B, H, X, Y, D, ks, border, dil;
  float scale;
};

// Offset of the first element of map (b, h) and of position (i, j) inside a map.
__device__ __forceinline__ int64_t map_offset(const Strides& s, int64_t b, int64_t h) { return b * s.b + h * s.h; }
__device__ __forceinline__ int64_t pos_offset(const Strides& s, int i, int j) {
  return (int64_t)i * s.x + (int64_t)j * s.y;
}

// Head-dim stride of a view: the constant 1 on the unit-stride path (kUnitD, the common
// layouts: contiguous, heads-last, fused-qkv slices), so that path needs no stride arithmetic.
template <bool kUnitD>
__device__ __forceinline__ int64_t head_stride(const Strides& s) {
  return kUnitD ? int64_t{1} : s.d;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Lanes of the calling thread's group inside its warp.
__device__ __forceinline__ unsigned group_mask() { return 0xffu << ((threadIdx.x & 31) & ~(kGroup - 1)); }

// Sum over the group's lanes. Every lane ends with the same bits (float addition commutes, and
// the butterfly pairs the same partial sums on every lane).
__device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off >>= 1) x += __shfl_xor_sync(mask, x, off);
  return x;
}

// Element lane + kGroup * e of a head-dim row whose elements are sd apart.
template <typename T>
__device__ __forceinline__ float elem(const T* row, int64_t sd, int lane, int e) {
  return to_float(row[(int64_t)(lane + e * kGroup) * sd]);
}

// This lane's slice of one head-dim row (elements sd apart): elements lane + kGroup * e, e < E.
template <int kE, typename T>
__device__ __forceinline__ void load_slice(float (&dst)[kE], const T* row, int64_t sd, int lane, int E) {
#pragma unroll
  for (int e = 0; e < kE; ++e) dst[e] = e < E ? elem(row, sd, lane, e) : 0.f;
}

// Into a head-dim row whose elements are sd apart (outputs and gradients).
template <int kE, typename T>
__device__ __forceinline__ void store_slice(T* row, int64_t sd, const float (&src)[kE], float mul, int lane, int E) {
#pragma unroll
  for (int e = 0; e < kE; ++e)
    if (e < E) row[(int64_t)(lane + e * kGroup) * sd] = from_float<T>(src[e] * mul);
}

// [E] . row[E] over this lane's slice, then over the group -> full dot product.
template <int kE, typename T>
__device__ __forceinline__ float group_dot(const float (&a)[kE], const T* row, int64_t sd, int lane, int E,
                                           unsigned mask) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kE; ++e)
    if (e < E) s += a[e] * elem(row, sd, lane, e);
  return group_sum(s, mask);
}

// The token a group owns: tok = ((b * H + h) * X + i) * Y + j, the index into the contiguous lse
// and delta.
struct Token {
  int64_t b, h;
  int i, j;
};
template <typename T>
__device__ __forceinline__ Token token_at(int64_t tok, const Params<T>& p) {
  const int64_t bh = tok / ((int64_t)p.X * p.Y);
  return Token{bh / p.H, bh % p.H, (int)((tok / p.Y) % p.X), (int)(tok % p.Y)};
}

// Forward: out and lse of one query per group, one online-softmax pass over its window.
template <typename T, int kHeadDim, bool kHasRpb, bool kUnitD>
__global__ void __launch_bounds__(kThreads, 1) na2d_fwd_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  const int64_t tok = (int64_t)blockIdx.x * kItems + threadIdx.x / kGroup;
  if (tok >= n) return;
  const int lane = threadIdx.x % kGroup, E = p.D / kGroup, dil = p.dil;
  const unsigned mask = group_mask();
  const int64_t sq_d = head_stride<kUnitD>(p.sq), sk_d = head_stride<kUnitD>(p.sk), sv_d = head_stride<kUnitD>(p.sv);
  const Token t = token_at(tok, p);
  const int i = t.i, j = t.j;
  const int64_t R = 2 * p.ks - 1;
  const T* bias = kHasRpb ? p.rpb + t.h * R * R : nullptr;
  const T* kb = p.k + map_offset(p.sk, t.b, t.h);
  const T* vb = p.v + map_offset(p.sv, t.b, t.h);

  float qv[kE], acc[kE];
  load_slice<kE>(qv, p.q + map_offset(p.sq, t.b, t.h) + pos_offset(p.sq, i, j), sq_d, lane, E);  // [E] of q
#pragma unroll
  for (int e = 0; e < kE; ++e) acc[e] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int si = na2d::window_start(i, p.X, p.ks, p.border, dil);
  const int sj = na2d::window_start(j, p.Y, p.ks, p.border, dil);
  for (int ki = si; ki < si + p.ks * dil; ki += dil) {
    const bool row_on = ki >= 0 && ki < p.X;
    if (!row_on && p.border == na2d::kMask) continue;
    for (int kj = sj; kj < sj + p.ks * dil; kj += dil) {
      const bool on = row_on && kj >= 0 && kj < p.Y;
      if (!on && p.border == na2d::kMask) continue;
      // [E] . [E] summed over the group; an off-map key of zero mode is a zero vector
      float s = on ? group_dot<kE>(qv, kb + pos_offset(p.sk, ki, kj), sk_d, lane, E, mask) * p.scale : 0.f;
      if (kHasRpb) s += to_float(bias[na2d::rpb_index(ki, kj, i, j, p.ks, dil)]);
      float alpha, pr;
      if (na2d::softmax_update(m, l, s, &alpha, &pr)) {
#pragma unroll
        for (int e = 0; e < kE; ++e) acc[e] *= alpha;
      }
      if (on) {
        const T* vrow = vb + pos_offset(p.sv, ki, kj);
        // [E] += p * v[E]
#pragma unroll
        for (int e = 0; e < kE; ++e)
          if (e < E) acc[e] += pr * elem(vrow, sv_d, lane, e);
      }
    }
  }
  store_slice<kE>(p.o + map_offset(p.sout, t.b, t.h) + pos_offset(p.sout, i, j), head_stride<kUnitD>(p.sout), acc,
                  1.f / l, lane, E);
  if (lane == 0) p.lse[tok] = na2d::softmax_lse(m, l);
}

// Backward pass 1: delta = rowsum(dO * O) and dQ of one query per group.
template <typename T, int kHeadDim, bool kHasRpb, bool kUnitD>
__global__ void __launch_bounds__(kThreads, 1) na2d_bwd_dq_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  const int64_t tok = (int64_t)blockIdx.x * kItems + threadIdx.x / kGroup;
  if (tok >= n) return;
  const int lane = threadIdx.x % kGroup, E = p.D / kGroup, dil = p.dil;
  const unsigned mask = group_mask();
  const int64_t sq_d = head_stride<kUnitD>(p.sq), sk_d = head_stride<kUnitD>(p.sk), sv_d = head_stride<kUnitD>(p.sv);
  const int64_t sdo_d = head_stride<kUnitD>(p.sdo), sout_d = head_stride<kUnitD>(p.sout);
  const Token t = token_at(tok, p);
  const int i = t.i, j = t.j;
  const int64_t R = 2 * p.ks - 1;
  const T* bias = kHasRpb ? p.rpb + t.h * R * R : nullptr;
  const T* kb = p.k + map_offset(p.sk, t.b, t.h);
  const T* vb = p.v + map_offset(p.sv, t.b, t.h);

  float qv[kE], dov[kE], dqv[kE];
  load_slice<kE>(qv, p.q + map_offset(p.sq, t.b, t.h) + pos_offset(p.sq, i, j), sq_d, lane, E);         // [E] of q
  load_slice<kE>(dov, p.dout + map_offset(p.sdo, t.b, t.h) + pos_offset(p.sdo, i, j), sdo_d, lane, E);  // [E] of dO
#pragma unroll
  for (int e = 0; e < kE; ++e) dqv[e] = 0.f;
  const T* orow = p.out + map_offset(p.sout, t.b, t.h) + pos_offset(p.sout, i, j);
  const float delta = group_dot<kE>(dov, orow, sout_d, lane, E, mask);  // dO . O
  if (lane == 0) p.delta[tok] = delta;
  const float L = p.lse[tok];
  const int si = na2d::window_start(i, p.X, p.ks, p.border, dil);
  const int sj = na2d::window_start(j, p.Y, p.ks, p.border, dil);
  for (int ki = si; ki < si + p.ks * dil; ki += dil) {
    if (ki < 0 || ki >= p.X) continue;
    for (int kj = sj; kj < sj + p.ks * dil; kj += dil) {
      // Off-map keys of zero mode are in the stored lse but add nothing to dQ (their k is 0).
      if (kj < 0 || kj >= p.Y) continue;
      float kv[kE];
      load_slice<kE>(kv, kb + pos_offset(p.sk, ki, kj), sk_d, lane, E);  // [E] of k
      float part = 0.f;
#pragma unroll
      for (int e = 0; e < kE; ++e) part += qv[e] * kv[e];
      float s = group_sum(part, mask) * p.scale;
      if (kHasRpb) s += to_float(bias[na2d::rpb_index(ki, kj, i, j, p.ks, dil)]);
      const float pr = na2d::softmax_prob(s, L);
      const float dp = group_dot<kE>(dov, vb + pos_offset(p.sv, ki, kj), sv_d, lane, E, mask);  // dO . v
      const float ds = na2d::logit_grad(pr, dp, delta);
#pragma unroll
      for (int e = 0; e < kE; ++e) dqv[e] += ds * kv[e];  // [E] += dS * k[E]
    }
  }
  store_slice<kE>(p.dq + map_offset(p.sdq, t.b, t.h) + pos_offset(p.sdq, i, j), head_stride<kUnitD>(p.sdq), dqv,
                  p.scale, lane, E);
}

// Backward pass 2: dK and dV of one key per group, gathered over the queries whose window holds
// the key (its inverse neighbourhood, na2d::inverse_range: every dil-th position of [lo, hi]).
template <typename T, int kHeadDim, bool kHasRpb, bool kUnitD>
__global__ void __launch_bounds__(kThreads, 1) na2d_bwd_dkdv_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int64_t n = (int64_t)p.B * p.H * p.X * p.Y;
  const int64_t tok = (int64_t)blockIdx.x * kItems + threadIdx.x / kGroup;
  if (tok >= n) return;
  const int lane = threadIdx.x % kGroup, E = p.D / kGroup, dil = p.dil;
  const unsigned mask = group_mask();
  const int64_t sq_d = head_stride<kUnitD>(p.sq), sk_d = head_stride<kUnitD>(p.sk), sv_d = head_stride<kUnitD>(p.sv);
  const int64_t sdo_d = head_stride<kUnitD>(p.sdo);
  const Token t = token_at(tok, p);
  const int ki = t.i, kj = t.j;
  const int64_t R = 2 * p.ks - 1;
  const int64_t map = tok - ((int64_t)ki * p.Y + kj);  // token number of (b, h, 0, 0)
  const T* bias = kHasRpb ? p.rpb + t.h * R * R : nullptr;
  const T* qb = p.q + map_offset(p.sq, t.b, t.h);
  const T* dob = p.dout + map_offset(p.sdo, t.b, t.h);

  float kv[kE], vv[kE], dkv[kE], dvv[kE];
  load_slice<kE>(kv, p.k + map_offset(p.sk, t.b, t.h) + pos_offset(p.sk, ki, kj), sk_d, lane, E);  // [E] of k
  load_slice<kE>(vv, p.v + map_offset(p.sv, t.b, t.h) + pos_offset(p.sv, ki, kj), sv_d, lane, E);  // [E] of v
#pragma unroll
  for (int e = 0; e < kE; ++e) dkv[e] = dvv[e] = 0.f;
  int ilo, ihi, jlo, jhi;
  na2d::inverse_range(ki, p.X, p.ks, p.border, &ilo, &ihi, dil);
  na2d::inverse_range(kj, p.Y, p.ks, p.border, &jlo, &jhi, dil);
  for (int i = ilo; i <= ihi; i += dil) {
    for (int j = jlo; j <= jhi; j += dil) {
      const int64_t qt = map + (int64_t)i * p.Y + j;
      float qx[kE], dox[kE];
      load_slice<kE>(qx, qb + pos_offset(p.sq, i, j), sq_d, lane, E);      // [E] of q
      load_slice<kE>(dox, dob + pos_offset(p.sdo, i, j), sdo_d, lane, E);  // [E] of dO
      float ps = 0.f, pd = 0.f;
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        ps += kv[e] * qx[e];
        pd += vv[e] * dox[e];
      }
      float s = group_sum(ps, mask) * p.scale;
      if (kHasRpb) s += to_float(bias[na2d::rpb_index(ki, kj, i, j, p.ks, dil)]);
      const float pr = na2d::softmax_prob(s, p.lse[qt]);
      const float ds = na2d::logit_grad(pr, group_sum(pd, mask), p.delta[qt]);
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        dvv[e] += pr * dox[e];  // [E] += P * dO[E]
        dkv[e] += ds * qx[e];   // [E] += dS * q[E]
      }
    }
  }
  store_slice<kE>(p.dk + map_offset(p.sdk, t.b, t.h) + pos_offset(p.sdk, ki, kj), head_stride<kUnitD>(p.sdk), dkv,
                  p.scale, lane, E);
  store_slice<kE>(p.dv + map_offset(p.sdv, t.b, t.h) + pos_offset(p.sdv, ki, kj), head_stride<kUnitD>(p.sdv), dvv, 1.f,
                  lane, E);
}

// Backward pass 3 (with a bias): grid (R*R, H); block (entry, h) sums dS of that bias entry over
// every query of every batch whose window holds the key at that offset (entry (a, b) is the key
// dil * (a - ks + 1, b - ks + 1) from the query), then reduces its groups' sums in group order.
template <typename T, int kHeadDim, bool kUnitD>
__global__ void __launch_bounds__(kThreads, 1) na2d_bwd_drpb_kernel(const Params<T> p) {
  constexpr int kE = kHeadDim / kGroup;
  const int R = 2 * p.ks - 1, dil = p.dil;
  const int entry = blockIdx.x, h = blockIdx.y;
  const int di = entry / R - (p.ks - 1), dj = entry % R - (p.ks - 1);
  const int group = threadIdx.x / kGroup, lane = threadIdx.x % kGroup, E = p.D / kGroup;
  const unsigned mask = group_mask();
  const int64_t sq_d = head_stride<kUnitD>(p.sq), sk_d = head_stride<kUnitD>(p.sk), sv_d = head_stride<kUnitD>(p.sv);
  const int64_t sdo_d = head_stride<kUnitD>(p.sdo);
  const float bias = to_float(p.rpb[(int64_t)h * R * R + entry]);
  const int64_t per_map = (int64_t)p.X * p.Y, n = (int64_t)p.B * per_map;
  float sum = 0.f;
  for (int64_t t = group; t < n; t += kItems) {
    const int64_t b = t / per_map;
    const int i = (int)((t / p.Y) % p.X), j = (int)(t % p.Y);
    const int ki = i + di * dil, kj = j + dj * dil;
    if (!na2d::in_window(ki, i, p.X, p.ks, p.border, dil) || !na2d::in_window(kj, j, p.Y, p.ks, p.border, dil))
      continue;
    const bool on = ki >= 0 && ki < p.X && kj >= 0 && kj < p.Y;
    if (!on && p.border == na2d::kMask) continue;
    const int64_t qt = (b * p.H + h) * per_map + (int64_t)i * p.Y + j;  // into lse, delta
    float s = bias, dp = 0.f;
    if (on) {
      float qx[kE], dox[kE];
      load_slice<kE>(qx, p.q + map_offset(p.sq, b, h) + pos_offset(p.sq, i, j), sq_d, lane, E);         // [E] of q
      load_slice<kE>(dox, p.dout + map_offset(p.sdo, b, h) + pos_offset(p.sdo, i, j), sdo_d, lane, E);  // [E] of dO
      const T* krow = p.k + map_offset(p.sk, b, h) + pos_offset(p.sk, ki, kj);
      const T* vrow = p.v + map_offset(p.sv, b, h) + pos_offset(p.sv, ki, kj);
      s += group_dot<kE>(qx, krow, sk_d, lane, E, mask) * p.scale;
      dp = group_dot<kE>(dox, vrow, sv_d, lane, E, mask);
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
