"""Saving and loading learned optimizers: safetensors plus JSON metadata, never pickle.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the
target, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .learned import LearnedOptimizer, LearnedOptimizerConfig

FORMAT = "metaopt-learned-optimizer"
VERSION = 1
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "pretrained" / "default.safetensors"


class CheckpointError(ValueError):
    """A learned-optimizer file that is missing, corrupt, of another version or of other shapes."""


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new one
    (temp file in the same folder, fsync, rename), whatever kills the process in between."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file private (0600); give it what open() would
            os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _new_file_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_learned(learned: LearnedOptimizer, path: str | os.PathLike, **metadata: str) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in learned.state_dict().items()}
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(learned.config.to_dict()),
            **{k: str(v) for k, v in metadata.items()}}
    atomic_write(path, save(tensors, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({e})") from e


def load_learned(path: str | os.PathLike = DEFAULT_PATH, map_location: str | torch.device = "cpu") -> LearnedOptimizer:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such learned-optimizer file")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a metaopt learned optimizer (format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(f"{path}: file format version {meta.get('version')!r}, this metaopt reads {VERSION}")
    try:
        config = LearnedOptimizerConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad config in metadata ({e})") from e
    learned = LearnedOptimizer(config)
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt tensor data ({e})") from e
    load_meta_state(learned, tensors, str(path))
    return learned


def check_meta_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Saved meta-parameters must have ``expected``'s names and shapes and be finite; the error names
    the first that is not (used on loading a learned optimizer and on warm-starting meta-training)."""
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: holds tensors that do not match the config (missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: wrong shape for {k}: file has {tuple(v.shape)}, "
                                  f"config needs {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: {k} has non-finite values")


def load_meta_state(learned: LearnedOptimizer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy meta-parameters in, naming any missing, unexpected or wrongly shaped tensor."""
    check_meta_tensors(learned.state_dict(), tensors, source)
    learned.load_state_dict(tensors)
