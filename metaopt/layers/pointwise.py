"""Elementwise layers: they act on every entry alike, so they commute with any permutation."""

from __future__ import annotations

import math

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


class FourierFeatures(nn.Module):
    """Random Fourier features of every weight and bias value (Tancik et al. 2020; NFN used them on
    input weights): ``[x, sin(2 pi x B), cos(2 pi x B)]`` with a fixed Gaussian ``B`` of std ``scale``.

    Why: the first equivariant layer is linear in the raw values, and some properties are not. For
    SIRENs, flipping a hidden neuron's sign leaves the function unchanged, and the cosine features
    are blind to it (even in each value). ``scale`` is relative to the values' spread, so use it on
    normalized weights. Acting entry by entry, the map commutes with every permutation.
    """

    def __init__(self, in_channels: int, num_features: int = 8, scale: float = 0.2, keep_input: bool = True):
        super().__init__()
        if num_features < 1 or not scale > 0:
            raise ValueError(f"FourierFeatures needs num_features >= 1 and scale > 0, got {num_features} and {scale}")
        self.in_channels, self.keep_input = in_channels, keep_input
        self.register_buffer("frequencies", torch.randn(in_channels, num_features) * scale)

    @property
    def out_channels(self) -> int:
        return self.in_channels * self.keep_input + 2 * self.frequencies.shape[1]

    def _encode(self, t: torch.Tensor) -> torch.Tensor:
        x = t.movedim(1, -1)  # channels last: [B, ..., C]
        phase = (2 * math.pi) * (x @ self.frequencies.to(x.dtype))
        parts = [x, phase.sin(), phase.cos()] if self.keep_input else [phase.sin(), phase.cos()]
        return torch.cat(parts, -1).movedim(-1, 1)

    def forward(self, ws: WeightSpace) -> WeightSpace:
        if ws.channels != self.in_channels:
            raise ValueError(f"FourierFeatures was built for {self.in_channels} input channel(s), the weight space "
                             f"has {ws.channels}")
        return ws.map(self._encode)
