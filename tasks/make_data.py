"""Builders of weight-space datasets: SIRENs fitted to images, SIRENs fitted to sine waves, a zoo of CNNs.

Every builder writes one folder that :meth:`tasks.weight_data.WeightDataset.load` reads::

    DIR/recipe.json              how the data was made: the builder's settings, resolved
    DIR/shard-00000.safetensors  networks 0 .. shard_size-1 and their metadata columns
    DIR/shard-00001.safetensors  ...

Why this shape:

* a shard is one population trained together (fast batched training) and written atomically,
  so a killed build loses at most the shard in progress;
* re-running the same build skips the shards already on disk (resume, and a cache: a finished
  build returns at once).  A shard depends only on the recipe and its index, never on what ran
  before it, so a resumed build is bit-identical to an uninterrupted one on the same device;
* a build whose recipe differs from the folder's ``recipe.json`` stops with an error instead of
  mixing two datasets in one folder.

Seeds are a hash of the build seed and what a network *is* (image index and view, sine index,
model index), so extra views are independent fits and every network can be rebuilt alone.

Command line: ``python -m tasks make-data {inr,sine,zoo} --out DIR`` (``--help`` for options);
the recipes are tabulated in ``docs/standalone.md``.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import Tensor
from tqdm.auto import tqdm

from metaopt.optim.checkpoint import atomic_write
from metaopt.weight_space import spec_from_module

from .base import Network, Params, Population
from .classify import NUM_CLASSES, cnn
from .data import FASHION_MNIST_DIR, digits_split_indices, load_digits, load_fashion_mnist, load_images
from .inr import INRTask, SirenFit, psnr, siren
from .weight_data import (RECIPE_FILE, SPLITS, WeightDataError, WeightDataset, existing_shards, shard_index,
                          shard_path)

__all__ = [
    "build_image_inrs", "build_sine_inrs", "build_classifier_zoo", "fit_sirens", "FitResult", "image_splits",
    "ImageSplits", "sine_signal", "network_for", "read_recipe", "derive_seed", "resolve_device", "RECIPE_FILE",
    "IMAGE_INR_DATASETS", "IMAGE_SIZES", "evaluate_classifiers",
]

IMAGE_SIZES = {"fashion_mnist": 28, "fashion_mnist_8x8": 8, "digits": 8}  # the image datasets read here -> side
IMAGE_INR_DATASETS = tuple(IMAGE_SIZES)
FASHION_VAL = 5000  # the last 5000 images of the Fashion-MNIST training file are the validation split
DIGITS_VAL_FRACTION = 0.1

# Tags keep the seed streams of different purposes apart (derive_seed(seed, TAG, ...)).
_INIT, _SINE, _ZOO_MODEL, _ZOO_BATCHES, _SPLIT, _ZOO_SUBSET = 1, 2, 3, 4, 5, 6

OnShard = Callable[[int, WeightDataset], None]


# ---------------------------------------------------------------------------------------
# small helpers


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from non-negative integer keys; different keys give independent streams."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when there is a GPU, else CPU; asking for a missing GPU is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but torch sees no CUDA GPU (use --device cpu)")
    return device


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not float(seed).is_integer() or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_positive(**values) -> None:
    for name, v in values.items():
        if v is None or not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")


def _check_range(name: str, r: Sequence[float], log: bool = False) -> tuple[float, float]:
    if len(r) != 2 or not r[0] <= r[1]:
        raise ValueError(f"{name} must be a range (low, high) with low <= high, got {tuple(r)!r}")
    if log and not r[0] > 0:
        raise ValueError(f"{name} is sampled log-uniformly, so its range must be > 0, got {tuple(r)!r}")
    return float(r[0]), float(r[1])


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1, "
                         f"got {tuple(fractions)!r}")
    return tuple(float(f) for f in fractions)


def _split_codes(n: int, fractions: Sequence[float], seed: int) -> Tensor:
    """Split codes (:data:`SPLITS`) for ``n`` items: exact counts, positions by a seeded permutation."""
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    order = torch.from_numpy(np.random.default_rng([seed, _SPLIT]).permutation(n))
    codes = torch.full((n,), SPLITS["train"], dtype=torch.int64)
    codes[order[n - n_val - n_test:n - n_test]] = SPLITS["val"]
    codes[order[n - n_test:]] = SPLITS["test"]
    return codes


def _to_dataset(network: Network, params: Params, meta: dict[str, Tensor], recipe: dict) -> WeightDataset:
    """Stacked parameters ``{name: [P, ...]}`` -> the packed per-layer layout of a :class:`WeightDataset`."""
    spec = spec_from_module(network.template)
    P = network.check(params)
    weights = [params[l.weight_name].reshape(P, l.n_out, l.n_in, *l.kernel).float().cpu() for l in spec.layers]
    biases = [params[l.bias_name].float().cpu() for l in spec.layers]
    return WeightDataset(spec, weights, biases, {k: v.cpu() for k, v in meta.items()}, {"recipe": recipe})


# ---------------------------------------------------------------------------------------
# recipe.json and the shard loop shared by the builders


def _jsonable(recipe: dict) -> dict:
    return json.loads(json.dumps(recipe))  # tuples -> lists, so it compares equal to what is read back


def read_recipe(folder: str | Path) -> dict:
    """The recipe a dataset folder was built with (the ``recipe`` entry of its ``recipe.json``)."""
    path = Path(folder) / RECIPE_FILE
    try:
        return json.loads(path.read_text())["recipe"]
    except FileNotFoundError:
        raise WeightDataError(f"{path}: not found (is {folder} a dataset built by `python -m tasks make-data`?)") \
            from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightDataError(f"{path}: unreadable recipe ({e}); delete the folder to rebuild it") from None


def _open_folder(out: str | Path, recipe: dict, notes: dict, device: torch.device) -> Path:
    """Create ``out`` with its recipe.json, or check that the existing one asks for the same data."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WeightDataError(f"{out} exists and is not a folder")
    if (out / RECIPE_FILE).exists():
        stored = read_recipe(out)
        if stored.get("builder") in ("image_inrs", "sine_inrs"):
            stored.setdefault("init", "sitzmann")  # folders built before the init was a recipe option
        if stored != recipe:
            diffs = [f"{k}: folder has {stored.get(k)!r}, this build asks {recipe.get(k)!r}"
                     for k in sorted(set(stored) | set(recipe)) if stored.get(k) != recipe.get(k)]
            raise WeightDataError(f"{out} holds a dataset built with another recipe ({'; '.join(diffs)}). "
                                  f"Build into a new --out folder, or delete {out} to rebuild it.")
    else:
        if existing_shards(out):
            raise WeightDataError(f"{out} has shard files but no {RECIPE_FILE}, so how they were made is unknown; "
                                  "build into an empty folder")
        built_with = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
        atomic_write(out / RECIPE_FILE,
                     json.dumps({"recipe": recipe, "notes": notes, "built_with": built_with}, indent=2) + "\n")
    return out


def _record_shard_count(out: Path, n_shards: int) -> None:
    """Write the shard count into recipe.json: ``WeightDataset.load`` refuses an unfinished folder."""
    path = out / RECIPE_FILE
    data = json.loads(path.read_text())
    if data.get("shards") != n_shards:
        data["shards"] = n_shards
        atomic_write(path, json.dumps(data, indent=2) + "\n")


def _build_shards(out: Path, n_shards: int, make_shard: Callable[[int], WeightDataset], desc: str,
                  summary: str, progress: bool, on_shard: OnShard | None,
                  worker: tuple[int, int] = (0, 1)) -> None:
    """Make and save every shard not yet on disk; tqdm shows the folder's shards and the mean ``summary``.

    ``worker=(k, n)``: start with the shards ``i`` with ``i % n == k``, then take any other shard
    that no process has started (from the last one down), so that n processes (or machines
    sharing the folder) build one dataset together and finish within about one shard of each
    other.  A shard is built under a file lock (``shard-i.safetensors.lock``, released by the OS
    when a process dies) and written atomically; it depends only on the recipe and its index, so
    the folder is the same as one process's, whoever built which shard."""
    k, n = worker
    if not 0 <= k < n:
        raise ValueError(f"worker must be (k, n) with 0 <= k < n, got {worker}")
    on_disk = {shard_index(p) for p in existing_shards(out)}
    extra = sorted(i for i in on_disk if i >= n_shards)
    if extra:
        raise WeightDataError(f"{out} has shards {extra} beyond the {n_shards} this recipe makes; "
                              "the folder was changed by hand, delete it to rebuild")
    _record_shard_count(out, n_shards)
    order = [i for i in range(n_shards) if i % n == k] + [i for i in reversed(range(n_shards)) if i % n != k]
    bar = tqdm(total=n_shards, initial=len(on_disk), desc=desc, unit="shard", disable=not progress)
    values: list[Tensor] = []
    try:
        for i in order:
            shard = _build_locked(out, i, make_shard)
            if shard is None:  # on disk, or another process builds it
                continue
            values.append(shard.meta[summary].float())
            bar.set_postfix({f"mean {summary}": f"{torch.cat(values).mean():.3f}"})
            bar.update(len(existing_shards(out)) - bar.n)  # other workers' shards count too
            if on_shard is not None:
                on_shard(i, shard)
    finally:
        bar.close()


def _build_locked(out: Path, i: int, make_shard: Callable[[int], WeightDataset]) -> WeightDataset | None:
    """Build and save shard ``i`` unless it is on disk or locked by another process (then None)."""
    path = shard_path(out, i)
    if path.exists():
        return None
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return None
    try:
        if path.exists():  # finished by another process between the check and the lock
            return None
        shard = make_shard(i)
        shard.save_shard(path)
        return shard
    finally:
        lock.release()
        if path.exists():  # a lock file outlives a killed build, and only then
            Path(lock.lock_file).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# SIREN fitting with early stopping


@dataclass
class FitResult:
    params: Params  # stacked {name: [P, ...]}, on the CPU
    psnr: Tensor  # [P] PSNR of the returned params, evaluated with the plain functional forward
    steps: Tensor  # [P] Adam steps applied to the returned params


def fit_sirens(network: Network, signals: Tensor, seeds: Sequence[int], steps: int = 1000, lr: float = 5e-4,
               target_psnr: float | None = 40.0, device: str | torch.device | None = None,
               chunk: int | None = None, progress: bool = False) -> FitResult:
    """Fit one SIREN per signal (``[P, H, W]`` or ``[P, L]`` in [0, 1]) with full-batch Adam (:class:`SirenFit`).

    Early stop: a member's parameters are frozen at the first step where its PSNR reaches
    ``target_psnr`` (its later updates are discarded; ``steps`` records that step), and the
    fit ends when every member got there.  ``target_psnr=None`` always runs ``steps``.
    """
    device = resolve_device(device)
    members = [INRTask(network, s, seed) for s, seed in zip(signals, seeds, strict=True)]
    population = Population(members).to(device)
    # CPU: chunks of 16 keep each chunk's activations in cache; GPU: one big launch is fastest.
    fit = SirenFit(population, seeds, lr=lr, chunk=chunk or (16 if device.type == "cpu" else len(members)))
    P = len(members)
    used = torch.full((P,), steps, dtype=torch.int64, device=device)
    active = torch.arange(P, device=device)  # which members the fit still runs, in its order
    params = fit.params()  # the result, [P, ...] (a copy the fit does not touch)
    bar = tqdm(total=steps, desc="fit", unit="step", leave=False, mininterval=1.0, disable=not progress)
    for t in range(steps):
        mse = fit.measure()
        bar.update()
        if target_psnr is not None and (hit := psnr(mse) >= target_psnr).any():
            for k, v in fit.params().items():  # freeze them as they are and stop computing them
                params[k][active[hit]] = v[hit]
            used[active[hit]] = t
            active = active[~hit]
            if len(active) == 0:
                break
            fit.keep(~hit)
        fit.update()
    bar.close()
    if len(active):
        for k, v in fit.params().items():
            params[k][active] = v
    final = population.evaluate(params)["psnr"]
    return FitResult({k: v.cpu() for k, v in params.items()}, final.cpu(), used.cpu())


# ---------------------------------------------------------------------------------------
# image INRs


@dataclass
class ImageSplits:
    """All images an INR dataset is made of, in dataset order (train, then val, then test)."""

    images: Tensor  # [n, H, W] in [0, 1]
    labels: Tensor  # [n]
    index: Tensor  # [n] image_index: where the image sits in its source (see image_splits)
    split: Tensor  # [n] codes of tasks.weight_data.SPLITS


def image_splits(dataset: str, limit: int | None = None, data_dir: str = FASHION_MNIST_DIR) -> ImageSplits:
    """The train / val / test images of an INR dataset; ``limit`` keeps the first images of each split.

    * ``fashion_mnist`` (28x28) and ``fashion_mnist_8x8`` (area-averaged): the first 55000 images
      of the training file are train, its last 5000 are val, the 10000 of the test file are test.
      ``image_index`` counts through the training file then the test file (0..69999).
    * ``digits`` (scikit-learn, 8x8): the test split of :func:`tasks.data.load_digits` (20%, 359
      images) is test, the first 10% of the dataset (180 images) taken from its train split, in
      the same fixed shuffle, is val, the other 1258 are train.  ``image_index`` is the position
      in scikit-learn's order (0..1796).
    """
    if dataset not in IMAGE_INR_DATASETS:
        raise ValueError(f"unknown image dataset {dataset!r}; known: {', '.join(IMAGE_INR_DATASETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 images per split, got {limit}")
    if dataset == "digits":
        (train_x, train_y), (test_x, test_y) = load_digits("train"), load_digits("test")
        train_index, test_index = digits_split_indices()  # where load_digits' images sit in scikit-learn's order
        n_val = round((len(train_y) + len(test_y)) * DIGITS_VAL_FRACTION)
        parts = {"train": (train_x[n_val:], train_y[n_val:], train_index[n_val:]),
                 "val": (train_x[:n_val], train_y[:n_val], train_index[:n_val]),
                 "test": (test_x, test_y, test_index)}
    else:
        size = 28 if dataset == "fashion_mnist" else 8
        train_x, train_y = load_fashion_mnist("train", data_dir, size=size)
        test_x, test_y = load_fashion_mnist("test", data_dir, size=size)
        n_train = len(train_y)
        if n_train <= FASHION_VAL:
            raise ValueError(f"the Fashion-MNIST training file in {data_dir} has only {n_train} images")
        cut = n_train - FASHION_VAL
        parts = {"train": (train_x[:cut], train_y[:cut], torch.arange(cut)),
                 "val": (train_x[cut:], train_y[cut:], torch.arange(cut, n_train)),
                 "test": (test_x, test_y, torch.arange(n_train, n_train + len(test_y)))}
    xs, ys, index, split = [], [], [], []
    for name, (x, y, idx) in parts.items():
        xs.append(x[:limit])
        ys.append(y[:limit])
        index.append(idx[:limit])
        split.append(torch.full((len(idx[:limit]),), SPLITS[name], dtype=torch.int64))
    return ImageSplits(torch.cat(xs), torch.cat(ys), torch.cat(index), torch.cat(split))


_SPLIT_NOTES = {
    "fashion_mnist": "train: training-file images 0..54999; val: training-file images 55000..59999; test: the "
                     "test file; image_index = position in the training file, then 60000 + position in the test "
                     "file; limit keeps the first `limit` images of each split",
    "digits": "scikit-learn order shuffled by torch.randperm with seed 0 (tasks.data.digits_split_indices): "
              "first 359 (20%) test, next 180 (10%) val, other 1258 train; image_index = scikit-learn position; "
              "limit keeps the first `limit` images of each split",
}


def build_image_inrs(out: str | Path, dataset: str = "fashion_mnist", views: int = 1, steps: int = 1000,
                     lr: float = 5e-4, hidden: Sequence[int] = (32, 32), w0: float = 30.0, init: str = "dwsnets",
                     target_psnr: float | None = 40.0, shard_size: int = 256, limit: int | None = None,
                     seed: int = 0, device: str | torch.device | None = None, data_dir: str = FASHION_MNIST_DIR,
                     progress: bool = True, on_shard: OnShard | None = None,
                     worker: tuple[int, int] = (0, 1)) -> Path:
    """Fit a SIREN to every image of ``dataset`` (``views`` independent fits each) into a dataset folder.

    Recipe: SIREN ``2 -> hidden -> 1`` with sine activations ``sin(w0 (Wx + b))``, the init and
    the pixel grid of :mod:`tasks.inr`; full-batch Adam (``lr``, betas 0.9/0.999) on the mean
    squared error for ``steps`` steps, each member frozen once it reaches ``target_psnr``.
    Networks are ordered by split, image, view.  Metadata columns: ``label``, ``split``,
    ``image_index``, ``view``, ``seed`` (the init seed: ``derive_seed(seed, 1, image_index,
    view)``), ``psnr`` (of the stored weights), ``steps`` (Adam steps they got).
    """
    if views < 1 or steps < 1 or shard_size < 1:
        raise ValueError(f"views, steps and shard_size must be >= 1, got {views}, {steps}, {shard_size}")
    _check_positive(lr=lr, w0=w0)
    if target_psnr is not None:
        _check_positive(target_psnr=target_psnr)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must list at least one positive width, got {tuple(hidden)!r}")
    seed = _check_seed(seed)
    device = resolve_device(device)
    source = image_splits(dataset, limit, data_dir)
    recipe = _jsonable({"builder": "image_inrs", "version": 1, "dataset": dataset, "views": views, "steps": steps,
                        "lr": lr, "hidden": list(hidden), "w0": w0, "init": init, "target_psnr": target_psnr,
                        "shard_size": shard_size, "limit": limit, "seed": seed})
    notes = {"network": "SIREN in=2 (row, col in [-1, 1]), sine hidden layers sin(w0 (Wx + b)), linear output; "
                        "prediction = output + 0.5; init: see tasks.inr (SIREN_INITS)",
             "fit": "full-batch Adam, betas (0.9, 0.999), eps 1e-8, mse over all pixels; a member is frozen at "
                    "the first step its PSNR >= target_psnr",
             "splits": _SPLIT_NOTES["digits" if dataset == "digits" else "fashion_mnist"]}
    network = siren(2, hidden, 1, w0, init)  # before the folder: an unknown init writes nothing
    out = _open_folder(out, recipe, notes, device)
    n_views = torch.arange(views)
    rows = torch.arange(len(source.labels)).repeat_interleave(views)  # image of each network
    view_of = n_views.repeat(len(source.labels))
    n_shards = math.ceil(len(rows) / shard_size)

    def make_shard(i: int) -> WeightDataset:
        sl = slice(i * shard_size, (i + 1) * shard_size)
        img, view = rows[sl], view_of[sl]
        seeds = [derive_seed(seed, _INIT, int(source.index[j]), int(v)) for j, v in zip(img, view)]
        fit = fit_sirens(network, source.images[img], seeds, steps, lr, target_psnr, device, progress=progress)
        meta = {"label": source.labels[img], "split": source.split[img], "image_index": source.index[img],
                "view": view, "seed": torch.tensor(seeds, dtype=torch.int64), "psnr": fit.psnr, "steps": fit.steps}
        return _to_dataset(network, fit.params, meta, recipe)

    _build_shards(out, n_shards, make_shard, f"{dataset} INRs", "psnr", progress, on_shard, worker)
    return out


# ---------------------------------------------------------------------------------------
# sine-wave INRs


def sine_signal(amplitude: float, frequency: float, points: int = 256) -> Tensor:
    """``0.5 + a sin(b x)`` for x on ``points`` grid points over [-pi, pi], as a ``[points]`` signal.

    The INR grid coordinate u in [-1, 1] stands for x = pi u, and an INR predicts
    ``output + 0.5``, so the fitted network itself computes ``a sin(b pi u)``.
    """
    x = math.pi * torch.linspace(-1.0, 1.0, points, dtype=torch.float64)
    return (0.5 + amplitude * torch.sin(frequency * x)).float()


def build_sine_inrs(out: str | Path, n: int = 5000, points: int = 256, amplitude: Sequence[float] = (1.0, 1.0),
                    frequency: Sequence[float] = (0.5, 10.0), steps: int = 1500, lr: float = 1e-3,
                    hidden: Sequence[int] = (32, 32), w0: float = 30.0, init: str = "dwsnets",
                    target_psnr: float | None = 40.0, shard_size: int = 1000,
                    split_fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                    device: str | torch.device | None = None, progress: bool = True,
                    on_shard: OnShard | None = None,
                    worker: tuple[int, int] = (0, 1)) -> Path:
    """Fit 1-D SIRENs to ``n`` waves ``a sin(b x)`` (see :func:`sine_signal`) into a dataset folder.

    Wave ``i`` draws ``a`` and ``b`` uniformly from the ``amplitude`` and ``frequency`` ranges
    (generator ``[seed, 2, i]``).  The default ``a = 1`` is DWSNets' frequency-regression data
    (``sin(b x)``); a range of ``a`` gives self-supervised data.  PSNR is measured against a peak
    of 1, so the 40 dB early stop is an MSE of 1e-4, DWSNets' early-stop loss for sine INRs.
    Targets for frequency regression (``frequency``) or for self-supervised learning (both).
    Splits: exact ``split_fractions`` of the waves, by a seeded permutation.  Metadata:
    ``amplitude``, ``frequency``, ``index``, ``split``, ``seed``, ``psnr``, ``steps``.  The fit is
    that of :func:`build_image_inrs`, with a ``1 -> hidden -> 1`` SIREN and DWSNets' sine settings
    (Adam lr 1e-3, up to 1500 steps): with their init, lr 5e-4 leaves many waves unfitted.
    """
    if n < 1 or points < 2 or steps < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1, points >= 2, steps >= 1, shard_size >= 1; got {n}, {points}, {steps}, "
                         f"{shard_size}")
    _check_positive(lr=lr, w0=w0)
    if target_psnr is not None:
        _check_positive(target_psnr=target_psnr)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must list at least one positive width, got {tuple(hidden)!r}")
    amplitude, frequency = _check_range("amplitude", amplitude), _check_range("frequency", frequency)
    fractions = _check_fractions(split_fractions)
    seed = _check_seed(seed)
    device = resolve_device(device)
    recipe = _jsonable({"builder": "sine_inrs", "version": 1, "n": n, "points": points, "amplitude": amplitude,
                        "frequency": frequency, "steps": steps, "lr": lr, "hidden": list(hidden), "w0": w0,
                        "init": init, "target_psnr": target_psnr, "shard_size": shard_size,
                        "split_fractions": fractions, "seed": seed})
    notes = {"signal": "0.5 + a sin(b x), x = pi u on `points` grid points u in [-1, 1]; the network computes "
                       "a sin(b pi u) (prediction = output + 0.5)",
             "sampling": "a ~ U(amplitude), b ~ U(frequency), from numpy default_rng([seed, 2, index])",
             "fit": "as image_inrs: full-batch Adam, frozen at target_psnr"}
    network = siren(1, hidden, 1, w0, init)  # before the folder: an unknown init writes nothing
    out = _open_folder(out, recipe, notes, device)
    split = _split_codes(n, fractions, seed)

    def make_shard(i: int) -> WeightDataset:
        index = torch.arange(i * shard_size, min((i + 1) * shard_size, n))
        rngs = [np.random.default_rng([seed, _SINE, int(j)]) for j in index]
        waves = [(rng.uniform(*amplitude), rng.uniform(*frequency)) for rng in rngs]
        a, b = (torch.tensor([w[k] for w in waves], dtype=torch.float64) for k in (0, 1))
        signals = torch.stack([sine_signal(float(aj), float(bj), points) for aj, bj in zip(a, b)])
        seeds = [derive_seed(seed, _INIT, int(j)) for j in index]
        fit = fit_sirens(network, signals, seeds, steps, lr, target_psnr, device, progress=progress)
        meta = {"amplitude": a.float(), "frequency": b.float(), "index": index, "split": split[index],
                "seed": torch.tensor(seeds, dtype=torch.int64), "psnr": fit.psnr, "steps": fit.steps}
        return _to_dataset(network, fit.params, meta, recipe)

    _build_shards(out, math.ceil(n / shard_size), make_shard, "sine INRs", "psnr", progress, on_shard, worker)
    return out


# ---------------------------------------------------------------------------------------
# classifier zoo


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def build_classifier_zoo(out: str | Path, n_models: int = 200, epochs: Sequence[int] = (1, 2, 4, 8),
                         dataset: str = "fashion_mnist_8x8", channels: Sequence[int] = (8, 8),
                         train_size: int = 2000, test_size: int | None = None, batch_size: int = 32,
                         lr: Sequence[float] = (1e-4, 1e-2), weight_decay: Sequence[float] = (1e-6, 1e-2),
                         init_scale: Sequence[float] = (0.5, 2.0), train_fraction: Sequence[float] = (0.1, 1.0),
                         train_eval: int = 1000, shard_size: int = 50,
                         split_fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                         device: str | torch.device | None = None, data_dir: str = FASHION_MNIST_DIR,
                         progress: bool = True, on_shard: OnShard | None = None,
                         worker: tuple[int, int] = (0, 1)) -> Path:
    """Train ``n_models`` CNNs of one architecture with varied hyperparameters; store checkpoints at ``epochs``.

    For generalization prediction (accuracy from weights).  Architecture: :func:`tasks.cnn`
    ``(Conv3x3 -> ReLU -> MaxPool2) per channel width -> Linear``.  Model ``i`` draws from
    generator ``[seed, 3, i]``: ``lr`` and ``weight_decay`` log-uniformly, ``init_scale``
    log-uniformly (multiplies PyTorch's default init), ``train_fraction`` uniformly (its
    training subset is that fraction of the first ``train_size`` training images).  Training:
    AdamW (decoupled weight decay), cross-entropy, batches of ``batch_size`` drawn with
    replacement from the model's subset; an epoch is ``ceil(train_size / batch_size)`` steps for
    every model (one pass's worth of the whole pool).  Epoch 0 in ``epochs`` stores the init.

    One row per (model, checkpoint), ordered by model then epoch; splits are by model (exact
    ``split_fractions`` by a seeded permutation), so no model is in two splits.  Metadata:
    ``model``, ``epoch``, ``step``, ``split``, ``seed``, ``lr``, ``weight_decay``, ``init_scale``,
    ``train_fraction``, ``train_size`` (the model's subset size), ``test_accuracy`` /
    ``test_loss`` (on the first ``test_size`` test images, all by default), ``train_accuracy`` /
    ``train_loss`` (on the first ``train_eval`` examples of the model's own subset).
    """
    if dataset not in IMAGE_SIZES:
        raise ValueError(f"unknown zoo dataset {dataset!r}; known: {', '.join(IMAGE_SIZES)}")
    epochs = sorted(set(int(e) for e in epochs))
    if not epochs or epochs[0] < 0:
        raise ValueError(f"epochs must list checkpoint epochs >= 0, got {epochs}")
    for name, v in (("n_models", n_models), ("train_size", train_size), ("batch_size", batch_size),
                    ("train_eval", train_eval), ("shard_size", shard_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if test_size is not None and test_size < 1:
        raise ValueError(f"test_size must be >= 1 (or None for the whole test split), got {test_size}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must list at least one positive width, got {tuple(channels)!r}")
    lr, weight_decay = _check_range("lr", lr, log=True), _check_range("weight_decay", weight_decay, log=True)
    init_scale = _check_range("init_scale", init_scale, log=True)
    train_fraction = _check_range("train_fraction", train_fraction)
    if not 0 < train_fraction[0] <= train_fraction[1] <= 1:
        raise ValueError(f"train_fraction must lie in (0, 1], got {train_fraction}")
    fractions = _check_fractions(split_fractions)
    seed = _check_seed(seed)
    device = resolve_device(device)

    network = cnn(IMAGE_SIZES[dataset], channels, NUM_CLASSES)  # fails early if the image is too small
    images, labels = load_images(dataset, "train", train_size, data_dir)
    if len(labels) < train_size:
        raise ValueError(f"train_size={train_size} but {dataset} has only {len(labels)} training images")
    test_images, test_labels = load_images(dataset, "test", test_size, data_dir)
    recipe = _jsonable({"builder": "classifier_zoo", "version": 1, "dataset": dataset, "n_models": n_models,
                        "epochs": epochs, "channels": list(channels), "train_size": train_size,
                        "test_size": len(test_labels), "batch_size": batch_size, "lr": lr,
                        "weight_decay": weight_decay, "init_scale": init_scale, "train_fraction": train_fraction,
                        "train_eval": train_eval, "shard_size": shard_size, "split_fractions": fractions,
                        "seed": seed})
    notes = {"network": network.name, "optimizer": "AdamW, betas (0.9, 0.999), eps 1e-8, per-model lr and "
                                                   "decoupled weight decay, no lr schedule, no dropout",
             "epoch": f"ceil(train_size / batch_size) = {math.ceil(train_size / batch_size)} steps",
             "data": f"train pool: first train_size images of {dataset}'s train split; test: first test_size of "
                     "its test split; images in [0, 1], one channel"}
    out = _open_folder(out, recipe, notes, device)
    split = _split_codes(n_models, fractions, seed)
    data = (images[:, None].to(device), labels.to(device), test_images[:, None].to(device), test_labels.to(device))
    steps_per_epoch = math.ceil(train_size / batch_size)

    def hyperparameters(model: int) -> dict:
        rng = np.random.default_rng([seed, _ZOO_MODEL, model])
        return {"lr": _log_uniform(rng, *lr), "weight_decay": _log_uniform(rng, *weight_decay),
                "init_scale": _log_uniform(rng, *init_scale), "train_fraction": rng.uniform(*train_fraction),
                "seed": derive_seed(seed, _INIT, model), "subset_seed": derive_seed(seed, _ZOO_SUBSET, model)}

    def make_shard(i: int) -> WeightDataset:
        models = torch.arange(i * shard_size, min((i + 1) * shard_size, n_models))
        hp = [hyperparameters(int(m)) for m in models]
        params, metrics = _train_zoo_population(network, hp, data, epochs, steps_per_epoch, batch_size, train_eval,
                                                derive_seed(seed, _ZOO_BATCHES, i), device, progress)

        def per_row(values, dtype=None) -> Tensor:  # one value per model -> one per (model, checkpoint) row
            return torch.as_tensor(values, dtype=dtype).repeat_interleave(len(epochs))

        meta = {"model": per_row(models), "epoch": torch.tensor(epochs).repeat(len(models)),
                "step": torch.tensor(epochs).repeat(len(models)) * steps_per_epoch, "split": per_row(split[models]),
                **{k: per_row([h[k] for h in hp], torch.int64 if k == "seed" else torch.float32)
                   for k in ("seed", "lr", "weight_decay", "init_scale", "train_fraction")},
                **metrics}
        return _to_dataset(network, params, meta, recipe)

    _build_shards(out, math.ceil(n_models / shard_size), make_shard, f"{dataset} zoo", "test_accuracy", progress,
                  on_shard, worker)
    return out


def _train_zoo_population(network: Network, hp: list[dict], data: tuple[Tensor, ...], epochs: list[int],
                          steps_per_epoch: int, batch_size: int, train_eval: int, batch_seed: int,
                          device: torch.device, progress: bool) -> tuple[Params, dict[str, Tensor]]:
    """Train one shard's models together; returns checkpoint params and metric columns, rows model-major."""
    images, labels, test_images, test_labels = data
    P, pool = len(hp), len(labels)
    lr = torch.tensor([h["lr"] for h in hp], dtype=torch.float32, device=device)
    wd = torch.tensor([h["weight_decay"] for h in hp], dtype=torch.float32, device=device)
    sizes = torch.tensor([max(1, round(h["train_fraction"] * pool)) for h in hp])
    subsets = torch.stack([torch.randperm(pool, generator=torch.Generator().manual_seed(h["subset_seed"]))
                           for h in hp])  # model j trains on subsets[j, :sizes[j]]
    inits = [network.init_params(h["seed"]) for h in hp]  # drawn on the CPU: the same numbers on every device
    scale = torch.tensor([h["init_scale"] for h in hp], dtype=torch.float32)
    params = {k: (torch.stack([p[k] for p in inits]) * scale.view(-1, *[1] * inits[0][k].dim())).to(device)
              .requires_grad_() for k in inits[0]}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    generator = torch.Generator().manual_seed(batch_seed)
    n_eval = min(train_eval, int(sizes.min()))
    train_idx = subsets[:, :n_eval].to(device)  # [P, n_eval]: each model's own training examples
    test_idx = torch.arange(len(test_labels), device=device)  # [n_test]: the same for every model

    checkpoints, metrics = [], []

    def checkpoint() -> None:
        checkpoints.append({k: p.detach().clone() for k, p in params.items()})
        test = evaluate_classifiers(network, params, test_images, test_labels, test_idx)
        train = evaluate_classifiers(network, params, images, labels, train_idx)
        metrics.append({"test_accuracy": test[0], "test_loss": test[1], "train_accuracy": train[0],
                        "train_loss": train[1]})

    total = epochs[-1] * steps_per_epoch
    bar = tqdm(total=total, desc="train", unit="step", leave=False, mininterval=1.0, disable=not progress)
    for t in range(total + 1):
        if t % steps_per_epoch == 0 and t // steps_per_epoch in epochs:
            checkpoint()
        if t == total:
            break
        # Batch indices are drawn on the CPU so every device sees the same batches.
        pick = (torch.rand(P, batch_size, generator=generator) * sizes[:, None]).long()
        idx = subsets.gather(1, pick).to(device)
        logits = network.forward(params, images[idx])
        losses = F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten(), reduction="none").view(P, -1).mean(1)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():  # AdamW with a learning rate and weight decay per model
            for (k, p), g in zip(params.items(), grads):
                shape = (-1, *[1] * (p.dim() - 1))
                m[k].lerp_(g, 1 - b1)
                v2[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - (lr * wd).view(shape))
                denom = (v2[k] / (1 - b2 ** (t + 1))).sqrt_().add_(eps)
                p.sub_(lr.view(shape) / (1 - b1 ** (t + 1)) * m[k] / denom)
        bar.update()
    bar.close()
    stacked = {k: torch.stack([c[k] for c in checkpoints], dim=1).flatten(0, 1) for k in params}  # [P*E, ...]
    meta = {key: torch.stack([c[key] for c in metrics], dim=1).flatten().cpu() for key in metrics[0]}
    meta["train_size"] = sizes.repeat_interleave(len(epochs))
    return stacked, meta


@torch.no_grad()
def evaluate_classifiers(network: Network, params: Params, images: Tensor, labels: Tensor, idx: Tensor,
                         chunk: int = 500) -> tuple[Tensor, Tensor]:
    """Accuracy and mean cross-entropy ``[P]`` of every member on ``images[idx]``: ``idx`` is ``[n]``
    (the same examples for all members) or ``[P, n]`` (each member its own); chunks bound memory."""
    P, n = network.check(params), idx.shape[-1]
    correct = torch.zeros(P, device=labels.device)
    loss = torch.zeros(P, device=labels.device)
    for a in range(0, n, chunk):
        part = idx[..., a:a + chunk]
        if part.dim() == 1:
            part = part.expand(P, -1)
        xs, ys = images[part], labels[part]
        logits = network.forward(params, xs)
        loss += F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).sum(1)
        correct += (logits.argmax(-1) == ys).sum(1)
    return correct / n, loss / n


# ---------------------------------------------------------------------------------------


def network_for(recipe: dict) -> Network:
    """The architecture of a dataset's networks, from its recipe (``read_recipe(folder)`` or
    ``WeightDataset.info["recipe"]``); ``network_for(r).module()`` plus
    ``WeightDataset.weight_space(i).to_modules(...)`` gives runnable ``nn.Module`` s."""
    builder = recipe.get("builder")
    if builder == "image_inrs":
        return siren(2, recipe["hidden"], 1, recipe["w0"], recipe.get("init", "sitzmann"))
    if builder == "sine_inrs":
        return siren(1, recipe["hidden"], 1, recipe["w0"], recipe.get("init", "sitzmann"))
    if builder == "classifier_zoo":
        return cnn(IMAGE_SIZES[recipe["dataset"]], recipe["channels"], NUM_CLASSES)
    raise ValueError(f"unknown dataset builder {builder!r} in recipe")
