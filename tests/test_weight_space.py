import pytest
import torch
from torch import nn

from _archs import ARCHS, INPUT_SHAPES, batch, max_diff, mlp
from metaopt import UnsupportedLayerError, WeightSpace, random_hidden_perms


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_shapes_follow_the_layout(name):
    ws = batch(name, n=2)
    for (w, b), layer in zip(ws, ws.spec.layers):
        assert tuple(w.shape) == (2, 1, layer.n_out, layer.n_in, *layer.kernel)
        assert tuple(b.shape) == (2, 1, layer.n_out)
    assert ws.flatten().shape == (2, 1, ws.spec.num_params())


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_permuted_networks_compute_the_same_function(name):
    torch.manual_seed(1)
    nets = [ARCHS[name]() for _ in range(3)]
    ws = WeightSpace.from_modules(nets)
    g = torch.Generator().manual_seed(2)
    permuted = ws.permute_hidden(random_hidden_perms(ws.spec, g, batch_size=3))
    assert max_diff(ws, permuted) > 1e-3  # the weights really moved
    x = torch.randn(4, *INPUT_SHAPES.get(name, (ws.spec.neuron_sizes[0],)))
    for net, new in zip(nets, permuted.to_modules(nets[0])):
        torch.testing.assert_close(new(x), net(x), atol=1e-5, rtol=1e-5)


def test_round_trip_module_state_dict_module():
    net = ARCHS["cnn2d_flatten"]()
    ws = WeightSpace.from_modules([net])
    (sd,) = ws.to_state_dicts()
    assert sd.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(sd[k], v)
    again = WeightSpace.from_state_dicts([sd])
    assert again.spec == ws.spec and max_diff(again, ws) == 0


def test_from_raw_tensors_and_flat_round_trip():
    ws = WeightSpace([torch.randn(2, 3, 5, 4), torch.randn(2, 3, 1, 5)], [torch.randn(2, 3, 5), torch.randn(2, 3, 1)])
    assert ws.spec.neuron_sizes == (4, 5, 1) and ws.channels == 3
    assert max_diff(WeightSpace.from_flat(ws.flatten(), ws.spec), ws) == 0


def test_bias_free_layers_round_trip():
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    ws = WeightSpace.from_modules(net)
    assert torch.count_nonzero(ws.biases[0]) == 0
    (sd,) = ws.to_state_dicts()
    assert list(sd) == ["0.weight", "2.weight", "2.bias"]


def test_channels_stack_and_split():
    a, b = batch("mlp3", channels=2), batch("mlp3", seed=3)
    both = WeightSpace.cat_channels([a, b])
    assert both.channels == 3
    a2, b2 = both.split_channels([2, 1])
    assert max_diff(a2, a) == 0 and max_diff(b2, b) == 0


def test_elementwise_arithmetic():
    a = batch("mlp2")
    assert max_diff(a + a, a * 2) == 0 and max_diff(a - a, a * 0) == 0
    assert max_diff(a.map(torch.neg), -a) == 0


def test_mismatched_architectures_name_the_module():
    with pytest.raises(ValueError, match="module 1 has architecture"):
        WeightSpace.from_modules([mlp(3, 5, 2), mlp(3, 6, 2)])


@pytest.mark.parametrize("bad,word", [(nn.BatchNorm1d(5), "BatchNorm1d"), (nn.Embedding(5, 5), "Embedding"),
                                      (nn.LayerNorm(5), "LayerNorm")])
def test_unsupported_layers_are_named(bad, word):
    net = nn.Sequential(nn.Linear(3, 5), bad, nn.Linear(5, 2))
    with pytest.raises(UnsupportedLayerError, match=word):
        WeightSpace.from_modules(net)


def test_not_a_chain():
    with pytest.raises(UnsupportedLayerError, match="not a chain"):
        WeightSpace.from_modules(nn.Sequential(nn.Linear(3, 5), nn.Linear(4, 2)))


def test_grouped_conv_is_rejected():
    with pytest.raises(UnsupportedLayerError, match="grouped"):
        WeightSpace.from_modules(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)))


def test_bad_raw_shapes():
    with pytest.raises(ValueError, match="layer 1"):
        WeightSpace([torch.randn(2, 1, 5, 4), torch.randn(2, 1, 1, 5)], [torch.randn(2, 1, 5), torch.randn(2, 1, 3)])
    with pytest.raises(ValueError, match="expected weights"):
        WeightSpace([torch.randn(5, 4)], [torch.randn(5)])


def test_bad_permutations():
    ws = batch("mlp3")
    with pytest.raises(ValueError, match="one per hidden layer"):
        ws.permute_hidden([torch.arange(7)])
    with pytest.raises(ValueError, match="length"):
        ws.permute_hidden([torch.arange(7), torch.arange(4)])
