"""Generalization prediction: a classifier's test accuracy, read from its weights (Unterthiner
et al. 2020, the CNN zoo task of the NFN and DWSNet papers).

Trained with MSE on the standardized ``test_accuracy`` column, or with ``loss="rank"`` on the order
alone (a pairwise logistic loss over the pairs of each batch, RankNet's: what Kendall's tau scores,
without spending the model on calibrated values); scored by Kendall's tau between predicted and
true accuracies of the test networks (does the model *rank* classifiers right?), with the MSE
alongside for the MSE loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .harness import StandaloneError
from .regress import Regression

__all__ = ["Generalization", "kendall_tau", "pairwise_rank_loss", "LOSSES"]

LOSSES = ("mse", "rank")


def kendall_tau(pred: Tensor, target: Tensor) -> float:
    """Kendall's tau-b (ties handled) between two 1-D tensors."""
    from scipy.stats import kendalltau

    tau = kendalltau(pred.detach().cpu().double().numpy(), target.detach().cpu().double().numpy()).statistic
    return float(tau)


def pairwise_rank_loss(score: Tensor, target: Tensor) -> Tensor:
    """Mean of ``softplus(-(s_i - s_j) sign(y_i - y_j))`` over the pairs with different targets: the
    logistic loss of ordering each pair as the targets do (0 when the batch has no such pair)."""
    order = torch.sign(target[:, None] - target[None, :])
    pairs = order != 0
    if not pairs.any():
        return score.sum() * 0.0
    return F.softplus(-(score[:, None] - score[None, :]) * order)[pairs].mean()


class Generalization(Regression):
    task = "generalization"
    metric = "kendall_tau"
    higher_is_better = True

    def __init__(self, column: str = "test_accuracy", loss: str = "mse"):
        if loss not in LOSSES:
            raise StandaloneError(f"unknown generalization loss {loss!r}; choose from {', '.join(LOSSES)}")
        super().__init__(column)
        self.loss_name = loss

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        if self.loss_name == "rank":
            return pairwise_rank_loss(out[:, 0], target)
        return super().loss(out, target)

    def scores(self, out: Tensor, target: Tensor) -> dict[str, float]:
        tau = {"kendall_tau": kendall_tau(out[:, 0], target)}
        return tau if self.loss_name == "rank" else {**tau, **super().scores(out, target)}  # ranks are not values
