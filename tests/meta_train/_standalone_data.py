"""Tiny synthetic weight datasets shared by the standalone-task tests."""

import torch
from torch import nn

from meta_train.standalone.smalldata import digits_inrs, split_column
from metaopt import WeightSpace
from tasks.weight_data import WeightDataset, shard_path

# command-line flags that make every standalone task run in about a second
FAST = ["--epochs", "2", "--no-progress", "--hidden-channels", "4", "--num-layers", "2", "--head-hidden", "16",
        "--batch-size", "8", "--threads", "1"]


def digits_folder(tmp_path_factory, n_test, steps):
    """A dataset folder of 16 train, 6 val and ``n_test`` test digit SIRENs (2-8-8-1), fitted for ``steps``."""
    folder = tmp_path_factory.mktemp("digits")
    digits_inrs(16, 6, n_test, hidden=(8, 8), steps=steps).save_shard(shard_path(folder, 0))
    return folder


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4, 5))


def synthetic_zoo(n_train, n_val, n_test, seed=0):
    """Random CNNs whose 'test accuracy' is a smooth function of a permutation-invariant weight statistic
    (the mean squared last-layer weight after a random rescaling), as a stand-in for a trained zoo."""
    torch.manual_seed(seed)
    n = n_train + n_val + n_test
    nets = [_cnn() for _ in range(n)]
    scale = torch.rand(n) * 2 + 0.25
    with torch.no_grad():
        for net, s in zip(nets, scale):
            net[-1].weight.mul_(s)
    ws = WeightSpace.from_modules(nets)
    acc = torch.sigmoid(4 * (ws.weights[-1].square().mean(dim=(1, 2, 3, 4)) / 0.02 - 1))
    return WeightDataset(ws.spec, [w[:, 0] for w in ws.weights], [b[:, 0] for b in ws.biases],
                         {"test_accuracy": acc, "epoch": torch.zeros(n), "split": split_column(n_train, n_val, n_test)})


def classifier_zoo(n_train, n_val, n_test, steps=100, seed=0):
    """CNNs conv(4)-conv(4)-linear on 8x8 digits, ``make-small-data cnn-zoo``'s recipe with one run of
    ``steps`` Adam steps on 256 images, stored train, then val, then test."""
    from meta_train.standalone.smalldata import cnn_zoo

    ds = cnn_zoo(n_per_run=n_train + n_val + n_test, checkpoints=(steps,), train_sizes=(256,), seed=seed)
    ds.meta["split"] = split_column(n_train, n_val, n_test)
    return ds
