"""Generalization prediction: a classifier's test accuracy, read from its weights (Unterthiner
et al. 2020, the CNN zoo task of the NFN and DWSNet papers).

Trained with MSE on the standardized ``test_accuracy`` column; scored by Kendall's tau between
predicted and true accuracies of the test networks (does the model *rank* classifiers right?),
with the MSE alongside.
"""

from __future__ import annotations

from torch import Tensor

from .regress import Regression

__all__ = ["Generalization", "kendall_tau"]


def kendall_tau(pred: Tensor, target: Tensor) -> float:
    """Kendall's tau-b (ties handled) between two 1-D tensors."""
    from scipy.stats import kendalltau

    tau = kendalltau(pred.detach().cpu().double().numpy(), target.detach().cpu().double().numpy()).statistic
    return float(tau)


class Generalization(Regression):
    task = "generalization"
    metric = "kendall_tau"
    higher_is_better = True

    def __init__(self, column: str = "test_accuracy"):
        super().__init__(column)

    def scores(self, out: Tensor, target: Tensor) -> dict[str, float]:
        return {"kendall_tau": kendall_tau(out[:, 0], target), **super().scores(out, target)}
