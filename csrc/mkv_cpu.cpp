// Multi-segment (PWCA) attention on CPU: FlashAttention-2 over one or two key/value segments in
// one call, so the keys are never concatenated and no [Nq, Nk] matrix exists (only per-thread
// [kBM, kBN] tiles). The block products run through the BLAS that libtorch_cpu exports (MKL),
// single-threaded inside at::parallel_for (MKL runs serial inside ATen's OpenMP regions; 2 threads
// measured ~2x one).
//
// Forward: parallel over batch x heads x query blocks; online softmax over the key blocks of
// segment 1, then segment 2; out and lse (the dtype of the inputs) are saved. A key block spans a
// whole segment up to kBN keys (DCAL's 785-token segments are one block each), so each GEMM is as
// large as the tile allows and the rescaling of the output happens once per segment.
// Backward: parallel over batch x heads; one pass per (b, h) walks query blocks x key blocks and
// accumulates dq, dk, dv straight into the outputs (each (b, h) slice has one owner), so there are
// no atomics and the result does not depend on the thread count. The lse gradient folds into
// delta = rowsum(dO * O) - dlse, as dS = P * (dP - delta).
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

#include "cpu_math.h"

namespace dcal {
namespace {

// Tile sizes, by measurement at Nq = Nk = 785, D = 64, fp32 forward+backward (2 cores, 1 MiB L2
// each, under heavy load from other jobs, so differences under ~5% are noise): keys per block 1024
// beat 256 and 512 by 5-10%; forward query blocks of 64 beat 32 and 128; backward query blocks of
// 128 beat 64 by about 5%. Score tiles are [rows, ld] with ld the
// key count rounded up to 16 floats (64-byte rows; a power-of-two stride would alias cache sets).
constexpr int64_t kBM = 64;    // query rows per forward tile
constexpr int64_t kBMb = 128;  // query rows per backward tile
constexpr int64_t kBN = 1024;  // keys per tile

inline int padded(int n) { return (n + 15) / 16 * 16; }

// Row stride capacity of a tile: the longest key block of these segments, padded; the tiles
// are no larger than the segments need.
inline int64_t tile_ld(const std::vector<int64_t>& nks) {
  return padded(static_cast<int>(std::min(kBN, *std::max_element(nks.begin(), nks.end()))));
}

using cpu::gemm;

// ds <- p * (ds - delta)
template <typename T>
[[gnu::always_inline]] inline void dsoftmax_impl(T* ds, const T* p, int64_t n, T delta) {
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
}

template <typename T>
[[gnu::always_inline]] inline void scale_row_impl(T* o, int64_t n, T c) {
  for (int64_t j = 0; j < n; ++j) o[j] *= c;
}

DCAL_CPU_CLONES float row_max(const float* s, int64_t n) { return cpu::row_max_impl(s, n); }
DCAL_CPU_CLONES double row_max(const double* s, int64_t n) { return cpu::row_max_impl(s, n); }
DCAL_CPU_CLONES float exp_sub_sum(float* s, int64_t n, float c) { return cpu::exp_sub_sum_impl(s, n, c); }
DCAL_CPU_CLONES double exp_sub_sum(double* s, int64_t n, double c) { return cpu::exp_sub_sum_impl(s, n, c); }
DCAL_CPU_CLONES void exp_sub(float* s, int64_t n, float c) { cpu::exp_sub_impl(s, n, c); }
DCAL_CPU_CLONES void exp_sub(double* s, int64_t n, double c) { cpu::exp_sub_impl(s, n, c); }
DCAL_CPU_CLONES void dsoftmax(float* ds, const float* p, int64_t n, float d) { dsoftmax_impl(ds, p, n, d); }
DCAL_CPU_CLONES void dsoftmax(double* ds, const double* p, int64_t n, double d) { dsoftmax_impl(ds, p, n, d); }
DCAL_CPU_CLONES void scale_row(float* o, int64_t n, float c) { scale_row_impl(o, n, c); }
DCAL_CPU_CLONES void scale_row(double* o, int64_t n, double c) { scale_row_impl(o, n, c); }
DCAL_CPU_CLONES float dot(const float* a, const float* b, int64_t n) { return cpu::dot_impl(a, b, n); }
DCAL_CPU_CLONES double dot(const double* a, const double* b, int64_t n) { return cpu::dot_impl(a, b, n); }

// One [B, H, N, D] tensor with unit stride along D and a row stride BLAS accepts.
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
  // A single-token axis may carry any stride; BLAS wants a leading dimension >= D.
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
      TORCH_CHECK(t->dim() == 4 && t->size(0) == q.size(0) && t->size(1) == q.size(1) && t->size(3) == q.size(3),
                  op, ": k/v must be [B, H, Nk, D] matching q ", q.sizes(), ", got ", t->sizes());
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

template <typename T>
void fwd_kernel(const at::Tensor& q_, const std::vector<Seg>& segs, T scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q_.size(0), H = q_.size(1), Nq = q_.size(2), D = q_.size(3);
  const auto q = view_of<T>(q_);
  std::vector<HeadsView<T>> ks, vs;
  std::vector<int64_t> nks;
  for (const auto& s : segs) {
    ks.push_back(view_of<T>(s.k));
    vs.push_back(view_of<T>(s.v));
    nks.push_back(s.k.size(2));
  }
  T* o_all = out.data_ptr<T>();
  T* lse_all = lse.data_ptr<T>();
  const int64_t nqb = (Nq + kBM - 1) / kBM;
  const int64_t tasks = B * H * nqb;
  const int64_t cap = tile_ld(nks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<T> s(kBM * cap), m(kBM), l(kBM);
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kBM, b = bh / H, h = bh % H;
      const int mr = static_cast<int>(std::min(kBM, Nq - i0));
      const T* qp = q.at(b, h) + i0 * q.sn;
      T* op = o_all + (bh * Nq + i0) * D;  // out rows double as the accumulator
      std::fill(op, op + mr * D, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (size_t g = 0; g < ks.size(); ++g) {
        const T* kp = ks[g].at(b, h);
        const T* vp = vs[g].at(b, h);
        for (int64_t j0 = 0; j0 < nks[g]; j0 += kBN) {
          const int n = static_cast<int>(std::min(kBN, nks[g] - j0)), ld = padded(n);
          // s [mr, n] = scale * q [mr, D] @ k[j0:j0+n]^T [D, n]
          gemm('N', 'T', mr, n, D, scale, qp, q.sn, kp + j0 * ks[g].sn, ks[g].sn, T(0), s.data(), ld);
          for (int i = 0; i < mr; ++i) {
            T* si = s.data() + i * ld;
            const T mnew = std::max(m[i], row_max(si, n));
            const T corr = std::exp(m[i] - mnew);  // 0 on the first block (m = -inf)
            l[i] = l[i] * corr + exp_sub_sum(si, n, mnew);
            if (corr != T(1)) scale_row(op + i * D, D, corr);
            m[i] = mnew;
          }
          // out [mr, D] += p [mr, n] @ v[j0:j0+n] [n, D]
          gemm('N', 'N', mr, D, n, T(1), s.data(), ld, vp + j0 * vs[g].sn, vs[g].sn, T(1), op, D);
        }
      }
      T* lp = lse_all + bh * Nq + i0;
      for (int i = 0; i < mr; ++i) {
        scale_row(op + i * D, D, T(1) / l[i]);
        lp[i] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename T>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q_, const std::vector<Seg>& segs,
                const at::Tensor& out, const at::Tensor& lse, T scale, std::vector<at::Tensor>& grads) {
  const int64_t B = q_.size(0), H = q_.size(1), Nq = q_.size(2), D = q_.size(3);
  const auto q = view_of<T>(q_);
  const T* do_all = dout.const_data_ptr<T>();  // contiguous
  const T* o_all = out.const_data_ptr<T>();    // contiguous
  const T* lse_all = lse.const_data_ptr<T>();  // contiguous
  const T* dlse_all = dlse.defined() ? dlse.const_data_ptr<T>() : nullptr;
  std::vector<HeadsView<T>> ks, vs;
  std::vector<int64_t> nks;
  for (const auto& s : segs) {
    ks.push_back(view_of<T>(s.k));
    vs.push_back(view_of<T>(s.v));
    nks.push_back(s.k.size(2));
  }
  T* dq_all = grads[0].data_ptr<T>();
  const int64_t cap = tile_ld(nks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<T> p(kBMb * cap), ds(kBMb * cap), delta(Nq);
    for (int64_t bh = next++; bh < B * H; bh = next++) {
      const int64_t b = bh / H, h = bh % H;
      const T* dop = do_all + bh * Nq * D;
      const T* lsep = lse_all + bh * Nq;
      for (int64_t i = 0; i < Nq; ++i)
        delta[i] = dot(dop + i * D, o_all + (bh * Nq + i) * D, D) - (dlse_all ? dlse_all[bh * Nq + i] : T(0));
      for (int64_t i0 = 0; i0 < Nq; i0 += kBMb) {
        const int mr = static_cast<int>(std::min(kBMb, Nq - i0));
        const T* qp = q.at(b, h) + i0 * q.sn;
        const T* doi = dop + i0 * D;
        T* dqi = dq_all + (bh * Nq + i0) * D;
        for (size_t g = 0; g < ks.size(); ++g) {
          const int64_t nk = nks[g];
          T* dk = grads[1 + 2 * g].data_ptr<T>() + bh * nk * D;
          T* dv = grads[2 + 2 * g].data_ptr<T>() + bh * nk * D;
          const T* kp = ks[g].at(b, h);
          const T* vp = vs[g].at(b, h);
          for (int64_t j0 = 0; j0 < nk; j0 += kBN) {
            const int n = static_cast<int>(std::min(kBN, nk - j0)), ld = padded(n);
            const T* kj = kp + j0 * ks[g].sn;
            const T* vj = vp + j0 * vs[g].sn;
            // p [mr, n] = exp(scale * q [mr, D] @ k_j^T [D, n] - lse)
            gemm('N', 'T', mr, n, D, scale, qp, q.sn, kj, ks[g].sn, T(0), p.data(), ld);
            for (int i = 0; i < mr; ++i) exp_sub(p.data() + i * ld, n, lsep[i0 + i]);
            // dv_j [n, D] += p^T [n, mr] @ dO [mr, D]
            gemm('T', 'N', n, D, mr, T(1), p.data(), ld, doi, D, T(1), dv + j0 * D, D);
            // dp [mr, n] = dO [mr, D] @ v_j^T [D, n]; then ds = p * (dp - delta)
            gemm('N', 'T', mr, n, D, T(1), doi, D, vj, vs[g].sn, T(0), ds.data(), ld);
            for (int i = 0; i < mr; ++i) dsoftmax(ds.data() + i * ld, p.data() + i * ld, n, delta[i0 + i]);
            // dq [mr, D] += scale * ds [mr, n] @ k_j [n, D]
            gemm('N', 'N', mr, D, n, scale, ds.data(), ld, kj, ks[g].sn, T(1), dqi, D);
            // dk_j [n, D] += scale * ds^T [n, mr] @ q [mr, D]
            gemm('T', 'N', n, D, mr, scale, ds.data(), ld, qp, q.sn, T(1), dk + j0 * D, D);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mkv_fwd_cpu(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1,
                                               const std::optional<at::Tensor>& k2,
                                               const std::optional<at::Tensor>& v2, double scale) {
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

std::vector<at::Tensor> mkv_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                                    const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1,
                                    const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2,
                                    const at::Tensor& out, const at::Tensor& lse, double scale) {
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
    grads.push_back(at::zeros(s.k.sizes(), q.options()));
    grads.push_back(at::zeros(s.v.sizes(), q.options()));
  }
  if (dt == at::kFloat)
    bwd_kernel<float>(doc, dl, qc, segs, oc, lc, static_cast<float>(scale), grads);
  else
    bwd_kernel<double>(doc, dl, qc, segs, oc, lc, scale, grads);
  return grads;
}

}  // namespace dcal
