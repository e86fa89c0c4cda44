"""metaopt's main job: train a small classifier with the shipped MetaNetOptimizer and with Adam.

    python examples/quickstart.py [--steps 300] [--seeds 3] [--out out/quickstart.png]

The task is scikit-learn's bundled 8x8 digits (no download): an MLP 64-32-10, batch 128. The
learned optimizer is used exactly like Adam, at its own default lr (the base rate it was
meta-trained with); Adam runs at its default lr 1e-3 and at the best lr of a half-decade grid. Prints mean training loss, final loss and test
accuracy per optimizer, and saves the loss curves as a PNG.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from metaopt import MetaNetOptimizer

ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=seed)
    as_t = lambda a, dt: torch.tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return as_t(xtr, torch.float32), as_t(ytr, torch.long), as_t(xte, torch.float32), as_t(yte, torch.long)


def run(make_opt, steps: int, seed: int, data):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return np.array(losses), acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="out/quickstart.png")
    args = ap.parse_args()
    data = digits()

    def evaluate(make_opt):
        runs = [run(make_opt, args.steps, s, data) for s in range(args.seeds)]
        curves = np.stack([r[0] for r in runs])
        return curves, float(np.mean([r[1] for r in runs]))

    results = {"MetaNetOptimizer (default)": evaluate(lambda m: MetaNetOptimizer(m.parameters())),
               "Adam (lr 1e-3)": evaluate(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))}
    grid = {lr: evaluate(lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr)) for lr in ADAM_GRID}
    best_lr = min(grid, key=lambda lr: grid[lr][0].mean())
    results[f"Adam (best lr {best_lr:g})"] = grid[best_lr]

    print(f"digits MLP 64-32-10, {args.steps} steps, batch 128, {args.seeds} seeds")
    print(f"{'optimizer':<30} {'mean train loss':>16} {'final loss':>11} {'test acc':>9}")
    for name, (curves, acc) in results.items():
        final = curves[:, -10:].mean()
        print(f"{name:<30} {curves.mean():>16.4f} {final:>11.4f} {acc:>9.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (curves, _) in results.items():
        ax.plot(curves.mean(0), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("8x8 digits, MLP 64-32-10")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"loss curves saved to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
