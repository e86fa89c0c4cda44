"""Crash-safe checkpoints: safetensors for tensors, a JSON sidecar for everything else.

Layout under ``LOGDIR/checkpoints``::

    LATEST                    # "step_000120": the newest *complete* checkpoint
    step_000120/main.safetensors, main.json              # meta-params, outer Adam, RNGs, counters
    step_000120/groups-rank0.safetensors, ...json         # task-group states (PES particles) per worker

Every file is written to a temp file in its directory, fsync'ed, then ``os.replace``d into place,
and ``LATEST`` is replaced only once every worker has finished its files. A kill at any moment
therefore leaves ``LATEST`` naming a complete checkpoint. Sidecars record each tensor file's sha256,
so corruption is detected (and named) on load. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from metaopt.optim.checkpoint import atomic_write

__all__ = ["CheckpointError", "atomic_write", "write_tensor_file", "read_tensor_file", "encode_tree",
           "decode_tree", "capture_rng", "restore_rng", "CheckpointDir", "FORMAT"]

FORMAT = "meta_train.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the run that loads it."""


def write_tensor_file(stem: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """``stem.safetensors`` (tensors) + ``stem.json`` (meta, tensor index, sha256 of the tensor file)."""
    stem = Path(stem)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = safetensors.torch.save(tensors)
    atomic_write(stem.with_suffix(".safetensors"), blob)
    sidecar = {"format": FORMAT, "file": stem.name + ".safetensors", "sha256": hashlib.sha256(blob).hexdigest(),
               "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()},
               "meta": meta}
    atomic_write(stem.with_suffix(".json"), json.dumps(sidecar, indent=1))


def read_tensor_file(stem: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load and verify a pair written by :func:`write_tensor_file`; errors name the bad file."""
    stem = Path(stem)
    side, data = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (side, data):
        if not p.exists():
            raise CheckpointError(f"checkpoint file missing: {p}")
    try:
        sidecar = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint sidecar is corrupt (not JSON): {side}: {e}") from e
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        got = sidecar.get("format") if isinstance(sidecar, dict) else type(sidecar).__name__
        raise CheckpointError(f"checkpoint sidecar {side} has format {got!r}; this code reads {FORMAT!r}")
    blob = data.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sidecar.get("sha256"):
        raise CheckpointError(f"checkpoint file is corrupt: {data} (sha256 {digest[:12]}..., its sidecar "
                              f"{side.name} expects {str(sidecar.get('sha256'))[:12]}...)")
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint file cannot be parsed as safetensors: {data}: {e}") from e
    index = sidecar.get("tensors", {})
    if set(index) != set(tensors):
        raise CheckpointError(f"checkpoint {data} holds tensors {sorted(tensors)[:5]}... but its sidecar lists "
                              f"{sorted(index)[:5]}...")
    return tensors, sidecar.get("meta", {})


# --- trees of tensors and plain values ----------------------------------------------------------

def encode_tree(tree: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON skeleton of a dict/list/tuple tree; tensors go into ``tensors`` under ``prefix/...`` names."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree
        return {"T": prefix}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError(f"checkpointable trees need string dict keys (at {prefix!r})")
        return {"D": {k: encode_tree(v, f"{prefix}/{k}", tensors) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        tag = "L" if isinstance(tree, list) else "U"
        return {tag: [encode_tree(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"V": tree}
    raise TypeError(f"cannot checkpoint {type(tree).__name__} at {prefix!r}: inner states must be trees of "
                    "dicts/lists/tuples with tensor, int, float, str, bool or None leaves")


def decode_tree(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    (tag, val), = skeleton.items()
    if tag == "T":
        if val not in tensors:
            raise CheckpointError(f"checkpoint lacks tensor {val!r}")
        return tensors[val]
    if tag == "D":
        return {k: decode_tree(v, tensors) for k, v in val.items()}
    if tag in ("L", "U"):
        items = [decode_tree(v, tensors) for v in val]
        return items if tag == "L" else tuple(items)
    return val


# --- random number generators --------------------------------------------------------------------

def capture_rng(tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Global RNG states (torch CPU + CUDA, numpy, python) into ``tensors`` and a JSON-able dict."""
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, state, gauss = random.getstate()
    return {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [version, list(state), gauss]}


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


# --- the checkpoint directory --------------------------------------------------------------------

_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointDir:
    """Step directories plus the ``LATEST`` pointer that commits them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def prepare(self, step: int) -> Path:
        d = self.step_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def commit(self, step: int) -> None:
        atomic_write(self.root / "LATEST", self.step_dir(step).name + "\n")

    def latest(self) -> Path | None:
        """The newest committed checkpoint directory, or None when there is none."""
        pointer = self.root / "LATEST"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not _STEP_RE.match(name):
            raise CheckpointError(f"{pointer} is corrupt: it names {name!r}, not a step directory")
        d = self.root / name
        if not d.is_dir():
            raise CheckpointError(f"{pointer} names {name}, but {d} does not exist")
        return d

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir())

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints, and any uncommitted newer ones."""
        latest = self.latest()
        if latest is None:
            return
        newest = int(_STEP_RE.match(latest.name).group(1))
        committed = [s for s in self.steps() if s <= newest]
        for s in committed[:-keep] + [s for s in self.steps() if s > newest]:
            shutil.rmtree(self.step_dir(s), ignore_errors=True)
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
