"""Regression of a scalar property from an INR's weights; by default the frequency of the sine
wave a 1-D SIREN encodes.

Targets are standardized with the training split's mean and std (so one learning rate suits any
unit); the reported MSE is in the column's own units, next to the MSE of always predicting the
training mean (the ``reference``), which a model that reads nothing from the weights would get.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .harness import Objective, Splits, StandaloneError

__all__ = ["Regression"]


class Regression(Objective):
    task = "regress"
    metric = "mse"
    higher_is_better = False

    def __init__(self, column: str = "frequency"):
        self.column = column
        self.mean, self.std = 0.0, 1.0

    def setup(self, splits: Splits) -> int:
        y = splits.meta["train"][self.column].double()
        if not torch.isfinite(y).all():
            raise StandaloneError(f"column {self.column!r} has non-finite values in the training split")
        self.mean = y.mean().item()
        self.std = y.std().item() if len(y) > 1 and y.std() > 0 else 1.0
        return 1

    def targets(self, splits: Splits, split: str) -> Tensor:
        return (splits.meta[split][self.column].float() - self.mean) / self.std

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return (out[:, 0] - target).square().mean()

    def scores(self, out: Tensor, target: Tensor) -> dict[str, float]:
        mse = ((out[:, 0] - target).square().mean() * self.std ** 2).item()  # back in the column's units
        var = (target.var(unbiased=False) * self.std ** 2).item()
        return {"mse": mse, "r2": 1.0 - mse / var if var > 0 else float("nan")}

    def reference(self, splits: Splits) -> dict[str, float]:
        y = splits.meta["test"][self.column].double()
        return {"predict_train_mean_mse": (y - self.mean).square().mean().item()}
