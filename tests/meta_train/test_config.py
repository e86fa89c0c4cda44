"""Config: YAML round trip, flags, precedence, and what --resume may change."""

import argparse

import pytest

from meta_train.__main__ import build_parser, resolve_config
from meta_train.config import ADAM_LR_GRID, Config, ConfigError
from meta_train.suites import SUITES


def test_yaml_round_trip(tmp_path):
    cfg = Config(suite="tiny", estimator="es", eval_lrs=[1e-3, 1e-2], outer_betas=[0.8, 0.99], antithetic=False)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert Config.from_yaml(tmp_path / "c.yaml") == cfg
    assert tuple(Config().eval_lrs) == ADAM_LR_GRID


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="'estimator'"):
        Config(estimator="sgd")
    with pytest.raises(ConfigError, match="max_horizon"):
        Config(min_horizon=10, max_horizon=5)
    with pytest.raises(ConfigError, match="'refresh_every' must be >= 1"):
        Config(refresh_every=0)
    with pytest.raises(ConfigError, match="max_mix"):
        Config(max_mix=-0.1)
    with pytest.raises(ConfigError, match="amsgrad_from"):
        Config(amsgrad_from=-1)
    (tmp_path / "c.yaml").write_text("sigmaa: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['sigmaa'\]"):
        Config.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_yaml(tmp_path / "c.yaml")


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_precedence_defaults_suite_yaml_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("truncation_length: 7\nsigma: 0.05\n")
    cfg, resuming = resolve_config(_args("--logdir", str(tmp_path / "run"), "--suite", "tiny", "--config",
                                         str(tmp_path / "c.yaml"), "--sigma", "0.02", "--no-antithetic",
                                         "--eval-lrs", "0.001", "0.01"))
    assert not resuming
    assert cfg.tasks_per_group == SUITES["tiny"].defaults["tasks_per_group"]  # suite default
    assert cfg.truncation_length == 7  # YAML beats the suite
    assert cfg.sigma == 0.02  # the flag beats YAML
    assert cfg.antithetic is False and cfg.eval_lrs == [0.001, 0.01]
    assert cfg.outer_steps == Config().outer_steps  # dataclass default


def test_resume_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    Config(suite="tiny", sigma=0.01, outer_steps=10).to_yaml(run / "config.yaml")
    with pytest.raises(ConfigError, match="already holds a run"):
        resolve_config(_args("--logdir", str(run), "--suite", "tiny"))
    cfg, resuming = resolve_config(_args("--logdir", str(run), "--resume", "--outer-steps", "20"))
    assert resuming and cfg.outer_steps == 20 and cfg.sigma == 0.01
    with pytest.raises(ConfigError, match="cannot change sigma: saved 0.01, given 0.02"):
        resolve_config(_args("--logdir", str(run), "--resume", "--sigma", "0.02"))
    # --resume on an empty logdir starts the run (handy for preemptible jobs)
    cfg, resuming = resolve_config(_args("--logdir", str(tmp_path / "new"), "--resume", "--suite", "tiny"))
    assert not resuming and cfg.suite == "tiny"


def test_every_field_has_a_flag():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if isinstance(a, argparse.Action)}
    assert set(Config.__dataclass_fields__) <= dests
