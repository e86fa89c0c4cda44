"""Elementwise layers: they act on every entry alike, so they commute with any permutation."""

from __future__ import annotations

import torch
from torch import nn

from ..weight_space import WeightSpace


class Elementwise(nn.Module):
    """Wrap an elementwise module (``nn.ReLU()``, ``nn.GELU()``, ...) to act on a weight space."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return ws.map(self.module)


class ChannelDropout(nn.Module):
    """Dropout of whole channels per tensor and network: the mask does not depend on neuron
    positions, so the layer stays equivariant sample by sample, not just in distribution."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, ws: WeightSpace) -> WeightSpace:
        if not self.training or self.p == 0:
            return ws

        def drop(t):
            keep = torch.rand(t.shape[0], t.shape[1], *([1] * (t.dim() - 2)), device=t.device) >= self.p
            return t * keep / (1 - self.p)

        return ws.map(drop)
