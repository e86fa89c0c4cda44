"""Meta-gradient estimators over truncated unrolls: truncated backprop, antithetic ES, and PES.

Backprop through a long inner run explodes (and costs memory linear in its length), so meta-training
looks at a run a few steps (one *truncation*) at a time:

* :class:`TruncatedBackprop` differentiates the truncation's loss with ``torch.func.grad``. Cheap and
  low-variance, but biased: it ignores how meta-parameters shaped the state the truncation starts from.
* :class:`ES` (Gaussian-smoothing evolution strategies) perturbs the meta-parameters once per task
  and truncation. Unbiased for the smoothed truncation loss, blind to earlier truncations too.
* :class:`PES` (persistent ES) keeps each particle's inner state *and* the sum of all perturbations
  it has seen since its run began; weighting loss differences by that sum makes the estimate
  unbiased for the whole run's (smoothed) loss, truncation by truncation.

Each estimator works on one task group at a time and carries a :class:`Particles` between calls.
The outer loop averages groups (and workers).

Variance options. ``antithetic=True`` evaluates ``theta + eps`` and ``theta - eps`` on the same task
and minibatches, so task noise cancels in the difference. ``loss_transform``: ``"none"`` keeps the
estimator unbiased; ``"relative"`` divides each pair's difference by the pair's mean absolute loss
(tasks of different loss scales weigh alike: a biased, roughly log-loss gradient) and ``"sign"``
keeps only the sign of the difference (a robust descent direction, not a gradient; its expectation
on a quadratic is ``sqrt(2/pi) / (2 sigma) * grad / |grad|``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from .problem import InnerState, MetaProblem, map_tensors, num_particles, take, tile

__all__ = ["Estimate", "Particles", "GradientEstimator", "TruncatedBackprop", "ES", "PES", "reduce_losses",
           "make_estimator"]


def reduce_losses(losses: Tensor, how: str) -> Tensor:
    """Per-step losses ``[particles, T]`` -> the truncation's meta-loss per particle."""
    if losses.dim() != 2 or losses.shape[1] == 0:
        raise ValueError(f"unroll must return losses shaped [particles, steps>0], got {tuple(losses.shape)}")
    if how in ("mean", "val"):
        return losses.mean(dim=1)
    if how == "final":
        return losses[:, -1]
    raise ValueError(f"unknown meta-loss reduction {how!r}; use 'mean', 'final' or 'val'")


@dataclass
class Estimate:
    """One group's contribution to the meta-gradient.

    ``grad`` is the mean of ``num_samples`` per-sample estimates (one per ES pair; one per group for
    truncated backprop); ``sq_norm_sum`` is the sum of their squared norms, which lets the outer loop
    report the estimator's variance after combining groups and workers.
    """

    grad: dict[str, Tensor]
    loss: float
    num_samples: int
    sq_norm_sum: float
    particle_steps: int


@dataclass
class Particles:
    """An estimator's state for one task group between truncations."""

    inner: InnerState
    extra: dict[str, Tensor] = field(default_factory=dict)


class GradientEstimator(ABC):
    """Turns a truncated unroll of a task group into an :class:`Estimate`."""

    copies: int = 1  # particles per task

    def __init__(self, meta_loss: str = "mean"):
        reduce_losses(torch.zeros(1, 1), meta_loss)  # validate early
        self.meta_loss = meta_loss

    def start(self, problem: MetaProblem, meta_params: Mapping[str, Tensor], num_tasks: int,
              generator: torch.Generator) -> Particles:
        """Fresh tasks (a new inner run) for one group."""
        return Particles(tile(problem.init_inner(num_tasks, generator), self.copies))

    @abstractmethod
    def estimate(self, problem: MetaProblem, meta_params: Mapping[str, Tensor], particles: Particles,
                 num_steps: int, generator: torch.Generator) -> tuple[Estimate, Particles]:
        """Unroll ``num_steps`` and estimate the meta-gradient at ``meta_params``."""


class TruncatedBackprop(GradientEstimator):
    """Gradient of the truncation's mean meta-loss, by ``torch.func.grad`` through ``unroll``.

    Second-order terms (through the inner gradients) are the problem's choice
    (``LearnedOptimizerProblem(second_order=...)``).
    """

    copies = 1

    def estimate(self, problem, meta_params, particles, num_steps, generator):
        shell = {}

        def objective(theta):
            losses, inner = problem.unroll(theta, particles.inner, num_steps, generator, batched=False)
            per_task = reduce_losses(losses, self.meta_loss)
            leaves: list[Tensor] = []
            # torch.func aux outputs must be tensors: keep the tree's other leaves aside.
            shell["tree"] = map_tensors(lambda t: leaves.append(t) or _Slot(len(leaves) - 1), inner)
            return per_task.mean(), (per_task, leaves)

        theta = {k: v.detach() for k, v in meta_params.items()}
        g, (per_task, leaves) = torch.func.grad(objective, has_aux=True)(theta)
        inner = _fill(shell["tree"], [t.detach() for t in leaves])
        sq = float(sum((v.double() ** 2).sum() for v in g.values()))
        return (Estimate(g, float(per_task.mean()), 1, sq, per_task.shape[0] * num_steps),
                Particles(inner, particles.extra))


def _fill(tree, leaves: list[Tensor]):
    """Inverse of the leaf-index shell built in TruncatedBackprop.estimate."""
    if isinstance(tree, dict):
        return type(tree)((k, _fill(v, leaves)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_fill(v, leaves) for v in tree)
    if isinstance(tree, _Slot):
        return leaves[tree]
    return tree


class _Slot(int):
    """Marks where a tensor leaf sat (plain ints in the tree must stay ints)."""


class _Perturbed(GradientEstimator):
    copies = 2

    def __init__(self, sigma: float = 0.01, antithetic: bool = True, meta_loss: str = "mean",
                 loss_transform: str = "none"):
        super().__init__(meta_loss)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if loss_transform not in ("none", "relative", "sign"):
            raise ValueError(f"loss_transform must be 'none', 'relative' or 'sign', got {loss_transform!r}")
        self.sigma, self.antithetic, self.loss_transform = sigma, antithetic, loss_transform

    def _noise(self, meta_params, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        # Drawn on the CPU generator, so results do not depend on the device or the worker count.
        out = {}
        for k, v in meta_params.items():
            dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
            e = torch.randn((n,) + tuple(v.shape), generator=generator, dtype=dtype) * self.sigma
            out[k] = e.to(device=v.device, dtype=v.dtype)
        return out

    def _particle_params(self, meta_params, eps):
        """Copy 0 / copy 1 meta-params: (theta+eps, theta-eps) or (theta, theta+eps)."""
        out = {}
        for k, theta in meta_params.items():
            theta = theta.detach().unsqueeze(0)
            if self.antithetic:
                out[k] = torch.cat([theta + eps[k], theta - eps[k]])
            else:
                out[k] = torch.cat([theta.expand_as(eps[k]), theta + eps[k]])
        return out

    def _coefficients(self, per_particle: Tensor, n: int) -> Tensor:
        """Weight per task that multiplies its (accumulated) perturbation."""
        a, b = per_particle[:n], per_particle[n:]
        diff = a - b if self.antithetic else b - a
        if self.loss_transform == "relative":
            diff = diff / (0.5 * (a.abs() + b.abs()) + 1e-12)
        elif self.loss_transform == "sign":
            diff = torch.sign(diff)
        denom = 2 * self.sigma**2 if self.antithetic else self.sigma**2
        return diff / denom

    def _run(self, problem, meta_params, particles, num_steps, generator, eps):
        with torch.no_grad():
            losses, inner = problem.unroll(self._particle_params(meta_params, eps), particles.inner, num_steps,
                                           generator, batched=True)
            per_particle = reduce_losses(losses, self.meta_loss)
        return per_particle, inner

    @staticmethod
    def _finish(directions: dict[str, Tensor], coef: Tensor, per_particle: Tensor, n: int, antithetic: bool,
                particle_steps: int) -> Estimate:
        samples = {k: d * coef.reshape((n,) + (1,) * (d.dim() - 1)).to(d.dtype) for k, d in directions.items()}
        grad = {k: s.mean(dim=0) for k, s in samples.items()}
        sq = float(sum((s.double() ** 2).reshape(n, -1).sum(dim=1) for s in samples.values()).sum())
        loss = per_particle.mean() if antithetic else per_particle[:n].mean()
        return Estimate(grad, float(loss), n, sq, particle_steps)


class ES(_Perturbed):
    """Antithetic (or forward-difference) ES over one truncation.

    Both copies of a task start each truncation from the same state; afterwards the state of copy 0
    (``theta + eps``, or the unperturbed ``theta`` when not antithetic) is carried on for both.
    """

    def estimate(self, problem, meta_params, particles, num_steps, generator):
        n = particles_tasks(particles, self.copies)
        eps = self._noise(meta_params, n, generator)
        per_particle, inner = self._run(problem, meta_params, particles, num_steps, generator, eps)
        est = self._finish(eps, self._coefficients(per_particle, n), per_particle, n, self.antithetic,
                           2 * n * num_steps)
        return est, Particles(tile(take(inner, slice(0, n)), 2), particles.extra)


class PES(_Perturbed):
    """Persistent ES: copies keep their own states; ``extra["xi"]`` sums each task's perturbations."""

    def start(self, problem, meta_params, num_tasks, generator):
        p = super().start(problem, meta_params, num_tasks, generator)
        p.extra = {"xi/" + k: torch.zeros((num_tasks,) + tuple(v.shape), dtype=v.dtype, device=v.device)
                   for k, v in meta_params.items()}
        return p

    def estimate(self, problem, meta_params, particles, num_steps, generator):
        n = particles_tasks(particles, self.copies)
        eps = self._noise(meta_params, n, generator)
        missing = [k for k in meta_params if "xi/" + k not in particles.extra]
        if missing:
            raise KeyError(f"PES state lacks accumulated perturbations for {missing}; was the group started "
                           "by a different estimator?")
        xi = {k: particles.extra["xi/" + k] + eps[k] for k in meta_params}
        per_particle, inner = self._run(problem, meta_params, particles, num_steps, generator, eps)
        est = self._finish(xi, self._coefficients(per_particle, n), per_particle, n, self.antithetic,
                           2 * n * num_steps)
        return est, Particles(inner, {"xi/" + k: v for k, v in xi.items()})


def particles_tasks(particles: Particles, copies: int) -> int:
    total = num_particles(particles.inner)
    if total % copies:
        raise ValueError(f"{total} particles is not a multiple of {copies} copies")
    return total // copies


def make_estimator(config) -> GradientEstimator:
    """The estimator a :class:`~meta_train.config.Config` asks for."""
    if config.estimator == "tbptt":
        return TruncatedBackprop(meta_loss=config.meta_loss)
    cls = {"es": ES, "pes": PES}[config.estimator]
    return cls(sigma=config.sigma, antithetic=config.antithetic, meta_loss=config.meta_loss,
               loss_transform=config.loss_transform)
