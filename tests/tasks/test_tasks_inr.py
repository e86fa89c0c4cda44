import math

import pytest
import torch

import tasks
from tasks import INRTask, Population, fit_inrs, psnr, siren
from tasks.data import load_digits, sine_wave


def digits_population(n, hidden=(16, 16)):
    images = load_digits("train")[0][:n]
    return Population([INRTask(siren(2, hidden), images[i], i) for i in range(n)])


def test_siren_init_follows_the_recipe():
    net = siren(2, (32, 32), 1, w0=30.0)
    p = net.init_params(0)
    bounds = {"0.weight": 1 / 2, "2.weight": math.sqrt(6 / 32) / 30, "4.weight": math.sqrt(6 / 32) / 30,
              "0.bias": 1 / math.sqrt(2), "2.bias": 1 / math.sqrt(32), "4.bias": 1 / math.sqrt(32)}
    for name, bound in bounds.items():
        assert p[name].abs().max() <= bound
        if p[name].numel() >= 32:
            assert p[name].abs().max() > 0.8 * bound  # uses the whole range
    assert [type(m).__name__ for m in net.module()] == ["Linear", "Sine", "Linear", "Sine", "Linear"]
    assert net.template[1].w0 == 30.0 and net.template[3].w0 == 30.0


def test_grid_is_row_major_in_minus_one_one():
    axes, coords = tasks.grid((3, 4))
    assert coords.shape == (12, 2)
    assert coords[0].tolist() == [-1.0, -1.0] and coords[-1].tolist() == [1.0, 1.0]
    assert coords[1].tolist() == pytest.approx([-1.0, -1.0 + 2 / 3])  # second coordinate is the column


def test_psnr_of_known_images():
    assert psnr(torch.tensor(0.01)).item() == pytest.approx(20.0)
    assert psnr(torch.tensor(1e-4)).item() == pytest.approx(40.0)
    image = torch.zeros(8, 8)
    image[:, 4:] = 1.0  # half black, half white
    task = INRTask(siren(2, (8,)), image, seed=0)
    zero = {k: torch.zeros_like(v) for k, v in task.init_params(0).items()}
    # a zero network predicts 0.5 everywhere: mse 0.25, psnr 10 log10(4)
    assert task.evaluate(zero)["psnr"] == pytest.approx(10 * math.log10(4), rel=1e-5)
    assert torch.allclose(task.render(zero), torch.full((8, 8), 0.5))


def test_signal_and_network_must_agree():
    with pytest.raises(ValueError, match="2-D coordinates"):
        INRTask(siren(2, (8,)), sine_wave(0, 16), seed=0)
    with pytest.raises(ValueError, match=r"\[L\] or \[H, W\]"):
        INRTask(siren(2, (8,)), torch.zeros(2, 3, 4), seed=0)
    with pytest.raises(ValueError, match="unknown INR dataset"):
        tasks.INRFamily("cifar10")


@pytest.mark.parametrize("shape,hidden", [((8, 8), (16, 16)), ((8, 8), (8, 12, 8)), ((8, 8), (16,)), ((32,), (16,)),
                                         ((32,), (8, 8))])
def test_fast_gradients_equal_autograd(shape, hidden):
    n = 5
    if len(shape) == 2:
        signals = load_digits("train")[0][:n]
    else:
        signals = torch.stack([sine_wave(i, shape[0]) for i in range(n)])
    pop = Population([INRTask(siren(len(shape), hidden), signals[i], i) for i in range(n)])
    seeds = [10, 11, 12, 13, 14]
    fit = tasks.SirenFit(pop, seeds, chunk=2)  # chunks of 2, 2, 1
    params = {k: v.requires_grad_() for k, v in pop.init_params(seeds).items()}
    losses = pop.loss(params, pop.sample_batch(None))
    losses.sum().backward()
    fast_losses = fit.step()
    assert torch.allclose(fast_losses, losses.detach(), rtol=1e-5)
    for (name, p), g in zip(params.items(), fit.grad.split([v[0].numel() for v in params.values()], dim=1)):
        assert torch.allclose(g.view_as(p), p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max()), name


def test_siren_inits():
    w0, bound = 30.0, math.sqrt(6 / 2) / 30.0
    dws = siren(2, (32, 32), 1, w0, init="dwsnets").init_params(0)
    assert dws["0.bias"].abs().max() == 0 and dws["2.bias"].abs().max() == 0  # sine layers start with no phase
    assert bound / 2 < dws["0.weight"].abs().max() <= bound  # the first layer like the others: low frequencies
    assert 0 < dws["4.bias"].abs().max() <= 1 / math.sqrt(32)  # the output layer keeps nn.Linear's default
    assert 1 / math.sqrt(32) / 2 < dws["4.weight"].abs().max() <= 1 / math.sqrt(32)
    sitz = siren(2, (32, 32), 1, w0).init_params(0)
    assert 0.25 < sitz["0.weight"].abs().max() <= 0.5 and sitz["0.bias"].abs().max() > 0.3
    assert "dwsnets init" in siren(2, (8,), init="dwsnets").name and "init" not in siren(2, (8,)).name
    with pytest.raises(ValueError, match="unknown SIREN init 'xavier'"):
        siren(2, (8,), init="xavier")


def test_fit_inrs_is_adam():
    pop = digits_population(3)
    seeds = [0, 1, 2]
    fast, _ = fit_inrs(pop, seeds, steps=5, lr=1e-3, chunk=2)
    slow, _ = tasks.train_population(pop, lambda ps: torch.optim.Adam(ps, lr=1e-3), 5, seeds)
    for name in fast:
        assert torch.allclose(fast[name], slow[name], atol=1e-6), name


def test_fitting_raises_psnr():
    pop = digits_population(4)
    before = pop.evaluate(pop.init_params([0, 1, 2, 3]))["psnr"]
    params, mse = fit_inrs(pop, [0, 1, 2, 3], steps=150, lr=1e-3)
    after = pop.evaluate(params)["psnr"]
    assert torch.allclose(after, psnr(mse))
    assert (after > before + 10).all() and (after > 25).all()


def test_train_loop_decreases_inr_loss():
    task = tasks.INRFamily("sine", widths=(16,), depths=(2,), points=64).sample(0)
    losses = tasks.train(task, lambda ps: torch.optim.Adam(ps, lr=1e-3), steps=60, seed=0)
    assert losses[-1] < 0.1 * losses[0]


def test_family_picks_signals_by_seed():
    family = tasks.INRFamily("digits", widths=(8, 16), depths=(1, 2), images=50)
    a, b, c = family.sample(1), family.sample(1), family.sample(2)
    assert torch.equal(a.signal, b.signal) and a.network.name == b.network.name
    pop = family.population(1, 4)
    assert len({t.network.name for t in pop.tasks}) == 1
    assert len({t.signal.sum().item() for t in pop.tasks}) > 1  # members fit different images
    assert not (torch.equal(a.signal, c.signal) and a.network.name == c.network.name)


def test_dropping_members_leaves_the_others_unchanged():
    images = load_digits("train")[0][:5]
    net = siren(2, (16,), 1)
    pop = Population([INRTask(net, x, i) for i, x in enumerate(images)])
    full, part = tasks.SirenFit(pop, list(range(5)), chunk=2), tasks.SirenFit(pop, list(range(5)), chunk=2)
    for _ in range(5):
        full.step(), part.step()
    keep = torch.tensor([True, False, True, True, False])
    part.keep(keep)
    assert len(part) == 3 and len(part.chunks) == 2
    for _ in range(5):
        losses = part.step()
        full.step()
    assert losses.shape == (3,)
    for k, v in part.params().items():
        torch.testing.assert_close(v, full.params()[k][keep], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="boolean mask of shape"):
        part.keep(torch.tensor([True, False]))


def test_sin_cos_matches_float64_reference():
    from tasks.siren_kernels import REDUCTION_LIMIT, sin_cos

    quadrant_edges = torch.arange(-40, 41, dtype=torch.float64)[:, None] * math.pi / 2 + torch.tensor([-1e-6, 0, 1e-6])
    for x in (torch.linspace(-200.0, 200.0, 100_001),  # SIREN pre-activations reach ~w0 * |Wx + b|
              torch.linspace(-REDUCTION_LIMIT + 1, REDUCTION_LIMIT - 1, 100_001),
              quadrant_edges.flatten().float()):
        s, c = sin_cos(x.reshape(-1, 7) if len(x) % 7 == 0 else x)
        exact = x.double()
        assert (s.flatten().double() - exact.sin()).abs().max() < 2e-7  # numpy and torch: 7e-8
        assert (c.flatten().double() - exact.cos()).abs().max() < 2e-7
    x, shift = torch.randn(2, 3, 5) * 30, torch.randn(2, 3) * 30  # a shift per row: a layer's bias
    for dtype in (torch.float32, torch.float64):  # the compiled pass, and torch
        s, c = sin_cos(x.to(dtype), shift.to(dtype))
        exact = (x.to(dtype) + shift.to(dtype)[..., None]).double()  # the sum rounded as the kernel rounds it
        assert (s.double() - exact.sin()).abs().max() < 2e-7 and (c.double() - exact.cos()).abs().max() < 2e-7
    with pytest.raises(ValueError, match="shift has shape"):
        sin_cos(x, shift.t())


def test_angle_sum_sin_cos_matches_the_sum_of_angles():
    from tasks.siren_kernels import angle_sum_sin_cos

    a, b = torch.randn(3, 5, 4, dtype=torch.float64) * 30, torch.randn(3, 7, 4, dtype=torch.float64) * 30
    exact = a[:, :, None] + b[:, None]  # [3, 5, 7, 4]
    for dtype in (torch.float32, torch.float64):  # the compiled pass, and torch's elementwise one
        s, c = angle_sum_sin_cos(*(t.to(dtype) for t in (a.sin(), a.cos(), b.sin(), b.cos())))
        assert s.shape == c.shape == (3, 5, 7, 4) and s.dtype == dtype
        assert (s.double() - exact.sin()).abs().max() < 3e-7 and (c.double() - exact.cos()).abs().max() < 3e-7
    with pytest.raises(ValueError, match="need sin_a, cos_a"):
        angle_sum_sin_cos(a.sin(), a.cos(), b.sin()[:, :, :3], b.cos())


def test_first_layer_grads_sum_against_the_grid():
    from tasks.siren_kernels import first_layer_grads

    rows, cols = torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 3)
    cos, dh = torch.randn(2, 15, 4, dtype=torch.float64), torch.randn(2, 15, 4, dtype=torch.float64)
    grid = torch.stack([rows.repeat_interleave(3), cols.repeat(5), torch.ones(15)]).double()  # row-major pixels
    expected = torch.einsum("cn,pnh->phc", grid, cos * dh)
    for dtype in (torch.float32, torch.float64):  # the compiled pass, and torch's matmul
        got = first_layer_grads(cos.to(dtype), dh.to(dtype), [rows.to(dtype), cols.to(dtype)])
        assert got.shape == (2, 4, 3) and torch.allclose(got.double(), expected, atol=1e-5)
    got = first_layer_grads(cos[:, :5].float(), dh[:, :5].float(), [rows])  # a 1-D grid: [coordinate, 1]
    assert torch.allclose(got.double(), torch.einsum("cn,pnh->phc", grid[[0, 2]][:, ::3], (cos * dh)[:, :5]), atol=1e-5)
    with pytest.raises(ValueError, match="on a grid of 1 or 2 axes"):
        first_layer_grads(cos.float(), dh.float(), [rows, rows])


def test_sin_cos_leaves_what_the_kernel_cannot_take_to_torch():
    from tasks.siren_kernels import REDUCTION_LIMIT, sin_cos

    # too large for the range reduction, infinite, NaN: exactly torch's answers (NaN where torch gives NaN)
    x = torch.tensor([0.5, 2 * REDUCTION_LIMIT, 1e20, -math.inf, math.inf, math.nan, -3.0])
    s, c = sin_cos(x)
    assert torch.equal(s.isnan(), x.sin().isnan()) and torch.equal(c.isnan(), x.cos().isnan())
    finite = ~x.sin().isnan()
    assert torch.equal(s[finite], x.sin()[finite]) and torch.equal(c[finite], x.cos()[finite])
    assert sin_cos(torch.tensor([math.nan, 1.0]))[0][0].isnan()  # NaN alone stays in the kernel, and stays NaN
    # float64, a transposed view, a tensor that needs grad
    y = torch.linspace(-50, 50, 60).reshape(6, 10)
    for t in (y.double(), y.t()):
        assert torch.equal(sin_cos(t)[0], t.sin()) and torch.equal(sin_cos(t)[1], t.cos())
    w = y.clone().requires_grad_()
    sum(sin_cos(w)).sum().backward()
    assert torch.allclose(w.grad, y.cos() - y.sin())
