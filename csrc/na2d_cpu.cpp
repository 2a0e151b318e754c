// 2-D neighborhood attention (docs/contract.md, neighborhood_attention2d) on CPU: forward and backward.
//
// Inputs (q, k, v; dout and out in the backward) are read through their strides: contiguous,
// heads-last, slices of a fused qkv projection or channels-first views cost no copy. Outputs and
// gradients are written through their strides too: each takes the dim order of its input
// (empty_in_order_of: out and dq like q, dk like k, dv like v), so a caller reshapes them back to
// its own layout without a copy. lse (and the backward's delta) are contiguous [B, H, X, Y].
//
// fp32, fp64 and bf16 run the register-blocked kernels of na2d_cpu_simd.cpp (the queries of a map
// row in the SIMD lanes; bf16 on the fp32 kernels, widened as it is staged and rounded as it is
// written). Inputs holding a NaN or an inf run the simple kernels below (the
// SIMD kernels weigh keys outside a lane's window by 0 where lanes' windows differ, at clamp
// borders, and gather dK, dV over whole rows, where a key outside a query's window enters with
// weight 0: 0 * NaN or 0 * inf would reach that query; they find such an input while staging it
// and report it, and the call then runs the simple kernels, which touch only each query's own
// window, so a NaN or inf reaches exactly the outputs it reaches in PyTorch's own computation).
// So does every call of the private ops _na2d_fwd_window / _na2d_bwd_window (the two paths compared
// in one process: tests, bench).
// The simple kernels: parallel over (batch, head, map row), the head dim the inner loop of every
// dot and axpy, computed in fp32; each query one online-softmax pass over its window.
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
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "checks.h"
#include "dcal.h"
#include "na2d.h"
#include "na2d_cpu_layout.h"
#include "na2d_cpu_simd.h"

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

constexpr OpName kFwd{"na2d_fwd", ErrorClasses::kRuntimeErrors};
constexpr OpName kBwd{"na2d_bwd", ErrorClasses::kRuntimeErrors};

using Geometry = na2d_simd::Geo;

// Rows per parallel task: enough work per task that a small call runs on one thread instead of
// paying for a parallel region (a row costs about Y * ks^2 * D multiply-adds per pass).
int64_t row_grain(const Geometry& g) {
  const int64_t work = std::max<int64_t>(1, g.Y * g.ks * g.ks * g.D);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work);
}

// Inputs and outputs through their strides (na2d_cpu_layout.h), as elements of type S: torch's
// type T itself, or for the SIMD kernels' bf16 (plain C++, na2d_cpu_simd.h) its bits.
template <typename T, typename S = T>
Strided<S> strided(const at::Tensor& t) {
  return {reinterpret_cast<const S*>(t.const_data_ptr<T>()),
          t.stride(0),
          t.stride(1),
          t.stride(2),
          t.stride(3),
          t.stride(4)};
}

template <typename T, typename S = T>
StridedOut<S> strided_out(at::Tensor& t) {
  return {reinterpret_cast<S*>(t.data_ptr<T>()), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}
Strided<na2d_simd::bf16> strided_bits(const at::Tensor& t) { return strided<at::BFloat16, na2d_simd::bf16>(t); }
StridedOut<na2d_simd::bf16> strided_out_bits(at::Tensor& t) { return strided_out<at::BFloat16, na2d_simd::bf16>(t); }

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
          load(qbuf.data(), q.at(bh, H, i, j), D, q.sd);         // [D]
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

Geometry geometry(const at::Tensor& q, int64_t kernel_size, int64_t border, int64_t dilation) {
  return Geometry{q.size(0),
                  q.size(1),
                  q.size(2),
                  q.size(3),
                  q.size(4),
                  static_cast<int>(kernel_size),
                  static_cast<int>(border),
                  static_cast<int>(dilation)};
}

// What the CPU kernels take beyond the shared checks (na2d_check_args): CPU tensors of fp32, fp64
// or bf16.
void check_cpu(const OpName& op, const at::Tensor& q) {
  DCAL_CHECK_DEVICE(op, q.device().is_cpu(), "q must be a CPU tensor here, got ", q.device());
  const auto t = q.scalar_type();
  DCAL_CHECK_DTYPE(op, t == at::kFloat || t == at::kDouble || t == at::kBFloat16, "q has dtype ", t,
                   "; the CPU kernels take float32, float64 or bfloat16");
}

// The forward on the SIMD kernels (fp32, fp64, and bf16 on the fp32 kernels with rpb widened to
// fp32): out and lse written whole. False when an input holds an inf or a NaN: the results are
// then not to be used (na2d_cpu_simd.h).
bool fwd_simd(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rc,
              double scale, at::Tensor& out, at::Tensor& lse) {
  const bool has_rpb = rc.defined();
  if (q.scalar_type() == at::kBFloat16) {
    const at::Tensor rf = has_rpb ? rc.to(at::kFloat) : at::Tensor();
    return na2d_simd::fwd(g, strided_bits(q), strided_bits(k), strided_bits(v),
                          has_rpb ? rf.data_ptr<float>() : nullptr, strided_out_bits(out), lse.data_ptr<float>(),
                          static_cast<float>(scale));
  }
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_fwd_cpu_simd", [&] {
    done = na2d_simd::fwd(g, strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v),
                          has_rpb ? rc.data_ptr<scalar_t>() : nullptr, strided_out<scalar_t>(out),
                          lse.data_ptr<scalar_t>(), static_cast<scalar_t>(scale));
  });
  return done;
}

// The backward on the SIMD kernels (fp32, fp64, bf16 as in fwd_simd): dq, dk, dv written whole,
// *drpb the bias gradient (the per-slice sums, in the statistics' type, reduced in slice order,
// then cast to q's dtype) or empty without rpb. False when an input holds an inf or a NaN: the
// results are then not to be used (na2d_cpu_simd.h).
bool bwd_simd(const Geometry& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& rc, const at::Tensor& out, const at::Tensor& lc, double scale, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, at::Tensor* drpb) {
  const bool has_rpb = rc.defined();
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  const auto stat = opts.dtype(na2d_stat_type(q.scalar_type()));
  const int64_t R = 2 * g.ks - 1, slices = g.B * g.H * g.dil * g.dil;
  auto part = has_rpb ? at::empty({slices, R * R}, stat) : at::Tensor();
  bool done = false;
  if (q.scalar_type() == at::kBFloat16) {
    const at::Tensor rf = has_rpb ? rc.to(at::kFloat) : at::Tensor();
    done = na2d_simd::bwd(g, strided_bits(dout), strided_bits(q), strided_bits(k), strided_bits(v),
                          has_rpb ? rf.data_ptr<float>() : nullptr, strided_bits(out), lc.data_ptr<float>(),
                          strided_out_bits(dq), strided_out_bits(dk), strided_out_bits(dv),
                          has_rpb ? part.data_ptr<float>() : nullptr, static_cast<float>(scale));
  } else {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_bwd_cpu_simd", [&] {
      done =
          na2d_simd::bwd(g, strided<scalar_t>(dout), strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v),
                         has_rpb ? rc.data_ptr<scalar_t>() : nullptr, strided<scalar_t>(out), lc.data_ptr<scalar_t>(),
                         strided_out<scalar_t>(dq), strided_out<scalar_t>(dk), strided_out<scalar_t>(dv),
                         has_rpb ? part.data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(scale));
    });
  }
  if (!done) return false;
  if (!has_rpb) {
    *drpb = at::empty({0}, opts);
    return true;
  }
  auto acc = at::zeros({g.H, R, R}, stat);
  AT_DISPATCH_FLOATING_TYPES(stat.dtype().toScalarType(), "na2d_bwd_cpu_bias", [&] {
    const scalar_t* p = part.data_ptr<scalar_t>();
    scalar_t* a = acc.data_ptr<scalar_t>();
    const int64_t n = R * R, dd = g.dil * g.dil;
    for (int64_t sl = 0; sl < slices; ++sl) {
      scalar_t* ah = a + ((sl / dd) % g.H) * n;
      for (int64_t e = 0; e < n; ++e) ah[e] += p[sl * n + e];
    }
  });
  *drpb = acc.to(q.scalar_type());  // the same tensor for fp32, fp64
  return true;
}

// The backward on the per-window kernels (an input holding an inf or a NaN): dq, dk, dv
// written whole; returns the bias gradient (per-block sums reduced in block order), or an empty
// tensor without rpb.
at::Tensor bwd_simple(const Geometry& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& rc, const at::Tensor& out, const at::Tensor& lc,
                      double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const bool has_rpb = rc.defined();
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  const auto stat = opts.dtype(na2d_stat_type(q.scalar_type()));
  const int64_t R = 2 * g.ks - 1;
  auto delta = at::empty(q.sizes().slice(0, 4), stat);
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
  if (!has_rpb) return at::empty({0}, opts);
  // Reduced over blocks in block order (a plain sum over dim 0 may reorder by vector width).
  auto acc = at::zeros({g.H * R * R}, stat);
  AT_DISPATCH_FLOATING_TYPES(stat.dtype().toScalarType(), "na2d_bwd_cpu_bias", [&] {
    const scalar_t* part = bias_part.data_ptr<scalar_t>();
    scalar_t* a = acc.data_ptr<scalar_t>();
    const int64_t n = g.H * R * R;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t e = 0; e < n; ++e) a[e] += part[b * n + e];
  });
  return acc.view({g.H, R, R}).to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& rpb, int64_t kernel_size, int64_t border,
                                           double scale, int64_t dilation, bool simd) {
  // Checks.
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  check_cpu(kFwd, q);
  // Allocate: q, k, v are read through their strides (no copy); out takes q's dim order, lse is
  // contiguous.
  const Geometry g = geometry(q, kernel_size, border, dilation);
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rc = has_rpb ? rpb->contiguous() : at::Tensor();
  auto out = empty_in_order_of(q);
  auto lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(na2d_stat_type(q.scalar_type())));
  // Dispatch: the SIMD kernels, unless an input is not finite (or the caller asks for the
  // per-window kernels); otherwise the per-window kernels, which write out and lse whole again.
  const bool done = simd && fwd_simd(g, q, k, v, rc, scale, out, lse);
  if (!done) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_fwd_cpu", [&] {
      using A = at::opmath_type<scalar_t>;
      fwd_kernel<scalar_t>(g, strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v),
                           has_rpb ? rc.data_ptr<scalar_t>() : nullptr, strided_out<scalar_t>(out), lse.data_ptr<A>(),
                           static_cast<A>(scale));
    });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const c10::optional<at::Tensor>& rpb,
                                                                   const at::Tensor& out, const at::Tensor& lse,
                                                                   int64_t kernel_size, int64_t border, double scale,
                                                                   int64_t dilation, bool simd) {
  // Checks.
  na2d_check_args(q, k, v, rpb, kernel_size, border, dilation);
  na2d_check_bwd_args(dout, q, out, lse);
  check_cpu(kBwd, q);
  // Allocate: dout, q, k, v and out are read through their strides (no copy); dq, dk, dv take the
  // dim order of q, k, v and are written whole by either path; drpb is contiguous.
  const Geometry g = geometry(q, kernel_size, border, dilation);
  const auto lc = lse.contiguous();  // the forward's own (contiguous) statistic
  const bool has_rpb = rpb.has_value() && rpb->defined();
  const at::Tensor rc = has_rpb ? rpb->contiguous() : at::Tensor();
  auto dq = empty_in_order_of(q);
  auto dk = empty_in_order_of(k);
  auto dv = empty_in_order_of(v);
  // Dispatch: the SIMD kernels, unless an input is not finite (or the caller asks for the
  // per-window kernels); otherwise the per-window kernels, which write dq, dk, dv whole again.
  at::Tensor drpb;
  const bool done = simd && bwd_simd(g, dout, q, k, v, rc, out, lc, scale, dq, dk, dv, &drpb);
  if (!done) drpb = bwd_simple(g, dout, q, k, v, rc, out, lc, scale, dq, dk, dv);
  return {dq, dk, dv, drpb};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> na2d_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                int64_t border, double scale, int64_t dilation) {
  return fwd_cpu(q, k, v, rpb, kernel_size, border, scale, dilation, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const c10::optional<at::Tensor>& rpb,
                                                                        const at::Tensor& out, const at::Tensor& lse,
                                                                        int64_t kernel_size, int64_t border,
                                                                        double scale, int64_t dilation) {
  return bwd_cpu(dout, q, k, v, rpb, out, lse, kernel_size, border, scale, dilation, true);
}

std::tuple<at::Tensor, at::Tensor> na2d_fwd_window_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const c10::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                       int64_t border, double scale, int64_t dilation) {
  return fwd_cpu(q, k, v, rpb, kernel_size, border, scale, dilation, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_bwd_window_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse, int64_t kernel_size,
    int64_t border, double scale, int64_t dilation) {
  return bwd_cpu(dout, q, k, v, rpb, out, lse, kernel_size, border, scale, dilation, false);
}

}  // namespace dcal
