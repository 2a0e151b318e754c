"""Automatic micro-batch: the largest micro-batch whose training step fits a memory budget.

Prediction runs the step on fake tensors (``FakeTensorMode``: tensors with shapes, dtypes and a
device but no data, backed by the meta device): the model is built, a batch goes forward and
backward and the optimiser state is created, while a dispatch mode counts the bytes of every
tensor storage alive; the maximum is the predicted peak. The fake tensors report the real device,
so the dcal ops take the same backend as in the real run and run its fake (meta) implementation:
the prediction sees the fused kernels' memory, not the reference's score matrices.

What is counted: parameters, gradients, AdamW's two moments, activations saved for backward and
the temporaries of each op. Not counted: memory a kernel allocates outside PyTorch, allocator
rounding and caching (``torch.cuda.max_memory_allocated`` counts rounding to 512 bytes, not the
cache), and on CPU the process's code and libraries.

On CUDA the choice is then checked by real steps: the training loop catches
``torch.OutOfMemoryError``, halves the micro-batch and redoes the step.

The budget (``--max-memory``) bounds what a user sees of the process (:func:`plan`):

* CPU: the process's peak resident set (RSS, ``VmHWM``): the resident set before the first step
  (the interpreter, torch, the data, the model) plus the step's predicted peak, with glibc's heap
  overhead: storages under 8 MiB come from the heap, whose holes (freed chunks between live ones)
  stay resident; measured on the demo model, such storages cost 1.45x their bytes
  (:data:`CPU_HEAP_OVERHEAD`), larger ones (mmapped) their size.
* CUDA: ``torch.cuda.max_memory_allocated`` (tensors, allocator rounding; not the cache, not the
  CUDA context), and the budget is enforced with ``set_per_process_memory_fraction``.

``python -m dcal.train.autobatch --config C --micro-batch 8,16,32 [--max-memory 2GB] [--measure]``
prints a table of the predicted (and measured, each in a fresh process) step peaks.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dcal.train.memory import cpu_peak_rss, cpu_rss, release_free_heap, reset_cpu_peak
from dcal.train.optim import param_groups


#: glibc's resident bytes per live byte of storages under :data:`CPU_HEAP_SMALL` (heap holes stay
#: resident, and what the C++ kernels allocate outside torch); measured on the demo model with the
#: brgemm PWCA kernels (micro-batches 4 to 64: 1.33 to 1.52, ``--measure``, 2026-12-03; 1.28 to 1.32
#: with the MKL kernels before them).
CPU_HEAP_OVERHEAD = 1.45
#: storages from this size on are taken as mapped and unmapped whole (no holes). Calibrated: with
#: 8 MiB the ViT-B/16 448 px step is predicted within 10% both by the bench's measure (state
#: allocated before, +9.3%) and in a fresh process (-7.9%); with 4 MiB -1.5% and -16% (both with the
#: heap factor 1.3; not re-measured with 1.45).
CPU_HEAP_SMALL = 8 * 2**20
#: the margin of the CPU step prediction: the automatic micro-batch keeps step x (1 + it) in the
#: budget. Measured on a step alone (``--measure``): -2 to -11% on the demo, -8% to +9% for
#: ViT-B/16 at 448 px.
CPU_PREDICTION_ERROR = 0.15
#: what the training loop adds to a step on CPU besides the model (the data loader and a group's
#: samples, gradient clipping, the first steps' heap growth): measured 8 to 10 MiB on the demo
CPU_LOOP_EXTRA = 16 * 2**20


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it, and their peak.

    With ``answer_scalars``, a data-dependent scalar read (``.item()``, ``bool(t)``, which fake
    tensors cannot answer) gets 0 / False: the control flow of a typical step (no resampling of a
    random pairing, no clamping of an in-range weight) without the data."""

    def __init__(self, answer_scalars: bool = False, heap_overhead: float = 1.0):
        super().__init__()
        self.answer_scalars = answer_scalars
        self.heap_overhead = heap_overhead
        self.live = 0
        self.peak = 0
        self.small_live = 0  # bytes of live storages under CPU_HEAP_SMALL
        self.resident_peak = 0.0  # peak of live + (heap_overhead - 1) * small_live
        self._seen: Dict[int, Any] = {}

    def reset_peak(self) -> None:
        self.peak = self.live
        self.resident_peak = self.live + (self.heap_overhead - 1) * self.small_live

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        if nbytes < CPU_HEAP_SMALL:
            self.small_live -= nbytes
        self._seen.pop(key, None)

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen and self._seen[key]() is st:
            return
        nbytes = st.nbytes()
        self._seen[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._free(k, n))
        self.live += nbytes
        if nbytes < CPU_HEAP_SMALL:
            self.small_live += nbytes
        self.peak = max(self.peak, self.live)
        self.resident_peak = max(self.resident_peak, self.live + (self.heap_overhead - 1) * self.small_live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.answer_scalars and func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@dataclass
class Choice:
    micro_batch: int
    predicted_peak: int  # what the budget is compared with (see ``choose_micro_batch``)
    budget: int
    predictions: Dict[int, int]


@dataclass
class StepPrediction:
    tensors: int  # peak bytes of live tensor storages (what max_memory_allocated counts)
    resident: int  # the same with glibc's heap overhead on small storages (CPU resident set)
    params: int  # bytes of the model's parameters and buffers (part of both peaks)


def predict_step(
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable,
    sample: Any,
    micro_batch: int,
    *,
    device: torch.device = torch.device("cpu"),
    amp_dtype: Optional[torch.dtype] = None,
    accumulate: int = 2,
    grad_checkpointing: bool = False,
    collate_fn: Optional[Callable] = None,
) -> StepPrediction:
    """Predicted peak of a steady-state training step with micro-batches of ``micro_batch``
    samples like ``sample`` (an ``(input, target)`` pair of the dataset), as tensor bytes and as
    CPU resident bytes.

    The first fake step creates the gradients and AdamW state; the second (``accumulate``
    micro-batches, the later ones adding into existing gradients) is the one measured, since in
    training every step but the first runs with the optimiser state allocated.
    ``loss_fn`` may be a method of the model passed (it is rebound to the fake model).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcal.train.data import collate

    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    collate_fn = collate_fn or collate
    real = collate_fn([sample] * micro_batch)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        x, y = (
            fake_mode.from_tensor(t.to(device) if t.device != device else t) if isinstance(t, torch.Tensor) else t
            for t in real
        )
    # built for real, outside the fake mode: constructors may read values (``.tolist()`` of a
    # drop-path schedule); its parameters are then swapped for fake ones and its memory freed
    model = model_factory()
    params_bytes = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    tracker = StorageTracker(answer_scalars=True, heap_overhead=CPU_HEAP_OVERHEAD)
    with fake_mode, tracker, torch.device(device):
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    fp = fake_mode.from_tensor(p.detach())
                    fp = nn.Parameter(fp.to(device) if fp.device != device else fp, requires_grad=p.requires_grad)
                    tracker.track(fp)
                    mod._parameters[name] = fp
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    fb = fake_mode.from_tensor(b)
                    fb = fb.to(device) if fb.device != device else fb
                    tracker.track(fb)
                    mod._buffers[name] = fb
        if grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        model.train()
        fn = _loss_of(model, loss_fn)  # the model's own loss (learnable loss weights)
        params = [p for p in model.parameters() if p.requires_grad]
        result = None
        for step in range(2):
            if step == 1:
                tracker.reset_peak()
            for _ in range(accumulate if step == 1 else 1):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(x)
                    loss = fn(out, y)
                    loss = loss[0] if isinstance(loss, tuple) else loss
                loss.float().backward()
                del out, loss
            if step == 0:
                # AdamW's state: two moments per parameter (its fp32 step counters are scalars)
                moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
            else:
                # the update's temporaries, one parameter at a time: at most the largest parameter
                largest = max((p for p in params), key=lambda p: p.numel(), default=None)
                if largest is not None:
                    tmp = torch.empty_like(largest)
                    del tmp
                result = StepPrediction(tracker.peak, int(tracker.resident_peak), params_bytes)
            for p in params:
                p.grad = None
        del moments, model, params
    return result


def predict_step_peak(
    model_factory: Callable[[], nn.Module], loss_fn: Callable, sample: Any, micro_batch: int, **kwargs
) -> int:
    """Predicted peak bytes of live tensors in a steady-state training step (see
    :func:`predict_step`, which takes the same arguments)."""
    return predict_step(model_factory, loss_fn, sample, micro_batch, **kwargs).tensors


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def choose_micro_batch(
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable,
    sample: Any,
    local_batch: int,
    budget: int,
    *,
    device: torch.device = torch.device("cpu"),
    amp_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 0.0,
    grad_checkpointing: bool = False,
    collate_fn: Optional[Callable] = None,
    resident: bool = False,
    fixed_cost: int = 0,
    margin: float = 1.0,
    key: str = "train.max_memory",
) -> Choice:
    """The largest micro-batch (at most ``local_batch``) whose predicted step peak, times
    ``margin``, plus ``fixed_cost`` fits ``budget`` bytes, balanced so the group splits into equal
    micro-batches (``k`` passes of ``ceil(local_batch / k)``). The step peak is the tensor bytes,
    or with ``resident`` the CPU resident bytes (:func:`predict_step`); ``Choice.predicted_peak``
    and ``Choice.predictions`` are ``fixed_cost`` + step peak (no margin). Raises ValueError
    (naming ``key``) when even a micro-batch of 1 does not fit."""
    steps: Dict[int, int] = {}

    def predict(b: int) -> int:
        if b not in steps:
            p = predict_step(
                model_factory,
                loss_fn,
                sample,
                b,
                device=device,
                amp_dtype=amp_dtype,
                accumulate=2 if b < local_batch else 1,
                grad_checkpointing=grad_checkpointing,
                collate_fn=collate_fn,
            )
            steps[b] = p.resident if resident else p.tensors
        return steps[b]

    def fits(b: int) -> bool:
        return fixed_cost + margin * predict(b) <= budget

    def choice(b: int) -> Choice:
        return Choice(b, fixed_cost + steps[b], budget, {k: fixed_cost + v for k, v in steps.items()})

    if not fits(1):
        held = f"{_mib(fixed_cost)} held before the first step and " if fixed_cost else ""
        band = f" (+{margin - 1:.0%} for the prediction's error)" if margin > 1 else ""
        need = fixed_cost + margin * steps[1]
        raise ValueError(
            f"{key} {_mib(budget)} is too small: {held}a micro-batch of 1 predicted to peak at "
            f"{_mib(fixed_cost + steps[1])} in all{band}; give at least {math.ceil(need / 2**20) + 1}MiB"
        )
    if local_batch == 1:
        return choice(1)
    per_sample = max(1, predict(2) - steps[1])
    guess = max(1, min(local_batch, 1 + int((budget - fixed_cost - margin * steps[1]) / margin) // per_sample))
    # activations are linear in the batch; the guess is verified and stepped down if not
    k = math.ceil(local_batch / guess)
    while True:
        b = math.ceil(local_batch / k)
        if fits(b) or b == 1:
            break
        k += 1
    return choice(b)


def _loss_of(model: nn.Module, loss_fn: Callable) -> Callable:
    """``loss_fn``, or when it is a method of a model, the same method of ``model``."""
    if getattr(loss_fn, "__self__", None) is not None and isinstance(loss_fn.__self__, nn.Module):
        return getattr(model, loss_fn.__name__)
    return loss_fn


def warm_step(
    model_factory: Callable[[], nn.Module], loss_fn: Callable, sample: Any, collate_fn: Optional[Callable] = None
) -> None:
    """One real CPU training step (forward, backward, AdamW) on one sample of a throwaway model;
    the global random state is left as it was."""
    from dcal.train.data import collate

    x, y = (collate_fn or collate)([sample])
    with torch.random.fork_rng(devices=[]):
        model = model_factory().train()
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, foreach=False)
        loss = _loss_of(model, loss_fn)(model(x), y)
        (loss[0] if isinstance(loss, tuple) else loss).float().backward()
        opt.step()
    del model, opt, loss


@dataclass
class Plan:
    micro_batch: int
    budget: Optional[int]
    predicted_peak: Optional[int]  # of the process (CPU) / of max_memory_allocated (CUDA)
    baseline: int  # CPU: resident set before the first step; CUDA: 0
    measure: str  # "peak RSS" or "max_memory_allocated"
    message: str


def sample_bytes(sample: Any) -> int:
    """Bytes of the tensors of one ``(input, target)`` sample."""
    return sum(t.numel() * t.element_size() for t in tree_flatten(sample)[0] if isinstance(t, torch.Tensor))


def plan(
    model: nn.Module,
    model_factory: Callable[[], nn.Module],
    loss_fn: Callable,
    sample: Any,
    local_batch: int,
    micro_batch: Any,
    budget: Optional[int],
    *,
    device: torch.device = torch.device("cpu"),
    amp_dtype: Optional[torch.dtype] = None,
    grad_checkpointing: bool = False,
    collate_fn: Optional[Callable] = None,
    world: int = 1,
    key: str = "train.max_memory",
) -> Plan:
    """The micro-batch of a run and its predicted peak against the memory budget, as the
    process will measure it: on CPU the peak resident set (the resident set now, with ``model``
    built, less its parameters, plus the group's input batch and the step's resident peak); on
    CUDA ``max_memory_allocated``. ``micro_batch``: ``"auto"`` (the largest that fits ``budget``;
    default budget: the free memory) or a number (refused when predicted above ``budget``).
    Raises ValueError naming ``key`` when the budget cannot be met."""
    import gc

    cpu = device.type != "cuda"
    measure = "peak RSS" if cpu else "max_memory_allocated"
    # on CPU the budget holds the step's predicted peak with the predictor's error band on top;
    # on CUDA the budget is enforced by the allocator and an OOM halves the micro-batch
    margin = 1.0 + CPU_PREDICTION_ERROR if cpu else 1.0
    if cpu and budget is not None:
        # the one-time costs of a first step (code paged in, thread pools, library caches) belong
        # to the resident set before the step: a step on one sample, on a throwaway model
        warm_step(model_factory, loss_fn, sample, collate_fn)
    if cpu:
        gc.collect()
        release_free_heap()
        params = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
        # the group is collated whole before it is split into micro-batches
        baseline = max(0, (cpu_rss() or 0) - params) + local_batch * sample_bytes(sample) + CPU_LOOP_EXTRA
    else:
        baseline = 0
    auto = micro_batch == "auto"
    if budget is None and not auto:
        return Plan(min(micro_batch, local_batch), None, None, baseline, measure, "")
    if budget is None:
        if cpu:
            budget = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // max(1, world) + (cpu_rss() or 0)
        else:
            budget = torch.cuda.get_device_properties(device).total_memory
    common = dict(device=device, amp_dtype=amp_dtype, grad_checkpointing=grad_checkpointing, collate_fn=collate_fn)
    what = "the process's peak resident set (RSS)" if cpu else "torch.cuda.max_memory_allocated"
    if auto:
        choice = choose_micro_batch(
            model_factory,
            loss_fn,
            sample,
            local_batch,
            budget,
            resident=cpu,
            fixed_cost=baseline,
            margin=margin,
            key=key,
            **common,
        )
        mb, peak = choice.micro_batch, choice.predicted_peak
        msg = (
            f"memory: micro-batch {mb} of {local_batch} per process chosen for a budget of {_mib(budget)} "
            f"on {what}: predicted step peak {_mib(peak)}"
        )
    else:
        mb = min(micro_batch, local_batch)
        p = predict_step(model_factory, loss_fn, sample, mb, accumulate=2 if mb < local_batch else 1, **common)
        step = p.resident if cpu else p.tensors
        peak = baseline + step
        if peak > budget:
            raise ValueError(
                f"{key} {_mib(budget)} on {what}: train.micro_batch {mb} is predicted to peak at "
                f"{_mib(peak)}; lower train.micro_batch, use train.micro_batch=auto or raise the budget"
            )
        msg = (
            f"memory: micro-batch {mb} of {local_batch} per process, predicted step peak {_mib(peak)} "
            f"within the budget of {_mib(budget)} on {what}"
        )
        if baseline + margin * step > budget:
            msg = (
                f"warning: micro-batch {mb} is predicted to peak at {_mib(peak)}, under the budget of "
                f"{_mib(budget)} on {what}, but with the step's {margin - 1:.0%} error band above it: it may "
                "exceed the budget"
            )
    if cpu:
        msg += f" ({_mib(baseline)} held before the first step)"
    return Plan(mb, budget, peak, baseline, measure, msg)


# ----------------------------------------------------------------------------- measurement


def measure_cpu_step_peak(
    model_factory, loss_fn_of, sample, micro_batch: int, accumulate: int = 2, steps: int = 2, collate_fn=None
) -> int:
    """Measured peak of real CPU training steps, comparable to :func:`predict_step`'s
    ``resident``: the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``)
    above its resident set before the model exists. Run it in a fresh process.

    A first model of the same architecture runs one step on one sample and is thrown away, so the
    one-time costs of a first step (thread pools, library caches, lazily loaded code) are in the
    baseline, not in the measurement (one sample, so that it leaves no heap of the measured size
    behind); freed heap is returned to the OS before the baseline is read.
    ``loss_fn_of(model)`` gives the loss of a model (``lambda m: m.loss`` for DCALViT).
    """
    import gc

    from dcal.train.data import collate

    collate_fn = collate_fn or collate

    def run(model, opt, n_steps, batch):
        x, y = batch
        for _ in range(n_steps):
            for _ in range(accumulate):
                out = model(x)
                loss = loss_fn_of(model)(out, y)
                loss = loss[0] if isinstance(loss, tuple) else loss
                loss.backward()
                del out, loss
            opt.step()
            opt.zero_grad(set_to_none=True)

    warm = model_factory().train()
    warm_opt = torch.optim.AdamW(param_groups(warm, 0.05), lr=1e-4, foreach=False)
    run(warm, warm_opt, 1, collate_fn([sample]))
    del warm, warm_opt
    batch = collate_fn([sample] * micro_batch)
    gc.collect()
    release_free_heap()
    base = cpu_rss()
    if not reset_cpu_peak():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs)")
    model = model_factory().train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, foreach=False)
    run(model, opt, steps, batch)
    return cpu_peak_rss() - base


def _micro_batches(text: str) -> list:
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or any(v < 1 for v in out):
        raise ValueError(f"--micro-batch must be integers >= 1 separated by commas (like 8,16,32), got {text!r}")
    return out


def _table(rows, header) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def _main(argv=None) -> int:
    """``python -m dcal.train.autobatch --config C --micro-batch 8,16,32 [--max-memory B] [--measure]``."""
    import argparse
    import json
    import subprocess
    import sys

    from dcal.train import config as C
    from dcal.train.build import build_task

    p = argparse.ArgumentParser(
        prog="python -m dcal.train.autobatch",
        description="Predicted (and with --measure, measured) peak memory of a training step of a config's model "
        "on the CPU, per micro-batch. Step peak: resident set (RSS) above the process's before the "
        "model exists (model, gradients, AdamW state, activations). With --max-memory, the process's "
        "predicted peak (resident set before the first step + step) is compared with the budget, as "
        "python -m dcal.train does.",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--micro-batch", required=True, help="one or more micro-batches, comma-separated (8,16,32)")
    p.add_argument("--max-memory", default=None, help="budget of the process's peak RSS, like 2GB or 512MiB")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimiser step (default 2)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also run real CPU steps, each micro-batch in a fresh process, and measure the peak RSS",
    )
    p.add_argument("--measure-one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    err = lambda m: print(f"error: {m}", file=sys.stderr) or 2  # noqa: E731
    try:
        mbs = _micro_batches(args.micro_batch)
        budget = C.parse_bytes(args.max_memory, "--max-memory")
        cfg = C.load(args.config, args.set)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        task = build_task(cfg, seed=cfg.train.seed)
    except ValueError as e:
        return err(e)
    from dcal.train.coupled import CoupledLoss

    if isinstance(task.loss, CoupledLoss):
        return err(
            f"the memory prediction covers per-sample losses; {type(task.loss).__name__} couples the batch "
            "(set train.micro_batch to a number)"
        )
    sample = task.train_set[0]

    def loss_of(m):
        return task.loss if task.loss is not None else m.loss

    if args.measure_one is not None:
        print(
            json.dumps(
                measure_cpu_step_peak(task.model_factory, loss_of, sample, args.measure_one, accumulate=args.accumulate)
            )
        )
        return 0
    probe = task.model_factory()
    loss_fn = loss_of(probe)
    baseline = None
    if budget is not None:
        import gc

        gc.collect()
        release_free_heap()
        # as the training process: its resident set with the data and model built, less the
        # parameters (part of the step's peak), plus a whole input group
        params = sum(t.untyped_storage().nbytes() for t in [*probe.parameters(), *probe.buffers()])
        local = cfg.train.effective_batch
        baseline = (cpu_rss() or 0) - params + local * sample_bytes(sample) + CPU_LOOP_EXTRA
    rows = []
    for mb in mbs:
        pred = predict_step(task.model_factory, loss_fn, sample, mb, accumulate=args.accumulate)
        row = [mb, f"{pred.tensors / 2**20:.1f}", f"{pred.resident / 2**20:.1f}"]
        if args.measure:
            cmd = [
                sys.executable,
                "-m",
                "dcal.train.autobatch",
                "--config",
                args.config,
                "--micro-batch",
                str(mb),
                "--accumulate",
                str(args.accumulate),
                "--measure-one",
                str(mb),
            ]
            for item in args.set:
                cmd += ["--set", item]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return err(f"measuring micro-batch {mb} failed: {r.stderr.strip().splitlines()[-1:]}")
            measured = json.loads(r.stdout.strip().splitlines()[-1])
            row += [f"{measured / 2**20:.1f}", f"{(pred.resident - measured) / measured:+.1%}"]
        if budget is not None:
            total = baseline + pred.resident
            row += [f"{total / 2**20:.1f}", "yes" if total <= budget else "no"]
        rows.append(row)
    header = ["micro-batch", "tensors MiB", "predicted MiB"]
    if args.measure:
        header += ["measured MiB", "error"]
    if budget is not None:
        header += ["process MiB", f"within {budget / 2**20:.0f} MiB"]
    print(
        f"training step of {args.config} on the CPU, {args.accumulate} micro-batches per step; predicted: "
        f"resident set above the process's before the model (tensors x{CPU_HEAP_OVERHEAD} below "
        f"{CPU_HEAP_SMALL // 2**20} MiB for glibc's heap)"
        + (", measured: peak RSS in a fresh process" if args.measure else "")
        + (f"; process: + {baseline / 2**20:.1f} MiB held before the first step" if budget is not None else "")
    )
    print(_table(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
