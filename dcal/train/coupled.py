"""Losses that couple the samples of a batch, and their exact gradient accumulation.

A contrastive loss compares every sample with every other one of the batch (the negatives); an
episodic loss builds class prototypes from a support set and scores a query set against them.
Splitting such a batch into micro-batches and averaging per-micro-batch losses, the usual
accumulation, trains a different objective: each sample sees 1/m of its negatives, each
micro-episode its own partial prototypes. Here the loss of the whole batch is computed exactly
with an *embedding cache* (GradCache, Gao et al. 2021; open_clip ``--accum-freq``):

1. every micro-batch is run through the model without a graph; its outputs (the embeddings) are
   kept, and the RNG state before each micro-batch is saved;
2. the loss of the whole batch is computed from the cached outputs (under DDP: gathered from all
   processes with their gradient), and its gradient with respect to every cached output;
3. every micro-batch is run again with a graph, from the same RNG state (same dropout masks), and
   back-propagated with its slice of that gradient.

The parameter gradient is then exactly that of the whole-batch loss (up to the order of the
sums), while the activations held at any time are those of one micro-batch plus the outputs of
all. Models must be free of BatchNorm (its statistics would come from the micro-batch, not the
batch): :func:`check_model` refuses them.

The explicit interface: a loss is treated as coupled when, and only when, it is an instance of
:class:`CoupledLoss`; any other callable is a per-sample loss (a mean over its micro-batch).

Model outputs (a tensor, a tuple/list or a dict of tensors) follow one rule: a tensor with a
batch dimension (ndim >= 1) is per-sample, its first dimension the micro-batch's rows; a 0-d tensor
(a learnable temperature ``logit_scale.exp()``) is shared, taken from the first micro-batch and
given its whole gradient in the last re-run (so under DDP every parameter has a gradient when the
synchronising backward runs).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "CoupledLoss",
    "ClipLoss",
    "PrototypicalLoss",
    "ZeroShotAccuracy",
    "EpisodeAccuracy",
    "clip_loss",
    "vic_regulariser",
    "prototype_logits",
    "cached_backward",
    "check_model",
    "all_gather_with_grad",
]


# ----------------------------------------------------------------------------- the interface


class CoupledLoss(abc.ABC):
    """A loss over a whole batch that is not a mean of per-sample terms.

    The training loop (:class:`dcal.train.Trainer`) sees that a loss is an instance of this class
    and accumulates it exactly with :func:`cached_backward`. Subclasses define :meth:`batch_loss`
    and may override how inputs are laid out in rows, how rows are split into micro-batches and
    which batch shapes are refused.
    """

    #: gather the per-sample outputs of all processes (with gradient) before :meth:`batch_loss`,
    #: so the loss is over the global batch (contrastive negatives from every process)
    gather_across_ranks: bool = False

    def forward_model(self, model: nn.Module, inputs: Any) -> Any:
        """The model's outputs for one micro-batch of inputs (the rows of :meth:`rows`)."""
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)

    def rows(self, inputs: Any) -> Any:
        """The inputs laid out with one row per model input along dim 0 (default: as they are)."""
        return inputs

    def num_samples(self, target: Any) -> int:
        """The number of samples of a batch, for loss bookkeeping (its first dimension)."""
        return int(target.shape[0]) if isinstance(target, Tensor) else len(target)

    def chunks(self, n_rows: int, micro_batch: int) -> List[Tuple[int, int]]:
        """Row ranges ``[start, stop)`` of the micro-batches (default: consecutive, the last short)."""
        return [(s, min(s + micro_batch, n_rows)) for s in range(0, n_rows, micro_batch)]

    def check(self, *, batch: int, micro_batch: int, world: int = 1, dataset_size: Optional[int] = None) -> None:
        """Raise ValueError for a configuration this loss cannot train on, before any work.
        ``batch``: samples per optimiser step over all processes; ``micro_batch``: rows per
        forward; ``dataset_size``: samples per epoch (for the short last batch)."""
        if not (isinstance(micro_batch, int) and micro_batch >= 1):
            raise ValueError(f"micro_batch must be an integer >= 1 for a coupled loss, got {micro_batch!r}")

    @abc.abstractmethod
    def batch_loss(self, outputs: Any, target: Any) -> Tensor:
        """The loss of the whole batch from the outputs of all its rows (a scalar)."""

    def __call__(self, outputs: Any, target: Any) -> Tensor:
        return self.batch_loss(outputs, target)


# ----------------------------------------------------------------------------- contrastive


def clip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Optional[Tensor] = None
) -> Tensor:
    """CLIP's symmetric InfoNCE: the mean of the image->text and text->image cross entropies of
    ``logit_scale * image_features @ text_features.T`` (+ ``logit_bias``), pair i matching pair i.
    Features [B, D] (normalised by the model), ``logit_scale`` the (already exponentiated) 0-d
    temperature. Computed in fp32 at least."""
    dt = torch.promote_types(image_features.dtype, torch.float32)
    img, txt = image_features.to(dt), text_features.to(dt)
    logits = logit_scale.to(dt) * img @ txt.t()
    if logit_bias is not None:
        logits = logits + logit_bias.to(dt)
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _clip_parts(outputs: Any) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    if isinstance(outputs, dict):
        return (outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs.get("logit_bias"))
    if isinstance(outputs, (tuple, list)) and len(outputs) in (3, 4):
        return outputs[0], outputs[1], outputs[2], (outputs[3] if len(outputs) == 4 else None)
    raise ValueError(
        "a CLIP model must return (image_features, text_features, logit_scale[, logit_bias]) or "
        f"open_clip's dict; got {type(outputs).__name__}"
    )


class ClipLoss(CoupledLoss):
    """Symmetric InfoNCE of a CLIP-style dual encoder with a learnable temperature (the model's
    ``logit_scale``), over the global batch: negatives come from every micro-batch and, under
    DDP, every process. Inputs are ``(images, tokens)``; the model is called ``model(images,
    tokens)`` and returns ``(image_features, text_features, logit_scale.exp())`` like open_clip."""

    gather_across_ranks = True

    def check(self, *, batch: int, micro_batch: int, world: int = 1, dataset_size: Optional[int] = None) -> None:
        super().check(batch=batch, micro_batch=micro_batch, world=world, dataset_size=dataset_size)
        if batch < 2:
            raise ValueError(
                f"effective_batch must be >= 2 for a contrastive loss (a batch of {batch} has no negatives)"
            )
        if dataset_size is not None and world == 1 and dataset_size % batch == 1:
            raise ValueError(
                f"effective_batch: {dataset_size} samples in batches of {batch} leave a last batch of 1 "
                "sample, which has no negatives; change effective_batch or the dataset size"
            )

    def batch_loss(self, outputs: Any, target: Any = None) -> Tensor:
        img, txt, scale, bias = _clip_parts(outputs)
        if img.shape[0] < 2:
            raise ValueError(f"batch: a contrastive loss needs at least 2 samples, got {img.shape[0]}")
        return clip_loss(img, txt, scale, bias)


# ----------------------------------------------------------------------------- episodes


def prototype_logits(support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
    """Prototypical-network logits: minus the squared Euclidean distance of each query [Q, D] to
    each class prototype (the mean of its support embeddings [S, D]) -> [Q, n_way]."""
    protos = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    protos = protos.index_add(0, support_labels, support)
    counts = torch.bincount(support_labels, minlength=n_way).to(support.dtype)
    protos = protos / counts[:, None]
    return -(query.pow(2).sum(1, keepdim=True) - 2 * query @ protos.t() + protos.pow(2).sum(1)[None])


def vic_regulariser(z: Tensor, *, variance: float = 1.0, covariance: float = 0.04, eps: float = 1e-4) -> Tensor:
    """The variance and covariance terms of VICReg on embeddings [B, D]: ``variance`` x the mean
    hinge ``relu(1 - std_d)`` over dimensions (keeps every dimension spread over the batch) plus
    ``covariance`` x the sum of squared off-diagonal covariances / D (decorrelates dimensions)."""
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + eps)
    var_term = F.relu(1 - std).mean()
    cov = (z.t() @ z) / (z.shape[0] - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    cov_term = off.pow(2).sum() / z.shape[1]
    return variance * var_term + covariance * cov_term


class PrototypicalLoss(CoupledLoss):
    """Episodic loss of a prototypical network with a VIC regulariser.

    A batch holds ``E`` episodes: images ``[E, N*(K+Q), ...]`` with episode labels ``[E, N*(K+Q)]``
    (0..N-1), the ``N*K`` support rows first (see :class:`dcal.train.episodes.Episodes`). For each
    episode: prototypes from its whole support set, cross entropy of the query logits
    (:func:`prototype_logits`), plus ``vic_weight`` x (VICReg variance and covariance terms over
    all the episode's embeddings + ``invariance`` x the mean squared distance of each query
    to its class prototype / D, the invariance between views of one class). The batch loss is the
    mean over episodes.

    Micro-batches cut each episode's support set and query set separately; the micro-batch must
    divide the query set ``N*Q`` (so no micro-batch mixes support and query rows of unequal
    counts, and every query micro-batch is full).
    """

    def __init__(
        self,
        n_way: int,
        k_shot: int,
        q_query: int,
        vic_weight: float = 0.1,
        variance: float = 1.0,
        invariance: float = 1.0,
        covariance: float = 0.04,
    ):
        for name, v in (("n_way", n_way), ("k_shot", k_shot), ("q_query", q_query)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2 (an episode compares classes), got {n_way}")
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.vic_weight, self.variance, self.invariance, self.covariance = vic_weight, variance, invariance, covariance

    @property
    def support_size(self) -> int:
        return self.n_way * self.k_shot

    @property
    def query_size(self) -> int:
        return self.n_way * self.q_query

    @property
    def episode_size(self) -> int:
        return self.support_size + self.query_size

    def check(self, *, batch: int, micro_batch: int, world: int = 1, dataset_size: Optional[int] = None) -> None:
        super().check(batch=batch, micro_batch=micro_batch, world=world, dataset_size=dataset_size)
        if self.query_size % micro_batch:
            raise ValueError(
                f"micro_batch ({micro_batch}) must divide the episode's query set (n_way * q_query = "
                f"{self.n_way} * {self.q_query} = {self.query_size})"
            )

    def rows(self, inputs: Tensor) -> Tensor:
        if inputs.ndim < 2 or inputs.shape[1] != self.episode_size:
            raise ValueError(
                f"episodes must be [E, n_way*(k_shot+q_query) = {self.episode_size}, ...], got {tuple(inputs.shape)}"
            )
        return inputs.flatten(0, 1)

    def chunks(self, n_rows: int, micro_batch: int) -> List[Tuple[int, int]]:
        out, size = [], self.episode_size
        for e in range(0, n_rows, size):
            out += [
                (e + s, min(e + s + micro_batch, e + self.support_size))
                for s in range(0, self.support_size, micro_batch)
            ]
            out += [
                (e + self.support_size + s, e + self.support_size + s + micro_batch)
                for s in range(0, self.query_size, micro_batch)
            ]
        return out

    def episode_loss(self, z: Tensor, y: Tensor) -> Tensor:
        """Loss of one episode from its embeddings [N*(K+Q), D] and labels [N*(K+Q)]."""
        S = self.support_size
        dt = torch.promote_types(z.dtype, torch.float32)
        z = z.to(dt)
        logits = prototype_logits(z[:S], y[:S], z[S:], self.n_way)
        loss = F.cross_entropy(logits, y[S:])
        if self.vic_weight:
            # -logits of the query's own class: its squared distance to its prototype
            inv = -logits.gather(1, y[S:, None]).mean() / z.shape[1]
            reg = vic_regulariser(z, variance=self.variance, covariance=self.covariance) + self.invariance * inv
            loss = loss + self.vic_weight * reg
        return loss

    def batch_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        if not isinstance(outputs, Tensor) or outputs.ndim != 2:
            raise ValueError(f"a prototypical model must return embeddings [rows, D], got {type(outputs).__name__}")
        z = outputs.view(-1, self.episode_size, outputs.shape[-1])
        y = target.view(-1, self.episode_size)
        return torch.stack([self.episode_loss(z[e], y[e]) for e in range(z.shape[0])]).mean()

    @torch.no_grad()
    def accuracy(self, outputs: Tensor, target: Tensor) -> Tuple[float, int]:
        """(correct, count) of the queries of a batch of episodes, nearest prototype."""
        S = self.support_size
        z = outputs.view(-1, self.episode_size, outputs.shape[-1]).float()
        y = target.view(-1, self.episode_size)
        correct = 0.0
        for e in range(z.shape[0]):
            pred = prototype_logits(z[e, :S], y[e, :S], z[e, S:], self.n_way).argmax(1)
            correct += float((pred == y[e, S:]).sum())
        return correct, z.shape[0] * self.query_size


# ----------------------------------------------------------------------------- evaluation


class ZeroShotAccuracy:
    """``eval_fn`` of a CLIP model: classify each image of ``((images, tokens), labels)`` by
    its most similar class caption (``class_tokens`` [classes, L], label c <-> row c)."""

    def __init__(self, class_tokens: Tensor):
        self.class_tokens = class_tokens

    @torch.no_grad()
    def __call__(self, model: nn.Module, inputs: Any, target: Tensor) -> Tuple[float, int]:
        image = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        img, txt, _, _ = _clip_parts(model(image, self.class_tokens.to(image.device)))
        pred = (img.float() @ txt.float().t()).argmax(1)
        return float((pred == target).sum()), int(target.numel())


class EpisodeAccuracy:
    """``eval_fn`` of a prototypical model: query accuracy of a batch of episodes."""

    def __init__(self, loss: PrototypicalLoss):
        self.loss = loss

    @torch.no_grad()
    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor) -> Tuple[float, int]:
        return self.loss.accuracy(model(self.loss.rows(inputs)), target)


# ----------------------------------------------------------------------------- the cache


class _AllGather(torch.autograd.Function):
    """all_gather whose backward returns to each process the sum over processes of the gradient
    of its own slice (open_clip's ``gather_with_grad``), for any process-group backend."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenation over processes (rank order) of ``x`` [n, ...] (the same n everywhere)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def check_model(model: nn.Module) -> None:
    """Refuse models whose forward couples the rows of a micro-batch (BatchNorm in training):
    exact accumulation needs each row's output to depend on that row only."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"model: {name or type(model).__name__} is a {type(m).__name__}, whose statistics "
                "come from the micro-batch; exact accumulation of a coupled loss needs a model "
                "without BatchNorm (use GroupNorm or LayerNorm)"
            )


def split_batch(x: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a batch: every tensor of a (nested) tuple, list or dict is sliced."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, (list, tuple)):
        return type(x)(split_batch(v, start, stop) for v in x)
    if isinstance(x, dict):
        return {k: split_batch(v, start, stop) for k, v in x.items()}
    return x


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _leaves(out: Any, rows: int) -> Tuple[List[Tensor], Any, List[bool]]:
    leaves, spec = tree_flatten(out)
    per_row = []
    for t in leaves:
        if not isinstance(t, Tensor):
            raise ValueError(f"a coupled loss needs tensor outputs, the model returned a {type(t).__name__}")
        if t.ndim >= 1 and t.shape[0] != rows:
            raise ValueError(
                f"model output of shape {tuple(t.shape)} for a micro-batch of {rows} rows: per-sample "
                "outputs must have the rows as their first dimension (0-d outputs are shared)"
            )
        per_row.append(t.ndim >= 1)
    return leaves, spec, per_row


def cached_backward(
    model: nn.Module,
    loss: CoupledLoss,
    inputs: Any,
    target: Any,
    micro_batch: int,
    *,
    forward_model: Optional[nn.Module] = None,
    ddp: Optional[nn.Module] = None,
    amp_dtype: Optional[torch.dtype] = None,
    scale: Callable[[Tensor], Tensor] = lambda t: t,
    weight: float = 1.0,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Back-propagate ``weight * loss(model(all rows), target)`` into the parameters' ``.grad``
    (accumulating) with the embedding cache; returns the loss (detached).

    ``model`` runs the no-graph pass; ``forward_model`` (default ``model``; the DDP wrapper in
    distributed training) the re-runs, synchronising on the last one (``ddp.no_sync()`` before).
    ``amp_dtype``: autocast dtype of the forwards (the loss itself is computed in fp32 or above);
    ``scale``: applied to the loss before backward (``GradScaler.scale``).
    """
    forward_model = forward_model or model
    device = device or next(model.parameters()).device
    rows = loss.rows(inputs)
    first = tree_flatten(rows)[0][0]
    n = first.shape[0]
    spans = loss.chunks(n, micro_batch)
    pos = 0
    for s, e in spans:  # the slices of the gradient below assume consecutive, non-empty ranges
        if s != pos or e <= s:
            raise ValueError(f"{type(loss).__name__}.chunks must cover rows 0..{n} in consecutive ranges, got {spans}")
        pos = e
    if pos != n:
        raise ValueError(f"{type(loss).__name__}.chunks must cover rows 0..{n} in consecutive ranges, got {spans}")
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731

    # 1. outputs of every micro-batch, no graph; RNG state saved for the re-run
    states, cached, spec, per_row = [], [], None, None
    with torch.no_grad():
        for s, e in spans:
            states.append(_rng_state(device))
            with autocast():
                out = loss.forward_model(model, split_batch(rows, s, e))
            leaves, spec, per_row = _leaves(out, e - s)
            cached.append([t.detach() for t in leaves])
            del out, leaves

    # 2. the whole batch's loss from the cache, and its gradient w.r.t. every cached output
    def leaf(ts: Sequence[Tensor]) -> Tensor:
        t = torch.cat(list(ts)) if len(ts) > 1 else ts[0]
        dt = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else t.dtype
        return t.to(dt).requires_grad_(t.is_floating_point())

    full = [leaf([c[i] for c in cached]) if per_row[i] else leaf([cached[0][i]]) for i in range(len(per_row))]
    del cached
    used = full
    tgt = target
    if loss.gather_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        used = [all_gather_with_grad(t) if p else t for t, p in zip(full, per_row)]
        if isinstance(target, Tensor):
            parts = [torch.empty_like(target) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, target.contiguous())
            tgt = torch.cat(parts)
    value = loss.batch_loss(tree_unflatten(used, spec), tgt)
    wanted = [t for t in full if t.requires_grad]
    grads = torch.autograd.grad(scale(value * weight), wanted, allow_unused=True)
    grad_of = {id(t): g for t, g in zip(wanted, grads)}
    full_grads = [grad_of.get(id(t)) for t in full]
    del used, wanted, grads

    # 3. each micro-batch again, with a graph, from the same RNG state; backward of its slice
    after = _rng_state(device)
    last = len(spans) - 1
    for i, (s, e) in enumerate(spans):
        _set_rng_state(states[i], device)
        sync = contextlib.nullcontext() if (ddp is None or i == last) else ddp.no_sync()
        with sync:
            with autocast():
                out = loss.forward_model(forward_model, split_batch(rows, s, e))
            leaves, _, _ = _leaves(out, e - s)
            outs, gs = [], []
            for t, g, p in zip(leaves, full_grads, per_row):
                if not t.requires_grad:
                    continue
                if p:
                    g = g[s:e] if g is not None else None
                elif i != last:
                    g = None  # a shared output gets its whole gradient once, in the last re-run
                outs.append(t)
                gs.append(torch.zeros_like(t) if g is None else g.to(t.dtype))
            if outs:
                torch.autograd.backward(outs, gs)
            del out, leaves, outs, gs
    _set_rng_state(after, device)
    return value.detach()
