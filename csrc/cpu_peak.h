// The machine's fp32 limits measured in this process (bench/measure.py divides by the best).
#pragma once
#include <cstdint>
#include <string>

namespace dcal {

// GFLOP/s summed over the intra-op threads (at::get_num_threads()), each running the same work
// on its own buffers for about `seconds` of wall time:
//   "brgemm": C[M, N] = A[M, K] @ B[K, N] on oneDNN's brgemm as the kernels call it (cpu_block.h)
//   "sgemm":  the same product through the BLAS (MKL) sgemm
//   "fma":    independent fused multiply-adds on the widest vector registers the CPU has
//             (512-bit with AVX-512F, 256-bit with AVX2+FMA): the FMA peak; M, N, K ignored
// Returns 0 when the kind cannot run here (no FMA unit).
double cpu_peak(const std::string& kind, int64_t M, int64_t N, int64_t K, double seconds);

// Lanes of the FMA measured by cpu_peak("fma") (16: AVX-512, 8: AVX2, 0: none).
int cpu_fma_lanes();

}  // namespace dcal
