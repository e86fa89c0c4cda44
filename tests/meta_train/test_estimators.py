"""Statistical checks of the meta-gradient estimators against exact gradients.

Tolerances are 5 standard errors per coordinate (a false alarm is a ~1e-6 event per coordinate), with
the standard error derived analytically where we can (ES on a quadratic) and estimated from
independent replicates otherwise (PES). Each test also checks that the tolerance is tight enough to
catch the error it guards against.
"""

import math

import pytest
import torch

from meta_train.estimators import ES, PES, TruncatedBackprop, reduce_losses

DT = torch.float64


class Quadratic:
    """L(theta) = 1/2 (theta - c)^T diag(a) (theta - c), the same for every particle; one 'step'."""

    def __init__(self, a, c):
        self.a, self.c = torch.as_tensor(a, dtype=DT), torch.as_tensor(c, dtype=DT)

    def init_meta_params(self):
        return {"theta": torch.zeros_like(self.c)}

    def init_inner(self, num_tasks, generator):
        return {"n": torch.zeros(num_tasks, dtype=DT)}

    def unroll(self, meta_params, inner, num_steps, generator, *, batched):
        p = inner["n"].shape[0]
        th = meta_params["theta"] if batched else meta_params["theta"].expand(p, -1)
        loss = 0.5 * ((th - self.c) ** 2 * self.a).sum(dim=1)
        return loss[:, None].expand(p, num_steps), inner

    def grad(self, theta):
        return self.a * (theta - self.c)


def _quad():
    return Quadratic([0.5, 1.0, 2.0, 3.0, 4.0], [1.0, -2.0, 0.5, 1.5, -1.0]), torch.tensor(
        [0.3, 0.1, -0.2, 0.4, 0.0], dtype=DT)


def _es_estimate(est, prob, theta, m, seed):
    g = torch.Generator().manual_seed(seed)
    parts = est.start(prob, {"theta": theta}, m, g)
    e, _ = est.estimate(prob, {"theta": theta}, parts, 1, g)
    return e


def test_antithetic_es_is_unbiased_on_a_quadratic():
    # With eps = sigma z, L(theta+eps) - L(theta-eps) = 2 sigma z.g exactly, so one pair's estimate is
    # z (z.g): mean g, and Var_k = E[z_k^2 (z.g)^2] - g_k^2 = |g|^2 + g_k^2 (Gaussian fourth moments).
    prob, theta = _quad()
    g = prob.grad(theta)
    m = 40_000
    e = _es_estimate(ES(sigma=0.01, antithetic=True), prob, theta, m, seed=0)
    se = torch.sqrt((g.square().sum() + g**2) / m)
    err = (e.grad["theta"] - g).abs()
    assert (err < 5 * se).all(), (err / se)
    # the test has power: a 10% scale error would be caught
    assert ((1.1 * e.grad["theta"] - g).abs() > 5 * se).any()
    # the reported per-sample variance (trace) matches the derivation: (d+1)|g|^2
    trace = (e.sq_norm_sum - m * float(e.grad["theta"].square().sum())) / (m - 1)
    expected = (g.numel() + 1) * float(g.square().sum())
    assert abs(trace / expected - 1) < 0.1


def test_forward_difference_es_is_unbiased_even_with_large_sigma():
    # Forward differences: (L(theta+eps) - L(theta)) eps / sigma^2 = z (z.g) + (sigma/2) z (z^T A z).
    # The second term has mean 0 (odd in z), so the estimate is unbiased at any sigma; its variance adds
    # (sigma^2/4) E[z_k^2 (z^T A z)^2] = (sigma^2/4) sum_ij a_i a_j E[z_k^2 z_i^2 z_j^2].
    prob, theta = _quad()
    g, a = prob.grad(theta), prob.a
    sigma, m = 0.3, 40_000
    e = _es_estimate(ES(sigma=sigma, antithetic=False), prob, theta, m, seed=1)
    d = g.numel()

    def moment(k, i, j):
        if i == j == k:
            return 15.0
        if i == j or i == k or j == k:
            return 3.0
        return 1.0

    var = torch.tensor([float(g.square().sum() + g[k] ** 2) + sigma**2 / 4 * sum(
        float(a[i] * a[j]) * moment(k, i, j) for i in range(d) for j in range(d)) for k in range(d)], dtype=DT)
    se = torch.sqrt(var / m)
    err = (e.grad["theta"] - g).abs()
    assert (err < 5 * se).all(), (err / se)
    assert ((1.1 * e.grad["theta"] - g).abs() > 5 * se).any()


def test_sign_transform_has_its_known_expectation():
    # sign(L+ - L-) = sign(z.g), so a pair gives z sign(z.g) / (2 sigma), whose mean is
    # sqrt(2/pi) g / (|g| 2 sigma) and whose variance is (1 - (2/pi) g_k^2/|g|^2) / (2 sigma)^2.
    prob, theta = _quad()
    g = prob.grad(theta)
    sigma, m = 0.01, 40_000
    e = _es_estimate(ES(sigma=sigma, loss_transform="sign"), prob, theta, m, seed=2)
    u = g / g.norm()
    mean = math.sqrt(2 / math.pi) * u / (2 * sigma)
    se = torch.sqrt((1 - 2 / math.pi * u**2) / m) / (2 * sigma)
    assert ((e.grad["theta"] - mean).abs() < 5 * se).all()


class LinearSystem:
    """Inner dynamics x_{t+1} = 0.8 x_t + theta, loss_t = |x_{t+1} - target|^2 (per particle).

    theta keeps acting on every later step, so truncated estimators that ignore how earlier truncations
    shaped the state are biased, while the full-horizon loss is quadratic in theta (no smoothing bias).
    """

    def __init__(self, dim=3):
        self.target = torch.linspace(-1.0, 1.0, dim, dtype=DT)
        self.dim = dim

    def init_meta_params(self):
        return {"theta": torch.full((self.dim,), 0.1, dtype=DT)}

    def init_inner(self, num_tasks, generator):
        return {"x": torch.ones(num_tasks, self.dim, dtype=DT), "step": 0}

    def unroll(self, meta_params, inner, num_steps, generator, *, batched):
        x = inner["x"]
        th = meta_params["theta"] if batched else meta_params["theta"].expand_as(x)
        losses = []
        for _ in range(num_steps):
            x = 0.8 * x + th
            losses.append(((x - self.target) ** 2).sum(dim=1))
        return torch.stack(losses, dim=1), {"x": x, "step": inner["step"] + num_steps}


def _run_sum(est, prob, theta, m, horizon, k, seed):
    """Sum of an estimator's estimates over all truncations of one inner run."""
    g = torch.Generator().manual_seed(seed)
    parts = est.start(prob, theta, m, g)
    total = torch.zeros_like(theta["theta"])
    for _ in range(horizon // k):
        e, parts = est.estimate(prob, theta, parts, k, g)
        total += e.grad["theta"]
    return total


def test_pes_matches_full_horizon_backprop():
    prob = LinearSystem()
    theta = prob.init_meta_params()
    horizon, k = 12, 3
    # Exact: the gradient of sum over truncations of their mean loss = (1/k) sum_t L_t, by backprop
    # through all 12 steps.
    th = theta["theta"].clone().requires_grad_(True)
    losses, _ = prob.unroll({"theta": th}, prob.init_inner(1, None), horizon, None, batched=False)
    (exact,) = torch.autograd.grad(losses.sum() / k, th)

    reps, m = 30, 400
    runs = torch.stack([_run_sum(PES(sigma=0.01), prob, theta, m, horizon, k, seed=s) for s in range(reps)])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(reps)
    assert ((mean - exact).abs() < 5 * se).all(), ((mean - exact) / se)

    # Truncated backprop (exact per truncation, no noise) is visibly biased on the same problem,
    # far outside PES's tolerance: the test distinguishes persistent from truncated estimators.
    tbptt = _run_sum(TruncatedBackprop(), prob, theta, 1, horizon, k, seed=0)
    assert ((tbptt - exact).abs() > 10 * se).all()
    # ES is unbiased for the truncated objective only: it agrees with truncated backprop instead.
    es = torch.stack([_run_sum(ES(sigma=0.01), prob, theta, m, horizon, k, seed=s) for s in range(10)])
    assert ((es.mean(0) - tbptt).abs() < 5 * es.std(0) / math.sqrt(10)).all()


def test_pes_accumulates_perturbations_and_restarts():
    prob = LinearSystem()
    theta = prob.init_meta_params()
    est = PES(sigma=0.1)
    g = torch.Generator().manual_seed(0)
    parts = est.start(prob, theta, 4, g)
    assert parts.extra["xi/theta"].abs().sum() == 0
    _, parts = est.estimate(prob, theta, parts, 2, g)
    xi1 = parts.extra["xi/theta"].clone()
    _, parts = est.estimate(prob, theta, parts, 2, g)
    assert parts.extra["xi/theta"].shape == (4, 3)
    assert not torch.equal(parts.extra["xi/theta"], xi1)
    # the + and - copies keep separate persistent states
    assert not torch.equal(parts.inner["x"][:4], parts.inner["x"][4:])


def test_es_copies_restart_each_truncation_from_one_state():
    prob = LinearSystem()
    theta = prob.init_meta_params()
    g = torch.Generator().manual_seed(0)
    est = ES(sigma=0.1)
    parts = est.start(prob, theta, 4, g)
    _, parts = est.estimate(prob, theta, parts, 2, g)
    assert torch.equal(parts.inner["x"][:4], parts.inner["x"][4:])


def test_truncated_backprop_matches_finite_differences():
    prob = LinearSystem()
    theta = prob.init_meta_params()
    g = torch.Generator().manual_seed(0)
    est = TruncatedBackprop(meta_loss="final")
    parts = est.start(prob, theta, 2, g)
    e, new = est.estimate(prob, theta, parts, 4, g)
    assert new.inner["step"] == 4 and not new.inner["x"].requires_grad

    def f(th):
        losses, _ = prob.unroll({"theta": th}, parts.inner, 4, None, batched=False)
        return float(reduce_losses(losses, "final").mean())

    h = 1e-6
    fd = torch.tensor([(f(theta["theta"] + h * ei) - f(theta["theta"] - h * ei)) / (2 * h)
                       for ei in torch.eye(3, dtype=DT)], dtype=DT)
    torch.testing.assert_close(e.grad["theta"], fd, rtol=1e-6, atol=1e-8)


def test_estimators_reject_bad_settings():
    with pytest.raises(ValueError, match="sigma"):
        ES(sigma=0.0)
    with pytest.raises(ValueError, match="loss_transform"):
        PES(loss_transform="rank")
    with pytest.raises(ValueError, match="reduction"):
        TruncatedBackprop(meta_loss="median")
