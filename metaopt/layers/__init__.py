"""Weight-space layers, one file per kind."""

from .base import EquivariantLinear, NeuronLayout
from .dws import DWSLinear, HNPLinear
from .message_passing import GraphEncoder, GraphPool, MessagePassing, SignMessagePassing, WeightGraph
from .norm import WeightSpaceNorm
from .np import NPLinear
from .pointwise import ChannelDropout, Elementwise, FourierFeatures
from .pooling import POOLINGS, InvariantPool

__all__ = ["EquivariantLinear", "NeuronLayout", "NPLinear", "DWSLinear", "HNPLinear", "InvariantPool", "POOLINGS",
           "Elementwise", "ChannelDropout", "FourierFeatures", "WeightSpaceNorm",
           "GraphEncoder", "MessagePassing", "SignMessagePassing", "GraphPool", "WeightGraph"]
