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
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dcal.train.memory import cpu_peak_rss, cpu_rss, release_free_heap, reset_cpu_peak
from dcal.train.optim import param_groups


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it, and their peak.

    With ``answer_scalars``, a data-dependent scalar read (``.item()``, ``bool(t)``, which fake
    tensors cannot answer) gets 0 / False: the control flow of a typical step (no resampling of a
    random pairing, no clamping of an in-range weight) without the data."""

    def __init__(self, answer_scalars: bool = False):
        super().__init__()
        self.answer_scalars = answer_scalars
        self.live = 0
        self.peak = 0
        self._seen: Dict[int, Any] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen and self._seen[key]() is st:
            return
        nbytes = st.nbytes()
        self._seen[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._free(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

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
    predicted_peak: int
    budget: int
    predictions: Dict[int, int]


def predict_step_peak(
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
) -> int:
    """Predicted peak bytes of a steady-state training step with micro-batches of
    ``micro_batch`` samples like ``sample`` (an ``(input, target)`` pair of the dataset).

    The first fake step creates the gradients and AdamW state; the second (``accumulate``
    micro-batches, the later ones adding into existing gradients) is the one measured, since in
    training every step but the first runs with the optimiser state allocated.
    ``loss_fn`` may be a method of the model passed (it is rebound to the fake model).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcal.train.data import collate

    collate_fn = collate_fn or collate
    real = collate_fn([sample] * micro_batch)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        x, y = (fake_mode.from_tensor(t.to(device) if t.device != device else t) if isinstance(t, torch.Tensor)
                else t for t in real)
    # built for real, outside the fake mode: constructors may read values (``.tolist()`` of a
    # drop-path schedule); its parameters are then swapped for fake ones and its memory freed
    model = model_factory()
    tracker = StorageTracker(answer_scalars=True)
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
        fn = loss_fn
        if getattr(loss_fn, "__self__", None) is not None and isinstance(loss_fn.__self__, nn.Module):
            fn = getattr(model, loss_fn.__name__)  # the model's own loss (learnable loss weights)
        params = [p for p in model.parameters() if p.requires_grad]
        peak_of_step = 0
        for step in range(2):
            if step == 1:
                tracker.peak = tracker.live
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
                peak_of_step = tracker.peak
            for p in params:
                p.grad = None
        del moments, model, params
    return peak_of_step


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
) -> Choice:
    """The largest micro-batch (at most ``local_batch``) whose predicted step peak fits
    ``budget`` bytes, balanced so the group splits into equal micro-batches (``k`` passes of
    ``ceil(local_batch / k)``). Raises ValueError when even a micro-batch of 1 does not fit."""
    preds: Dict[int, int] = {}

    def predict(b: int) -> int:
        if b not in preds:
            preds[b] = predict_step_peak(model_factory, loss_fn, sample, b, device=device, amp_dtype=amp_dtype,
                                         accumulate=2 if b < local_batch else 1,
                                         grad_checkpointing=grad_checkpointing, collate_fn=collate_fn)
        return preds[b]

    p1 = predict(1)
    if p1 > budget:
        raise ValueError(f"train.max_memory: a micro-batch of 1 is predicted to need {p1 / 2**20:.1f} MiB, "
                         f"more than the budget of {budget / 2**20:.1f} MiB")
    if local_batch == 1:
        return Choice(1, p1, budget, preds)
    p2 = predict(2)
    per_sample = max(1, p2 - p1)
    guess = max(1, min(local_batch, 1 + (budget - p1) // per_sample))
    # activations are linear in the batch; the guess is verified and stepped down if not
    k = math.ceil(local_batch / guess)
    while True:
        b = math.ceil(local_batch / k)
        if predict(b) <= budget or b == 1:
            break
        k += 1
    return Choice(b, preds[b], budget, preds)


# ----------------------------------------------------------------------------- measurement


def measure_cpu_step_peak(model_factory, loss_fn_of, sample, micro_batch: int, accumulate: int = 2,
                          steps: int = 2, collate_fn=None) -> int:
    """Measured peak of real CPU training steps, comparable to :func:`predict_step_peak`: the
    process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) above its resident
    set before the model exists. Run it in a fresh process.

    A first model of the same architecture runs one step and is thrown away, so the one-time
    costs of a first step (thread pools, library caches, lazily loaded code) are in the baseline,
    not in the measurement; freed heap is returned to the OS before the baseline is read.
    ``loss_fn_of(model)`` gives the loss of a model (``lambda m: m.loss`` for DCALViT).
    """
    import gc

    from dcal.train.data import collate

    collate_fn = collate_fn or collate
    x, y = collate_fn([sample] * micro_batch)

    def run(model, opt, n_steps):
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
    run(warm, warm_opt, 1)
    del warm, warm_opt
    gc.collect()
    release_free_heap()
    base = cpu_rss()
    if not reset_cpu_peak():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs)")
    model = model_factory().train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, foreach=False)
    run(model, opt, steps)
    return cpu_peak_rss() - base


def _main(argv=None) -> int:
    """``python -m dcal.train.autobatch --config C --micro-batch N [--measure]``: predicted (and
    measured, CPU) peak of a training step of the config's model."""
    import argparse
    import json

    from dcal.train import config as C
    from dcal.train.build import build_task

    p = argparse.ArgumentParser(prog="python -m dcal.train.autobatch")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--measure", action="store_true", help="also run real CPU steps and measure the peak RSS")
    args = p.parse_args(argv)
    cfg = C.load(args.config, args.set)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = build_task(cfg, seed=cfg.train.seed)
    from dcal.train.coupled import CoupledLoss

    if isinstance(task.loss, CoupledLoss):
        print(f"error: the memory prediction covers per-sample losses; {type(task.loss).__name__} couples the batch "
              "(set train.micro_batch to a number)", file=__import__("sys").stderr)
        return 2
    sample = task.train_set[0]

    def loss_of(m):
        return task.loss if task.loss is not None else m.loss

    probe = task.model_factory()
    pred = predict_step_peak(task.model_factory, loss_of(probe), sample, args.micro_batch)
    del probe
    row = {"micro_batch": args.micro_batch, "predicted_mb": pred / 2**20}
    if args.measure:
        row["measured_mb"] = measure_cpu_step_peak(task.model_factory, loss_of, sample, args.micro_batch) / 2**20
        row["ratio"] = row["predicted_mb"] / row["measured_mb"]
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
