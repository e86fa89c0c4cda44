"""``python -m meta_train.standalone curves RUN [RUN ...] --out FILE.png``: the training curves of
several runs in one picture, read from their ``results.json`` (every row keeps its per-epoch
history), so runs made apart, e.g. one model per process, can be compared as one table is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .harness import StandaloneError

__all__ = ["load_histories", "plot_curves"]


def load_histories(run: str | Path) -> tuple[str, dict[str, list[dict]]]:
    """(the run's validation metric, {model: per-epoch history}) from ``run/results.json``."""
    path = Path(run) / "results.json"
    try:
        payload = json.loads(path.read_text())
        rows = payload["rows"]
        histories = {r["model"]: r["history"] for r in rows}
        metric = next(k for k in rows[0] if k.startswith("val_"))[len("val_"):]
    except FileNotFoundError:
        raise StandaloneError(f"{path} does not exist: not a standalone run folder") from None
    except (json.JSONDecodeError, KeyError, IndexError, StopIteration, TypeError) as e:
        raise StandaloneError(f"{path} is not a standalone results file ({type(e).__name__}: {e})") from None
    if not all(isinstance(h, list) and h and {"epoch", "train_loss", "val_score"} <= set(h[0]) for h in
               histories.values()):
        raise StandaloneError(f"{path} holds no per-epoch histories (written by an older version?)")
    return metric, histories


def plot_curves(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Validation score and training loss per epoch of every model of every run; one line each,
    named "label: model" (label: the run folder's name unless given)."""
    if labels is not None and len(labels) != len(runs):
        raise StandaloneError(f"{len(labels)} labels for {len(runs)} runs")
    loaded = [load_histories(r) for r in runs]
    metrics = {m for m, _ in loaded}
    if len(metrics) > 1:
        raise StandaloneError(f"the runs score different metrics ({', '.join(sorted(metrics))}): plot them apart")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (_, histories) in zip(labels or [Path(r).name for r in runs], loaded):
        for model, history in histories.items():
            epochs = [h["epoch"] for h in history]
            line, = score_ax.plot(epochs, [h["val_score"] for h in history], label=f"{label}: {model}")
            loss_ax.plot(epochs, [h["train_loss"] for h in history], color=line.get_color())
    (metric,) = metrics
    score_ax.set(xlabel="epoch", ylabel=f"validation {metric}")
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    score_ax.legend(fontsize=7)
    for ax in (score_ax, loss_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
