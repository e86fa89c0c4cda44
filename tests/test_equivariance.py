"""Symmetry is correctness: every equivariant or invariant piece, on every test architecture,
commutes with random coupled hidden permutations and does *not* commute with uncoupled ones."""

import math

import pytest
import torch
from torch import nn

from _archs import ARCHS, batch, max_diff, permute_inputs, uncoupled
from metaopt import random_hidden_perms
from metaopt.layers import (ChannelDropout, DWSLinear, Elementwise, FourierFeatures, GraphEncoder, InvariantPool,
                            MessagePassing, NPLinear, WeightSpaceNorm)
from metaopt.models import NFN, DWSNet, DeepSets, InvariantDWSNet, InvariantGMN, InvariantNFN, StatNN

EQUIVARIANT = {
    "np": lambda s, c: NPLinear(s, c, 4),
    "np_io_embed": lambda s, c: NPLinear(s, c, 4, io_embed=True),
    "dws_dense": lambda s, c: DWSLinear(s, c, 4, max_dense_io=None),
    "dws_embedded": lambda s, c: DWSLinear(s, c, 4, max_dense_io=0),
    "nfn": lambda s, c: NFN(s, c, 2, hidden_channels=6, norm=True),
    "dwsnet": lambda s, c: DWSNet(s, c, 2, hidden_channels=6, num_layers=4),
    "norm": lambda s, c: WeightSpaceNorm(2 * s.num_layers, c),
    "gelu": lambda s, c: Elementwise(nn.GELU()),
    "fourier": lambda s, c: FourierFeatures(c, 3, scale=0.5),
}
INVARIANT = {
    "inv_nfn": lambda s, c: InvariantNFN(s, c, 3, hidden_channels=6),
    "inv_dwsnet": lambda s, c: InvariantDWSNet(s, c, 3, hidden_channels=6),
    "statnn": lambda s, c: StatNN(s, c, 3),
    "deepsets": lambda s, c: DeepSets(s, c, 3),
    "pool_np": lambda s, c: InvariantPool(s),
    "pool_dws": lambda s, c: InvariantPool(s, keep_io=True),
    "pool_np_meanmax": lambda s, c: InvariantPool(s, pooling="meanmax"),
    "pool_dws_meanmax": lambda s, c: InvariantPool(s, keep_io=True, pooling="meanmax"),
    "inv_gmn": lambda s, c: InvariantGMN(s, c, 3, hidden_channels=6),
    "inv_gmn_sign": lambda s, c: InvariantGMN(s, c, 3, hidden_channels=6, sign_symmetric=True),
    "inv_dwsnet_meanmax": lambda s, c: InvariantDWSNet(s, c, 3, hidden_channels=6, pooling="meanmax"),
    "fourier_inv_dwsnet": lambda s, c: nn.Sequential(FourierFeatures(c, 2, scale=1.0),
                                                     InvariantDWSNet(s, c + 4, 3, hidden_channels=6)),
}
TOL = 2e-5  # float32: a few ulps of the largest activations


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("kind", sorted(EQUIVARIANT))
def test_equivariant(arch, kind):
    ws = batch(arch, n=3, channels=2)
    torch.manual_seed(0)
    layer = EQUIVARIANT[kind](ws.spec, 2)
    g = torch.Generator().manual_seed(1)
    for batched in (None, 3):
        perms = random_hidden_perms(ws.spec, g, batch_size=batched)
        assert max_diff(layer(ws.permute_hidden(perms)), layer(ws).permute_hidden(perms)) < TOL


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("kind", sorted(INVARIANT))
def test_invariant(arch, kind):
    ws = batch(arch, n=3, channels=2)
    torch.manual_seed(0)
    model = INVARIANT[kind](ws.spec, 2)
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1), batch_size=3)
    assert max_diff(model(ws.permute_hidden(perms)), model(ws)) < TOL


# Sensitivity: layers that mix tensors must notice when a permutation is not coupled.
MIXING = ["np", "np_io_embed", "dws_dense", "dws_embedded", "nfn", "dwsnet"]


@pytest.mark.parametrize("arch", ["mlp3", "mlp5", "cnn2d_flatten"])
@pytest.mark.parametrize("kind", MIXING)
def test_equivariant_layers_see_uncoupled_permutations(arch, kind):
    ws = batch(arch, n=2)
    torch.manual_seed(0)
    layer = EQUIVARIANT[kind](ws.spec, 1)
    g = torch.Generator().manual_seed(3)
    for k in range(ws.spec.num_layers - 1):
        g.manual_seed(k)
        a = layer(uncoupled(ws, k, g))
        g.manual_seed(k)
        b = uncoupled(layer(ws), k, g)
        scale = max(t.abs().max().item() for t in b.tensors())
        assert max_diff(a, b) > 1e-3 * scale, f"hidden layer {k}"  # far above float32 noise (~1e-7 * scale)


# (StatNN and DeepSets read per-tensor statistics: blind to coupling by design, the weaker baselines.)
@pytest.mark.parametrize("kind", ["inv_nfn", "inv_dwsnet", "inv_dwsnet_meanmax", "fourier_inv_dwsnet", "inv_gmn",
                                  "inv_gmn_sign"])
@pytest.mark.parametrize("arch", ["mlp3", "cnn2d_gap"])
def test_invariant_models_see_uncoupled_permutations(kind, arch):
    ws = batch(arch, n=2)
    torch.manual_seed(0)
    model = INVARIANT[kind](ws.spec, 1)
    out = model(ws)
    assert max_diff(model(uncoupled(ws, 0)), out) > 1e-3 * out.abs().max().item()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_message_passing_moves_with_the_neurons(arch):
    """Each round's neuron and edge features permute exactly as the neurons they live on."""
    ws = batch(arch, n=3, channels=2)
    torch.manual_seed(0)
    encoder, rounds = GraphEncoder(ws.spec, 2, 5), [MessagePassing(5) for _ in range(2)]

    def run(x):
        g = encoder(x)
        for mp in rounds:
            g = mp(g)
        return g

    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1), batch_size=3)
    g, gp = run(ws), run(ws.permute_hidden(perms))
    full = [None] + list(perms) + [None]  # input and output neurons stay put
    take = lambda x, p, dim: x if p is None else torch.stack([x[b].index_select(dim - 1, p[b]) for b in range(3)])
    for s, (a, b) in enumerate(zip(g.nodes, gp.nodes)):
        assert max_diff(take(a, full[s], 1), b) < TOL, f"neuron set {s}"
    for l, (a, b) in enumerate(zip(g.edges, gp.edges)):
        assert max_diff(take(take(a, full[l + 1], 1), full[l], 2), b) < TOL, f"weight layer {l}"


def test_message_passing_tells_input_neurons_apart():
    ws = batch("mlp4", n=2)
    torch.manual_seed(0)
    model = InvariantGMN(ws.spec, 1, 3, hidden_channels=6)
    out = model(ws)
    assert max_diff(model(permute_inputs(ws, torch.Generator().manual_seed(0))), out) > 1e-3 * out.abs().max().item()


@pytest.mark.parametrize("keep_io", [False, True])
def test_meanmax_pooling_appends_the_maxima(keep_io):
    ws = batch("mlp4", n=3, channels=2)
    mean = InvariantPool(ws.spec, keep_io=keep_io)(ws)
    both = InvariantPool(ws.spec, keep_io=keep_io, pooling="meanmax")(ws)
    assert both.shape == (3, 2 * mean.shape[1]) and torch.equal(both[:, :mean.shape[1]], mean)
    if not keep_io:  # every axis pooled: the max part holds each tensor's per-channel maximum, in order
        maxima = torch.cat([t.flatten(2).amax(-1) for t in ws.tensors()], 1)
        assert torch.equal(both[:, mean.shape[1]:], maxima)
    bumped = ws.map(lambda t: t.clone())
    bumped.weights[1][0, 0, 0, 0] += 100.0  # one large hidden weight: the maximum sees it at once
    assert (InvariantPool(ws.spec, keep_io=keep_io, pooling="meanmax")(bumped)[0, mean.shape[1]:]
            - both[0, mean.shape[1]:]).abs().max() > 50


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        InvariantPool(batch("mlp3", n=1).spec, pooling="median")


@pytest.mark.parametrize("kind", ["np_io_embed", "dws_dense", "dws_embedded"])
def test_input_order_matters_unless_np(kind):
    ws = batch("mlp3", n=2)
    torch.manual_seed(0)
    layer = EQUIVARIANT[kind](ws.spec, 1)
    g = torch.Generator()
    g.manual_seed(5)
    a = layer(permute_inputs(ws, g))
    g.manual_seed(5)
    assert max_diff(a, permute_inputs(layer(ws), g)) > 1e-3


def test_plain_np_is_equivariant_to_input_permutations_too():
    ws = batch("mlp3", n=2)
    layer = NPLinear(ws.spec, 1, 3)
    g = torch.Generator()
    g.manual_seed(5)
    a = layer(permute_inputs(ws, g))
    g.manual_seed(5)
    assert max_diff(a, permute_inputs(layer(ws), g)) < TOL


def test_channel_dropout_is_equivariant_per_sample():
    ws = batch("mlp4", n=2, channels=8)
    drop = ChannelDropout(0.5).train()
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    a = drop(ws.permute_hidden(perms))
    torch.manual_seed(7)
    b = drop(ws).permute_hidden(perms)
    assert max_diff(a, b) == 0 and max_diff(a, ws.permute_hidden(perms)) > 0


def test_fourier_features_encode_each_value_alone():
    ws = batch("cnn2d_flatten", n=2, channels=2)
    torch.manual_seed(0)
    enc = FourierFeatures(2, 3, scale=0.5)
    out = enc(ws)
    assert out.channels == enc.out_channels == 2 + 2 * 3
    for t, e in zip(ws.tensors(), out.tensors()):
        assert e.shape == (t.shape[0], 8, *t.shape[2:]) and torch.equal(e[:, :2], t)  # the values themselves first
        phase = 2 * math.pi * torch.einsum("bc...,cm->bm...", t, enc.frequencies)
        assert torch.allclose(e[:, 2:5], phase.sin(), atol=1e-5) and torch.allclose(e[:, 5:], phase.cos(), atol=1e-5)
    flipped = enc(ws.map(torch.neg))  # the cosines are even: blind to a sign flip, the sines are not
    assert max_diff(flipped.weights[0][:, 5:], out.weights[0][:, 5:]) < 1e-6
    assert max_diff(flipped.weights[0][:, 2:5], out.weights[0][:, 2:5]) > 1e-2
    assert FourierFeatures(2, 3, keep_input=False)(ws).channels == 6
    assert "frequencies" in enc.state_dict()  # drawn once, saved with the model


def test_fourier_features_reject_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="num_features >= 1 and scale > 0"):
        FourierFeatures(1, 0)
    with pytest.raises(ValueError, match="scale > 0"):
        FourierFeatures(1, 4, scale=0.0)
    with pytest.raises(ValueError, match="built for 1 input channel.*has 2"):
        FourierFeatures(1, 4)(batch("mlp3", n=1, channels=2))
