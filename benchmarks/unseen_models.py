"""The shipped default (or ``--learned FILE``) on kinds of models meta-training never showed it, against Adam.

    python benchmarks/unseen_models.py [--steps 200] [--seeds 2] [--out DIR] [--learned FILE]

Meta-training saw MLPs, small CNNs and SIRENs. Users hand the optimizer anything: attention,
recurrent layers, norm layers whose biases start at exactly zero, tied or scalar parameters,
frozen layers with zero-initialised adapters, parametrized or 3-d weights, deep stacks. Each
model here fits a fixed random batch with random labels (pure optimization: every optimizer
sees the same init and the same batch), with ``MetaNetOptimizer`` at its default
lr, Adam at 1e-3 and Adam at 1e-2 (the fixed lr the default was meta-trained with). Reported per model, means over seeds: the first
loss, the final loss (mean of the last 10% of steps), the highest loss, and the seeds that
diverged (non-finite, or a final loss above twice the first). Writes ``report.md`` and
``final_losses.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from metaopt import MetaNetOptimizer  # noqa: E402
from metaopt.optim import DEFAULT_PATH  # noqa: E402

CLASSES, BATCH = 3, 32


class RecurrentAttention(nn.Module):
    """Embedding -> LSTM -> self-attention with a residual and LayerNorm -> linear."""

    def __init__(self, vocab: int = 20, width: int = 12):
        super().__init__()
        self.embed, self.lstm = nn.Embedding(vocab, width), nn.LSTM(width, width, batch_first=True)
        self.attn, self.norm = nn.MultiheadAttention(width, 2, batch_first=True), nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.head(self.norm(h + self.attn(h, h, h)[0]).mean(1))


class PreNormResidual(nn.Module):
    """Four pre-LayerNorm residual MLP blocks."""

    def __init__(self, width: int = 32, blocks: int = 4):
        super().__init__()
        self.inp, self.out = nn.Linear(10, width), nn.Linear(width, CLASSES)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.ReLU(),
                                                  nn.Linear(2 * width, width)) for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class TiedEmbedding(nn.Module):
    """The embedding matrix read again as the output layer."""

    def __init__(self, vocab: int = 30, width: int = 16):
        super().__init__()
        self.embed, self.mid = nn.Embedding(vocab, width), nn.Linear(width, width)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.mid(self.embed(tokens).mean(1))), self.embed.weight)[:, :CLASSES]


class ScaledByScalar(nn.Module):
    """A 0-d parameter (a learned temperature) next to an MLP."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.net = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.temperature


class LoRAAdapter(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B A`` whose ``B`` starts at zero."""

    def __init__(self, width: int = 16, rank: int = 4):
        super().__init__()
        self.base = nn.Linear(10, width).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, 10) / math.sqrt(10))
        self.lora_b = nn.Parameter(torch.zeros(width, rank))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.base(x) + x @ self.lora_a.t() @ self.lora_b.t()))


class UnrolledRNNCell(nn.Module):
    """An RNNCell applied over 5 time steps by hand (the same weights read 5 times)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.cell, self.head, self.width = nn.RNNCell(4, width), nn.Linear(width, CLASSES), width

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], self.width)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


class BilinearHead(nn.Module):
    """A bilinear layer (a 3-d weight) reading two views of a hidden layer."""

    def __init__(self):
        super().__init__()
        self.inp, self.bilinear = nn.Linear(10, 8), nn.Bilinear(8, 8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.bilinear(h, torch.sin(h))


def _zero_init_output() -> nn.Module:
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def _weight_norm_mlp() -> nn.Module:
    weight_norm = nn.utils.parametrizations.weight_norm
    return nn.Sequential(weight_norm(nn.Linear(10, 32)), nn.Tanh(), weight_norm(nn.Linear(32, CLASSES)))


def _deep_tanh(depth: int = 10, width: int = 32) -> nn.Module:
    return nn.Sequential(*[m for i in range(depth) for m in (nn.Linear(10 if i == 0 else width, width), nn.Tanh())],
                         nn.Linear(width, CLASSES))


# name -> (model builder, input builder from a generator)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]] = {
    "transformer encoder": (lambda: nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Flatten(), nn.Linear(64, CLASSES)),
        lambda g: torch.randn(BATCH, 4, 16, generator=g)),
    "lstm + attention": (RecurrentAttention, lambda g: torch.randint(0, 20, (BATCH, 5), generator=g)),
    "batchnorm / groupnorm cnn": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3), nn.GroupNorm(2, 4),
        nn.Flatten(), nn.Linear(256, CLASSES)), lambda g: torch.randn(BATCH, 3, 8, 8, generator=g)),
    "pre-norm residual mlp": (PreNormResidual, lambda g: torch.randn(BATCH, 10, generator=g)),
    "tied embedding": (TiedEmbedding, lambda g: torch.randint(0, 30, (BATCH, 5), generator=g)),
    "scalar parameter": (ScaledByScalar, lambda g: torch.randn(BATCH, 10, generator=g)),
    "depthwise-separable cnn": (lambda: nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, CLASSES)),
        lambda g: torch.randn(BATCH, 4, 8, 8, generator=g)),
    "dilated conv1d": (lambda: nn.Sequential(
        nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 3, dilation=2), nn.AdaptiveAvgPool1d(1),
        nn.Flatten(), nn.Linear(16, CLASSES)), lambda g: torch.randn(BATCH, 8, 20, generator=g)),
    "lora adapter (zero-init B)": (LoRAAdapter, lambda g: torch.randn(BATCH, 10, generator=g)),
    "zero-init output layer": (_zero_init_output, lambda g: torch.randn(BATCH, 10, generator=g)),
    "weight-norm parametrization": (_weight_norm_mlp, lambda g: torch.randn(BATCH, 10, generator=g)),
    "bilinear layer": (BilinearHead, lambda g: torch.randn(BATCH, 10, generator=g)),
    "conv3d + prelu": (lambda: nn.Sequential(
        nn.Conv3d(2, 4, 3), nn.PReLU(), nn.Conv3d(4, 4, 3, stride=2), nn.PReLU(4), nn.Flatten(),
        nn.Linear(4, CLASSES)), lambda g: torch.randn(BATCH, 2, 6, 6, 6, generator=g)),
    "rnn cell, unrolled": (UnrolledRNNCell, lambda g: torch.randn(BATCH, 5, 4, generator=g)),
    "embedding bag": (lambda: nn.Sequential(nn.EmbeddingBag(40, 16), nn.Linear(16, CLASSES)),
                      lambda g: torch.randint(0, 40, (BATCH, 6), generator=g)),
    "deep tanh mlp (10 layers)": (_deep_tanh, lambda g: torch.randn(BATCH, 10, generator=g)),
}


def train(name: str, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], steps: int,
          seed: int) -> list[float]:
    """Training losses of one model on its fixed batch (same init and batch for every optimizer)."""
    make_model, make_input = MODELS[name]
    torch.manual_seed(seed)
    model = make_model()
    g = torch.Generator().manual_seed(seed)
    x, y = make_input(g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    opt, losses = make_optimizer(model), []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def summarize(runs: list[list[float]]) -> dict:
    finals = [float(np.mean(r[-max(1, len(r) // 10):])) for r in runs]
    diverged = sum(not math.isfinite(f) or f > 2 * r[0] for f, r in zip(finals, runs))
    return {"first": float(np.mean([r[0] for r in runs])), "final": float(np.mean(finals)),
            "highest": float(np.max([max(r) for r in runs])), "diverged": diverged}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="out/unseen_models")
    ap.add_argument("--learned", default=str(DEFAULT_PATH), help="learned optimizer file (default: shipped)")
    args = ap.parse_args()
    optimizers = {"learned": lambda m: MetaNetOptimizer(m.parameters(), learned=args.learned),
                  "Adam 1e-3": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
                  "Adam 1e-2": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)}
    results = {name: {k: summarize([train(name, make, args.steps, s) for s in range(args.seeds)])
                      for k, make in optimizers.items()} for name in MODELS}
    lines = [f"## The learned optimizer on unseen kinds of models ({args.steps} steps, {args.seeds} seeds)", "",
             f"Learned: `{args.learned}`.", "",
             "| model | optimizer | first loss | final loss | highest loss | diverged |",
             "|---|---|---:|---:|---:|---:|"]
    for name, by_opt in results.items():
        for i, (k, r) in enumerate(by_opt.items()):
            lines.append(f"| {name if i == 0 else ''} | {k} | {r['first']:.3g} | {r['final']:.3g} | "
                         f"{r['highest']:.3g} | {r['diverged']}/{args.seeds} |")
    beats = {k: sum(results[n]["learned"]["final"] < results[n][k]["final"] for n in MODELS)
             for k in list(optimizers)[1:]}
    diverged = [n for n in MODELS if results[n]["learned"]["diverged"]]
    lines += ["", "Learned optimizer, final loss: " + ", ".join(f"lower than {k} on {v}/{len(MODELS)}"
                                                              for k, v in beats.items())
              + f"; diverged on: {', '.join(diverged) or 'none'}."]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report + "\n")
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(optimizers)
    for i, k in enumerate(optimizers):
        finals = [max(results[n][k]["final"], 1e-12) for n in MODELS]
        ax.bar(np.arange(len(MODELS)) + i * width, finals, width, label=k)
    ax.set_xticks(np.arange(len(MODELS)) + width, list(MODELS), rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"final training loss ({args.steps} steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "final_losses.png", dpi=120)
    print(f"wrote {out / 'report.md'}, {out / 'final_losses.png'}")


if __name__ == "__main__":
    main()
