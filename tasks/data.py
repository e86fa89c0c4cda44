"""Data for the task families, read from local files only (nothing downloads at run time).

* Fashion-MNIST from the four idx ``.gz`` files (Debian package ``dataset-fashion-mnist``
  installs them in :data:`FASHION_MNIST_DIR`), parsed with numpy + gzip.
* scikit-learn's 8x8 digits, which ship inside scikit-learn.
* Synthetic 1-D sine waves.

Images come back as float32 tensors ``[n, H, W]`` in [0, 1] and labels as int64 ``[n]``.
Loaded arrays are cached per process, so many tasks can share one dataset in memory.
"""

from __future__ import annotations

import gzip
import math
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
_IDX_MAGIC = {2049: 1, 2051: 3}  # unsigned-byte idx files: labels (1-D), images (3-D)


def read_idx(path: str, limit: int | None = None) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes; ``limit`` reads only the first items."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}\n"
            "Install the files with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; "
            f"they land in {FASHION_MNIST_DIR}), or pass path= a folder holding the four idx "
            ".gz files of https://github.com/zalandoresearch/fashion-mnist. "
            "Nothing is downloaded at run time."
        )
    with gzip.open(path, "rb") as f:
        magic = int.from_bytes(f.read(4), "big")
        if magic not in _IDX_MAGIC:
            raise ValueError(f"{path} is not an unsigned-byte idx file (magic number {magic})")
        dims = [int.from_bytes(f.read(4), "big") for _ in range(_IDX_MAGIC[magic])]
        if limit is not None:
            dims[0] = min(dims[0], limit)
        count = math.prod(dims)
        data = f.read(count)
    if len(data) != count:
        raise ValueError(f"{path} is truncated: expected {count} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


@lru_cache(maxsize=8)
def _fashion_mnist(split: str, path: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(os.path.join(path, _FASHION_FILES[split, "images"]), limit)
    labels = read_idx(os.path.join(path, _FASHION_FILES[split, "labels"]), limit)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    split: str = "train", path: str = FASHION_MNIST_DIR, limit: int | None = None, size: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(images [n, size, size] in [0, 1], labels [n])``.

    ``limit`` reads only the first images (fast slices for tests); ``size=8`` area-averages
    down to 8x8, a cheap stand-in for small-input tasks.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _fashion_mnist(split, os.fspath(path), limit)
    return resize(x, size), y


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def load_digits(split: str = "train", test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits ``(images [n, 8, 8] in [0, 1], labels [n])``.

    The dataset has no official split, so a fixed shuffle (seed 0) puts the last
    ``test_fraction`` of it in ``"test"``; every caller gets the same split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _digits()
    train, test = digits_split_indices(test_fraction)
    idx = train if split == "train" else test
    return x[idx], y[idx]


def digits_split_indices(test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into scikit-learn's digits order of the ``(train, test)`` images of :func:`load_digits`.

    A fixed shuffle (seed 0); its first ``test_fraction`` is the test split.  The INR
    dataset builder carves its validation split out of the train indices, in this order.
    """
    n = len(_digits()[1])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average ``[n, H, W]`` images to ``[n, size, size]`` (no-op at the same size)."""
    if images.dim() != 3:
        raise ValueError(f"expected images [n, H, W], got shape {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images[:, None], size=(size, size), mode="area")[:, 0]


def sine_wave(seed: int, points: int = 128) -> torch.Tensor:
    """One random 1-D sine wave ``[points]`` in [0, 1], sampled on a grid over [-1, 1].

    Amplitude, frequency (0.5-4 periods over the interval) and phase come from ``seed``,
    so a seed names a wave the way an index names an image.
    """
    g = torch.Generator().manual_seed(seed)
    amplitude, freq, phase = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    amplitude = 0.5 + 0.5 * amplitude
    freq = 0.25 + 1.75 * freq  # periods per unit length; the interval has length 2
    phase = 2 * math.pi * phase
    x = torch.linspace(-1, 1, points, dtype=torch.float64)
    return (0.5 + 0.5 * amplitude * torch.sin(2 * math.pi * freq * x + phase)).float()


def load_images(dataset: str, split: str = "train", limit: int | None = None,
                path: str = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels by dataset name: ``fashion_mnist``, ``fashion_mnist_8x8``, ``digits``."""
    if dataset == "fashion_mnist":
        x, y = load_fashion_mnist(split, path, limit)
    elif dataset == "fashion_mnist_8x8":
        x, y = load_fashion_mnist(split, path, limit, size=8)
    elif dataset == "digits":
        x, y = load_digits(split)
    else:
        raise ValueError(
            f"unknown image dataset {dataset!r}; known: 'fashion_mnist', 'fashion_mnist_8x8', 'digits'"
        )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


IMAGE_DATASETS = ("fashion_mnist", "fashion_mnist_8x8", "digits")
