"""Architectures the symmetry tests run on: several depths, odd widths, 1-D and 2-D CNNs."""

import torch
from torch import nn

from metaopt import WeightSpace


def mlp(*sizes, act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


ARCHS = {
    "mlp2": lambda: mlp(3, 5, 2),
    "mlp3": lambda: mlp(4, 7, 3, 2, act=nn.Tanh),
    "mlp4": lambda: mlp(2, 9, 5, 7, 1),
    "mlp5": lambda: mlp(5, 3, 6, 3, 5, 3),
    "cnn2d_gap": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 5, 3), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)),
    "cnn2d_flatten": lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                                           nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5), nn.ReLU(), nn.Linear(5, 3)),
    "cnn1d": lambda: nn.Sequential(nn.Conv1d(2, 3, 5), nn.ReLU(), nn.Conv1d(3, 4, 3), nn.AdaptiveAvgPool1d(1),
                                   nn.Flatten(), nn.Linear(4, 3)),
}
INPUT_SHAPES = {"cnn2d_gap": (2, 8, 8), "cnn2d_flatten": (1, 6, 6), "cnn1d": (2, 12)}


def batch(name, n=3, channels=1, seed=0):
    torch.manual_seed(seed)
    ws = WeightSpace.from_modules([ARCHS[name]() for _ in range(n)])
    if channels > 1:
        ws = WeightSpace.cat_channels([ws] + [ws.map(lambda t: torch.randn_like(t)) for _ in range(channels - 1)])
    return ws


def max_diff(a, b):
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    return max((x - y).abs().max().item() for x, y in zip(a.tensors(), b.tensors()))


def uncoupled(ws, layer=0, generator=None):
    """Permute only the rows of W_layer and b_layer, not the columns of W_{layer+1}: this changes
    the function, so no layer should commute with it."""
    n = ws.spec.neuron_sizes[layer + 1]
    p = torch.randperm(n, generator=generator)
    while torch.equal(p, torch.arange(n)):
        p = torch.randperm(n, generator=generator)
    weights, biases = list(ws.weights), list(ws.biases)
    weights[layer], biases[layer] = weights[layer][:, :, p], biases[layer][:, :, p]
    return WeightSpace(weights, biases, ws.spec)


def permute_inputs(ws, generator=None):
    """Permute the input neurons (columns of W_0): a symmetry of NP without embeddings only."""
    n = ws.spec.neuron_sizes[0]
    p = torch.randperm(n, generator=generator)
    while torch.equal(p, torch.arange(n)):
        p = torch.randperm(n, generator=generator)
    weights = list(ws.weights)
    weights[0] = weights[0][:, :, :, p]
    return WeightSpace(weights, ws.biases, ws.spec)
