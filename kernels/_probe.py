"""A tiny real Triton kernel used to prove the GPU-proof harness (interpreter run, ahead-of-time
compilation, ptxas report) end to end: row-wise logsumexp of a [M, N] matrix in fp32."""

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec


@triton.jit
def _row_lse_kernel(x_ptr, out_ptr, M, N, stride_m, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        # [BLOCK_N]; masked columns read -inf so they add nothing to the sum
        x = tl.load(x_ptr + row * stride_m + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, axis=0))
        # online rescale: the running sum was taken relative to the old maximum
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_i = m_new
    tl.store(out_ptr + row + tl.arange(0, 1), m_i + tl.log(l_i))


def row_lse(x: torch.Tensor, block_n: int = 128) -> torch.Tensor:
    """logsumexp over the last axis of a 2-D tensor, fp32 result."""
    assert x.dim() == 2 and x.stride(1) == 1
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    _row_lse_kernel[(x.shape[0],)](x, out, x.shape[0], x.shape[1], x.stride(0), BLOCK_N=block_n)
    return out


def aot_specs():
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for bn in (128, 1024):
            specs.append(
                KernelSpec(
                    name="probe_row_lse",
                    kernel=_row_lse_kernel,
                    signature={
                        "x_ptr": f"*{dt}",
                        "out_ptr": "*fp32",
                        "M": "i32",
                        "N": "i32",
                        "stride_m": "i32",
                        "BLOCK_N": "constexpr",
                    },
                    constexprs={"BLOCK_N": bn},
                    num_warps=4,
                    num_stages=1,
                    label={"dtype": dt, "BLOCK_N": bn},
                )
            )
    return specs
