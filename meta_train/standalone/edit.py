"""INR editing: map a SIREN's weights to the weights of a SIREN of the *dilated* image.

The editor is equivariant (weight space in, weight space out, hidden permutations commute with
it) and residual: ``edited = weights + editor(weights)``, with the editor's last layer zeroed so
training starts from the unedited INR. The loss renders the edited SIREN on the pixel grid and
compares it with the target, the grey-scale dilation (3x3 max filter) of the *rendered input INR*
-- so no image dataset is needed, only the INRs. Headline: test MSE per pixel; the unedited INR's
MSE against the same target is the reference. ``OUT/edits.png`` shows inputs, targets and edits.

Peers: nfn's NPLinear equivariant stack, and a flat MLP that outputs the whole weight vector.
(StatNN and DeepSets only produce invariant features, so they cannot edit.)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .harness import (MODEL_HELP, ModelConfig, Splits, StandaloneError, TrainConfig, count_params, from_nfn,
                      load_splits, nfn_network_spec, parse_models, recorded, take, to_nfn, train_model,
                      write_results)
from metaopt.models import NFN, DWSNet, FlatMLP
from metaopt.weight_space import WeightSpace, WeightSpaceSpec
from tasks.inr import grid
from tasks.weight_data import WeightDataset

__all__ = ["EDITORS", "render", "dilate", "build_editor", "NFNEditor", "ResidualEditor", "run_edit"]

EDITORS = ("ours", "ours_np", "nfn", "flat")


def render(ws: WeightSpace, coords: Tensor, w0: float) -> Tensor:
    """SIRENs (one channel; hidden layers ``sin(w0 (W h + b))``, last layer linear) on ``coords``
    ``[N, d]``, plus 0.5 as in :mod:`tasks.inr`: ``[B, N]``. Differentiable in the weights."""
    h = coords.to(ws.weights[0]).expand(ws.batch_size, *coords.shape)
    for i, (w, b) in enumerate(ws):
        h = torch.baddbmm(b[:, 0, None, :], h, w[:, 0].transpose(1, 2))
        if i < len(ws) - 1:
            h = torch.sin(w0 * h)
    return h[..., 0] + 0.5


def dilate(images: Tensor, kernel: int = 3) -> Tensor:
    """Grey-scale dilation (a ``kernel`` x ``kernel`` max filter) of ``[B, H, W]`` images."""
    return F.max_pool2d(images[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]


class NFNEditor(nn.Module):
    """nfn 0.1.2's equivariant stack: NPLinear(io_embed) layers with ReLU between, one output channel,
    on MLPs and CNNs (in :func:`.harness.to_nfn`'s layout)."""

    def __init__(self, spec: WeightSpaceSpec, hidden_channels: int, num_layers: int):
        super().__init__()
        try:
            from nfn.layers import NPLinear, TupleOp
        except ImportError as e:
            raise StandaloneError("model 'nfn' needs the nfn package: pip install nfn==0.1.2 einops") from e
        nspec = nfn_network_spec(spec)
        widths = [1] + [hidden_channels] * (num_layers - 1) + [1]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [NPLinear(nspec, a, b, io_embed=True), TupleOp(nn.ReLU())]
        self.net = nn.Sequential(*layers[:-1])
        self.spec = spec

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return from_nfn(self.net(to_nfn(ws)), self.spec)


class _FlatEditor(nn.Module):
    def __init__(self, spec: WeightSpaceSpec, hidden: int):
        super().__init__()
        total = sum(l.n_out * l.n_in * l.kernel_size + l.n_out for l in spec.layers)
        self.mlp = FlatMLP(spec, 1, total, hidden=hidden, depth=3)
        self.spec = spec

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return WeightSpace.from_flat(self.mlp(ws)[:, None], self.spec)


def build_editor(name: str, spec: WeightSpaceSpec, cfg: ModelConfig = ModelConfig()) -> nn.Module:
    """A weight-space -> weight-space model whose output starts at exactly zero."""
    if name not in EDITORS:
        raise StandaloneError(f"model {name!r} cannot edit (it is not weight-space -> weight-space); "
                              f"choose from {', '.join(EDITORS)}")
    if name == "ours":
        model = DWSNet(spec, 1, 1, cfg.hidden_channels, cfg.num_layers)
    elif name == "ours_np":
        model = NFN(spec, 1, 1, cfg.hidden_channels, cfg.num_layers)
    elif name == "nfn":
        model = NFNEditor(spec, cfg.hidden_channels, cfg.num_layers)
    else:
        model = _FlatEditor(spec, cfg.head_hidden)
    last = {"ours": lambda m: m[-1], "ours_np": lambda m: m[-1], "nfn": lambda m: m.net[-1],
            "flat": lambda m: m.mlp.net[-1]}[name](model)
    with torch.no_grad():
        for p in last.parameters():
            p.zero_()
    return model


class ResidualEditor(nn.Module):
    """``raw + scale * editor(normalized) * std``: the edit in raw weight units, for rendering.

    Why the learned per-tensor ``scale`` (starting at ``init_scale``): a SIREN's output turns to
    noise when its first-layer weights move by a few percent of their std (they are multiplied by
    w0 = 30 inside a sine), so unscaled edits would start far outside the useful range.
    """

    def __init__(self, editor: nn.Module, splits: Splits, init_scale: float = 0.01):
        super().__init__()
        self.editor, self.norm = editor, splits.normalizer
        self.scale = nn.Parameter(torch.full((2 * splits.spec.num_layers,), float(init_scale)))

    def forward(self, ws: WeightSpace) -> WeightSpace:
        delta = self.editor(ws)
        stds, scale = self.norm.stds, self.scale
        raw = self.norm.inverse(ws)
        return WeightSpace(
            [w + d * (scale[2 * i] * stds[2 * i]) for i, (w, d) in enumerate(zip(raw.weights, delta.weights))],
            [b + d * (scale[2 * i + 1] * stds[2 * i + 1]) for i, (b, d) in enumerate(zip(raw.biases, delta.biases))],
            ws.spec)


def _plot(inputs: Tensor, targets: Tensor, edits: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("input INR", inputs), ("target (dilated)", targets)] + [(k, v) for k, v in edits.items()]
    n = inputs.shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n), squeeze=False)
    for j, (title, imgs) in enumerate(cols):
        for i in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[i].clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_edit(data: str | Path | WeightDataset, out: str | Path, models: Sequence[str] = ("ours", "nfn", "flat"),
             model_cfg: ModelConfig = ModelConfig(), train_cfg: TrainConfig = TrainConfig(), size: int | None = None,
             w0: float | None = None, kernel: int = 3, plot: bool = True, command: str = "", init_scale: float = 0.01
             ) -> list[dict]:
    """Train every editor on the train split (dilation targets), score test MSE, plot a few edits."""
    models = parse_models(models)
    for m in models:
        if m not in EDITORS:
            raise StandaloneError(f"model {m!r} cannot edit; choose from {', '.join(EDITORS)}")
    device = torch.device(train_cfg.device)
    splits = load_splits(data, [], device)
    spec = splits.spec
    if spec.layers[0].n_in != 2 or spec.layers[-1].n_out != 1 or any(l.kernel for l in spec.layers):
        raise StandaloneError(f"edit needs 2-D image SIRENs (2 inputs, 1 output, Linear layers); got [{spec}]")
    size = int(size or recorded(splits, "image_size") or 0)
    if not size:
        raise StandaloneError("the dataset does not record its image size; pass --size (e.g. 28 for Fashion-MNIST)")
    w0 = float(w0 or recorded(splits, "w0") or 30.0)
    coords = grid((size, size))[1].to(device)

    def images(ws: WeightSpace) -> Tensor:
        return render(splits.normalizer.inverse(ws), coords, w0).view(-1, size, size)

    with torch.no_grad():
        inputs = {s: images(getattr(splits, s)) for s in ("train", "val", "test")}
    targets = {s: dilate(x, kernel) for s, x in inputs.items()}
    rows, edits = [], {}
    for name in models:
        torch.manual_seed(train_cfg.seed)
        model = ResidualEditor(build_editor(name, spec, model_cfg), splits, init_scale).to(device)

        def mse(m, ws, target):
            return (render(m(ws), coords, w0).view_as(target) - target).square().mean()

        def loss_fn(m, batch, idx):
            # batch is permuted (augmentation) but the rendered target is the same image: permutations keep it
            return mse(m, batch, targets["train"][idx.to(device)])

        def val_score(m):
            return -_split_mse(m, splits.val, targets["val"], coords, w0, train_cfg.eval_batch_size)

        summary = train_model(model, splits.train, loss_fn, val_score, train_cfg, name=f"edit/{name}",
                              logdir=Path(out) / "tb" / name)
        test_mse = _split_mse(model, splits.test, targets["test"], coords, w0, train_cfg.eval_batch_size)
        with torch.no_grad():
            edits[name] = render(model(take(splits.test, torch.arange(min(6, splits.test.batch_size)))), coords,
                                 w0).view(-1, size, size)
        rows.append({"model": name, "test_mse": test_mse, "val_mse": -summary["best_val_score"],
                     "params": count_params(model), "best_epoch": summary["best_epoch"],
                     "train_seconds": summary["train_seconds"], "description": MODEL_HELP[name],
                     "history": summary["history"]})
    reference = {"unedited_mse": (inputs["test"] - targets["test"]).square().mean().item()}
    notes = [f"Reference (the input INR, unedited, against the dilated target): {json.dumps(reference)}"]
    if plot:
        k = edits[models[0]].shape[0]
        _plot(inputs["test"][:k], targets["test"][:k], edits, Path(out) / "edits.png")
        notes.append("Inputs, targets and every model's edits of the first test INRs: edits.png")
    header = {"data": str(data) if not isinstance(data, WeightDataset) else "(in memory)",
              "architecture": str(spec), "sizes": splits.sizes(), "image_size": size, "w0": w0,
              "dilation_kernel": kernel, "edit_scale_init": init_scale, "command": command,
              "model_config": asdict(model_cfg),
              "train_config": {k: v for k, v in asdict(train_cfg).items() if k != "progress"},
              "reference": reference}
    write_results(out, "edit", rows, ["model", "test_mse", "val_mse", "params", "best_epoch", "train_seconds"],
                  header, notes)
    return rows


@torch.no_grad()
def _split_mse(model: nn.Module, ws: WeightSpace, target: Tensor, coords: Tensor, w0: float, batch: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, ws.batch_size, batch):
        idx = torch.arange(i, min(i + batch, ws.batch_size))
        out = render(model(take(ws, idx)), coords, w0)
        total += (out.view_as(target[idx]) - target[idx.to(target.device)]).square().sum().item()
    return total / target.numel()
