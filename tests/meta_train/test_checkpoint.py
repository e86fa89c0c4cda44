"""Checkpoint files: atomic writes, corruption and mismatch detection that names the culprit."""

import json
import os
import random

import numpy as np
import pytest
import torch

from meta_train.checkpoint import (CheckpointDir, CheckpointError, atomic_write, capture_rng, decode_tree,
                                   encode_tree, read_tensor_file, restore_rng, write_tensor_file)
from meta_train.config import Config
from meta_train.loop import MetaTrainer
from meta_train.suites import SUITES, build_problem


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    # the temp file behind an atomic write is private (0600); the written file must not stay so
    atomic_write(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_tensor_file_round_trip_and_tree_encoding(tmp_path):
    tree = {"params": {"w": torch.randn(3, 2), "b": torch.zeros(3)}, "state": [torch.ones(3), (torch.arange(3),)],
            "step": 7, "name": "x", "none": None, "flag": True}
    tensors = {}
    skeleton = encode_tree(tree, "inner", tensors)
    write_tensor_file(tmp_path / "t", tensors, {"skeleton": skeleton})
    loaded, meta = read_tensor_file(tmp_path / "t")
    back = decode_tree(meta["skeleton"], loaded)
    assert back["step"] == 7 and back["name"] == "x" and back["none"] is None and back["flag"] is True
    assert isinstance(back["state"][1], tuple)
    assert torch.equal(back["params"]["w"], tree["params"]["w"]) and back["state"][1][0].dtype == torch.int64
    with pytest.raises(TypeError, match="cannot checkpoint set"):
        encode_tree({"bad": {1, 2}}, "inner", {})


def test_corrupt_files_are_named(tmp_path):
    write_tensor_file(tmp_path / "t", {"a": torch.arange(10.0)}, {})
    blob = bytearray((tmp_path / "t.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "t.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"corrupt: .*t\.safetensors"):
        read_tensor_file(tmp_path / "t")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"sidecar is corrupt.*t\.json"):
        read_tensor_file(tmp_path / "t")
    (tmp_path / "t.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing: .*t\.json"):
        read_tensor_file(tmp_path / "t")
    (tmp_path / "t.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(CheckpointError, match="format"):
        read_tensor_file(tmp_path / "t")


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    tensors = {}
    meta = json.loads(json.dumps(capture_rng(tensors)))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(tensors, meta)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_latest_pointer_errors(tmp_path):
    d = CheckpointDir(tmp_path)
    assert d.latest() is None
    (tmp_path / "LATEST").write_text("step_000010\n")
    with pytest.raises(CheckpointError, match="step_000010.*does not exist"):
        d.latest()
    (tmp_path / "LATEST").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="LATEST is corrupt"):
        d.latest()


def _tiny(**kw):
    return Config(**{**SUITES["tiny"].defaults, "suite": "tiny", "progress": False, "outer_steps": 2,
                     "checkpoint_every": 2, "tasks_per_group": 2, "min_horizon": 5, "max_horizon": 5, **kw})


def test_trainer_checkpoint_mismatches_are_named(tmp_path):
    cfg = _tiny()
    MetaTrainer(cfg, build_problem(cfg), tmp_path).train()

    with pytest.raises(CheckpointError, match=r"different config \(sigma: checkpoint 0.01 vs now 0.02"):
        MetaTrainer(cfg.replace(sigma=0.02), build_problem(cfg), tmp_path, resume=True)

    class Wider:  # same run, but the metanetwork changed shape
        def __init__(self, inner):
            self.inner, self.device = inner, inner.device

        def init_meta_params(self):
            return {k: torch.zeros(3) if k == "log_lr" else v for k, v in self.inner.init_meta_params().items()}

    with pytest.raises(CheckpointError, match=r"'log_lr' has shape \[\], the problem's has \[3\]"):
        MetaTrainer(cfg, Wider(build_problem(cfg)), tmp_path, resume=True)

    latest = CheckpointDir(tmp_path / "checkpoints").latest()
    (latest / "groups-rank0.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"groups-rank0\.safetensors"):
        MetaTrainer(cfg, build_problem(cfg), tmp_path, resume=True)
    for f in latest.glob("groups-rank0.*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no state for task group\(s\) \[0\]"):
        MetaTrainer(cfg, build_problem(cfg), tmp_path, resume=True)


def test_checkpoints_are_pruned_to_keep(tmp_path):
    cfg = _tiny(outer_steps=5, checkpoint_every=1, keep_checkpoints=2)
    MetaTrainer(cfg, build_problem(cfg), tmp_path).train()
    assert CheckpointDir(tmp_path / "checkpoints").steps() == [4, 5]
    # the files are plain safetensors + JSON; loading them never unpickles
    blob = (tmp_path / "checkpoints" / "step_000005" / "main.json").read_text()
    assert json.loads(blob)["meta"]["step"] == 5
