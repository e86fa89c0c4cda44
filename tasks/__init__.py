"""Task distributions for meta-training: INR fitting, image classifiers, RL policies.

Every task is functional (``loss(params, batch)`` on a dict of tensors, usable under
``torch.func`` and in differentiable unrolls) and modular (``module()`` builds the
matching ``nn.Sequential``).  Families sample tasks; populations run many tasks of one
architecture as one stacked computation.  See ``tasks/base.py`` for the interface.

Importing this package tunes glibc's malloc for fast CPU training (see ``metaopt/cpu.py``);
set ``METAOPT_NO_MALLOC_TUNING=1`` to skip that.
"""

import os as _os

from metaopt.cpu import set_worker_threads, tune_malloc

if _os.environ.get("METAOPT_NO_MALLOC_TUNING") != "1":
    tune_malloc()

from .base import (  # noqa: E402
    ACTIVATIONS,
    Batch,
    Network,
    Params,
    Population,
    Sine,
    Task,
    TaskFamily,
    member,
    mlp,
    train,
    train_population,
)
from .classify import ClassifierFamily, ClassifierTask, cnn  # noqa: E402
from .data import (  # noqa: E402
    FASHION_MNIST_DIR,
    load_digits,
    load_fashion_mnist,
    load_images,
    read_idx,
    sine_wave,
)
from .inr import INRFamily, INRTask, SirenFit, fit_inrs, grid, psnr, siren  # noqa: E402
from .rl import (  # noqa: E402
    ENVS,
    BatchedEnv,
    RLFamily,
    RLTask,
    episode_returns,
    evaluate_with_gymnasium,
    make_env,
    policy_action,
    policy_network,
)

FAMILIES = {"inr": INRFamily, "classify": ClassifierFamily, "rl": RLFamily}


def make_family(name: str, **kwargs) -> TaskFamily:
    """A task family by name (``inr``, ``classify``, ``rl``); kwargs go to its constructor."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](**kwargs)


__all__ = [
    "ACTIVATIONS", "Batch", "BatchedEnv", "ClassifierFamily", "ClassifierTask", "ENVS", "FAMILIES",
    "FASHION_MNIST_DIR", "INRFamily", "INRTask", "Network", "Params", "Population", "RLFamily", "RLTask", "Sine",
    "SirenFit", "Task", "TaskFamily", "cnn", "episode_returns", "evaluate_with_gymnasium", "fit_inrs", "grid",
    "load_digits", "load_fashion_mnist", "load_images", "make_env", "make_family", "member", "mlp",
    "policy_action", "policy_network", "psnr", "read_idx", "set_worker_threads", "siren", "sine_wave",
    "train", "train_population", "tune_malloc",
]
