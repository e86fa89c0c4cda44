import copy
import dataclasses
import math
import warnings
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten

from _archs import ARCHS, INPUT_SHAPES, mlp
from metaopt import LearnedOptimizer, MetaNetOptimizer, WeightSpace, random_hidden_perms
from metaopt.optim import CheckpointError, LearnedOptimizerConfig, load_learned, save_learned


def random_learned(seed=0, scale=0.3, **config):
    """A metanetwork far from zero, so the learned part really acts."""
    torch.manual_seed(seed)
    learned = LearnedOptimizer(LearnedOptimizerConfig(**config))
    with torch.no_grad():
        for p in learned.parameters():
            p.normal_(0, scale)
    return learned


# the late phase (additive terms fade from step 2, AMSGrad's second moment from step 3, the step size
# decays from step 3), with a refresh period, so that a few steps cross every switch of the rule
LATE = {"refresh_every": 2, "mix_decay_from": 2, "amsgrad_from": 3, "lr_decay_from": 3}
# the step size lr * d_t from Prodigy's distance estimate (the shipped default's)
PRODIGY = {"step_size": "prodigy", "lr": 1.0, "distance_warmup": 2}  # every step to 2, then at refreshes
# all of it, with the metanetwork's refreshes at steps 1, then (after the warm-up) 4, 7, ..., the
# first moment weighted by the distance estimate (PRODIGY alone keeps Adam's plain momentum), the
# parameter term following the gradient and the step size's hypergradient factor from step 3
SHIPPED_LIKE = {**LATE, **PRODIGY, "late_refresh_every": 3, "distance_weighted_momentum": True,
                "param_term_follows_gradient": True, "hypergradient_from": 3}


def data(name="mlp3", n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = INPUT_SHAPES[name] if name in INPUT_SHAPES else (ARCHS[name]()[0].in_features,)
    return torch.randn(n, *shape, generator=g), torch.randn(n, 1, generator=g)


def loss_fn(net, x, y):
    out = net(x)
    return ((out.mean(-1, keepdim=True) - y) ** 2).mean()


def train(net, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["mlp3", "cnn2d_flatten", "cnn1d"])
def test_untrained_is_adam(name):
    torch.manual_seed(0)
    net = ARCHS[name]()
    ref = copy.deepcopy(net)
    x, y = data(name)
    train(net, MetaNetOptimizer(net.parameters(), lr=1e-2, learned=LearnedOptimizer()), 10, x, y)
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), 10, x, y)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_trained_metanetwork_changes_the_update():
    torch.manual_seed(0)
    net = mlp(4, 7, 3, 2)
    ref = copy.deepcopy(net)
    x, y = data()
    train(net, MetaNetOptimizer(net.parameters(), lr=1e-2, learned=random_learned()), 3, x, y)
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), 3, x, y)
    assert max((a - b).abs().max().item() for a, b in zip(net.parameters(), ref.parameters())) > 1e-3


@pytest.mark.parametrize("config", [{}, {"refresh_every": 3}, LATE, PRODIGY, {**LATE, **PRODIGY}, SHIPPED_LIKE,
                                    {**SHIPPED_LIKE, "distance_init": 1e-3, "distance_growth": 1.1}])
def test_functional_core_matches_the_optimizer(config):
    torch.manual_seed(0)
    net = ARCHS["cnn2d_flatten"]()
    params0 = [p.detach().clone() for p in net.parameters()]
    x, y = data("cnn2d_flatten")
    learned = random_learned(**config)
    opt = MetaNetOptimizer(net.parameters(), lr=3e-3, weight_decay=0.1, learned=learned)
    train(net, opt, 5, x, y)

    params = [p[None] for p in params0]
    state = learned.init(params)
    meta = dict(learned.named_parameters())
    functional = copy.deepcopy(net)
    for step in range(1, 6):
        grads = torch.func.grad(lambda ps: loss_fn_call(functional, net, ps, x, y))(params)
        params, state = learned.update(meta, params, grads, state, step, lr=3e-3, weight_decay=0.1)
    # the shell updates moments with foreach kernels, the core with lerp: float32 rounding differs
    for a, b in zip(net.parameters(), params):
        torch.testing.assert_close(a, b[0], atol=1e-5, rtol=1e-4)
    if config.get("hypergradient_from"):  # (steps this small keep agreeing: test_step_scale_* moves it)
        assert opt.step_scale() == pytest.approx(state["step_scale"][0].item(), rel=1e-5)


@pytest.mark.parametrize("config", [{}, LATE, PRODIGY, {**PRODIGY, "refresh_every": 2}, SHIPPED_LIKE])
def test_functional_state_keeps_the_structure_init_gives(config):
    # meta-training flattens the state between truncations and unflattens it with init's structure,
    # which pairs leaves by position: update must give the same keys in the same order, every step
    # (with Prodigy's estimate and reused coefficients it once put the coefficients first)
    torch.manual_seed(0)
    learned = random_learned(**config)
    params = [p.detach()[None] for p in mlp(4, 7, 3, 2).parameters()]
    state = learned.init(params)
    spec = tree_flatten(state)[1]
    for step in range(1, 6):
        params, state = learned.update(None, params, [torch.randn_like(p) for p in params], state, step)
        assert tree_flatten(state)[1] == spec, step


@pytest.mark.parametrize("step", [1, 7, 300])
def test_tensor_step_matches_python_step(step):
    # compiled callers pass the step as a tensor so that a new step does not recompile
    torch.manual_seed(0)
    net = ARCHS["cnn2d_flatten"]()
    learned = random_learned()
    params = [p.detach()[None] for p in net.parameters()]
    grads, m = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    v = [torch.rand_like(p) for p in params]
    a = learned.direction(None, params, grads, m, v, step)
    b = learned.direction(None, params, grads, m, v, torch.tensor(step))
    # ... and compute its scalars outside the compiled code (inside, they may be recomputed per element)
    c = learned.direction(None, params, grads, m, v, learned.step_scalars(torch.tensor(step), "cpu"))
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(y, z, atol=0, rtol=0)


def loss_fn_call(module, named_from, params, x, y):
    named = {n: p[0] for (n, _), p in zip(named_from.named_parameters(), params)}
    out = torch.func.functional_call(module, named, (x,))
    return ((out.mean(-1, keepdim=True) - y) ** 2).mean()


def train_permuted_twins(name, learned, lr, steps, tol):
    """Train ARCHS[name] and a hidden-permuted copy of it with the same rule; the copy must end as
    the permuted original. Returns both optimizers."""
    torch.manual_seed(0)
    net = ARCHS[name]()
    ws = WeightSpace.from_modules(net)
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1))
    permuted = ws.permute_hidden(perms).to_modules(net)[0]
    x, y = data(name)
    opts = [MetaNetOptimizer(m.parameters(), lr=lr, learned=learned, module=m) for m in (net, permuted)]
    for m, opt in zip((net, permuted), opts):
        train(m, opt, steps, x, y)
    expected = WeightSpace.from_modules(net).permute_hidden(perms)
    for a, b in zip(WeightSpace.from_modules(permuted).tensors(), expected.tensors()):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    return opts


@pytest.mark.parametrize("name,config", [("mlp3", {}), ("mlp5", {}), ("cnn2d_flatten", {}), ("cnn2d_gap", {}),
                                         ("mlp5", {"refresh_every": 2}), ("cnn2d_flatten", {"refresh_every": 2}),
                                         ("mlp5", LATE), ("cnn1d", LATE), ("mlp5", PRODIGY),
                                         ("cnn2d_flatten", {**LATE, **PRODIGY}), ("mlp5", SHIPPED_LIKE)])
def test_update_is_equivariant_to_hidden_permutations(name, config):
    # with refresh_every=2, step 2 reuses step 1's coefficients: the cache must be permuted with the model
    train_permuted_twins(name, random_learned(**config), lr=1e-2, steps=3, tol=1e-5)


@pytest.mark.parametrize("name", ["mlp5", "cnn2d_gap"])
def test_step_scale_is_invariant_to_hidden_permutations(name):
    # the hypergradient factor h reads sums over every tensor: the permuted model gets the same h
    # (here moved well below 1: its gate held open, a fast rate, steps that overshoot) and so the
    # permuted update. Steps of 0.05 for 8 steps amplify float32 reassociation more than the 3 small
    # steps of the test above: 1e-4, where the weights under a wrong permutation are ~6 apart
    learned = random_learned(hypergradient_from=2, hypergradient_gate=1e9, hypergradient_rate=2.0)
    original, permuted = train_permuted_twins(name, learned, lr=0.05, steps=8, tol=1e-4)
    assert original.step_scale() < 0.9
    assert permuted.step_scale() == pytest.approx(original.step_scale(), rel=1e-5)


def test_update_notices_uncoupled_permutations():
    """Sensitivity: permute rows of W_0 and b_0 in *every* input (params, grads, moments) but not
    the columns of W_1. A per-tensor rule such as Adam returns exactly the row-permuted update for
    W_0; a metanetwork that reads the neighbouring layer through the shared neurons must not."""
    torch.manual_seed(0)
    shapes = [(7, 4), (7,), (3, 7), (3,)]
    inputs = [[torch.randn(1, *s) for s in shapes] for _ in range(4)]  # params, grads, exp_avg, exp_avg_sq
    inputs[3] = [v.abs() for v in inputs[3]]
    p = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    uncoupled = [[t[:, p] if i < 2 else t for i, t in enumerate(ts)] for ts in inputs]
    learned = random_learned()
    for rule, should_notice in ((LearnedOptimizer(), False), (learned, True)):
        with torch.no_grad():
            d = rule.direction(None, *inputs, step=5)
            d_unc = rule.direction(None, *uncoupled, step=5)
        gap = (d_unc[0] - d[0][:, p]).abs().max().item()
        assert (gap > 1e-4) == should_notice, (rule, gap)


def test_param_groups_lr_weight_decay_and_closure():
    torch.manual_seed(0)
    net = mlp(3, 5, 2)
    opt = MetaNetOptimizer([{"params": net[0].parameters(), "lr": 0.0},
                            {"params": net[2].parameters(), "lr": 1e-2, "weight_decay": 0.5}],
                           learned=LearnedOptimizer())
    frozen = [q.detach().clone() for q in net[0].parameters()]
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    torch.testing.assert_close(loss, loss_fn(net, x, y) * 0 + loss)  # the closure's loss is returned
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    for a, b in zip(net[0].parameters(), frozen):
        assert torch.equal(a, b)  # lr 0 group did not move
    opt.zero_grad()
    assert all(q.grad is None for q in net.parameters())


@pytest.mark.parametrize("per_group", [False, True])
def test_maximize_ascends_as_minimizing_the_negated_objective(per_group):
    """torch.optim's ``maximize``, for the optimizer or one group: handed the gradients of -f, it
    takes the steps that minimizing f takes, bit for bit, through the shipped-like rule (its
    moments, metanetwork, gradient term and distance estimate all read the sign)."""
    x, y = data()
    runs = []
    for maximize in (False, True):
        torch.manual_seed(0)
        net = ARCHS["mlp3"]()[0]
        params = list(net.parameters())
        flipped = params[-2:] if per_group else params  # the tensors whose gradients are of -f
        if per_group:
            groups = [{"params": params[:-2]}, {"params": flipped, "maximize": maximize}]
            opt = MetaNetOptimizer(groups, learned=random_learned(**SHIPPED_LIKE))
        else:
            opt = MetaNetOptimizer(params, learned=random_learned(**SHIPPED_LIKE), maximize=maximize)
        for _ in range(6):
            opt.zero_grad()
            loss_fn(net, x, y).backward()
            if maximize:
                for q in flipped:
                    q.grad.neg_()
            opt.step()
        runs.append([q.detach().clone() for q in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_named_parameters_and_describe():
    net = mlp(3, 5, 2)
    opt = MetaNetOptimizer(net.named_parameters(), learned=LearnedOptimizer())
    text = opt.describe()
    assert "0.weight+0.bias -> 2.weight+2.bias" in text


def test_lr_scheduler_drives_the_step_size():
    torch.manual_seed(0)
    net = mlp(3, 5, 2)
    opt = MetaNetOptimizer(net.parameters(), lr=1e-2, learned=LearnedOptimizer())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    train(net, opt, 1, x, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [q.detach().clone() for q in net.parameters()]
    train(net, opt, 1, x, y)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))


@pytest.mark.parametrize("dtype,config", [(torch.float32, {}), (torch.bfloat16, {}),
                                          (torch.float32, {"refresh_every": 2}), (torch.bfloat16, {"refresh_every": 2}),
                                          (torch.float32, LATE), (torch.bfloat16, LATE),
                                          (torch.float32, {**LATE, **PRODIGY}), (torch.bfloat16, PRODIGY),
                                          (torch.float32, SHIPPED_LIKE)])
def test_resume_is_bit_exact(dtype, config, tmp_path):
    # refresh_every=2: the checkpoint falls after step 3, so step 4 must reuse the saved coefficients;
    # LATE: ... and the running maximum of the second moment, started at step 3
    torch.manual_seed(0)
    net = mlp(4, 7, 3, 2).to(dtype)
    x, y = data()
    x, y = x.to(dtype), y.to(dtype)
    learned = random_learned(**config)
    opt = MetaNetOptimizer(net.parameters(), lr=1e-2, learned=learned)
    train(net, opt, 3, x, y)
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(net, opt, 3, x, y)

    net2 = mlp(4, 7, 3, 2).to(dtype)
    opt2 = MetaNetOptimizer(net2.parameters(), lr=1e-2, learned=LearnedOptimizer())  # metanet comes from the file
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(net2, opt2, 3, x, y)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train_through_a_float32_master_copy(dtype):
    # the shipped default's first steps are lr * 1e-6: rounded to bfloat16 they vanished, the weights
    # never moved, Prodigy's estimate never grew and the loss stood still for the whole run
    torch.manual_seed(0)
    x, y = data()
    nets = {torch.float32: mlp(4, 7, 3, 2)}
    nets[dtype] = copy.deepcopy(nets[torch.float32]).to(dtype)
    opts = {d: MetaNetOptimizer(n.parameters()) for d, n in nets.items()}
    losses = {d: train(n, opts[d], 150, x.to(d), y.to(d)) for d, n in nets.items()}
    final = {d: sum(ls[-10:]) / 10 for d, ls in losses.items()}
    assert final[torch.float32] < 0.95 * losses[torch.float32][0]  # this fit's floor is ~1.2 from 1.31
    assert final[dtype] < final[torch.float32] * 1.02, (final, losses[dtype][::30])
    assert opts[dtype].distance() > 0.1 * opts[torch.float32].distance()
    p = next(nets[dtype].parameters())
    assert opts[dtype].state[p]["master_param"].dtype == torch.float32
    # a parameter set from outside between steps is taken as it is, not overwritten by the master:
    # one step later it is within a step of the value set, far from the master's old values
    master = opts[dtype].state[p]["master_param"].clone()
    with torch.no_grad():
        p.fill_(2.0)
    train(nets[dtype], opts[dtype], 1, x.to(dtype), y.to(dtype))
    assert (master - 2.0).abs().max() > 1.0
    assert (p.float() - 2.0).abs().max() < 0.3


def test_an_adam_like_lr_with_the_automatic_step_size_warns_and_the_fixed_rule_takes_it():
    # lr multiplies Prodigy's estimate: at 1e-3 the estimate never grows and nothing trains
    net = mlp(4, 7, 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaNetOptimizer(net.parameters())  # the default multiplier, 1.0: silent
        fixed = MetaNetOptimizer(net.parameters(), lr=1e-3, step_size="fixed")
    with pytest.warns(RuntimeWarning, match="lr=0.001 multiplies.*step_size='fixed'"):
        MetaNetOptimizer(net.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="step_size='fixed' makes lr the step size itself"):
        MetaNetOptimizer(net.parameters(), step_size="fixed")  # the shipped lr 1.0 would be Adam at 1.0
    with pytest.raises(ValueError, match="step_size must be one of"):
        MetaNetOptimizer(net.parameters(), step_size="adaptive")
    # the keyword is the learned optimizer with that setting, nothing else
    same = MetaNetOptimizer(net.parameters(), lr=1e-3, learned=load_learned().with_config(step_size="fixed"))
    assert same.learned.config == fixed.learned.config and fixed.learned.config.step_size == "fixed"
    assert all(torch.equal(a, b) for a, b in zip(same.learned.state_dict().values(),
                                                 fixed.learned.state_dict().values()))
    opt = MetaNetOptimizer([{"params": net[0].parameters()}], lr=1.0)
    with pytest.warns(RuntimeWarning, match="lr=0.01 multiplies"):
        opt.add_param_group({"params": net[2].parameters(), "lr": 1e-2})
    # the fixed rule at an Adam lr trains
    x, y = data()
    losses = train(net, fixed, 50, x, y)
    assert losses[-1] < 0.97 * losses[0]


def test_non_finite_gradients_skip_the_step_and_warn_once():
    torch.manual_seed(0)
    net = mlp(3, 5, 2)
    opt = MetaNetOptimizer(net.parameters(), lr=1e-2, learned=random_learned())
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    train(net, opt, 2, x, y)
    params = [q.detach().clone() for q in net.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (float("nan"), float("nan"), float("inf")):
            opt.zero_grad()
            loss_fn(net, x, y).backward()
            net[0].weight.grad[0, 0] = bad
            opt.step()
    messages = [str(w.message) for w in caught]
    assert sum("nan in gradients" in m for m in messages) == 1 and sum("inf in gradients" in m for m in messages) == 1
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), params))
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(st[key], state[k][key]) for key in st)
    train(net, opt, 1, x, y)  # and it carries on afterwards
    assert all(torch.isfinite(q).all() for q in net.parameters())


def test_non_finite_metanetwork_output_falls_back_to_adam():
    torch.manual_seed(0)
    net = mlp(3, 5, 2)
    ref = copy.deepcopy(net)
    broken = LearnedOptimizer()
    with torch.no_grad():
        broken.layers[-1].bias.fill_(float("nan"))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    train(net, MetaNetOptimizer(net.parameters(), lr=1e-2, learned=broken), 3, x, y)
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), 3, x, y)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_any_model_trains_every_tensor():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 11, bias=False)

        def forward(self, tokens):
            return self.head(self.norm(self.block(self.embed(tokens))))

    model = Tiny()
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    opt = MetaNetOptimizer(model.parameters(), lr=1e-2, learned=random_learned(), module=model)
    tokens = torch.randint(0, 11, (4, 6))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
    for n, q in model.named_parameters():
        assert torch.isfinite(q).all(), n
        assert not torch.equal(q, before[n]), f"{n} was not optimized"
    assert "lone" in opt.describe()


@pytest.mark.parametrize("empty_shape", [(0,), (0, 4), (3, 0), (2, 0, 3, 3)])
def test_zero_element_parameters_change_nothing(empty_shape):
    # an empty tensor (a placeholder, a zero-width layer) has nothing to update and must not break the rest
    torch.manual_seed(0)
    nets = [mlp(4, 7, 3, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    empty = nn.Parameter(torch.zeros(empty_shape))
    x, y = data()
    plain = MetaNetOptimizer(nets[0].parameters(), lr=1e-2, learned=random_learned())
    with_empty = MetaNetOptimizer([*nets[1].parameters(), empty], lr=1e-2, learned=random_learned())
    train(nets[0], plain, 3, x, y)
    for _ in range(3):
        with_empty.zero_grad()
        (loss_fn(nets[1], x, y) + empty.sum()).backward()
        with_empty.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert with_empty.state[empty]["exp_avg"].shape == empty_shape


def test_complex_parameters_are_refused_by_name():
    # float32 arithmetic would silently drop the imaginary part
    with pytest.raises(TypeError, match="complex64"):
        MetaNetOptimizer([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    opt = MetaNetOptimizer(nn.Linear(2, 2).parameters())
    with pytest.raises(TypeError, match="complex128"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, dtype=torch.complex128))]})
    assert len(opt.param_groups) == 1  # the refused group left nothing behind


def test_learned_checkpoint_round_trip_and_errors(tmp_path):
    learned = random_learned()
    path = tmp_path / "opt.safetensors"
    save_learned(learned, path)
    again = load_learned(path)
    for (n, a), (_, b) in zip(learned.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_learned(corrupt)
    with pytest.raises(CheckpointError, match="no such"):
        load_learned(tmp_path / "missing.safetensors")

    from safetensors.torch import save_file
    import json
    tensors = {k: v.contiguous() for k, v in learned.state_dict().items()}
    meta = {"format": "metaopt-learned-optimizer", "config": json.dumps(learned.config.to_dict())}
    save_file(tensors, tmp_path / "v99.safetensors", metadata={**meta, "version": "99"})
    with pytest.raises(CheckpointError, match="version"):
        load_learned(tmp_path / "v99.safetensors")
    wrong = dict(tensors)
    wrong["layers.0.bias"] = torch.zeros(5)
    save_file(wrong, tmp_path / "shape.safetensors", metadata={**meta, "version": "1"})
    with pytest.raises(CheckpointError, match="wrong shape for layers.0.bias"):
        load_learned(tmp_path / "shape.safetensors")


def test_optimizer_state_with_wrong_shapes_is_rejected():
    a, b = mlp(3, 5, 2), mlp(3, 6, 2)
    opt_a = MetaNetOptimizer(a.parameters(), learned=LearnedOptimizer())
    train(a, opt_a, 1, torch.randn(4, 3), torch.randn(4, 1))
    opt_b = MetaNetOptimizer(b.parameters(), learned=LearnedOptimizer())
    with pytest.raises(CheckpointError, match="exp_avg of parameter 0 has shape"):
        opt_b.load_state_dict(opt_a.state_dict())


def test_refresh_every_reuses_the_coefficients_in_between():
    torch.manual_seed(0)
    nets = [mlp(4, 7, 3, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = data()
    every_step = MetaNetOptimizer(nets[0].parameters(), lr=1e-2, learned=random_learned())
    every_third = MetaNetOptimizer(nets[1].parameters(), lr=1e-2, learned=random_learned(), refresh_every=3)
    coefficients, differ = [], []
    for _ in range(4):
        train(nets[0], every_step, 1, x, y)
        train(nets[1], every_third, 1, x, y)
        coefficients.append(every_third.state[nets[1][0].weight]["neuron_outputs"].clone())
        differ.append(max((a - b).abs().max().item() for a, b in zip(*(n.parameters() for n in nets))))
    assert differ[0] == 0  # step 1 runs the metanetwork in both
    assert differ[1] > 1e-6  # step 2 reuses step 1's coefficients: a different update
    assert torch.equal(coefficients[0], coefficients[1]) and torch.equal(coefficients[1], coefficients[2])
    assert not torch.equal(coefficients[2], coefficients[3])  # step 4 refreshes
    assert "neuron_outputs" not in every_step.state[nets[0][0].weight]


@pytest.mark.parametrize("bad", [{"refresh_every": 0}, {"mix_decay_from": 0}, {"amsgrad_from": 2.5},
                                 {"amsgrad_from": -1}, {"lr_decay_from": 0}, {"step_size": "adaptive"},
                                 {"distance_warmup": -1}, {"late_refresh_every": 0}, {"refresh_every": None},
                                 {"hypergradient_from": 0}, {"hypergradient_rate": -0.1},
                                 {"hypergradient_gate": math.nan}, {"distance_init": 0.0}, {"distance_init": math.inf},
                                 {"distance_growth": 0.9}, {"distance_growth": math.inf}])
def test_config_steps_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LearnedOptimizerConfig(**bad)


@pytest.mark.parametrize("step", [5, 40])
def test_late_phase_fades_the_additive_terms(step):
    # beyond mix_decay_from = 10 the update is the scaled Adam direction plus the additive terms times 10 / t
    torch.manual_seed(0)
    learned = random_learned()
    params = [p.detach()[None] for p in ARCHS["cnn2d_flatten"]().parameters()]
    grads, m = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    v = [torch.rand_like(p) for p in params]
    full, scales_only, late = (learned.with_config(**c).direction(None, params, grads, m, v, step)
                               for c in ({}, {"max_mix": 0.0}, {"mix_decay_from": 10}))
    fade = min(1.0, 10 / step)
    assert max((a - b).abs().max().item() for a, b in zip(full, scales_only)) > 1e-3  # the terms are there
    for f, s, got in zip(full, scales_only, late):
        torch.testing.assert_close(got, s + fade * (f - s), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("step", [1, 50])
def test_parameter_term_follows_the_gradient(step):
    """With ``param_term_follows_gradient`` the term d * W / rms(W) of each tensor is scaled by
    min(1, rms(g) / rms of the gradient Adam's second moment remembers): gone where the gradient
    is, so the rule's fixed points are the loss's stationary points, and whole at step 1."""
    torch.manual_seed(0)
    learned = random_learned()
    params = [p.detach()[None] for p in ARCHS["cnn2d_flatten"]().parameters()]
    sizes = [0.0, 0.01, 1.0, 30.0]  # per tensor, the gradient's size against the remembered one
    m, v = [torch.randn_like(p) for p in params], [torch.rand_like(p) + 0.5 for p in params]
    grads = [torch.randn_like(p) * sizes[i % 4] for i, p in enumerate(params)]
    if step == 1:  # Adam's second moment after one step is (1 - beta2) g^2: the bias-corrected rms is |g|'s
        v = [(1 - learned.config.beta2) * g * g for g in grads]
    coefficients = learned.direction_and_coefficients(None, params, grads, m, v, step)[1]
    without = coefficients.clone()
    without[..., 4] = without[..., 6] = 0.0  # the parameter terms' mixes (weights, biases)

    def parameter_terms(rule):
        full, none = (rule.direction_and_coefficients(None, params, grads, m, v, step, coefficients=c)[0]
                      for c in (coefficients, without))
        return [f - n for f, n in zip(full, none)]

    plain, following = parameter_terms(learned), parameter_terms(learned.with_config(param_term_follows_gradient=True))
    bc2 = 1 - learned.config.beta2 ** step
    for g, vt, a, b in zip(grads, v, plain, following):
        assert a.abs().max() > 1e-4  # the term is there
        if not g.any():
            assert not b.any()  # no gradient, no push
        elif step == 1:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)  # at step 1 the rule is unchanged
        else:
            ratio = min(1.0, (g.square().mean() / (vt.mean() / bc2)).sqrt().item())
            torch.testing.assert_close(b, a * ratio, atol=1e-6, rtol=1e-4)


def test_step_scale_follows_the_cosine_at_a_floor():
    """log h += rate * from / t * (gate * cos + 1 - gate), h <= 1; cos of this gradient and the last
    step's direction, gate = max(0, 1 - rho / config.hypergradient_gate), rho the gradient's size
    against the one Adam's second moment remembers."""
    learned = LearnedOptimizer(LearnedOptimizerConfig(hypergradient_from=10, hypergradient_rate=0.2,
                                                      hypergradient_gate=0.01))
    half, g, d = torch.tensor([0.5]), torch.tensor([4.0]), torch.tensor([9.0])  # squared norms: |g| = 2, |d| = 3

    def scale(dot, rho):  # at step 20: rate 0.2 * 10 / 20 = 0.1
        return learned.step_scale(half, torch.tensor([dot]), g, d, g / rho ** 2, 20).item()

    gate = 1 - 1e-6 / 0.01  # at a floor: the cosine, almost alone
    for dot, cos in ((-6.0, -1.0), (6.0, 1.0), (-3.0, -0.5), (0.0, 0.0)):
        assert scale(dot, 1e-6) == pytest.approx(0.5 * math.exp(0.1 * (gate * cos + 1 - gate)), rel=1e-6)
    assert scale(-6.0, 0.005) == pytest.approx(0.5, rel=1e-6)  # half-way: half cos, half growth back
    assert scale(-6.0, 0.5) == pytest.approx(0.5 * math.exp(0.1), rel=1e-6)  # off the floor: back towards 1
    assert learned.step_scale(torch.tensor([1.0]), torch.tensor([6.0]), g, d, g * 1e12, 20).item() == 1.0  # at most 1
    # no last step (a zero direction) and no gradient: h stands, and its gradient is finite (meta-training differentiates it)
    h = torch.tensor([0.5], requires_grad=True)
    zero = torch.tensor([0.0])
    out = learned.step_scale(h, zero, zero, zero, torch.tensor([1.0]), 20)
    out.backward()
    assert out.item() == pytest.approx(0.5 * math.exp(0.0)) and torch.isfinite(h.grad).all()
    assert not learned.adapts_step(9) and learned.adapts_step(10)


@pytest.mark.parametrize("objective", ["bowl", "slope"])
def test_step_scale_shrinks_where_steps_overshoot(objective):
    """A bowl whose gradient carries a small error (as the roundoff of a fit at 1e-13 does): once
    the fit is at the floor that error allows, the gradient is far below the one Adam remembers and
    each new gradient tends to oppose the last step; the factor shrinks the step and the fit goes
    10x deeper. On a slope every gradient agrees with the last step: the factor stays 1 and the
    steps are Adam's. The functional core takes the same steps (two tensors: the sums run over both)."""
    def loss_of(ws, noise):
        if objective == "slope":
            return sum(w.sum() for w in ws)
        return sum(0.5 * w.square().sum() + (w * n).sum() for w, n in zip(ws, noise))

    def noises(steps):
        g = torch.Generator().manual_seed(0)
        return [[1e-6 * torch.randn(10, generator=g) for _ in range(2)] for _ in range(steps)]

    def fit(hypergradient_from):
        ws = [nn.Parameter(torch.linspace(-1.0, 1.0, 20)[i::2].clone()) for i in range(2)]
        rule = LearnedOptimizer(LearnedOptimizerConfig(hypergradient_from=hypergradient_from))
        opt = MetaNetOptimizer(ws, lr=0.1, learned=rule, step_size="fixed")
        for noise in noises(600):
            opt.zero_grad()
            loss_of(ws, noise).backward()
            opt.step()
        return opt, rule, torch.cat([w.detach() for w in ws])

    (adapted, rule, w), (_, _, plain) = fit(50), fit(None)
    if objective == "bowl":
        assert adapted.step_scale() < 0.5
        assert w.square().sum() < 0.1 * plain.square().sum()
    else:
        assert adapted.step_scale() == 1.0 and torch.equal(w, plain)
    params = [torch.linspace(-1.0, 1.0, 20)[i::2][None] for i in range(2)]
    state = rule.init(params)
    for step, noise in enumerate(noises(600), 1):
        grads = torch.func.grad(loss_of)(params, [n[None] for n in noise])
        params, state = rule.update(None, params, grads, state, step, lr=0.1)
    torch.testing.assert_close(torch.cat([p[0] for p in params]), w, atol=1e-7, rtol=1e-3)
    assert state["step_scale"][0].item() == pytest.approx(adapted.step_scale(), rel=1e-3)


def twin_nets():
    """Two identical small MLPs (one for the rule, one for its torch.optim reference) and their data."""
    torch.manual_seed(0)
    nets = [mlp(3, 5, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = data(n=8)
    return nets, x[:, :3], y


def test_late_phase_lr_decay_is_a_schedule_on_the_group_lr():
    # untrained, the rule is Adam; with lr_decay_from = 3 it is Adam under the schedule
    # lr * sqrt(3 / t) from step 4 on, applied to the group's (scheduler-driven) lr
    nets, x, y = twin_nets()
    ours = MetaNetOptimizer(nets[0].parameters(), lr=1e-2, weight_decay=0.1,
                            learned=LearnedOptimizer(LearnedOptimizerConfig(lr_decay_from=3)))
    adam = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.1)
    halve = torch.optim.lr_scheduler.StepLR(ours, step_size=4, gamma=0.5)
    for t in range(1, 10):
        adam.param_groups[0]["lr"] = 1e-2 * 0.5 ** ((t - 1) // 4) * (1.0 if t <= 3 else (3 / t) ** 0.5)
        for net, opt in zip(nets, (ours, adam)):
            train(net, opt, 1, x, y)
        halve.step()
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weighted,start", [(False, 1e-6), (True, 1e-6), (True, 1e-3)])
def test_prodigy_step_size_is_adam_at_lr_times_the_distance_estimate(weighted, start):
    # untrained, with step_size "prodigy" the rule is AdamW at lr * d_t (times the late phase's
    # decay), d_t from Prodigy's recurrence, here recomputed in float64 beside torch's AdamW (which
    # stays float32 like the optimizer: d reads differences of float32 weights and amplifies their
    # rounding). With distance_weighted_momentum the first moment averages d_j * g_j instead
    # (Prodigy's momentum): AdamW's exp_avg, which then holds that average over d_k, is rescaled
    # by d_{k-1} / d_k before each step. The estimate starts at config.distance_init (Prodigy's 1e-6)
    nets, x, y = twin_nets()
    config = LearnedOptimizerConfig(step_size="prodigy", lr_decay_from=3, distance_weighted_momentum=weighted,
                                    distance_init=start)
    ours = MetaNetOptimizer(nets[0].parameters(), lr=0.5, weight_decay=0.1, learned=LearnedOptimizer(config))
    plain = copy.deepcopy(nets[0])
    plain_opt = MetaNetOptimizer(plain.parameters(), lr=0.5, weight_decay=0.1,
                                 learned=LearnedOptimizer(dataclasses.replace(config, distance_weighted_momentum=False)))
    adam = torch.optim.AdamW(nets[1].parameters(), lr=0.0, weight_decay=0.1)
    initial = [p.detach().double().clone() for p in nets[1].parameters()]
    sums = [torch.zeros_like(p) for p in initial]
    d, numerator, beta3, distances = start, 0.0, 0.999 ** 0.5, []
    for t in range(1, 40):
        adam.zero_grad()
        loss_fn(nets[1], x, y).backward()
        factor = 1.0 if t <= 3 else (3 / t) ** 0.5
        weight = d * d * factor / 1e-6
        grads = [p.grad.double() for p in nets[1].parameters()]
        numerator = beta3 * numerator + weight * sum(float((g * (p0 - p.detach().double())).sum())
                                                     for g, p0, p in zip(grads, initial, nets[1].parameters()))
        sums = [beta3 * s + weight * g for s, g in zip(sums, grads)]
        previous, d = d, max(d, numerator / float(sum(s.abs().sum() for s in sums)))
        if weighted:
            for st in adam.state.values():
                st["exp_avg"].mul_(previous / d)
        adam.param_groups[0]["lr"] = 0.5 * factor * d
        adam.step()
        train(nets[0], ours, 1, x, y)
        train(plain, plain_opt, 1, x, y)
        distances.append(ours.distance())
    assert distances == sorted(distances) and distances[-1] > 10 * distances[0]  # it only grows
    assert distances[0] >= start
    assert ours.distance() == pytest.approx(d, rel=1e-4)
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the weighted momentum is not Adam's plain one: the two rules part while the estimate grows
    parted = max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), plain.parameters()))
    assert parted > 1e-4 if weighted else parted == 0.0
    assert MetaNetOptimizer(nets[0].parameters(), learned=LearnedOptimizer()).distance() is None  # fixed lr


def test_distance_is_updated_every_step_then_at_refreshes_for_the_steps_between():
    learned = LearnedOptimizer(LearnedOptimizerConfig(step_size="prodigy", refresh_every=4, distance_warmup=6))
    beta3 = 0.999 ** 0.5
    gaps = {}
    for step in range(1, 18):
        weights = learned.distance_weights(step)
        if weights is not None:
            gaps[step] = round(math.log(weights[1]) / math.log(beta3))
            assert weights[0] == pytest.approx(gaps[step])  # the weight of that many steps (no lr decay here)
    # every step to 6; then the refresh steps 9, 13, 17, each for the steps since the last update
    assert gaps == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 9: 3, 13: 4, 17: 4}


def test_distance_growth_bounds_the_estimate_per_step():
    # distance_growth g: d_{k+1} <= g * d_k at every update (g ** gap at the refresh updates after the
    # warm-up), and the bounded estimate is the unbounded one wherever that grows more slowly
    nets, x, y = twin_nets()
    config = LearnedOptimizerConfig(step_size="prodigy", lr=1.0, refresh_every=3, distance_warmup=6, distance_init=1e-4)
    bounded = MetaNetOptimizer(nets[0].parameters(), learned=LearnedOptimizer(dataclasses.replace(config,
                                                                                                distance_growth=1.5)))
    free = MetaNetOptimizer(nets[1].parameters(), learned=LearnedOptimizer(config))
    history = {"bounded": [1e-4], "free": [1e-4]}
    for step in range(1, 30):
        for name, net, opt in (("bounded", nets[0], bounded), ("free", nets[1], free)):
            train(net, opt, 1, x, y)
            history[name].append(opt.distance())
        gap = 1 if step <= 6 else (3 if bounded.learned.refreshes(step) else 0)
        assert history["bounded"][-1] <= history["bounded"][-2] * 1.5 ** gap * (1 + 1e-12)
    free_ratios = [b / a for a, b in zip(history["free"], history["free"][1:])]
    assert max(free_ratios) > 1.5  # unbounded, it jumps
    bounded_ratios = [b / a for a, b in zip(history["bounded"], history["bounded"][1:])]
    assert any(r == pytest.approx(1.5) for r in bounded_ratios[:6])  # it met the bound in the warm-up
    assert history["bounded"][-1] > 10 * history["bounded"][0]  # and still grew


def test_refreshes_slow_down_after_the_warm_up_and_the_estimate_follows():
    learned = LearnedOptimizer(LearnedOptimizerConfig(step_size="prodigy", refresh_every=4, distance_warmup=6,
                                                      late_refresh_every=10))
    # every 4th step to 6, then every 10th from the warm-up's last refresh (5)
    assert [s for s in range(1, 40) if learned.refreshes(s)] == [1, 5, 15, 25, 35]
    beta3 = 0.999 ** 0.5
    gaps = {s: round(math.log(w[1]) / math.log(beta3)) for s in range(1, 40)
            if (w := learned.distance_weights(s)) is not None}
    assert gaps == {**{s: 1 for s in range(1, 7)}, 15: 9, 25: 10, 35: 10}  # 15 stands for the steps 7 to 15
    # asking the optimizer for a refresh period means that period throughout
    opt = MetaNetOptimizer([torch.zeros(3, requires_grad=True)], learned=learned, refresh_every=2)
    assert opt.learned.config.late_refresh_every is None
    assert [s for s in range(1, 12) if opt.learned.refreshes(s)] == [1, 3, 5, 7, 9, 11]


def test_late_phase_second_moment_is_amsgrads():
    # untrained, the rule is Adam; from amsgrad_from on it is torch's AMSGrad (switched on mid-run),
    # which differs from Adam once the gradients shrink and Adam's second moment decays
    torch.manual_seed(0)
    nets = [mlp(3, 5, 2) for _ in range(3)]
    for n in nets[1:]:
        n.load_state_dict(nets[0].state_dict())
    ours = MetaNetOptimizer(nets[0].parameters(), lr=1e-2, learned=LearnedOptimizer(LearnedOptimizerConfig(
        amsgrad_from=6)))
    amsgrad_from_6, adam = (torch.optim.Adam(n.parameters(), lr=1e-2) for n in nets[1:])
    grads = [torch.randn_like(p) for p in nets[0].parameters()]
    for step in range(1, 16):
        if step == 6:
            amsgrad_from_6.param_groups[0]["amsgrad"] = True
            for st in amsgrad_from_6.state.values():
                st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])
        for net, opt in zip(nets, (ours, amsgrad_from_6, adam)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g * 0.5 ** step
            opt.step()
        if step == 5:
            assert "max_exp_avg_sq" not in ours.state[nets[0][0].weight]
    for a, b, c in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (a - c).abs().max() > 1e-5


def test_saved_coefficients_of_the_wrong_size_are_rejected():
    a = mlp(3, 5, 2)
    learned = random_learned(refresh_every=2)
    opt_a = MetaNetOptimizer(a.parameters(), learned=learned)
    train(a, opt_a, 1, torch.randn(4, 3), torch.randn(4, 1))
    state = opt_a.state_dict()
    state["state"][0]["neuron_outputs"] = state["state"][0]["neuron_outputs"][:, :-1]
    opt_a2 = MetaNetOptimizer(a.parameters(), learned=learned)
    with pytest.raises(CheckpointError, match="neuron_outputs has shape"):
        opt_a2.load_state_dict(state)
    assert not opt_a2.state  # nothing half-loaded


def test_coefficients_saved_by_earlier_versions_are_dropped_on_load():
    # "neuron_coefficients" had the refresh step's 1 / rms of g and p baked into the additive terms:
    # reused, they are wrong; a state dict carrying them loads without them, and the next step refreshes
    torch.manual_seed(0)
    a = mlp(3, 5, 2)
    learned = random_learned(refresh_every=3)
    opt = MetaNetOptimizer(a.parameters(), learned=learned)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    train(a, opt, 1, x, y)
    state = opt.state_dict()
    state["state"][0]["neuron_coefficients"] = state["state"][0].pop("neuron_outputs")
    resumed = MetaNetOptimizer(a.parameters(), learned=learned)
    resumed.load_state_dict(state)
    assert not any(k in st for st in resumed.state.values() for k in ("neuron_coefficients", "neuron_outputs"))
    assert not resumed.learned.refreshes(2)
    with mock.patch.object(resumed.learned, "neuron_coefficients", wraps=resumed.learned.neuron_coefficients) as run:
        train(a, resumed, 1, x, y)  # step 2 would reuse; with nothing to reuse it runs the metanetwork
    assert run.call_count == 1 and "neuron_outputs" in resumed.state[a[0].weight]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [{}, SHIPPED_LIKE])
def test_cuda_matches_cpu(config):
    torch.manual_seed(0)
    net = mlp(4, 7, 3, 2)
    gpu = copy.deepcopy(net).cuda()
    x, y = data()
    learned = random_learned(**config)
    lr = 1.0 if config else 1e-2
    train(net, MetaNetOptimizer(net.parameters(), lr=lr, learned=learned), 6, x, y)
    train(gpu, MetaNetOptimizer(gpu.parameters(), lr=lr, learned=copy.deepcopy(learned)), 6, x.cuda(), y.cuda())
    for a, b in zip(net.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, LATE, SHIPPED_LIKE])
def test_compiled_step_matches_eager(config):
    # compile=True fuses the moment update and the metanetwork; same trajectory, fewer kernels
    torch.manual_seed(0)
    nets = [mlp(4, 7, 3, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = data()
    learned = random_learned(**config)
    lr = None if config.get("step_size") == "prodigy" else 1e-2  # the file's multiplier, 1.0
    eager = MetaNetOptimizer(nets[0].parameters(), lr=lr, learned=copy.deepcopy(learned))
    compiled = MetaNetOptimizer(nets[1].parameters(), lr=lr, learned=copy.deepcopy(learned), compile=True)
    steps = 12 if lr is None else 4  # past the distance warm-up and a late refresh
    train(nets[0], eager, steps, x, y)
    train(nets[1], compiled, steps, x, y)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert compiled.state_dict()["state"][0]["step"] == steps


@pytest.mark.parametrize("follow", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_moments_match_the_generic_path_with_tensors_left_out(amsgrad, follow):
    # eager steps get Adam's direction from torch's fused kernel and apply the per-neuron
    # coefficients in place, through multipliers cached between refreshes; tensors without a
    # gradient this step (live leaves them out) keep their moments and still get a direction.
    # Checked on a refresh and on a later step that reuses its coefficients, with the fade on, and
    # with the parameter term following the gradient (the fused path takes its norms from the step's
    # finiteness check).
    from metaopt.optim.optimizer import _moments_and_direction
    torch.manual_seed(0)
    learned = random_learned(mix_decay_from=2, param_term_follows_gradient=follow)
    params = [p.detach().clone() for p in mlp(4, 7, 3, 2).parameters()]
    opt = MetaNetOptimizer([nn.Parameter(p.clone()) for p in params], learned=learned)
    state = [[torch.randn_like(p) for p in params], [torch.rand_like(p) for p in params],
             [torch.rand_like(p) for p in params] if amsgrad else None]
    copies = [[[t.clone() for t in ts] if ts is not None else None for ts in state] for _ in range(2)]
    live = (0, 1, 3)
    structure = learned.structure_for([p.shape for p in params])
    coefficients = None
    for step in (7, 8):
        grads = [torch.randn_like(p) for p in params]
        generic, generic_coefficients = _moments_and_direction(learned, params, grads, *copies[0][:2], live, step,
                                                               structure, coefficients, copies[0][2])
        states = [{"exp_avg": m, "exp_avg_sq": v} for m, v in zip(*copies[1][:2])]
        fused, fused_coefficients = opt._fused_deltas(params, grads, states, list(live), step, structure,
                                                      coefficients, copies[1][2], torch.stack(torch._foreach_norm(grads)))
        torch.testing.assert_close(fused_coefficients, generic_coefficients, atol=1e-6, rtol=1e-5)
        for a, b in zip(generic, fused):
            torch.testing.assert_close(a[0], b, atol=1e-5, rtol=1e-5)
        for ts_a, ts_b in zip(*copies):
            for a, b in zip(ts_a or [], ts_b or []):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert torch.equal(copies[1][0][2], state[0][2])  # left out: untouched
        coefficients = generic_coefficients


def test_gradients_in_another_memory_layout_than_the_parameter():
    # torch's fused Adam kernel reads memory flat: a contiguous gradient on a channels_last weight
    # (or the reverse) must not scramble the moments
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    last = nn.Parameter(conv.weight.detach().clone().contiguous(memory_format=torch.channels_last))
    plain = nn.Parameter(conv.weight.detach().clone())
    opts = [MetaNetOptimizer([p], learned=random_learned()) for p in (plain, last)]
    for _ in range(3):
        g = torch.randn(plain.shape)
        plain.grad, last.grad = g.clone(), g.clone()  # contiguous gradient on the channels_last weight
        for opt in opts:
            opt.step()
        torch.testing.assert_close(opts[1].state[last]["exp_avg"], opts[0].state[plain]["exp_avg"])
    torch.testing.assert_close(last, plain)
    assert last.is_contiguous(memory_format=torch.channels_last)
