"""ProbeNet, the probing model: it runs the networks it reads, so it must be invariant to every
function-preserving change of the weights (hidden permutations, ReLU rescaling), notice changes that
alter the function, and learn a property of the function."""

import pytest
import torch
from torch import nn

from _archs import ARCHS, INPUT_SHAPES, batch, max_diff, uncoupled
from metaopt import WeightSpace, random_hidden_perms
from metaopt.models import ProbeNet


def _probe(arch, ws, **kwargs):
    torch.manual_seed(0)
    template = ARCHS[arch]()
    shape = INPUT_SHAPES.get(arch, (ws.spec.layers[0].n_in,))
    return ProbeNet(ws.spec, template, shape, 3, num_probes=6, hidden=16, probe_range=(-1.0, 1.0), **kwargs)


@pytest.mark.parametrize("generator_depth", [0, 3])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_invariant_to_hidden_permutations_and_blind_to_nothing_else(arch, generator_depth):
    ws = batch(arch, n=4)
    model = _probe(arch, ws, generator_depth=generator_depth)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = model(ws)
        for _ in range(3):
            perms = random_hidden_perms(ws.spec, g, batch_size=ws.batch_size)
            assert max_diff(model(ws.permute_hidden(perms)), out) < 1e-5
        assert max_diff(model(uncoupled(ws, 0, g)), out) > 1e-3 * out.abs().max().item()
    assert out.shape == (4, 3)


def _rescale_relu_neurons(ws, layer, c):
    """Scale hidden neuron j after ``layer`` by ``c[j] > 0`` (incoming weights and bias) and divide its
    outgoing weights by it: a ReLU network computes the same function."""
    weights, biases = list(ws.weights), list(ws.biases)
    shape_out = (1, 1, -1) + (1,) * (weights[layer].dim() - 3)
    shape_in = (1, 1, 1, -1) + (1,) * (weights[layer + 1].dim() - 4)
    weights[layer] = weights[layer] * c.view(shape_out)
    biases[layer] = biases[layer] * c.view(1, 1, -1)
    weights[layer + 1] = weights[layer + 1] / c.view(shape_in)
    return WeightSpace(weights, biases, ws.spec)


@pytest.mark.parametrize("arch", ["mlp2", "mlp4", "cnn2d_flatten"])
def test_invariant_to_relu_rescaling_which_weight_models_are_not(arch):
    ws = batch(arch, n=3)
    model = _probe(arch, ws)
    c = torch.rand(ws.spec.neuron_sizes[1], generator=torch.Generator().manual_seed(2)) * 3 + 0.2
    rescaled = _rescale_relu_neurons(ws, 0, c)
    assert max_diff(rescaled, ws) > 0.1  # other weights ...
    with torch.no_grad():
        assert max_diff(model(rescaled), model(ws)) < 1e-4  # ... the same functions


def test_learns_a_property_of_the_function():
    """Target: each random 1-16-1 ReLU MLP's output at x = 0.3, which no single weight shows."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)) for _ in range(600)]
    ws = WeightSpace.from_modules(nets)
    with torch.no_grad():
        y = torch.stack([net(torch.tensor([[0.3]]))[0, 0] for net in nets])
    y = (y - y.mean()) / y.std()
    model = ProbeNet(ws.spec, nets[0], (1,), 1, num_probes=8, hidden=32, probe_range=(-1.0, 1.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, test = torch.arange(500), torch.arange(500, 600)
    part = lambda idx: WeightSpace([w[idx] for w in ws.weights], [b[idx] for b in ws.biases], ws.spec)  # noqa: E731
    for step in range(300):
        idx = train[torch.randint(0, 500, (64,), generator=torch.Generator().manual_seed(step))]
        loss = (model(part(idx))[:, 0] - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = (model(part(test))[:, 0] - y[test]).square().mean().item()
    assert mse < 0.05  # predicting the mean scores ~1


@pytest.mark.parametrize("generator_depth", [0, 1, 4])
def test_probes_are_free_or_generated_and_start_in_the_input_range(generator_depth):
    ws = batch("cnn2d_gap", n=2)
    model = ProbeNet(ws.spec, ARCHS["cnn2d_gap"](), INPUT_SHAPES["cnn2d_gap"], 1, num_probes=7,
                     probe_range=(0.0, 1.0), generator_depth=generator_depth)
    probes = model.probe_inputs()
    assert probes.shape == (7, *INPUT_SHAPES["cnn2d_gap"])
    assert abs(probes.mean().item() - 0.5) < 0.15
    learned = dict(model.named_parameters())
    if generator_depth:
        assert model.probes is None and "codes" in learned
        assert sum(k.startswith("generator.") for k in learned) == 2 * generator_depth  # linear: no activations
        assert all(isinstance(m, nn.Linear) for m in model.generator)
    else:
        assert "probes" in learned and model.generator is None
    model(ws).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # the probes are learned, not fixed


def test_keeps_the_architecture_out_of_its_parameters_and_moves_with_the_model():
    ws = batch("cnn2d_gap", n=2)
    model = _probe("cnn2d_gap", ws, generator_depth=0)
    assert set(model.state_dict()) == {"probes"} | {
        f"net.{k}" for k in model.net.state_dict()}
    model = model.double()
    assert model._template[0][0].weight.dtype == torch.float64
    with torch.no_grad():
        assert model(ws.map(lambda t: t.double())).dtype == torch.float64


def test_bad_input_is_a_clear_error():
    ws = batch("mlp2", n=2)
    with pytest.raises(ValueError, match="must be the same tensors"):
        ProbeNet(ws.spec, ARCHS["mlp4"](), (3,))
    with pytest.raises(ValueError, match="generator_depth >= 0"):
        ProbeNet(ws.spec, ARCHS["mlp2"](), (3,), generator_depth=-1)
    model = _probe("mlp2", ws)
    with pytest.raises(ValueError, match="was built for"):
        model(batch("mlp4", n=2))
    with pytest.raises(ValueError, match="one-channel"):
        model(batch("mlp2", n=2, channels=2))
