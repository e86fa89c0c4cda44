"""Invariant pooling: weight space -> one feature vector per network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..weight_space import WeightSpace, WeightSpaceSpec
from .base import NeuronLayout

_REDUCTIONS = {"mean": ("mean",), "meanmax": ("mean", "amax")}  # pooling -> Tensor reductions, in output order
POOLINGS = tuple(_REDUCTIONS)


class InvariantPool(nn.Module):
    """Mean of every tensor over its permutable axes, concatenated: [B, out_features(channels)].

    ``keep_io=True`` (for DWS models) keeps the input/output neuron axes instead of averaging
    them away, since those neurons are not interchangeable.  ``pooling="meanmax"`` appends the
    maximum over the same axes (DWSNets pools with max): a mean cannot single out the largest
    neuron, which is what properties such as an INR's highest frequency depend on.
    """

    def __init__(self, spec: WeightSpaceSpec, keep_io: bool = False, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.spec, self.pooling = spec, pooling
        self.layout = NeuronLayout(spec, fold_sets=(0, spec.num_layers) if keep_io else ())

    def out_features(self, channels: int) -> int:
        return self.layout.global_dim(channels) * len(_REDUCTIONS[self.pooling])

    def forward(self, ws: WeightSpace) -> Tensor:
        xs = self.layout.fold(ws)
        return torch.cat([self.layout.pool(x, r) for r in _REDUCTIONS[self.pooling] for x in xs], 1)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"
