"""DWS layers (Navon et al. 2023), equal to NFN's HNP layers: only hidden neurons permute."""

from __future__ import annotations

from ..weight_space import WeightSpaceSpec
from .base import EquivariantLinear


def dws_fold_sets(spec: WeightSpaceSpec, max_dense_io: int) -> tuple[int, ...]:
    """The fixed (input/output) sets small enough for dense maps."""
    return tuple(s for s in {0, spec.num_layers} if spec.neuron_sizes[s] <= max_dense_io)


class DWSLinear(EquivariantLinear):
    """Linear layer equivariant to permutations of hidden neurons only.

    Input/output sets with at most ``max_dense_io`` neurons are treated exactly (the full
    characterization: dense maps over those positions). Larger ones are *embedded*: pooled like
    hidden sets, plus position-dependent biases, so a layer on a 784-input MLP at 16 channels has
    tens of thousands of parameters instead of hundreds of millions. ``max_dense_io=None`` makes
    every fixed set dense whatever its size.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, max_dense_io: int | None = 8):
        io = {0, spec.num_layers}
        fold = io if max_dense_io is None else dws_fold_sets(spec, max_dense_io)
        super().__init__(spec, in_channels, out_channels, fold_sets=fold, positional_sets=io - set(fold))
        self.max_dense_io = max_dense_io


HNPLinear = DWSLinear
