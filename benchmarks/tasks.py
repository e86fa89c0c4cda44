"""Throughput of the batched task paths against one-at-a-time baselines measured in the same run.

    python benchmarks/tasks.py [--quick] [--threads N]

1. INR fitting: SIREN 2-32-32-1 on 28x28 Fashion-MNIST images, Adam (lr 1e-3), 1000 full-image
   steps per INR, in INRs per minute.  Batched: ``tasks.SirenFit`` on a population.  Baselines:
   the same fit with sines and cosines computed apart (numpy, torch; for
   ``tasks.siren_kernels.sin_cos``), autograd on ``Population.loss`` with ``torch.optim.Adam``,
   and the one-INR-at-a-time loop
   (``tasks.train``: nn.Module + torch.optim.Adam).  Baselines run fewer INRs / steps and are
   extrapolated linearly to 1000 steps per INR; the table says which rows are.
2. Classifiers: a population of 64 against 64 single runs (``tasks.train``), in task-steps/s.
3. RL: environment steps per second with random actions, batched torch envs against
   gymnasium's vector envs (numpy ``vector_entry_point`` for CartPole, SyncVectorEnv otherwise).

``--quick`` shortens every measurement (seconds instead of minutes) and extrapolates the batched
INR run too.  Ratios compare rows of the same block, measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# This script is named like the package it measures; drop its own folder from the import path
# so that `import tasks` finds the package (repository root) rather than this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tasks  # noqa: E402
from tasks import ClassifierFamily, INRTask, Population, SirenFit, siren  # noqa: E402
from tasks.data import load_fashion_mnist  # noqa: E402

rows: list[tuple[str, str, float, str, str]] = []  # block, path, value, unit, note


def report(block, path, value, unit, note=""):
    rows.append((block, path, value, unit, note))
    print(f"  {path:<44} {value:>12,.1f} {unit:<14} {note}", flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------
def bench_inr(quick: bool) -> None:
    block = "INR fitting (SIREN 2-32-32-1, 28x28 Fashion-MNIST, 1000 Adam steps)"
    print(block, flush=True)
    steps = 1000
    size = 64 if quick else 128
    images, _ = load_fashion_mnist("train", limit=size)
    net = siren(2, (32, 32), 1)
    pop = Population([INRTask(net, images[i], i) for i in range(size)])
    seeds = list(range(size))

    fit = SirenFit(pop, seeds, lr=1e-3, chunk=16)
    fit.step()  # warm-up (allocator, thread pool)
    run_steps = 100 if quick else steps - 1
    seconds, _ = timed(lambda: [fit.step() for _ in range(run_steps)])
    per_inr = seconds / size * steps / run_steps
    note = f"{size} INRs at once" + (f", {run_steps} steps extrapolated" if run_steps < steps - 1 else "")
    if run_steps == steps - 1:
        with torch.no_grad():
            mse = pop.loss(fit.params(), pop.sample_batch(None))
        note += f", mean PSNR {tasks.psnr(mse).mean():.1f} dB"
    report(block, "batched SirenFit (hand-written backward)", 60 / per_inr, "INRs/min", note)
    batched = 60 / per_inr

    # The same fit with the sines and cosines computed apart, by numpy's SIMD functions (the default before
    # tasks.siren_kernels) and by torch's: the baselines of tasks.siren_kernels.sin_cos.
    def numpy_pair(x, shift=None):
        x = x if shift is None else x + shift[..., None]
        s, c = torch.empty_like(x), torch.empty_like(x)
        np.sin(x.numpy(), out=s.numpy())
        np.cos(x.numpy(), out=c.numpy())
        return s, c

    def torch_pair(x, shift=None):
        x = x if shift is None else x + shift[..., None]
        return x.sin(), x.cos()

    fused = tasks.inr.sin_cos
    for name, pair in (("numpy's sin, cos", numpy_pair), ("torch.sin, torch.cos", torch_pair)):
        tasks.inr.sin_cos = pair
        try:
            fit = SirenFit(pop, seeds, lr=1e-3, chunk=16)
            fit.step()
            s = 50 if quick else 200
            seconds, _ = timed(lambda: [fit.step() for _ in range(s)])
        finally:
            tasks.inr.sin_cos = fused
        per_inr = seconds / size * steps / s
        report(block, f"batched SirenFit, {name} apart", 60 / per_inr, "INRs/min",
               f"{s} steps extrapolated; one-pass sin_cos (the default) is {batched * per_inr / 60:.2f}x")

    n, s = (16, 10) if quick else (64, 30)
    small = Population(pop.tasks[:n])
    tasks.train_population(small, lambda ps: torch.optim.Adam(ps, lr=1e-3), 1, seeds[:n])  # warm-up
    seconds, _ = timed(lambda: tasks.train_population(small, lambda ps: torch.optim.Adam(ps, lr=1e-3), s,
                                                      seeds[:n]))
    per_inr = seconds / n * steps / s
    report(block, "autograd Population.loss + torch.optim.Adam", 60 / per_inr, "INRs/min",
           f"{n} INRs x {s} steps extrapolated; batched is {batched * per_inr / 60:.1f}x")

    n, s = (2, 50) if quick else (4, 150)
    tasks.train(pop.tasks[0], lambda ps: torch.optim.Adam(ps, lr=1e-3), 1)  # warm-up
    seconds, _ = timed(lambda: [tasks.train(pop.tasks[i], lambda ps: torch.optim.Adam(ps, lr=1e-3), s, seed=i)
                                for i in range(n)])
    per_inr = seconds / n * steps / s
    report(block, "one INR at a time (nn.Module + torch.optim)", 60 / per_inr, "INRs/min",
           f"{n} INRs x {s} steps extrapolated; batched is {batched * per_inr / 60:.1f}x")


# ---------------------------------------------------------------------------------------
def bench_classifiers(quick: bool) -> None:
    population, steps = 64, (5 if quick else 20)
    singles = 4 if quick else 16
    for arch, width in (("mlp", 32), ("cnn", 8)):
        family = ClassifierFamily("fashion_mnist", archs=(arch,), widths=(width,), depths=(2,),
                                  activations=("relu",), batch_size=64, train_size=1024, test_size=100,
                                  limit=4096)
        pop = family.population(0, population)
        block = f"classifier {pop.network.name}, batch 64"
        print(block, flush=True)
        adam = lambda ps: torch.optim.Adam(ps, lr=1e-3)  # noqa: E731
        tasks.train_population(pop, adam, 1, list(range(population)))  # warm-up
        seconds, _ = timed(lambda: tasks.train_population(pop, adam, steps, list(range(population))))
        batched = population * steps / seconds
        report(block, f"population of {population} (stacked, torch.optim.Adam)", batched, "task-steps/s")
        tasks.train(pop.tasks[0], adam, 1)  # warm-up
        seconds, _ = timed(lambda: [tasks.train(pop.tasks[i], adam, steps, seed=i) for i in range(singles)])
        single = singles * steps / seconds
        report(block, f"{population} single runs (nn.Module + torch.optim)", single, "task-steps/s",
               f"{singles} of the {population} runs timed; population is {batched / single:.1f}x")


# ---------------------------------------------------------------------------------------
def torch_env_steps(env_id: str, num_envs: int, steps: int) -> float:
    env = tasks.make_env(env_id)
    g = torch.Generator().manual_seed(0)
    state = env.initial_state(g, (num_envs,))

    def run():
        nonlocal state
        for _ in range(steps):
            if env.discrete:
                action = torch.randint(env.n_actions, (num_envs,), generator=g)
            else:
                action = (torch.rand(num_envs, 1, generator=g) * 2 - 1) * env.action_bound
            state, _, terminated = env.step(state, action)
            state = torch.where(terminated[:, None], env.initial_state(g, (num_envs,)), state)  # auto-reset

    seconds, _ = timed(run)
    return num_envs * steps / seconds


def gym_env_steps(env_id: str, num_envs: int, steps: int, mode: str) -> float:
    import gymnasium as gym

    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    actions = [envs.action_space.sample() for _ in range(steps)]
    seconds, _ = timed(lambda: [envs.step(a) for a in actions])
    envs.close()
    return num_envs * steps / seconds


def bench_rl(quick: bool) -> None:
    steps = 100 if quick else 500
    for env_id, gym_mode, gym_envs in (("CartPole-v1", "vector_entry_point", 1024), ("CartPole-v1", "sync", 16),
                                       ("Acrobot-v1", "sync", 16), ("Pendulum-v1", "sync", 16)):
        block = f"RL env steps, {env_id}"
        if gym_mode == "vector_entry_point" or env_id != "CartPole-v1":
            print(block, flush=True)
            ours = torch_env_steps(env_id, 1024, steps)
            report(block, "batched torch (1024 envs, float64)", ours, "env-steps/s")
        gym_steps = gym_env_steps(env_id, gym_envs, max(steps // 5, 20), gym_mode)
        report(block, f"gymnasium {gym_mode} ({gym_envs} envs)", gym_steps, "env-steps/s",
               f"batched torch is {ours / gym_steps:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (extrapolated)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuned: {tasks.tune_malloc()}, "
          f"{'quick' if args.quick else 'full'} run\n", flush=True)
    np.random.seed(0)
    bench_inr(args.quick)
    bench_classifiers(args.quick)
    bench_rl(args.quick)


if __name__ == "__main__":
    main()
