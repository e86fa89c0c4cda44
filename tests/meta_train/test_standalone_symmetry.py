"""Symmetries the standalone tasks rely on: every head is invariant to hidden permutations, and the
SIREN augmentations of embed/SimCLR leave the encoded image unchanged (rendered before and after)."""

import math

import pytest
import torch
from torch import nn

from meta_train.standalone import augment
from meta_train.standalone.edit import EDITORS, build_editor
from meta_train.standalone.harness import MODELS, ModelConfig, Normalizer, build_model
from metaopt import WeightSpace, random_hidden_perms
from tasks.base import Sine
from tasks.weight_data import WeightDataset

W0 = 30.0


def _mlp(*sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


ARCHS = {
    "siren_2_5_7_1": lambda: _mlp(2, 5, 7, 1),
    "mlp_3_9_2": lambda: _mlp(3, 9, 2),
    "mlp_1_4_6_3_1": lambda: _mlp(1, 4, 6, 3, 1),
    "cnn_flatten": lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(4 * 16, 5)),
}


def _batch(arch, n=4, seed=0):
    torch.manual_seed(seed)
    return WeightSpace.from_modules([ARCHS[arch]() for _ in range(n)])


def _uncoupled(ws, g):
    """Permute rows of W_0/b_0 only: a different function, which an invariant model must notice."""
    n = ws.spec.neuron_sizes[1]
    p = torch.roll(torch.arange(n), 1)
    weights, biases = list(ws.weights), list(ws.biases)
    weights[0], biases[0] = weights[0][:, :, p], biases[0][:, :, p]
    return WeightSpace(weights, biases, ws.spec)


INVARIANT = [m for m in MODELS if m not in ("flat", "probe", "gmn_sign")]  # probe: tests/test_probe.py; gmn_sign below


@pytest.mark.parametrize("fourier", [0, 2])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", INVARIANT)
def test_heads_are_invariant_to_hidden_permutations(arch, name, fourier):
    ws = _batch(arch)
    torch.manual_seed(1)
    cfg = ModelConfig(hidden_channels=5, num_layers=2, head_hidden=16, fourier_features=fourier)
    model = build_model(name, ws.spec, 3, cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out = model(ws)
        for _ in range(3):
            permuted = model(ws.permute_hidden(random_hidden_perms(ws.spec, g, batch_size=ws.batch_size)))
            assert (permuted - out).abs().max().item() < 1e-5
    assert out.shape == (4, 3)


@pytest.mark.parametrize("arch", ["siren_2_5_7_1", "cnn_flatten"])
@pytest.mark.parametrize("name", ["ours", "ours_np", "gmn", "nfn"])
def test_equivariant_heads_see_uncoupled_permutations(arch, name):
    """The invariance test above could pass for a model that ignores structure; this one cannot."""
    ws = _batch(arch)
    torch.manual_seed(1)
    model = build_model(name, ws.spec, 3, ModelConfig(hidden_channels=5, num_layers=2, head_hidden=16)).eval()
    with torch.no_grad():
        out = model(ws)
        assert (model(_uncoupled(ws, None)) - out).abs().max().item() > 1e-4 * out.abs().max().item()


def test_flat_mlp_is_not_invariant():
    ws = _batch("siren_2_5_7_1")
    torch.manual_seed(1)
    model = build_model("flat", ws.spec, 3, ModelConfig(head_hidden=16)).eval()
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(2), batch_size=ws.batch_size)
    with torch.no_grad():
        assert (model(ws.permute_hidden(perms)) - model(ws)).abs().max() > 1e-4


def test_normalizer_commutes_with_permutations_and_inverts():
    ws = _batch("mlp_1_4_6_3_1", n=6)
    ds = WeightDataset(ws.spec, [w[:, 0] for w in ws.weights], [b[:, 0] for b in ws.biases])
    norm = Normalizer.fit(ds)
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(0), batch_size=6)
    a, b = norm(ws.permute_hidden(perms)), norm(ws).permute_hidden(perms)
    assert all(torch.allclose(x, y) for x, y in zip(a.tensors(), b.tensors()))
    back = norm.inverse(norm(ws))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(back.tensors(), ws.tensors()))
    for t in norm(ws).tensors()[:-1]:  # the 1-entry last bias aside, each tensor is standardized
        assert abs(t.mean().item()) < 1e-5 and abs(t.std().item() - 1) < 0.05


# ----------------------------------------------------------------------------- SIREN symmetries
def _sirens(n=3, sizes=(2, 8, 6, 1), seed=0):
    torch.manual_seed(seed)
    nets = []
    for _ in range(n):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(Sine(W0))
        net = nn.Sequential(*layers)
        with torch.no_grad():  # SIREN-like scales, so sines wrap many times
            for i, m in enumerate(l for l in net if isinstance(l, nn.Linear)):
                m.weight.uniform_(-1 / m.in_features if i == 0 else -math.sqrt(6 / m.in_features) / W0,
                                  1 / m.in_features if i == 0 else math.sqrt(6 / m.in_features) / W0)
        nets.append(net)
    return nets


def _render(ws, template, coords):
    return torch.stack([m(coords) for m in ws.to_modules(template)])


@pytest.mark.parametrize("transform", ["sign_flip", "bias_shift", "permute", "siren_symmetry", "canonical_signs"])
@pytest.mark.parametrize("sizes", [(2, 8, 6, 1), (1, 16, 1), (2, 5, 7, 4, 1)])
def test_siren_symmetries_keep_the_rendered_signal(transform, sizes):
    nets = _sirens(sizes=sizes)
    ws = WeightSpace.from_modules(nets)
    coords = torch.rand(200, sizes[0]) * 2 - 1
    g = torch.Generator().manual_seed(3)
    fn = {"sign_flip": lambda w: augment.sign_flip(w, g),
          "bias_shift": lambda w: augment.bias_shift(w, W0, g, max_shift=3),
          "permute": lambda w: augment.permute(w, g),
          "siren_symmetry": lambda w: augment.siren_symmetry(w, W0, g),
          "canonical_signs": augment.canonical_signs}[transform]
    out = fn(ws)
    changed = max((a - b).abs().max().item() for a, b in zip(out.tensors(), ws.tensors()))
    assert changed > 1e-3, "the augmentation must actually change the weights"
    with torch.no_grad():
        before, after = _render(ws, nets[0], coords), _render(out, nets[0], coords)
    assert (before - after).abs().max().item() < 1e-4 * max(1.0, before.abs().max().item())


@pytest.mark.parametrize("sizes", [(2, 8, 6, 1), (1, 16, 1), (2, 5, 7, 4, 1)])
def test_canonical_signs_pick_one_representative_per_sign_orbit(sizes):
    """All sign-flipped twins of a network map to the same weights, whose hidden biases are >= 0, and
    the canonical form commutes with hidden permutations (so invariant models stay invariant)."""
    ws = WeightSpace.from_modules(_sirens(n=4, sizes=sizes))
    canon = augment.canonical_signs(ws)
    assert all((b >= 0).all() for b in canon.biases[:-1])
    for seed in range(3):
        twin = augment.sign_flip(ws, torch.Generator().manual_seed(seed))
        assert max((a - b).abs().max().item() for a, b in zip(twin.tensors(), ws.tensors())) > 1e-3
        for a, b in zip(augment.canonical_signs(twin).tensors(), canon.tensors()):
            torch.testing.assert_close(a, b)
        perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(10 + seed), batch_size=ws.batch_size)
        for a, b in zip(augment.canonical_signs(ws.permute_hidden(perms)).tensors(),
                        canon.permute_hidden(perms).tensors()):
            torch.testing.assert_close(a, b)
    for a, b in zip(augment.canonical_signs(canon).tensors(), canon.tensors()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sizes", [(2, 8, 6, 1), (2, 5, 7, 4, 3), (3, 6, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_warp_inputs_redraws_the_signal_at_warped_coordinates(sizes, relu):
    """f_i(A_i x + t_i) exactly, for SIRENs and ReLU MLPs, any input dimension."""
    nets = [_mlp(*sizes) for _ in range(3)] if relu else _sirens(sizes=sizes)
    ws = WeightSpace.from_modules(nets)
    g = torch.Generator().manual_seed(0)
    d = sizes[0]
    A = torch.randn(3, d, d, generator=g)
    t = torch.randn(3, d, generator=g) * 0.3
    out = augment.warp_inputs(ws, A, t)
    coords = torch.rand(50, d) * 2 - 1
    with torch.no_grad():
        after = _render(out, nets[0], coords)
        expected = torch.stack([net(coords @ A[i].T + t[i]) for i, net in enumerate(nets)])
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.tensors()[2:], ws.tensors()[2:]):  # only the first layer changes
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="warp_inputs needs A"):
        augment.warp_inputs(ws, A[:2], t[:2])


def test_random_warps_stay_within_their_ranges():
    A, t = augment.random_warps(4000, torch.Generator().manual_seed(0), degrees=10, scale=0.1, shift=0.2)
    det = torch.linalg.det(A)
    zoom = det.abs().sqrt()
    assert zoom.min() >= 0.9 - 1e-5 and zoom.max() <= 1.1 + 1e-5 and zoom.max() > 1.09
    assert 0.45 < (det < 0).float().mean() < 0.55  # mirrored half the time
    angle = torch.atan2(A[:, 1, 0], A[:, 0, 0]).abs()
    assert angle.max() <= math.radians(10) + 1e-5 and angle.max() > math.radians(9.5)
    assert t.abs().max() <= 0.2 and t.abs().max() > 0.19
    A, _ = augment.random_warps(100, torch.Generator().manual_seed(0), mirror=False)
    assert (torch.linalg.det(A) > 0).all()
    with pytest.raises(ValueError, match="scale < 1"):
        augment.random_warps(2, scale=1.5)


def test_image_warp_commutes_with_permutations_and_needs_2d_inputs():
    ws = WeightSpace.from_modules(_sirens(n=4))
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1), batch_size=ws.batch_size)
    a = augment.image_warp(ws.permute_hidden(perms), torch.Generator().manual_seed(2))
    b = augment.image_warp(ws, torch.Generator().manual_seed(2)).permute_hidden(perms)
    for x, y in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="redraws 2-D images"):
        augment.image_warp(WeightSpace.from_modules(_sirens(sizes=(1, 16, 1))))


def test_image_warp_training_augmentation_keeps_canonical_signs():
    """A warp shifts first-layer biases, so the canonical form is taken again after it."""
    from meta_train.standalone.harness import batch_augmentation

    nets = _sirens(n=6)
    with torch.no_grad():  # first-layer biases near 0 once _siren_splits subtracts 0.2, so warps flip their signs
        for net in nets:
            net[0].bias.copy_(0.2 + 0.01 * torch.randn(net[0].bias.shape))
    splits = _siren_splits(nets, canonical=True)
    out = batch_augmentation(splits, image_warps=True, canonical=True)(splits.train, torch.Generator().manual_seed(0))
    raw = splits.normalizer.inverse(out)
    assert all((b >= -1e-5).all() for b in raw.biases[:-1])
    warped = augment.image_warp(splits.normalizer.inverse(splits.train), torch.Generator().manual_seed(0))
    assert any((b < -1e-3).any() for b in warped.biases[:-1])  # without it some would be negative


def test_an_uncompensated_sign_flip_changes_the_signal():
    """Negating a neuron without negating its outgoing weights is *not* a symmetry: the render test sees it."""
    nets = _sirens()
    ws = WeightSpace.from_modules(nets)
    weights, biases = list(ws.weights), list(ws.biases)
    weights[0] = weights[0].clone()
    biases[0] = biases[0].clone()
    weights[0][:, :, 0] *= -1
    biases[0][:, :, 0] *= -1
    broken = WeightSpace(weights, biases, ws.spec)
    coords = torch.rand(200, 2) * 2 - 1
    with torch.no_grad():
        assert (_render(ws, nets[0], coords) - _render(broken, nets[0], coords)).abs().max() > 1e-3


def test_wrong_w0_bias_shift_changes_the_signal():
    nets = _sirens()
    ws = WeightSpace.from_modules(nets)
    coords = torch.rand(200, 2) * 2 - 1
    shifted = augment.bias_shift(ws, W0 / 2, torch.Generator().manual_seed(0), max_shift=1)  # pi/15: not a period
    with torch.no_grad():
        assert (_render(ws, nets[0], coords) - _render(shifted, nets[0], coords)).abs().max() > 1e-3


def test_siren_symmetries_refuse_convolutions():
    ws = _batch("cnn_flatten")
    with pytest.raises(ValueError, match="convolutions"):
        augment.siren_symmetry(ws, W0)


@pytest.mark.parametrize("arch", ["siren_2_5_7_1", "mlp_1_4_6_3_1", "cnn_flatten"])  # CNNs: the adapt task
@pytest.mark.parametrize("name", [e for e in EDITORS if e != "flat"])
def test_editors_are_equivariant_and_see_uncoupled_permutations(arch, name):
    """Editors map weights to weights: permuting the input permutes the output the same way, and a
    permutation that is not a symmetry (rows of W_0 alone) is not simply carried through."""
    ws = _batch(arch)
    torch.manual_seed(1)
    editor = build_editor(name, ws.spec, ModelConfig(hidden_channels=4, num_layers=2, head_hidden=16)).eval()
    with torch.no_grad():
        for p in editor.parameters():  # residual editors start at the identity: give them a real edit
            p.add_(0.1 * torch.randn_like(p))
        out = editor(ws)
        scale = max(t.abs().max().item() for t in out.tensors())
        perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(2), batch_size=ws.batch_size)
        permuted_in, permuted_out = editor(ws.permute_hidden(perms)), out.permute_hidden(perms)
        equivariance = max((a - b).abs().max().item()
                           for a, b in zip(permuted_in.tensors(), permuted_out.tensors()))
        uncoupled = max((a - b).abs().max().item()
                        for a, b in zip(editor(_uncoupled(ws, None)).tensors(), _uncoupled(out, None).tensors()))
    assert equivariance < 1e-5 * max(1.0, scale)
    assert uncoupled > 1e-4 * scale


def _siren_splits(nets, canonical=False, info=None):
    from meta_train.standalone.harness import load_splits
    from meta_train.standalone.smalldata import split_column

    ws = WeightSpace.from_modules(nets)
    n = ws.batch_size
    ds = WeightDataset(ws.spec, [w[:, 0] + 0.3 for w in ws.weights], [b[:, 0] - 0.2 for b in ws.biases],
                       {"split": split_column(n - 2, 1, 1)}, {"w0": W0} if info is None else info)
    return load_splits(ds, [], canonical=canonical)


def test_sign_flip_training_augmentation_is_exact_in_raw_units():
    """The flips act on raw weights: a flip of normalized values would not be a symmetry once the
    normalizer has subtracted a per-tensor mean (the +0.3/-0.2 offsets make those means far from 0)."""
    from meta_train.standalone.harness import batch_augmentation

    nets = _sirens(n=6)
    splits = _siren_splits(nets)
    out = batch_augmentation(splits, sign_flips=True)(splits.train, torch.Generator().manual_seed(0))
    changed = max((a - b).abs().max().item() for a, b in zip(out.tensors(), splits.train.tensors()))
    assert changed > 1e-2
    coords = torch.rand(100, 2) * 2 - 1
    with torch.no_grad():
        before = _render(splits.normalizer.inverse(splits.train), nets[0], coords)
        after = _render(splits.normalizer.inverse(out), nets[0], coords)
    assert (before - after).abs().max().item() < 1e-4 * max(1.0, before.abs().max().item())
    naive = splits.normalizer(splits.normalizer.inverse(splits.train))  # ...but flipping normalized values breaks it
    naive = augment.sign_flip(naive, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (_render(splits.normalizer.inverse(naive), nets[0], coords) - before).abs().max() > 1e-3


@pytest.mark.parametrize("sizes", [(2, 8, 6, 1), (1, 16, 1), (2, 5, 7, 4, 3)])
def test_the_sign_symmetric_gmn_is_invariant_to_sign_flips_of_the_raw_networks(sizes):
    """Through the harness' normalized splits (means far from 0): flips of the raw networks, then
    normalized, leave the output unchanged; permutations too. The plain GMN does see the flips."""
    from meta_train.standalone.harness import build_model

    nets = _sirens(n=6, sizes=sizes)
    splits = _siren_splits(nets)
    raw = splits.normalizer.inverse(splits.train)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig(hidden_channels=6, num_layers=2, head_hidden=16)
    torch.manual_seed(1)
    model = build_model("gmn_sign", splits.spec, 3, cfg, normalizer=splits.normalizer).eval()
    plain = build_model("gmn", splits.spec, 3, cfg).eval()
    with torch.no_grad():
        out, plain_out = model(splits.train), plain(splits.train)
        for _ in range(3):
            flipped = splits.normalizer(augment.sign_flip(raw, g))
            assert (model(flipped) - out).abs().max().item() < 1e-5 * max(1.0, out.abs().max().item())
            assert (model(splits.normalizer(augment.permute(raw, g))) - out).abs().max().item() < 1e-5
        assert (plain(flipped) - plain_out).abs().max().item() > 1e-3 * plain_out.abs().max().item()
        assert (model(_uncoupled(splits.train, None)) - out).abs().max().item() > 1e-4 * out.abs().max().item()


def test_sign_message_passing_flips_with_the_neurons():
    """Hidden neuron features change sign with their neuron, edge features with the product of
    their two neurons' signs; input and output neurons never flip."""
    from metaopt.layers import GraphEncoder, SignMessagePassing

    ws = WeightSpace.from_modules(_sirens(n=3, sizes=(2, 5, 7, 3)))
    torch.manual_seed(0)
    encoder, rounds = GraphEncoder(ws.spec, 1, 4, sign_symmetric=True), [SignMessagePassing(4) for _ in range(2)]

    def run(x):
        graph = encoder(x)
        for mp in rounds:
            graph = mp(graph)
        return graph

    signs = [torch.where(torch.rand(3, n) < 0.5, -1.0, 1.0) for n in ws.spec.hidden_sizes]
    flipped = augment._apply(ws, signs, [torch.zeros_like(s) for s in signs], 1.0)
    full = [torch.ones(3, ws.spec.neuron_sizes[0])] + signs + [torch.ones(3, ws.spec.neuron_sizes[-1])]
    a, b = run(ws), run(flipped)
    for k, (x, y) in enumerate(zip(a.nodes, b.nodes)):
        assert (x * full[k][..., None] - y).abs().max().item() < 1e-5, f"neuron set {k}"
    for l, (x, y) in enumerate(zip(a.edges, b.edges)):
        product = full[l + 1][:, :, None, None] * full[l][:, None, :, None]
        assert (x * product - y).abs().max().item() < 1e-5, f"weight layer {l}"
    assert max((x - y).abs().max().item() for x, y in zip(a.nodes[1:-1], b.nodes[1:-1])) > 1e-3  # not trivially even


def test_the_sign_symmetric_gmn_refuses_what_would_break_its_invariance():
    from meta_train.standalone.harness import StandaloneError, build_model

    splits = _siren_splits(_sirens(n=4))
    with pytest.raises(StandaloneError, match="normalizer"):
        build_model("gmn_sign", splits.spec, 3)
    with pytest.raises(StandaloneError, match="Fourier"):
        build_model("gmn_sign", splits.spec, 3, ModelConfig(fourier_features=2), normalizer=splits.normalizer)


def test_sign_flips_and_canonical_signs_need_a_siren_dataset():
    from meta_train.standalone.harness import StandaloneError, batch_augmentation

    with pytest.raises(StandaloneError, match="not a SIREN dataset"):
        batch_augmentation(_siren_splits(_sirens(n=4), info={}), sign_flips=True)
    with pytest.raises(StandaloneError, match="not a SIREN dataset"):
        _siren_splits(_sirens(n=4), canonical=True, info={})


def test_canonical_splits_render_the_same_signals_with_non_negative_biases():
    """The canonical form is taken on raw weights, before the normalizer is fitted on it."""
    nets = _sirens(n=6)
    plain, canon = _siren_splits(nets), _siren_splits(nets, canonical=True)
    raw = canon.normalizer.inverse(canon.train)
    assert all((b >= -1e-5).all() for b in raw.biases[:-1])
    assert any((b < -1e-3).any() for b in plain.normalizer.inverse(plain.train).biases[:-1])
    for t in canon.train.tensors()[:-1]:
        assert abs(t.mean().item()) < 1e-5
    coords = torch.rand(100, 2) * 2 - 1
    with torch.no_grad():
        before = _render(plain.normalizer.inverse(plain.train), nets[0], coords)
        after = _render(raw, nets[0], coords)
    assert (before - after).abs().max().item() < 1e-4 * max(1.0, before.abs().max().item())
