// Declarations of every C++/CUDA entry point of dcal._C. Host code of each op reads:
// argument checks -> device guard -> allocate -> dispatch.
#pragma once
#include <torch/types.h>

#include <tuple>
#include <vector>

namespace dcal {

// Border modes of neighborhood attention (docs/contract.md); the Python side passes these ints.
enum BorderMode : int64_t { kBorderZero = 0, kBorderMask = 1, kBorderClamp = 2 };

}  // namespace dcal
