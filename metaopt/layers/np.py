"""NP layers (Zhou et al. 2023): every neuron set, input and output included, is permutable."""

from __future__ import annotations

from ..weight_space import WeightSpaceSpec
from .base import EquivariantLinear


class NPLinear(EquivariantLinear):
    """Linear layer equivariant to permutations of *all* neuron sets.

    With ``io_embed=True`` the input and output neurons get learned position-dependent biases,
    which breaks the symmetry the network does not really have (input pixels and output classes
    are ordered) while staying exactly equivariant to hidden-neuron permutations.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, io_embed: bool = False):
        io = (0, spec.num_layers)
        super().__init__(spec, in_channels, out_channels, fold_sets=(), positional_sets=io if io_embed else ())
        self.io_embed = io_embed
