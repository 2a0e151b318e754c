"""N-way K-shot Q-query episodes over any labelled dataset.

:class:`Episodes` turns a dataset of ``(image, label)`` samples into a dataset of episodes: item
``i`` of epoch ``e`` draws ``n_way`` classes and, from each, ``k_shot + q_query`` distinct samples,
as a function of ``(seed, epoch, i)`` only (so resume and DDP see the same episodes). An item is
``(x [N*(K+Q), ...], y [N*(K+Q)])`` with episode labels 0..N-1: first the support set (class 0's
K samples, class 1's, ...), then the query set in the same order. A batch of E episodes collates
to ``[E, N*(K+Q), ...]``, the layout :class:`dcal.train.coupled.PrototypicalLoss` reads.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from dcal.train.data import EpochDataset, sample_rng, set_epoch


def dataset_labels(dataset) -> List[int]:
    """The label of every sample: ``dataset.labels`` or ``dataset.targets`` when present
    (torchvision, :class:`dcal.train.data.ImageList` samples), else read sample by sample."""
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return [int(v) for v in getattr(dataset, attr)]
    if hasattr(dataset, "samples"):
        return [int(s[1]) for s in dataset.samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


class Episodes(EpochDataset):
    """``episodes`` episodes per epoch of ``n_way`` classes x (``k_shot`` support + ``q_query``
    query) samples of ``dataset``. Raises ValueError at construction when the dataset cannot
    supply them (fewer than ``n_way`` classes, or no class of ``k_shot + q_query`` samples)."""

    def __init__(
        self,
        dataset,
        n_way: int,
        k_shot: int,
        q_query: int,
        episodes: int,
        seed: int = 0,
        labels: Optional[Sequence[int]] = None,
        fixed: bool = False,
    ):
        for name, v in (("n_way", n_way), ("k_shot", k_shot), ("q_query", q_query), ("episodes", episodes)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        labels = list(labels) if labels is not None else dataset_labels(dataset)
        if len(labels) != len(dataset):
            raise ValueError(f"labels: {len(labels)} labels for a dataset of {len(dataset)} samples")
        by_class: Dict[int, List[int]] = {}
        for i, c in enumerate(labels):
            by_class.setdefault(c, []).append(i)
        need = k_shot + q_query
        if len(by_class) < n_way:
            raise ValueError(f"n_way ({n_way}) exceeds the number of classes in the dataset ({len(by_class)})")
        smallest = min(by_class, key=lambda c: len(by_class[c]))
        if len(by_class[smallest]) < need:
            raise ValueError(
                f"k_shot + q_query = {k_shot} + {q_query} = {need} samples per class, but class "
                f"{smallest} holds only {len(by_class[smallest])}; lower k_shot or q_query"
            )
        self.dataset, self.n_way, self.k_shot, self.q_query = dataset, n_way, k_shot, q_query
        self.size, self.seed, self.fixed = int(episodes), seed, fixed
        self.classes = sorted(by_class)
        self.by_class = {c: torch.tensor(v) for c, v in by_class.items()}

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_epoch(self.dataset, epoch)

    def __len__(self) -> int:
        return self.size

    def indices(self, index: int) -> Tensor:
        """Dataset indices of episode ``index``: [N, K+Q] (row j: class j's support then queries)."""
        g = sample_rng(self.seed + 7, 0 if self.fixed else self.epoch, index)
        picked = torch.randperm(len(self.classes), generator=g)[: self.n_way]
        rows = []
        for j in picked.tolist():
            pool = self.by_class[self.classes[j]]
            rows.append(pool[torch.randperm(len(pool), generator=g)[: self.k_shot + self.q_query]])
        return torch.stack(rows)

    def __getitem__(self, index: int):
        idx = self.indices(index)
        K = self.k_shot
        order = torch.cat([idx[:, :K].reshape(-1), idx[:, K:].reshape(-1)])
        labels = torch.cat(
            [torch.arange(self.n_way).repeat_interleave(K), torch.arange(self.n_way).repeat_interleave(self.q_query)]
        )
        xs = [self.dataset[int(i)][0] for i in order]
        return torch.stack(xs), labels
