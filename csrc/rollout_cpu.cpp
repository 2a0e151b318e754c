// Attention rollout on CPU (docs/contract.md, attention_rollout), without any [N, N] matrix.
//
// The CLS row of S_L @ ... @ S_1 is a row vector pushed through the blocks from the last to the
// first: r = e_0; for l = L..1: r <- (1 - residual) * (r A_l) + residual * r, where
//   (r A_l)_j = 1/H sum_h sum_i r_i exp(s_ij - lse_i),   s = q_l k_l^T * scale.
// Per (batch, head) the keys are transposed once into a [D, N] panel (widened to fp32 for bf16),
// and the query rows are taken in blocks of at most kBQ: one product (oneDNN brgemm for fp32/bf16,
// dgemm for fp64; cpu_block.h) gives the block's full raw score rows [rows, N] (a per-thread
// tile), then each row i with weight r_i != 0 is turned into probabilities, with the scale folded
// into the exponent, and added, times r_i, to an [N] accumulator. A whole score row is in the
// tile, so without given logsumexps the row's max and sum come from the same tile (max pass,
// exp pass with the sum, weighted add): the scores are computed once either way, and each
// exponential once.
//
// On the first step taken (block L) r = e_0: only query row 0 carries weight, and rows or whole
// blocks of zero weight are skipped, so that step costs one row per head.
//
// Memory beyond the inputs: the [B, H, chunks, N] partial sums (chunks >= 1 only for small B*H)
// plus a [kBQ, N] score tile and a [D, N] key panel per thread.
// Parallel over (batch, head, query chunk) tasks, taken dynamically by the threads; each task
// writes its own partial row and the partials are summed in a fixed order, so results do not
// depend on the thread count or schedule.
#include "rollout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_common.h"

namespace dcal {
namespace {

using cpu::mm;

// Most query rows per product; a head's rows are split evenly (785: 4 blocks of 197), so a
// [197, 785] fp32 score tile (620 KB) and the key panel (200 KB at D 64) stay in the L2 while
// the rows are reduced.
constexpr int64_t kBQ = 200;
// Below this many (batch, head) pairs the query blocks of a head are split into chunks, so both
// threads have work and a late task is short. A function of the shape only (determinism).
constexpr int64_t kMinTasks = 32;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

using cpu::axpy;
using cpu::exp_scale_axpy;
using cpu::exp_scale_sum;
using cpu::HeadsView;
using cpu::panel_ld;
using cpu::row_extreme;
using cpu::view_of;

constexpr OpName kRollout{"rollout", ErrorClasses::kPythonErrors};

// What the products index with 32-bit BLAS integers (N, D and leading dims).
constexpr int64_t kBlasMax = int64_t{1} << 30;

// rows [n, D] with row stride ld -> contiguous [n, D] in the accumulation type
template <typename scalar_t, typename acc_t>
void widen(const scalar_t* src, int64_t ld, int64_t n, int64_t D, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<acc_t>(src[i * ld + d]);
}

// Rows per query block: n rows split into ceil(n / kBQ) blocks of (nearly) equal size.
inline int64_t block_rows(int64_t n) { return cpu::block_rows(n, kBQ); }

// part[task] = sum_i r[b, i] softmax_i(q_i k^T * scale) over the query rows of the task.
template <typename scalar_t, typename acc_t>
void vec_attn_step(const HeadsView<scalar_t>& q, const HeadsView<scalar_t>& k, const acc_t* lse, const acc_t* r,
                   acc_t* part, int64_t B, int64_t H, int64_t N, int64_t D, int64_t chunks, acc_t scale) {
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const int64_t bq = block_rows(N), nqb = (N + bq - 1) / bq;
  const int64_t per_chunk = (nqb + chunks - 1) / chunks;
  const int64_t tasks = B * H * chunks;
  const int64_t ld = cpu::padded(N);     // row stride of the score tile: 64-byte aligned fp32 rows
  const int64_t ldk = panel_ld(N);       // row stride of the [D, N] key panel
  const bool lowest = scale < acc_t(0);  // the maximum of scale * s is scale * min s
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    cpu::Buffer<acc_t> s(bq * ld), kt(D * ldk), qbuf(kWiden ? bq * D : 0);
    int64_t panel_of = -1;  // the (b, h) whose keys are in kt
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t bh = task / chunks, c = task % chunks, b = bh / H, h = bh % H;
      acc_t* acc = part + task * N;
      std::fill(acc, acc + N, acc_t(0));
      const acc_t* rb = r + b * N;
      const acc_t* lse_bh = lse ? lse + bh * N : nullptr;
      for (int64_t qb = c * per_chunk; qb < std::min(nqb, (c + 1) * per_chunk); ++qb) {
        const int64_t i0 = qb * bq, m = std::min(bq, N - i0);
        int64_t lo = 0, hi = m;  // rows of zero weight at either end of the block are not computed
        while (lo < hi && rb[i0 + lo] == acc_t(0)) ++lo;
        while (hi > lo && rb[i0 + hi - 1] == acc_t(0)) --hi;
        if (lo == hi) continue;
        if (D == 0) {  // empty dot products: all scores 0
          std::fill_n(s.data(), (hi - lo) * ld, acc_t(0));
        } else {
          if (panel_of != bh) {
            cpu::transpose(k.at(b, h), k.sn, N, D, kt.data(), ldk);
            panel_of = bh;
          }
          const acc_t* qp;
          int64_t ldq;
          if constexpr (kWiden) {
            widen(q.at(b, h) + (i0 + lo) * q.sn, q.sn, hi - lo, D, qbuf.data());
            qp = qbuf.data(), ldq = D;
          } else {
            qp = q.at(b, h) + (i0 + lo) * q.sn, ldq = q.sn;
          }
          // s [hi - lo, N] = q [hi - lo, D] @ k^T [D, N]  (raw: the scale enters the exponent)
          mm(hi - lo, N, D, qp, ldq, kt.data(), ldk, s.data(), ld, false);
        }
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t w = rb[i0 + i];
          if (w == acc_t(0)) continue;
          acc_t* si = s.data() + (i - lo) * ld;
          if (lse_bh) {
            exp_scale_axpy(acc, si, N, scale, lse_bh[i0 + i], w);
          } else {
            // The row max keeps every exp at most 1; the normaliser comes from the same row.
            const acc_t mx = scale * row_extreme(si, N, lowest);
            const acc_t sum = exp_scale_sum(si, N, scale, mx);
            axpy(acc, si, N, w / sum);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void rollout_kernel(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                    const std::vector<at::Tensor>& lses, at::Tensor& r, double scale, double residual) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t B = qs[0].size(0), H = qs[0].size(1), N = qs[0].size(2), D = qs[0].size(3);
  const int64_t L = static_cast<int64_t>(qs.size());
  const int64_t nqb = (N + block_rows(N) - 1) / block_rows(N);
  const int64_t chunks = std::min(nqb, std::max<int64_t>(1, (kMinTasks + B * H - 1) / (B * H)));
  at::Tensor part = at::empty({B, H, chunks, N}, r.options());
  acc_t* rp = r.data_ptr<acc_t>();
  acc_t* pp = part.data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale), keep = static_cast<acc_t>(residual);
  const acc_t mix = static_cast<acc_t>(1.0 - residual), inv_h = acc_t(1) / static_cast<acc_t>(H);
  r.zero_();
  for (int64_t b = 0; b < B; ++b) rp[b * N] = acc_t(1);
  for (int64_t l = L - 1; l >= 0; --l) {
    const acc_t* lse = lses.empty() ? nullptr : lses[l].const_data_ptr<acc_t>();
    vec_attn_step<scalar_t, acc_t>(view_of<scalar_t>(qs[l]), view_of<scalar_t>(ks[l]), lse, rp, pp, B, H, N, D, chunks,
                                   sc);
    // Mean over heads (and chunks) in a fixed order, then the residual mix; each r_j depends
    // only on the old r_j.
    at::parallel_for(0, B * N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) {
        const int64_t b = x / N, j = x % N;
        acc_t y = 0;
        for (int64_t t = 0; t < H * chunks; ++t) y += pp[(b * H * chunks + t) * N + j];
        rp[x] = mix * (y * inv_h) + keep * rp[x];
      }
    });
  }
}

}  // namespace

at::Tensor rollout_cpu(at::TensorList qs, at::TensorList ks, at::TensorList lses, double scale, double residual) {
  // checks (the public op checks too; these guard direct calls of torch.ops.dcal.rollout)
  const OpName& op = kRollout;
  DCAL_CHECK_SHAPE(op, !qs.empty(), "qs must hold at least one [B, H, N, D] tensor");
  DCAL_CHECK_SHAPE(op, ks.size() == qs.size(), "qs has ", qs.size(), " tensors but ks has ", ks.size());
  DCAL_CHECK_SHAPE(op, lses.empty() || lses.size() == qs.size(), "lses has ", lses.size(),
                   " tensors; expected none (recompute) or one per block (", qs.size(), ")");
  DCAL_CHECK_ARG(op, residual >= 0.0 && residual <= 1.0, "residual must be in [0, 1], got ", residual);
  const at::Tensor& ref = qs[0];
  DCAL_CHECK_SHAPE(op, ref.dim() == 4, "qs[0] must be [B, H, N, D], got shape ", ref.sizes());
  const auto dtype = ref.scalar_type();
  DCAL_CHECK_DTYPE(op, dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                   "CPU kernel takes float32, float64 or bfloat16, got ", dtype);
  for (size_t i = 0; i < qs.size(); ++i) {
    for (const auto* t : {&qs[i], &ks[i]}) {
      const char* name = t == &qs[i] ? "qs" : "ks";
      DCAL_CHECK_DEVICE(op, t->device().is_cpu(), name, "[", i, "] must be a CPU tensor, got ", t->device());
      DCAL_CHECK_DTYPE(op, t->scalar_type() == dtype, name, "[", i, "] has dtype ", t->scalar_type(), " but qs[0] has ",
                       dtype);
      DCAL_CHECK_SHAPE(op, t->sizes() == ref.sizes(), name, "[", i, "] has shape ", t->sizes(), "; expected ",
                       ref.sizes(), " like qs[0]");
    }
  }
  const int64_t B = ref.size(0), H = ref.size(1), N = ref.size(2), D = ref.size(3);
  DCAL_CHECK_ARG(op, N <= kBlasMax && D <= kBlasMax, "N and D must fit the BLAS integer type, got shape ", ref.sizes());
  for (size_t i = 0; i < lses.size(); ++i) {
    DCAL_CHECK_DEVICE(op, lses[i].device().is_cpu(), "lses[", i, "] must be a CPU tensor, got ", lses[i].device());
    DCAL_CHECK_SHAPE(op, lses[i].sizes() == ref.sizes().slice(0, 3), "lses[", i, "] has shape ", lses[i].sizes(),
                     "; expected [B, H, N] = ", ref.sizes().slice(0, 3));
    DCAL_CHECK_DTYPE(op, at::isFloatingType(lses[i].scalar_type()), "lses[", i, "] must be floating, got ",
                     lses[i].scalar_type());
  }
  DCAL_CHECK_SHAPE(op, H >= 1 || B == 0 || N == 0, "qs[0] has no heads (shape ", ref.sizes(), ")");
  // allocate: the result, then the inputs as the products read them. Unit stride along D and rows
  // >= D apart is all BLAS needs, so other layouts (views of qkv) are read in place; the given
  // logsumexps are converted to the accumulation type (O(B*H*N)).
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor r = at::empty({B, N}, ref.options().dtype(acc_type));
  if (B == 0 || N == 0) return r;
  std::vector<at::Tensor> q_in, k_in, lse_acc;
  for (size_t i = 0; i < qs.size(); ++i) {
    q_in.push_back(cpu::blas_ready(qs[i]));
    k_in.push_back(cpu::blas_ready(ks[i]));
  }
  for (const auto& lse : lses) lse_acc.push_back(lse.to(acc_type).contiguous());
  // dispatch
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "dcal_rollout_cpu",
                                 [&] { rollout_kernel<scalar_t>(q_in, k_in, lse_acc, r, scale, residual); });
  return r;
}

}  // namespace dcal
