"""Embedding networks of prototypical (few-shot) learning: ``forward(images [B, C, H, W]) -> [B, D]``.

``ProtoNet(backbone="conv4")``: the Conv-4 of Snell et al. (four blocks of 3x3 conv, norm, ReLU,
2x2 max-pool) with GroupNorm in place of BatchNorm, so each image's embedding depends on that
image only (exact accumulation of an episode needs it; BatchNorm would take its statistics from
the micro-batch). ``backbone="resnet"``: a small ResNet of the same kind (two 3x3 convs with a
residual per stage). The episodic loss and its VIC regulariser are
:class:`dcal.train.coupled.PrototypicalLoss`.
"""

from __future__ import annotations

from torch import Tensor, nn


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.ReLU(), nn.MaxPool2d(2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), _norm(cout)
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.out = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.skip(x))


class ProtoNet(nn.Module):
    """Image -> embedding [B, D] (global average pool of the last stage, D = ``hidden`` x the
    widening of the last stage). ``depth`` stages of ``hidden`` channels (ResNet: doubling)."""

    def __init__(self, in_chans: int = 3, hidden: int = 64, depth: int = 4, backbone: str = "conv4"):
        super().__init__()
        if backbone not in ("conv4", "resnet"):
            raise ValueError(f"backbone must be 'conv4' or 'resnet', got {backbone!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        chans = [in_chans] + ([hidden] * depth if backbone == "conv4" else [hidden * 2**i for i in range(depth)])
        block = ConvBlock if backbone == "conv4" else ResBlock
        self.features = nn.Sequential(*(block(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.embed_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))
