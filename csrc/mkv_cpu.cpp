// Multi-segment (PWCA) attention on CPU: FlashAttention-2 over one or two key/value segments in
// one call, so the keys are never concatenated and no [Nq, Nk] matrix exists (only per-thread
// [rows, keys] tiles). The block products run on oneDNN's brgemm micro-kernel as libtorch exports
// it (fp32; MKL's sgemm where absent, dgemm for fp64), see cpu_block.h: every product is a plain
// row-major A @ B read in place, because the keys (and values, for dP) are transposed once per
// head, dK and dV accumulate transposed, and the softmax scale is folded into the exponent.
//
// Forward: parallel over batch x heads x query blocks; online softmax over the key blocks of
// segment 1, then segment 2; out and lse (the dtype of the inputs) are saved.
// Backward: parallel over batch x heads; one pass per (b, h) walks query blocks x key blocks and
// accumulates dq in place and dk, dv in per-thread transposed panels (each (b, h) slice has one
// owner), so there are no atomics and the result does not depend on the thread count.
// Tasks are taken dynamically from a shared counter (a loaded core does not hold the other
// back); each task writes only its own outputs, so the schedule does not change the result.
#include "mkv.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_common.h"

namespace dcal {
namespace {

// Tiles. Query blocks are as large as the L2 holds (score tiles [rows, keys] plus the transposed
// keys/values of the head): at most kBMf rows forward and kBMb backward, split evenly so there is
// no short tail block (785 queries: 4 blocks of 197 rows either way). A key block spans a whole
// segment up to kBN keys (DCAL's 785-token segments are one block each), so each product is as
// large as the tile allows and the output is rescaled once per segment. Score tiles are [rows,
// ld] with ld the key count rounded up to 16 floats (64-byte rows).
constexpr int64_t kBMf = 200;  // most query rows per forward tile
constexpr int64_t kBMb = 256;  // most query rows per backward tile
constexpr int64_t kBN = 1024;  // keys per tile

using cpu::block_rows;
using cpu::dot;
using cpu::exp_scale_dsoftmax;
using cpu::exp_scale_sum;
using cpu::exp_scale_sum_extreme;
using cpu::HeadsView;
using cpu::mm;
using cpu::padded;
using cpu::panel_ld;
using cpu::row_extreme;
using cpu::scale_row;
using cpu::transpose;
using cpu::view_of;

// Row stride capacity of a tile: the longest key block of these segments, padded; the tiles
// are no larger than the segments need.
inline int64_t tile_ld(const std::vector<int64_t>& nks) {
  return padded(std::min(kBN, *std::max_element(nks.begin(), nks.end())));
}

struct Seg {
  at::Tensor k, v;
};

constexpr OpName kFwd{"mkv_fwd", ErrorClasses::kRuntimeErrors};
constexpr OpName kBwd{"mkv_bwd", ErrorClasses::kRuntimeErrors};

// What the products index with 32-bit BLAS integers (token counts, head dim, leading dims).
constexpr int64_t kBlasMax = int64_t{1} << 30;

// Checks of the inputs both entry points share: q and the one or two (k, v) segments.
void check_inputs(const OpName& op, const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1,
                  const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2) {
  DCAL_CHECK_DEVICE(op, q.device().is_cpu(), "q must be a CPU tensor, got ", q.device());
  DCAL_CHECK_DTYPE(op, q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "q must be float32 or float64, got ", q.scalar_type());
  DCAL_CHECK_SHAPE(op, q.dim() == 4, "q must be [B, H, Nq, D], got ", q.sizes());
  DCAL_CHECK_SHAPE(op, q.size(2) >= 1, "q needs at least one token, got shape ", q.sizes());
  DCAL_CHECK_ARG(op, k2.has_value() == v2.has_value(), "k2 and v2 must be given together");
  const char* names[] = {"k1", "v1", "k2", "v2"};
  const at::Tensor* kv[] = {&k1, &v1, k2.has_value() ? &*k2 : nullptr, v2.has_value() ? &*v2 : nullptr};
  int64_t keys = 0;
  for (int i = 0; i < 4; ++i) {
    const at::Tensor* t = kv[i];
    if (t == nullptr) continue;
    DCAL_CHECK_SHAPE(op, t->dim() == 4 && t->size(0) == q.size(0) && t->size(1) == q.size(1) && t->size(3) == q.size(3),
                     names[i], " must be [B, H, Nk, D] matching q ", q.sizes(), ", got ", t->sizes());
    DCAL_CHECK_DTYPE(op, t->scalar_type() == q.scalar_type(), names[i], " has dtype ", t->scalar_type(),
                     "; k/v must have q's dtype (", q.scalar_type(), ")");
    DCAL_CHECK_DEVICE(op, t->device() == q.device(), names[i], " is on ", t->device(), "; k/v must have q's device (",
                      q.device(), ")");
    if (i % 2 == 1) {
      const at::Tensor& k = *kv[i - 1];
      DCAL_CHECK_SHAPE(op, k.size(2) == t->size(2) && k.size(2) >= 1, names[i - 1], " and ", names[i],
                       " need the same, nonzero length, got ", k.size(2), " and ", t->size(2));
      keys += k.size(2);
    }
  }
  DCAL_CHECK_ARG(op, q.size(2) <= kBlasMax && q.size(3) <= kBlasMax && keys <= kBlasMax,
                 "token counts and D must fit the BLAS integer type (at most 2^30), got q ", q.sizes(), " and ", keys,
                 " keys");
}

// A floating [dims of q up to `rank`] tensor on the CPU: the checks of out, dout, lse and dlse.
void check_like_q(const OpName& op, const char* name, const at::Tensor& t, const at::Tensor& q, int64_t rank,
                  const char* shape) {
  DCAL_CHECK_SHAPE(op, t.sizes() == q.sizes().slice(0, rank), name, " must be ", shape, " = ", q.sizes().slice(0, rank),
                   ", got ", t.sizes());
  DCAL_CHECK_DTYPE(op, at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
  DCAL_CHECK_DEVICE(op, t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// The segments as the kernels read them: in place where the products can, else one copy each.
std::vector<Seg> segments(const at::Tensor& k1, const at::Tensor& v1, const std::optional<at::Tensor>& k2,
                          const std::optional<at::Tensor>& v2) {
  std::vector<Seg> segs{{cpu::blas_ready(k1), cpu::blas_ready(v1)}};
  if (k2.has_value()) segs.push_back({cpu::blas_ready(*k2), cpu::blas_ready(*v2)});
  return segs;
}

// The segments of one call: views, lengths, and where each one's columns start in a transposed
// [D, all keys] panel of a head.
template <typename T>
struct Segs {
  std::vector<HeadsView<T>> k, v;
  std::vector<int64_t> n, off;
  int64_t total = 0, ld = 0, cap = 0;
  explicit Segs(const std::vector<Seg>& segs) {
    for (const auto& s : segs) {
      k.push_back(view_of<T>(s.k));
      v.push_back(view_of<T>(s.v));
      n.push_back(s.k.size(2));
      off.push_back(total);
      total += padded(s.k.size(2));  // each segment's columns start on a cache line
    }
    ld = panel_ld(total);
    cap = tile_ld(n);
  }
};

// Forward. Tasks (b, h, query block) are taken dynamically; a thread transposes the keys of a
// head into its [D, keys] panel when its task moves to that head (consecutive tasks share a
// head, so each head is transposed about once per thread). Per key block: S = Q K^T (raw),
// the row maximum of scale * S, P = exp(scale * S - max) with its row sum in one pass, then
// O += P V; out rows double as the accumulator.
template <typename T>
void fwd_kernel(const at::Tensor& q_, const std::vector<Seg>& segs, T scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q_.size(0), H = q_.size(1), Nq = q_.size(2), D = q_.size(3);
  const auto q = view_of<T>(q_);
  const Segs<T> sg(segs);
  T* o_all = out.data_ptr<T>();
  T* lse_all = lse.data_ptr<T>();
  const int64_t bm = block_rows(Nq, kBMf), nqb = (Nq + bm - 1) / bm;
  const int64_t tasks = B * H * nqb;
  const bool lowest = scale < T(0);  // the maximum of scale * s is scale * min s
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    cpu::Buffer<T> s(bm * sg.cap), kt(D * sg.ld);
    std::vector<T> m(bm), l(bm);
    int64_t panel_of = -1;
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * bm, b = bh / H, h = bh % H;
      const int64_t mr = std::min(bm, Nq - i0);
      if (panel_of != bh) {
        for (size_t g = 0; g < sg.n.size(); ++g)
          transpose(sg.k[g].at(b, h), sg.k[g].sn, sg.n[g], D, kt.data() + sg.off[g], sg.ld);
        panel_of = bh;
      }
      const T* qp = q.at(b, h) + i0 * q.sn;
      T* op = o_all + (bh * Nq + i0) * D;
      std::fill(op, op + mr * D, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (size_t g = 0; g < sg.n.size(); ++g) {
        const T* vp = sg.v[g].at(b, h);
        for (int64_t j0 = 0; j0 < sg.n[g]; j0 += kBN) {
          const int64_t n = std::min(kBN, sg.n[g] - j0), ld = padded(n);
          // s [mr, n] = q [mr, D] @ k^T [D, n], over ld >= n columns: the panel's zero padding
          // (brgemm runs a tail of whole vectors faster than a masked one; the extra columns are not read)
          mm(mr, ld, D, qp, q.sn, kt.data() + sg.off[g] + j0, sg.ld, s.data(), ld, false);
          // the extreme of row i + 1 is taken in row i's exp pass
          T ext = row_extreme(s.data(), n, lowest);
          for (int64_t i = 0; i < mr; ++i) {
            T* si = s.data() + i * ld;
            const T mnew = std::max(m[i], scale * ext);
            const T corr = std::exp(m[i] - mnew);  // 0 on the first block (m = -inf)
            const T sum = i + 1 < mr ? exp_scale_sum_extreme(si, n, scale, mnew, si + ld, lowest, &ext)
                                     : exp_scale_sum(si, n, scale, mnew);
            l[i] = l[i] * corr + sum;
            if (corr != T(1)) scale_row(op + i * D, D, corr);
            m[i] = mnew;
          }
          // out [mr, D] += p [mr, n] @ v[j0:j0+n] [n, D]
          mm(mr, D, n, s.data(), ld, vp + j0 * sg.v[g].sn, sg.v[g].sn, op, D, true);
        }
      }
      T* lp = lse_all + bh * Nq + i0;
      for (int64_t i = 0; i < mr; ++i) {
        scale_row(op + i * D, D, T(1) / l[i]);
        lp[i] = m[i] + std::log(l[i]);
      }
    }
  });
}

// Backward. One task per (b, h): the keys and values of the head are transposed once into
// [D, keys] panels, and dK and dV accumulate transposed, as [D, keys]: dK^T in a per-thread buffer
// with cache-line rows (transposed into dk at the end of the segment), dV^T in dv's own memory
// (transposed in place through that buffer), so that every product reads its operands in place
// (only the [D, rows] transposes of a query block's q and dO are made):
//   P = exp(scale * Q K^T - lse)       dV^T += dO^T P         dP = dO V^T
//   dS = scale * P * (dP - delta)      dQ += dS K             dK^T += Q^T dS
// Each (b, h) slice of the outputs has one owner, so there are no atomics and the result does
// not depend on the thread count. The lse gradient folds into delta = rowsum(dO * O) - dlse.
template <typename T>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q_, const std::vector<Seg>& segs,
                const at::Tensor& out, const at::Tensor& lse, T scale, std::vector<at::Tensor>& grads) {
  const int64_t B = q_.size(0), H = q_.size(1), Nq = q_.size(2), D = q_.size(3);
  const auto q = view_of<T>(q_);
  const T* do_all = dout.const_data_ptr<T>();  // contiguous
  const T* o_all = out.const_data_ptr<T>();    // contiguous
  const T* lse_all = lse.const_data_ptr<T>();  // contiguous
  const T* dlse_all = dlse.defined() ? dlse.const_data_ptr<T>() : nullptr;
  const Segs<T> sg(segs);
  T* dq_all = grads[0].data_ptr<T>();
  const int64_t bm = block_rows(Nq, kBMb);
  const int64_t nk_max = *std::max_element(sg.n.begin(), sg.n.end()), ldp = panel_ld(nk_max);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // panels of one segment at a time (segments are the outer loop); dkt: dK^T [D, nk] of the
    // segment (row stride ldp), then the in-place transpose of dV^T; q and dO blocks transposed to
    // [D, rows] with rows padded to whole cache lines (ldq)
    const int64_t ldq = padded(bm);
    cpu::Buffer<T> p(bm * sg.cap), ds(bm * sg.cap), kt(D * ldp), vt(D * ldp), qt(D * ldq), dot_t(D * ldq), dkt(D * ldp);
    std::vector<T> delta(Nq);
    for (int64_t bh = next++; bh < B * H; bh = next++) {
      const int64_t b = bh / H, h = bh % H;
      const T* dop = do_all + bh * Nq * D;
      const T* lsep = lse_all + bh * Nq;
      for (int64_t i = 0; i < Nq; ++i)
        delta[i] = dot(dop + i * D, o_all + (bh * Nq + i) * D, D) - (dlse_all ? dlse_all[bh * Nq + i] : T(0));
      for (size_t g = 0; g < sg.n.size(); ++g) {
        const int64_t nk = sg.n[g];
        const T* kp = sg.k[g].at(b, h);
        transpose(kp, sg.k[g].sn, nk, D, kt.data(), ldp);
        transpose(sg.v[g].at(b, h), sg.v[g].sn, nk, D, vt.data(), ldp);
        T* dk = grads[1 + 2 * g].data_ptr<T>() + bh * nk * D;
        T* dvt = grads[2 + 2 * g].data_ptr<T>() + bh * nk * D;  // dv^T [D, nk], in dv's memory
        std::fill_n(dkt.data(), D * ldp, T(0));
        std::fill_n(dvt, nk * D, T(0));
        for (int64_t i0 = 0; i0 < Nq; i0 += bm) {
          const int64_t mr = std::min(bm, Nq - i0);
          const T* qp = q.at(b, h) + i0 * q.sn;
          const T* doi = dop + i0 * D;
          T* dqi = dq_all + (bh * Nq + i0) * D;
          transpose(qp, q.sn, mr, D, qt.data(), ldq);
          transpose(doi, D, mr, D, dot_t.data(), ldq);
          for (int64_t j0 = 0; j0 < nk; j0 += kBN) {
            const int64_t n = std::min(kBN, nk - j0), ld = padded(n);
            // p [mr, n] = exp(scale * q [mr, D] @ k_j^T [D, n] - lse)
            // (the three products with n output columns run over ld >= n: the pad columns of the
            // tiles and of dkt are never read)
            mm(mr, ld, D, qp, q.sn, kt.data() + j0, ldp, p.data(), ld, false);
            // dp [mr, n] = dO [mr, D] @ v_j^T [D, n]; then, in one pass over both tiles,
            // p = exp(scale * s - lse) and ds = scale * p * (dp - delta)
            mm(mr, ld, D, doi, D, vt.data() + j0, ldp, ds.data(), ld, false);
            for (int64_t i = 0; i < mr; ++i)
              exp_scale_dsoftmax(p.data() + i * ld, ds.data() + i * ld, n, scale, lsep[i0 + i], delta[i0 + i]);
            // dv_j^T [D, n] += dO^T [D, mr] @ p [mr, n]
            mm(D, n, mr, dot_t.data(), ldq, p.data(), ld, dvt + j0, nk, true);
            // dq [mr, D] += ds [mr, n] @ k_j [n, D]
            mm(mr, D, n, ds.data(), ld, kp + j0 * sg.k[g].sn, sg.k[g].sn, dqi, D, true);
            // dk_j^T [D, n] += q^T [D, mr] @ ds [mr, n]
            mm(D, ld, mr, qt.data(), ldq, ds.data(), ld, dkt.data() + j0, ldp, true);
          }
        }
        // [D, nk] -> [nk, D]: dK^T into dk; dV^T in place, through the dkt buffer
        transpose(dkt.data(), ldp, D, nk, dk, D);
        for (int64_t d = 0; d < D; ++d) std::copy_n(dvt + d * nk, nk, dkt.data() + d * ldp);
        transpose(dkt.data(), ldp, D, nk, dvt, D);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mkv_fwd_cpu(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1,
                                               const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
                                               double scale) {
  // checks
  check_inputs(kFwd, q, k1, v1, k2, v2);
  // allocate: the inputs as the products read them, then the outputs
  const at::Tensor qc = cpu::blas_ready(q);
  const auto segs = segments(k1, v1, k2, v2);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  // dispatch
  if (q.scalar_type() == at::kFloat)
    fwd_kernel<float>(qc, segs, static_cast<float>(scale), out, lse);
  else
    fwd_kernel<double>(qc, segs, scale, out, lse);
  return {out, lse};
}

std::vector<at::Tensor> mkv_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                                    const at::Tensor& k1, const at::Tensor& v1, const std::optional<at::Tensor>& k2,
                                    const std::optional<at::Tensor>& v2, const at::Tensor& out, const at::Tensor& lse,
                                    double scale) {
  // checks
  check_inputs(kBwd, q, k1, v1, k2, v2);
  const bool has_dlse = dlse.has_value() && dlse->defined();
  check_like_q(kBwd, "dout", dout, q, 4, "[B, H, Nq, D]");
  check_like_q(kBwd, "out", out, q, 4, "[B, H, Nq, D]");
  check_like_q(kBwd, "lse", lse, q, 3, "[B, H, Nq]");
  if (has_dlse) check_like_q(kBwd, "dlse", *dlse, q, 3, "[B, H, Nq]");
  // allocate: the inputs as the kernel reads them (q's dtype; dout, out, lse, dlse contiguous),
  // then the gradients
  const auto dt = q.scalar_type();
  const at::Tensor qc = cpu::blas_ready(q);
  const auto segs = segments(k1, v1, k2, v2);
  const at::Tensor doc = dout.to(dt).contiguous(), oc = out.to(dt).contiguous(), lc = lse.to(dt).contiguous();
  const at::Tensor dl = has_dlse ? dlse->to(dt).contiguous() : at::Tensor();
  std::vector<at::Tensor> grads{at::zeros(q.sizes(), q.options())};  // dq accumulates in place
  for (const auto& s : segs) {
    // dk, dv: written whole from the transposed accumulators
    grads.push_back(at::empty(s.k.sizes(), q.options()));
    grads.push_back(at::empty(s.v.sizes(), q.options()));
  }
  // dispatch
  if (dt == at::kFloat)
    bwd_kernel<float>(doc, dl, qc, segs, oc, lc, static_cast<float>(scale), grads);
  else
    bwd_kernel<double>(doc, dl, qc, segs, oc, lc, scale, grads);
  return grads;
}

}  // namespace dcal
