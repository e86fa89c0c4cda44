"""Which part of the learned update rule fails beyond the meta-training horizon: an ablation.

    python benchmarks/late_phase.py [--steps 1000] [--seed 0] [--out DIR]

Without its late phase (``mix_decay_from``, ``lr_decay_from``, ``amsgrad_from``) the shipped rule fits SIRENs to ~1e-7
within its horizon and then is thrown out of the basin (see docs/optimizer.md, "The late phase").
This trains the suite's SIRENs and a classifier for ``--steps`` steps with the shipped rule, with
its late phase off or in part, with parts of its metanetwork's output switched off, and with
``torch.optim.Adam`` at the rule's base lr (its untrained self), with and without AMSGrad.  Every
run sees the same init and batches.  The late phase was designed at the fixed step size the rule
was meta-trained with (lr 1e-2), so every variant but the shipped default itself runs at that
fixed lr; the shipped default takes Prodigy's distance estimate (docs/optimizer.md, "Step size").
Reported per task: the loss around step 100 (mean of steps
90-99) and at the end (mean of the last 100 steps); loss curves go to ``curves.png``.
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

# the quality benchmark's suite (loaded by path: it also sets up the import path for `tasks`)
_spec = importlib.util.spec_from_file_location(
    "optimizer_quality", os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimizer_quality.py"))
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

from metaopt import MetaNetOptimizer  # noqa: E402
from metaopt.optim import load_learned  # noqa: E402

TASKS = ("digits SIREN 32x2", "sine SIREN 32x2", "digits CNN 8 relu")
# metanetwork output columns (metaopt/optim/learned.py): 0-2 log-scales; 3 weight-gradient mix,
# 4 weight-parameter mix, 5 bias-gradient mix, 6 bias-parameter mix
LATE_OFF = {"mix_decay_from": None, "amsgrad_from": None, "lr_decay_from": None}  # the rule before its late phase
FIXED = {"step_size": "fixed", "lr": 1e-2}  # the step size the rule was meta-trained, and the late phase designed, at
VARIANTS = {
    "shipped default": {"fixed": False},
    "shipped default at the fixed lr 1e-2": {},
    "late phase off": {"config": LATE_OFF},
    "late phase without AMSGrad (the default before 2026-12-05)": {"config": {"amsgrad_from": None}},
    "late phase: additive terms fade, no lr decay": {"config": {"lr_decay_from": None, "amsgrad_from": None}},
    "late phase: lr decay, no fade": {"config": {"mix_decay_from": None, "amsgrad_from": None}},
    "late phase: fade + AMSGrad from 100, no lr decay": {"config": {"lr_decay_from": None, "amsgrad_from": 100}},
    "late phase off, additive terms off (max_mix=0)": {"config": {**LATE_OFF, "max_mix": 0.0}},
    "late phase off, parameter term off": {"config": LATE_OFF, "zero": (4, 6)},
    "late phase off, gradient term off": {"config": LATE_OFF, "zero": (3, 5)},
    "Adam at the base lr": {"adam": False},
    "Adam at the base lr, amsgrad": {"adam": True},
}


def make_optimizer(module: torch.nn.Module, variant: dict) -> torch.optim.Optimizer:
    learned = load_learned()
    opt = MetaNetOptimizer(module.parameters(), learned=learned.with_config(**FIXED)
                           if variant.get("fixed", True) else learned)
    if "adam" in variant:
        return torch.optim.Adam(module.parameters(), lr=opt.defaults["lr"], amsgrad=variant["adam"])
    if "config" in variant:
        opt.learned = opt.learned.with_config(**variant["config"])
    if "zero" in variant:
        def zero_columns(_module, _inputs, out, columns=list(variant["zero"])):
            out = out.clone()
            out[..., columns] = 0.0
            return out
        opt.learned.register_forward_hook(zero_columns)
    return opt


def run(task, variant: dict, steps: int, seed: int, progress: tqdm) -> np.ndarray:
    losses, _ = quality.train_module(task, seed, lambda module: make_optimizer(module, variant), steps, (),
                                     progress)
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per run (default 1000: 10x the horizon)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/late_phase", help="folder for report.md and curves.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 200:
        parser.error("--steps must be at least 200 (the report reads steps 90-99 and the last 100)")
    torch.set_num_threads(args.threads)
    specs = {name: (family, config) for name, _, family, config in quality.suite(quick=False)}
    curves: dict[str, dict[str, np.ndarray]] = {}
    with tqdm(total=len(TASKS) * len(VARIANTS) * args.steps, desc="training", unit="step", mininterval=1) as bar:
        for name in TASKS:
            family, config = specs[name]
            task = family.make_task(config, args.seed)
            curves[name] = {label: run(task, v, args.steps, args.seed, bar) for label, v in VARIANTS.items()}

    def cell(c: np.ndarray) -> str:
        return f"{np.nanmean(c[90:100]):.2g} / {np.nanmean(c[-100:]):.2g}"

    header = "| variant | " + " | ".join(f"{n}: step 100 / final" for n in TASKS) + " |"
    rows = [header, "|---" * (len(TASKS) + 1) + "|"]
    rows += [f"| {label} | " + " | ".join(cell(curves[n][label]) for n in TASKS) + " |" for label in VARIANTS]
    report = "\n".join([f"## Late phase: {args.steps} steps, seed {args.seed}", "",
                        "Training loss: mean of steps 90-99 / mean of the last 100 steps (NaN: diverged).", "",
                        *rows, "", "![loss curves](curves.png)", ""])
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4))
    for ax, name in zip(axes, TASKS):
        for label, c in curves[name].items():
            ax.semilogy(c, label=label, lw=1)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out / 'report.md'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
