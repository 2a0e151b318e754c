"""The constants the kernels share (dcal.kernels._common): one home for each, the Python border
codes equal to the C++ ``dcal::BorderMode`` values, and the one launch-configuration type."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch

from dcal import _ext
from dcal.kernels import _common as C
from dcal.ops import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpp_border_enum():
    """name -> value of ``enum BorderMode`` in csrc/dcal.h (kBorderZero -> "zero")."""
    text = (ROOT / "csrc" / "dcal.h").read_text()
    m = re.search(r"enum\s+BorderMode\b[^{]*\{([^}]*)\}", text)
    assert m, "csrc/dcal.h declares no enum BorderMode"
    pairs = re.findall(r"kBorder(\w+)\s*=\s*(\d+)", m.group(1))
    assert pairs, f"no kBorderX = N entries in {m.group(0)!r}"
    return {name.lower(): int(value) for name, value in pairs}


def test_border_codes_equal_the_cpp_enum():
    assert _cpp_border_enum() == C.BORDER_CODES
    assert C.BORDERS == ("zero", "mask", "clamp")
    assert [C.border_code(b) for b in C.BORDERS] == [int(C.Border.ZERO), int(C.Border.MASK), int(C.Border.CLAMP)]


def test_border_code_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"border must be one of \('zero', 'mask', 'clamp'\), got 'reflect'"):
        C.border_code("reflect")


def test_public_border_names_come_from_the_one_home():
    import dcal.ops as ops
    from dcal.ops._cpp_na2d import BORDER_IDS

    assert ops.BORDERS is C.BORDERS
    assert BORDER_IDS is C.BORDER_CODES


def test_triton_constexprs_carry_the_same_values():
    pytest.importorskip("triton")
    from dcal.kernels import _constexpr as T

    assert (T.BORDER_ZERO.value, T.BORDER_MASK.value, T.BORDER_CLAMP.value) == tuple(C.Border)
    assert T.LOG2E.value == C.LOG2E and T.LN2.value == C.LN2


def test_log_constants_are_exact():
    assert C.LOG2E == math.log2(math.e)
    assert C.LN2 == math.log(2.0)
    assert C.LOG2E * C.LN2 == pytest.approx(1.0, abs=1e-16)


@pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="dcal._C is not built")
def test_cpp_op_reads_each_code_as_its_border_mode():
    """The code of each name makes the C++ op compute that border mode (the reference decides),
    and the three modes differ on this map, so a swapped code cannot pass; an unknown code is
    refused by the op."""
    from dcal.ops._cpp_na2d import BORDER_IDS  # noqa: F401  (registers the ops' fakes and autograd)

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 5, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    outs = {}
    for border in C.BORDERS:
        out, _ = torch.ops.dcal.na2d_fwd(q, k, v, None, 3, C.border_code(border), 0.3, 1)
        want = reference.neighborhood_attention2d(q, k, v, kernel_size=3, border=border, scale=0.3)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
        outs[border] = out
    for a, b in (("zero", "mask"), ("zero", "clamp"), ("mask", "clamp")):
        assert not torch.allclose(outs[a], outs[b]), f"{a} and {b} agree on this map: the test proves nothing"
    with pytest.raises(RuntimeError, match="border must be"):
        torch.ops.dcal.na2d_fwd(q, k, v, None, 3, max(C.Border) + 1, 0.3, 1)


def test_log2e_has_one_python_home():
    """The literal of log2(e) (and of ln 2) appears in kernels/_common.py only, among the
    package's Python files; the Triton kernels compare border codes by name, not by number."""
    literals = (repr(math.log2(math.e)), repr(math.log(2.0)))  # as Python prints them
    homes = {lit: [] for lit in literals}
    bare_border = []
    for path in sorted([*(ROOT / "kernels").rglob("*.py"), *(ROOT / "dcal").rglob("*.py")]):
        if path.relative_to(ROOT).parts[:2] == ("dcal", "kernels"):
            continue  # a dcal/kernels link to ../kernels in a work tree
        text = path.read_text()
        for lit in literals:
            if lit in text:
                homes[lit].append(path.relative_to(ROOT).as_posix())
        if re.search(r"\bborder\s*[!=]=\s*\d", text):
            bare_border.append(path.relative_to(ROOT).as_posix())
    assert homes == {lit: ["kernels/_common.py"] for lit in literals}
    assert not bare_border, f"border compared with a bare number in {bare_border}"


# ----------------------------------------------------------------------------- launch configurations


def test_launch_names_its_keyword_arguments():
    t = C.Launch(block_m=64, block_n=32, num_warps=8, num_stages=3)
    assert t.constexprs() == {"BLOCK_M": 64, "BLOCK_N": 32}
    assert t.options() == {"num_warps": 8, "num_stages": 3}
    assert t.kwargs() == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    assert t["BLOCK_N"] == 32 and t["num_stages"] == 3
    with pytest.raises(KeyError, match="TILE_X"):
        t["TILE_X"]
    tile = C.Launch(tile_x=4, tile_y=8, block_n=16, num_warps=4, num_stages=1)
    assert tile.constexprs() == {"BLOCK_N": 16, "TILE_X": 4, "TILE_Y": 8}
    with pytest.raises(TypeError):
        C.Launch(64, 32)  # keywords only: a positional tile cannot land in the wrong field


def test_every_launcher_uses_the_one_launch_type():
    pytest.importorskip("triton")
    from dcal.kernels import na2d, pwca, rollout

    for dtype in C.TRITON_DTYPES:
        for d in (16, 40, 64, 128):
            pc = pwca.pwca_config(d, dtype)
            nc = na2d.launch_config(d, dtype)
            bd = C.block_d(d)
            launches = [pc.fwd, pc.dkdv, pc.dq, pc.pre, nc.fwd, nc.bwd, nc.delta]
            launches += [rollout.lse_config(dtype, bd), rollout.vec_config(dtype, bd)]
            assert all(type(t) is C.Launch for t in launches)
            assert pc.block_d == nc.block_d == bd
            assert na2d.unpack_config(na2d.pack_config(nc)) == nc


@pytest.mark.parametrize("d,want", [(1, 16), (8, 16), (16, 16), (17, 32), (40, 64), (64, 64), (72, 128), (128, 128)])
def test_block_d_pads_to_a_power_of_two(d, want):
    assert C.block_d(d) == want
