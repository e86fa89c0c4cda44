"""The learned optimizer on policy gradients (REINFORCE on tasks.rl's batched classic-control envs), against Adam.

    python benchmarks/policy_gradient.py [--envs CartPole-v1] [--steps 300] [--seeds 3] [--out DIR] [--learned FILE]

Meta-training never showed the shipped default an RL objective. REINFORCE's surrogate loss says
little (its advantages are normalised), so this reports what users watch: the return of the
deterministic policy on ``tasks.rl``'s evaluation episodes, every ``--every`` updates, for the
learned optimizer with its automatic step size (the default), the same metanetwork with the fixed
step size at lr 1e-3 (``load_learned().with_config(step_size="fixed")``), and Adam at 1e-3 and 1e-2.
Two ways of writing the loss: ``tasks.rl``'s (one advantage scale for the whole batch) and
advantages standardised per time step, a common variant whose gradients keep one direction for
longer. Each policy (an MLP of 32 tanh units) sees the same init, episodes and action noise under
every optimizer. Writes ``report.md`` and ``returns.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

# the quality benchmark's training loop (loaded by path: it also sets up the import path for `tasks`)
_spec = importlib.util.spec_from_file_location(
    "optimizer_quality", os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimizer_quality.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

import tasks  # noqa: E402
import tasks.rl  # noqa: E402
from metaopt import MetaNetOptimizer  # noqa: E402
from metaopt.optim import DEFAULT_PATH, load_learned  # noqa: E402


def optimizers(learned: str) -> dict:
    """Report name -> ``make_optimizer(module)``."""
    rule = load_learned(learned)
    fixed = rule.with_config(step_size="fixed")
    return {"learned (automatic step size)": lambda m: MetaNetOptimizer(m.parameters(), learned=rule),
            "learned, fixed step size 1e-3": lambda m: MetaNetOptimizer(m.parameters(), lr=1e-3, learned=fixed),
            "Adam 1e-3": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
            "Adam 1e-2": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)}


class PerStepAdvantages(tasks.RLTask):
    """REINFORCE as many users write it: each step's return-to-go standardised over the batch's
    episodes at that step (finished episodes count with return 0), instead of ``tasks.rl``'s one
    scale for the whole batch. Its gradients keep one direction for longer."""

    def advantages(self, returns, mask):
        advantage = (returns - returns.mean(-1, keepdim=True)) / (returns.std(-1, keepdim=True) + 1e-8)
        return advantage * mask


FORMULATIONS = {"tasks.rl (one advantage scale per batch)": tasks.RLTask,
                "advantages standardised per step": PerStepAdvantages}


def returns(env: str, formulation: type, make_optimizer, steps: int, every: int, seeds: int,
            progress: tqdm) -> np.ndarray:
    """Evaluation returns ``[seeds, steps // every]`` of one optimizer on one env and loss."""
    env = tasks.rl.make_env(env)
    network = tasks.rl.policy_network(env, [32], "tanh")
    after = tuple(range(every, steps + 1, every))
    runs = []
    for seed in range(seeds):
        task = formulation(network, env, seed)
        _, metrics = quality.train_module(task, seed, make_optimizer, steps, after, progress)
        runs.append([metrics[t]["return"] for t in after])
    return np.array(runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["CartPole-v1"], help="tasks.rl env ids")
    ap.add_argument("--steps", type=int, default=300, help="policy updates")
    ap.add_argument("--every", type=int, default=50, help="evaluate every N updates")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/policy_gradient")
    ap.add_argument("--learned", default=str(DEFAULT_PATH), help="learned optimizer file (default: shipped)")
    args = ap.parse_args(argv)
    if args.every < 1 or args.steps < args.every:
        ap.error("--every must be between 1 and --steps")
    torch.set_num_threads(args.threads)
    candidates = optimizers(args.learned)
    after = list(range(args.every, args.steps + 1, args.every))
    total = len(args.envs) * len(FORMULATIONS) * len(candidates) * args.seeds * args.steps
    with tqdm(total=total, desc="training", unit="step") as progress:
        results = {f"{env}, {name}": {k: returns(env, formulation, make, args.steps, args.every, args.seeds, progress)
                                      for k, make in candidates.items()}
                   for env in args.envs for name, formulation in FORMULATIONS.items()}
    lines = [f"## Policy gradients ({args.steps} updates, {args.seeds} seeds)", "", f"Learned: `{args.learned}`.", "",
             "Return of the deterministic policy, mean over seeds (in brackets: each seed's at the end).", "",
             "| env, loss | optimizer | " + " | ".join(f"after {t}" for t in after) + " |",
             "|---|---|" + "---:|" * len(after)]
    for problem, by_opt in results.items():
        for i, (k, r) in enumerate(by_opt.items()):
            ends = ", ".join(f"{x:.0f}" for x in r[:, -1])
            lines.append(f"| {problem if i == 0 else ''} | {k} | " + " | ".join(f"{x:.1f}" for x in r.mean(0))
                         + f" ({ends}) |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report + "\n")
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (problem, by_opt) in zip(axes.flat, results.items()):
        for k, r in by_opt.items():
            ax.plot(after, r.mean(0), marker="o", label=k)
        ax.set(xlabel="policy updates", ylabel="return (mean over seeds)")
        ax.set_title(problem, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "returns.png", dpi=110)
    print(f"wrote {out / 'report.md'}, {out / 'returns.png'}")


if __name__ == "__main__":
    main()
