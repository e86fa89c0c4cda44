"""The NP and DWS layers span the *whole* space of equivariant affine maps, not just part of it.

The space of linear maps commuting with a permutation representation has one dimension per orbit
of the group on pairs of parameter positions (the orbit indicator matrices are a basis), and the
invariant biases one per orbit on positions. We count the orbits exactly (connected components of
the generators' action) and compare with the rank of each layer's parameter-to-map function.
"""

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from _archs import mlp
from metaopt import WeightSpace
from metaopt.layers import DWSLinear, NPLinear

SMALL = {
    "mlp2": lambda: mlp(2, 3, 2),
    "mlp3": lambda: mlp(3, 2, 3, 2),
    "mlp3_wide_in": lambda: mlp(4, 2, 2, 1),
    "cnn1d": lambda: nn.Sequential(nn.Conv1d(2, 2, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2, 2)),
}


def permute_set(ws: WeightSpace, s: int, p: torch.Tensor) -> WeightSpace:
    """Permute neuron set s, whether hidden, input (s=0) or output (s=L)."""
    weights, biases = list(ws.weights), list(ws.biases)
    if s > 0:
        weights[s - 1], biases[s - 1] = weights[s - 1][:, :, p], biases[s - 1][:, :, p]
    if s < ws.spec.num_layers:
        weights[s] = weights[s][:, :, :, p]
    return WeightSpace(weights, biases, ws.spec)


def generators(spec, sets):
    """Position permutations (as index arrays) generating the product of symmetric groups on ``sets``."""
    D = spec.num_params()
    index = WeightSpace.from_flat(torch.arange(D, dtype=torch.float64)[None, None], spec)
    gens = []
    for s in sets:
        n = spec.neuron_sizes[s]
        if n < 2:
            continue
        for p in (torch.tensor([1, 0] + list(range(2, n))), torch.roll(torch.arange(n), 1)):
            gens.append(permute_set(index, s, p).flatten()[0, 0].long().numpy())
    return gens


def count_orbits(D, gens, pairs):
    ids = np.arange(D * D).reshape(D, D) if pairs else np.arange(D)
    src, dst = [], []
    for g in gens:
        src.append(ids.ravel())
        dst.append((ids[np.ix_(g, g)] if pairs else ids[g]).ravel())
    n = ids.size
    graph = coo_matrix((np.ones(sum(map(len, src))), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))
    return connected_components(graph, directed=False)[0]


def layer_ranks(make_layer, spec, forward=None):
    """Ranks of (linear part, bias part) of the layer family over random parameters."""
    D = spec.num_params()
    basis = WeightSpace.from_flat(torch.eye(D, dtype=torch.float64)[:, None], spec)
    zero = WeightSpace.from_flat(torch.zeros(1, 1, D, dtype=torch.float64), spec)
    layer = make_layer().double()
    forward = forward or (lambda ws: layer(ws).flatten()[:, 0])
    n_params = sum(p.numel() for p in layer.parameters())
    maps, biases = [], []
    torch.manual_seed(0)
    for _ in range(n_params + 8):
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
            b = forward(zero)
            maps.append((forward(basis) - b).flatten())
            biases.append(b.flatten())
    rank = lambda rows: torch.linalg.matrix_rank(torch.stack(rows)).item()
    return rank(maps), rank(biases)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_np_spans_all_np_equivariant_maps(arch):
    spec = WeightSpace.from_modules(SMALL[arch]()).spec
    gens = generators(spec, range(spec.num_layers + 1))
    D = spec.num_params()
    assert layer_ranks(lambda: NPLinear(spec, 1, 1), spec) == (count_orbits(D, gens, True),
                                                              count_orbits(D, gens, False))


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_dense_dws_spans_all_hidden_equivariant_maps(arch):
    spec = WeightSpace.from_modules(SMALL[arch]()).spec
    gens = generators(spec, spec.permutable_sets)
    D = spec.num_params()
    expected = (count_orbits(D, gens, True), count_orbits(D, gens, False))
    assert layer_ranks(lambda: DWSLinear(spec, 1, 1, max_dense_io=None), spec) == expected


@pytest.mark.parametrize("arch", ["mlp3", "mlp3_wide_in"])
def test_embedded_io_keeps_np_maps_and_adds_positional_biases(arch):
    spec = WeightSpace.from_modules(SMALL[arch]()).spec
    D = spec.num_params()
    np_gens, hidden_gens = generators(spec, range(spec.num_layers + 1)), generators(spec, spec.permutable_sets)
    expected = (count_orbits(D, np_gens, True), count_orbits(D, hidden_gens, False))
    assert layer_ranks(lambda: DWSLinear(spec, 1, 1, max_dense_io=0), spec) == expected
    assert layer_ranks(lambda: NPLinear(spec, 1, 1, io_embed=True), spec) == expected


@pytest.mark.parametrize("arch", ["mlp2", "mlp3", "mlp3_wide_in"])
@pytest.mark.parametrize("kind", ["np", "hnp"])
def test_same_span_as_the_nfn_package(arch, kind):
    nfn_layers = pytest.importorskip("nfn.layers")
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat

    spec = WeightSpace.from_modules(SMALL[arch]()).spec
    probe = WeightSpace.from_flat(torch.zeros(1, 1, spec.num_params()), spec)
    nfn_spec = network_spec_from_wsfeat(WeightSpaceFeatures(probe.weights, probe.biases), set_all_dims=True)
    make = (lambda: nfn_layers.NPLinear(nfn_spec, 1, 1)) if kind == "np" else (lambda: nfn_layers.HNPLinear(nfn_spec, 1, 1))
    holder = {}

    def make_and_keep():
        holder["layer"] = make()
        return holder["layer"]

    def nfn_forward(ws):
        out = holder["layer"](WeightSpaceFeatures(ws.weights, ws.biases))
        return WeightSpace(out.weights, out.biases, spec).flatten()[:, 0]

    ours = (lambda: NPLinear(spec, 1, 1)) if kind == "np" else (lambda: DWSLinear(spec, 1, 1, max_dense_io=None))
    theirs, mine = layer_ranks(make_and_keep, spec, nfn_forward)[0], layer_ranks(ours, spec)[0]
    if kind == "np":
        assert theirs == mine
    else:  # nfn's HNPLinear misses 1-2 of the orbit dimensions (e.g. 72 of 74 on 2-3-2); ours has them all
        assert theirs <= mine
