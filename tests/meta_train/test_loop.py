"""The outer loop: resumable bit for bit, skips non-finite meta-gradients, actually meta-learns."""

import json
import math
import statistics

import pytest
import torch

from meta_train.config import Config
from meta_train.distributed import owned_groups
from meta_train.evaluate import MetaEvaluator
from meta_train.loop import MetaTrainer, NonFiniteMetaGradient, TruncationSchedule
from meta_train.suites import SUITES, build_problem


def tiny_config(**kw):
    values = dict(SUITES["tiny"].defaults, suite="tiny", progress=False, num_groups=2, tasks_per_group=2,
                  truncation_length=3, min_horizon=6, max_horizon=12)
    values.update(kw)
    return Config(**values)


def _state(trainer):
    out = {f"meta/{k}": v.detach().clone() for k, v in trainer.meta_params().items()}
    for idx, st in trainer.outer_opt.state_dict()["state"].items():
        out.update({f"adam/{idx}/{k}": v.clone() for k, v in st.items()})
    for g in trainer.groups:
        out[f"g{g.gid}/gen"] = g.generator.get_state()
        out.update({f"g{g.gid}/{k}": v for k, v in g.particles.inner["params"].items()})
    return out


def _metrics(logdir):
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["pes", "es", "tbptt"])
def test_resume_continues_bit_for_bit(tmp_path, estimator):
    cfg = tiny_config(estimator=estimator, outer_steps=8, checkpoint_every=3)
    full = MetaTrainer(cfg, build_problem(cfg), tmp_path / "full")
    full.train()

    MetaTrainer(cfg, build_problem(cfg), tmp_path / "cut").train(outer_steps=5)  # checkpoints at 3 and 5
    resumed = MetaTrainer(cfg, build_problem(cfg), tmp_path / "cut", resume=True)
    assert resumed.step == 5
    resumed.train()

    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [m["step"] for m in mb] == list(range(1, 9))
    assert [m["meta_loss"] for m in ma] == [m["meta_loss"] for m in mb]
    assert (tmp_path / "cut" / "checkpoints" / "LATEST").read_text().strip() == "step_000008"


def test_resuming_drops_log_lines_after_the_checkpoint(tmp_path):
    cfg = tiny_config(outer_steps=4, checkpoint_every=2)
    MetaTrainer(cfg, build_problem(cfg), tmp_path).train()
    # pretend the process died after step 4 was logged but before its checkpoint: roll LATEST back
    (tmp_path / "checkpoints" / "LATEST").write_text("step_000002\n")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "meta_lo')  # a line cut short by the kill
    t = MetaTrainer(cfg.replace(outer_steps=6), build_problem(cfg), tmp_path, resume=True)
    assert t.step == 2
    assert not (tmp_path / "checkpoints" / "step_000004").exists()  # uncommitted: removed on resume
    t.train()
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


class FlakyQuadratic:
    """A quadratic meta-objective whose unroll returns NaN losses on chosen calls."""

    def __init__(self, bad_calls):
        self.calls, self.bad_calls = 0, set(bad_calls)
        self.device = torch.device("cpu")

    def init_meta_params(self):
        return {"theta": torch.tensor([1.0, -1.0])}

    def init_inner(self, num_tasks, generator):
        return {"n": torch.zeros(num_tasks)}

    def unroll(self, meta_params, inner, num_steps, generator, *, batched):
        self.calls += 1
        p = inner["n"].shape[0]
        th = meta_params["theta"] if batched else meta_params["theta"].expand(p, -1)
        loss = (th**2).sum(1)
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        return loss[:, None].expand(p, num_steps), inner


def test_nonfinite_meta_gradients_are_skipped_warned_and_counted(tmp_path):
    cfg = Config(outer_steps=4, num_groups=1, tasks_per_group=4, truncation_length=1, min_horizon=2, max_horizon=2,
                 estimator="es", outer_lr=0.1, progress=False)
    trainer = MetaTrainer(cfg, FlakyQuadratic(bad_calls={2}), tmp_path)
    trainer.outer_step()
    before = trainer.meta_params()["theta"].clone()
    with pytest.warns(NonFiniteMetaGradient, match="step 2"):
        m = trainer.outer_step()
    assert m["skipped"] and trainer.skipped == 1
    assert torch.equal(trainer.meta_params()["theta"], before)
    assert trainer.groups[0].particles is None  # the diverged group restarts
    m = trainer.outer_step()
    assert not m["skipped"] and not torch.equal(trainer.meta_params()["theta"], before)


def test_meta_training_improves_the_tiny_suite(tmp_path):
    cfg = tiny_config(outer_steps=40, num_groups=1, tasks_per_group=4, min_horizon=10, max_horizon=40)
    problem = build_problem(cfg)
    trainer = MetaTrainer(cfg, problem, tmp_path)
    ev = MetaEvaluator(build_problem(cfg), lrs=[1e-2], num_tasks=4, num_steps=40, seed=7)
    before = ev(trainer.meta_params()).summary()["linreg"]["learned"]
    trainer.train()
    after = ev(trainer.meta_params()).summary()["linreg"]["learned"]
    assert after < 0.2 * before, (before, after)
    assert float(trainer.meta_params()["log_lr"]) > math.log(3e-3) + 1  # it learned a larger step size


def test_truncation_schedule_covers_runs():
    s = TruncationSchedule(truncation_length=5, min_horizon=10, max_horizon=1000, stagger=True)
    g = torch.Generator().manual_seed(0)
    hs = [s.sample_horizon(g) for _ in range(4000)]
    assert min(hs) >= 10 and max(hs) <= 1000
    # log-uniform: the median is the geometric mean of the bounds (100), the mean of logs its log
    assert abs(statistics.median(hs) / 100 - 1) < 0.1
    offsets = [s.first_offset(100, g) for _ in range(4000)]
    assert min(offsets) >= 0 and max(offsets) <= 99 and abs(statistics.mean(offsets) - 49.5) < 3
    assert s.length(97, 100) == 3 and s.length(0, 100) == 5
    assert TruncationSchedule(5, 10, 100, stagger=False).first_offset(100, g) == 0


def test_groups_are_split_round_robin():
    assert sorted(owned_groups(5, 0, 2) + owned_groups(5, 1, 2)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least the number of workers"):
        owned_groups(1, 0, 2)


def test_tensorboard_and_meta_eval_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(outer_steps=4, eval_every=2, eval_steps=10, eval_lrs=[1e-2, 1e-1])
    MetaTrainer(cfg, build_problem(cfg), tmp_path).train()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("meta/loss", "meta/grad_norm", "estimator/variance", "throughput/inner_steps_per_s",
                "meta_eval/linreg/learned_final_loss", "meta_eval/linreg/adam_best_final_loss"):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("meta_eval/linreg/learned_final_loss")] == [0, 2, 4]
    assert "meta_eval/curves" in acc.Tags()["images"]
    records = [json.loads(line) for line in (tmp_path / "meta_eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert set(records[-1]["linreg"]["adam"]) == {"0.01", "0.1"}


def test_init_from_starts_at_the_saved_meta_parameters_and_names_mismatches(tmp_path):
    from meta_train.checkpoint import CheckpointError
    from metaopt.optim.checkpoint import DEFAULT_PATH, load_learned

    shipped = load_learned(DEFAULT_PATH).state_dict()
    # the shipped rule takes its step size from Prodigy's distance estimate: a fine-tune says so
    small = Config(**dict(SUITES["small"].defaults, suite="small", progress=False, num_groups=1,
                          tasks_per_group=2, init_from=str(DEFAULT_PATH), step_size="prodigy"))
    with pytest.raises(CheckpointError, match="step_size"):
        MetaTrainer(small.replace(step_size="fixed"), build_problem(small.replace(step_size="fixed")))
    trainer = MetaTrainer(small, build_problem(small))
    assert all(torch.equal(trainer.meta_params()[k], v) for k, v in shipped.items())
    fresh = MetaTrainer(small.replace(init_from=""), build_problem(small))
    assert not all(torch.equal(fresh.meta_params()[k], v) for k, v in shipped.items())
    # how often the metanetwork runs and its late phase may change in a fine-tune; the problem's rule
    # runs with the new settings, here a late phase from the first inner steps (its state rides along)
    # two outer steps: the second unroll starts from the state flattened after the first
    # (and whether the momentum follows the distance estimate, as the shipped file's does)
    every_4 = small.replace(refresh_every=4, late_refresh_every=2, max_mix=0.0, mix_decay_from=1, amsgrad_from=2,
                            lr_decay_from=3, distance_weighted_momentum=True, param_term_follows_gradient=True,
                            hypergradient_from=3, distance_init=1e-3, distance_growth=1.1, outer_steps=2, max_horizon=20,
                            min_horizon=20, truncation_length=5, stagger=False)
    retuned = MetaTrainer(every_4, build_problem(every_4))
    assert all(torch.equal(retuned.meta_params()[k], v) for k, v in shipped.items())
    config = retuned.problem.opt.config
    assert (config.refresh_every, config.late_refresh_every, config.max_mix, config.mix_decay_from,
            config.amsgrad_from, config.lr_decay_from, config.distance_weighted_momentum,
            config.param_term_follows_gradient, config.hypergradient_from, config.distance_init,
            config.distance_growth) == (4, 2, 0, 1, 2, 3, True, True, 3, 1e-3, 1.1)
    retuned.train()
    assert not all(torch.equal(retuned.meta_params()[k], v) for k, v in shipped.items())

    # the large suite's learned optimizer has another base lr: the file's config says so
    large = Config(**dict(SUITES["large"].defaults, suite="large", progress=False, num_groups=1,
                          tasks_per_group=2, init_from=str(DEFAULT_PATH)))
    with pytest.raises(CheckpointError, match="lr"):
        MetaTrainer(large, build_problem(large))
    # the tiny suite's meta-parameters are not a metanetwork's
    with pytest.raises(CheckpointError, match="holds"):
        MetaTrainer(tiny_config(init_from=str(DEFAULT_PATH)), build_problem(tiny_config()))
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(DEFAULT_PATH.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        MetaTrainer(small.replace(init_from=str(corrupt)), build_problem(small))
