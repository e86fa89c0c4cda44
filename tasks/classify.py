"""Image classification: MLPs and small CNNs on Fashion-MNIST (28x28 or 8x8) and digits.

Loss: cross-entropy on mini-batches drawn from the member's own training subset;
metrics: test loss and test accuracy on the first ``test_size`` test images.  Images are
fed as [0, 1] grey levels, one channel.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Batch, Forward, Network, Task, TaskFamily, activation, choose, mlp
from .data import FASHION_MNIST_DIR, IMAGE_DATASETS, load_images

NUM_CLASSES = 10


def cnn(image_size: int, channels: Sequence[int], out_features: int = NUM_CLASSES, act: str = "relu",
        in_channels: int = 1) -> Network:
    """``(Conv3x3 -> act -> MaxPool2) * len(channels) -> Flatten -> Linear``."""
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for width in channels:
        if size < 2:
            raise ValueError(f"{len(channels)} conv+pool stages shrink a {image_size}px image below 1px")
        layers += [nn.Conv2d(c, width, 3, padding=1), activation(act), nn.MaxPool2d(2)]
        c, size = width, size // 2
    layers += [nn.Flatten(), nn.Linear(c * size * size, out_features)]
    return Network(layers, f"cnn[{in_channels}x{image_size}x{image_size},c{'-'.join(map(str, channels))},{act}]")


class ClassifyData(NamedTuple):
    images: Tensor  # [n, 1, H, W], the whole training split, shared by all members
    labels: Tensor  # [n]
    subsets: Tensor  # [P, train_size]: each member's training examples
    test_images: Tensor  # [t, 1, H, W]
    test_labels: Tensor  # [t]


class ClassifierTask(Task):
    """Train a classifier on a random ``train_size`` subset of a dataset's training split."""

    def __init__(self, network: Network, dataset: str, seed: int, batch_size: int = 64, train_size: int = 1024,
                 test_size: int = 1000, limit: int | None = None, path: str = FASHION_MNIST_DIR):
        super().__init__(network, seed)
        images, labels = load_images(dataset, "train", limit, path)
        test_images, test_labels = load_images(dataset, "test", test_size, path)
        if train_size > len(images):
            raise ValueError(f"train_size={train_size} exceeds the {len(images)} training images of {dataset}")
        self.dataset, self.batch_size, self.train_size, self.limit = dataset, batch_size, train_size, limit
        self.images, self.labels = images[:, None], labels
        self.test_images, self.test_labels = test_images[:, None], test_labels
        g = torch.Generator().manual_seed(self.seed)
        self.subset = torch.randperm(len(images), generator=g)[:train_size]

    def population_key(self) -> tuple:
        return super().population_key() + (self.dataset, self.batch_size, self.train_size, self.limit,
                                           len(self.test_labels))

    @classmethod
    def stack_data(cls, tasks: Sequence["ClassifierTask"]) -> ClassifyData:
        t = tasks[0]
        return ClassifyData(t.images, t.labels, torch.stack([m.subset for m in tasks]), t.test_images, t.test_labels)

    def batch_from(self, data: ClassifyData, generator: torch.Generator) -> Batch:
        P, m = data.subsets.shape
        pick = torch.randint(m, (P, self.batch_size), generator=generator)
        idx = data.subsets.gather(1, pick)
        return Batch(data.images[idx], data.labels[idx])

    def losses(self, forward: Forward, batch: Batch) -> Tensor:
        logits = forward(batch.inputs)  # [P, B, classes]
        if batch.targets.shape != logits.shape[:2]:
            raise ValueError(f"targets {tuple(batch.targets.shape)} do not match logits {tuple(logits.shape)}")
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(
            logits.shape[:2]).mean(1)

    def metrics(self, data: ClassifyData, forward: Forward, chunk: int = 250) -> dict[str, Tensor]:
        P = data.subsets.shape[0]
        loss_sum = torch.zeros(P, device=data.test_labels.device)
        correct = torch.zeros(P, device=data.test_labels.device)
        for start in range(0, len(data.test_labels), chunk):  # chunks bound the [P, chunk, ...] copies
            x = data.test_images[start:start + chunk]
            y = data.test_labels[start:start + chunk].expand(P, -1)
            logits = forward(x.expand(P, *x.shape))
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)
            correct += (logits.argmax(-1) == y).float().sum(1)
        n = len(data.test_labels)
        return {"test_loss": loss_sum / n, "test_accuracy": correct / n}


class ClassifierFamily(TaskFamily):
    """Classifiers of varied architecture, width, depth and activation on one dataset.

    A population shares the sampled architecture; members differ in their training
    subset and batch order.  ``limit`` caps the training split (small slices for tests).
    """

    name = "classify"

    def __init__(self, dataset: str = "fashion_mnist", archs: Sequence[str] = ("mlp", "cnn"),
                 widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (1, 2),
                 activations: Sequence[str] = ("relu", "tanh", "gelu", "silu"), batch_size: int = 64,
                 train_size: int = 1024, test_size: int = 1000, limit: int | None = None,
                 path: str = FASHION_MNIST_DIR):
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"unknown classification dataset {dataset!r}; known: {IMAGE_DATASETS}")
        for arch in archs:
            if arch not in ("mlp", "cnn"):
                raise ValueError(f"unknown architecture {arch!r}; known: 'mlp', 'cnn'")
        for act in activations:
            activation(act)  # fails early on unknown names
        self.dataset, self.archs, self.widths, self.depths = dataset, tuple(archs), tuple(widths), tuple(depths)
        self.activations, self.batch_size, self.train_size = tuple(activations), batch_size, train_size
        self.test_size, self.limit, self.path = test_size, limit, path
        self.image_size = 28 if dataset == "fashion_mnist" else 8

    def sample_config(self, rng: np.random.Generator) -> dict:
        return {
            "arch": choose(rng, self.archs, "architectures"),
            "width": choose(rng, self.widths, "widths"),
            "depth": choose(rng, self.depths, "depths"),
            "activation": choose(rng, self.activations, "activations"),
        }

    def make_task(self, config: dict, seed: int) -> ClassifierTask:
        widths = [config["width"]] * config["depth"]
        if config["arch"] == "mlp":
            net = mlp(self.image_size**2, widths, NUM_CLASSES, config["activation"], flatten=True)
        else:
            net = cnn(self.image_size, widths, NUM_CLASSES, config["activation"])
        return ClassifierTask(net, self.dataset, seed, self.batch_size, self.train_size, self.test_size, self.limit,
                              self.path)
