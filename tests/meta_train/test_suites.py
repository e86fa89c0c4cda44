"""The task suites of meta_train: every family of the larger suites runs outer steps on the CPU."""

import os

import pytest
import torch

from meta_train.config import Config
from meta_train.loop import MetaTrainer
from meta_train.suites import SUITES, build_problem
from tasks.data import FASHION_MNIST_DIR

needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST idx files not in {FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)")


def _short(suite: str, **kw) -> Config:
    values = dict(SUITES[suite].defaults, suite=suite, outer_steps=1, num_groups=1, tasks_per_group=2,
                  truncation_length=2, min_horizon=4, max_horizon=6, eval_every=0, progress=False, device="cpu")
    values.update(kw)
    return Config(**values)


@needs_fashion
@pytest.mark.parametrize("family", [0, 1, 2], ids=["classify", "inr", "rl"])
def test_large_suite_families_meta_train_on_cpu(tmp_path, family):
    weights = [0.0, 0.0, 0.0]
    weights[family] = 1.0
    config = _short("large", family_weights=weights)
    problem = build_problem(config)
    # the suite's own families, shrunk so that CI runs them in seconds
    classify, _, rl = problem.families
    classify.batch_size, classify.train_size, classify.test_size = 16, 256, 50
    rl.kwargs.update(episodes=4, horizon=20, eval_episodes=2, eval_steps=20)
    trainer = MetaTrainer(config, problem, tmp_path)
    before = {k: v.clone() for k, v in trainer.meta_params().items()}
    trainer.train()
    after = trainer.meta_params()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the outer step moved the metanetwork
    assert [problem.family_name(g.particles.inner["family"]) for g in trainer.groups] == \
        [["classify", "inr", "rl"][family]]


def test_small_suite_defaults_are_the_shipped_recipe():
    # docs/default_run/config.yaml records the run that produced metaopt/pretrained/default.safetensors
    import yaml

    recipe = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "default_run",
                                              "config.yaml")))
    config = Config(**dict(SUITES["small"].defaults, suite="small"))
    for key in ("estimator", "sigma", "loss_transform", "num_groups", "tasks_per_group", "truncation_length",
                "min_horizon", "max_horizon", "outer_lr", "clip_grad_norm", "meta_loss"):
        assert getattr(config, key) == recipe[key], key
