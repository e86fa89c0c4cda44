"""Domain adaptation: map a classifier's weights to weights for a shifted input distribution.

The input is a classifier from a zoo (``python -m tasks make-data zoo`` or ``make-small-data
cnn-zoo``) trained on a *source* domain (upright images); the target domain is the same images
under a fixed ``--shift`` (default ``rot90``: every image rotated by 90 degrees). The editor is an
equivariant weight-space map used residually, as in :mod:`.edit`: ``adapted = weights +
editor(weights)`` with the editor's last layer zeroed, so training starts at the unadapted
network. The loss is the cross-entropy of the *adapted classifier* on target-domain images from
the training part of the image dataset, run for a whole batch of networks at once (the zoo's own
batched functional forward, :meth:`tasks.base.Network.forward`); nothing else is supervised.

By default that cross-entropy is *temperature-matched* (:func:`matched_logits`): each adapted
network's logits are rescaled to the spread of the unadapted network's logits on the same images.
Why: with plain cross-entropy (``--loss ce``) every editor we tried learned within a few steps to
shrink the classifiers' logits, which makes every network output the uniform distribution (loss
log 10, below that of a confidently wrong network) and then stays there, since a network with no
logits passes back no gradient. Accuracy, the headline, does not depend on a network's
temperature, so the matched loss scores what matters and leaves no reward for that collapse.

Headline: target-domain accuracy of the adapted *test networks* (the zoo's test split) on the test
part of the image dataset, mean over networks. The same table holds the references: the
unadapted networks on the target and on the source domain, and each network fine-tuned with Adam
for ``--finetune-steps`` steps on target images. ``OUT/adapt.png`` plots every test network's
target accuracy before and after adaptation.

Why the default shift is learnable by a weight map at all: rotating a CNN's conv kernels by 90
degrees and permuting its last layer's spatial positions gives exactly the network of rotated
inputs (3x3 convs with padding 1, 2x2 pooling on even sizes). That map acts on kernel positions,
which every equivariant editor here treats as channels, so it is in their reach; finding it from
the loss alone is the task.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .edit import EDITORS, ResidualEditor, build_editor
from .harness import (MODEL_HELP, ModelConfig, Splits, StandaloneError, TrainConfig, count_params, load_splits,
                      parse_models, recorded, recorded_network, take, train_model, write_results)
from metaopt.weight_space import WeightSpace
from tasks.base import Network, Params
from tasks.classify import NUM_CLASSES
from tasks.data import FASHION_MNIST_DIR, load_images
from tasks.make_data import evaluate_classifiers
from tasks.weight_data import WeightDataset

__all__ = ["SHIFTS", "LOSSES", "parse_shift", "source_classifier", "classifier_params", "matched_logits",
           "TargetImages", "load_target_images", "accuracy", "finetune", "run_adapt"]

SHIFTS = "rot90, rot180, hflip, invert, rotate:DEG (e.g. rotate:45), noise:STD (e.g. noise:0.3)"
LOSSES = ("matched", "ce")
EVAL_FLOATS = 2 ** 23  # activations per evaluation chunk (networks x images x channels x pixels)


# --------------------------------------------------------------------------- the shift
def _rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate ``[n, H, W]`` images about their centre (bilinear, zeros outside)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(len(images), 2, 3), [len(images), 1, *images.shape[-2:]], align_corners=False)
    return F.grid_sample(images[:, None], grid, align_corners=False)[:, 0]


def parse_shift(text: str) -> Callable[[Tensor, int], Tensor]:
    """The target domain as a map ``(images [n, H, W] in [0, 1], seed) -> shifted images``.

    ``seed`` only matters for ``noise``: the noise of an image is fixed (one draw per split), so the
    target domain is a fixed corruption, not fresh noise at every step.
    """
    fixed = {"rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)), "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
             "hflip": lambda x: x.flip(-1), "invert": lambda x: 1.0 - x}
    if text in fixed:
        return lambda x, seed: fixed[text](x)
    match = re.fullmatch(r"(rotate|noise):([-+]?[0-9]*\.?[0-9]+)", text)
    if match is None:
        raise StandaloneError(f"unknown shift {text!r}; choose from {SHIFTS}")
    value = float(match.group(2))
    if match.group(1) == "rotate":
        return lambda x, seed: _rotate(x, value)
    if value <= 0:
        raise StandaloneError(f"shift noise:STD needs a positive STD, got {text!r}")
    return lambda x, seed: (x + value * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
                            ).clamp(0, 1)


# --------------------------------------------------------------------------- the source classifiers
def source_classifier(splits: Splits) -> tuple[Network, str]:
    """The zoo's classifier architecture (a runnable, batched :class:`tasks.base.Network`) and the
    name of its image dataset, from what the zoo's builder recorded; a clear error for anything else."""
    need = "adapt needs a classifier zoo (python -m tasks make-data zoo, or make-small-data cnn-zoo)"
    try:
        network, dataset = recorded_network(splits)
    except StandaloneError as e:
        raise StandaloneError(f"{need}: {e}") from None
    if dataset is None:
        raise StandaloneError(f"{need}; this dataset holds INRs ({network.name}, built as "
                              f"{recorded(splits, 'builder') or splits.info.get('kind')!r}), not classifiers")
    return network, dataset


def classifier_params(ws: WeightSpace) -> Params:
    """Raw one-channel weights as the stacked parameters ``{name: [P, ...]}`` of :class:`tasks.base.Network`."""
    return dict(ws.to_params())


def matched_logits(logits: Tensor, reference: Tensor) -> Tensor:
    """``logits [P, B, classes]`` centred per example and rescaled, per network, to the root-mean-square
    spread of ``reference`` (the unadapted networks on the same images): a cross-entropy on them does not
    change when a network's logits are scaled, so it cannot be lowered by making the networks unsure."""
    def centred(x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True)

    def spread(x: Tensor) -> Tensor:
        return x.square().mean(dim=(1, 2), keepdim=True).sqrt()

    c = centred(logits)
    return c * (spread(centred(reference)) / spread(c).clamp_min(1e-8))


def _chunk(network: Network, images: Tensor, per_image: int = 500) -> int:
    """Networks per evaluation chunk, so a chunk's activations stay near :data:`EVAL_FLOATS`."""
    widest = max(p.shape[0] for p in network.template.parameters())
    return max(1, EVAL_FLOATS // (per_image * widest * images[0].numel()))


@torch.no_grad()
def accuracy(network: Network, params: Params, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Accuracy and mean cross-entropy ``[P]`` of every network on all ``images [n, 1, H, W]``."""
    P, step = network.check(params), _chunk(network, images)
    idx = torch.arange(len(labels), device=labels.device)
    parts = [evaluate_classifiers(network, {k: v[a:a + step] for k, v in params.items()}, images, labels, idx)
             for a in range(0, P, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --------------------------------------------------------------------------- the images
@dataclass
class TargetImages:
    """Target-domain images ``[n, 1, H, W]`` and labels per part, plus the unshifted test images."""

    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    test: Tensor
    test_labels: Tensor
    source_test: Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}


def load_target_images(dataset: str, shift: Callable[[Tensor, int], Tensor], val_images: int | None = None,
                       test_images: int | None = None, images_dir: str = FASHION_MNIST_DIR,
                       device: str | torch.device = "cpu") -> TargetImages:
    """Training-part images (the last ``val_images`` of them held out for validation; default 10%, at most
    5000, which for Fashion-MNIST is its usual 55000..59999 validation slice) and the first ``test_images``
    of the test part, all shifted; nothing downloads."""
    x, y = load_images(dataset, "train", None, images_dir)
    tx, ty = load_images(dataset, "test", test_images, images_dir)
    n_val = min(5000, len(y) // 10) if val_images is None else val_images
    if not 0 < n_val < len(y):
        raise StandaloneError(f"--val-images must be between 1 and {len(y) - 1} for {dataset}, got {n_val}")

    def prep(images: Tensor, seed: int) -> Tensor:
        return shift(images, seed)[:, None].contiguous().to(device)

    return TargetImages(prep(x[:-n_val], 0), y[:-n_val].to(device), prep(x[-n_val:], 1), y[-n_val:].to(device),
                        prep(tx, 2), ty.to(device), tx[:, None].to(device))


# --------------------------------------------------------------------------- references
def finetune(network: Network, ws: WeightSpace, images: Tensor, labels: Tensor, steps: int, lr: float,
             batch_size: int, seed: int) -> Params:
    """Each network trained alone with Adam for ``steps`` steps on ``images`` (stacked, all at once:
    Adam is elementwise and the summed loss gives every network its own gradient)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in classifier_params(ws).items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    P = ws.batch_size
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=gen).to(labels.device)
        logits = network.forward(params, images[idx].expand(P, *images[idx].shape))
        loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].repeat(P), reduction="sum") / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


# --------------------------------------------------------------------------- the task
@torch.no_grad()
def _adapted(model: nn.Module, ws: WeightSpace, batch: int) -> Params:
    """The adapted raw weights of every network of (normalized) ``ws``, as classifier parameters."""
    model.eval()
    parts = [classifier_params(model(take(ws, torch.arange(a, min(a + batch, ws.batch_size)))))
             for a in range(0, ws.batch_size, batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _group_table(groups: Tensor, accuracies: dict[str, Tensor]) -> list[str]:
    """Markdown rows: one per model, the mean of its per-network accuracies within each value of ``groups``."""
    values = groups.unique().tolist()
    lines = ["| model | " + " | ".join(f"{v:g}" for v in values) + " |", "|---|" + "---|" * len(values)]
    for name, acc in accuracies.items():
        means = [acc[(groups == v).to(acc.device)].mean().item() for v in values]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return lines


def _plot(before: Tensor, after: dict[str, Tensor], source: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, acc in after.items():
        left.scatter(before.cpu().numpy(), acc.cpu().numpy(), s=12, alpha=0.7, label=name)
    top = max(1.0 / NUM_CLASSES, *(float(a.max()) for a in after.values()), float(before.max()))
    left.plot([0, top], [0, top], "k--", lw=0.8, label="unchanged")
    left.set_xlabel("target accuracy, unadapted")
    left.set_ylabel("target accuracy, adapted")
    left.set_title("test networks, one dot each")
    left.legend(fontsize=7)
    names = ["unadapted"] + list(after)
    means = [float(before.mean())] + [float(a.mean()) for a in after.values()]
    right.bar(range(len(names)), means, color=["grey"] + [f"C{i}" for i in range(len(after))])
    right.axhline(source, color="k", ls="--", lw=0.8, label="unadapted on the source domain")
    right.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    right.set_ylabel("mean target accuracy")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_adapt(data: str | Path | WeightDataset, out: str | Path, models: Sequence[str] = EDITORS,
              model_cfg: ModelConfig = ModelConfig(), train_cfg: TrainConfig = TrainConfig(), shift: str = "rot90",
              image_batch: int = 128, loss: str = "matched", finetune_steps: int = 10, finetune_lr: float = 1e-2,
              val_images: int | None = None, test_images: int | None = None, images_dir: str = FASHION_MNIST_DIR,
              init_scale: float = 1.0, group_by: str | None = "epoch", plot: bool = True, command: str = ""
              ) -> list[dict]:
    """Train every editor to adapt the zoo's training networks to the shifted domain; score the test networks.

    ``group_by`` (a metadata column, e.g. the zoo's checkpoint ``epoch``) adds a table of mean target accuracy
    per group: it shows whether an editor adapts its input (weak inputs stay weak, strong ones recover) or
    replaces every input with one generic classifier of the target domain (the same accuracy for all groups).
    """
    models = parse_models(models)
    for m in models:
        if m not in EDITORS:
            raise StandaloneError(f"model {m!r} cannot adapt (it is not weight-space -> weight-space); "
                                  f"choose from {', '.join(EDITORS)}")
    if image_batch < 1 or finetune_steps < 0:
        raise StandaloneError(f"image batch must be >= 1 and fine-tune steps >= 0, got {image_batch}, {finetune_steps}")
    if loss not in LOSSES:
        raise StandaloneError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    shift_fn = parse_shift(shift)
    device = torch.device(train_cfg.device)
    splits = load_splits(data, [], device)
    network, dataset = source_classifier(splits)
    if group_by and group_by not in splits.meta["test"]:
        raise StandaloneError(f"no metadata column {group_by!r} to group by; the zoo has {sorted(splits.meta['test'])}")
    network.template.to(device)
    images = load_target_images(dataset, shift_fn, val_images, test_images, images_dir, device)
    raw_test = splits.normalizer.inverse(splits.test)
    unadapted_test = classifier_params(raw_test)
    before, before_loss = accuracy(network, unadapted_test, images.test, images.test_labels)
    source = accuracy(network, unadapted_test, images.source_test, images.test_labels)[0]

    def row(name: str, weights: Params, **extra) -> tuple[dict, Tensor]:
        acc, target_loss = accuracy(network, weights, images.test, images.test_labels)
        source_acc = accuracy(network, weights, images.source_test, images.test_labels)[0]
        return {"model": name, "test_target_accuracy": acc.mean().item(), "test_gain": (acc - before).mean().item(),
                "test_improved_fraction": (acc > before).float().mean().item(),
                "test_source_accuracy": source_acc.mean().item(), "test_target_loss": target_loss.mean().item(),
                **extra, "per_network_target_accuracy": acc}, acc

    rows, after = [], {}
    for name in models:
        torch.manual_seed(train_cfg.seed)
        model = ResidualEditor(build_editor(name, splits.spec, model_cfg), splits, init_scale).to(device)
        image_gen = torch.Generator().manual_seed(train_cfg.seed)  # every model sees the same image batches

        def loss_fn(m, batch, idx):
            pick = torch.randint(len(images.train_labels), (image_batch,), generator=image_gen).to(device)
            x, y = images.train[pick], images.train_labels[pick]
            x = x.expand(batch.batch_size, *x.shape)
            logits = network.forward(classifier_params(m(batch)), x)
            if loss == "matched":
                with torch.no_grad():
                    unadapted = network.forward(classifier_params(splits.normalizer.inverse(batch)), x)
                logits = matched_logits(logits, unadapted)
            return F.cross_entropy(logits.flatten(0, 1), y.repeat(batch.batch_size))

        def val_score(m):
            return accuracy(network, _adapted(m, splits.val, train_cfg.eval_batch_size), images.val,
                            images.val_labels)[0].mean().item()

        summary = train_model(model, splits.train, loss_fn, val_score, train_cfg, name=f"adapt/{name}",
                              logdir=Path(out) / "tb" / name)
        r, after[name] = row(name, _adapted(model, splits.test, train_cfg.eval_batch_size),
                             val_target_accuracy=summary["best_val_score"], params=count_params(model),
                             best_epoch=summary["best_epoch"], train_seconds=summary["train_seconds"],
                             kind="model", description=MODEL_HELP[name], history=summary["history"])
        rows.append(r)
    references = [row("unadapted", unadapted_test, kind="reference",
                      description="the input networks, unchanged")[0]]
    if finetune_steps:
        tuned = finetune(network, raw_test, images.train, images.train_labels,
                         finetune_steps, finetune_lr, image_batch, train_cfg.seed)
        r, after[f"fine-tune {finetune_steps}"] = row(f"fine-tune {finetune_steps} steps", tuned, kind="reference",
                                                      description=f"each test network trained alone with Adam "
                                                                  f"(lr {finetune_lr}, {image_batch} target images "
                                                                  f"a step)")
        references.append(r)
    reference = {"unadapted_target_accuracy": before.mean().item(), "unadapted_source_accuracy": source.mean().item(),
                 "unadapted_target_loss": before_loss.mean().item(), "chance": 1.0 / NUM_CLASSES}
    notes = [f"Reference rows: `unadapted` is the input networks (target accuracy "
             f"{reference['unadapted_target_accuracy']:.4f}, source accuracy "
             f"{reference['unadapted_source_accuracy']:.4f}); `fine-tune` trains each test network "
             "alone on target images. test_gain: mean over test networks of adapted minus unadapted target "
             "accuracy; test_improved_fraction: networks whose target accuracy rose; test_source_accuracy: "
             "the same networks on the unshifted test images."]
    if group_by:
        notes += ["", f"Mean accuracy of the test networks by `{group_by}` (target domain, unless it says source):",
                  ""] + _group_table(splits.meta["test"][group_by], {"unadapted (source)": source,
                                                                      "unadapted (target)": before, **after})
    if plot:
        _plot(before, after, reference["unadapted_source_accuracy"], Path(out) / "adapt.png")
        notes.append("Per-network target accuracy before vs after adaptation: adapt.png")
    header = {"data": str(data) if not isinstance(data, WeightDataset) else "(in memory)",
              "architecture": str(splits.spec), "classifier": network.name, "image_dataset": dataset, "shift": shift,
              "sizes": splits.sizes(), "images": images.sizes(), "image_batch": image_batch, "loss": loss,
              "edit_scale_init": init_scale, "finetune": {"steps": finetune_steps, "lr": finetune_lr},
              "command": command, "model_config": asdict(model_cfg),
              "train_config": {k: v for k, v in asdict(train_cfg).items() if k != "progress"},
              "reference": reference}
    rows += references
    write_results(out, "adapt", rows, ["model", "test_target_accuracy", "test_gain", "test_improved_fraction",
                                       "test_source_accuracy", "val_target_accuracy", "params",
                                       "best_epoch", "train_seconds"], header, notes)
    return rows
