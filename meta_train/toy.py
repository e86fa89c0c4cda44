"""Stand-ins that let ``meta_train`` run end to end before ``tasks/`` and ``metaopt.LearnedOptimizer`` exist.

:class:`NoisyLinearRegression` is a real (small) task family with the ``tasks/`` population
interface; :class:`LearnedMomentumSGD` is a real (tiny) learned optimizer with the
``metaopt.LearnedOptimizer`` functional interface whose meta-parameters are SGD's log learning
rate and momentum logit. Together they make the ``tiny`` suite: meta-training visibly tunes the
two hyperparameters in seconds, which is what smoke tests and CI need. They also make a sanity
baseline for real learned optimizers ("does it beat tuned SGD-momentum?").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NoisyLinearRegression", "LinearRegressionPopulation", "LearnedMomentumSGD"]


class NoisyLinearRegression:
    """Tasks ``y = x . w* + b* + noise`` with per-task ``w*`` and per-task feature scales.

    Feature scales are log-uniform in ``[1, sqrt(max_condition)]``, so the loss Hessians have
    condition numbers up to ``max_condition`` and the best step size varies between tasks.
    """

    name = "linreg"

    def __init__(self, dim: int = 8, batch_size: int = 16, noise: float = 0.1, max_condition: float = 10.0,
                 init_std: float = 0.1, device: str | torch.device = "cpu"):
        self.dim, self.batch_size, self.noise = dim, batch_size, noise
        self.max_condition, self.init_std = max_condition, init_std
        self.device = torch.device(device)

    def population(self, seed: int, size: int) -> "LinearRegressionPopulation":
        return LinearRegressionPopulation(self, seed, size)

    def sample(self, seed: int) -> "LinearRegressionPopulation":
        return self.population(seed, 1)


class LinearRegressionPopulation:
    """``size`` regression tasks trained side by side; parameters are ``{"w": [P, d], "b": [P]}``."""

    def __init__(self, family: NoisyLinearRegression, seed: int, size: int):
        g = torch.Generator().manual_seed(int(seed))
        d = family.dim
        self.family, self.size = family, size
        self.w_true = torch.randn(size, d, generator=g).to(family.device)
        self.b_true = torch.randn(size, generator=g).to(family.device)
        log_s = torch.rand(size, d, generator=g) * 0.5 * math.log(family.max_condition)
        self.scales = torch.exp(log_s).to(family.device)

    def init_params(self, seeds: Sequence[int]) -> dict[str, Tensor]:
        if len(seeds) != self.size:
            raise ValueError(f"init_params got {len(seeds)} seeds for a population of {self.size}")
        ws = [torch.randn(self.family.dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        w = torch.stack(ws) * self.family.init_std
        return {"w": w.to(self.family.device), "b": torch.zeros(self.size, device=self.family.device)}

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        fam = self.family
        x = torch.randn(self.size, fam.batch_size, fam.dim, generator=generator).to(fam.device)
        eps = torch.randn(self.size, fam.batch_size, generator=generator).to(fam.device)
        x = x * self.scales[:, None, :]
        y = torch.einsum("pbd,pd->pb", x, self.w_true) + self.b_true[:, None] + fam.noise * eps
        return x, y

    def loss(self, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        pred = torch.einsum("pbd,pd->pb", x, params["w"]) + params["b"][:, None]
        return ((pred - y) ** 2).mean(dim=1)

    def evaluate(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Exact expected loss on fresh data (the validation loss), in closed form."""
        dw = params["w"] - self.w_true
        risk = (self.scales**2 * dw**2).sum(dim=1) + (params["b"] - self.b_true) ** 2 + self.family.noise**2
        return {"loss": risk}


class _Hyper(nn.Module):
    def __init__(self, lr: float, momentum: float):
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr)))
        self.logit_momentum = nn.Parameter(torch.tensor(math.log(momentum / (1 - momentum))))


class LearnedMomentumSGD:
    """SGD with momentum; the meta-parameters are ``log_lr`` and ``logit_momentum`` (scalars)."""

    def __init__(self, lr: float = 1e-2, momentum: float = 0.5):
        self.metanet = _Hyper(lr, momentum)

    def init(self, params: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(p) for p in params]

    def update(self, meta_params: dict[str, Tensor], params: list[Tensor], grads: list[Tensor],
               state: list[Tensor], step: int) -> tuple[list[Tensor], list[Tensor]]:
        lr = torch.exp(meta_params["log_lr"])
        beta = torch.sigmoid(meta_params["logit_momentum"])
        new_state = [beta * m + g for m, g in zip(state, grads)]
        return [p - lr * m for p, m in zip(params, new_state)], new_state
