// 2-D neighborhood attention on CPU, fp32 and fp64 (and bf16 on the fp32 kernels): register-blocked
// kernels with the queries of a map row in the SIMD lanes.
//
// Why this shape. A query's window is ks x ks keys; along a map row the window slides by one key
// per query. With L consecutive queries (j0 .. j0 + L - 1) of one row in the lanes of a vector,
// the key at column offset c of every lane's window is the key row's column j0 + c + lane: one
// unaligned load from the key row stored transposed ([D][columns]). So
//   logits  S[u][c]  = sum_d Qt[d][j0:] * Kt_u[d][j0 + c:]        (u: window row, c: column offset)
//   output  Ot[d]    = sum_{u,c} P[u][c] * Vt_u[d][j0 + c:]
// are plain vector FMAs with the accumulators in registers (ks offsets per key row for the
// logits; a block of head dims for the output), every lane's softmax is elementwise across the
// ks^2 logit vectors, and the bias of (u, c) is one scalar for all lanes (it depends only on the
// offsets). No logit outside a window is computed except at clamp-mode borders, where the lanes'
// windows shift by different amounts and the union of their offsets is computed and masked.
//
// Dilation: the positions of one residue (gx, gy) mod dil form a sub-grid on which a dilated
// window is the ordinary window of the sub-grid (zero/mask: centred, off the map exactly where the
// sub-grid index leaves [0, n_g); clamp: NATTEN's rule is defined that way; na2d.h), and the bias
// offset (key - query) / dil is the sub-grid offset. So each (batch, head, gx, gy) slice is an
// undilated problem: the kernels below work on slice coordinates and reach memory through strides
// scaled by the dilation.
//
// Key and value rows are staged transposed, zero-padded by ks - 1 + L columns on each side (zero
// mode's off-map keys are exactly such zeros; off-map rows are zero rows), in a ring of ks rows
// per thread that follows the query row down the slice: each key row is staged once per pass.
//
// Backward, one thread per slice, query rows in order: P from the logits and the forward's
// logsumexp, dP = dO . V as the logits, dS = P * (dP - delta), dQ as the output, and the bias
// gradient summed per (row offset, column offset) in vector accumulators. dK and dV are gathered
// with the KEYS in the lanes: the query row's P and dS are kept for the whole row, indexed by
// (u, c) and query column, so key column kc = k0 + lane receives from query column kc - c:
//   dKt_u[d][k0:] += sum_c dS[u][c][k0 - c:] * Qt[d][k0 - c:]   (and dV from P and dO)
// accumulated in registers over c, into a ring of transposed key-row accumulators that is written
// out when the key row leaves the window. Every write has one owner and a fixed order: the
// results are deterministic, bit for bit, whatever the thread count.
//
// Storage types: every input element is read once, when its row is staged (and the backward's out,
// dout once more for delta), and every output element written once, by unstage or the lane stores.
// Those reads and writes are templated on the tensors' storage type S, everything between them
// computes in T: bf16 tensors run the fp32 kernels (T = float), widened exactly on staging and
// rounded to nearest even on the way out (na2d_simd_vec.h), so their results are the fp32
// kernels' results on the widened inputs, rounded, bit for bit.
//
// The layers of struct Kern live in the na2d_simd_*.h sections included inside its body below
// (vectors, dot blocks, staging, pair kernels, forward, backward), so that everything the clones
// inline is in this translation unit; this file keeps the clone boundary and the host side.
#include "na2d_cpu_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

// Vectors only cross always-inline calls, inside one clone or entry, so the ABI note does not
// apply (also to cpu_math.h's exp, instantiated here with this file's vector types).
#pragma GCC diagnostic ignored "-Wpsabi"
#include "cpu_math.h"
#define DCAL_NA2D_MATH_ONLY
#include "na2d.h"

#define DCAL_AI [[gnu::always_inline]] inline

namespace dcal {
namespace na2d_simd {
namespace {

using na2d::kClamp;
using na2d::kMask;
using na2d::window_start;
// Vectors of VB bytes (GCC vector extensions): 32 bytes (8 floats, 4 doubles) on the x86-64-v3 and
// baseline clones (AVX2, or two SSE halves), 64 bytes (16 floats, 8 doubles: the whole AVX-512
// registers) on the x86-64-v4 entry points. Every lane's arithmetic is the same sequence of
// operations at either width. Arrays of them live in AlignedBuf (std::vector would drop the
// type's alignment).
template <typename T, int VB>
struct VecW {
  typedef T v __attribute__((vector_size(VB)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> m __attribute__((vector_size(VB)));
  static constexpr int L = VB / static_cast<int>(sizeof(T));
};

// The integer vectors of the bf16 conversions (na2d_simd_vec.h): as many bf16 (h) or 32-bit (w)
// lanes as a float vector of VB bytes has.
template <int VB>
struct Bf16W {
  typedef uint16_t h __attribute__((vector_size(VB / 2)));
  typedef uint32_t w __attribute__((vector_size(VB)));
};

// n vectors (or masks) on a 64-byte boundary, zero-initialised.
template <typename E>
class AlignedBuf {
 public:
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  ~AlignedBuf() { std::free(p_); }
  void resize(size_t n) {
    std::free(p_);
    p_ = static_cast<E*>(std::aligned_alloc(64, (n * sizeof(E) + 63) / 64 * 64));
    if (p_ == nullptr && n != 0) throw std::bad_alloc();
    std::memset(static_cast<void*>(p_), 0, n * sizeof(E));
    n_ = n;
  }
  E* data() { return p_; }
  const E* data() const { return p_; }
  E& operator[](size_t i) { return p_[i]; }
  E* begin() { return p_; }
  E* end() { return p_ + n_; }

 private:
  E* p_ = nullptr;
  size_t n_ = 0;
};

// T: the compute type (of rpb, lse, scale and every kernel buffer); S: the storage type of the
// tensors (T, or bf16 with T = float).
template <typename T, typename S = T>
struct FwdArgs {
  Geo g;
  In<S> q, k, v;
  const T* rpb;
  Out<S> out;
  T* lse;
  T scale;
  int band;
  std::atomic<bool>* nonfinite;  // set when a staged input holds an inf or a NaN (see fwd in the header)
};

template <typename T, typename S = T>
struct BwdArgs {
  Geo g;
  In<S> dout, q, k, v, out;
  const T* rpb;
  const T* lse;
  Out<S> dq, dk, dv;
  T* bias_part;
  T scale;
  std::atomic<bool>* nonfinite;
};

// The kernels at one vector width: VB bytes per vector (32 or 64). Everything in here is always
// inline and is compiled inside the entry point that instantiates it (fwd_tasks, bwd_tasks: the
// x86-64 clones at 32 bytes, the x86-64-v4 functions at 64).
#define DCAL_NA2D_SIMD_KERN
template <int VB>
struct Kern {
  template <typename T>
  using Vec = VecW<T, VB>;
  template <typename T>
  using vec_t = typename Vec<T>::v;
  template <typename T>
  using mask_t = typename Vec<T>::m;

// Vectors and transposes.
#include "na2d_simd_vec.h"

// Dot blocks: the micro-kernels.
#include "na2d_simd_blocks.h"

// Slices, staging rings, the lanes' windows, work buffers.
#include "na2d_simd_stage.h"

// A query-row pair's logits and weighted sums.
#include "na2d_simd_pair.h"

// Forward.
#include "na2d_simd_fwd.h"

// Backward.
#include "na2d_simd_bwd.h"
};  // struct Kern
#undef DCAL_NA2D_SIMD_KERN

// The loops of a task at one vector width (always inline: compiled inside the entry below).
template <int VB, typename T, typename S>
DCAL_AI void fwd_run(const FwdArgs<T, S>& a, int64_t b, int64_t e) {
  using K = Kern<VB>;
  typename K::template Work<T> w(a.g, false);
  const int64_t bands = (na2d::subgrid_len(0, static_cast<int>(a.g.X), a.g.dil) + a.band - 1) / a.band;
  for (int64_t t = b; t < e; ++t) {
    const typename K::Slice s = K::slice_of(a.g, t / bands);
    const int ia = static_cast<int>(t % bands) * a.band;
    if (ia < s.nx) K::fwd_rows(a, t / bands, ia, std::min(ia + a.band, s.nx), w);
  }
  if (!K::template finite<T>(w.probe)) a.nonfinite->store(true, std::memory_order_relaxed);
}
template <int VB, typename T, typename S>
DCAL_AI void bwd_run(const BwdArgs<T, S>& a, int64_t b, int64_t e) {
  using K = Kern<VB>;
  typename K::template Work<T> w(a.g, true);
  for (int64_t sl = b; sl < e; ++sl) K::bwd_slice(a, sl, w);
  if (!K::template finite<T>(w.probe)) a.nonfinite->store(true, std::memory_order_relaxed);
}

// The clone boundary: one non-template entry per type, compiled for each x86-64 level with
// 32-byte vectors, and on x86-64 an x86-64-v4 entry with 64-byte vectors (picked at run time when
// the CPU has AVX-512: use_avx512).
DCAL_CPU_CLONES void fwd_tasks(const FwdArgs<float>& a, int64_t b, int64_t e) { fwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void fwd_tasks(const FwdArgs<double>& a, int64_t b, int64_t e) { fwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void bwd_tasks(const BwdArgs<float>& a, int64_t b, int64_t e) { bwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void bwd_tasks(const BwdArgs<double>& a, int64_t b, int64_t e) { bwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void fwd_tasks(const FwdArgs<float, bf16>& a, int64_t b, int64_t e) { fwd_run<32>(a, b, e); }
DCAL_CPU_CLONES void bwd_tasks(const BwdArgs<float, bf16>& a, int64_t b, int64_t e) { bwd_run<32>(a, b, e); }

#if defined(__x86_64__)
#define DCAL_V4 __attribute__((target("arch=x86-64-v4")))
DCAL_V4 void fwd_tasks_512(const FwdArgs<float>& a, int64_t b, int64_t e) { fwd_run<64>(a, b, e); }
DCAL_V4 void fwd_tasks_512(const FwdArgs<double>& a, int64_t b, int64_t e) { fwd_run<64>(a, b, e); }
DCAL_V4 void bwd_tasks_512(const BwdArgs<float>& a, int64_t b, int64_t e) { bwd_run<64>(a, b, e); }
DCAL_V4 void bwd_tasks_512(const BwdArgs<double>& a, int64_t b, int64_t e) { bwd_run<64>(a, b, e); }
DCAL_V4 void fwd_tasks_512(const FwdArgs<float, bf16>& a, int64_t b, int64_t e) { fwd_run<64>(a, b, e); }
DCAL_V4 void bwd_tasks_512(const BwdArgs<float, bf16>& a, int64_t b, int64_t e) { bwd_run<64>(a, b, e); }

// The 64-byte kernels run when the CPU has the x86-64-v4 set (AVX-512 F, BW, DQ, VL) and
// DCAL_CPU_VECTOR_BITS is not 256 (that setting runs the 32-byte kernels, for comparison and for
// the tests of both widths on one machine).
bool use_avx512() {
  static const bool on = [] {
    const char* env = std::getenv("DCAL_CPU_VECTOR_BITS");
    if (env != nullptr && std::strcmp(env, "256") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return on;
}
template <typename A>
void fwd_dispatch(const A& a, int64_t b, int64_t e) {
  if (use_avx512())
    fwd_tasks_512(a, b, e);
  else
    fwd_tasks(a, b, e);
}
template <typename A>
void bwd_dispatch(const A& a, int64_t b, int64_t e) {
  if (use_avx512())
    bwd_tasks_512(a, b, e);
  else
    bwd_tasks(a, b, e);
}
#else
template <typename A>
void fwd_dispatch(const A& a, int64_t b, int64_t e) {
  fwd_tasks(a, b, e);
}
template <typename A>
void bwd_dispatch(const A& a, int64_t b, int64_t e) {
  bwd_tasks(a, b, e);
}
#endif

// Query rows per forward task: a band restages ks - 1 key rows beyond its own, so bands are long,
// but there are at least a few tasks per thread for the balance.
int band_rows(const Geo& g) {
  const int64_t nx = na2d::subgrid_len(0, static_cast<int>(g.X), g.dil);
  const int64_t slices = g.B * g.H * g.dil * g.dil, want = 4 * at::get_num_threads();
  int64_t band = nx;
  while (band > 2 * g.ks && slices * ((nx + band - 1) / band) < want) band = (band + 1) / 2;
  return static_cast<int>(band);
}

template <typename T, typename S>
bool fwd_impl(const Geo& g, In<S> q, In<S> k, In<S> v, const T* rpb, Out<S> out, T* lse, T scale) {
  std::atomic<bool> nonfinite{false};
  const FwdArgs<T, S> a{g, q, k, v, rpb, out, lse, scale, band_rows(g), &nonfinite};
  const int64_t bands = (na2d::subgrid_len(0, static_cast<int>(g.X), g.dil) + a.band - 1) / a.band;
  at::parallel_for(0, g.B * g.H * g.dil * g.dil * bands, 1, [&](int64_t b, int64_t e) { fwd_dispatch(a, b, e); });
  return !nonfinite.load();
}

template <typename T, typename S>
bool bwd_impl(const Geo& g, In<S> dout, In<S> q, In<S> k, In<S> v, const T* rpb, In<S> out, const T* lse, Out<S> dq,
              Out<S> dk, Out<S> dv, T* bias_part, T scale) {
  std::atomic<bool> nonfinite{false};
  const BwdArgs<T, S> a{g, dout, q, k, v, out, rpb, lse, dq, dk, dv, bias_part, scale, &nonfinite};
  at::parallel_for(0, g.B * g.H * g.dil * g.dil, 1, [&](int64_t b, int64_t e) { bwd_dispatch(a, b, e); });
  return !nonfinite.load();
}

}  // namespace

bool fwd(const Geo& g, In<float> q, In<float> k, In<float> v, const float* rpb, Out<float> out, float* lse,
         float scale) {
  return fwd_impl(g, q, k, v, rpb, out, lse, scale);
}
bool fwd(const Geo& g, In<double> q, In<double> k, In<double> v, const double* rpb, Out<double> out, double* lse,
         double scale) {
  return fwd_impl(g, q, k, v, rpb, out, lse, scale);
}
bool bwd(const Geo& g, In<float> dout, In<float> q, In<float> k, In<float> v, const float* rpb, In<float> out,
         const float* lse, Out<float> dq, Out<float> dk, Out<float> dv, float* bias_part, float scale) {
  return bwd_impl(g, dout, q, k, v, rpb, out, lse, dq, dk, dv, bias_part, scale);
}
bool bwd(const Geo& g, In<double> dout, In<double> q, In<double> k, In<double> v, const double* rpb, In<double> out,
         const double* lse, Out<double> dq, Out<double> dk, Out<double> dv, double* bias_part, double scale) {
  return bwd_impl(g, dout, q, k, v, rpb, out, lse, dq, dk, dv, bias_part, scale);
}
bool fwd(const Geo& g, In<bf16> q, In<bf16> k, In<bf16> v, const float* rpb, Out<bf16> out, float* lse, float scale) {
  return fwd_impl(g, q, k, v, rpb, out, lse, scale);
}
bool bwd(const Geo& g, In<bf16> dout, In<bf16> q, In<bf16> k, In<bf16> v, const float* rpb, In<bf16> out,
         const float* lse, Out<bf16> dq, Out<bf16> dk, Out<bf16> dv, float* bias_part, float scale) {
  return bwd_impl(g, dout, q, k, v, rpb, out, lse, dq, dk, dv, bias_part, scale);
}

}  // namespace na2d_simd
}  // namespace dcal
