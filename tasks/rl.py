"""RL policies on gymnasium classic control (CartPole-v1, Acrobot-v1, Pendulum-v1).

Stepping gymnasium envs one at a time from Python is far too slow for populations of
policies, so the dynamics of the three envs are re-implemented here as pure functions of
batched float64 tensors (any leading shape).  Tests check them step for step against
gymnasium's own envs; gymnasium stays the reference and the user-facing evaluation path
(:func:`evaluate_with_gymnasium`).

Inner objective: REINFORCE with a baseline.  A batch holds the episodes' initial states
and the random numbers that choose actions, so ``loss(params, batch)`` is a deterministic
function: it rolls the policy out for ``horizon`` steps, and returns
``-sum_t log pi(a_t|s_t) * A_t`` averaged over episodes, where ``A_t`` is the discounted
return-to-go minus the mean over the episodes still running at step t, scaled to unit
variance.  Rewards and dynamics are not differentiated.  Metric: undiscounted return of
the deterministic policy (argmax / mean action) over ``eval_steps`` steps (default: the
env's full episode length).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Forward, Network, Task, TaskFamily, choose, mlp

_F64 = torch.float64


def _wrap_angle(x: Tensor) -> Tensor:
    """Angle in [-pi, pi)."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


class BatchedEnv(ABC):
    """Dynamics of one gymnasium env on batched states ``[..., state_dim]`` (float64)."""

    env_id: str
    state_dim: int
    obs_dim: int
    max_steps: int  # gymnasium's TimeLimit for this id
    n_actions: int | None = None  # discrete envs
    action_dim: int = 1  # continuous envs
    action_bound: float = 1.0

    @property
    def discrete(self) -> bool:
        return self.n_actions is not None

    @property
    def policy_outputs(self) -> int:
        return self.n_actions if self.discrete else self.action_dim

    @abstractmethod
    def initial_state(self, generator: torch.Generator, shape: Sequence[int]) -> Tensor:
        """States as gymnasium's ``reset`` draws them."""

    @abstractmethod
    def observe(self, state: Tensor) -> Tensor:
        """gymnasium's observation (float32) of each state."""

    @abstractmethod
    def step(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(next_state, reward, terminated)`` for actions of shape ``state.shape[:-1]``
        (discrete, int64) or ``state.shape[:-1] + (action_dim,)`` (continuous)."""

    def _uniform(self, generator: torch.Generator, shape: Sequence[int], high: Tensor) -> Tensor:
        return (torch.rand(*shape, len(high), generator=generator, dtype=_F64) * 2 - 1) * high


class CartPole(BatchedEnv):
    env_id, state_dim, obs_dim, n_actions, max_steps = "CartPole-v1", 4, 4, 2, 500
    gravity, mass_cart, mass_pole, half_length, force, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_limit, x_limit = 12 * 2 * math.pi / 360, 2.4

    def initial_state(self, generator, shape):
        return self._uniform(generator, shape, torch.full((4,), 0.05, dtype=_F64))

    def observe(self, state):
        return state.float()

    def step(self, state, action):
        x, x_dot, theta, theta_dot = state.unbind(-1)
        force = torch.where(action == 1, self.force, -self.force)
        cos, sin = torch.cos(theta), torch.sin(theta)
        total_mass = self.mass_pole + self.mass_cart
        pole_moment = self.mass_pole * self.half_length
        temp = (force + pole_moment * theta_dot**2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.half_length * (4.0 / 3.0 - self.mass_pole * cos**2 / total_mass))
        x_acc = temp - pole_moment * theta_acc * cos / total_mass
        # explicit Euler, gymnasium's default integrator
        state = torch.stack([x + self.tau * x_dot, x_dot + self.tau * x_acc,
                             theta + self.tau * theta_dot, theta_dot + self.tau * theta_acc], dim=-1)
        terminated = (state[..., 0].abs() > self.x_limit) | (state[..., 2].abs() > self.theta_limit)
        return state, torch.ones_like(x), terminated


class Acrobot(BatchedEnv):
    env_id, state_dim, obs_dim, n_actions, max_steps = "Acrobot-v1", 4, 6, 3, 500
    dt, m1, m2, l1, lc1, lc2, inertia, g = 0.2, 1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 9.8
    max_vel1, max_vel2 = 4 * math.pi, 9 * math.pi

    def initial_state(self, generator, shape):
        # gymnasium stores the initial state as float32; do the same so episodes match
        return self._uniform(generator, shape, torch.full((4,), 0.1, dtype=_F64)).float().double()

    def observe(self, state):
        th1, th2, dth1, dth2 = state.unbind(-1)
        return torch.stack([torch.cos(th1), torch.sin(th1), torch.cos(th2), torch.sin(th2), dth1, dth2], -1).float()

    def _derivatives(self, s: Tensor, torque: Tensor) -> Tensor:
        # Equations of motion of Sutton & Barto's acrobot ("book" variant, as gymnasium).
        th1, th2, dth1, dth2 = s.unbind(-1)
        m1, m2, l1, lc1, lc2, inertia, g = self.m1, self.m2, self.l1, self.lc1, self.lc2, self.inertia, self.g
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * torch.cos(th2)) + 2 * inertia
        d2 = m2 * (lc2**2 + l1 * lc2 * torch.cos(th2)) + inertia
        phi2 = m2 * lc2 * g * torch.cos(th1 + th2 - math.pi / 2)
        phi1 = (-m2 * l1 * lc2 * dth2**2 * torch.sin(th2) - 2 * m2 * l1 * lc2 * dth2 * dth1 * torch.sin(th2)
                + (m1 * lc1 + m2 * l1) * g * torch.cos(th1 - math.pi / 2) + phi2)
        ddth2 = (torque + d2 / d1 * phi1 - m2 * l1 * lc2 * dth1**2 * torch.sin(th2) - phi2) / (
            m2 * lc2**2 + inertia - d2**2 / d1)
        ddth1 = -(d2 * ddth2 + phi1) / d1
        return torch.stack([dth1, dth2, ddth1, ddth2], dim=-1)

    def step(self, state, action):
        torque = (action - 1).to(_F64)  # actions 0, 1, 2 -> torque -1, 0, +1
        h = self.dt
        k1 = self._derivatives(state, torque)  # one classical Runge-Kutta step
        k2 = self._derivatives(state + h / 2 * k1, torque)
        k3 = self._derivatives(state + h / 2 * k2, torque)
        k4 = self._derivatives(state + h * k3, torque)
        s = state + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        state = torch.stack([_wrap_angle(s[..., 0]), _wrap_angle(s[..., 1]),
                             s[..., 2].clamp(-self.max_vel1, self.max_vel1),
                             s[..., 3].clamp(-self.max_vel2, self.max_vel2)], dim=-1)
        terminated = -torch.cos(state[..., 0]) - torch.cos(state[..., 1] + state[..., 0]) > 1.0
        return state, torch.where(terminated, 0.0, -1.0).to(_F64), terminated


class Pendulum(BatchedEnv):
    env_id, state_dim, obs_dim, action_dim, max_steps = "Pendulum-v1", 2, 3, 1, 200
    action_bound, max_speed, dt, g, m, length = 2.0, 8.0, 0.05, 10.0, 1.0, 1.0

    def initial_state(self, generator, shape):
        return self._uniform(generator, shape, torch.tensor([math.pi, 1.0], dtype=_F64))

    def observe(self, state):
        th, thdot = state.unbind(-1)
        return torch.stack([torch.cos(th), torch.sin(th), thdot], dim=-1).float()

    def step(self, state, action):
        th, thdot = state.unbind(-1)
        u = action[..., 0].to(_F64).clamp(-self.action_bound, self.action_bound)
        cost = _wrap_angle(th) ** 2 + 0.1 * thdot**2 + 0.001 * u**2
        thdot = thdot + (3 * self.g / (2 * self.length) * torch.sin(th) + 3.0 / (self.m * self.length**2) * u) * self.dt
        thdot = thdot.clamp(-self.max_speed, self.max_speed)
        return torch.stack([th + thdot * self.dt, thdot], dim=-1), -cost, torch.zeros_like(th, dtype=torch.bool)


ENVS: dict[str, type[BatchedEnv]] = {e.env_id: e for e in (CartPole, Acrobot, Pendulum)}


def make_env(env_id: str) -> BatchedEnv:
    """The batched torch version of a gymnasium env id."""
    if env_id not in ENVS:
        raise ValueError(f"no batched implementation of {env_id!r}; known: {sorted(ENVS)}")
    return ENVS[env_id]()


def policy_action(env: BatchedEnv, out: Tensor, noise: Tensor | None = None,
                  action_std: float = 0.5) -> tuple[Tensor, Tensor | None]:
    """Action and its log-probability from the policy's outputs.

    Discrete envs: ``out`` are logits; ``noise`` ~ U(0, 1) picks an action by inverse CDF.
    Continuous envs: ``out`` is the Gaussian mean; ``noise`` ~ N(0, 1) scaled by
    ``action_std``.  Without noise the action is deterministic (argmax / mean) and the
    log-probability is None.  Sampling from given noise keeps the loss a pure function.
    """
    if out.shape[-1] != env.policy_outputs:
        raise ValueError(f"{env.env_id} needs {env.policy_outputs} policy outputs, got {out.shape[-1]}")
    if env.discrete:
        if noise is None:
            return out.argmax(-1), None
        logp_all = F.log_softmax(out, dim=-1)
        cdf = logp_all.exp().cumsum(-1)
        action = (cdf < noise.unsqueeze(-1)).sum(-1).clamp(max=env.n_actions - 1)
        return action, logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    if noise is None:
        return out, None
    action = (out + action_std * noise).detach()
    logp = -0.5 * ((action - out) / action_std) ** 2 - math.log(action_std) - 0.5 * math.log(2 * math.pi)
    return action, logp.sum(-1)


@torch.no_grad()
def episode_returns(forward: Forward, env: BatchedEnv, states: Tensor, max_steps: int | None = None) -> Tensor:
    """Undiscounted returns ``[P, E]`` of deterministic policies from ``states [P, E, S]``.

    ``forward`` maps observations ``[P, E, obs_dim]`` to policy outputs, e.g.
    ``functools.partial(network.forward, stacked_params)``.
    """
    total = torch.zeros(states.shape[:-1], dtype=_F64, device=states.device)
    alive = torch.ones(states.shape[:-1], dtype=torch.bool, device=states.device)
    for _ in range(max_steps or env.max_steps):
        action, _ = policy_action(env, forward(env.observe(states)))
        next_states, reward, terminated = env.step(states, action)
        total += torch.where(alive, reward, 0.0)
        states = torch.where(alive.unsqueeze(-1), next_states, states)
        alive &= ~terminated
        if not alive.any():
            break
    return total


class Rollouts(NamedTuple):
    """Everything random about a batch of episodes."""

    states: Tensor  # [E, state_dim] initial states (float64)
    noise: Tensor  # [T, E] uniform (discrete) or [T, E, action_dim] normal (continuous)


class RLData(NamedTuple):
    eval_states: Tensor  # [P, eval_episodes, state_dim]


class RLTask(Task):
    """Train a policy network on one env with REINFORCE (see the module docstring)."""

    def __init__(self, network: Network, env: BatchedEnv, seed: int, episodes: int = 32, horizon: int | None = None,
                 gamma: float = 0.99, action_std: float = 0.5, eval_episodes: int = 16, eval_steps: int | None = None):
        super().__init__(network, seed)
        outputs = network.shapes[f"{len(network.template) - 1}.weight"][0]
        if network.shapes["0.weight"][1] != env.obs_dim or outputs != env.policy_outputs:
            raise ValueError(f"{network.name} does not map {env.env_id}'s {env.obs_dim} observations "
                             f"to {env.policy_outputs} outputs")
        self.env, self.episodes, self.gamma, self.action_std = env, episodes, gamma, action_std
        self.horizon = min(horizon or 200, env.max_steps)
        self.eval_episodes, self.eval_steps = eval_episodes, min(eval_steps or env.max_steps, env.max_steps)

    def population_key(self) -> tuple:
        return super().population_key() + (self.env.env_id, self.episodes, self.horizon, self.gamma,
                                           self.action_std, self.eval_episodes, self.eval_steps)

    @classmethod
    def stack_data(cls, tasks: Sequence["RLTask"]) -> RLData:
        env = tasks[0].env
        return RLData(torch.stack([env.initial_state(torch.Generator().manual_seed(t.seed), (t.eval_episodes,))
                                   for t in tasks]))

    def batch_from(self, data: RLData, generator: torch.Generator) -> Rollouts:
        P = data.eval_states.shape[0]
        states = self.env.initial_state(generator, (P, self.episodes))
        shape = (P, self.horizon, self.episodes)
        if self.env.discrete:
            noise = torch.rand(shape, generator=generator)
        else:
            noise = torch.randn(*shape, self.env.action_dim, generator=generator)
        return Rollouts(states, noise)

    def losses(self, forward: Forward, batch: Rollouts) -> Tensor:
        logps, returns, mask = self.rollout(forward, batch)
        return -(logps * self.advantages(returns, mask).detach()).sum(0).mean(-1)

    def rollout(self, forward: Forward, batch: Rollouts) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probabilities of the actions taken, discounted returns-to-go and the mask of running
        episodes, each ``[T, P, E]``."""
        state = batch.states
        if state.dim() != 3 or state.shape[-1] != self.env.state_dim:
            raise ValueError(f"rollout states must be [P, E, {self.env.state_dim}], got {tuple(state.shape)}")
        alive = torch.ones(state.shape[:-1], device=state.device)
        logps, rewards, masks = [], [], []
        for t in range(batch.noise.shape[1]):
            out = forward(self.env.observe(state))
            action, logp = policy_action(self.env, out, batch.noise[:, t], self.action_std)
            next_state, reward, terminated = self.env.step(state, action)
            state = torch.where(alive.unsqueeze(-1) > 0, next_state, state)  # finished episodes stand still
            logps.append(logp)
            rewards.append(reward.float() * alive)
            masks.append(alive)
            alive = alive * (~terminated).float()
        returns, running = [], torch.zeros_like(alive)
        for r in reversed(rewards):
            running = r + self.gamma * running
            returns.append(running)
        return torch.stack(logps), torch.stack(returns[::-1]), torch.stack(masks)

    def advantages(self, returns: Tensor, mask: Tensor) -> Tensor:
        """Returns-to-go minus the mean over the episodes still running at each step, scaled to unit
        variance over the whole batch (per population member); zero where episodes have ended."""
        count = mask.sum(2, keepdim=True).clamp(min=1)
        advantage = (returns - (returns * mask).sum(2, keepdim=True) / count) * mask
        scale = (advantage.square().sum((0, 2)) / mask.sum((0, 2))).sqrt().clamp(min=1e-6)
        return advantage / scale[:, None]

    def metrics(self, data: RLData, forward: Forward) -> dict[str, Tensor]:
        returns = episode_returns(forward, self.env, data.eval_states, self.eval_steps).mean(-1).float()
        # negative_return: the lower-is-better form that meta-training's validation loss reads
        return {"return": returns, "negative_return": -returns}


def policy_network(env: BatchedEnv, hidden: Sequence[int], act: str = "tanh") -> Network:
    return mlp(env.obs_dim, hidden, env.policy_outputs, act)


class RLFamily(TaskFamily):
    """Policies of varied width, depth and activation on the classic-control envs.

    A population shares env and architecture; members differ in seeds (initial states
    and action noise of their episodes, evaluation episodes).
    """

    name = "rl"

    def __init__(self, envs: Sequence[str] = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1"),
                 widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (1, 2),
                 activations: Sequence[str] = ("tanh", "relu"), episodes: int = 32, horizon: int | None = None,
                 gamma: float = 0.99, action_std: float = 0.5, eval_episodes: int = 16, eval_steps: int | None = None):
        self.envs = [make_env(e) for e in envs]
        self.widths, self.depths, self.activations = tuple(widths), tuple(depths), tuple(activations)
        self.kwargs = dict(episodes=episodes, horizon=horizon, gamma=gamma, action_std=action_std,
                           eval_episodes=eval_episodes, eval_steps=eval_steps)

    def sample_config(self, rng: np.random.Generator) -> dict:
        return {
            "env": choose(rng, self.envs, "envs"),
            "width": choose(rng, self.widths, "widths"),
            "depth": choose(rng, self.depths, "depths"),
            "activation": choose(rng, self.activations, "activations"),
        }

    def make_task(self, config: dict, seed: int) -> RLTask:
        env = config["env"]
        net = policy_network(env, [config["width"]] * config["depth"], config["activation"])
        return RLTask(net, env, seed, **self.kwargs)


def evaluate_with_gymnasium(policy: nn.Module | Callable[[Tensor], Tensor], env_id: str, episodes: int = 10,
                            seed: int = 0) -> dict[str, float]:
    """Mean and std of the deterministic policy's return in gymnasium's own env.

    ``policy`` maps observations ``[1, obs_dim]`` to policy outputs (e.g. ``task.module(params)``);
    episode ``k`` starts from ``env.reset(seed=seed + k)``.
    """
    import gymnasium as gym

    batched = make_env(env_id)
    env = gym.make(env_id)
    returns = []
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            total, done = 0.0, False
            while not done:
                with torch.no_grad():
                    out = policy(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
                action, _ = policy_action(batched, out)
                action = int(action) if batched.discrete else action.numpy().astype(np.float32)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return {"return": float(np.mean(returns)), "return_std": float(np.std(returns))}
