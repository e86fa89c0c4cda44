"""The command line, including kill -9 in the middle of a run and --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from meta_train.__main__ import main
from meta_train.checkpoint import CheckpointDir, read_tensor_file

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


RUN = ["--suite", "tiny", "--outer-steps", "100", "--checkpoint-every", "5", "--tasks-per-group", "2",
       "--truncation-length", "2", "--min-horizon", "4", "--max-horizon", "16", "--seed", "3", "--no-progress",
       "--torch-threads", "1"]


def _final_tensors(run):
    d = CheckpointDir(run / "checkpoints").latest()
    main_t, meta = read_tensor_file(d / "main")
    groups, _ = read_tensor_file(d / "groups-rank0")
    return d.name, meta["step"], {**main_t, **groups}


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc = subprocess.Popen([sys.executable, "-m", "meta_train", *RUN, "--logdir", str(run)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 90
    try:
        while not latest.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 90 s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = CheckpointDir(run / "checkpoints").latest().name
    assert killed_at != "step_000100"

    assert main([*RUN, "--logdir", str(run), "--resume"]) == 0
    assert main([*RUN, "--logdir", str(ref)]) == 0

    name_a, step_a, a = _final_tensors(run)
    name_b, step_b, b = _final_tensors(ref)
    assert name_a == name_b == "step_000100" and step_a == step_b == 100
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (run / "meta_params.safetensors").read_bytes() == (ref / "meta_params.safetensors").read_bytes()
    # logs: every step exactly once, with the uninterrupted run's values
    ma = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(s) for s in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ma] == list(range(1, 101))
    assert [m["meta_loss"] for m in ma] == [m["meta_loss"] for m in mb]


def test_cli_errors_and_listing(tmp_path, capsys):
    assert main(["--list-suites"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["--suite", "nope", "--logdir", str(tmp_path / "x")]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    args = ["--suite", "tiny", "--outer-steps", "2", "--no-progress", "--logdir", str(tmp_path / "r")]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args[:-2], "--outer-steps", "3", "--logdir", str(tmp_path / "r"), "--resume"]) == 0
    meta = safetensors.torch.load_file(str(tmp_path / "r" / "meta_params.safetensors"))
    assert set(meta) == {"log_lr", "logit_momentum"}
    assert CheckpointDir(tmp_path / "r" / "checkpoints").latest().name == "step_000003"
