"""DCAL ViT (docs/contract.md, Models): a ViT with self-attention (SA), global-local cross-attention (GLCA)
and pair-wise cross-attention (PWCA), all attention through :mod:`dcal.ops` / :mod:`dcal.nn`.

Training forward (ablation "full") on a batch x, with L = depth blocks::

    h_0 = embed(x)                          SA:   h_l = block_l(h_{l-1})              l = 1..L
    rollout r = CLS row of S_L ... S_1      GLCA: g = glca_block(h_{L-1}, queries = CLS + top R of r)
    perm: a random derangement of the batch PWCA: p_l = block_l(p_{l-1}, pair = h_{l-1}[perm]),  p_0 = h_0

GLCA sits beside the last SA block (the paper's GLCA at layer i uses the rollout up to and
including layer i and the query/key embeddings entering it): its input is h_{L-1}, the tokens
entering the last SA block, and its queries are chosen by the rollout of all L SA blocks. Its
keys/values are all tokens of h_{L-1}. With one GLCA block the CLS output depends only on the CLS
query, so the GLCA head reads the mean of all its 1 + R outputs (normed): the chosen local
queries then shape the GLCA logits and receive gradient.
PWCA runs the same blocks (shared weights) on the target tokens; at block l the keys/values are
those of the target and of the paired image's SA hidden state h_{l-1}[perm], i.e. the pair goes
through the same SA blocks, as in the paper. The pair is another image of the batch (no image
is paired with itself when B > 1); its hidden states are not detached, so the PWCA loss also
reaches the SA stream of the paired image. The pair's keys/values at block l are therefore those
the SA pass computed for h_{l-1} (same LayerNorm, same qkv weights): PWCA takes them from the SA
pass (gathered by perm) instead of projecting h_{l-1}[perm] again, and backward re-gathers them
instead of keeping the copies (docs/performance-cpu.md, the training step).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dcal import ops
from dcal.nn.pwca import PWCAAttention

ABLATIONS = {"sa": ("sa",), "sa_glca": ("sa", "glca"), "full": ("sa", "glca", "pwca")}


@dataclass
class DCALConfig:
    """DCAL ViT hyper-parameters; the defaults are ViT-B/16 at 448 px for CUB-200 (785 tokens).

    glca_ratio: share of patches GLCA keeps as local queries (R = ceil(ratio * patches); 0.1 for
      FGVC, 0.3 for Re-ID). ablation: "sa" (plain ViT), "sa_glca", "full" (+ PWCA in training).
    logvar_clamp: range of the learnable log-variances s_b of the uncertainty-weighted loss
      sum_b exp(-s_b) CE_b + s_b. Unclamped, s_b runs to -inf as a branch memorises its batches
      (CE_b -> 0); [-3, 3] keeps every branch weight exp(-s_b) within [0.05, 20].
    rollout_residual: the identity share of each rollout factor (0.5 in the paper).
    backend: passed to every dcal op (None: automatic); "sdpa" has no rollout, which then
      uses the automatic chain.
    grad_checkpointing: recompute each whole block in backward (least memory, most time).
    checkpoint_mlp: selective checkpointing of each block's MLP: its matmul outputs are kept, its
      LayerNorm and GELU are recomputed in backward (two elementwise passes); saves the GELU's
      output and the LayerNorm's, 18 MiB per block and pass at ViT-B/16, 448 px, batch 2 (fp32).
      Same loss and gradients (bitwise); about 10% more CPU time per step. Ignored under
      grad_checkpointing, which recomputes the whole block.
    """

    img_size: int = 448
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 200
    glca_ratio: float = 0.1
    ablation: str = "full"
    drop_path_rate: float = 0.1
    backend: Optional[str] = None
    grad_checkpointing: bool = False
    checkpoint_mlp: bool = False
    logvar_clamp: Tuple[float, float] = (-3.0, 3.0)
    rollout_residual: float = 0.5

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {tuple(ABLATIONS)}, got {self.ablation!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 < self.glca_ratio <= 1.0:
            raise ValueError(f"glca_ratio must be in (0, 1], got {self.glca_ratio}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not a backend; expected one of {ops.BACKENDS} or None")
        lo, hi = self.logvar_clamp
        if not lo < hi:
            raise ValueError(f"logvar_clamp must be (low, high) with low < high, got {self.logvar_clamp}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_local_queries(self) -> int:
        return math.ceil(self.glca_ratio * self.num_patches)

    @property
    def branches(self) -> Tuple[str, ...]:
        return ABLATIONS[self.ablation]


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample, rescaling the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _save_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing policy of the MLP: keep the matmul outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
_MLP_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)


class _RemakeSaved(torch.autograd.graph.saved_tensors_hooks):
    """Within the context, a tensor saved for backward that lives in the storage of one of the given
    tensors is saved as the recipe that made it, and made again (bitwise the same: a gather of
    tensors backward keeps anyway) when backward reads it. ``made``: (tensor, remake) pairs, remake()
    returning a tensor of the same storage layout. The hooks hold no reference to the tensors."""

    def __init__(self, made):
        recipes = {t.untyped_storage()._cdata: (remake, t.untyped_storage().nbytes()) for t, remake in made}

        def pack(t):
            st = t.untyped_storage()
            hit = recipes.get(st._cdata)
            if hit is None or hit[1] != st.nbytes():
                # detached: a saved output kept with its autograd history would form a cycle
                # (node -> saved output -> node) that outlives a node backward never reaches
                return t.detach()
            return (hit[0], t.shape, t.stride(), t.storage_offset())

        def unpack(p):
            if isinstance(p, Tensor):
                return p
            remake, shape, stride, offset = p
            return remake().as_strided(shape, stride, offset)

        super().__init__(pack, unpack)


def _gather_batch(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` for t [B, H, N, D]: gathered in [B, N, H, D] memory order (the order of the keys
    and values of a qkv projection), returned as the [B, H, N, D] view."""
    return t.transpose(1, 2).index_select(0, index).transpose(1, 2)


class Block(nn.Module):
    """timm's pre-norm ViT block (same parameter names); attention can be SA, PWCA or GLCA.

    ``forward(x, pair=None, return_rollout=False, query_index=None, *, pair_kv=None, pair_index=None,
    return_kv=False, recompute=True)``: ``pair_kv`` (k, v) are keys/values of the SA pass (``return_kv``
    gives them) and ``pair_index`` [B] picks the pair of each sample: PWCA over k[pair_index],
    v[pair_index] without projecting the pair again. The gathered copies are not kept for backward
    (made again from k and v, which the SA pass keeps anyway). With ``checkpoint_mlp`` the MLP keeps
    only its matmul outputs and recomputes LayerNorm and GELU in backward. ``recompute=False``
    (inside a whole-block checkpoint, which recomputes everything anyway) turns both off.
    Returns x, or (x, rollout stats) / (x, (k, v)) / (x, stats, (k, v)) as asked.
    """

    def __init__(self, c: DCALConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn = PWCAAttention(c.embed_dim, c.num_heads, qkv_bias=c.qkv_bias, backend=c.backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mlp = Mlp(c.embed_dim, int(c.embed_dim * c.mlp_ratio))
        self.drop_path2 = DropPath(drop_path)
        self.checkpoint_mlp = c.checkpoint_mlp

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))

    def forward(
        self,
        x,
        pair=None,
        return_rollout=False,
        query_index=None,
        *,
        pair_kv=None,
        pair_index=None,
        return_kv=False,
        recompute=True,
    ):
        saving = recompute and torch.is_grad_enabled()
        hooks = contextlib.nullcontext()
        if pair_kv is not None and pair_index is not None:
            k, v = pair_kv
            pair_kv = (_gather_batch(k, pair_index), _gather_batch(v, pair_index))
            if saving:
                remake = lambda t: functools.partial(_gather_batch, t.detach(), pair_index)  # noqa: E731
                hooks = _RemakeSaved([(pair_kv[0], remake(k)), (pair_kv[1], remake(v))])
        with hooks:
            res = self.attn(
                self.norm1(x),
                pair=None if pair is None else self.norm1(pair),
                pair_kv=pair_kv,
                return_rollout=return_rollout,
                return_kv=return_kv,
                query_index=query_index,
            )
        y, extra = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if query_index is not None:
            x = x.gather(1, query_index[..., None].expand(-1, -1, x.shape[-1]))
        x = x + self.drop_path1(y)
        if self.checkpoint_mlp and saving:
            m = checkpoint(self._mlp_branch, x, use_reentrant=False, context_fn=_MLP_CONTEXT)
        else:
            m = self._mlp_branch(x)
        x = x + self.drop_path2(m)
        return (x,) + extra if extra else x


class PatchEmbed(nn.Module):
    def __init__(self, c: DCALConfig):
        super().__init__()
        self.proj = nn.Conv2d(c.in_chans, c.embed_dim, c.patch_size, stride=c.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, gh, gw] -> [B, N, C]


def derangement(n: int, device=None) -> Tensor:
    """A uniformly random permutation of range(n) without fixed points (identity for n == 1)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.int64, device=device)
    ar = torch.arange(n)
    while True:  # about e tries on average
        perm = torch.randperm(n)
        if not bool((perm == ar).any()):
            return perm.to(device)


class DCALViT(nn.Module):
    """DCAL on a ViT (see the module docstring). ``forward(x, perm=None)`` with x [B, C, H, W]:

    - training: dict of logits of the ablation's branches, keys among "sa", "glca", "pwca";
      ``perm`` (int64 [B]) fixes the PWCA pairing, else a fresh random derangement per call.
    - eval: class probabilities softmax(sa) + softmax(glca) (softmax(sa) for ablation "sa"),
      each row summing to 2 (or 1).
    """

    def __init__(self, config: DCALConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        dpr = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()  # also under a meta device context
        self.blocks = nn.ModuleList(Block(c, p) for p in dpr)
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        if "glca" in c.branches:
            self.glca_block = Block(c, dpr[-1])
            self.glca_norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
            self.glca_head = nn.Linear(c.embed_dim, c.num_classes)
        # One branch needs no weighting: plain cross-entropy.
        self.loss_weights = nn.Parameter(torch.zeros(len(c.branches))) if len(c.branches) > 1 else None
        self.grad_checkpointing = c.grad_checkpointing
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # FSDP2 (dcal.train.distributed): the units sharded one by one, and the methods besides
    # forward that read parameters (registered with register_fsdp_forward_method, so a call
    # outside forward gathers the sharded parameters first).
    fsdp_forward_methods = ("loss",)

    def fsdp_blocks(self) -> list:
        """The blocks FSDP2 shards one by one: the SA blocks (shared by PWCA) and the GLCA block."""
        return list(self.blocks) + ([self.glca_block] if hasattr(self, "glca_block") else [])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (per-block ``torch.utils.checkpoint``)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"} | ({"loss_weights"} if self.loss_weights is not None else set())

    def load_npz(self, path: str) -> None:
        """Load the JAX ``ViT-B_16.npz`` release (see :func:`dcal.models.vit_npz.load_vit_npz`)."""
        from dcal.models.vit_npz import load_vit_npz

        load_vit_npz(self, path)

    def load_timm(self, source, load_head=None) -> dict:
        """Load a timm ViT checkpoint: a state dict, or a ``.safetensors`` / ``.pth`` file, any
        image size (see :func:`dcal.models.vit_timm.load_timm_vit`)."""
        from dcal.models.vit_timm import load_timm_vit

        return load_timm_vit(self, source, load_head=load_head)

    def load_pretrained(self, source, load_head=None):
        """``load_npz`` for a JAX ``.npz`` release, a Hugging Face ViT folder (``config.json`` +
        ``model.safetensors``, see :mod:`dcal.models.vit_hf`), ``load_timm`` for anything else."""
        if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".npz"):
            return self.load_npz(source)
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            from dcal.models.vit_hf import read_hf_vit

            sd, skipped, _ = read_hf_vit(os.fspath(source))
            report = self.load_timm(sd, load_head=load_head)
            report["skipped"] = sorted(report["skipped"] + skipped)
            return report
        return self.load_timm(source, load_head=load_head)

    # ------------------------------------------------------------------------- forward

    def _block(self, blk: Block, x, **kw):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False, recompute=False, **kw)
        return blk(x, **kw)

    def embed(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"x must be [B, {c.in_chans}, {c.img_size}, {c.img_size}], got {tuple(x.shape)}")
        t = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed

    def glca_index(self, stats) -> Tensor:
        """[B, 1 + R] token indices: CLS, then the R patches of highest rollout (descending)."""
        qs, ks, lses = (list(None if t is None else t.detach() for t in z) for z in zip(*stats))
        if any(t is None for t in lses):  # attention dropout ran on SDPA, which keeps no lse
            lses = None
        backend = None if self.config.backend == "sdpa" else self.config.backend
        r = ops.attention_rollout(
            qs, ks, lses=lses, scale=self.blocks[0].attn.scale, residual=self.config.rollout_residual, backend=backend
        )  # [B, N]
        top = r[:, 1:].topk(self.config.num_local_queries, dim=1).indices + 1
        return torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)

    def forward(self, x: Tensor, perm: Optional[Tensor] = None):
        branches = self.config.branches
        h = h0 = self.embed(x)
        pwca = self.training and "pwca" in branches
        glca = "glca" in branches
        if pwca and perm is not None:
            B = x.shape[0]
            if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (B,):
                got = f"{perm.dtype} {tuple(perm.shape)}" if isinstance(perm, Tensor) else type(perm).__name__
                raise ValueError(f"perm must be an int64 tensor [B] = [{B}] (the pair of each sample), got {got}")
            if B and (perm.min() < 0 or perm.max() >= B):
                raise ValueError(f"perm values must lie in [0, {B})")
        # The SA pass hands on the rollout statistics (GLCA) and its keys/values (PWCA pairs with
        # them): views of the qkv projection it keeps for backward anyway.
        stats, kvs = [], []
        h_last = h  # the tokens entering the last SA block (GLCA's input)
        for blk in self.blocks:
            h_last = h
            res = self._block(blk, h, return_rollout=glca, return_kv=pwca)
            if not (glca or pwca):
                h = res
                continue
            h, extra = res[0], list(res[1:])
            if glca:
                stats.append(extra.pop(0))
            if pwca:
                kvs.append(extra.pop(0))
        out = {"sa": self.head(self.norm(h)[:, 0])}
        if glca:
            g = self._block(self.glca_block, h_last, query_index=self.glca_index(stats))
            out["glca"] = self.glca_head(self.glca_norm(g).mean(dim=1))
        if pwca:
            perm = derangement(x.shape[0], x.device) if perm is None else perm
            p = h0
            for blk, kv in zip(self.blocks, kvs):
                # PWCA at block l: keys/values of the pair's h_{l-1} = those of its SA pass
                p = self._block(blk, p, pair_kv=kv, pair_index=perm)
            out["pwca"] = self.head(self.norm(p)[:, 0])
        if self.training:
            return out
        return sum(o.softmax(dim=-1) for o in out.values())

    def loss(self, outputs: Dict[str, Tensor], target: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """FairMOT uncertainty weighting: ``sum_b exp(-s_b) * CE_b + s_b`` over the branches in
        ``outputs`` (s_b = ``loss_weights``, kept within ``config.logvar_clamp``; plain CE for
        ablation "sa"). Returns (loss, parts) with parts ``ce_<b>`` and ``logvar_<b>`` detached."""
        if not isinstance(outputs, dict):
            raise TypeError("outputs must be the dict of logits returned by forward() in training mode")
        names = [b for b in self.config.branches if b in outputs]
        if not names:
            raise ValueError(f"outputs has none of the branches {self.config.branches}")
        parts, total = {}, 0.0
        if self.loss_weights is not None:
            # Projected, not only clamped in the loss: a stored value outside the range would get
            # zero gradient through clamp and stay stuck there. Written only when out of range
            # (after an optimiser step), so graphs of earlier micro-batches stay valid.
            lo, hi = self.config.logvar_clamp
            if bool(((self.loss_weights < lo) | (self.loss_weights > hi)).any()):
                with torch.no_grad():
                    self.loss_weights.clamp_(lo, hi)
            s = self.loss_weights.clamp(lo, hi)
        for name in names:
            ce = F.cross_entropy(outputs[name], target)
            parts[f"ce_{name}"] = ce.detach()
            if self.loss_weights is None:
                total = total + ce
                continue
            sb = s[self.config.branches.index(name)]
            total = total + torch.exp(-sb) * ce + sb
            parts[f"logvar_{name}"] = sb.detach()
        return total, parts
