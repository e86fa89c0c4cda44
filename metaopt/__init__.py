"""metaopt: permutation-equivariant metanetworks and an equivariant learned optimizer for PyTorch."""

from . import layers, models
from .optim import LearnedOptimizer, LearnedOptimizerConfig, MetaNetOptimizer
from .weight_space import LayerSpec, UnsupportedLayerError, WeightSpace, WeightSpaceSpec, random_hidden_perms

__version__ = "0.1.0"

__all__ = ["WeightSpace", "WeightSpaceSpec", "LayerSpec", "UnsupportedLayerError", "random_hidden_perms",
           "layers", "models",
           "MetaNetOptimizer", "LearnedOptimizer", "LearnedOptimizerConfig"]
