"""The training loop (docs/contract.md, Training): model-agnostic, a model, a loss, data and a metric.

One optimiser step consumes a *group* of ``effective_batch`` samples (summed over processes),
fed as micro-batches of ``micro_batch`` samples with gradients accumulated in between. Each
micro-batch loss (a mean over its samples) is weighted by ``n_micro * world / n_group`` where
``n_group`` is the true number of samples in the whole group, over all processes: the step's
gradient is then exactly that of the mean loss over the group, also for the short last group of
an epoch (DDP averages over processes, hence the ``world`` factor).

Per step: AMP (fp16 with ``GradScaler``, bf16 without), unscale before clipping, steps with
non-finite gradients skipped, counted and logged, lr from a cosine schedule with warmup set
before the step, peak memory measured (``torch.cuda.max_memory_allocated`` on GPU, the process's
peak resident set on CPU). Under ``torchrun`` the model is wrapped in DDP, gradients are synced
only on the last micro-batch of a group (``no_sync`` before), data comes from a
``DistributedSampler``, and only rank 0 logs and writes checkpoints.

A CUDA out-of-memory error inside a step halves the micro-batch and redoes the same group (same
samples, same effective batch): no step is lost.

Losses that couple the samples of a batch (contrastive, episodic) say so by being instances of
:class:`dcal.train.coupled.CoupledLoss`; their group is accumulated exactly with the embedding
cache (:func:`dcal.train.coupled.cached_backward`): the loss is that of the whole group (under DDP,
of the global group for a loss that gathers across processes), not a mean of micro-batch losses.
``micro_batch`` then counts the rows of one forward (images of an episode, image-text pairs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from dcal.train import checkpoint as ckpt
from dcal.train import distributed
from dcal.train.config import TrainConfig, parse_bytes
from dcal.train.coupled import CoupledLoss, cached_backward, check_model, split_batch
from dcal.train.data import collate, set_epoch
from dcal.train.memory import cpu_peak_rss, reset_cpu_peak
from dcal.train.optim import CosineWarmup, param_groups

# ----------------------------------------------------------------------------- helpers


def accuracy(outputs: Any, target: Tensor) -> Tuple[float, int]:
    """(number correct, number of predictions): argmax over dim 1, for [B, C] class scores or
    [B, C, ...] dense predictions. A dict of outputs is judged on its first entry."""
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    pred = outputs.argmax(1)
    return float((pred == target).sum()), target.numel()


def setup_distributed() -> Tuple[int, int, int]:
    """Initialise the process group when run by ``torchrun`` (gloo on CPU, nccl on GPU).
    Returns (rank, world size, local rank); (0, 1, 0) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _as_loss(value: Any) -> Tuple[Tensor, Dict[str, Any]]:
    if isinstance(value, tuple):
        return value[0], (value[1] if len(value) > 1 and isinstance(value[1], dict) else {})
    return value, {}


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Trains ``model`` on ``train_set`` with ``loss_fn(outputs, target) -> loss`` (or
    ``(loss, parts)``), a mean over the micro-batch, and evaluates ``metric_fn(outputs, target)
    -> (sum, count)`` (default: accuracy) on ``val_set`` after each epoch.

    ``micro_batch="auto"`` predicts the step's memory on fake tensors (:mod:`dcal.train.autobatch`)
    and takes the largest micro-batch within ``max_memory`` (on CUDA default: the device's memory,
    and the first steps confirm it, halving on OOM).

    A ``loss_fn`` that is a :class:`dcal.train.coupled.CoupledLoss` is accumulated exactly over
    the whole group (embedding cache); any other callable is a per-sample mean. ``eval_fn(model,
    input, target) -> (sum, count)`` (optional) replaces ``metric_fn(model(input), target)`` in
    evaluation (zero-shot classification of a CLIP model, query accuracy of episodes).

    Datasets yield ``(input, target)``; a dataset with ``set_epoch`` gets the epoch before each
    epoch's loader is made (epoch-dependent augmentation). ``model_factory`` (optional) builds a
    fresh model like ``model`` for the memory prediction (default: a copy of ``model``). ``out_dir`` receives ``metrics.jsonl`` and ``checkpoints/``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        train_set,
        val_set=None,
        config: Optional[TrainConfig] = None,
        out_dir: Optional[str] = None,
        metric_fn: Callable = accuracy,
        model_factory: Optional[Callable[[], nn.Module]] = None,
        collate_fn: Callable = collate,
        run_config: Optional[Dict[str, Any]] = None,
        eval_fn: Optional[Callable[[nn.Module, Any, Any], Tuple[float, int]]] = None,
    ):
        self.cfg = (config or TrainConfig()).validate()
        self.loss_fn, self.metric_fn, self.collate_fn, self.eval_fn = loss_fn, metric_fn, collate_fn, eval_fn
        self.coupled = isinstance(loss_fn, CoupledLoss)
        self.train_set, self.val_set = train_set, val_set
        self.out_dir, self.model_factory, self.run_config = out_dir, model_factory, run_config or {}
        self.rank, self.world, self.local_rank = setup_distributed()
        self.is_main = self.rank == 0
        cfg = self.cfg
        if cfg.effective_batch % self.world:
            raise ValueError(
                f"train.effective_batch ({cfg.effective_batch}) must be a multiple of the number "
                f"of processes ({self.world})"
            )
        self.local_batch = cfg.effective_batch // self.world
        if self.coupled:
            # refused before any work: what the coupled loss cannot train on exactly
            if cfg.micro_batch == "auto":
                raise ValueError(
                    f"train.micro_batch: 'auto' is not supported with the coupled loss "
                    f"{type(loss_fn).__name__}; give the rows per forward as a number"
                )
            try:
                loss_fn.check(
                    batch=cfg.effective_batch,
                    micro_batch=cfg.micro_batch,
                    world=self.world,
                    dataset_size=len(train_set),
                )
                check_model(model)
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith("model") else f"train.{e}") from None
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but CUDA is not available")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        # fp16 needs no special case on CPU: autocast takes float16 there (torch >= 2.3), GradScaler("cpu") too
        self.amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp]

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"train.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self.ddp = None
        self.fsdp = cfg.strategy == "fsdp"
        if self.fsdp and self.coupled:
            raise ValueError(
                f"train.strategy: 'fsdp' is not supported with the coupled loss {type(loss_fn).__name__} "
                "(its embedding cache is tested under DDP only); use strategy ddp"
            )
        if self.fsdp:  # FSDP2, in place: per-block fully_shard (dcal.train.distributed)
            distributed.shard_model(model, param_dtype=cfg.fsdp_param_dtype, checkpointing=cfg.fsdp_checkpointing)
            if getattr(loss_fn, "__self__", None) is model:  # model.loss: the FSDP-registered method
                self.loss_fn = getattr(model, loss_fn.__name__)
        elif self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.local_rank] if use_cuda else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        self.forward_model = self.ddp if self.ddp is not None else self.model
        # the same initial weights everywhere (DDP also broadcasts them), but each process its own
        # stream for dropout and pairing
        torch.manual_seed(cfg.seed + self.rank)

        self.peak_lr = cfg.base_lr * cfg.effective_batch / 512
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=self.peak_lr, betas=tuple(cfg.betas)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.sampler = DistributedSampler(
            train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
        self.groups_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        self.schedule = CosineWarmup(
            self.peak_lr,
            cfg.min_lr,
            round(cfg.warmup_epochs * self.groups_per_epoch),
            cfg.epochs * self.groups_per_epoch,
        )
        self.ckpts = ckpt.CheckpointDir(out_dir, cfg.keep_last) if out_dir else None

        # progress, restored on resume
        self.epoch, self.group_in_epoch, self.step = 0, 0, 0
        self.skipped_steps, self.best_metric = 0, None
        self.epoch_loss_sum, self.epoch_samples, self.epoch_peak = 0.0, 0, 0
        self.micro_batch: Optional[int] = (
            None
            if cfg.micro_batch == "auto"
            else cfg.micro_batch
            if self.coupled
            else min(cfg.micro_batch, self.local_batch)
        )
        self.predicted_peak: Optional[int] = None
        self.memory_budget: Optional[int] = None
        self._curves = None  # the child process drawing curves.png
        self._memory_planned = False
        self.memory_report: Optional[Dict[str, Any]] = None
        self.oom_events: List[Dict[str, int]] = []
        self.history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ logging

    def log(self, msg: str) -> None:
        if self.is_main:
            try:
                from tqdm import tqdm

                tqdm.write(msg, file=sys.stderr)
            except ImportError:  # pragma: no cover
                print(msg, file=sys.stderr)

    def _write_metrics(self, row: Dict[str, Any]) -> None:
        self.history.append(row)
        if self.is_main and self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def _write_step(self, r: Dict[str, Any]) -> None:
        """One line per optimiser step in ``steps.jsonl`` (rank 0): this process's loss, lr,
        gradient norm, peak memory, micro-batch and the effective batch."""
        if not (self.is_main and self.out_dir):
            return
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": r["loss"],
            "lr": r["lr"],
            "grad_norm": r["grad_norm"],
            "skipped": r["skipped"],
            "peak_mem_mb": round(r["peak"] / 2**20, 1),
            "micro_batch": self.micro_batch,
            "effective_batch": self.cfg.effective_batch,
        }
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "steps.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ memory

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_cpu_peak()

    def _read_peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return cpu_peak_rss() or 0

    def plan_memory(self) -> None:
        """The micro-batch and its predicted peak against ``train.max_memory``
        (:func:`dcal.train.autobatch.plan`: the process's peak RSS on CPU, max_memory_allocated on
        CUDA). Done once, before the first step; raises ValueError (naming the key) when the budget
        cannot be met, so a caller can refuse before any work."""
        if self._memory_planned or self.coupled:
            return
        from dcal.train import autobatch

        cfg = self.cfg
        budget = parse_bytes(cfg.max_memory, "train.max_memory") if cfg.max_memory else None
        if budget is not None and self.device.type == "cuda":
            # makes the budget real: allocations beyond it raise OutOfMemoryError, which the step
            # turns into a smaller micro-batch
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), self.device)
        if self.model_factory is None:
            # a copy of the model being trained, made fake in the prediction
            src = self.model
            self.model_factory = lambda: copy.deepcopy(src).cpu()
        with torch.random.fork_rng(devices=[]):  # the run's random stream is not the planner's
            plan = autobatch.plan(
                self.model,
                self.model_factory,
                self.loss_fn,
                self.train_set[0],
                self.local_batch,
                "auto" if self.micro_batch is None else self.micro_batch,
                budget,
                device=self.device,
                amp_dtype=self.amp_dtype,
                grad_checkpointing=cfg.grad_checkpointing,
                collate_fn=self.collate_fn,
                world=self.world,
                key="train.max_memory (--max-memory)",
            )
        self._memory_planned = True
        self.micro_batch, self.predicted_peak, self.memory_budget = plan.micro_batch, plan.predicted_peak, plan.budget
        if plan.message:
            self.log(plan.message)

    # ------------------------------------------------------------------ one step

    def _micro_steps(self, batch, n: int, n_group: int) -> float:
        """Forward/backward of one group as micro-batches; returns the summed loss * samples."""
        b = self.micro_batch
        starts = list(range(0, n, b))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, s in enumerate(starts):
            x, y = split_batch(batch, s, min(s + b, n))
            m = y.shape[0] if isinstance(y, Tensor) else min(s + b, n) - s
            x, y = _to(x, self.device), _to(y, self.device)
            last = i == len(starts) - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            if self.fsdp:
                distributed.gradient_sync(self.model, last)
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out = self.forward_model(x)
                    loss, _ = _as_loss(self.loss_fn(out, y))
                # mean over the group across processes, whatever the micro-batch sizes are
                if loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()
                weighted = loss * (m * self.world / n_group)
                self.scaler.scale(weighted).backward()
            loss_sum += loss.detach().double().cpu() * m
            del out, loss, weighted
        return float(loss_sum)

    def _coupled_step(self, batch, n: int, n_group: int) -> float:
        """The group's exact coupled loss through the embedding cache; returns loss * samples."""
        x, y = _to(batch[0], self.device), _to(batch[1], self.device)
        # a gathering loss is the global group's on every process (DDP's mean keeps it); otherwise
        # each process's loss is over its share and DDP's mean must weigh the shares
        weight = 1.0 if self.loss_fn.gather_across_ranks else n * self.world / n_group
        value = cached_backward(
            self.model,
            self.loss_fn,
            x,
            y,
            self.micro_batch,
            forward_model=self.forward_model,
            ddp=self.ddp,
            amp_dtype=self.amp_dtype,
            scale=self.scaler.scale,
            weight=weight,
            device=self.device,
        )
        return float(value) * n

    def train_step(self, batch, n_group: int) -> Dict[str, Any]:
        """One optimiser step on ``batch`` (this process's share of a group of ``n_group``
        samples in all). OOM halves the micro-batch and redoes the group."""
        n = batch[1].shape[0] if isinstance(batch[1], Tensor) else len(batch[1])
        self._reset_peak()
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                step = self._coupled_step if self.coupled else self._micro_steps
                loss_sum = step(batch, n, n_group)
                break
            except torch.OutOfMemoryError:
                if self.micro_batch <= 1:
                    raise
                old = self.micro_batch
                if self.coupled:
                    try:
                        self.loss_fn.check(
                            batch=self.cfg.effective_batch, micro_batch=max(1, old // 2), world=self.world
                        )
                    except ValueError:
                        raise torch.OutOfMemoryError(
                            f"out of memory with micro-batch {old}; half of it does not fit "
                            f"{type(self.loss_fn).__name__}'s batch layout"
                        ) from None
                self.micro_batch = max(1, old // 2)
                self.oom_events.append({"step": self.step, "from": old, "to": self.micro_batch})
                self.log(
                    f"step {self.step}: out of memory with micro-batch {old}; retrying the same "
                    f"{self.cfg.effective_batch}-sample group with micro-batch {self.micro_batch}"
                )
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # return the failed attempt's blocks before retrying

        lr = self.schedule.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.fsdp:
            norm = distributed.full_norm(norm)
        finite = bool(torch.isfinite(norm))
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale or not finite
        else:
            skipped = not finite
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            self.skipped_steps += 1
            self.log(
                f"step {self.step}: skipped, non-finite gradient norm ({float(norm)}); "
                f"{self.skipped_steps} skipped so far"
            )
        self.schedule.step_count += 1
        self.step += 1
        peak = self._read_peak()
        if self.memory_report is None and self.predicted_peak is not None:
            cpu = self.device.type == "cpu"
            self.memory_report = {
                "micro_batch": self.micro_batch,
                "predicted_mb": self.predicted_peak / 2**20,
                "measured_mb": peak / 2**20,
                "measured": "max_memory_allocated" if not cpu else "peak RSS",
            }
            within = ""
            if self.memory_budget is not None:
                self.memory_report["budget_mb"] = self.memory_budget / 2**20
                within = (
                    f", within the budget of {self.memory_budget / 2**20:.1f} MiB"
                    if peak <= self.memory_budget
                    else f", OVER the budget of {self.memory_budget / 2**20:.1f} MiB"
                )
            what = "the process's peak RSS" if cpu else "max_memory_allocated"
            self.log(
                f"memory: first step peak {peak / 2**20:.1f} MiB measured ({what}), "
                f"predicted {self.predicted_peak / 2**20:.1f} MiB{within}"
            )
        return {
            "loss": loss_sum / n,
            "loss_sum": loss_sum,
            "n": n,
            "lr": lr,
            "grad_norm": float(norm),
            "skipped": skipped,
            "peak": peak,
        }

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.val_set is None:
            return None
        self.model.eval()
        # every process takes every world-th sample, without the padding of DistributedSampler,
        # so the metric is over the validation set exactly once
        idx = list(range(self.rank, len(self.val_set), self.world))
        bs = self.local_batch if self.coupled else (self.micro_batch or self.local_batch)
        loader = DataLoader(
            self.val_set,
            batch_sampler=[idx[i : i + bs] for i in range(0, len(idx), bs)],
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in loader:
            x, y = _to(x, self.device), _to(y, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                if self.eval_fn is not None:
                    s, c = self.eval_fn(self.model, x, y)
                else:
                    s, c = self.metric_fn(self.model(x), y)
            total += torch.tensor([float(s), float(c)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1]) if total[1] > 0 else None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The full training state. Under DDP every process must call it (the RNG states of all
        processes are gathered, so a resumed run continues each process's random stream)."""
        rng = ckpt.rng_state()
        rngs = [rng]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": rng,
            "rng_per_rank": rngs,
            "epoch": self.epoch,
            "group_in_epoch": self.group_in_epoch,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "best_metric": self.best_metric,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_samples": self.epoch_samples,
            "epoch_peak": self.epoch_peak,
            "micro_batch": self.micro_batch,
            "world": self.world,
            "effective_batch": self.cfg.effective_batch,
            "config": self.run_config,
        }

    def save(self, is_best: bool = False) -> Optional[str]:
        if self.ckpts is None:
            return None
        state = self.state_dict()
        if self.fsdp:  # sharded model and optimiser (torch.distributed.checkpoint), written by every process
            return distributed.save_checkpoint(
                self.ckpts, state, self.model, self.optimizer, self.step, is_best, self.is_main
            )
        return self.ckpts.save(state, self.step, is_best) if self.is_main else None

    def load(self, path: str, state: Optional[Dict[str, Any]] = None) -> None:
        """Restore everything :meth:`state_dict` holds; training continues exactly where it was.
        ``state``: the checkpoint already read from ``path`` (it is not read again)."""
        if state is None:
            state = ckpt.load(path, map_location="cpu")
        if state["effective_batch"] != self.cfg.effective_batch:
            raise ValueError(
                f"checkpoint {path} was trained with effective_batch {state['effective_batch']}, "
                f"the config asks for {self.cfg.effective_batch}; resume needs the same"
            )
        if ("sharded" in state) != self.fsdp:
            raise ValueError(
                f"checkpoint {path} was saved with train.strategy "
                f"{'fsdp' if 'sharded' in state else 'ddp'}; resume it with the same strategy"
            )
        if self.fsdp:
            distributed.load_checkpoint(path, state, self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        ckpt.set_rng_state(per_rank[self.rank] if len(per_rank) == self.world else state["rng"])
        self.epoch, self.group_in_epoch, self.step = state["epoch"], state["group_in_epoch"], state["step"]
        self.skipped_steps, self.best_metric = state["skipped_steps"], state["best_metric"]
        self.epoch_loss_sum, self.epoch_samples = state["epoch_loss_sum"], state["epoch_samples"]
        self.epoch_peak = state["epoch_peak"]
        if state["micro_batch"] is not None and state["world"] == self.world:
            self.micro_batch = state["micro_batch"] if self.coupled else min(state["micro_batch"], self.local_batch)
        self.log(f"resumed from {path}: epoch {self.epoch}, group {self.group_in_epoch}, step {self.step}")

    # ------------------------------------------------------------------ loop

    def _loader(self, epoch: int, start_group: int) -> Tuple[DataLoader, int]:
        self.sampler.set_epoch(epoch)
        set_epoch(self.train_set, epoch)
        indices = list(self.sampler)
        groups = [indices[i : i + self.local_batch] for i in range(0, len(indices), self.local_batch)]
        # its own generator: making a loader must not draw from the global RNG, or a run resumed
        # mid-epoch would see a different random stream than the run it continues
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        loader = DataLoader(
            self.train_set,
            batch_sampler=groups[start_group:],
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
            generator=gen,
            pin_memory=self.device.type == "cuda",
        )
        return loader, len(groups)

    def fit(self, resume: Optional[str] = None, resume_state: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Train for ``config.epochs`` epochs (from ``resume``, a checkpoint path, if given;
        ``resume_state``: its content when already read). Returns the rows written to ``metrics.jsonl``."""
        cfg = self.cfg
        if resume:
            self.load(resume, resume_state)
        self.plan_memory()
        self.model.train()
        self.log(
            f"training on {self.device} x{self.world}: effective batch {cfg.effective_batch} "
            f"({self.local_batch} per process, micro-batch {self.micro_batch}), peak lr {self.peak_lr:.3g}, "
            f"{self.groups_per_epoch} steps/epoch, amp {cfg.amp}"
        )
        stop = False
        while self.epoch < cfg.epochs and not stop:
            loader, n_groups = self._loader(self.epoch, self.group_in_epoch)
            bar = None
            if self.is_main and cfg.progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=n_groups,
                    initial=self.group_in_epoch,
                    desc=f"epoch {self.epoch}",
                    dynamic_ncols=True,
                    leave=False,
                    file=sys.stderr,
                )
            t0 = time.time()
            for batch in loader:
                n_local = batch[1].shape[0] if isinstance(batch[1], Tensor) else len(batch[1])
                # DistributedSampler pads so every process holds the same number of samples
                r = self.train_step(batch, n_local * self.world)
                self.group_in_epoch += 1
                self.epoch_loss_sum += r["loss_sum"]
                self.epoch_samples += r["n"]
                self.epoch_peak = max(self.epoch_peak, r["peak"])
                self._write_step(r)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{r['loss']:.4f}",
                        lr=f"{r['lr']:.2e}",
                        mem=f"{r['peak'] / 2**20:.0f}M",
                        mb=self.micro_batch,
                    )
                    bar.update(1)
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                    self.save()
                if cfg.max_steps and self.step >= cfg.max_steps:
                    stop = True
                    break
            if bar is not None:
                bar.close()
            epoch_done = self.group_in_epoch >= n_groups
            self._end_of_epoch(time.time() - t0, final=stop or self.epoch + 1 == cfg.epochs, epoch_done=epoch_done)
        if self._curves is not None:
            from dcal.train import curves

            failed = curves.finish(self._curves)
            self._curves = None
            if failed:
                self.log(failed)
        return self.history

    def _end_of_epoch(self, seconds: float, final: bool, epoch_done: bool) -> None:
        cfg = self.cfg
        sums = torch.tensor([self.epoch_loss_sum, float(self.epoch_samples)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(sums)
        train_loss = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
        val = None
        if final or (self.epoch + 1) % cfg.eval_every == 0:
            val = self.evaluate()
            row = {
                "epoch": self.epoch,
                "step": self.step,
                "train_loss": train_loss,
                "val_acc": val,
                "peak_mem_mb": round(self.epoch_peak / 2**20, 1),
                "effective_batch": cfg.effective_batch,
                "micro_batch": self.micro_batch,
                "world_size": self.world,
                "lr": self.schedule.lr(),
                "skipped_steps": self.skipped_steps,
                "epoch_seconds": round(seconds, 2),
                "memory_measure": "max_memory_allocated" if self.device.type == "cuda" else "peak_rss",
            }
            if self.memory_report is not None:
                row["predicted_peak_mb"] = round(self.memory_report["predicted_mb"], 1)
                row["measured_first_step_peak_mb"] = round(self.memory_report["measured_mb"], 1)
            if self.oom_events:
                row["oom_events"] = list(self.oom_events)
            if self.memory_budget is not None:
                row["budget_mb"] = round(self.memory_budget / 2**20, 1)
            self._write_metrics(row)
            if self.is_main and self.out_dir:
                from dcal.train import curves

                self._curves = curves.start(self.out_dir, self._curves)  # drawn by a child process
            # rounded for reading; metrics.jsonl keeps the full values
            self.log(
                f"epoch {self.epoch}: train_loss {train_loss:.4f}, val_acc "
                f"{'n/a' if val is None else f'{val:.3f}'}, peak_mem {self.epoch_peak / 2**20:.0f} MiB, "
                f"{seconds:.1f}s, skipped_steps {self.skipped_steps}"
            )
        is_best = val is not None and (self.best_metric is None or val > self.best_metric)
        if is_best:
            self.best_metric = val
        if epoch_done:
            self.epoch += 1
            self.group_in_epoch = 0
            self.epoch_loss_sum, self.epoch_samples, self.epoch_peak = 0.0, 0, 0
        self.save(is_best=is_best)
