"""Small weight-space datasets built in seconds to minutes on CPU: for the tests and for the
small-scale measurements in ``docs/results.md``.

The full-size builders (Fashion-MNIST INRs, the classifier zoo) are ``python -m tasks make-data``;
these are deliberately tiny versions that write the same :class:`tasks.weight_data.WeightDataset`
format, so the standalone tasks run on either.

* :func:`digits_inrs`: one SIREN per scikit-learn 8x8 digit (meta: ``label``, ``split``, ``seed``, ``psnr``);
* :func:`sine_inrs`: one 1-D SIREN per wave ``0.5 + 0.5 a sin(b x)`` (meta: ``amplitude``, ``frequency``, ``split``);
* :func:`cnn_zoo`: small CNNs trained on digits for varied numbers of steps and training-set sizes,
  so their test accuracies spread (meta: ``test_accuracy``, ``epoch``, ``train_size``, ``split``).

``python -m meta_train.standalone make-small-data KIND --out DIR`` writes one of them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from metaopt.weight_space import spec_from_module
from tasks.base import Network, Params, Population
from tasks.classify import ClassifierTask, cnn
from tasks.data import load_digits
from tasks.inr import siren
from tasks.make_data import fit_sirens
from tasks.weight_data import SPLITS, WeightDataset

__all__ = ["params_to_dataset", "digits_inrs", "sine_inrs", "cnn_zoo", "split_column", "KINDS"]


def params_to_dataset(network: Network, params: Params, meta: dict[str, torch.Tensor], info: dict | None = None
                      ) -> WeightDataset:
    """Stacked population parameters (``{"0.weight": [P, ...], ...}``) as a :class:`WeightDataset`."""
    spec = spec_from_module(network.module())
    P = network.check(params)
    weights = [params[l.weight_name].detach().reshape(P, l.n_out, l.n_in, *l.kernel).clone() for l in spec.layers]
    biases = [params[l.bias_name].detach().clone() if l.has_bias else torch.zeros(P, l.n_out) for l in spec.layers]
    return WeightDataset(spec, weights, biases, meta, dict(info or {}, network=network.name))


def split_column(n_train: int, n_val: int, n_test: int) -> torch.Tensor:
    """The ``split`` column for networks stored train first, then val, then test."""
    return torch.cat([torch.full((n,), SPLITS[s], dtype=torch.int64)
                      for n, s in ((n_train, "train"), (n_val, "val"), (n_test, "test"))])


def _fit(signals: torch.Tensor, hidden: Sequence[int], steps: int, lr: float, seeds: Sequence[int]
         ) -> tuple[Network, Params, torch.Tensor]:
    """The same fit as ``python -m tasks make-data`` (:func:`tasks.make_data.fit_sirens`), on the
    CPU, for a fixed number of steps; returns the network, stacked params and each INR's PSNR."""
    net = siren(signals.dim() - 1, hidden, 1)
    fit = fit_sirens(net, signals, [int(s) for s in seeds], steps, lr, target_psnr=None, device="cpu")
    return net, fit.params, fit.psnr


def _init_seeds(entropy: list[int], n: int, shared: bool) -> np.ndarray:
    seeds = np.random.SeedSequence(entropy).generate_state(n)
    return np.full(n, seeds[0]) if shared else seeds


def digits_inrs(n_train: int, n_val: int, n_test: int, hidden: Sequence[int] = (32, 32), steps: int = 300,
                lr: float = 1e-3, seed: int = 0, shared_init: bool = False) -> WeightDataset:
    """One SIREN per digit image: train/val images come from digits' train split, test from its test split.

    ``shared_init`` starts every SIREN from the same initialization (the easier "common init" regime,
    where a network's weights are init + an image-specific change); by default each has its own.
    """
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    if n_train + n_val > len(train_x) or n_test > len(test_x):
        raise ValueError(f"digits has {len(train_x)} train and {len(test_x)} test images; asked for "
                         f"{n_train}+{n_val} and {n_test}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_x), generator=g)[:n_train + n_val]
    test_pick = torch.randperm(len(test_x), generator=g)[:n_test]
    images = torch.cat([train_x[pick], test_x[test_pick]])
    labels = torch.cat([train_y[pick], test_y[test_pick]])
    seeds = _init_seeds([seed, 7], len(images), shared_init)
    net, params, fitted_psnr = _fit(images, hidden, steps, lr, seeds)
    meta = {"label": labels, "split": split_column(n_train, n_val, n_test),
            "seed": torch.as_tensor(seeds.astype(np.int64)), "psnr": fitted_psnr.float()}
    return params_to_dataset(net, params, meta, {"kind": "digits_inrs", "steps": steps, "lr": lr,
                                                        "image_size": 8, "w0": 30.0, "shared_init": shared_init})


def sine_inrs(n_train: int, n_val: int, n_test: int, hidden: Sequence[int] = (32,), points: int = 64,
              steps: int = 300, lr: float = 1e-3, freq_range: tuple[float, float] = (1.0, 10.0), seed: int = 0,
              shared_init: bool = False) -> WeightDataset:
    """One 1-D SIREN per wave ``0.5 + 0.5 a sin(b x)`` on ``points`` grid points over [-1, 1],
    with amplitude ``a ~ U(0.1, 1)`` and frequency ``b ~ U(freq_range)`` (radians per unit);
    ``shared_init`` as in :func:`digits_inrs`."""
    n = n_train + n_val + n_test
    g = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 0.9 * torch.rand(n, generator=g)
    frequency = freq_range[0] + (freq_range[1] - freq_range[0]) * torch.rand(n, generator=g)
    x = torch.linspace(-1, 1, points)
    signals = 0.5 + 0.5 * amplitude[:, None] * torch.sin(frequency[:, None] * x)
    seeds = _init_seeds([seed, 8], n, shared_init)
    net, params, fitted_psnr = _fit(signals, hidden, steps, lr, seeds)
    meta = {"amplitude": amplitude, "frequency": frequency, "split": split_column(n_train, n_val, n_test),
            "psnr": fitted_psnr.float()}
    return params_to_dataset(net, params, meta, {"kind": "sine_inrs", "steps": steps, "points": points,
                                                        "w0": 30.0, "shared_init": shared_init})


def cnn_zoo(n_per_run: int = 40, channels: Sequence[int] = (4, 4), checkpoints: Sequence[int] = (5, 20, 80, 300),
            train_sizes: Sequence[int] = (32, 128, 1024), lrs: Sequence[float] = (1e-2,), act: str = "relu",
            fractions: tuple[float, float] = (0.6, 0.2), seed: int = 0) -> WeightDataset:
    """CNNs ``Conv-act-Pool-Conv-act-Pool-Linear`` trained on 8x8 digits with Adam (batch 32).

    One population of ``n_per_run`` CNNs per (train size, lr), snapshotted after each number of
    ``checkpoints`` steps, so accuracies range from near chance to ~90%. Splits are by *training
    run* (all snapshots of one CNN share its split), so no test network has a near-copy in train.
    """
    net = cnn(8, channels, 10, act)
    parts = []
    run = 0
    for train_size in train_sizes:
        for lr in lrs:
            seeds = [int(s) for s in np.random.SeedSequence([seed, run, 9]).generate_state(n_per_run)]
            population = Population([ClassifierTask(net, "digits", s, batch_size=32, train_size=train_size,
                                                    test_size=359) for s in seeds])
            params = {k: v.requires_grad_() for k, v in population.init_params(seeds).items()}
            opt = torch.optim.Adam(params.values(), lr=lr)
            gen = torch.Generator().manual_seed(seed * 1000 + run)
            r = np.random.default_rng([seed, run])
            member_split = torch.as_tensor(r.choice(3, size=n_per_run, p=[fractions[0], fractions[1],
                                                                            1 - sum(fractions)]))
            for step in range(1, max(checkpoints) + 1):
                loss = population.loss(params, population.sample_batch(gen)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step in checkpoints:
                    detached = {k: v.detach().clone() for k, v in params.items()}
                    acc = population.evaluate(detached)["test_accuracy"]
                    meta = {"test_accuracy": acc.float(), "epoch": torch.full((n_per_run,), step),
                            "train_size": torch.full((n_per_run,), train_size),
                            "lr": torch.full((n_per_run,), lr), "run": torch.full((n_per_run,), run),
                            "split": member_split.clone()}
                    parts.append(params_to_dataset(net, detached, meta, {"kind": "cnn_zoo"}))
            run += 1
    return WeightDataset.concat(parts)


KINDS = {"digits-inrs": digits_inrs, "sine-inrs": sine_inrs, "cnn-zoo": cnn_zoo}

