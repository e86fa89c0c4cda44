"""The shipped default on training tasks meta-training never showed it, to 10x its horizon, against Adam.

    python benchmarks/unseen_tasks.py [--steps 3000] [--seeds 2] [--out DIR] [--learned FILE]

``unseen_models.py`` asks whether the rule copes with kinds of layers (a fixed random batch,
200 steps). This asks whether it trains real objectives it was not meta-trained on, for as long
as 10x its horizon: logistic regression on the bundled 8x8 digits (full batch, convex), a tanh
MLP regressing sin(3x) from minibatches, an autoencoder of the digits with a 16-unit ReLU
bottleneck, a one-layer transformer that learns to reverse a sequence, and (added on 2026-12-05)
a VAE and a convolutional autoencoder of the digits, a GRU that counts, ill-conditioned least
squares, a low-rank matrix factorization, a deep ReLU MLP, a BatchNorm ResNet, a wide sigmoid MLP
and a Huber regression with outliers. Each optimizer sees the same inits and batches. Reported
per task, means over seeds: the loss at the meta-training horizon (mean of steps 270-299) and at
the end (mean of the last 10% of steps), how far the end is above the lowest loss reached
(``end/lowest``: a rule that loses what it found), and the seeds that diverged (non-finite, or an
end above twice the first loss). Writes ``report.md`` and ``curves.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
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
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import tasks  # noqa: E402
from metaopt import MetaNetOptimizer  # noqa: E402
from metaopt.optim import DEFAULT_PATH  # noqa: E402

HORIZON = 300  # the shipped default's meta-training horizon


def _digits(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,437 training digits of ``tasks.load_digits``: flattened to 64 features, or with
    ``images`` as one-channel 8x8 images."""
    x, y = tasks.load_digits("train")
    return (x[:, None] if images else x.flatten(1)), y


def _batch(g, n: int, size: int = 128) -> torch.Tensor:
    """Indices of a minibatch of ``size`` out of ``n`` examples."""
    return torch.randint(0, n, (size,), generator=g)


def logistic_regression(seed: int):
    x, y = _digits()
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    return model, lambda g: F.cross_entropy(model(x), y)


def sine_regression(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.linspace(-3, 3, 1024)[:, None]
    y = torch.sin(3 * x)

    def loss(g):
        i = _batch(g, len(x), 64)
        return F.mse_loss(model(x[i]), y[i])
    return model, loss


def autoencoder(seed: int):
    x, _ = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 64))

    def loss(g):
        i = _batch(g, len(x))
        return F.mse_loss(model(x[i]), x[i])
    return model, loss


class SequenceReverser(nn.Module):
    """Embedding plus learned positions -> one transformer encoder layer -> linear: reverse 10 tokens."""

    def __init__(self, vocab: int = 12, length: int = 10, width: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.out(self.layer(self.emb(tokens) + self.pos))


def sequence_reversal(seed: int):
    torch.manual_seed(seed)
    model = SequenceReverser()

    def loss(g):
        tokens = torch.randint(0, 12, (64, 10), generator=g)
        return F.cross_entropy(model(tokens).reshape(-1, 12), tokens.flip(1).reshape(-1))
    return model, loss


def vae(seed: int):
    """A VAE of the digits: ReLU MLPs, an 8-d Gaussian latent, MSE reconstruction plus 0.1 KL."""
    x, _ = _digits()
    torch.manual_seed(seed)
    model = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)),
                           "dec": nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64))})

    def loss(g):
        xb = x[_batch(g, len(x))]
        mu, log_var = model["enc"](xb).chunk(2, dim=1)
        z = mu + torch.randn(mu.shape, generator=g) * (0.5 * log_var).exp()
        reconstruction = (model["dec"](z) - xb).square().sum(1).mean()
        kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).sum(1).mean()
        return reconstruction + 0.1 * kl
    return model, loss


def conv_autoencoder(seed: int):
    """Conv 8 -> strided conv 4 -> transposed conv 8 -> conv 1 on the 8x8 digits."""
    images, _ = _digits(images=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 1, 3, padding=1))

    def loss(g):
        xb = images[_batch(g, len(images))]
        return F.mse_loss(model(xb), xb)
    return model, loss


class BitCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.gru, self.out = nn.Embedding(2, 16), nn.GRU(16, 32, batch_first=True), nn.Linear(32, 1)

    def forward(self, bits):
        return self.out(self.gru(self.emb(bits))[0][:, -1])[:, 0]


def gru_counting(seed: int):
    """A GRU reads 20 random bits and regresses how many are ones (divided by 10)."""
    torch.manual_seed(seed)
    model = BitCounter()

    def loss(g):
        bits = torch.randint(0, 2, (64, 20), generator=g)
        return F.mse_loss(model(bits), bits.float().sum(1) / 10)
    return model, loss


def least_squares(seed: int):
    """Full-batch linear least squares whose feature scales span 100x (condition number ~1e2)."""
    g0 = torch.Generator().manual_seed(100 + seed)
    a = torch.randn(200, 20, generator=g0) * torch.logspace(0, -2, 20)
    b = a @ torch.randn(20, 1, generator=g0)
    torch.manual_seed(seed)
    model = nn.Linear(20, 1)
    return model, lambda g: F.mse_loss(model(a), b)


def matrix_factorization(seed: int):
    """U V^T fits a rank-4 50x40 matrix from a small init (full batch; a non-convex landscape)."""
    g0 = torch.Generator().manual_seed(100 + seed)
    target = torch.randn(50, 4, generator=g0) @ torch.randn(4, 40, generator=g0)
    torch.manual_seed(seed)
    model = nn.ParameterDict({"u": nn.Parameter(0.1 * torch.randn(50, 8)), "v": nn.Parameter(0.1 * torch.randn(40, 8))})
    return model, lambda g: F.mse_loss(model["u"] @ model["v"].T, target)


def _digit_classifier(model: nn.Module, images: bool = False):
    inputs, labels = _digits(images)

    def loss(g):
        i = _batch(g, len(labels))
        return F.cross_entropy(model(inputs[i]), labels[i])
    return model, loss


def deep_relu_mlp(seed: int):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, 64), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return _digit_classifier(nn.Sequential(*layers, nn.Linear(64, 10)))


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


def batchnorm_resnet(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), ResidualBlock(16),
                          ResidualBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return _digit_classifier(model, images=True)


def sigmoid_mlp(seed: int):
    torch.manual_seed(seed)
    return _digit_classifier(nn.Sequential(nn.Linear(64, 256), nn.Sigmoid(), nn.Linear(256, 10)))


def huber_regression(seed: int):
    """A ReLU MLP fits a noisy linear target with 5% gross outliers under the Huber loss (full batch)."""
    g0 = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(512, 10, generator=g0)
    y = x @ torch.randn(10, 1, generator=g0) + 0.1 * torch.randn(512, 1, generator=g0)
    y[:25] += 20
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    return model, lambda g: F.huber_loss(model(x), y)


TASKS = {"logistic regression, digits (full batch)": logistic_regression,
         "sin(3x) regression, tanh MLP 64x2": sine_regression,
         "digits autoencoder, 16-unit ReLU bottleneck": autoencoder,
         "transformer layer, reverse 10 tokens": sequence_reversal,
         "digits VAE, 8-d latent": vae,
         "digits conv autoencoder, 4-channel bottleneck": conv_autoencoder,
         "GRU counting ones in 20 bits": gru_counting,
         "least squares, condition ~1e2 (full batch)": least_squares,
         "rank-4 matrix factorization (full batch)": matrix_factorization,
         "8-layer ReLU MLP, digits": deep_relu_mlp,
         "BatchNorm ResNet, digits": batchnorm_resnet,
         "sigmoid MLP 256, digits": sigmoid_mlp,
         "Huber regression, 5% outliers (full batch)": huber_regression}


def optimizers(learned: str = str(DEFAULT_PATH)) -> dict[str, Callable]:
    """The learned rule (from the file ``learned``) and the two Adam baselines, by report name."""
    return {"learned": lambda m: MetaNetOptimizer(m.parameters(), learned=learned),
            "Adam 1e-3": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
            "Adam 1e-2": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)}


def train(task: Callable, make_optimizer: Callable, steps: int, seed: int) -> np.ndarray:
    """Training losses of one run; a non-finite loss ends it (the rest stays NaN)."""
    model, loss_fn = task(seed)
    opt, g = make_optimizer(model), torch.Generator().manual_seed(seed)
    losses = np.full(steps, np.nan)
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(g)
        losses[t] = loss.item()
        if not math.isfinite(losses[t]):
            break
        loss.backward()
        opt.step()
    return losses


def summarize(runs: list[np.ndarray]) -> dict:
    steps = len(runs[0])
    ends = [float(np.mean(r[-max(1, steps // 10):])) for r in runs]
    at_horizon = [float(np.mean(r[HORIZON - 30:HORIZON])) for r in runs] if steps >= HORIZON else ends
    lowest = [float(np.nanmin(r)) for r in runs]
    return {"horizon": float(np.mean(at_horizon)), "end": float(np.mean(ends)),
            "end_over_lowest": max(e / lo if lo > 0 else math.inf for e, lo in zip(ends, lowest)),
            "diverged": sum(not math.isfinite(e) or e > 2 * r[0] for e, r in zip(ends, runs)),
            "curve": np.nanmean(np.stack(runs), 0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10 * HORIZON)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1 is fastest)")
    ap.add_argument("--out", default="out/unseen_tasks")
    ap.add_argument("--learned", default=str(DEFAULT_PATH), help="learned optimizer file (default: shipped)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    candidates = optimizers(args.learned)
    results = {name: {k: summarize([train(task, make, args.steps, s) for s in range(args.seeds)])
                      for k, make in candidates.items()} for name, task in TASKS.items()}
    lines = [f"## The learned optimizer on unseen tasks ({args.steps} steps, {args.seeds} seeds)", "",
             f"Learned: `{args.learned}`.", "",
             f"| task | optimizer | loss at step {HORIZON} | loss at the end | end / lowest | diverged |",
             "|---|---|---:|---:|---:|---:|"]
    for name, by_opt in results.items():
        for i, (k, r) in enumerate(by_opt.items()):
            lines.append(f"| {name if i == 0 else ''} | {k} | {r['horizon']:.3g} | {r['end']:.3g} | "
                         f"{r['end_over_lowest']:.1f} | {r['diverged']}/{args.seeds} |")
    for when in ("horizon", "end"):
        beats = {k: sum(results[n]["learned"][when] < results[n][k][when] for n in TASKS) for k in list(candidates)[1:]}
        lines.append(f"\nLearned optimizer, loss at {'step ' + str(HORIZON) if when == 'horizon' else 'the end'}: "
                     + ", ".join(f"lower than {k} on {v}/{len(TASKS)}" for k, v in beats.items()) + ".")
    diverged = [n for n in TASKS if results[n]["learned"]["diverged"]]
    lines.append(f"Diverged (learned): {', '.join(diverged) or 'none'}.")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report + "\n")
    cols = min(4, len(TASKS))
    rows = math.ceil(len(TASKS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(TASKS):]:
        ax.set_visible(False)
    for ax, (name, by_opt) in zip(axes.flat, results.items()):
        for k, r in by_opt.items():
            ax.plot(np.arange(1, args.steps + 1), r["curve"], label=k, lw=1)
        ax.axvline(HORIZON, color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=name, xlabel="step")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle("mean training loss over seeds; dashed: meta-training horizon")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"wrote {out / 'report.md'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
