"""The learned optimizer: a pure functional core and its torch.optim face."""

from .checkpoint import DEFAULT_PATH, CheckpointError, load_learned, save_learned
from .learned import LearnedOptimizer, LearnedOptimizerConfig
from .optimizer import MetaNetOptimizer
from .structure import Structure, infer_structure, structure_from_module

__all__ = ["MetaNetOptimizer", "LearnedOptimizer", "LearnedOptimizerConfig", "CheckpointError", "load_learned",
           "save_learned", "DEFAULT_PATH", "Structure", "infer_structure", "structure_from_module"]
