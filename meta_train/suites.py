"""Named task suites: what ``--suite NAME`` meta-trains on.

A :class:`Suite` builds a :class:`~meta_train.problem.MetaProblem` from the run's config and
carries the config defaults that suit it (shorter horizons for tiny tasks, ...). Suites are plain
registry entries, so a project or notebook can add its own with :func:`register_suite`.

Registered here:

* ``tiny``: :class:`~meta_train.toy.NoisyLinearRegression` tasks, meta-training the two
  hyperparameters of :class:`~meta_train.toy.LearnedMomentumSGD`. A few outer steps take seconds and
  the optimum is known: smoke tests, CI, and checks of the estimators and the loop.
* ``small`` (CPU): ``metaopt.optim.LearnedOptimizer`` (base lr 1e-2) on ``tasks/`` 8x8 digit
  classifiers (MLP and CNN, widths 8/16) and short SIREN fits of 8x8 digits. The shipped default
  of ``MetaNetOptimizer`` was meta-trained on it (see ``docs/optimizer.md``).
* ``large`` (GPU; runs on a CPU too, slowly): 28x28 Fashion-MNIST MLP/CNN classifiers, 28x28
  SIREN fits and classic-control policies, with each family's validation metric as the meta-loss
  (RL's training loss is a surrogate). Not yet used to train a shipped optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .config import Config
from .problem import LearnedOptimizerProblem, MetaProblem, RandomRescale

__all__ = ["Suite", "SuiteUnavailable", "SUITES", "register_suite", "get_suite", "build_problem"]


class SuiteUnavailable(RuntimeError):
    """A registered suite whose task families (or optimizer) are not available in this checkout."""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    build: Callable[[Config, torch.device], MetaProblem]
    defaults: Mapping[str, Any] = field(default_factory=dict)


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite, *, replace: bool = False) -> Suite:
    if suite.name in SUITES and not replace:
        raise ValueError(f"suite {suite.name!r} is already registered (pass replace=True to override it)")
    unknown = set(suite.defaults) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"suite {suite.name!r} sets unknown config defaults {sorted(unknown)}")
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; registered: {sorted(SUITES)}")
    return SUITES[name]


def build_problem(config: Config, device: torch.device | str = "cpu") -> MetaProblem:
    return get_suite(config.suite).build(config, torch.device(device))


def problem_options(config: Config, device: torch.device) -> dict[str, Any]:
    """The LearnedOptimizerProblem options every suite takes from the config."""
    return {"second_order": config.second_order, "meta_loss": "val" if config.meta_loss == "val" else "train",
            "augment": RandomRescale(config.augment_scale) if config.augment_scale else None, "device": device,
            "weights": config.family_weights or None}


def learned_optimizer(config: Config, lr: float):
    """The suites' metaopt LearnedOptimizer: the suite's base lr (with ``step_size`` prodigy, 1.0 times
    the distance estimate instead), the rule options of the run's config."""
    from metaopt.optim import LearnedOptimizer, LearnedOptimizerConfig
    if config.step_size == "prodigy":
        lr = 1.0
    return LearnedOptimizer(LearnedOptimizerConfig(lr=lr, step_size=config.step_size, max_mix=config.max_mix,
                                                   refresh_every=config.refresh_every,
                                                   late_refresh_every=config.late_refresh_every or None,
                                                   mix_decay_from=config.mix_decay_from or None,
                                                   amsgrad_from=config.amsgrad_from or None,
                                                   lr_decay_from=config.lr_decay_from or None,
                                                   distance_weighted_momentum=config.distance_weighted_momentum,
                                                   param_term_follows_gradient=config.param_term_follows_gradient,
                                                   hypergradient_from=config.hypergradient_from or None,
                                                   distance_init=config.distance_init,
                                                   distance_growth=config.distance_growth or None))


def _tiny(config: Config, device: torch.device) -> MetaProblem:
    from .toy import LearnedMomentumSGD, NoisyLinearRegression
    family = NoisyLinearRegression(dim=8, batch_size=16, noise=0.1, max_condition=10.0, device=device)
    return LearnedOptimizerProblem(LearnedMomentumSGD(lr=3e-3, momentum=0.5), family,
                                   **problem_options(config, device))


register_suite(Suite(
    "tiny", "noisy linear regression (d=8); learns SGD-momentum's log-lr and momentum; seconds on a CPU",
    _tiny, defaults={"tasks_per_group": 4, "truncation_length": 5, "min_horizon": 10, "max_horizon": 40,
                     "outer_lr": 0.05, "clip_grad_norm": 10.0, "eval_tasks": 4, "eval_steps": 40,
                     "checkpoint_every": 10}))


def _small(config: Config, device: torch.device) -> MetaProblem:
    try:
        import tasks
        import metaopt.optim  # noqa: F401
    except ImportError as e:  # pragma: no cover - both ship with this repository
        raise SuiteUnavailable(f"suite 'small' needs tasks/ and metaopt.optim: {e}") from e
    families = [
        tasks.ClassifierFamily(dataset="digits", archs=("mlp", "cnn"), widths=(8, 16), depths=(1,),
                               batch_size=32, train_size=512, test_size=200),
        tasks.INRFamily(dataset="digits", widths=(16, 32), depths=(1, 2), images=500),
    ]
    opt = learned_optimizer(config, SMALL_BASE_LR)
    return LearnedOptimizerProblem(opt, families,
                                   val_key={"classify": "test_loss", "inr": "mse"},
                                   **problem_options(config, device))


# The learned optimizer scales Adam's direction per neuron by exp(+-2) around this base rate.
SMALL_BASE_LR = 1e-2

register_suite(Suite(
    "small", "CPU: 8x8 digit classifiers (MLP/CNN) and short 8x8 SIREN fits (tasks/), metaopt.LearnedOptimizer",
    # the recipe of the shipped default (docs/default_run/config.yaml), so a plain run reproduces it
    _small, defaults={"tasks_per_group": 8, "truncation_length": 10, "min_horizon": 50, "max_horizon": 300,
                      "num_groups": 4, "sigma": 0.03, "loss_transform": "relative", "outer_lr": 3e-4,
                      "eval_steps": 300, "eval_every": 0, "checkpoint_every": 100}))
def _large(config: Config, device: torch.device) -> MetaProblem:
    import tasks
    from tasks.data import FASHION_MNIST_DIR

    try:
        tasks.load_fashion_mnist("test", limit=1)
    except FileNotFoundError as e:
        raise SuiteUnavailable(f"suite 'large' needs Fashion-MNIST: {e}") from e
    families = [
        tasks.ClassifierFamily(dataset="fashion_mnist", archs=("mlp", "cnn"), widths=(16, 32), depths=(1, 2),
                               activations=("relu", "tanh", "gelu"), batch_size=128, train_size=8192,
                               test_size=1000, path=FASHION_MNIST_DIR),
        tasks.INRFamily(dataset="fashion_mnist", widths=(32,), depths=(2,), images=5000),
        tasks.RLFamily(envs=("CartPole-v1", "Acrobot-v1", "Pendulum-v1"), widths=(32,), depths=(1, 2),
                       episodes=16, horizon=200, eval_episodes=8, eval_steps=200),
    ]
    opt = learned_optimizer(config, LARGE_BASE_LR)
    # RL's training loss is a policy-gradient surrogate, not a measure of progress: the meta-loss
    # is each family's validation metric (test loss, fit error, negative evaluation return)
    return LearnedOptimizerProblem(opt, families,
                                   val_key={"classify": "test_loss", "inr": "mse", "rl": "negative_return"},
                                   **problem_options(config, device))


LARGE_BASE_LR = 3e-3

register_suite(Suite(
    "large", "GPU: 28x28 Fashion-MNIST MLP/CNN classifiers, 28x28 SIREN fits, CartPole/Acrobot/Pendulum "
             "policies (tasks/), metaopt.LearnedOptimizer, validation meta-loss",
    _large, defaults={"tasks_per_group": 32, "truncation_length": 20, "min_horizon": 100, "max_horizon": 2000,
                      "num_groups": 8, "meta_loss": "val", "sigma": 0.03, "loss_transform": "relative",
                      "outer_lr": 3e-4, "eval_steps": 2000, "eval_every": 0, "checkpoint_every": 100}))
