"""Invariant pooling: weight space -> one feature vector per network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..weight_space import WeightSpace, WeightSpaceSpec
from .base import NeuronLayout


class InvariantPool(nn.Module):
    """Mean of every tensor over its permutable axes, concatenated: [B, out_features(channels)].

    ``keep_io=True`` (for DWS models) keeps the input/output neuron axes instead of averaging
    them away, since those neurons are not interchangeable.
    """

    def __init__(self, spec: WeightSpaceSpec, keep_io: bool = False):
        super().__init__()
        self.spec = spec
        self.layout = NeuronLayout(spec, fold_sets=(0, spec.num_layers) if keep_io else ())

    def out_features(self, channels: int) -> int:
        return self.layout.global_dim(channels)

    def forward(self, ws: WeightSpace) -> Tensor:
        return torch.cat([self.layout.pool(x) for x in self.layout.fold(ws)], 1)
