"""The functional / modular / population interface, checked on a small task of every family."""

import pytest
import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

import tasks
from tasks import Population, member

FAMILIES = {
    "mlp-digits": lambda: tasks.ClassifierFamily("digits", archs=("mlp",), widths=(16,), depths=(2,),
                                                 activations=("gelu",), batch_size=16, train_size=128, test_size=64),
    "cnn-digits": lambda: tasks.ClassifierFamily("digits", archs=("cnn",), widths=(4,), depths=(2,),
                                                 activations=("relu",), batch_size=8, train_size=128, test_size=64),
    "inr-digits": lambda: tasks.INRFamily("digits", widths=(8,), depths=(2,), images=32),
    "inr-sine": lambda: tasks.INRFamily("sine", widths=(8,), depths=(1,), points=32),
    "rl-cartpole": lambda: tasks.RLFamily(("CartPole-v1",), widths=(8,), depths=(1,), episodes=4, horizon=12,
                                          eval_episodes=2),
    "rl-acrobot": lambda: tasks.RLFamily(("Acrobot-v1",), widths=(8,), depths=(1,), episodes=4, horizon=6,
                                         eval_episodes=2, eval_steps=60),
    "rl-pendulum": lambda: tasks.RLFamily(("Pendulum-v1",), widths=(8,), depths=(2,), episodes=4, horizon=8,
                                          eval_episodes=2),
}
SUPERVISED = [k for k in FAMILIES if not k.startswith("rl")]


def take(tree, i):
    return tree_map(lambda t: t[i], tree)


def allclose(a, b, rtol=1e-4, atol=1e-5):
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request):
    return FAMILIES[request.param]()


def test_init_is_seeded_and_named_like_the_module(family):
    task = family.sample(3)
    p = task.init_params(5)
    assert allclose(p, task.init_params(5), 0, 0)
    first = next(iter(p))
    assert not torch.equal(p[first], task.init_params(6)[first])
    module = task.module(p)
    assert isinstance(module, torch.nn.Sequential)
    assert {k: tuple(v.shape) for k, v in module.named_parameters()} == {k: tuple(v.shape) for k, v in p.items()}
    same = family.sample(3)
    assert same.network.name == task.network.name and allclose(same.init_params(5), p, 0, 0)


def test_batches_are_deterministic(family):
    task = family.sample(0)
    b1 = task.sample_batch(torch.Generator().manual_seed(7))
    b2 = task.sample_batch(torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    pop = family.population(0, 3)
    pb = pop.sample_batch(torch.Generator().manual_seed(7))
    assert all(t.shape[0] == 3 for t in pb)
    assert all(torch.equal(x, y) for x, y in zip(pb, pop.sample_batch(torch.Generator().manual_seed(7))))


def test_module_and_functional_paths_agree(family):
    task = family.sample(1)
    p = task.init_params(0)
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    x = batch[0] if not isinstance(task, tasks.RLTask) else task.env.observe(batch.states)
    module = task.module(p)
    out_functional = task.network.forward({k: v[None] for k, v in p.items()}, x[None])[0]
    assert torch.allclose(module(x), out_functional, atol=1e-5)
    assert torch.allclose(task.module_loss(module, batch), task.loss(p, batch), rtol=1e-5, atol=1e-6)


def test_population_matches_its_members(family):
    pop = family.population(11, 3)
    assert len({t.seed for t in pop.tasks}) == 3
    params = pop.init_params([0, 1, 2])
    batch = pop.sample_batch(torch.Generator().manual_seed(0))
    losses = pop.loss(params, batch)
    assert losses.shape == (3,)
    for i, task in enumerate(pop.tasks):
        assert torch.allclose(losses[i], task.loss(member(params, i), take(batch, i)), rtol=1e-4, atol=1e-5)
        assert allclose(member(params, i), task.init_params(i), 0, 0)
    metrics = pop.evaluate(params)
    for i, task in enumerate(pop.tasks):
        single = task.evaluate(member(params, i))
        assert single.keys() == metrics.keys()
        for k, v in single.items():
            assert v == pytest.approx(float(metrics[k][i]), rel=1e-4, abs=1e-4)


def test_per_member_gradients_under_torch_func(family):
    pop = family.population(2, 3)
    if isinstance(pop.tasks[0], tasks.RLTask) and pop.tasks[0].env.env_id == "Acrobot-v1":
        # a short random Acrobot rollout never terminates: equal returns, zero advantages
        pytest.skip("zero REINFORCE gradient by construction")
    params = {k: v.requires_grad_() for k, v in pop.init_params([3, 4, 5]).items()}
    batch = pop.sample_batch(torch.Generator().manual_seed(1))
    pop.loss(params, batch).sum().backward()
    task = pop.tasks[0]  # members share loss code; data comes in through the batch
    per_member = vmap(grad(task.loss))({k: v.detach() for k, v in params.items()}, batch)
    assert allclose(per_member, {k: v.grad for k, v in params.items()}, rtol=1e-3, atol=1e-5)
    assert any(v.grad.abs().sum() > 0 for v in params.values())


@pytest.mark.parametrize("name", SUPERVISED)
def test_differentiable_unroll_matches_finite_differences(name):
    # meta-gradient of the loss after 3 SGD steps w.r.t. the learning rate (float64)
    task = FAMILIES[name]().sample(0)
    p0 = {k: v.double().requires_grad_() for k, v in task.init_params(0).items()}
    batch = tree_map(lambda t: t.double() if t.is_floating_point() else t,
                     task.sample_batch(torch.Generator().manual_seed(0)))

    def unrolled(lr):
        p = p0
        for _ in range(3):
            g = torch.autograd.grad(task.loss(p, batch), list(p.values()), create_graph=True)
            p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
        return task.loss(p, batch)

    base_lr = 1e-4 if name.startswith("inr") else 0.05  # SIRENs (w0 = 30) are steep
    lr = torch.tensor(base_lr, dtype=torch.float64, requires_grad=True)
    (meta_grad,) = torch.autograd.grad(unrolled(lr), lr)
    eps = base_lr * 1e-3
    fd = (unrolled(lr.detach() + eps) - unrolled(lr.detach() - eps)).detach() / (2 * eps)
    assert meta_grad < 0  # a slightly larger step helps at the start of training
    assert meta_grad.item() == pytest.approx(fd.item(), rel=1e-4)


def test_wrong_inputs_give_clear_errors():
    task = FAMILIES["mlp-digits"]().sample(0)
    p = task.init_params(0)
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    bad = dict(p, **{"1.weight": p["1.weight"][:, :3]})
    with pytest.raises(ValueError, match=r"'1.weight' has shape"):
        task.loss(bad, batch)
    with pytest.raises(ValueError, match="do not match"):
        task.loss({k: v for k, v in p.items() if k != "1.bias"}, batch)
    with pytest.raises(ValueError, match="targets"):
        task.loss(p, tasks.Batch(batch.inputs, batch.targets[:3]))
    pop = FAMILIES["mlp-digits"]().population(0, 2)
    with pytest.raises(ValueError, match="one seed per member"):
        pop.init_params([0])
    with pytest.raises(ValueError, match="3 members"):
        pop.loss(Population(FAMILIES["mlp-digits"]().population(0, 3).tasks).init_params([0, 1, 2]),
                 pop.sample_batch(torch.Generator()))
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.make_family("imagenet")
    with pytest.raises(ValueError, match="unknown activation"):
        tasks.ClassifierFamily("digits", activations=("swish2",))
    with pytest.raises(ValueError, match="cannot share a population"):
        Population([FAMILIES["mlp-digits"]().sample(0), FAMILIES["cnn-digits"]().sample(0)])


def test_make_family_builds_each_family():
    assert isinstance(tasks.make_family("inr", dataset="sine", points=16).sample(0), tasks.INRTask)
    assert isinstance(tasks.make_family("classify", dataset="digits").sample(0), tasks.ClassifierTask)
    assert isinstance(tasks.make_family("rl", envs=("Pendulum-v1",)).sample(0), tasks.RLTask)
