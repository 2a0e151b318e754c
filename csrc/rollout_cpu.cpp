// Attention rollout on CPU (DESIGN 3.3), without any [N, N] matrix.
//
// The CLS row of S_L @ ... @ S_1 is a row vector pushed through the blocks from the last to the
// first: r = e_0; for l = L..1: r <- (1 - residual) * (r A_l) + residual * r. The product r A_l
// is the dV step of flash-attention backward with r in the place of dO and a one-wide V:
//   (r A_l)_j = 1/H sum_h sum_i r_i exp(s_ij - lse_i),
// so each query row needs only its logsumexp, never its row of A. Without given logsumexps a
// first pass computes them (online over key blocks); the second pass walks the query blocks for
// each key block. Scores are recomputed in [kBM, kBN] tiles, so the memory beyond the inputs is
// O(B*H*N) (logsumexps and per-head partial sums) plus a few tiles per thread.
//
// Parallel over batch x heads x (query | key) blocks; the heads are summed afterwards in a fixed
// order, so results do not depend on the thread count or schedule.
#include "rollout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dcal {
namespace {

constexpr int64_t kBM = 64;  // query rows per tile (a multiple of kRows)
constexpr int64_t kBN = 64;  // keys per tile (a multiple of kCols)
constexpr int64_t kRows = 4; // register block of the score micro-kernel
constexpr int64_t kCols = 8;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// One [B, H, N, D] tensor with unit stride along D (other strides arbitrary: q/k are often views
// of a fused qkv projection).
template <typename scalar_t>
struct HeadsView {
  const scalar_t* data;
  int64_t sb, sh, sn;
  const scalar_t* row(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

template <typename scalar_t>
HeadsView<scalar_t> heads_view(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename acc_t>
struct Tiles {
  std::vector<acc_t> q, kt, s, acc;  // [kBM, D], [D, kBN], [kBM, kBN], [kBN]
  explicit Tiles(int64_t D) : q(kBM * D), kt(D * kBN), s(kBM * kBN), acc(kBN) {}
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Query rows [i0, i0 + m) -> tile [m, D]; rows up to the next multiple of kRows are zero so the
// micro-kernel needs no row tail.
template <typename scalar_t, typename acc_t>
void load_q(const HeadsView<scalar_t>& q, int64_t b, int64_t h, int64_t i0, int64_t m, int64_t D, acc_t* out) {
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* src = q.row(b, h, i0 + i);
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = static_cast<acc_t>(src[d]);
  }
  std::fill(out + m * D, out + round_up(m, kRows) * D, acc_t(0));
}

// Keys [j0, j0 + n) -> transposed tile [D, kBN], so the micro-kernel's inner loop runs over
// contiguous keys; columns past n are zero and their scores are never read.
template <typename scalar_t, typename acc_t>
void load_kt(const HeadsView<scalar_t>& k, int64_t b, int64_t h, int64_t j0, int64_t n, int64_t D, acc_t* out) {
  if (n < kBN) std::fill(out, out + D * kBN, acc_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src = k.row(b, h, j0 + j);
    for (int64_t d = 0; d < D; ++d) out[d * kBN + j] = static_cast<acc_t>(src[d]);
  }
}

// s [m, kBN] = (q [m, D] @ kt [D, kBN]) * scale. A kRows x kCols block of s stays in registers
// over the whole D loop; each s_ij is summed over d in order, like a plain dot product.
template <typename acc_t, bool kFma>
__attribute__((always_inline)) inline void score_tile_impl(const acc_t* q, const acc_t* kt, acc_t* s, int64_t m,
                                                           int64_t D, acc_t scale) {
  for (int64_t i = 0; i < m; i += kRows) {
    for (int64_t j = 0; j < kBN; j += kCols) {
      acc_t c[kRows][kCols] = {};
      for (int64_t d = 0; d < D; ++d) {
        const acc_t* kd = kt + d * kBN + j;
        for (int64_t r = 0; r < kRows; ++r) {
          const acc_t a = q[(i + r) * D + d];
#pragma omp simd
          for (int64_t c2 = 0; c2 < kCols; ++c2) {
            if constexpr (kFma) {
              c[r][c2] = std::fma(a, kd[c2], c[r][c2]);
            } else {
              c[r][c2] += a * kd[c2];
            }
          }
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c2 = 0; c2 < kCols; ++c2) s[(i + r) * kBN + j + c2] = c[r][c2] * scale;
    }
  }
}

template <typename acc_t>
void score_tile_base(const acc_t* q, const acc_t* kt, acc_t* s, int64_t m, int64_t D, acc_t scale) {
  score_tile_impl<acc_t, false>(q, kt, s, m, D, scale);
}

// The extension is built for the baseline x86-64 ISA (SSE2); this copy uses 256-bit AVX with fused
// multiply-adds (one rounding per step instead of two) where the CPU has them.
template <typename acc_t>
__attribute__((target("avx,fma"))) void score_tile_fma(const acc_t* q, const acc_t* kt, acc_t* s, int64_t m,
                                                      int64_t D, acc_t scale) {
  score_tile_impl<acc_t, true>(q, kt, s, m, D, scale);
}

inline bool cpu_has_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename acc_t>
void score_tile(const acc_t* q, const acc_t* kt, acc_t* s, int64_t m, int64_t D, acc_t scale) {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_fma()) return score_tile_fma<acc_t>(q, kt, s, m, D, scale);
#endif
  score_tile_base<acc_t>(q, kt, s, m, D, scale);
}

// Pass 1: lse[b, h, i] = logsumexp_j s_ij for the first nq query rows.
template <typename scalar_t, typename acc_t>
void lse_pass(const HeadsView<scalar_t>& q, const HeadsView<scalar_t>& k, acc_t* lse, int64_t B, int64_t H,
              int64_t N, int64_t nq, int64_t D, acc_t scale) {
  const int64_t nqb = (nq + kBM - 1) / kBM, nkb = (N + kBN - 1) / kBN;
  const int64_t tasks = B * H * nqb;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    Tiles<acc_t> t(D);
    std::vector<acc_t> mx(kBM), sum(kBM);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kBM;
      const int64_t b = bh / H, h = bh % H, m = std::min(kBM, nq - i0);
      load_q(q, b, h, i0, m, D, t.q.data());
      std::fill(mx.begin(), mx.end(), ninf);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t j0 = kb * kBN, n = std::min(kBN, N - j0);
        load_kt(k, b, h, j0, n, D, t.kt.data());
        score_tile(t.q.data(), t.kt.data(), t.s.data(), round_up(m, kRows), D, scale);
        for (int64_t i = 0; i < m; ++i) {
          const acc_t* si = t.s.data() + i * kBN;
          acc_t bmax = ninf;
          for (int64_t j = 0; j < n; ++j) bmax = std::max(bmax, si[j]);
          const acc_t mnew = std::max(mx[i], bmax);
          if (mnew == ninf) continue;  // every score so far is -inf: nothing to add
          // Rescale the running sum to the new maximum so no exp overflows.
          acc_t acc = sum[i] * std::exp(mx[i] - mnew);
          for (int64_t j = 0; j < n; ++j) acc += std::exp(si[j] - mnew);
          sum[i] = acc;
          mx[i] = mnew;
        }
      }
      acc_t* out = lse + (b * H + h) * N + i0;
      for (int64_t i = 0; i < m; ++i) out[i] = mx[i] + std::log(sum[i]);
    }
  }
}

// Pass 2: part[b, h, j] = sum_{i < nq} r[b, i] exp(s_ij - lse[b, h, i]) for every key j.
template <typename scalar_t, typename acc_t>
void vec_attn_pass(const HeadsView<scalar_t>& q, const HeadsView<scalar_t>& k, const acc_t* lse, const acc_t* r,
                   acc_t* part, int64_t B, int64_t H, int64_t N, int64_t nq, int64_t D, acc_t scale) {
  const int64_t nqb = (nq + kBM - 1) / kBM, nkb = (N + kBN - 1) / kBN;
  const int64_t tasks = B * H * nkb;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    Tiles<acc_t> t(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / nkb, j0 = (task % nkb) * kBN;
      const int64_t b = bh / H, h = bh % H, n = std::min(kBN, N - j0);
      const acc_t* lse_bh = lse + (b * H + h) * N;
      const acc_t* rb = r + b * N;
      load_kt(k, b, h, j0, n, D, t.kt.data());
      std::fill(t.acc.begin(), t.acc.end(), acc_t(0));
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * kBM, m = std::min(kBM, nq - i0);
        bool any = false;
        for (int64_t i = 0; i < m && !any; ++i) any = rb[i0 + i] != acc_t(0);
        if (!any) continue;  // a zero weight row adds nothing (r starts as e_0)
        load_q(q, b, h, i0, m, D, t.q.data());
        score_tile(t.q.data(), t.kt.data(), t.s.data(), round_up(m, kRows), D, scale);
        for (int64_t i = 0; i < m; ++i) {
          const acc_t w = rb[i0 + i], li = lse_bh[i0 + i];
          if (w == acc_t(0)) continue;
          const acc_t* si = t.s.data() + i * kBN;
          for (int64_t j = 0; j < n; ++j) t.acc[j] += w * std::exp(si[j] - li);
        }
      }
      std::copy(t.acc.begin(), t.acc.begin() + n, part + (b * H + h) * N + j0);
    }
  }
}

template <typename scalar_t>
void rollout_kernel(at::TensorList qs, at::TensorList ks, const std::vector<at::Tensor>& lses, at::Tensor& r,
                    double scale, double residual) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t B = qs[0].size(0), H = qs[0].size(1), N = qs[0].size(2), D = qs[0].size(3);
  const int64_t L = static_cast<int64_t>(qs.size());
  const bool given = !lses.empty();
  at::Tensor lse_buf = given ? at::Tensor() : at::empty({B, H, N}, r.options());
  at::Tensor part = at::empty({B, H, N}, r.options());
  acc_t* rp = r.data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale), keep = static_cast<acc_t>(residual);
  const acc_t mix = static_cast<acc_t>(1.0 - residual), inv_h = acc_t(1) / static_cast<acc_t>(H);
  r.zero_();
  for (int64_t b = 0; b < B; ++b) rp[b * N] = acc_t(1);
  for (int64_t l = L - 1; l >= 0; --l) {
    // r = e_0 on the first step taken (block L): only query row 0 carries weight, so only its
    // logsumexp is needed and the pass over queries stops after one row.
    const int64_t nq = (l == L - 1) ? 1 : N;
    const auto q = heads_view<scalar_t>(qs[l]);
    const auto k = heads_view<scalar_t>(ks[l]);
    const acc_t* lse;
    if (given) {
      lse = lses[l].data_ptr<acc_t>();
    } else {
      lse_pass<scalar_t, acc_t>(q, k, lse_buf.data_ptr<acc_t>(), B, H, N, nq, D, sc);
      lse = lse_buf.data_ptr<acc_t>();
    }
    acc_t* pp = part.data_ptr<acc_t>();
    vec_attn_pass<scalar_t, acc_t>(q, k, lse, rp, pp, B, H, N, nq, D, sc);
    // Mean over heads in a fixed order, then the residual mix; each r_j depends only on the old r_j.
    at::parallel_for(0, B * N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) {
        const int64_t b = x / N, j = x % N;
        acc_t y = 0;
        for (int64_t h = 0; h < H; ++h) y += pp[(b * H + h) * N + j];
        rp[x] = mix * (y * inv_h) + keep * rp[x];
      }
    });
  }
}

}  // namespace

at::Tensor rollout_cpu(at::TensorList qs, at::TensorList ks, at::TensorList lses, double scale, double residual) {
  // Argument checks (the public op checks too; these guard direct calls of torch.ops.dcal.rollout).
  TORCH_CHECK_VALUE(!qs.empty(), "rollout: qs must hold at least one [B, H, N, D] tensor");
  TORCH_CHECK_VALUE(ks.size() == qs.size(), "rollout: qs has ", qs.size(), " tensors but ks has ", ks.size());
  TORCH_CHECK_VALUE(lses.empty() || lses.size() == qs.size(), "rollout: lses has ", lses.size(),
                    " tensors; expected none (recompute) or one per block (", qs.size(), ")");
  TORCH_CHECK_VALUE(residual >= 0.0 && residual <= 1.0, "rollout: residual must be in [0, 1], got ", residual);
  const at::Tensor& ref = qs[0];
  TORCH_CHECK_VALUE(ref.dim() == 4, "rollout: qs[0] must be [B, H, N, D], got shape ", ref.sizes());
  const auto dtype = ref.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                   "rollout: CPU kernel takes float32, float64 or bfloat16, got ", dtype);
  for (size_t i = 0; i < qs.size(); ++i) {
    for (const auto* t : {&qs[i], &ks[i]}) {
      const char* name = t == &qs[i] ? "qs" : "ks";
      TORCH_CHECK_VALUE(t->device().is_cpu(), "rollout: ", name, "[", i, "] must be a CPU tensor, got ", t->device());
      TORCH_CHECK_TYPE(t->scalar_type() == dtype, "rollout: ", name, "[", i, "] has dtype ", t->scalar_type(),
                       " but qs[0] has ", dtype);
      TORCH_CHECK_VALUE(t->sizes() == ref.sizes(), "rollout: ", name, "[", i, "] has shape ", t->sizes(),
                        "; expected ", ref.sizes(), " like qs[0]");
    }
  }
  const int64_t B = ref.size(0), H = ref.size(1), N = ref.size(2);
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> lse_acc;
  for (size_t i = 0; i < lses.size(); ++i) {
    TORCH_CHECK_VALUE(lses[i].device().is_cpu(), "rollout: lses[", i, "] must be a CPU tensor");
    TORCH_CHECK_VALUE(lses[i].sizes() == ref.sizes().slice(0, 3), "rollout: lses[", i, "] has shape ",
                      lses[i].sizes(), "; expected [B, H, N] = ", ref.sizes().slice(0, 3));
    TORCH_CHECK_TYPE(at::isFloatingType(lses[i].scalar_type()), "rollout: lses[", i, "] must be floating");
    lse_acc.push_back(lses[i].to(acc_type).contiguous());  // O(B*H*N)
  }
  // Unit stride along D is all the kernel needs; other layouts (views of qkv) are read in place.
  std::vector<at::Tensor> q_in, k_in;
  for (size_t i = 0; i < qs.size(); ++i) {
    q_in.push_back(qs[i].stride(3) == 1 ? qs[i] : qs[i].contiguous());
    k_in.push_back(ks[i].stride(3) == 1 ? ks[i] : ks[i].contiguous());
  }
  at::Tensor r = at::empty({B, N}, ref.options().dtype(acc_type));
  if (B == 0 || N == 0) return r;
  TORCH_CHECK_VALUE(H >= 1, "rollout: qs[0] has no heads (shape ", ref.sizes(), ")");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "dcal_rollout_cpu", [&] {
    rollout_kernel<scalar_t>(q_in, k_in, lse_acc, r, scale, residual);
  });
  return r;
}

}  // namespace dcal
