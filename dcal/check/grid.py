"""The correctness grid of ``python -m dcal.check``: one line per case, expanded per backend and dtype.

A :class:`Case` names an op, a shape, the op's keyword arguments and a *tier*: the smallest run
that includes it. Every case runs on every backend of the op's chain that claims the device
(``triton``, ``cpp``, ``sdpa``; the ``reference`` is the judge) and on every dtype of the device,
so adding a case is one line in :data:`GRID`.

Tiers (``RUN_TIER`` maps a run to the highest tier it includes)::

    TINY   every run, also Triton under the CPU interpreter   (B 1-2, H 1-3, tokens <= 130)
    SMALL  CPU without --quick, every GPU run                 (hundreds of tokens, 64x64 maps)
    FULL   every GPU run                                      (the models' sizes: DCAL, BEV, rollout)
    LARGE  GPU without --quick                                (batch 16, other borders, > 2**31 elements)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from dcal.testing import judging as T
from dcal.testing.inputs import FAMILIES, FAMILY, PACKED
from dcal.testing.inputs import Case as HarnessCase

TINY, SMALL, FULL, LARGE = 0, 1, 2, 3
TIER_NAMES = {TINY: "tiny", SMALL: "small", FULL: "full", LARGE: "large"}

# Public op name -> op family (one worker subprocess per family): dcal.testing.inputs.FAMILY.
DISPATCH_OP = {
    "pwca_attention": "multi_kv_attention",
    "multi_kv_attention": "multi_kv_attention",
    "neighborhood_attention2d": "neighborhood_attention2d",
    "attention_rollout": "attention_rollout",
}
BACKENDS_UNDER_TEST = ("triton", "cpp", "sdpa")
DTYPES = {"cpu": ("float32", "float64", "bfloat16"), "cuda": ("float32", "float16", "bfloat16")}

# Why bf16 Triton is not run by the CPU interpreter.
INTERPRETER_BF16 = (
    "Triton 3.8's interpreter computes tl.dot of bf16 operands wrongly (triton issue #11584); "
    "bf16 Triton is checked on a GPU only"
)


@dataclass(frozen=True)
class Case(HarnessCase):
    """One line of the grid: a :class:`dcal.testing.Case` (op, shape, kwargs, layout, grads)
    plus when and how it runs.

    tier: the smallest run that includes it.
    sample: compare only these batch indices (for the > 2**31-element cases, whose fp64 truth
    would not fit); None compares everything.
    det: also check bit-determinism (two runs) where the backend promises it.
    dtypes: restrict the case to these dtypes (None: the run's dtypes), e.g. the > 2**31 cases,
    whose point (64-bit offsets) does not depend on the dtype.
    The layout ``packed`` (``packed=True`` in :func:`C`): the inputs are strided views of a packed
    projection (``[B, N, 3, H, D]`` permuted, channels-last qkv for neighborhood attention).
    """

    tier: int = TINY
    sample: Optional[Tuple[int, ...]] = None
    det: bool = False
    dtypes: Optional[Tuple[str, ...]] = None


def C(op: str, tier: int, shape: Dict[str, object], kwargs: Optional[Dict[str, object]] = None, **opts) -> Case:
    if opts.pop("packed", False):
        opts["layout"] = PACKED
    return Case(op, tuple(shape.items()), tuple((kwargs or {}).items()), tier=tier, **opts)


def A(B, H, Nq, Nk, D):
    return dict(B=B, H=H, Nq=Nq, Nk=tuple(Nk), D=D)


def M(B, H, X, Y, D):
    return dict(B=B, H=H, X=X, Y=Y, D=D)


def R(B, H, N, D, L):
    return dict(B=B, H=H, N=N, D=D, L=L)


def NB(kernel_size, border, rpb=True, **more):
    return dict(kernel_size=kernel_size, border=border, rpb=rpb, **more)


LOW, FP16 = ("float16", "bfloat16"), ("float16",)
PW, MKV, NA, RO = "pwca_attention", "multi_kv_attention", "neighborhood_attention2d", "attention_rollout"

# fmt: off
GRID: List[Case] = [
    # ---- attention: odd token counts against tiles of 16..128, one / two / three segments, D 16..128
    C(PW,  TINY,  A(1, 2, 37, (37, 37), 40), det=True),
    C(PW,  TINY,  A(1, 2, 1, (5, 130), 16)),
    C(MKV, TINY,  A(1, 2, 130, (5,), 64)),
    C(MKV, TINY,  A(1, 1, 17, (7, 66, 3), 128)),
    C(PW,  TINY,  A(2, 2, 23, (23, 29), 64), packed=True),
    C(PW,  SMALL, A(2, 3, 197, (197, 197), 64)),
    C(MKV, SMALL, A(1, 2, 300, (513,), 40)),
    C(PW,  FULL,  A(8, 12, 785, (785, 785), 64), det=True),           # DCAL PWCA at 448 px
    C(MKV, FULL,  A(8, 12, 785, (785,), 64)),                         # DCAL SA
    C(MKV, LARGE, A(8, 12, 79, (785,), 64)),                          # GLCA: CLS + top 10% queries
    C(PW,  LARGE, A(16, 12, 785, (785, 785), 64), dtypes=LOW),
    C(MKV, LARGE, A(2, 8, 4099, (4099,), 128)),
    C(PW,  LARGE, A(129, 128, 1024, (1024, 1024), 128), grads=False, sample=(0, 128), dtypes=FP16),  # q > 2**31 elements
    # ---- neighborhood: all borders, windows 3/5/7, maps smaller than the window, D 16..128
    C(NA,  TINY,  M(1, 2, 5, 9, 16),    NB(3, "zero")),
    C(NA,  TINY,  M(1, 2, 7, 10, 40),   NB(5, "mask"), det=True),
    C(NA,  TINY,  M(1, 2, 9, 11, 64),   NB(7, "clamp")),
    C(NA,  TINY,  M(1, 1, 4, 6, 128),   NB(7, "zero", rpb=False)),
    C(NA,  TINY,  M(2, 2, 6, 7, 32),    NB(3, "clamp"), packed=True),
    C(NA,  TINY,  M(1, 2, 13, 15, 16),  NB(3, "zero", dilation=2)),
    C(NA,  TINY,  M(1, 2, 13, 15, 24),  NB(3, "clamp", dilation=2)),
    C(NA,  SMALL, M(2, 4, 32, 29, 32),  NB(7, "clamp")),
    C(NA,  SMALL, M(1, 4, 64, 64, 64),  NB(7, "zero"), det=True),
    C(NA,  SMALL, M(1, 2, 30, 31, 16),  NB(5, "mask", dilation=3)),
    C(NA,  FULL,  M(2, 4, 256, 256, 64), NB(7, "zero")),             # the BEV models' map, 256 channels
    C(NA,  LARGE, M(2, 4, 128, 128, 64), NB(7, "clamp"), dtypes=LOW),            # the other borders
    C(NA,  LARGE, M(2, 4, 128, 128, 64), NB(7, "mask", dilation=2), dtypes=LOW),
    C(NA,  LARGE, M(64, 4, 725, 725, 16), NB(7, "zero", rpb=False), grads=False, sample=(63,), dtypes=FP16),  # > 2**31
    # ---- rollout: recomputed and given logsumexps
    C(RO,  TINY,  R(1, 2, 33, 16, 3), det=True),
    C(RO,  TINY,  R(2, 3, 65, 40, 2), dict(with_lse=True)),
    C(RO,  TINY,  R(1, 2, 17, 128, 2)),
    C(RO,  TINY,  R(2, 2, 19, 32, 2), packed=True),
    C(RO,  SMALL, R(2, 12, 197, 64, 12), dict(with_lse=True)),
    C(RO,  FULL,  R(8, 12, 785, 64, 12), dict(with_lse=True)),        # GLCA's selection at 448 px
    C(RO,  LARGE, R(8, 12, 785, 64, 12)),
]
# fmt: on

# Bit-determinism each backend promises (outputs named as in the report); see each kernel
# file's opening comment. The Triton neighborhood rpb gradient uses atomics (order not fixed).
DETERMINISTIC = {
    ("multi_kv_attention", "cpp", "cpu"): "all",
    ("neighborhood_attention2d", "cpp", "cpu"): "all",
    ("neighborhood_attention2d", "cpp", "cuda"): "all",
    ("attention_rollout", "cpp", "cpu"): "all",
    ("multi_kv_attention", "triton", "*"): "all",
    ("neighborhood_attention2d", "triton", "*"): "all but drpb",
    ("attention_rollout", "triton", "*"): "all",
}


def determinism_promise(op: str, backend: str, device: str) -> Optional[str]:
    d = DISPATCH_OP[op]
    return DETERMINISTIC.get((d, backend, device)) or DETERMINISTIC.get((d, backend, "*"))


# ----------------------------------------------------------------------------- tolerance rule

# The judging rule and its floors live in dcal.testing.judging (flash-attention's rule: the
# kernel's error against the fp64 truth at most 2x / 3x (forward / gradients) that of the
# reference backend run in the case's dtype, plus a per-dtype floor atol + rtol * max|truth|).


def tolerance(dtype: str, check: str, ref_err: float, truth_max: float) -> float:
    """The bound of one row: ``check`` names the output or gradient (``d...``: a gradient)."""
    return T.tolerance(dtype, ref_err, truth_max, grad=T.is_grad(check))


# ----------------------------------------------------------------------------- selection


def case_dtypes(c: Case, device: str, quick: bool) -> Tuple[str, ...]:
    return tuple(d for d in run_dtypes(device, quick, c.tier) if c.dtypes is None or d in c.dtypes)


def run_dtypes(device: str, quick: bool, tier: int = TINY) -> Tuple[str, ...]:
    """A GPU --quick run checks bf16 only: the training precision that no CPU run can check (the
    interpreter computes bf16 dots wrongly), while fp32 and fp16 Triton kernels run in the CPU
    interpreter. The full GPU run and every CPU run check all of the device's dtypes."""
    if device == "cuda" and quick:
        return ("bfloat16",)
    return DTYPES[device]


def compile_backends(device: str, quick: bool) -> Optional[Tuple[str, ...]]:
    """Backends whose ops get the torch.compile check (None: all). A GPU --quick run compiles the
    Triton ops only: their triton_op path (kernels visible to Inductor) exists only on a GPU,
    while the C++ and sdpa custom ops are the same registrations that the CPU run compiles."""
    return ("triton",) if device == "cuda" and quick else None


def run_tier(device: str, quick: bool) -> int:
    if device == "cpu":
        return TINY if quick else SMALL
    return FULL if quick else LARGE


def has_dilation() -> bool:
    import dcal.ops

    return "dilation" in inspect.signature(dcal.ops.neighborhood_attention2d).parameters


def unsupported_kwargs(case: Case) -> Optional[str]:
    """Why a case cannot run with this version of the op (a keyword it does not take yet)."""
    if case.op == NA and "dilation" in case.kw and not has_dilation():
        return "neighborhood_attention2d has no dilation argument in this version"
    return None


# Shorter names accepted by --ops.
OP_ALIASES = {"pwca": "pwca_attention"}


def op_choices() -> List[str]:
    """What --ops accepts: families, public op names, aliases."""
    return list(FAMILIES) + list(FAMILY) + list(OP_ALIASES)


def resolve_filters(device: str, quick: bool, ops=None, only=None, dtypes=None, tier=None, backends=None):
    """``(ops, error)``: the --ops values with aliases resolved, and a one-line error when a
    filter selects nothing (an unknown op or dtype, or no grid case left), else None. A run
    whose filters select nothing must not end as an empty "PASSED"."""
    if ops:
        bad = [o for o in ops if o not in op_choices()]
        if bad:
            return ops, (
                f"--ops {' '.join(bad)}: no such op or family; valid: {', '.join(FAMILIES)} (families), "
                f"{', '.join(FAMILY)} (ops), " + ", ".join(f"{a} (= {o})" for a, o in OP_ALIASES.items())
            )
        ops = list(dict.fromkeys(OP_ALIASES.get(o, o) for o in ops))
    if dtypes:
        valid = run_dtypes(device, quick, run_tier(device, quick) if tier is None else tier)
        bad = [d for d in dtypes if d not in valid]
        if bad:
            why = (
                " (a --quick run on cuda checks bfloat16 only; drop --quick for the others)"
                if device == "cuda" and quick and all(d in DTYPES[device] for d in bad)
                else ""
            )
            return ops, f"--dtypes {' '.join(bad)}: not checked on {device}{why}; valid: {', '.join(valid)}"
    cases = select(device, quick, ops, only, tier)
    if dtypes:
        cases = [c for c in cases if any(d in dtypes for d in case_dtypes(c, device, quick))]
    if not cases:
        what = " ".join(
            f"{flag} {' '.join(v)}" for flag, v in (("--ops", ops), ("--only", only), ("--dtypes", dtypes)) if v
        )
        examples = "; ".join(f"{c.op} {c.shape_str()}" for c in select(device, quick, ops, None, tier)[:3])
        return ops, (
            f"{what}: no case of the {TIER_NAMES[run_tier(device, quick) if tier is None else tier]} grid on "
            f"{device} matches (--only matches text of 'op shape', e.g. {examples or 'none for these ops'})"
        )
    if backends:
        from dcal.ops._dispatch import ORDER

        dops = sorted({DISPATCH_OP[c.op] for c in cases})
        if not any(b in ORDER[d] for d in dops for b in backends):
            have = "; ".join(f"{d}: {' '.join(b for b in ORDER[d] if b in BACKENDS_UNDER_TEST)}" for d in dops)
            return ops, f"--backends {' '.join(backends)}: no selected op has it; backends under test per op: {have}"
    return ops, None


def select(device: str, quick: bool, ops=None, only=None, tier=None) -> List[Case]:
    """The grid's cases for this run: tier, op filter (families or op names), substring filter."""
    tier = run_tier(device, quick) if tier is None else tier
    out = []
    for c in GRID:
        if c.tier > tier:
            continue
        if ops and not (c.family in ops or c.op in ops):
            continue
        if only and not any(o in f"{c.op} {c.shape_str()}" for o in only):
            continue
        out.append(c)
    return out


# ----------------------------------------------------------------------------- duration estimate

# Per-item seconds on one H100-class GPU, stated rather than measured (no GPU has run this yet):
# a worker subprocess starts (import torch, triton, dcal) in ~8 s; each Triton specialisation
# (op x dtype x head-dim class x flags: the forward and backward kernels) JIT-compiles in ~3 s the
# first time (cold cache); a TINY/SMALL run (kernel + fp64 and low-precision references) takes
# ~0.2 s; FULL and LARGE runs are dominated by the two references: ~1 s (attention, rollout) and
# ~8 s for the 256x256 neighborhood maps (k and v windows gathered per head: 8 slices of 1.6 GB
# in fp64, memory-bound), LARGE ~4 / 3 (128x128 maps) / 1 s; a torch.compile
# check ~10 s; the benchmark process: start-up, ~20 s per FlexAttention compile (PWCA and the
# neighborhood block mask, once per mode), ~15 s of measured rounds in --quick (ViT-B/16 step
# at B 8 bf16) and ~60 s in the full run (B 8 and 16, bf16 and fp16, both modes). The report prints the estimate next to the measured wall
# time, so the constants can be corrected after the first GPU run.
START_S, JIT_S, COMPILE_S = 8.0, 3.0, 10.0
CASE_S = {
    TINY: {"*": 0.2},
    SMALL: {"*": 0.3},
    FULL: {"attention": 1.0, "neighborhood": 8.0, "rollout": 1.0},
    LARGE: {"attention": 4.0, "neighborhood": 3.0, "rollout": 1.0},
}
FLEX_S, BENCH_RUN_S = 20.0, {True: 15.0, False: 60.0}
FLEX_COMPILES = {True: 2, False: 4}
# Backends that claim CUDA for each op (for the estimate only; the run asks dcal.ops itself).
CUDA_BACKENDS = {
    "multi_kv_attention": ("triton", "sdpa"),
    "neighborhood_attention2d": ("triton", "cpp"),
    "attention_rollout": ("triton",),
}


def head_class(d: int) -> int:
    return max(16, 1 << (int(d) - 1).bit_length())


def estimate_gpu_seconds(quick: bool, bench: bool = True) -> Tuple[float, Dict[str, int]]:
    """Expected duration of a CUDA run from the case count (see the constants above)."""
    cases = select("cuda", quick)
    runs, jit, compiles = 0, set(), set()
    secs = START_S * len(FAMILIES)  # one worker per family (the first also writes the environment block)
    for c in cases:
        if c.op == NA and "dilation" in c.kw:
            pass  # counted: the dilation cases run once the argument exists
        for b in CUDA_BACKENDS[DISPATCH_OP[c.op]]:
            for dt in case_dtypes(c, "cuda", quick):
                runs += 1
                per = CASE_S[c.tier].get(c.family, CASE_S[c.tier].get("*"))
                secs += per * (2 if c.det and determinism_promise(c.op, b, "cuda") else 1)
                if b == "triton":
                    flags = (
                        len(c.s.get("Nk", ())) > 1,
                        c.kw.get("border"),
                        bool(c.kw.get("rpb")),
                        c.kw.get("with_lse"),
                    )
                    jit.add((DISPATCH_OP[c.op], dt, head_class(c.s["D"]), flags))
            cb = compile_backends("cuda", quick)
            if c.tier == TINY and (cb is None or b in cb):
                compiles.add((DISPATCH_OP[c.op], b))
    secs += JIT_S * len(jit) + COMPILE_S * len(compiles)
    if bench:
        secs += START_S + FLEX_S * FLEX_COMPILES[quick] + BENCH_RUN_S[quick]
    return secs, {
        "cases": len(cases),
        "runs": runs,
        "triton_specialisations": len(jit),
        "compile_checks": len(compiles),
    }


__all__ = ["Case", "GRID", "select", "tolerance", "determinism_promise", "estimate_gpu_seconds"]
