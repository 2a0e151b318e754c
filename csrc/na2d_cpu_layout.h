// 2-D neighborhood attention on CPU: the [B, H, X, Y, D] tensors of the kernels, read (Strided)
// and written (StridedOut) through their element strides. Shared by every CPU kernel file of the
// op; plain C++ (no torch types): the host code fills them from tensors.
//
// Inputs may be any view (contiguous, heads-last, slices of a fused qkv projection,
// channels-first maps with a head-dim stride of X*Y): no whole-tensor copy is made. Outputs and
// gradients are allocated in the dim order of the input they belong to (dcal::empty_in_order_of:
// out and dq like q, dk like k, dv like v), so they too may have any of these layouts. A unit
// head-dim stride is the fast path of the loops; any other stride is walked element by element.
#pragma once

#include <cstdint>

namespace dcal {
namespace na2d_cpu {

// A [B, H, X, Y, D] input.
template <typename T>
struct Strided {
  const T* p;
  int64_t sb, sh, sx, sy, sd;
  // first element of token (i, j) of (batch, head) bh
  const T* at(int64_t bh, int64_t H, int64_t i, int64_t j) const {
    return p + (bh / H) * sb + (bh % H) * sh + i * sx + j * sy;
  }
};

// A [B, H, X, Y, D] output or gradient.
template <typename T>
struct StridedOut {
  T* p;
  int64_t sb, sh, sx, sy, sd;
  // first element of token (i, j) of (batch, head) bh
  T* at(int64_t bh, int64_t H, int64_t i, int64_t j) const {
    return p + (bh / H) * sb + (bh % H) * sh + i * sx + j * sy;
  }
};

}  // namespace na2d_cpu
}  // namespace dcal
