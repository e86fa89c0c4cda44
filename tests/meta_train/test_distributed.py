"""Two gloo workers (torchrun on 127.0.0.1, one thread each) reproduce a one-process run bit for bit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meta_train.__main__ import main
from meta_train.checkpoint import CheckpointDir, read_tensor_file

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--suite", "tiny", "--num-groups", "3", "--tasks-per-group", "2", "--truncation-length", "3",
       "--min-horizon", "4", "--max-horizon", "12", "--seed", "5", "--checkpoint-every", "2", "--no-progress",
       "--torch-threads", "1"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meta(run):
    d = CheckpointDir(run / "checkpoints").latest()
    tensors, meta = read_tensor_file(d / "main")
    return meta["step"], tensors


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "meta_train", *RUN,
           "--outer-steps", "4", "--logdir", str(two)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = CheckpointDir(two / "checkpoints").latest()
    assert {p.name for p in ckpt.glob("groups-rank*.safetensors")} == {"groups-rank0.safetensors",
                                                                       "groups-rank1.safetensors"}

    assert main([*RUN, "--outer-steps", "4", "--logdir", str(one)]) == 0
    (sa, a), (sb, b) = _meta(two), _meta(one)
    assert sa == sb == 4
    for k in a:
        if k.startswith(("meta/", "adam/")):
            assert torch.equal(a[k], b[k]), k
    la = [json.loads(s)["meta_loss"] for s in (two / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s)["meta_loss"] for s in (one / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4

    # The 2-worker run resumes in one process (group states are found by id) and stays identical.
    assert main([*RUN, "--outer-steps", "6", "--logdir", str(two), "--resume"]) == 0
    assert main([*RUN, "--outer-steps", "6", "--logdir", str(one), "--resume"]) == 0
    (sa, a), (sb, b) = _meta(two), _meta(one)
    assert sa == sb == 6
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("meta/", "adam/")))
