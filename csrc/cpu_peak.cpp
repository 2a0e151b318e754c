// Peak measurements of the CPU (see cpu_peak.h): the denominators of the bench's "share of peak".
#include "cpu_peak.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "checks.h"
#include "cpu_block.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dcal {
namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// 12 independent accumulators hide the FMA latency (4 cycles) on two FMA ports. Returns a sum of
// the accumulators so nothing is optimised away.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) float fma_loop_512(int64_t iters, float x, float y) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i) * 1e-3f);
  const __m512 vx = _mm512_set1_ps(x), vy = _mm512_set1_ps(y);
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], vx, vy);
  }
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) float fma_loop_256(int64_t iters, float x, float y) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i) * 1e-3f);
  const __m256 vx = _mm256_set1_ps(x), vy = _mm256_set1_ps(y);
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], vx, vy);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  alignas(32) float o[8];
  _mm256_store_ps(o, s);
  float r = 0;
  for (float v : o) r += v;
  return r;
}
#endif

}  // namespace

int cpu_fma_lanes() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
#endif
  return 0;
}

double cpu_peak(const std::string& kind, int64_t M, int64_t N, int64_t K, double seconds) {
  constexpr OpName op{"cpu_peak", ErrorClasses::kPythonErrors};
  DCAL_CHECK_ARG(op, kind == "brgemm" || kind == "sgemm" || kind == "fma", "kind must be 'brgemm', ",
                 "'sgemm' or 'fma', got '", kind, "'");
  DCAL_CHECK_ARG(op, seconds > 0, "seconds must be positive, got ", seconds);
  DCAL_CHECK_ARG(op, kind == "fma" || (M >= 1 && N >= 1 && K >= 1), "M, N, K must be >= 1, got ", M, ", ", N, ", ", K);
  const int threads = at::get_num_threads();
  std::atomic<int64_t> sink{0};
  if (kind == "fma") {
    const int lanes = cpu_fma_lanes();
    if (lanes == 0) return 0.0;
    auto run = [&](int64_t iters) {
#if defined(__x86_64__)
      const float r = lanes == 16 ? fma_loop_512(iters, 0.999999f, 1e-6f) : fma_loop_256(iters, 0.999999f, 1e-6f);
      sink += r > 1e30f;
#endif
    };
    // calibrate on this thread, then every thread runs the same count
    int64_t iters = 1 << 16;
    double t0 = now();
    run(iters);
    const double per = std::max(now() - t0, 1e-6) / static_cast<double>(iters);
    iters = std::max<int64_t>(1 << 16, static_cast<int64_t>(seconds / per));
    t0 = now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) run(iters);
    });
    const double wall = now() - t0;
    return static_cast<double>(threads) * static_cast<double>(iters) * 12.0 * lanes * 2.0 / wall / 1e9;
  }
  const bool brg = kind == "brgemm";
  auto once = [&](const float* A, const float* B, float* C) {
    if (brg)
      cpu::mm(M, N, K, A, K, B, N, C, N, false);
    else
      cpu::gemm('N', 'N', static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1.0f, A, static_cast<int>(K),
                B, static_cast<int>(N), 0.0f, C, static_cast<int>(N));
  };
  auto fill = [](std::vector<float>& v) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(static_cast<int>(i % 17) - 8) * 0.0625f;
  };
  int64_t reps;
  {
    std::vector<float> A(M * K), B(K * N), C(M * N);
    fill(A);
    fill(B);
    once(A.data(), B.data(), C.data());  // warm-up (JIT, page faults)
    const double t0 = now();
    once(A.data(), B.data(), C.data());
    reps = std::max<int64_t>(3, static_cast<int64_t>(seconds / std::max(now() - t0, 1e-7)));
  }
  std::vector<double> start(threads, 0.0), stop(threads, 0.0);
  const double t0 = now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      std::vector<float> A(M * K), B(K * N), C(M * N);
      fill(A);
      fill(B);
      once(A.data(), B.data(), C.data());
      for (int64_t r = 0; r < reps; ++r) once(A.data(), B.data(), C.data());
      sink += C[0] > 1e30f;
    }
  });
  const double wall = now() - t0;
  return static_cast<double>(threads) * static_cast<double>(reps + 1) * 2.0 * M * N * K / wall / 1e9;
}

}  // namespace dcal
