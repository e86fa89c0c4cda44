"""SimCLR-style embeddings of INRs, learned without labels from weight-space augmentations.

Two views of every training SIREN are drawn from its exact symmetry group (random sign flips,
bias shifts by ``k pi / w0`` and hidden permutations: :mod:`.augment`), plus a little Gaussian
noise; each model embeds them, a small projection head maps the embeddings to the NT-Xent loss
(Chen et al. 2020), which pulls the two views of one INR together and pushes other INRs away.

The labels are used only to *evaluate* the frozen embeddings:

* ``linear_probe_accuracy``: logistic regression on train embeddings, scored on test ones;
* ``knn_accuracy``: 5-nearest-neighbour vote (cosine) of test embeddings among train ones;
* ``symmetry_cosine``: mean cosine similarity between a test INR's embedding and that of an
  exactly equivalent copy (same function); 1.0 means the model learned the SIREN symmetries --
  or that all embeddings collapsed together, hence also
* ``symmetry_top1``: how often that equivalent copy is the nearest (cosine) of the copies of
  *all* test INRs, i.e. the embedding both ignores the symmetry and tells INRs apart.

and a t-SNE plot of every model's test embeddings, coloured by label, goes to ``OUT/tsne.png``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import augment
from .harness import (DEFAULT_MODELS, MODEL_HELP, ModelConfig, Splits, StandaloneError, TrainConfig, build_model,
                      count_params, load_splits, parse_models, predict, recorded, train_model,
                      write_results)
from metaopt.weight_space import WeightSpace
from tasks.weight_data import WeightDataset

__all__ = ["nt_xent", "Views", "linear_probe", "knn_accuracy", "symmetry_top1", "run_embed"]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's normalized-temperature cross-entropy: each view must pick its partner among the 2B-1 others."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


class Views:
    """Random views of a batch: exact SIREN symmetries applied in raw weight units (where they are
    exact), then normalization, then Gaussian noise of ``noise`` (in normalized units)."""

    def __init__(self, splits: Splits, w0: float, noise: float = 0.05, max_shift: int = 2):
        self.norm, self.w0, self.noise, self.max_shift = splits.normalizer, w0, noise, max_shift

    def exact(self, ws: WeightSpace, g: torch.Generator) -> WeightSpace:
        return self.norm(augment.siren_symmetry(self.norm.inverse(ws), self.w0, g, self.max_shift))

    def __call__(self, ws: WeightSpace, g: torch.Generator) -> WeightSpace:
        return augment.gaussian_noise(self.exact(ws, g), self.noise, g)


class _WithProjection(nn.Module):
    """Encoder plus SimCLR's projection head; the loss sees the projection, evaluation the encoder."""

    def __init__(self, encoder: nn.Module, dim: int, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, ws: WeightSpace) -> Tensor:
        return self.projection(self.encoder(ws))


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Test accuracy of a logistic regression fitted on standardized train embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_x.cpu().double().numpy(), train_y.cpu().numpy())
    return float(clf.score(test_x.cpu().double().numpy(), test_y.cpu().numpy()))


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 5) -> float:
    """Majority vote of the ``k`` most cosine-similar train embeddings."""
    sim = F.normalize(test_x.float(), dim=-1) @ F.normalize(train_x.float(), dim=-1).t()
    nearest = sim.topk(min(k, train_x.shape[0]), dim=-1).indices
    votes = train_y.to(nearest.device)[nearest]
    pred = torch.mode(votes, dim=-1).values
    return (pred.cpu() == test_y.cpu()).float().mean().item()


def symmetry_top1(embeddings: Tensor, copies: Tensor) -> float:
    """Fraction of rows whose own copy is the most cosine-similar row of ``copies``."""
    sim = F.normalize(embeddings.float(), dim=-1) @ F.normalize(copies.float(), dim=-1).t()
    return (sim.argmax(-1).cpu() == torch.arange(len(sim))).float().mean().item()


def _tsne_plot(embeddings: dict[str, Tensor], labels: Tensor, path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (name, x) in zip(axes[0], embeddings.items()):
        x = x.cpu().double().numpy()
        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        pts = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        ax.scatter(pts[:, 0], pts[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_embed(data: str | Path | WeightDataset, out: str | Path, models: Sequence[str] = DEFAULT_MODELS,
              model_cfg: ModelConfig = ModelConfig(), train_cfg: TrainConfig = TrainConfig(), dim: int = 32,
              temperature: float = 0.1, noise: float = 0.05, w0: float | None = None, label: str = "label",
              plot: bool = True, command: str = "") -> list[dict]:
    """Train every model contrastively on the train split and evaluate its embeddings (module docstring)."""
    models = parse_models(models)
    if "probe" in models:
        raise StandaloneError("model 'probe' sees only the function, which every view of a network here keeps, "
                              "so contrasting views cannot train it; choose another model")
    device = torch.device(train_cfg.device)
    splits = load_splits(data, [label], device)
    if any(layer.kernel for layer in splits.spec.layers):
        raise StandaloneError(f"embed uses SIREN symmetries; the dataset holds convolutional networks [{splits.spec}]")
    w0 = float(w0 or recorded(splits, "w0") or 30.0)  # the bias shifts are exact only for the right w0
    views = Views(splits, w0, noise)
    labels = {s: splits.meta[s][label].long() for s in ("train", "val", "test")}
    rows, embeddings = [], {}
    for name in models:
        torch.manual_seed(train_cfg.seed)
        model = _WithProjection(build_model(name, splits.spec, dim, model_cfg, normalizer=splits.normalizer), dim,
                                 model_cfg.head_hidden).to(device)
        g_val = torch.Generator()

        def loss_fn(m, batch, idx, g=torch.Generator().manual_seed(train_cfg.seed + 1)):
            if batch.batch_size < 2:
                return m(batch).sum() * 0.0  # a lone leftover network has no negatives
            return nt_xent(m(views(batch, g)), m(views(batch, g)), temperature)

        def val_score(m):
            g_val.manual_seed(train_cfg.seed + 2)  # the same val views every epoch
            z1 = predict(m, views(splits.val, g_val), train_cfg.eval_batch_size)
            z2 = predict(m, views(splits.val, g_val), train_cfg.eval_batch_size)
            return -nt_xent(z1, z2, temperature).item()

        summary = train_model(model, splits.train, loss_fn, val_score,
                              TrainConfig(**{**asdict(train_cfg), "augment": False}), name=f"embed/{name}",
                              logdir=Path(out) / "tb" / name)
        enc = model.encoder
        e_train = predict(enc, splits.train, train_cfg.eval_batch_size)
        e_test = predict(enc, splits.test, train_cfg.eval_batch_size)
        e_sym = predict(enc, views.exact(splits.test, torch.Generator().manual_seed(train_cfg.seed + 3)),
                        train_cfg.eval_batch_size)
        embeddings[name] = e_test
        rows.append({"model": name,
                     "test_linear_probe_accuracy": linear_probe(e_train, labels["train"], e_test, labels["test"]),
                     "test_knn_accuracy": knn_accuracy(e_train, labels["train"], e_test, labels["test"]),
                     "test_symmetry_cosine": F.cosine_similarity(e_test, e_sym, dim=-1).mean().item(),
                     "test_symmetry_top1": symmetry_top1(e_test, e_sym),
                     "val_nt_xent": -summary["best_val_score"], "params": count_params(model),
                     "best_epoch": summary["best_epoch"], "train_seconds": summary["train_seconds"],
                     "description": MODEL_HELP[name], "history": summary["history"]})
    # reference: the same probes on the raw (normalized, flattened) weights, no training at all
    raw_train, raw_test = splits.train.flatten().flatten(1), splits.test.flatten().flatten(1)
    reference = {"raw_weights_linear_probe_accuracy": linear_probe(raw_train, labels["train"], raw_test,
                                                                   labels["test"]),
                 "raw_weights_knn_accuracy": knn_accuracy(raw_train, labels["train"], raw_test, labels["test"])}
    notes = [f"Reference (probes on the raw weight vector, nothing trained): {json.dumps(reference)}"]
    if plot:
        _tsne_plot(embeddings, labels["test"], Path(out) / "tsne.png", train_cfg.seed)
        notes.append("t-SNE of the test embeddings, coloured by label: tsne.png")
    header = {"data": str(data) if not isinstance(data, WeightDataset) else "(in memory)",
              "architecture": str(splits.spec), "sizes": splits.sizes(), "label (evaluation only)": label,
              "command": command, "embedding_dim": dim, "temperature": temperature, "noise": noise, "w0": w0,
              "model_config": asdict(model_cfg),
              "train_config": {k: v for k, v in asdict(train_cfg).items() if k not in ("progress", "augment")},
              "reference": reference}
    write_results(out, "embed", rows, ["model", "test_linear_probe_accuracy", "test_knn_accuracy",
                                       "test_symmetry_cosine", "test_symmetry_top1", "val_nt_xent", "params",
                                       "best_epoch", "train_seconds"], header, notes)
    return rows
