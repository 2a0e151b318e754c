// 2-D neighborhood attention (DESIGN 3.4) on CPU: forward and backward.
//
// Inputs (q, k, v; dout and out in the backward) are read through their strides: contiguous,
// heads-last, slices of a fused qkv projection or channels-first views cost no copy. Outputs and
// gradients are written through their strides too: each takes the dim order of its input
// (empty_in_order_of: out and dq like q, dk like k, dv like v), so a caller reshapes them back to
// its own layout without a copy. lse (and the backward's delta) are contiguous [B, H, X, Y].
//
// fp32 and fp64 run the tiled kernels (fwd_tiled, bwd_tiled below): a tile of queries against
// its key halo as small GEMMs, masked to each query's window. bf16, and inputs holding a NaN or
// an inf (see all_finite), run the simple kernels:
// parallel over (batch, head, map row), the head dim the inner loop of every dot and axpy,
// computed in fp32; each query one online-softmax pass over its window.
// Nothing with a kernel_size**2 factor is ever stored; the backward saves only q, k, v, out and
// the logsumexp.
//
// Simple backward: pass 1 computes delta = rowsum(dO * O), dQ and the bias gradient per query;
// pass 2 GATHERS dK and dV of each key over its inverse neighbourhood (the queries whose window
// holds it, computed with the forward's own window function, so clamp mode is exact). No two
// threads write one element and no atomics are used: results are deterministic, bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "dcal.h"
#include "na2d.h"
#include "na2d_cpu_layout.h"

namespace dcal {
namespace {

using na2d::inverse_range;
using na2d::kClamp;
using na2d::kMask;
using na2d::rpb_index;
using na2d::window_start;
using na2d_cpu::Strided;
using na2d_cpu::StridedOut;

// Bias-gradient partial sums live in this many fixed blocks of rows, reduced in block order, so
// drpb does not depend on the number of threads.
constexpr int64_t kBiasBlocks = 128;

struct Geometry {
  int64_t B, H, X, Y, D;
  int ks, border, dil;
};

// Rows per parallel task: enough work per task that a small call runs on one thread instead of
// paying for a parallel region (a row costs about Y * ks^2 * D multiply-adds per pass).
int64_t row_grain(const Geometry& g) {
  const int64_t work = std::max<int64_t>(1, g.Y * g.ks * g.ks * g.D);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work);
}

// Inputs and outputs through their strides (na2d_cpu_layout.h).
template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

template <typename T>
StridedOut<T> strided_out(at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// True when every element of a [B, H, X, Y, D] input is finite, read through its strides (no
// allocation). The tiled kernels multiply whole key halos, where a key outside a query's window
// enters with weight 0; 0 * NaN or 0 * inf would reach that query. Inputs holding a non-finite
// value therefore take the simple kernels, which touch only each query's own window, so a NaN or
// inf reaches exactly the outputs it reaches in PyTorch's own computation (one read of the input,
// a few per cent of the kernel's time).
template <typename T>
bool all_finite(const Strided<T>& t, const at::Tensor& ref) {
  const int64_t H = ref.size(1), X = ref.size(2), Y = ref.size(3), D = ref.size(4);
  const int64_t rows = ref.size(0) * H * X;
  std::atomic<bool> ok{true};
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end && ok.load(std::memory_order_relaxed); ++r) {
      const int64_t bh = r / X, i = r % X;
      bool row_ok = true;
      for (int64_t j = 0; j < Y; ++j) {
        const T* e = t.at(bh, H, i, j);
        for (int64_t d = 0; d < D; ++d) row_ok &= std::isfinite(static_cast<double>(e[d * t.sd]));
      }
      if (!row_ok) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

// [D] . [D] -> scalar (b read with stride sb)
template <typename A, typename T>
inline A dot(const A* __restrict a, const T* __restrict b, int64_t n, int64_t sb = 1) {
  A s = 0;
  if (sb == 1) {
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += a[d] * static_cast<A>(b[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) s += a[d] * static_cast<A>(b[d * sb]);
  }
  return s;
}

// y[D] += alpha * x[D] (x read with stride sx)
template <typename A, typename T>
inline void axpy(A* __restrict y, A alpha, const T* __restrict x, int64_t n, int64_t sx = 1) {
  if (sx == 1) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) y[d] += alpha * static_cast<A>(x[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) y[d] += alpha * static_cast<A>(x[d * sx]);
  }
}

template <typename A, typename T>
inline void load(A* __restrict dst, const T* __restrict src, int64_t n, int64_t ss = 1) {
  if (ss == 1) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<A>(src[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<A>(src[d * ss]);
  }
}

// dst[D] (written with stride sd) <- mul * src[D]
template <typename T, typename A>
inline void store(T* __restrict dst, const A* __restrict src, A mul, int64_t n, int64_t sd = 1) {
  if (sd == 1) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * mul);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d * sd] = static_cast<T>(src[d] * mul);
  }
}

template <typename scalar_t>
void fwd_kernel(const Geometry g, Strided<scalar_t> q, Strided<scalar_t> k, Strided<scalar_t> v, const scalar_t* rpb,
                StridedOut<scalar_t> out, at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t> scale) {
  using A = at::opmath_type<scalar_t>;
  const int64_t D = g.D, X = g.X, Y = g.Y, H = g.H;
  const int ks = g.ks, R = 2 * g.ks - 1;
  at::parallel_for(0, g.B * g.H * X, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<A> qbuf(D), acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / X;
      const int i = static_cast<int>(row % X);
      const int64_t map = bh * X * Y;  // first token of this (batch, head) in lse
      const scalar_t* kb = k.at(bh, H, 0, 0);
      const scalar_t* vb = v.at(bh, H, 0, 0);
      const scalar_t* bias = rpb ? rpb + (bh % g.H) * R * R : nullptr;
      const int si = window_start(i, static_cast<int>(X), ks, g.border, g.dil);
      for (int j = 0; j < Y; ++j) {
        const int64_t tok = map + i * Y + j;
        load(qbuf.data(), q.at(bh, H, i, j), D, q.sd);  // [D]
        std::fill(acc.begin(), acc.end(), A(0));
        A m = -std::numeric_limits<A>::infinity(), l = 0;
        const int sj = window_start(j, static_cast<int>(Y), ks, g.border, g.dil);
        for (int ki = si; ki < si + ks * g.dil; ki += g.dil) {
          const bool row_on = ki >= 0 && ki < X;
          if (!row_on && g.border == kMask) continue;
          for (int kj = sj; kj < sj + ks * g.dil; kj += g.dil) {
            const bool on = row_on && kj >= 0 && kj < Y;
            if (!on && g.border == kMask) continue;
            // [D] . [D]; an off-map key of zero mode is a zero vector: its logit is the bias alone
            A s = on ? dot(qbuf.data(), kb + ki * k.sx + kj * k.sy, D, k.sd) * scale : A(0);
            if (bias) s += static_cast<A>(bias[rpb_index(ki, kj, i, j, ks, g.dil)]);
            A alpha, p;
            if (na2d::softmax_update(m, l, s, &alpha, &p)) {
              for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
            }
            if (on) axpy(acc.data(), p, vb + ki * v.sx + kj * v.sy, D, v.sd);  // [D] += p * [D]
          }
        }
        store(out.at(bh, H, i, j), acc.data(), A(1) / l, D, out.sd);
        lse[tok] = na2d::softmax_lse(m, l);
      }
    }
  });
}

// Pass 1 of the backward: delta, dQ, and the bias gradient summed per block of rows.
template <typename scalar_t>
void bwd_dq_kernel(const Geometry g, Strided<scalar_t> dout, Strided<scalar_t> q, Strided<scalar_t> k,
                   Strided<scalar_t> v, const scalar_t* rpb, Strided<scalar_t> out,
                   const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* delta, StridedOut<scalar_t> dq,
                   at::opmath_type<scalar_t>* bias_part, int64_t blocks, at::opmath_type<scalar_t> scale) {
  using A = at::opmath_type<scalar_t>;
  const int64_t D = g.D, X = g.X, Y = g.Y, H = g.H, rows = g.B * g.H * X;
  const int ks = g.ks, R = 2 * g.ks - 1;
  const int64_t grain = std::max<int64_t>(1, row_grain(g) * blocks / std::max<int64_t>(rows, 1));  // in blocks
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<A> qbuf(D), dobuf(D), dqbuf(D);
    for (int64_t blk = b0; blk < b1; ++blk) {
      for (int64_t row = blk * rows / blocks; row < (blk + 1) * rows / blocks; ++row) {
        const int64_t bh = row / X;
        const int i = static_cast<int>(row % X);
        const int64_t map = bh * X * Y;
        const scalar_t* kb = k.at(bh, H, 0, 0);
        const scalar_t* vb = v.at(bh, H, 0, 0);
        const int64_t h = bh % g.H;
        const scalar_t* bias = rpb ? rpb + h * R * R : nullptr;
        A* dbias = rpb ? bias_part + (blk * g.H + h) * R * R : nullptr;
        const int si = window_start(i, static_cast<int>(X), ks, g.border, g.dil);
        for (int j = 0; j < Y; ++j) {
          const int64_t tok = map + i * Y + j;
          load(qbuf.data(), q.at(bh, H, i, j), D, q.sd);        // [D]
          load(dobuf.data(), dout.at(bh, H, i, j), D, dout.sd);  // [D]
          const A dl = dot(dobuf.data(), out.at(bh, H, i, j), D, out.sd);
          delta[tok] = dl;
          const A L = lse[tok];
          std::fill(dqbuf.begin(), dqbuf.end(), A(0));
          const int sj = window_start(j, static_cast<int>(Y), ks, g.border, g.dil);
          for (int ki = si; ki < si + ks * g.dil; ki += g.dil) {
            const bool row_on = ki >= 0 && ki < X;
            if (!row_on && g.border == kMask) continue;
            for (int kj = sj; kj < sj + ks * g.dil; kj += g.dil) {
              const bool on = row_on && kj >= 0 && kj < Y;
              if (!on && g.border == kMask) continue;
              const scalar_t* kp = kb + ki * k.sx + kj * k.sy;
              const int bi = rpb_index(ki, kj, i, j, ks, g.dil);
              A s = on ? dot(qbuf.data(), kp, D, k.sd) * scale : A(0);
              if (bias) s += static_cast<A>(bias[bi]);
              const A p = na2d::softmax_prob(s, L);
              // an off-map key of zero mode has v = 0, so dP = 0, but its logit still has a gradient
              const A dp = on ? dot(dobuf.data(), vb + ki * v.sx + kj * v.sy, D, v.sd) : A(0);
              const A ds = na2d::logit_grad(p, dp, delta[tok]);
              if (on) axpy(dqbuf.data(), ds, kp, D, k.sd);  // [D] += dS * [D]
              if (dbias) dbias[bi] += ds;
            }
          }
          store(dq.at(bh, H, i, j), dqbuf.data(), scale, D, dq.sd);
        }
      }
    }
  });
}

// Pass 2 of the backward: dK and dV of each key, gathered over its inverse neighbourhood.
template <typename scalar_t>
void bwd_dkdv_kernel(const Geometry g, Strided<scalar_t> dout, Strided<scalar_t> q, Strided<scalar_t> k,
                     Strided<scalar_t> v, const scalar_t* rpb, const at::opmath_type<scalar_t>* lse,
                     const at::opmath_type<scalar_t>* delta, StridedOut<scalar_t> dk, StridedOut<scalar_t> dv,
                     at::opmath_type<scalar_t> scale) {
  using A = at::opmath_type<scalar_t>;
  const int64_t D = g.D, X = g.X, Y = g.Y, H = g.H;
  const int ks = g.ks, R = 2 * g.ks - 1;
  at::parallel_for(0, g.B * g.H * X, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<A> kbuf(D), vbuf(D), dkbuf(D), dvbuf(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / X;
      const int ki = static_cast<int>(row % X);
      const int64_t map = bh * X * Y;
      const scalar_t* qb = q.at(bh, H, 0, 0);
      const scalar_t* dob = dout.at(bh, H, 0, 0);
      const scalar_t* bias = rpb ? rpb + (bh % g.H) * R * R : nullptr;
      int ilo, ihi;
      inverse_range(ki, static_cast<int>(X), ks, g.border, &ilo, &ihi, g.dil);
      for (int kj = 0; kj < Y; ++kj) {
        load(kbuf.data(), k.at(bh, H, ki, kj), D, k.sd);  // [D]
        load(vbuf.data(), v.at(bh, H, ki, kj), D, v.sd);  // [D]
        std::fill(dkbuf.begin(), dkbuf.end(), A(0));
        std::fill(dvbuf.begin(), dvbuf.end(), A(0));
        int jlo, jhi;
        inverse_range(kj, static_cast<int>(Y), ks, g.border, &jlo, &jhi, g.dil);
        for (int i = ilo; i <= ihi; i += g.dil) {
          for (int j = jlo; j <= jhi; j += g.dil) {
            const int64_t qt = static_cast<int64_t>(i) * Y + j;
            const scalar_t* qp = qb + i * q.sx + j * q.sy;
            const scalar_t* dop = dob + i * dout.sx + j * dout.sy;
            A s = dot(kbuf.data(), qp, D, q.sd) * scale;
            if (bias) s += static_cast<A>(bias[rpb_index(ki, kj, i, j, ks, g.dil)]);
            const A p = na2d::softmax_prob(s, lse[map + qt]);
            axpy(dvbuf.data(), p, dop, D, dout.sd);  // [D] += P * dO[D]
            const A dp = dot(vbuf.data(), dop, D, dout.sd);
            const A ds = na2d::logit_grad(p, dp, delta[map + qt]);
            axpy(dkbuf.data(), ds, qp, D, q.sd);  // [D] += dS * q[D]
          }
        }
        store(dk.at(bh, H, ki, kj), dkbuf.data(), scale, D, dk.sd);
        store(dv.at(bh, H, ki, kj), dvbuf.data(), A(1), D, dv.sd);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tiled kernels (fp32, fp64): small GEMMs through the BLAS that libtorch_cpu exports (MKL).
//
// Dilation first: the positions of one residue (gx, gy) mod dil form a sub-grid on which a
// dilated window is the ordinary window of the sub-grid (zero/mask: centred, off-map exactly
// where the sub-grid index leaves [0, n_g); clamp: NATTEN's rule is defined that way), and the
// bias offset (key - query) / dil is the sub-grid offset. So each (batch, head, gx, gy) "slice"
// is an undilated problem on an nx x ny map read with strides scaled by dil.
//
// On a slice, a tile of TX x TY queries sees the key halo of rows window_start(i0) ..
// window_start(i_last) + ks and likewise for columns (at most (TX + ks - 1) x (TY + ks - 1)
// keys; clamp windows shift inside it). Per tile:
//   pack   Q [T, D], K_halo [Hk, D], V_halo [Hk, D] (any strides; off-map keys are zeros, which
//          is exactly zero mode's padding), cut from the tile row's query and halo rows staged
//          once over the slice's whole width
//   S      [TY, kw] = scale * Q_row @ K_rows^T per query row of the tile, against only the ks
//          halo rows its windows touch (kw = ks * halo width keys; the whole halo would compute
//          (TX + ks - 1) / ks times more logits that the windows then drop)   (GEMM)
//   per query: its window of S plus the bias row by row (ks contiguous entries per window row),
//          softmax, written back into a zeroed row of S as P (mask mode leaves off-map keys out)
//   O      [TY, D] = P @ V_rows                                   (GEMM)
// Backward per tile, per query row against its ks halo rows as above: P from S and the
// logsumexp, dP = dO @ V^T (GEMM), dS = P * (dP - delta) inside each window (delta = rowsum(dO *
// O) per tile), dQ = scale * dS @ K, dK_halo += scale * dS^T @ Q, dV_halo += P^T @ dO (GEMMs),
// the halo sums added into dk, dv. One thread owns a slice and walks its tiles
// in a fixed order, so dk, dv and the per-slice bias partials are deterministic bit for bit.
// ---------------------------------------------------------------------------------------------

// Row-major BLAS GEMM, the vectorising exp and the fixed-order sum: csrc/cpu_math.h.
using cpu::exp_poly;
using cpu::gemm;
using cpu::sum_impl;

#define DCAL_NA2D_CLONES DCAL_CPU_CLONES
template <typename T>
[[gnu::always_inline]] inline void exp_shift_impl(T* x, int n, T c) {
  for (int e = 0; e < n; ++e) x[e] = exp_poly(x[e] - c);
}
DCAL_NA2D_CLONES void exp_shift(float* x, int n, float c) { exp_shift_impl(x, n, c); }
DCAL_NA2D_CLONES void exp_shift(double* x, int n, double c) { exp_shift_impl(x, n, c); }
DCAL_NA2D_CLONES float exp_shift_sum(float* x, int n, float c) {
  exp_shift_impl(x, n, c);
  return sum_impl(x, n);
}
DCAL_NA2D_CLONES double exp_shift_sum(double* x, int n, double c) {
  exp_shift_impl(x, n, c);
  return sum_impl(x, n);
}
#undef DCAL_NA2D_CLONES

// Query tile, by measurement (fp32, k 7, D 32, 128x128; 8x8, 4x8, 8x16, 16x8, 4x16 within 15%
// of each other as shares of sgemm): a narrow TY keeps the logits computed per query, ks * (TY +
// ks - 1), near the ks^2 used; a taller TX packs each halo row once for more query rows.
// DCAL_NA2D_TILE=TXxTY overrides it (for measurements).
struct TileShape {
  int tx, ty;
};

TileShape tile_shape() {
  static const TileShape t = [] {
    TileShape s{8, 8};
    if (const char* e = std::getenv("DCAL_NA2D_TILE")) std::sscanf(e, "%dx%d", &s.tx, &s.ty);
    return s;
  }();
  return t;
}

// One (batch, head, gx, gy) slice: an undilated nx x ny problem (see above).
struct SliceGeo {
  int64_t bh;
  int gx, gy, nx, ny;
};

inline SliceGeo slice_geo(const Geometry& g, int64_t slice) {
  const int dd = g.dil * g.dil;
  SliceGeo s;
  s.bh = slice / dd;
  s.gx = static_cast<int>((slice % dd) / g.dil);
  s.gy = static_cast<int>(slice % g.dil);
  s.nx = na2d::subgrid_len(s.gx, static_cast<int>(g.X), g.dil);
  s.ny = na2d::subgrid_len(s.gy, static_cast<int>(g.Y), g.dil);
  return s;
}

// dst [(r1 - r0) * (c1 - c0), D] <- slice positions rows [r0, r1) x cols [c0, c1) of t; off-map
// positions are zero vectors. A strided head dim (channels-first maps) is read along the map's
// columns, d by d, so each read walks memory in order rather than one cache line per element.
template <typename T>
void pack(const Strided<T>& t, const Geometry& g, const SliceGeo& s, int r0, int r1, int c0, int c1, T* dst) {
  const int64_t D = g.D, hy = c1 - c0;
  const int ca = std::max(c0, 0), cb = std::min(c1, s.ny);
  for (int r = r0; r < r1; ++r) {
    T* row = dst + (r - r0) * hy * D;
    if (r < 0 || r >= s.nx || ca >= cb) {
      std::fill(row, row + hy * D, T(0));
      continue;
    }
    std::fill(row, row + (ca - c0) * D, T(0));
    std::fill(row + (cb - c0) * D, row + hy * D, T(0));
    const T* src = t.at(s.bh, g.H, s.gx + int64_t{g.dil} * r, s.gy);
    const int64_t cs = int64_t{g.dil} * t.sy;  // between sub-grid columns
    if (t.sd == 1) {
      for (int c = ca; c < cb; ++c) std::copy(src + c * cs, src + c * cs + D, row + (c - c0) * D);
    } else {
      for (int64_t d = 0; d < D; ++d) {
        const T* sd = src + d * t.sd;
        for (int c = ca; c < cb; ++c) row[(c - c0) * D + d] = sd[c * cs];
      }
    }
  }
}

// dst [rows, w, D] <- columns [off, off + w) of a staged [rows, width, D] block.
template <typename T>
inline void sub_block(const T* st, int rows, int width, int off, int w, int64_t D, T* dst) {
  for (int r = 0; r < rows; ++r) std::copy(st + (int64_t{r} * width + off) * D, st + (int64_t{r} * width + off + w) * D,
                                           dst + int64_t{r} * w * D);
}

// Window of query (qi, qj) of a slice, relative to a halo whose first row/col is (r0, c0).
struct Win {
  int base;        // index of the window's first key in a halo row-major [hx, hy] block
  int u0, u1;      // window rows taken (mask mode drops off-map rows)
  int w0, w1;      // window cols taken
  int bi0, bj0;    // bias table row/col of window entry (0, 0)
};

inline Win window_of(const Geometry& g, const SliceGeo& s, int qi, int qj, int r0, int c0, int hy) {
  const int ks = g.ks;
  const int wsi = window_start(qi, s.nx, ks, g.border), wsj = window_start(qj, s.ny, ks, g.border);
  Win w;
  w.base = (wsi - r0) * hy + (wsj - c0);
  w.u0 = 0, w.u1 = ks, w.w0 = 0, w.w1 = ks;
  if (g.border == kMask) {
    w.u0 = std::max(0, -wsi), w.u1 = std::min(ks, s.nx - wsi);
    w.w0 = std::max(0, -wsj), w.w1 = std::min(ks, s.ny - wsj);
  }
  w.bi0 = wsi - qi + ks - 1, w.bj0 = wsj - qj + ks - 1;
  return w;
}

// Halo rows [r0, r1) of query rows [i0, i1) (window starts are non-decreasing along an axis).
inline void halo(int i0, int i1, int n, const Geometry& g, int* r0, int* r1) {
  *r0 = window_start(i0, n, g.ks, g.border);
  *r1 = window_start(i1 - 1, n, g.ks, g.border) + g.ks;
}

template <typename T>
void fwd_tiled(const Geometry g, Strided<T> q, Strided<T> k, Strided<T> v, const T* rpb, StridedOut<T> out, T* lse,
               T scale) {
  const TileShape ts = tile_shape();
  const int ks = g.ks, R = 2 * ks - 1;
  const int64_t D = g.D, slices = g.B * g.H * g.dil * g.dil;
  const int64_t trows = (na2d::subgrid_len(0, static_cast<int>(g.X), g.dil) + ts.tx - 1) / ts.tx;
  const int hk_max = (ts.tx + ks - 1) * (ts.ty + ks - 1), tq_max = ts.tx * ts.ty, kw_max = ks * (ts.ty + ks - 1);
  // Staging: a tile row's query rows and key halo rows over the whole slice width, packed once
  // (long reads in memory order even for channels-first maps), then cut into tiles.
  const int64_t ny_max = na2d::subgrid_len(0, static_cast<int>(g.Y), g.dil);
  const int64_t hrows = ts.tx + ks - 1, hcols = ny_max + ks - 1;
  at::parallel_for(0, slices * trows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> Qp(tq_max * D), Kp(hk_max * D), Vp(hk_max * D), S(int64_t{tq_max} * kw_max), O(tq_max * D),
        lg(ks * ks), Qs(ts.tx * ny_max * D), Ks(hrows * hcols * D), Vs(hrows * hcols * D);
    for (int64_t task = begin; task < end; ++task) {
      const SliceGeo s = slice_geo(g, task / trows);
      const int i0 = static_cast<int>(task % trows) * ts.tx;
      if (i0 >= s.nx) continue;
      const int i1 = std::min(i0 + ts.tx, s.nx);
      const T* bias = rpb ? rpb + (s.bh % g.H) * R * R : nullptr;
      int r0, r1, cA, cB;
      halo(i0, i1, s.nx, g, &r0, &r1);
      halo(0, s.ny, s.ny, g, &cA, &cB);
      pack(q, g, s, i0, i1, 0, s.ny, Qs.data());
      pack(k, g, s, r0, r1, cA, cB, Ks.data());
      pack(v, g, s, r0, r1, cA, cB, Vs.data());
      for (int j0 = 0; j0 < s.ny; j0 += ts.ty) {
        const int j1 = std::min(j0 + ts.ty, s.ny);
        int c0, c1;
        halo(j0, j1, s.ny, g, &c0, &c1);
        const int ty = j1 - j0, tq = (i1 - i0) * ty, hy = c1 - c0, kw = ks * hy, Di = static_cast<int>(D);
        sub_block(Qs.data(), i1 - i0, s.ny, j0, ty, D, Qp.data());
        sub_block(Ks.data(), r1 - r0, cB - cA, c0 - cA, hy, D, Kp.data());
        sub_block(Vs.data(), r1 - r0, cB - cA, c0 - cA, hy, D, Vp.data());
        // One query row sees ks halo rows (kw keys): [TY, D] @ [D, kw] -> [TY, kw]
        for (int ii = 0; ii < i1 - i0; ++ii) {
          const int64_t kr = int64_t{window_start(i0 + ii, s.nx, ks, g.border) - r0} * hy * D;
          gemm('N', 'T', ty, kw, Di, scale, Qp.data() + ii * ty * D, Di, Kp.data() + kr, Di, T(0),
               S.data() + int64_t{ii} * ty * kw, kw);
        }
        for (int t = 0; t < tq; ++t) {
          const int qi = i0 + t / ty, qj = j0 + t % ty;
          const Win w = window_of(g, s, qi, qj, window_start(qi, s.nx, ks, g.border), c0, hy);
          T* srow = S.data() + int64_t{t} * kw;
          int n = 0;
          for (int u = w.u0; u < w.u1; ++u) {
            const T* sr = srow + w.base + u * hy;
            if (bias) {
              const T* br = bias + (w.bi0 + u) * R + w.bj0;
              for (int c = w.w0; c < w.w1; ++c) lg[n++] = sr[c] + br[c];
            } else {
              for (int c = w.w0; c < w.w1; ++c) lg[n++] = sr[c];
            }
          }
          T m = lg[0];
          for (int e = 1; e < n; ++e) m = std::max(m, lg[e]);
          const T l = exp_shift_sum(lg.data(), n, m);
          const int64_t tok = s.bh * g.X * g.Y + (s.gx + int64_t{g.dil} * qi) * g.Y + s.gy + int64_t{g.dil} * qj;
          lse[tok] = m + std::log(l);
          const T inv = T(1) / l;
          std::fill(srow, srow + kw, T(0));
          n = 0;
          for (int u = w.u0; u < w.u1; ++u) {
            T* sr = srow + w.base + u * hy;
            for (int c = w.w0; c < w.w1; ++c) sr[c] = lg[n++] * inv;
          }
        }
        // [TY, kw] @ [kw, D] -> [TY, D]
        for (int ii = 0; ii < i1 - i0; ++ii) {
          const int64_t kr = int64_t{window_start(i0 + ii, s.nx, ks, g.border) - r0} * hy * D;
          gemm('N', 'N', ty, Di, kw, T(1), S.data() + int64_t{ii} * ty * kw, kw, Vp.data() + kr, Di, T(0),
               O.data() + ii * ty * D, Di);
        }
        for (int t = 0; t < tq; ++t) {
          const int qi = i0 + t / ty, qj = j0 + t % ty;
          T* o = out.at(s.bh, g.H, s.gx + int64_t{g.dil} * qi, s.gy + int64_t{g.dil} * qj);
          store(o, O.data() + t * D, T(1), D, out.sd);
        }
      }
    }
  });
}

// dk, dv zeroed by the caller; bias_part [slices, R*R] zeroed, or null without rpb.
template <typename T>
void bwd_tiled(const Geometry g, Strided<T> dout, Strided<T> q, Strided<T> k, Strided<T> v, const T* rpb,
               Strided<T> out, const T* lse, StridedOut<T> dq, StridedOut<T> dk, StridedOut<T> dv, T* bias_part,
               T scale) {
  const TileShape ts = tile_shape();
  const int ks = g.ks, R = 2 * ks - 1;
  const int64_t D = g.D, slices = g.B * g.H * g.dil * g.dil;
  const int hk_max = (ts.tx + ks - 1) * (ts.ty + ks - 1), tq_max = ts.tx * ts.ty, kw_max = ks * (ts.ty + ks - 1);
  const int64_t ny_max = na2d::subgrid_len(0, static_cast<int>(g.Y), g.dil);
  const int64_t hrows = ts.tx + ks - 1, hcols = ny_max + ks - 1;  // staging, as in fwd_tiled
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> Qp(tq_max * D), dOp(tq_max * D), Kp(hk_max * D), Vp(hk_max * D), P(int64_t{tq_max} * kw_max),
        dS(int64_t{tq_max} * kw_max), G(tq_max * D), dKh(hk_max * D), dVh(hk_max * D), lg(ks * ks), dp(ks * ks),
        delta(tq_max), Qs(ts.tx * ny_max * D), dOs(ts.tx * ny_max * D), Ks(hrows * hcols * D), Vs(hrows * hcols * D);
    for (int64_t sl = begin; sl < end; ++sl) {
      const SliceGeo s = slice_geo(g, sl);
      const T* bias = rpb ? rpb + (s.bh % g.H) * R * R : nullptr;
      T* dbias = rpb ? bias_part + sl * R * R : nullptr;
      for (int i0 = 0; i0 < s.nx; i0 += ts.tx) {
        const int i1 = std::min(i0 + ts.tx, s.nx);
        int r0, r1, cA, cB;
        halo(i0, i1, s.nx, g, &r0, &r1);
        halo(0, s.ny, s.ny, g, &cA, &cB);
        pack(q, g, s, i0, i1, 0, s.ny, Qs.data());
        pack(dout, g, s, i0, i1, 0, s.ny, dOs.data());
        pack(k, g, s, r0, r1, cA, cB, Ks.data());
        pack(v, g, s, r0, r1, cA, cB, Vs.data());
        for (int j0 = 0; j0 < s.ny; j0 += ts.ty) {
          const int j1 = std::min(j0 + ts.ty, s.ny);
          int c0, c1;
          halo(j0, j1, s.ny, g, &c0, &c1);
          const int ty = j1 - j0, tq = (i1 - i0) * ty, hy = c1 - c0, hk = (r1 - r0) * hy, kw = ks * hy;
          const int Di = static_cast<int>(D);
          sub_block(Qs.data(), i1 - i0, s.ny, j0, ty, D, Qp.data());
          sub_block(dOs.data(), i1 - i0, s.ny, j0, ty, D, dOp.data());
          sub_block(Ks.data(), r1 - r0, cB - cA, c0 - cA, hy, D, Kp.data());
          sub_block(Vs.data(), r1 - r0, cB - cA, c0 - cA, hy, D, Vp.data());
          for (int t = 0; t < tq; ++t) {  // delta = rowsum(dO * O)
            const int qi = i0 + t / ty, qj = j0 + t % ty;
            const T* o = out.at(s.bh, g.H, s.gx + int64_t{g.dil} * qi, s.gy + int64_t{g.dil} * qj);
            delta[t] = dot(dOp.data() + t * D, o, D, out.sd);
          }
          // Per query row, its ks halo rows (kw keys): S [TY, kw] = scale * Q [TY, D] @ K^T [D, kw];
          // dP [TY, kw] = dO [TY, D] @ V^T [D, kw]
          for (int ii = 0; ii < i1 - i0; ++ii) {
            const int64_t kr = int64_t{window_start(i0 + ii, s.nx, ks, g.border) - r0} * hy * D;
            const int64_t so = int64_t{ii} * ty * kw, qo = int64_t{ii} * ty * D;
            gemm('N', 'T', ty, kw, Di, scale, Qp.data() + qo, Di, Kp.data() + kr, Di, T(0), P.data() + so, kw);
            gemm('N', 'T', ty, kw, Di, T(1), dOp.data() + qo, Di, Vp.data() + kr, Di, T(0), dS.data() + so, kw);
          }
          for (int t = 0; t < tq; ++t) {
            const int qi = i0 + t / ty, qj = j0 + t % ty;
            const Win w = window_of(g, s, qi, qj, window_start(qi, s.nx, ks, g.border), c0, hy);
            T* prow = P.data() + int64_t{t} * kw;
            T* dsrow = dS.data() + int64_t{t} * kw;
            int n = 0;
            for (int u = w.u0; u < w.u1; ++u) {
              const T* sr = prow + w.base + u * hy;
              const T* dr = dsrow + w.base + u * hy;
              const T* br = bias ? bias + (w.bi0 + u) * R + w.bj0 : nullptr;
              for (int c = w.w0; c < w.w1; ++c, ++n) {
                lg[n] = br ? sr[c] + br[c] : sr[c];
                dp[n] = dr[c];
              }
            }
            const int64_t tok = s.bh * g.X * g.Y + (s.gx + int64_t{g.dil} * qi) * g.Y + s.gy + int64_t{g.dil} * qj;
            exp_shift(lg.data(), n, lse[tok]);  // P
            std::fill(prow, prow + kw, T(0));
            std::fill(dsrow, dsrow + kw, T(0));
            const T dl = delta[t];
            n = 0;
            for (int u = w.u0; u < w.u1; ++u) {
              T* sr = prow + w.base + u * hy;
              T* dr = dsrow + w.base + u * hy;
              T* dbr = dbias ? dbias + (w.bi0 + u) * R + w.bj0 : nullptr;
              for (int c = w.w0; c < w.w1; ++c, ++n) {
                const T ds = lg[n] * (dp[n] - dl);  // dS = P * (dP - delta)
                sr[c] = lg[n];
                dr[c] = ds;
                if (dbr) dbr[c] += ds;
              }
            }
          }
          // Per query row: dQ [TY, D] = scale * dS [TY, kw] @ K [kw, D]; the halo sums (in row order)
          // dK [kw, D] += scale * dS^T [kw, TY] @ Q [TY, D], dV [kw, D] += P^T [kw, TY] @ dO [TY, D]
          std::fill(dKh.begin(), dKh.begin() + hk * D, T(0));
          std::fill(dVh.begin(), dVh.begin() + hk * D, T(0));
          for (int ii = 0; ii < i1 - i0; ++ii) {
            const int64_t kr = int64_t{window_start(i0 + ii, s.nx, ks, g.border) - r0} * hy * D;
            const int64_t so = int64_t{ii} * ty * kw, qo = int64_t{ii} * ty * D;
            gemm('N', 'N', ty, Di, kw, scale, dS.data() + so, kw, Kp.data() + kr, Di, T(0), G.data() + qo, Di);
            gemm('T', 'N', kw, Di, ty, scale, dS.data() + so, kw, Qp.data() + qo, Di, T(1), dKh.data() + kr, Di);
            gemm('T', 'N', kw, Di, ty, T(1), P.data() + so, kw, dOp.data() + qo, Di, T(1), dVh.data() + kr, Di);
          }
          for (int t = 0; t < tq; ++t) {
            const int qi = i0 + t / ty, qj = j0 + t % ty;
            store(dq.at(s.bh, g.H, s.gx + int64_t{g.dil} * qi, s.gy + int64_t{g.dil} * qj), G.data() + t * D, T(1), D,
                  dq.sd);
          }
          for (int which = 0; which < 2; ++which) {
            const StridedOut<T>& dst = which == 0 ? dk : dv;
            const T* src = which == 0 ? dKh.data() : dVh.data();
            for (int r = r0; r < r1; ++r) {
              for (int c = c0; c < c1; ++c, src += D) {
                if (r < 0 || r >= s.nx || c < 0 || c >= s.ny) continue;
                T* d = dst.at(s.bh, g.H, s.gx + int64_t{g.dil} * r, s.gy + int64_t{g.dil} * c);
                if (dst.sd == 1) {
#pragma omp simd
                  for (int64_t e = 0; e < D; ++e) d[e] += src[e];
                } else {
                  for (int64_t e = 0; e < D; ++e) d[e * dst.sd] += src[e];
                }
              }
            }
          }
        }
      }
    }
  });
}

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Geometry geometry(const at::Tensor& q, int64_t kernel_size, int64_t border, int64_t dilation) {
  return Geometry{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4), static_cast<int>(kernel_size),
                  static_cast<int>(border), static_cast<int>(dilation)};
}

void check_cpu(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device());
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, op, ": q has dtype ", t,
              "; the CPU kernels take float32, float64 or bfloat16");
}

}  // namespace

at::Tensor empty_in_order_of(const at::Tensor& t) {
  // Dims outermost first: decreasing stride, ties in logical order (a stable sort), broadcast
  // dims (stride 0) first. kernels/_layout.py is the same rule for the fake implementations.
  std::vector<int64_t> order(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) order[d] = d;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t sa = t.stride(a), sb = t.stride(b);
    if ((sa == 0) != (sb == 0)) return sa == 0;
    return sa > sb;
  });
  return at::empty_permuted(t.sizes(), order, t.options());
}

void na2d_check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& rpb, int64_t kernel_size, int64_t border, int64_t dilation) {
  TORCH_CHECK(q.dim() == 5, "na2d: q must have 5 dimensions [B, H, X, Y, D], got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "na2d: k has shape ", k.sizes(), "; expected the shape of q ", q.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "na2d: v has shape ", v.sizes(), "; expected the shape of q ", q.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "na2d: k (", k.scalar_type(),
              ") and v (", v.scalar_type(), ") must have the dtype of q (", q.scalar_type(), ")");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "na2d: k (", k.device(), ") and v (", v.device(),
              ") must be on the device of q (", q.device(), ")");
  TORCH_CHECK(kernel_size >= 3 && kernel_size % 2 == 1 && kernel_size < (1 << 15),
              "na2d: kernel_size must be an odd int >= 3, got ", kernel_size);
  TORCH_CHECK(border == kBorderZero || border == kBorderMask || border == kBorderClamp,
              "na2d: border must be 0 (zero), 1 (mask) or 2 (clamp), got ", border);
  const int64_t X = q.size(2), Y = q.size(3);
  TORCH_CHECK(X >= 1 && Y >= 1 && q.size(4) >= 1, "na2d: q must have a non-empty map and head dim, got shape ",
              q.sizes());
  TORCH_CHECK(X < (1 << 30) && Y < (1 << 30), "na2d: q's map ", X, "x", Y, " is too large");
  TORCH_CHECK(dilation >= 1 && dilation < (1 << 15), "na2d: dilation must be an int >= 1, got ", dilation);
  TORCH_CHECK(border != kBorderClamp || (X >= kernel_size * dilation && Y >= kernel_size * dilation),
              "na2d: border clamp needs a map of at least kernel_size*dilation x kernel_size*dilation (",
              kernel_size * dilation, "x", kernel_size * dilation, "), got ", X, "x", Y);
  if (rpb.has_value() && rpb->defined()) {
    const int64_t R = 2 * kernel_size - 1;
    TORCH_CHECK(rpb->dim() == 3 && rpb->size(0) == q.size(1) && rpb->size(1) == R && rpb->size(2) == R,
                "na2d: rpb must have shape [H, 2*kernel_size-1, 2*kernel_size-1] = [", q.size(1), ", ", R, ", ", R,
                "], got ", rpb->sizes());
    TORCH_CHECK(rpb->scalar_type() == q.scalar_type(), "na2d: rpb has dtype ", rpb->scalar_type(),
                "; expected the dtype of q (", q.scalar_type(), ")");
    TORCH_CHECK(rpb->device() == q.device(), "na2d: rpb is on ", rpb->device(), "; expected the device of q (",
                q.device(), ")");
  }
}

void na2d_check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes(), "na2d_bwd: dout has shape ", dout.sizes(), "; expected the shape of q ",
              q.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "na2d_bwd: out has shape ", out.sizes(), "; expected the shape of q ",
              q.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), "na2d_bwd: dout (",
              dout.scalar_type(), ") and out (", out.scalar_type(), ") must have the dtype of q (", q.scalar_type(), ")");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4), "na2d_bwd: lse has shape ", lse.sizes(),
              "; expected [B, H, X, Y] = ", q.sizes().slice(0, 4));
  TORCH_CHECK(lse.scalar_type() == stat_type(q.scalar_type()), "na2d_bwd: lse has dtype ", lse.scalar_type(),
              "; expected ", stat_type(q.scalar_type()), " (the forward's logsumexp)");
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "na2d_bwd: dout, out and lse must be on the device of q (", q.device(), ")");
}

std::tuple<at::Tensor, at::Tensor> na2d_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                int64_t border, double scale, int64_t dilation) {
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  check_cpu(q, "na2d_fwd");
  // q, k, v are read through their strides (no copy); out takes q's dim order, lse is contiguous.
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rc = has_rpb ? rpb->contiguous() : at::Tensor();
  auto out = empty_in_order_of(q);
  auto lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(stat_type(q.scalar_type())));
  const Geometry g = geometry(q, kernel_size, border, dilation);
  bool tiled = q.scalar_type() != at::kBFloat16;  // fp32 / fp64: tiles of small GEMMs
  if (tiled) {  // a non-finite v would reach queries outside its windows (all_finite)
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_fwd_cpu_finite", [&] { tiled = all_finite(strided<scalar_t>(v), v); });
  }
  if (tiled) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_fwd_cpu_tiled", [&] {
      fwd_tiled<scalar_t>(g, strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v),
                          has_rpb ? rc.data_ptr<scalar_t>() : nullptr, strided_out<scalar_t>(out),
                          lse.data_ptr<scalar_t>(), static_cast<scalar_t>(scale));
    });
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t>(g, strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v),
                         has_rpb ? rc.data_ptr<scalar_t>() : nullptr, strided_out<scalar_t>(out), lse.data_ptr<A>(),
                         static_cast<A>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse, int64_t kernel_size,
    int64_t border, double scale, int64_t dilation) {
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  na2d_check_bwd_args(dout, q, out, lse);
  check_cpu(q, "na2d_bwd");
  // dout, q, k, v and out are read through their strides (no copy); dq, dk, dv take the dim
  // order of q, k, v; drpb is contiguous.
  const auto lc = lse.contiguous();  // the forward's own (contiguous) statistic
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rc = has_rpb ? rpb->contiguous() : at::Tensor();
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  const auto stat = opts.dtype(stat_type(q.scalar_type()));
  const int64_t R = 2 * kernel_size - 1;
  bool tiled = q.scalar_type() != at::kBFloat16;  // fp32 / fp64: tiles of small GEMMs
  if (tiled) {  // a non-finite input would reach gradients outside its windows (all_finite)
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_bwd_cpu_finite", [&] {
      for (const at::Tensor* t : {&dout, &q, &k, &v, &out}) tiled = tiled && all_finite(strided<scalar_t>(*t), *t);
    });
  }
  if (tiled) {
    const Geometry g = geometry(q, kernel_size, border, dilation);
    auto dq = empty_in_order_of(q);
    auto dk = empty_in_order_of(k).zero_();
    auto dv = empty_in_order_of(v).zero_();
    const int64_t slices = g.B * g.H * g.dil * g.dil;
    // Per-slice bias sums [slices, R, R], reduced in slice order below.
    auto part = has_rpb ? at::zeros({slices, R * R}, opts) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_bwd_cpu_tiled", [&] {
      bwd_tiled<scalar_t>(g, strided<scalar_t>(dout), strided<scalar_t>(q), strided<scalar_t>(k),
                          strided<scalar_t>(v), has_rpb ? rc.data_ptr<scalar_t>() : nullptr, strided<scalar_t>(out),
                          lc.data_ptr<scalar_t>(), strided_out<scalar_t>(dq), strided_out<scalar_t>(dk),
                          strided_out<scalar_t>(dv), has_rpb ? part.data_ptr<scalar_t>() : nullptr,
                          static_cast<scalar_t>(scale));
    });
    if (!has_rpb) return {dq, dk, dv, at::empty({0}, opts)};
    auto drpb = at::zeros({g.H, R, R}, opts);
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_bwd_cpu_bias", [&] {
      const scalar_t* p = part.data_ptr<scalar_t>();
      scalar_t* a = drpb.data_ptr<scalar_t>();
      const int64_t n = R * R, dd = g.dil * g.dil;
      for (int64_t sl = 0; sl < slices; ++sl) {
        scalar_t* ah = a + ((sl / dd) % g.H) * n;
        for (int64_t e = 0; e < n; ++e) ah[e] += p[sl * n + e];
      }
    });
    return {dq, dk, dv, drpb};
  }
  auto dq = empty_in_order_of(q);
  auto dk = empty_in_order_of(k);
  auto dv = empty_in_order_of(v);
  auto delta = at::empty(q.sizes().slice(0, 4), stat);
  const Geometry g = geometry(q, kernel_size, border, dilation);
  const int64_t rows = g.B * g.H * g.X;
  const int64_t blocks = has_rpb ? std::min<int64_t>(rows, kBiasBlocks) : rows;
  // Per-block bias sums: [blocks, H, R, R], independent of the number of tokens.
  auto bias_part = has_rpb ? at::zeros({blocks, g.H, R, R}, stat) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* rp = has_rpb ? rc.data_ptr<scalar_t>() : nullptr;
    const auto sdo = strided<scalar_t>(dout), sq = strided<scalar_t>(q), sk = strided<scalar_t>(k),
               sv = strided<scalar_t>(v);
    bwd_dq_kernel<scalar_t>(g, sdo, sq, sk, sv, rp, strided<scalar_t>(out), lc.data_ptr<A>(), delta.data_ptr<A>(),
                            strided_out<scalar_t>(dq), has_rpb ? bias_part.data_ptr<A>() : nullptr, blocks,
                            static_cast<A>(scale));
    bwd_dkdv_kernel<scalar_t>(g, sdo, sq, sk, sv, rp, lc.data_ptr<A>(), delta.data_ptr<A>(), strided_out<scalar_t>(dk),
                              strided_out<scalar_t>(dv), static_cast<A>(scale));
  });
  at::Tensor drpb;
  if (has_rpb) {
    // Reduced over blocks in block order (a plain sum over dim 0 may reorder by vector width).
    auto acc = at::zeros({g.H * R * R}, stat);
    AT_DISPATCH_FLOATING_TYPES(stat.dtype().toScalarType(), "na2d_bwd_cpu_bias", [&] {
      const scalar_t* part = bias_part.data_ptr<scalar_t>();
      scalar_t* a = acc.data_ptr<scalar_t>();
      const int64_t n = g.H * R * R;
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t e = 0; e < n; ++e) a[e] += part[b * n + e];
    });
    drpb = acc.view({g.H, R, R}).to(q.scalar_type());
  } else {
    drpb = at::empty({0}, opts);
  }
  return {dq, dk, dv, drpb};
}

}  // namespace dcal
