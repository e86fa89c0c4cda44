"""Normalization of weight-space features."""

from __future__ import annotations

import torch
from torch import nn

from ..weight_space import WeightSpace


class WeightSpaceNorm(nn.Module):
    """Layer norm per tensor: statistics over all of a tensor's entries and channels (invariant
    to permutations), then a learned per-channel scale and shift. Keeps deep metanetworks stable
    when the weights they read differ in scale from layer to layer."""

    def __init__(self, num_tensors: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(num_tensors, channels))
        self.shift = nn.Parameter(torch.zeros(num_tensors, channels))

    def forward(self, ws: WeightSpace) -> WeightSpace:
        out = []
        for k, t in enumerate(ws.tensors()):
            dims = tuple(range(1, t.dim()))
            var, mean = torch.var_mean(t, dim=dims, keepdim=True, unbiased=False)
            view = (1, -1) + (1,) * (t.dim() - 2)
            out.append((t - mean) * torch.rsqrt(var + self.eps) * self.scale[k].view(view) + self.shift[k].view(view))
        return WeightSpace(out[0::2], out[1::2], ws.spec)
