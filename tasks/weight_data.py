"""Weight-space datasets: many trained networks of one architecture, stored as packed arrays.

A dataset is a folder of shards ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...
Each shard holds, for ``n`` networks, one tensor per layer (``weight.{i}`` ``[n, n_out, n_in,
*kernel]`` and ``bias.{i}`` ``[n, n_out]``) and per-network metadata columns ``meta.{name}``
(``[n]``: label, split, seed, psnr, test accuracy, ...).  The safetensors header carries the
architecture (:class:`metaopt.WeightSpaceSpec` as JSON) and the recipe that made the data.

Why shards: builders write one shard at a time atomically (temp file + rename), so a killed
build loses at most the shard in progress and resumes by skipping the shards already on disk.
Why safetensors: loading never unpickles; a corrupt or mismatched shard fails with an error
that names the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from metaopt import LayerSpec, WeightSpace, WeightSpaceSpec
from metaopt.optim.checkpoint import atomic_write

__all__ = ["WeightDataset", "WeightDataError", "SPLITS", "shard_path", "existing_shards", "missing_shards",
           "RECIPE_FILE"]

RECIPE_FILE = "recipe.json"  # how a folder was built (tasks.make_data), and how many shards it makes
FORMAT = "metaopt-weight-dataset"
VERSION = 1
SPLITS = {"train": 0, "val": 1, "test": 2}


class WeightDataError(ValueError):
    """A weight dataset that is missing, corrupt, of another version or with inconsistent shards."""


def _spec_to_json(spec: WeightSpaceSpec) -> str:
    return json.dumps([asdict(layer) for layer in spec.layers])


def _spec_from_json(text: str) -> WeightSpaceSpec:
    layers = []
    for d in json.loads(text):
        d["kernel"] = tuple(d["kernel"])
        layers.append(LayerSpec(**d))
    return WeightSpaceSpec(tuple(layers))


@dataclass
class WeightDataset:
    """Weights ``[N, n_out, n_in, *kernel]`` and biases ``[N, n_out]`` per layer, plus metadata columns ``[N]``."""

    spec: WeightSpaceSpec
    weights: list[Tensor]
    biases: list[Tensor]
    meta: dict[str, Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # JSON-able: recipe, source data set, ...

    def __post_init__(self):
        n = len(self)
        if len(self.weights) != self.spec.num_layers or len(self.biases) != self.spec.num_layers:
            raise WeightDataError(f"{len(self.weights)} weights / {len(self.biases)} biases for a "
                                  f"{self.spec.num_layers}-layer spec")
        for i, (w, b, layer) in enumerate(zip(self.weights, self.biases, self.spec.layers)):
            if tuple(w.shape[1:]) != (layer.n_out, layer.n_in, *layer.kernel) or tuple(b.shape[1:]) != (layer.n_out,):
                raise WeightDataError(f"layer {i}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not match "
                                      f"spec {layer}")
            if w.shape[0] != n or b.shape[0] != n:
                raise WeightDataError(f"layer {i}: {w.shape[0]} weights and {b.shape[0]} biases for {n} networks")
        for name, col in self.meta.items():
            if col.dim() != 1 or col.shape[0] != n:
                raise WeightDataError(f"metadata {name!r} has shape {tuple(col.shape)}, expected ({n},)")

    def __len__(self) -> int:
        return self.weights[0].shape[0]

    def __repr__(self) -> str:
        return f"WeightDataset({len(self)} networks, [{self.spec}], meta={sorted(self.meta)})"

    # ------------------------------------------------------------------ selection
    def select(self, index: Tensor | Sequence[int] | slice) -> "WeightDataset":
        """The networks at ``index`` (indices, a boolean mask or a slice)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        return WeightDataset(self.spec, [w[index] for w in self.weights], [b[index] for b in self.biases],
                             {k: v[index] for k, v in self.meta.items()}, dict(self.info))

    def split(self, name: str) -> "WeightDataset":
        """The ``train``, ``val`` or ``test`` networks (by the ``split`` metadata column)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose from {sorted(SPLITS)}")
        if "split" not in self.meta:
            raise WeightDataError("this dataset has no 'split' metadata column")
        return self.select(self.meta["split"] == SPLITS[name])

    def weight_space(self, index: Tensor | Sequence[int] | slice | None = None, device=None,
                     dtype: torch.dtype | None = None) -> WeightSpace:
        """A one-channel :class:`WeightSpace` of the networks at ``index`` (all by default)."""
        index = slice(None) if index is None else index

        def take(t: Tensor) -> Tensor:
            return t[index].to(device=device, dtype=dtype)[:, None]

        return WeightSpace([take(w) for w in self.weights], [take(b) for b in self.biases], self.spec)

    @classmethod
    def concat(cls, parts: Sequence["WeightDataset"]) -> "WeightDataset":
        if not parts:
            raise WeightDataError("nothing to concatenate")
        spec, keys = parts[0].spec, set(parts[0].meta)
        for j, p in enumerate(parts[1:], start=1):
            if p.spec != spec:
                raise WeightDataError(f"part {j} has architecture [{p.spec}], part 0 has [{spec}]")
            if set(p.meta) != keys:
                raise WeightDataError(f"part {j} has metadata {sorted(p.meta)}, part 0 has {sorted(keys)}")
        return cls(spec, [torch.cat([p.weights[i] for p in parts]) for i in range(spec.num_layers)],
                   [torch.cat([p.biases[i] for p in parts]) for i in range(spec.num_layers)],
                   {k: torch.cat([p.meta[k] for p in parts]) for k in keys}, dict(parts[0].info))

    # ------------------------------------------------------------------ storage
    def save_shard(self, path: str | Path) -> None:
        """Write this dataset as one shard file, atomically."""
        tensors = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            tensors[f"weight.{i}"] = w.detach().cpu().contiguous()
            tensors[f"bias.{i}"] = b.detach().cpu().contiguous()
        for name, col in self.meta.items():
            tensors[f"meta.{name}"] = col.detach().cpu().contiguous()
        header = {"format": FORMAT, "version": str(VERSION), "spec": _spec_to_json(self.spec),
                  "info": json.dumps(self.info)}
        atomic_write(path, save(tensors, metadata=header))

    @classmethod
    def load_shard(cls, path: str | Path) -> "WeightDataset":
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise WeightDataError(f"{path}: not a metaopt weight dataset shard (format "
                                          f"{header.get('format')!r})")
                if header.get("version") != str(VERSION):
                    raise WeightDataError(f"{path}: shard version {header.get('version')!r}, this metaopt reads "
                                          f"version {VERSION}")
                spec = _spec_from_json(header["spec"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise WeightDataError(f"{path}: no such shard") from None
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightDataError(f"{path}: corrupt shard ({e})") from e
        try:
            weights = [tensors[f"weight.{i}"] for i in range(spec.num_layers)]
            biases = [tensors[f"bias.{i}"] for i in range(spec.num_layers)]
        except KeyError as e:
            raise WeightDataError(f"{path}: missing tensor {e}") from None
        meta = {k[len("meta."):]: v for k, v in tensors.items() if k.startswith("meta.")}
        try:
            return cls(spec, weights, biases, meta, json.loads(header.get("info", "{}")))
        except WeightDataError as e:
            raise WeightDataError(f"{path}: {e}") from None

    @classmethod
    def load(cls, folder: str | Path, partial: bool = False) -> "WeightDataset":
        """All shards of a dataset folder, concatenated in shard order.

        An unfinished build (a killed one, or one whose other ``--worker`` s are still running) is
        an error naming the missing shards, so that no experiment silently runs on part of the
        data; ``partial=True`` loads the shards that are there."""
        folder = Path(folder)
        shards = existing_shards(folder)
        if not shards:
            raise WeightDataError(f"{folder}: no shard-*.safetensors files (build the dataset first: "
                                  f"python -m tasks make-data --help)")
        missing = missing_shards(folder)
        if missing and not partial:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise WeightDataError(f"{folder}: the build is unfinished: {len(missing)} shard(s) missing ({shown}); "
                                  f"re-run its make-data command to finish it, or load(..., partial=True)")
        return cls.concat([cls.load_shard(p) for p in shards])


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def existing_shards(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("shard-[0-9][0-9][0-9][0-9][0-9].safetensors"))


def shard_index(path: Path) -> int:
    return int(path.name[len("shard-"):-len(".safetensors")])


def expected_shards(folder: str | Path) -> int | None:
    """How many shards the folder's build makes, as its ``recipe.json`` records (None: not recorded)."""
    path = Path(folder) / RECIPE_FILE
    if not path.exists():
        return None
    try:
        count = json.loads(path.read_text()).get("shards")
    except (json.JSONDecodeError, AttributeError) as e:
        raise WeightDataError(f"{path}: unreadable ({e}); delete the folder to rebuild it") from None
    return None if count is None else int(count)


def missing_shards(folder: str | Path) -> list[int]:
    """Shard indices a complete folder would have and this one lacks (gaps, and absent last shards
    when ``recipe.json`` says how many there are)."""
    on_disk = {shard_index(p) for p in existing_shards(folder)}
    total = expected_shards(folder)
    if total is None:
        total = max(on_disk, default=-1) + 1
    return sorted(set(range(total)) - on_disk)
