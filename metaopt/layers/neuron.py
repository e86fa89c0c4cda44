"""Equivariant layers over neuron sets, with weights shared across layers and architectures.

The NP layer's pooled terms live on neurons: the row means of W_l and the column means of
W_{l+1} are features of the neurons between them. A learned optimizer must run on any model,
so its metanetwork cannot have per-layer parameters (an NP layer's size depends on the depth).
``NeuronSetLinear`` keeps only the architecture-independent part: each neuron is updated from
its own features, the mean of its set, and the means of the previous and next sets of its chain,
with one weight matrix per term shared everywhere. It commutes with permutations within every
neuron set, so anything built from it is equivariant to hidden-neuron permutations.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


class NeuronGraph:
    """Index tensors describing neuron sets: which set each neuron is in and its neighbour sets.

    ``chains`` lists, per chain, its neuron-set sizes (input, hidden..., output).
    """

    def __init__(self, chains: Sequence[Sequence[int]], device=None):
        set_sizes, prev_set, next_set = [], [], []
        for sizes in chains:
            first = len(set_sizes)
            for j, n in enumerate(sizes):
                set_sizes.append(n)
                prev_set.append(first + j - 1 if j > 0 else -1)
                next_set.append(first + j + 1 if j < len(sizes) - 1 else -1)
        S = len(set_sizes)
        sentinel = S  # an all-zero "set" standing in for missing neighbours
        prev_set = [sentinel if s < 0 else s for s in prev_set]
        next_set = [sentinel if s < 0 else s for s in next_set]
        set_id = torch.repeat_interleave(torch.arange(S), torch.tensor(set_sizes))
        self.num_neurons, self.num_sets = int(set_id.numel()), S
        self.set_sizes = set_sizes
        self.set_id = set_id.to(device)
        # dense averaging matrix [S + 1, N]: small (sets x neurons) and vmap/matmul friendly
        avg = torch.zeros(S + 1, self.num_neurons)
        avg[set_id, torch.arange(self.num_neurons)] = 1.0 / torch.tensor(set_sizes, dtype=torch.float)[set_id]
        # [3 (S + 1), N]: means of each set, of its previous set and of its next set, in one matmul
        prev_of_set = torch.tensor(prev_set + [sentinel])
        next_of_set = torch.tensor(next_set + [sentinel])
        self.context = torch.cat([avg, avg[prev_of_set], avg[next_of_set]]).to(device)


class NeuronSetLinear(nn.Module):
    """y_i = A x_i + B mean(x_set(i)) + C mean(x_prev_set(i)) + D mean(x_next_set(i)) + b."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(4 * in_features)  # joint fan-in of the four terms
        self.weight = nn.Parameter(torch.empty(4, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor, graph: NeuronGraph) -> Tensor:
        """x: [B, N, in_features] -> [B, N, out_features]."""
        B, _, F = x.shape
        context = graph.context if graph.context.dtype == x.dtype else graph.context.to(x.dtype)
        means = torch.matmul(context, x)  # [B, 3 (S + 1), F]: same, prev, next set means
        per_set = means.view(B, 3, -1, F).transpose(1, 2).reshape(B, -1, 3 * F)  # [B, S + 1, 3F]
        per_set = torch.matmul(per_set, self.weight[1:].reshape(3 * F, -1)) + self.bias  # [B, S + 1, out]
        return torch.matmul(x, self.weight[0]) + per_set.index_select(1, graph.set_id)
