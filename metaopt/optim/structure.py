"""Which of a model's tensors form weight-space chains, and which go the per-tensor path.

A *chain* is a run of Linear/Conv weights (each with an optional bias) where layer ``l + 1``
reads the neurons layer ``l`` writes: hidden neurons can be permuted along it. Every other
tensor (norm scales, embeddings, lone vectors, attention projections that do not chain) is a
*lone* tensor: it is read as a one-layer weight space of its own (rows x columns), so it is
optimized by the same metanetwork, never left out.

From a bare parameter list the chains are inferred from shapes and order (as
``nn.Sequential`` registers them); given the module, from its Linear/Conv layers, which is exact.
``describe()`` prints what was inferred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn


@dataclass(frozen=True)
class ChainLayer:
    weight: int  # index into the parameter list
    bias: int | None
    view: tuple[int, int, int]  # (n_out, n_in, k): the weight read as rows x neuron-columns x kernel


@dataclass(frozen=True)
class Chain:
    layers: tuple[ChainLayer, ...]
    lone: bool = False  # a single tensor on the per-tensor path

    @property
    def neuron_sizes(self) -> tuple[int, ...]:
        return (self.layers[0].view[1],) + tuple(l.view[0] for l in self.layers)


@dataclass(frozen=True)
class Structure:
    chains: tuple[Chain, ...]
    num_params: int

    def describe(self, names: Sequence[str] | None = None) -> str:
        name = (lambda i: names[i]) if names else (lambda i: f"param{i}")
        lines = []
        for c in self.chains:
            if c.lone:
                l = c.layers[0]
                lines.append(f"lone   {name(l.weight)} read as {l.view[0]}x{l.view[1] * l.view[2]}")
            else:
                parts = [name(l.weight) + (f"+{name(l.bias)}" if l.bias is not None else "") for l in c.layers]
                lines.append(f"chain  {' -> '.join(parts)}  neurons {'-'.join(map(str, c.neuron_sizes))}")
        return "\n".join(lines)


def _lone(i: int, shape: tuple[int, ...]) -> Chain:
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return Chain((ChainLayer(i, None, (rows, cols, 1)),), lone=True)


def _layer_view(shape, prev_view) -> tuple[int, int, int] | None:
    """How weight ``shape`` reads the neurons of the previous layer, or None if it does not."""
    n_out, n_in, k = shape[0], shape[1], math.prod(shape[2:])
    if prev_view is None or n_in == prev_view[0]:
        return n_out, n_in, k
    # a Linear reading a flattened conv map: columns come in blocks of spatial positions per channel
    if len(shape) == 2 and prev_view[2] > 1 and n_in % prev_view[0] == 0:
        return n_out, prev_view[0], n_in // prev_view[0]
    return None


def infer_structure(shapes: Sequence[tuple[int, ...]]) -> Structure:
    """Chains from shapes and order alone: weight (>=2-D) then an optional [n_out] bias."""
    chains: list[Chain] = []
    current: list[ChainLayer] = []

    def flush():
        if current:
            chains.append(Chain(tuple(current)))
            current.clear()

    i = 0
    while i < len(shapes):
        shape = tuple(shapes[i])
        if len(shape) < 2:
            flush()
            chains.append(_lone(i, shape))
            i += 1
            continue
        bias = i + 1 if i + 1 < len(shapes) and tuple(shapes[i + 1]) == (shape[0],) else None
        view = _layer_view(shape, current[-1].view if current else None)
        if view is None:
            flush()
            view = _layer_view(shape, None)
        current.append(ChainLayer(i, bias, view))
        i += 2 if bias is not None else 1
    flush()
    return Structure(tuple(chains), len(shapes))


def structure_from_module(module: nn.Module, params: Sequence) -> Structure:
    """Exact chains from a module's Linear/Conv layers; every other parameter is lone."""
    index = {id(p): i for i, p in enumerate(params)}
    chains: list[Chain] = []
    current: list[ChainLayer] = []
    used: set[int] = set()

    def flush():
        if current:
            chains.append(Chain(tuple(current)))
            current.clear()

    for sub in module.modules():
        own = [p for p in sub.parameters(recurse=False) if id(p) in index]
        if not own:
            continue
        chainable = isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and getattr(sub, "groups", 1) == 1 \
            and id(sub.weight) in index
        if not chainable:
            flush()
            continue
        view = _layer_view(tuple(sub.weight.shape), current[-1].view if current else None)
        if view is None:
            flush()
            view = _layer_view(tuple(sub.weight.shape), None)
        bias = index.get(id(sub.bias)) if sub.bias is not None else None
        current.append(ChainLayer(index[id(sub.weight)], bias, view))
        used.update(i for i in (index[id(sub.weight)], bias) if i is not None)
    flush()
    chains += [_lone(i, tuple(p.shape)) for i, p in enumerate(params) if i not in used]
    return Structure(tuple(chains), len(params))
