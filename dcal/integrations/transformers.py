"""Hugging Face transformers on dcal's fused ops (``pip install dcal[hf]``, transformers >= 5).

Importing this module runs :func:`register`, which adds ``"dcal"`` to transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask
function, transformers' SDPA mask: ``None`` when nothing needs masking, else a boolean mask).
Then::

    model = ViTForImageClassification(config)               # or from_pretrained(...,
    model.set_attn_implementation("dcal")                   #   attn_implementation="dcal")
    logits = model(pixel_values).logits                     # fused: dcal.ops.multi_kv_attention

Every model whose attention dispatches through ``ALL_ATTENTION_FUNCTIONS`` takes it (ViT, DeiT,
Dinov2, CLIP, SigLIP, ...). What runs where (:func:`dcal_attention_forward`):

- no mask, no attention dropout: the fused op (:func:`dcal.ops.multi_kv_attention`), memory
  linear in the tokens, forward and backward; ``dcal_backend=`` picks its backend.
- a mask (padding, or a causal text tower such as CLIP's: transformers then passes no mask and
  ``is_causal=True``), or attention dropout in training: PyTorch's
  ``F.scaled_dot_product_attention`` with that mask / causal flag / dropout, as the ``"sdpa"``
  implementation runs it. The fused kernels take no mask and never hold the probabilities.
- ``output_attentions=True``: the maps are what is asked for, so that call materialises them
  (the ``"eager"`` implementation's math; fp64 inputs keep an fp64 softmax) and returns them.
- ``softcap``, ``sliding_window``, attention sinks (``s_aux``) and ``position_bias``: refused with
  a ``NotImplementedError`` (use ``"sdpa"`` or ``"eager"`` for such models).

Keyword arguments of ``model(...)`` (transformers >= 5 hands them to every attention call):

- ``dcal_pair=perm``: a 1-D integer tensor of length B. Every attention call becomes PWCA (DCAL's
  pair-wise cross-attention): the queries of image b attend over the keys/values of image b and
  of image ``perm[b]`` (``multi_kv_attention(q, [(k, v), (k[perm], v[perm])])``), fused, in the
  same layer of the same forward. Refused with a mask or causal attention.
- ``dcal_rollout=True`` (inside ``with collect_rollout() as r:``) or ``dcal_rollout=r`` (a
  :class:`RolloutCollector`): every attention call of the forward records its q, k and
  logsumexp; ``r.rollout`` is then :func:`dcal.ops.attention_rollout` of those blocks, [B, N]
  fp32, computed without any attention map. Refused with a mask, causal attention or
  ``dcal_pair``.
- ``dcal_backend="cpp" | "triton" | "sdpa" | "reference"``: the fused op's backend (default: the
  first of the chain that can run, :func:`dcal.ops.explain`).

Some attention modules do not hand ``model(...)``'s keyword arguments on to the attention function
(in transformers 5.24: SigLIP's and SigLIP2's ``SiglipAttention``), so the keywords above never
reach it there. For those, and wherever a context is handier, ``with attention_options(dcal_pair=perm,
dcal_rollout=collector): model(...)`` sets the same options for every ``"dcal"`` call inside (a
keyword argument that does arrive takes precedence). ``output_attentions=True`` is read from
transformers' output-capturing state as well, so it is honoured for such modules too.

HF DiNAT (whose own path needs NATTEN <= 0.17.4) runs on dcal through :func:`load_dinat` and
:func:`use_dcal_neighborhood` (see :mod:`dcal.integrations.dinat`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dcal import ops

try:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"dcal.integrations.transformers needs transformers >= 5 (pip install 'dcal[hf]'); importing it failed: {e}"
    ) from e

from dcal.integrations.dinat import DcalNeighborhoodAttention, load_dinat, use_dcal_neighborhood  # noqa: E402

NAME = "dcal"

__all__ = [
    "NAME",
    "register",
    "dcal_attention_forward",
    "dcal_mask",
    "RolloutCollector",
    "collect_rollout",
    "attention_options",
    "load_dinat",
    "use_dcal_neighborhood",
    "DcalNeighborhoodAttention",
]

# keyword arguments that the fused path cannot honour: refused, never ignored
_REFUSED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias")


# ----------------------------------------------------------------------------- rollout


class RolloutCollector:
    """Collects q, k and the logsumexp of every ``"dcal"`` attention call of a forward run with
    ``dcal_rollout=`` this collector (or ``True`` inside :func:`collect_rollout`), and gives the
    attention rollout of those blocks without any attention map.

    Records are grouped by attention stack (the ``config`` object of the attention modules:
    CLIP's vision and text towers are two stacks), in call order. :attr:`rollout` is the rollout
    of the only stack (an error if there are several); :attr:`rollouts` maps each stack's config
    class name to its rollout. ``residual`` is that of :func:`dcal.ops.attention_rollout` (0.5:
    ``S_l = 0.5 * mean_h A_l + 0.5 * I``). A module that records twice into one collector (a second
    forward) raises: use a fresh collector per forward or :meth:`clear`. Calls re-run inside a
    backward pass (activation checkpointing) do not record.
    """

    def __init__(self, residual: float = 0.5):
        if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
            raise ValueError(f"residual must be a float in [0, 1], got {residual!r}")
        self.residual = float(residual)
        self.clear()

    def clear(self) -> None:
        self._stacks = {}  # id(config) -> {"name", "records": [(q, k, lse, scale)], "modules": set}

    def _record(self, module, q: Tensor, k: Tensor, lse: Optional[Tensor], scale: float) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # re-run of the forward inside backward (activation checkpointing)
        config = getattr(module, "config", None)
        key = id(config) if config is not None else ("shape", tuple(q.shape))
        stack = self._stacks.setdefault(
            key,
            {
                "name": type(config).__name__ if config is not None else "attention",
                "records": [],
                "modules": set(),
                "config": config,
            },
        )
        if id(module) in stack["modules"]:
            raise RuntimeError(
                f"dcal_rollout: the attention module {type(module).__name__} already recorded into this "
                f"RolloutCollector (a second forward?); use a fresh collector per forward or call clear()"
            )
        stack["modules"].add(id(module))
        stack["records"].append((q.detach(), k.detach(), None if lse is None else lse.detach(), float(scale)))

    def __len__(self) -> int:
        return sum(len(s["records"]) for s in self._stacks.values())

    def _rollout_of(self, stack) -> Tensor:
        recs = stack["records"]
        scales = {r[3] for r in recs}
        if len(scales) != 1:
            raise ValueError(
                f"dcal_rollout: the blocks of {stack['name']} use different scales {sorted(scales)}; "
                f"the rollout takes one"
            )
        lses = [r[2] for r in recs]
        return ops.attention_rollout(
            [r[0] for r in recs],
            [r[1] for r in recs],
            scale=scales.pop(),
            lses=None if any(l is None for l in lses) else lses,
            residual=self.residual,
        )

    @property
    def rollouts(self) -> dict:
        """``{config class name (suffixed with #i when repeated): rollout [B, N]}``, one per stack."""
        out = {}
        for stack in self._stacks.values():
            name, i = stack["name"], 1
            while name in out:
                i += 1
                name = f"{stack['name']}#{i}"
            out[name] = self._rollout_of(stack)
        return out

    @property
    def rollout(self) -> Tensor:
        """The CLS row of the attention rollout, [B, N] fp32 (the only recorded stack)."""
        if not self._stacks:
            raise RuntimeError(
                "dcal_rollout: nothing was recorded; run the model with dcal_rollout=True inside "
                "collect_rollout() (or dcal_rollout=collector) and attn_implementation='dcal'"
            )
        if len(self._stacks) > 1:
            names = [s["name"] for s in self._stacks.values()]
            raise RuntimeError(
                f"dcal_rollout: records of {len(names)} attention stacks ({', '.join(names)}); "
                f"read collector.rollouts (a dict) instead of collector.rollout"
            )
        return self._rollout_of(next(iter(self._stacks.values())))


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("dcal_rollout_collector", default=None)
_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("dcal_attention_options", default=None)
_OPTION_NAMES = ("dcal_pair", "dcal_rollout", "dcal_backend")


@contextlib.contextmanager
def attention_options(**options):
    """``with attention_options(dcal_pair=perm, dcal_rollout=collector, dcal_backend=None):`` sets
    the keyword options of every ``"dcal"`` attention call inside, for models whose attention
    modules do not pass ``model(...)``'s keyword arguments on (SigLIP in transformers 5.24).
    Options given as keyword arguments of ``model(...)`` that reach the call take precedence."""
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"attention_options: unknown option(s) {unknown}; expected {list(_OPTION_NAMES)}")
    outer = _OPTIONS.get() or {}
    token = _OPTIONS.set({**outer, **options})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def _capturing_attentions() -> bool:
    """Whether transformers' output capturing collects attention maps for the running forward
    (``output_attentions=True``), also when the kwarg did not reach the attention function."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


@contextlib.contextmanager
def collect_rollout(residual: float = 0.5):
    """``with collect_rollout() as r: model(x, dcal_rollout=True)``, then ``r.rollout`` [B, N]."""
    collector = RolloutCollector(residual)
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


def _collector(value) -> Optional[RolloutCollector]:
    if value is None or value is False:
        return None
    if isinstance(value, RolloutCollector):
        return value
    if value is True:
        active = _ACTIVE.get()
        if active is None:
            raise ValueError(
                "dcal_rollout=True needs a collector: `with dcal.integrations.transformers."
                "collect_rollout() as r: model(..., dcal_rollout=True)`, then r.rollout; or pass "
                "dcal_rollout=RolloutCollector()"
            )
        return active
    raise ValueError(f"dcal_rollout must be True, False, None or a RolloutCollector, got {type(value).__name__}")


# ----------------------------------------------------------------------------- attention


def _pair_index(pair, batch: int, device) -> Tensor:
    if (
        not isinstance(pair, Tensor)
        or pair.dim() != 1
        or pair.dtype.is_floating_point
        or pair.dtype.is_complex
        or pair.dtype == torch.bool
    ):
        what = f"a {pair.dim()}-D {pair.dtype} tensor" if isinstance(pair, Tensor) else type(pair).__name__
        raise ValueError(
            f"dcal_pair must be a 1-D integer tensor of length B={batch} (the pair of each image, e.g. "
            f"a permutation of the batch), got {what}"
        )
    if pair.shape[0] != batch:
        raise ValueError(f"dcal_pair has length {pair.shape[0]}; expected the batch size B={batch}")
    if batch and (int(pair.min()) < 0 or int(pair.max()) >= batch):
        raise ValueError(f"dcal_pair holds indices outside [0, {batch}): min {int(pair.min())}, max {int(pair.max())}")
    return pair.to(device=device, dtype=torch.long)


def _repeat_kv(t: Tensor, n: int) -> Tensor:
    if n == 1:
        return t
    B, H, S, D = t.shape
    return t[:, :, None].expand(B, H, n, S, D).reshape(B, H * n, S, D)


def _eager(query, key, value, attention_mask, scaling, dropout, training):
    """Materialising attention, the "eager" implementation's math (its fp32 softmax kept fp64 for fp64
    inputs); also returns the lse."""
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask
    # fp32 softmax for half precisions as in "eager"; fp64 stays fp64 ("eager" would round it to fp32)
    weights = F.softmax(logits, dim=-1, dtype=None if logits.dtype == torch.float64 else torch.float32)
    weights = weights.to(query.dtype)
    lse = torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value), weights, lse


def dcal_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers' attention-function signature: ``query``, ``key``, ``value`` [B, H, S, D]
    (key/value may have fewer heads: grouped-query attention repeats them), ``attention_mask``
    bool (True attends) or float (added) broadcastable to [B, H, Sq, Sk], or None. Returns
    ``(out [B, Sq, H, D], weights or None)``. See the module docstring for what runs where."""
    for name in _REFUSED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation='dcal' does not support {name}= (got {kwargs[name]!r} from "
                f"{type(module).__name__}); use attn_implementation='sdpa' or 'eager' for this model"
            )
    options = {**(_OPTIONS.get() or {}), **{n: kwargs[n] for n in _OPTION_NAMES if n in kwargs}}
    pair = options.get("dcal_pair")
    collector = _collector(options.get("dcal_rollout"))
    backend = options.get("dcal_backend")
    output_attentions = bool(kwargs.get("output_attentions", False)) or _capturing_attentions()
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"dcal attention expects query, key, value [B, H, S, D]; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    B, H, Sq, D = query.shape
    if key.shape[1] != H:
        if H % key.shape[1] != 0:
            raise ValueError(f"query has {H} heads, key {key.shape[1]}: not a grouped-query layout")
        key, value = _repeat_kv(key, H // key.shape[1]), _repeat_kv(value, H // value.shape[1])
    scale = D**-0.5 if scaling is None else float(scaling)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = bool(Sq > 1 and attention_mask is None and is_causal)
    if pair is not None:
        if attention_mask is not None or is_causal:
            raise ValueError(
                "dcal_pair (PWCA) with an attention mask or causal attention is not supported: the "
                "pair's keys have no place in the mask"
            )
        if collector is not None:
            raise ValueError(
                "dcal_rollout with dcal_pair is not supported: the rollout is defined on "
                "self-attention; run the self-attention forward for it"
            )
        idx = _pair_index(pair, B, query.device)
        if key.shape[0] != B:
            raise ValueError(f"dcal_pair needs keys with the batch of the queries ({B}), got {key.shape[0]}")
        segments = [(key, value), (key.index_select(0, idx), value.index_select(0, idx))]
    else:
        segments = [(key, value)]
    if is_causal and key.shape[2] > Sq:
        # as transformers' "sdpa": a causal prefill over a longer (empty static) cache sees its own keys
        key, value = key[:, :, :Sq], value[:, :, :Sq]
    if collector is not None and (attention_mask is not None or is_causal):
        raise ValueError(
            "dcal_rollout with an attention mask or causal attention is not supported: the rollout "
            "assumes full self-attention"
        )

    weights = None
    if output_attentions:
        k_all = torch.cat([s[0] for s in segments], dim=2) if len(segments) > 1 else key
        v_all = torch.cat([s[1] for s in segments], dim=2) if len(segments) > 1 else value
        mask = attention_mask
        if is_causal:
            mask = torch.ones(Sq, key.shape[2], dtype=torch.bool, device=query.device).tril()
        out, weights, lse = _eager(query, k_all, v_all, mask, scale, dropout, module.training)
    elif attention_mask is not None or is_causal or dropout > 0.0:
        k_all = torch.cat([s[0] for s in segments], dim=2) if len(segments) > 1 else key
        v_all = torch.cat([s[1] for s in segments], dim=2) if len(segments) > 1 else value
        out = F.scaled_dot_product_attention(
            query, k_all, v_all, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scale
        )
        lse = None  # attention_rollout recomputes it
    else:
        res = ops.multi_kv_attention(query, segments, scale=scale, return_lse=collector is not None, backend=backend)
        out, lse = res if collector is not None else (res, None)
    if collector is not None:
        collector._record(module, query, key, lse, scale)
    return out.transpose(1, 2).contiguous(), weights


def dcal_mask(*args, **kwargs):
    """The mask function registered for ``"dcal"``: transformers' SDPA mask (``None`` when nothing
    needs masking, so the fused path runs; else a boolean [B, 1, Sq, Sk] mask, True attends)."""
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Add ``"dcal"`` to transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    (global: every model of the process can then use ``attn_implementation="dcal"``). Idempotent;
    run on import of this module."""
    AttentionInterface.register(NAME, dcal_attention_forward)
    AttentionMaskInterface.register(NAME, dcal_mask)


register()
