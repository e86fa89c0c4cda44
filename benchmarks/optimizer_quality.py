"""Training quality of the learned optimizer against Adam, at and beyond its meta-training horizon.

    python benchmarks/optimizer_quality.py [--learned PATH] [--steps 300] [--seeds 3] [--quick] [--out DIR]

``MetaNetOptimizer`` (its default lr: the one stored in the learned file) trains each task of a
suite next to ``torch.optim.Adam`` at every lr of a half-decade grid (1e-4 ... 1e-1).  The suite
is tasks from suite ``small``'s meta-training families (8x8 digit MLPs of widths 8/16, a CNN of
width 8, digit SIRENs) plus held-out tasks: a wider, deeper digits MLP, Fashion-MNIST classifiers (8x8
and 28x28) and SIRENs on 1-D sine waves.  Every optimizer sees the same initializations and the
same minibatches (seed s sets the task's data, the init and the batch order).  The learned
optimizer trains the task's ``nn.Module``; the Adam grid runs as one ``tasks.Population`` (the
functional forward of the same network), each member in its own ``torch.optim.Adam`` param group.

Each run lasts 10x the meta-training horizon (``--steps``); the learned optimizer's features do
not depend on the run length, so the first ``--steps`` steps are also the run at the horizon.
Reported per task and horizon, averaged over seeds, for the learned optimizer, Adam at 1e-3 and
Adam at the grid's best lr (lowest final training loss at that horizon):

* mean training loss over the run, and final training loss (mean of the last 10% of steps);
* test metric at the end: test loss / accuracy for classifiers, PSNR for INRs (the fit itself);
* steps to reach Adam 1e-3's final loss, on the seed-mean loss curve smoothed by the same trailing
  10% window (so Adam 1e-3 reaches it by the last step), and the speedup Adam 1e-3's steps / these
  steps ("never" if the smoothed curve stays above it);
* diverged: seeds whose final loss is non-finite or above twice the first step's loss;
* rose: seeds whose final loss is more than 10x the lowest loss their smoothed curve reached
  earlier (training got somewhere, then lost it: what an unstable rule does beyond its horizon).

Writes ``report.md`` (the tables printed here), ``results.json`` and ``curves.png`` to ``--out``.
The default run takes about 15 minutes on 2 CPU cores; ``--quick`` runs 5 tasks with 2 seeds for
100 / 1000 steps (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

# This folder holds benchmarks/tasks.py; drop it from the import path so that `import tasks`
# finds the package (repository root) rather than that script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tasks  # noqa: E402
from meta_train.config import ADAM_LR_GRID  # noqa: E402
from metaopt import MetaNetOptimizer  # noqa: E402
from metaopt.optim import DEFAULT_PATH  # noqa: E402

LONG = 10  # the long horizon, in multiples of --steps
ROSE_FACTOR = 10.0  # "rose": final loss this many times above the run's lowest (smoothed) loss


def suite(quick: bool) -> list[tuple[str, str, tasks.TaskFamily, dict]]:
    """(name, "meta-train" or "held-out", family, config) of every benchmarked task."""
    digits = tasks.ClassifierFamily(dataset="digits", batch_size=32, train_size=512, test_size=200)  # suite small's
    digit_inrs = tasks.INRFamily(dataset="digits", images=500)
    fashion = tasks.ClassifierFamily(dataset="fashion_mnist", batch_size=32, train_size=1024, test_size=500,
                                     limit=10000)
    fashion8 = tasks.ClassifierFamily(dataset="fashion_mnist_8x8", batch_size=32, train_size=1024, test_size=500,
                                      limit=10000)
    sines = tasks.INRFamily(dataset="sine")

    def net(arch, width, depth=1, act="relu"):
        return {"arch": arch, "width": width, "depth": depth, "activation": act}

    every = [
        ("digits MLP 8 relu", "meta-train", digits, net("mlp", 8)),
        ("digits MLP 16 tanh", "meta-train", digits, net("mlp", 16, act="tanh")),
        ("digits CNN 8 relu", "meta-train", digits, net("cnn", 8)),
        ("digits SIREN 16", "meta-train", digit_inrs, {"width": 16, "depth": 1}),
        ("digits SIREN 32x2", "meta-train", digit_inrs, {"width": 32, "depth": 2}),
        ("digits MLP 64x2 relu", "held-out", digits, net("mlp", 64, 2)),
        ("fashion 8x8 MLP 32 gelu", "held-out", fashion8, net("mlp", 32, act="gelu")),
        ("fashion 28x28 MLP 32 relu", "held-out", fashion, net("mlp", 32)),
        ("sine SIREN 32x2", "held-out", sines, {"width": 32, "depth": 2}),
    ]
    return [every[i] for i in (1, 2, 4, 5, 8)] if quick else every  # quick: MLP, CNN, SIREN; 2 held out


def train_module(task: tasks.Task, seed: int, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                 steps: int, evaluate_after: tuple[int, ...], progress: tqdm
                 ) -> tuple[np.ndarray, dict[int, dict[str, float]]]:
    """The task's ``nn.Module`` trained by ``make_optimizer(module)`` (here MetaNetOptimizer; in
    ``late_phase.py`` its ablations): the loss of every step, metrics after ``evaluate_after`` steps.

    This is ``tasks.train`` plus the metrics (``train`` does not hand back the trained module).  A
    non-finite loss ends the run: the rest of the curve is NaN, later metrics score the diverged model.
    """
    module = task.module(task.init_params(seed))
    optimizer = make_optimizer(module)
    generator = torch.Generator().manual_seed(seed)
    losses, metrics = np.full(steps, np.nan), {}

    def evaluate():
        return task.evaluate({n: p.detach() for n, p in module.named_parameters()})

    for t in range(steps):
        progress.update()
        loss = task.module_loss(module, task.sample_batch(generator))
        losses[t] = loss.item()
        if not math.isfinite(losses[t]):
            progress.update(steps - t - 1)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if t + 1 in evaluate_after:
            metrics[t + 1] = evaluate()
    return losses, {h: metrics[h] if h in metrics else evaluate() for h in evaluate_after}


def train_adam_grid(seed_tasks: list[tasks.Task], steps: int, evaluate_after: tuple[int, ...],
                    progress: tqdm) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """``torch.optim.Adam`` at every grid lr on every seed's task, run as one population.

    Member (lr, s) has its own leaf tensors in its lr's param group, so each is trained exactly as
    ``torch.optim.Adam`` would train it alone, from seed s's init on seed s's batches (those of
    :func:`train_module`).  Returns losses ``[lrs, seeds, steps]`` and metrics ``[lrs, seeds]``.
    """
    S, L = len(seed_tasks), len(ADAM_LR_GRID)
    population = tasks.Population(seed_tasks * L)
    members = [{k: v.requires_grad_() for k, v in task.init_params(s).items()}
               for _ in ADAM_LR_GRID for s, task in enumerate(seed_tasks)]
    optimizer = torch.optim.Adam([{"params": [p for m in members[i * S:(i + 1) * S] for p in m.values()], "lr": lr}
                                  for i, lr in enumerate(ADAM_LR_GRID)])
    generators = [torch.Generator().manual_seed(s) for s in range(S)]
    losses, metrics = np.full((steps, L * S), np.nan), {}

    def stacked():
        return {k: torch.stack([m[k] for m in members]) for k in members[0]}

    for t in range(steps):
        progress.update()
        batches = [task.sample_batch(g) for task, g in zip(seed_tasks, generators)] * L
        loss = population.loss(stacked(), type(batches[0])(*map(torch.stack, zip(*batches))))
        losses[t] = loss.detach().numpy()
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        if t + 1 in evaluate_after:
            metrics[t + 1] = {k: v.view(L, S).numpy() for k, v in population.evaluate(stacked()).items()}
    return losses.T.reshape(L, S, steps), metrics


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean over ``window`` steps (shorter windows at the start)."""
    total = np.concatenate([[0.0], np.cumsum(curve)])
    ends = np.arange(1, len(curve) + 1)
    starts = np.maximum(ends - window, 0)
    return (total[ends] - total[starts]) / (ends - starts)


def steps_to(curve: np.ndarray, target: float, window: int) -> int | None:
    """First step (1-based) at which the smoothed curve is at or below ``target``; None if never."""
    hit = np.flatnonzero(smooth(curve, window) <= target)
    return int(hit[0]) + 1 if len(hit) else None


def summarize(curves: np.ndarray, metrics: list[dict], horizon: int, reference: np.ndarray) -> dict:
    """One optimizer's stats over seeds at a horizon; ``curves`` and ``reference`` (Adam 1e-3's) are [seeds, steps]."""
    window = max(1, horizon // 10)
    curves, reference = curves[:, :horizon], reference[:, :horizon].mean(0)
    finals = curves[:, -window:].mean(1)
    diverged = ~np.isfinite(finals) | (finals > 2 * curves[:, 0])
    lowest = np.array([np.nanmin(smooth(c, window)) if np.isfinite(c).any() else np.nan for c in curves])
    rose = np.isfinite(finals) & (finals > ROSE_FACTOR * lowest)
    target = smooth(reference, window)[-1]  # Adam 1e-3's final loss, so its own curve reaches it
    own, ref = steps_to(curves.mean(0), target, window), steps_to(reference, target, window)
    return {"mean_loss": float(curves.mean()), "final_loss": float(finals.mean()),
            "test": {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]},
            "diverged": int(diverged.sum()), "rose": int(rose.sum()), "steps_to_target": own,
            "speedup": ref / own if ref and own else None}


def benchmark(spec, seeds: int, horizon: int, learned: str, progress: tqdm) -> dict:
    """The learned optimizer and the Adam grid on one task for ``LONG * horizon`` steps, summarized at both horizons."""
    name, split, family, config = spec
    steps, horizons = LONG * horizon, (horizon, LONG * horizon)
    seed_tasks = [family.make_task(config, s) for s in range(seeds)]
    progress.set_postfix_str(name)
    runs = [train_module(task, s, lambda m: MetaNetOptimizer(m.parameters(), learned=learned), steps, horizons,
                         progress) for s, task in enumerate(seed_tasks)]
    curves = {"learned": np.stack([c for c, _ in runs])}
    metrics = {"learned": {h: [m[h] for _, m in runs] for h in horizons}}
    adam_curves, adam_metrics = train_adam_grid(seed_tasks, steps, horizons, progress)
    for i, lr in enumerate(ADAM_LR_GRID):
        curves[lr] = adam_curves[i]
        metrics[lr] = {h: [{k: float(v[i, s]) for k, v in adam_metrics[h].items()} for s in range(seeds)]
                       for h in horizons}

    result = {"task": name, "split": split, "horizons": {}}
    for h in horizons:
        summaries = {key: summarize(curves[key], metrics[key][h], h, curves[1e-3]) for key in curves}
        finite = [lr for lr in ADAM_LR_GRID if math.isfinite(summaries[lr]["final_loss"])]
        best = min(finite, key=lambda lr: summaries[lr]["final_loss"]) if finite else 1e-3
        result["horizons"][h] = {
            "adam_best_lr": best,
            "adam_final_loss_by_lr": {lr: summaries[lr]["final_loss"] for lr in ADAM_LR_GRID},
            "rows": {"learned": summaries["learned"], "Adam 1e-3": summaries[1e-3], "Adam best": summaries[best]}}
    best = result["horizons"][steps]["adam_best_lr"]
    result["mean_curves"] = {"learned": curves["learned"].mean(0), "Adam 1e-3": curves[1e-3].mean(0),
                             f"Adam best ({best:g})": curves[best].mean(0)}
    return result


def fmt(x: float) -> str:
    return f"{x:.4g}"


def fmt_test(test: dict) -> str:
    return f"{test['psnr']:.1f} dB" if "psnr" in test else f"{test['test_loss']:.3f} / {test['test_accuracy']:.1%}"


def table(results: list[dict], horizon: int, title: str, seeds: int) -> str:
    lines = [f"### {horizon} steps ({title})", "",
             "| task | optimizer | mean train loss | final train loss | test loss / acc, or PSNR "
             "| steps to Adam 1e-3's final loss | speedup | diverged | rose |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        at = r["horizons"][horizon]
        reference = at["rows"]["Adam 1e-3"]["steps_to_target"]
        for i, (label, row) in enumerate(at["rows"].items()):
            task = f"{r['task']} ({r['split']})" if i == 0 else ""
            label = f"Adam best ({at['adam_best_lr']:g})" if label == "Adam best" else label
            steps = "n/a" if reference is None else "never" if row["steps_to_target"] is None \
                else str(row["steps_to_target"])
            speedup = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            lines.append(f"| {task} | {label} | {fmt(row['mean_loss'])} | {fmt(row['final_loss'])} "
                         f"| {fmt_test(row['test'])} | {steps} | {speedup} | {row['diverged']}/{seeds} "
                         f"| {row.get('rose', 0)}/{seeds} |")
    return "\n".join(lines) + "\n"


def summary(results: list[dict], horizons: tuple[int, ...]) -> str:
    wins, diverged, rose = [], [], []
    for h in horizons:
        rows = [r["horizons"][h]["rows"] for r in results]
        beats = [sum(row["learned"]["final_loss"] < row[baseline]["final_loss"] for row in rows)
                 for baseline in ("Adam 1e-3", "Adam best")]
        wins.append(f"at {h} steps it beats Adam 1e-3 on {beats[0]}/{len(rows)} tasks and best-grid Adam on "
                    f"{beats[1]}/{len(rows)}")
        diverged += [f"{label} on {r['task']} at {h} steps ({row['diverged']} seeds)" for r in results
                     for label, row in r["horizons"][h]["rows"].items() if row["diverged"]]
        rose += [f"{label} on {r['task']} at {h} steps ({row['rose']} seeds)" for r in results
                 for label, row in r["horizons"][h]["rows"].items() if row.get("rose")]
    return (f"Learned optimizer (final train loss): {'; '.join(wins)}. "
            f"Diverged: {', '.join(diverged) if diverged else 'none'}. "
            f"Rose >{ROSE_FACTOR:g}x above their lowest loss: {', '.join(rose) if rose else 'none'}.")


def plot(results: list[dict], horizon: int, path: Path) -> None:
    cols = min(5, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        for label, curve in r["mean_curves"].items():
            ax.plot(np.arange(1, len(curve) + 1), smooth(curve, max(1, len(curve) // 100)), label=label, lw=1)
        ax.axvline(horizon, color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="step", title=f"{r['task']} ({r['split']})")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    fig.suptitle(f"mean training loss over seeds (smoothed); dashed: meta-training horizon ({horizon} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def without_nan(x):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    return None if isinstance(x, float) and not math.isfinite(x) else x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learned", default=str(DEFAULT_PATH), help="learned optimizer file (default: shipped)")
    parser.add_argument("--steps", type=int, help="meta-training horizon; runs last 10x (default 300, quick 100)")
    parser.add_argument("--seeds", type=int, help="seeds per task (default 3, quick 2)")
    parser.add_argument("--quick", action="store_true", help="5 tasks, 2 seeds, 100 / 1000 steps")
    parser.add_argument("--out", default="out/optimizer_quality", help="folder for report.md, results.json, PNG")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 300)
    seeds = args.seeds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)

    specs = suite(args.quick)
    # per task: one learned run per seed, then the whole Adam grid as one population run
    with tqdm(total=len(specs) * (seeds + 1) * LONG * steps, desc="training", unit="step", mininterval=1) as progress:
        results = [benchmark(spec, seeds, steps, args.learned, progress) for spec in specs]

    horizons = (steps, LONG * steps)
    line = summary(results, horizons)
    report = "\n".join([
        "## Learned optimizer vs Adam", "",
        f"Learned: `{args.learned}` (MetaNetOptimizer at its default lr). Adam grid: "
        f"{', '.join(f'{lr:g}' for lr in ADAM_LR_GRID)}; best = lowest final train loss at that horizon. "
        f"Means over {seeds} seeds; final loss = mean of the last 10% of steps; speedup = Adam 1e-3's steps to "
        "its final loss / this optimizer's steps (smoothed seed-mean curves).", "",
        table(results, steps, "meta-training horizon", seeds),
        table(results, LONG * steps, f"{LONG}x the horizon", seeds),
        line, "", "![mean loss curves](curves.png)", ""])
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    plot(results, steps, out / "curves.png")
    for r in results:
        del r["mean_curves"]
    config = {"learned": args.learned, "steps": steps, "long_steps": LONG * steps, "seeds": seeds,
              "adam_lrs": list(ADAM_LR_GRID)}
    (out / "results.json").write_text(json.dumps(without_nan({"config": config, "tasks": results}), indent=1))
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    print(line)


if __name__ == "__main__":
    main()
