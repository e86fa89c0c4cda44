import math
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

import tasks
from tasks import ENVS, RLFamily, RLTask, episode_returns, make_env, policy_action, policy_network


def random_action(env, rng):
    if env.discrete:
        a = int(rng.integers(env.n_actions))
        return a, torch.tensor(a)
    a = rng.uniform(-2.5, 2.5, size=(env.action_dim,)).astype(np.float32)  # beyond the bounds: tests clipping
    return a, torch.tensor(a)


@pytest.mark.parametrize("env_id", sorted(ENVS))
def test_batched_dynamics_match_gymnasium(env_id):
    rng = np.random.default_rng(0)
    reference, env = gym.make(env_id), make_env(env_id)
    steps = 0
    for episode in range(4):
        obs, _ = reference.reset(seed=episode)
        state = torch.tensor(np.asarray(reference.unwrapped.state, dtype=np.float64))
        assert np.allclose(env.observe(state).numpy(), obs, atol=1e-6)
        for t in range(150):
            a, action = random_action(env, rng)
            obs, reward, terminated, truncated, _ = reference.step(a)
            state, r, term = env.step(state, action)
            assert np.allclose(env.observe(state).numpy(), obs, rtol=1e-5, atol=1e-5), (episode, t)
            assert r.item() == pytest.approx(reward, rel=1e-5, abs=1e-5)
            assert bool(term) == terminated
            steps += 1
            if terminated or truncated:
                break
    reference.close()
    assert steps >= 40


@pytest.mark.parametrize("env_id", sorted(ENVS))
def test_batched_states_have_gymnasium_reset_distribution(env_id):
    env = make_env(env_id)
    states = env.initial_state(torch.Generator().manual_seed(0), (2, 500))
    assert states.shape == (2, 500, env.state_dim) and states.dtype == torch.float64
    reference = gym.make(env_id)
    ref = np.stack([np.asarray(reference.unwrapped.state) for _ in range(200) if reference.reset() is not None])
    assert np.allclose(states.flatten(0, 1).abs().amax(0).numpy(), np.abs(ref).max(0), rtol=0.1)
    assert env.observe(states).shape == (2, 500, env.obs_dim)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_returns_match_gymnasium_evaluation(env_id):
    env = make_env(env_id)
    task = RLTask(policy_network(env, [8], "tanh"), env, seed=0)
    params = task.init_params(3)
    gym_result = tasks.evaluate_with_gymnasium(task.module(params), env_id, episodes=3, seed=10)
    reference = gym.make(env_id)
    states = []
    for k in range(3):
        reference.reset(seed=10 + k)
        states.append(torch.tensor(np.asarray(reference.unwrapped.state, dtype=np.float64)))
    stacked = {k: v[None] for k, v in params.items()}
    ours = episode_returns(partial(task.network.forward, stacked), env, torch.stack(states)[None])
    assert ours.mean().item() == pytest.approx(gym_result["return"], rel=1e-4)
    assert ours.std(unbiased=False).item() == pytest.approx(gym_result["return_std"], rel=1e-3, abs=1e-3)


def test_discrete_sampling_follows_the_softmax():
    env = make_env("Acrobot-v1")
    logits = torch.tensor([0.5, -1.0, 1.5]).expand(20000, 3)
    noise = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    action, logp = policy_action(env, logits, noise)
    freq = torch.bincount(action, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.015)
    assert torch.allclose(logp, torch.log_softmax(logits[0], 0)[action])
    assert policy_action(env, logits[:1])[0].item() == 2


def test_gaussian_policy_log_prob():
    env = make_env("Pendulum-v1")
    mean = torch.tensor([[0.3], [-1.0]], requires_grad=True)
    noise = torch.tensor([[1.0], [-0.5]])
    action, logp = policy_action(env, mean, noise, action_std=0.4)
    assert torch.allclose(action, mean.detach() + 0.4 * noise)
    expected = torch.distributions.Normal(mean, 0.4).log_prob(action).sum(-1)
    assert torch.allclose(logp, expected)
    logp.sum().backward()  # gradient reaches the mean through the log-probability only
    assert torch.allclose(mean.grad, (noise / 0.4))


def test_reinforce_improves_cartpole():
    family = RLFamily(("CartPole-v1",), widths=(32,), depths=(1,), activations=("tanh",), episodes=16, horizon=100,
                      eval_episodes=8)
    task = family.sample(0)
    params = {k: v.requires_grad_() for k, v in task.init_params(0).items()}
    before = task.evaluate(params)["return"]
    optimizer = torch.optim.Adam(params.values(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        loss = task.loss(params, task.sample_batch(g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(params)["return"]
    assert before < 30 and after > 2 * before + 20


def test_finished_episodes_stop_counting():
    env = make_env("CartPole-v1")
    net = policy_network(env, [4])
    params = {k: torch.zeros(1, *v.shape) for k, v in net.init_params(0).items()}
    params["2.bias"] = torch.tensor([[10.0, 0.0]])  # always push left: the pole falls quickly
    states = env.initial_state(torch.Generator().manual_seed(0), (1, 5))
    returns = episode_returns(partial(net.forward, params), env, states)
    assert ((returns > 5) & (returns < 30)).all()


def test_rl_errors():
    with pytest.raises(ValueError, match="no batched implementation"):
        make_env("MountainCar-v0")
    with pytest.raises(ValueError, match="no batched implementation"):
        RLFamily(("LunarLander-v3",))
    env = make_env("CartPole-v1")
    with pytest.raises(ValueError, match="does not map"):
        RLTask(policy_network(make_env("Acrobot-v1"), [4]), env, seed=0)
    with pytest.raises(ValueError, match="policy outputs"):
        policy_action(env, torch.zeros(3, 5))
    task = RLTask(policy_network(env, [4]), env, seed=0, horizon=3)
    batch = task.sample_batch(torch.Generator())
    with pytest.raises(ValueError, match="rollout states"):
        task.losses(partial(task.network.forward, {k: v[None] for k, v in task.init_params(0).items()}),
                    batch)  # batch lacks the P dim
    assert task.horizon == 3 and math.isfinite(task.loss(task.init_params(0), batch).item())
