"""benchmarks/optimizer_quality.py: its curve helpers, and its batched Adam grid against plain per-task Adam."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

import tasks

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "optimizer_quality.py"
_spec = importlib.util.spec_from_file_location("optimizer_quality", _PATH)
oq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oq)


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(oq.smooth(np.array([4.0, 2.0, 0.0, 6.0]), 2), [4.0, 3.0, 1.0, 3.0])


def test_steps_to_is_one_based_and_none_when_never_reached():
    curve = np.array([3.0, 2.0, 1.0, 1.0])
    assert oq.steps_to(curve, 1.0, 1) == 3
    assert oq.steps_to(curve, 0.5, 1) is None
    assert oq.steps_to(np.array([1.0, np.nan, 0.0]), 0.5, 1) is None  # NaN poisons the running mean


def test_reference_reaches_its_own_final_loss_and_speedups():
    reference = np.array([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    faster = np.array([[4.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    metrics = [{"psnr": 1.0}]
    own = oq.summarize(reference, metrics, 10, reference)
    assert own["final_loss"] == 1.0 and own["speedup"] == 1.0 and own["diverged"] == 0
    assert own["steps_to_target"] == 4
    fast = oq.summarize(faster, metrics, 10, reference)
    assert fast["steps_to_target"] == 2 and fast["speedup"] == 2.0
    blown = oq.summarize(np.array([[4.0] * 9 + [np.inf]]), metrics, 10, reference)
    assert blown["diverged"] == 1 and blown["steps_to_target"] is None and blown["speedup"] is None
    assert own["rose"] == 0 and blown["rose"] == 0  # a blow-up counts as diverged, not as rose


def test_rose_flags_a_loss_that_climbs_back():
    metrics = [{"psnr": 1.0}]
    climb = np.array([[1.0] + [1e-6] * 10 + [1e-2] * 9])  # reaches 1e-6, ends at 1e-2: below its start
    steady = np.array([[1.0] + [1e-6] * 19])
    assert oq.summarize(climb, metrics, 20, climb)["rose"] == 1
    assert oq.summarize(climb, metrics, 20, climb)["diverged"] == 0
    assert oq.summarize(steady, metrics, 20, steady)["rose"] == 0


@pytest.mark.parametrize("family, config", [
    (tasks.ClassifierFamily(dataset="digits", batch_size=8, train_size=64, test_size=20),
     {"arch": "mlp", "width": 8, "depth": 1, "activation": "tanh"}),
    (tasks.INRFamily(dataset="sine", points=16), {"width": 8, "depth": 1}),
])
def test_adam_grid_matches_torch_adam_task_by_task(family, config):
    seed_tasks = [family.make_task(config, s) for s in range(2)]
    with tqdm(disable=True) as progress:
        curves, metrics = oq.train_adam_grid(seed_tasks, 15, (15,), progress)
    assert all(v.shape == (len(oq.ADAM_LR_GRID), 2) for v in metrics[15].values())
    for i, lr in enumerate(oq.ADAM_LR_GRID):
        for s, task in enumerate(seed_tasks):
            alone = tasks.train(task, lambda p: torch.optim.Adam(p, lr=lr), 15, seed=s)
            # functional vs nn.Module forward: rounding differs, which SIRENs at high lr amplify
            np.testing.assert_allclose(curves[i, s], alone, rtol=1e-2)
