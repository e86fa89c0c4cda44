"""LearnedOptimizerProblem against stand-ins for metaopt.LearnedOptimizer and a tasks/ population."""

import math

import pytest
import torch
from torch import nn

from meta_train.estimators import PES, TruncatedBackprop, reduce_losses
from meta_train.problem import LearnedOptimizerProblem, MetaProblem, RandomRescale, take, tile

DT = torch.float64


class ScalarLogLRSGD:
    """Stand-in learned optimizer: SGD with a learned log learning rate, in the functional shape."""

    def __init__(self, log_lr=-2.0):
        self.metanet = nn.Module()
        self.metanet.log_lr = nn.Parameter(torch.tensor(log_lr, dtype=DT))

    def init(self, params):
        return {"count": torch.zeros(params[0].shape[0], dtype=DT)}

    def update(self, meta_params, params, grads, state, step):
        lr = torch.exp(meta_params["log_lr"])
        return [p - lr * g for p, g in zip(params, grads)], {"count": state["count"] + 1}


class LeastSquaresPopulation:
    """Stand-in population: per-member least squares with its own data-generating weights."""

    def __init__(self, seed, size, dim=3, batch=8):
        g = torch.Generator().manual_seed(seed)
        self.size, self.dim, self.batch = size, dim, batch
        self.w_true = torch.randn(size, dim, generator=g, dtype=DT)
        self.batches_drawn = 0

    def init_params(self, seeds):
        return {"w": torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(s), dtype=DT)
                                  for s in seeds]), "b": torch.zeros(self.size, dtype=DT)}

    def sample_batch(self, generator):
        self.batches_drawn += 1
        x = torch.randn(self.size, self.batch, self.dim, generator=generator, dtype=DT)
        return x, torch.einsum("pbd,pd->pb", x, self.w_true)

    def loss(self, params, batch):
        x, y = batch
        return ((torch.einsum("pbd,pd->pb", x, params["w"]) + params["b"][:, None] - y) ** 2).mean(1)

    def evaluate(self, params):
        return {"loss": ((params["w"] - self.w_true) ** 2).sum(1) + params["b"] ** 2}


class LeastSquares:
    name = "lsq"

    def population(self, seed, size):
        return LeastSquaresPopulation(seed, size)


def _problem(**kw):
    return LearnedOptimizerProblem(ScalarLogLRSGD(), LeastSquares(), **kw)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_is_a_meta_problem():
    assert isinstance(_problem(), MetaProblem)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_per_particle_meta_params_act_per_particle(mode):
    prob = _problem(per_particle=mode)
    inner = tile(prob.init_inner(3, _gen(0)), 2)
    lrs = torch.tensor([-3.0, -2.0, -1.0, -2.5, -1.5, -0.5], dtype=DT)
    losses, new = prob.unroll({"log_lr": lrs}, inner, 4, _gen(1), batched=True)
    assert losses.shape == (6, 4) and new["step"] == 4
    assert torch.equal(new["opt_state"][0], torch.full((6,), 4.0, dtype=DT))
    # each particle behaves exactly like a shared-meta-params run at its own value
    for i in [0, 4]:
        alone, _ = prob.unroll({"log_lr": lrs[i]}, inner, 4, _gen(1), batched=False)
        torch.testing.assert_close(losses[i], alone[i], rtol=1e-12, atol=1e-12)


def test_copies_of_a_task_share_data_and_batches():
    prob = _problem()
    inner = tile(prob.init_inner(3, _gen(0)), 2)
    pop = prob.population(inner["family"], inner["task_seed"], 3)
    before = pop.batches_drawn
    losses, new = prob.unroll({"log_lr": torch.full((6,), -2.0, dtype=DT)}, inner, 5, _gen(1), batched=True)
    assert pop.batches_drawn - before == 5  # one batch per step, reused by both copies
    assert torch.equal(losses[:3], losses[3:])
    assert torch.equal(take(new, slice(0, 3))["params"]["w"], take(new, slice(3, 6))["params"]["w"])


def test_first_and_second_order_truncated_backprop():
    def grad_and_fd(second_order):
        prob = _problem(second_order=second_order)
        est = TruncatedBackprop(meta_loss="mean")
        theta = prob.init_meta_params()
        parts = est.start(prob, theta, 4, _gen(0))
        e, _ = est.estimate(prob, theta, parts, 5, _gen(1))

        def f(x):
            losses, _ = prob.unroll({"log_lr": x}, parts.inner, 5, _gen(1), batched=False)
            return float(reduce_losses(losses, "mean").mean())

        h = 1e-6
        t = theta["log_lr"]
        return float(e.grad["log_lr"]), (f(t + h) - f(t - h)) / (2 * h)

    g2, fd = grad_and_fd(True)
    assert g2 == pytest.approx(fd, rel=1e-6)
    g1, fd = grad_and_fd(False)  # first order drops d(grad)/d(params): a different, cheaper number
    assert abs(g1 - fd) > 1e-3 * abs(fd)


def test_pes_runs_on_the_problem_with_vmap_and_loop_alike():
    out = []
    for mode in ("vmap", "loop"):
        prob = _problem(per_particle=mode)
        theta = prob.init_meta_params()
        est = PES(sigma=0.05)
        g = _gen(3)
        parts = est.start(prob, theta, 4, g)
        for _ in range(3):
            e, parts = est.estimate(prob, theta, parts, 4, g)
        out.append(e.grad["log_lr"])
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out[0])


def test_validation_meta_loss_reads_population_evaluate():
    prob = _problem(meta_loss="val")
    inner = prob.init_inner(2, _gen(0))
    losses, new = prob.unroll({"log_lr": torch.tensor(-2.0, dtype=DT)}, inner, 3, _gen(1), batched=False)
    pop = prob.population(inner["family"], inner["task_seed"], 2)
    torch.testing.assert_close(losses[:, -1], pop.evaluate(new["params"])["loss"])


def test_rescale_augmentation_reparametrizes_without_changing_the_task():
    plain, aug = _problem(), _problem(augment=RandomRescale(10.0))
    a, b = plain.init_inner(4, _gen(5)), aug.init_inner(4, _gen(5))
    s = b["scales"]["w"]
    assert s.shape == (4, 1) and ((s >= 0.1) & (s <= 10)).all() and s.std() > 0
    torch.testing.assert_close(b["params"]["w"] * s, a["params"]["w"])
    theta = {"log_lr": torch.tensor(-2.0, dtype=DT)}
    la, _ = plain.unroll(theta, a, 1, _gen(6), batched=False)
    lb, _ = aug.unroll(theta, b, 1, _gen(6), batched=False)
    torch.testing.assert_close(la, lb)  # same function, same first loss; later steps differ by design


def test_optimizer_state_without_population_dim_is_rejected():
    class Shared(ScalarLogLRSGD):
        def init(self, params):
            return {"count": torch.zeros(())}

    prob = LearnedOptimizerProblem(Shared(), LeastSquares())
    with pytest.raises(ValueError, match="population dim"):
        prob.init_inner(3, _gen(0))


def test_baseline_unroll_trains_with_a_torch_optimizer():
    prob = _problem()
    inner = prob.init_inner(3, _gen(0))
    losses = prob.baseline_unroll(lambda ps: torch.optim.Adam(ps, lr=0.1), inner, 60, _gen(1))
    assert losses.shape == (3, 60)
    assert (losses[:, -5:].mean(1) < 0.1 * losses[:, 0]).all()
    assert not inner["params"]["w"].requires_grad  # the inner state was not modified


def test_family_weights_are_validated_and_used():
    with pytest.raises(ValueError, match="weights"):
        LearnedOptimizerProblem(ScalarLogLRSGD(), [LeastSquares(), LeastSquares()], weights=[1.0])
    prob = LearnedOptimizerProblem(ScalarLogLRSGD(), [LeastSquares(), LeastSquares()], weights=[0.0, 1.0])
    assert {prob.init_inner(1, _gen(i))["family"] for i in range(10)} == {1}
    assert math.isclose(float(prob.weights.sum()), 1.0)
