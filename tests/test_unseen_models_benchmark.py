"""benchmarks/unseen_models.py: the shipped default trains kinds of models meta-training never showed it."""

import importlib.util
from pathlib import Path

import pytest
import torch

from metaopt import MetaNetOptimizer

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "unseen_models.py"
_spec = importlib.util.spec_from_file_location("unseen_models", _PATH)
um = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(um)

# the deep tanh stack saturates at the default's step size as Adam does at lr 1e-2: a step-size
# matter, measured by the benchmark, not a failure of the rule
TRAINABLE = [name for name in um.MODELS if not name.startswith("deep tanh")]


@pytest.mark.parametrize("name", TRAINABLE)
def test_shipped_default_trains_models_it_was_not_shown(name):
    # the default refreshes its metanetwork every 4 steps (every 8 after step 100); the additive
    # terms' normalisers must be this step's: norm-layer biases start at exactly zero, and
    # 1 / rms(p) of step 1 (~1e15), reused at step 2, once threw the transformer, the LSTM and the
    # BatchNorm CNN to losses of 1e28 or NaN
    moved, before = [], []  # the largest change of any parameter in each step

    def make_optimizer(model):
        opt = MetaNetOptimizer(model.parameters())
        assert opt.learned.config.refresh_every > 1

        def snapshot(optimizer, args, kwargs):
            before[:] = [p.detach().clone() for p in model.parameters()]

        def measure(optimizer, args, kwargs):
            moved.append(max((p - b).abs().max().item() for p, b in zip(model.parameters(), before)))

        opt.register_step_pre_hook(snapshot)
        opt.register_step_post_hook(measure)
        return opt

    # 60 steps: with its distance-weighted momentum (2026-12-06) the default takes ~40 steps to halve the
    # weight-norm MLP's and the dilated CNN's loss (the plain-momentum rule: under 40)
    losses = um.train(name, make_optimizer, steps=60, seed=0)
    assert max(moved) < 1.0, f"a step moved a parameter by {max(moved):.3g}"
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_summary_flags_divergence():
    ok, blown = [2.0, 1.0, 0.5, 0.4], [2.0, 1.0, 50.0, float("nan")]
    assert um.summarize([ok])["diverged"] == 0
    assert um.summarize([ok, blown])["diverged"] == 1
    assert um.summarize([ok])["final"] == pytest.approx(0.4)
