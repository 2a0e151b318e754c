// Definitions every part of dcal._C shares: the CPU and CUDA host code, and the CUDA kernels
// (na2d_kernels.cuh), which bench/cuda_report.py compiles standalone: no torch headers here.
// The entry points are declared in mkv.h, na2d.h and rollout.h.
#pragma once
#include <stdint.h>

namespace dcal {

// Border modes of neighborhood attention (docs/contract.md): the home of the codes. The Python
// side passes these ints (BORDER_IDS in dcal/ops/_cpp_na2d.py); the kernels compare against the
// names (na2d.h gives them to the per-element math as na2d::kZero, kMask, kClamp).
enum BorderMode : int64_t {
  kBorderZero = 0,   // centred window, off-map keys are zeros that stay in the softmax
  kBorderMask = 1,   // centred window, off-map keys are left out
  kBorderClamp = 2,  // window shifted inside the map (NATTEN)
};

}  // namespace dcal
