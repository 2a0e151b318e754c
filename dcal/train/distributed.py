"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: ``train.strategy: fsdp``.

What :func:`shard_model` does to a model, in place, in this order:

1. Activation checkpointing per block (``train.fsdp_checkpointing``), inside the block so that
   FSDP's all-gather stays outside the recomputation:

   - ``"none"``: activations kept.
   - ``"full"``: each block's forward is recomputed in backward (``torch.utils.checkpoint``,
     non-reentrant).
   - ``"selective"``: recomputed too, except the outputs of the ops in the save list
     (:data:`SAVE_OPS`): every ``dcal::`` op (the fused attention kernels -- their outputs and
     fp32 logsumexps are small, linear in tokens, and the most expensive thing to recompute) and
     the matrix products (``aten.mm``, ``aten.addmm``, ``aten.bmm``, ``aten._scaled_mm``). Norms,
     activations and element-wise ops are recomputed.

2. ``fully_shard`` on each block (the model's ``fsdp_blocks()`` if it has one, else the entries of
   its ``nn.ModuleList`` children), then on the root, with an optional
   ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``train.fsdp_param_dtype:
   bf16``): parameters are gathered in bf16 for compute, gradients reduced and kept in fp32.
   Under autocast with such a policy a bias parameter (a relative position bias) can reach an op
   in another dtype than q; dcal's modules cast it to q's dtype for the op, and its gradient comes
   back in the parameter's own dtype.

3. ``register_fsdp_forward_method`` for the model's methods other than ``forward`` that use its
   parameters (``fsdp_forward_methods``; for :class:`dcal.models.DCALViT` ``loss``, which reads
   the loss weights): called outside ``forward``, they gather the parameters first.

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`): the model and optimiser state are
written sharded with ``torch.distributed.checkpoint`` (every process writes its shards) into
``step-<N>.dcp/`` next to the usual ``step-<N>.pt``, which then holds everything else (schedule,
RNG of every process, data position) and the name of its shard directory. The shard directory is
written under a temporary name and renamed when complete, and the ``.pt`` is written after it, so
a crash leaves the previous checkpoint intact. Resuming needs the same strategy (any number of
processes: the shards are re-split on load).
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from dcal.train.config import CHECKPOINTING, FSDP_PARAM_DTYPES

# train.fsdp_param_dtype -> the parameters' dtype under FSDP (None: as they are)
PARAM_DTYPES = dict(zip(FSDP_PARAM_DTYPES, (None, torch.bfloat16), strict=True))

SAVE_OPS = (
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
)


def must_save(op) -> bool:
    """The selective-checkpointing save list: every ``dcal::`` op and the matrix products."""
    return getattr(op, "namespace", None) == "dcal" or op in SAVE_OPS


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if must_save(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _context_fn():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpointed_forward(forward, selective: bool, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(
        forward, *args, use_reentrant=False, context_fn=_context_fn if selective else noop_context_fn, **kwargs
    )


def blocks_of(model: nn.Module) -> List[nn.Module]:
    """The units sharded one by one: ``model.fsdp_blocks()``, or the entries of every
    ``nn.ModuleList`` directly under the model."""
    if hasattr(model, "fsdp_blocks"):
        return list(model.fsdp_blocks())
    return [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]


def apply_checkpointing(blocks: List[nn.Module], mode: str) -> None:
    """Per-block activation checkpointing ("none", "full" or "selective"), in place."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"train.fsdp_checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
    if mode == "none":
        return
    for blk in blocks:
        # an instance attribute: nn.Module.__call__ (and FSDP's hooks around it) run it
        blk.forward = functools.partial(_checkpointed_forward, blk.forward, mode == "selective")


def shard_model(
    model: nn.Module, *, param_dtype: Optional[str] = None, checkpointing: str = "none", mesh=None
) -> nn.Module:
    """Checkpointing, ``fully_shard`` per block and on the root, forward methods registered (see
    the module docstring). Needs an initialised process group; returns ``model`` (changed in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        raise ValueError(
            "train.strategy 'fsdp' needs a process group: run under torchrun "
            "(torchrun --nproc-per-node N -m dcal.train ...)"
        )
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"train.fsdp_param_dtype must be one of {tuple(PARAM_DTYPES)}, got {param_dtype!r}")
    blocks = blocks_of(model)
    if not blocks:
        raise ValueError(
            f"train.strategy 'fsdp': {type(model).__name__} has no blocks to shard (define "
            "fsdp_blocks() or keep the blocks in an nn.ModuleList)"
        )
    with torch.no_grad():  # fully_shard keeps each process's own values: start from rank 0's, as DDP does
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)
    apply_checkpointing(blocks, checkpointing)
    kw: Dict[str, Any] = {}
    if mesh is not None:
        kw["mesh"] = mesh
    if PARAM_DTYPES[param_dtype] is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
    for blk in blocks:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    for name in getattr(model, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(model, name)
    return model


def gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's ``no_sync``: reduce-scatter gradients only on the last micro-batch of a group."""
    model.set_requires_gradient_sync(sync)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over sharded gradients returns a DTensor; the global norm as a tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ----------------------------------------------------------------------------- checkpoints


def _shard_dir(pt_path: str) -> str:
    return pt_path[: -len(".pt")] + ".dcp" if pt_path.endswith(".pt") else pt_path + ".dcp"


def _model_optim_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def save_checkpoint(
    ckpts, state: Dict[str, Any], model: nn.Module, optimizer, step: int, is_best: bool, is_main: bool
) -> Optional[str]:
    """Every process: the sharded model and optimiser into ``step-<N>.dcp``; rank 0: the rest of
    ``state`` into ``step-<N>.pt`` (atomically, after the shards), ``best`` as copies, rotation.
    Returns the ``.pt`` path on rank 0."""
    import torch.distributed.checkpoint as dcp

    from dcal.train import checkpoint as ckpt

    pt = ckpts.path(step)
    final = _shard_dir(pt)
    tmp = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    dcp.save(_model_optim_state(model, optimizer), checkpoint_id=tmp)
    dist.barrier()
    path = None
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        rest["sharded"] = os.path.basename(final)
        ckpt.atomic_save(rest, pt)
        if is_best:
            best_dir = _shard_dir(ckpts.best_path)
            tmp_best = best_dir + ".tmp"
            shutil.rmtree(tmp_best, ignore_errors=True)
            shutil.copytree(final, tmp_best)
            shutil.rmtree(best_dir, ignore_errors=True)
            os.replace(tmp_best, best_dir)
            ckpt.atomic_save({**rest, "sharded": os.path.basename(best_dir)}, ckpts.best_path)
        for old in ckpts.list()[: -ckpts.keep_last]:
            os.remove(old)
        kept = {_shard_dir(p) for p in ckpts.list()} | {best_dir if is_best else _shard_dir(ckpts.best_path)}
        for name in os.listdir(ckpts.dir):
            full = os.path.join(ckpts.dir, name)
            if name.endswith(".dcp") and os.path.isdir(full) and full not in kept:
                shutil.rmtree(full, ignore_errors=True)
        path = pt
    dist.barrier()
    return path


def load_checkpoint(path: str, state: Dict[str, Any], model: nn.Module, optimizer) -> None:
    """Every process: the model and optimiser of the sharded checkpoint ``path`` (a ``.pt``
    written by :func:`save_checkpoint`; ``state`` its content)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    shards = os.path.join(os.path.dirname(os.path.abspath(path)), state["sharded"])
    if not os.path.isdir(shards):
        raise ValueError(f"checkpoint {path!r} names the shard directory {shards!r}, which does not exist")
    sd = _model_optim_state(model, optimizer)
    dcp.load(sd, checkpoint_id=shards)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
