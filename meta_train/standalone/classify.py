"""INR classification: which image does a SIREN encode? Read from its weights alone.

Models are invariant heads (pooling over hidden neurons), trained with cross-entropy on the
``label`` column; training batches get random hidden permutations (the networks' functions do
not change, so the label must not either). Headline: test accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .harness import Objective, Splits, StandaloneError

__all__ = ["Classification"]


class Classification(Objective):
    task = "classify"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, column: str = "label"):
        self.column = column
        self.num_classes = 0

    def setup(self, splits: Splits) -> int:
        labels = torch.cat([splits.meta[s][self.column] for s in ("train", "val", "test")])
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise StandaloneError(f"column {self.column!r} holds non-integer values; classification needs class ids")
        if labels.min() < 0:
            raise StandaloneError(f"column {self.column!r} has negative class ids")
        self.num_classes = int(labels.max()) + 1
        if self.num_classes < 2:
            raise StandaloneError(f"column {self.column!r} has a single class; nothing to classify")
        return self.num_classes

    def targets(self, splits: Splits, split: str) -> Tensor:
        return splits.meta[split][self.column].long()

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out, target)

    def scores(self, out: Tensor, target: Tensor) -> dict[str, float]:
        return {"accuracy": (out.argmax(-1) == target).float().mean().item(),
                "loss": F.cross_entropy(out, target).item()}

    def reference(self, splits: Splits) -> dict[str, float]:
        train, test = self.targets(splits, "train"), self.targets(splits, "test")
        majority = torch.bincount(train, minlength=self.num_classes).argmax()
        return {"majority_class_accuracy": (test == majority).float().mean().item()}
