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

#include "cpu_block.h"

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

inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// Rows per block when n rows are split into ceil(n / most) blocks of (nearly) equal size.
inline int64_t block_rows(int64_t n, int64_t most) {
  const int64_t nb = (n + most - 1) / most;
  return (n + nb - 1) / nb;
}

// Row stride capacity of a tile: the longest key block of these segments, padded; the tiles
// are no larger than the segments need.
inline int64_t tile_ld(const std::vector<int64_t>& nks) {
  return padded(std::min(kBN, *std::max_element(nks.begin(), nks.end())));
}

// Row stride of a transposed [D, keys] panel: padded, and off multiples of 1 KiB, which would map
// every row of a column to the same cache sets.
inline int64_t panel_ld(int64_t keys) {
  const int64_t ld = padded(keys);
  return ld % 256 == 0 ? ld + 16 : ld;
}

using cpu::mm;
using cpu::transpose;

DCAL_CPU_CLONES float row_extreme(const float* s, int64_t n, bool lo) { return cpu::row_extreme_vec(s, n, lo); }
DCAL_CPU_CLONES double row_extreme(const double* s, int64_t n, bool lo) { return cpu::row_extreme_vec(s, n, lo); }
DCAL_CPU_CLONES float exp_scale_sum(float* s, int64_t n, float a, float c) {
  return cpu::exp_scale_sum_vec(s, n, a, c);
}
DCAL_CPU_CLONES double exp_scale_sum(double* s, int64_t n, double a, double c) {
  return cpu::exp_scale_sum_vec(s, n, a, c);
}
DCAL_CPU_CLONES void exp_scale(float* s, int64_t n, float a, float c) { cpu::exp_scale_vec(s, n, a, c); }
DCAL_CPU_CLONES void exp_scale(double* s, int64_t n, double a, double c) { cpu::exp_scale_vec(s, n, a, c); }
DCAL_CPU_CLONES void dsoftmax(float* ds, const float* p, int64_t n, float d, float a) {
  cpu::dsoftmax_vec(ds, p, n, d, a);
}
DCAL_CPU_CLONES void dsoftmax(double* ds, const double* p, int64_t n, double d, double a) {
  cpu::dsoftmax_vec(ds, p, n, d, a);
}
DCAL_CPU_CLONES void scale_row(float* o, int64_t n, float c) { cpu::scale_vec(o, n, c); }
DCAL_CPU_CLONES void scale_row(double* o, int64_t n, double c) { cpu::scale_vec(o, n, c); }
DCAL_CPU_CLONES float dot(const float* a, const float* b, int64_t n) { return cpu::dot_impl(a, b, n); }
DCAL_CPU_CLONES double dot(const double* a, const double* b, int64_t n) { return cpu::dot_impl(a, b, n); }

// One [B, H, N, D] tensor with unit stride along D and a row stride >= D.
template <typename T>
struct HeadsView {
  const T* data;
  int64_t sb, sh, sn;
  const T* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

at::Tensor blas_ready(const at::Tensor& t) {
  const int64_t D = t.size(3);
  if (t.stride(3) == 1 && (t.stride(2) >= D || t.size(2) == 1)) return t;
  return t.contiguous();
}

template <typename T>
HeadsView<T> view_of(const at::Tensor& t) {
  // A single-token axis may carry any stride; the products want a row stride >= D.
  const int64_t sn = t.size(2) == 1 ? t.size(3) : t.stride(2);
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), sn};
}

struct Seg {
  at::Tensor k, v;
};

void check_inputs(const char* op, const at::Tensor& q, const std::vector<Seg>& segs) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, Nq, D], got ", q.sizes());
  for (const auto& s : segs) {
    for (const at::Tensor* t : {&s.k, &s.v}) {
      TORCH_CHECK(t->dim() == 4 && t->size(0) == q.size(0) && t->size(1) == q.size(1) && t->size(3) == q.size(3), op,
                  ": k/v must be [B, H, Nk, D] matching q ", q.sizes(), ", got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), op,
                  ": k/v must have q's dtype and device");
    }
    TORCH_CHECK(s.k.size(2) == s.v.size(2) && s.k.size(2) >= 1, op, ": k and v need the same, nonzero length");
  }
  TORCH_CHECK(q.size(2) >= 1, op, ": q needs at least one token");
}

std::vector<Seg> segments(const at::Tensor& k1, const at::Tensor& v1, const std::optional<at::Tensor>& k2,
                          const std::optional<at::Tensor>& v2) {
  std::vector<Seg> segs{{blas_ready(k1), blas_ready(v1)}};
  TORCH_CHECK(k2.has_value() == v2.has_value(), "mkv: k2 and v2 must be given together");
  if (k2.has_value()) segs.push_back({blas_ready(*k2), blas_ready(*v2)});
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
      total += s.k.size(2);
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
    std::vector<T> s(bm * sg.cap), m(bm), l(bm), kt(D * sg.ld);
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
          // s [mr, n] = q [mr, D] @ k^T [D, n]
          mm(mr, n, D, qp, q.sn, kt.data() + sg.off[g] + j0, sg.ld, s.data(), ld, false);
          for (int64_t i = 0; i < mr; ++i) {
            T* si = s.data() + i * ld;
            const T mnew = std::max(m[i], scale * row_extreme(si, n, lowest));
            const T corr = std::exp(m[i] - mnew);  // 0 on the first block (m = -inf)
            l[i] = l[i] * corr + exp_scale_sum(si, n, scale, mnew);
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
// [D, keys] panels, and dK and dV accumulate transposed, as [D, keys] in their own output memory
// (then transposed in place through one per-thread [D, keys] buffer), so that every product reads
// its operands in place (only the [D, rows] transposes of a query block's q and dO are made):
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
    // panels of one segment at a time (segments are the outer loop); tmp: the in-place transposes
    std::vector<T> p(bm * sg.cap), ds(bm * sg.cap), delta(Nq);
    std::vector<T> kt(D * ldp), vt(D * ldp), qt(D * bm), dot_t(D * bm), tmp(D * nk_max);
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
        T* dkt = grads[1 + 2 * g].data_ptr<T>() + bh * nk * D;  // dk^T [D, nk], in dk's memory
        T* dvt = grads[2 + 2 * g].data_ptr<T>() + bh * nk * D;
        std::fill_n(dkt, nk * D, T(0));
        std::fill_n(dvt, nk * D, T(0));
        for (int64_t i0 = 0; i0 < Nq; i0 += bm) {
          const int64_t mr = std::min(bm, Nq - i0);
          const T* qp = q.at(b, h) + i0 * q.sn;
          const T* doi = dop + i0 * D;
          T* dqi = dq_all + (bh * Nq + i0) * D;
          transpose(qp, q.sn, mr, D, qt.data(), bm);
          transpose(doi, D, mr, D, dot_t.data(), bm);
          for (int64_t j0 = 0; j0 < nk; j0 += kBN) {
            const int64_t n = std::min(kBN, nk - j0), ld = padded(n);
            // p [mr, n] = exp(scale * q [mr, D] @ k_j^T [D, n] - lse)
            mm(mr, n, D, qp, q.sn, kt.data() + j0, ldp, p.data(), ld, false);
            for (int64_t i = 0; i < mr; ++i) exp_scale(p.data() + i * ld, n, scale, lsep[i0 + i]);
            // dv_j^T [D, n] += dO^T [D, mr] @ p [mr, n]
            mm(D, n, mr, dot_t.data(), bm, p.data(), ld, dvt + j0, nk, true);
            // dp [mr, n] = dO [mr, D] @ v_j^T [D, n]; then ds = scale * p * (dp - delta)
            mm(mr, n, D, doi, D, vt.data() + j0, ldp, ds.data(), ld, false);
            for (int64_t i = 0; i < mr; ++i) dsoftmax(ds.data() + i * ld, p.data() + i * ld, n, delta[i0 + i], scale);
            // dq [mr, D] += ds [mr, n] @ k_j [n, D]
            mm(mr, D, n, ds.data(), ld, kp + j0 * sg.k[g].sn, sg.k[g].sn, dqi, D, true);
            // dk_j^T [D, n] += q^T [D, mr] @ ds [mr, n]
            mm(D, n, mr, qt.data(), bm, ds.data(), ld, dkt + j0, nk, true);
          }
        }
        for (T* x : {dkt, dvt}) {  // [D, nk] -> [nk, D] in place, through tmp
          std::copy_n(x, nk * D, tmp.data());
          transpose(tmp.data(), nk, D, nk, x, D);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mkv_fwd_cpu(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1,
                                               const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
                                               double scale) {
  const auto segs = segments(k1, v1, k2, v2);
  check_inputs("mkv_fwd", q, segs);
  const at::Tensor qc = blas_ready(q);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
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
  const auto segs = segments(k1, v1, k2, v2);
  check_inputs("mkv_bwd", q, segs);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "mkv_bwd: dout and out must be shaped as q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "mkv_bwd: lse must be [B, H, Nq]");
  const auto dt = q.scalar_type();
  const at::Tensor qc = blas_ready(q);
  const at::Tensor doc = dout.to(dt).contiguous(), oc = out.to(dt).contiguous(), lc = lse.to(dt).contiguous();
  at::Tensor dl;
  if (dlse.has_value() && dlse->defined()) dl = dlse->to(dt).contiguous();
  std::vector<at::Tensor> grads{at::zeros(q.sizes(), q.options())};
  for (const auto& s : segs) {
    // dk, dv: written whole from the transposed accumulators; dq accumulates in place
    grads.push_back(at::empty(s.k.sizes(), q.options()));
    grads.push_back(at::empty(s.v.sizes(), q.options()));
  }
  if (dt == at::kFloat)
    bwd_kernel<float>(doc, dl, qc, segs, oc, lc, static_cast<float>(scale), grads);
  else
    bwd_kernel<double>(doc, dl, qc, segs, oc, lc, scale, grads);
  return grads;
}

}  // namespace dcal
