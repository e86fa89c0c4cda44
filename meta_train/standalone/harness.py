"""What every standalone weight-space task shares: data loading, normalization, the model zoo
(ours and the peers), one training loop, and the results table.

A task (``classify.py``, ``regress.py``, ...) only says what to predict and how to score it;
this module trains *every* requested model on the same splits, with the same batches, the same
augmentations and the same number of steps, so the table compares architectures and nothing else.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from metaopt.layers import FourierFeatures
from metaopt.models import DeepSets, FlatMLP, InvariantDWSNet, InvariantGMN, InvariantNFN, ProbeNet, StatNN
from metaopt.optim.checkpoint import atomic_write
from metaopt.weight_space import WeightSpace, WeightSpaceSpec, spec_from_module
from tasks.base import Network
from tasks.classify import NUM_CLASSES, cnn
from tasks.inr import siren
from tasks.make_data import IMAGE_SIZES, network_for
from tasks.weight_data import WeightDataset

from .augment import canonical_signs, draws_images, image_warp, permute, sign_flip

__all__ = ["MODELS", "DEFAULT_MODELS", "ModelConfig", "TrainConfig", "Normalizer", "Splits", "load_splits",
           "build_model", "NFNInvariant", "to_nfn", "from_nfn", "nfn_network_spec", "train_model", "predict",
           "count_params", "write_results", "parse_models", "StandaloneError", "recorded_network", "Probing",
           "probing"]


class StandaloneError(ValueError):
    """Bad input to a standalone task: unknown model, missing metadata column, empty split, ..."""


# --------------------------------------------------------------------------- data
class Normalizer:
    """Per-tensor mean and std of the *training* networks (one scalar each per weight/bias tensor).

    Why per tensor: SIREN first-layer weights and later weights differ in scale by ~w0, so one
    global scale would drown the small ones. Why scalars: a scalar per tensor commutes with every
    hidden permutation, so normalizing keeps the invariance the models are built on.
    """

    def __init__(self, means: Sequence[float], stds: Sequence[float]):
        self.means, self.stds = list(means), list(stds)

    @classmethod
    def fit(cls, data: WeightDataset | WeightSpace) -> "Normalizer":
        means, stds = [], []
        for t in (t for pair in zip(data.weights, data.biases) for t in pair):
            t = t.double()
            std = t.std().item() if t.numel() > 1 else 0.0
            means.append(t.mean().item())
            stds.append(std if std > 1e-12 else 1.0)  # constant tensors (absent biases) pass through centred
        return cls(means, stds)

    def _per_tensor(self, ws: WeightSpace, f: Callable[[Tensor, float, float], Tensor]) -> WeightSpace:
        """``f(tensor, its mean, its std)`` on every weight and bias tensor (stored in that order)."""
        w = [f(t, self.means[2 * i], self.stds[2 * i]) for i, t in enumerate(ws.weights)]
        b = [f(t, self.means[2 * i + 1], self.stds[2 * i + 1]) for i, t in enumerate(ws.biases)]
        return WeightSpace(w, b, ws.spec)

    def __call__(self, ws: WeightSpace) -> WeightSpace:
        if 2 * len(ws) != len(self.means):
            raise StandaloneError(f"normalizer fitted on {len(self.means) // 2} layers, weight space has {len(ws)}")
        return self._per_tensor(ws, lambda t, mean, std: (t - mean) / std)

    def uncentred(self, ws: WeightSpace) -> WeightSpace:
        """Raw weights over the stds, not centred: a sign flip of a neuron stays an exact sign flip."""
        return self._per_tensor(ws, lambda t, mean, std: t + mean / std)

    def inverse(self, ws: WeightSpace) -> WeightSpace:
        """Back to raw weights, e.g. to apply an augmentation that is exact only in raw units."""
        return self._per_tensor(ws, lambda t, mean, std: t * std + mean)

    def to_json(self) -> dict:
        return {"means": self.means, "stds": self.stds}


class RawWeights(nn.Module):
    """Undoes a :class:`Normalizer` in front of a model that runs the networks (the probe model),
    since the splits hold normalized weights."""

    def __init__(self, normalizer: Normalizer):
        super().__init__()
        self.normalizer = normalizer

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return self.normalizer.inverse(ws)


class UncentredWeights(RawWeights):
    """Puts the means a :class:`Normalizer` subtracted back (keeping its scales), in front of a
    model that is exactly invariant to sign flips, which centring would break."""

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return self.normalizer.uncentred(ws)


@dataclass
class Splits:
    """The train/val/test networks of a dataset, already normalized, as one-channel weight spaces."""

    spec: WeightSpaceSpec
    train: WeightSpace
    val: WeightSpace
    test: WeightSpace
    meta: dict[str, dict[str, Tensor]]  # split -> column -> [n]
    normalizer: Normalizer
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": self.train.batch_size, "val": self.val.batch_size, "test": self.test.batch_size}


def load_splits(data: str | Path | WeightDataset, columns: Sequence[str], device: str | torch.device = "cpu",
                canonical: bool = False) -> Splits:
    """Load a dataset folder (or take a dataset), check it has ``columns`` and three non-empty splits,
    fit the normalizer on train and move everything to ``device``. With ``canonical``, every SIREN
    first gets :func:`.augment.canonical_signs`, and the normalizer is fitted on those weights."""
    ds = data if isinstance(data, WeightDataset) else WeightDataset.load(data)
    missing = [c for c in ("split", *columns) if c not in ds.meta]
    if missing:
        where = "" if isinstance(data, WeightDataset) else f" {data}"
        raise StandaloneError(f"dataset{where} has no metadata column(s) {missing}; it has {sorted(ds.meta)}. "
                              f"Is this the right kind of dataset for this task?")
    parts = {s: ds.split(s) for s in ("train", "val", "test")}
    empty = [s for s, p in parts.items() if len(p) == 0]
    if empty:
        raise StandaloneError(f"split(s) {empty} of the dataset are empty; every task needs train, val and test "
                              f"networks (sizes: { {s: len(p) for s, p in parts.items()} })")
    raw = {s: p.weight_space(device=device, dtype=torch.float32) for s, p in parts.items()}
    if canonical:
        require_siren(ds.info, "canonical signs")
        raw = {s: canonical_signs(ws) for s, ws in raw.items()}
    norm = Normalizer.fit(raw["train"])
    spaces = {s: norm(ws) for s, ws in raw.items()}
    meta = {s: {c: p.meta[c] for c in p.meta} for s, p in parts.items()}
    return Splits(ds.spec, spaces["train"], spaces["val"], spaces["test"], meta, norm, dict(ds.info))


def recorded(splits: Splits | dict, key: str):
    """A setting the dataset's builder recorded in its info (``splits.info``, or that dict itself): at
    the top level (the small builders here) or in ``info["recipe"]`` (``python -m tasks make-data``);
    None when absent."""
    info = splits if isinstance(splits, dict) else splits.info
    recipe = info.get("recipe") if isinstance(info.get("recipe"), dict) else {}
    if key in info:
        return info[key]
    if key == "image_size" and recipe.get("dataset") in IMAGE_SIZES:
        return IMAGE_SIZES[recipe["dataset"]]
    return recipe.get(key)


def recorded_network(splits: Splits) -> tuple[Network, str | None]:
    """The dataset's networks as a runnable, batched :class:`tasks.base.Network`, and the image data set
    they classify (None for INRs), from what the dataset's builder recorded; a clear error otherwise."""
    info, spec = splits.info, splits.spec
    recipe = info.get("recipe") if isinstance(info.get("recipe"), dict) else {}
    builder = recipe.get("builder")
    if builder in ("classifier_zoo", "image_inrs", "sine_inrs"):
        network, dataset = network_for(recipe), recipe["dataset"] if builder == "classifier_zoo" else None
    elif info.get("kind") in ("cnn_zoo", "digits_inrs", "sine_inrs"):  # make-small-data
        if info["kind"] == "cnn_zoo":  # relu CNNs on 8x8 digits
            channels = [l.n_out for l in spec.layers if l.kind == "conv2d"]
            network, dataset = cnn(IMAGE_SIZES["digits"], channels, NUM_CLASSES), "digits"
        else:
            hidden = [l.n_out for l in spec.layers[:-1]]
            network, dataset = siren(spec.layers[0].n_in, hidden, spec.layers[-1].n_out, info.get("w0", 30.0)), None
        if info.get("network", network.name) != network.name:
            raise StandaloneError(f"the dataset records its networks as {info['network']}, but the harness "
                                  f"rebuilds {network.name} from it")
    else:
        what = builder or info.get("kind") or "nothing"
        raise StandaloneError(f"this dataset's builder recorded {what!r}, which names no architecture the harness "
                              f"can run (python -m tasks make-data and make-small-data datasets do)")
    if spec_from_module(network.template) != spec:
        raise StandaloneError(f"the dataset's weights [{spec}] do not fit the recorded network {network.name}")
    return network, dataset


@dataclass
class Probing:
    """What the probe model needs besides the weights: the networks' architecture, the shape and range
    of their inputs (images in [0, 1], INR coordinates in [-1, 1]), and the normalization to undo."""

    network: Network
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
    normalizer: Normalizer


def probing(splits: Splits) -> Probing:
    """The probe model's view of a dataset; a clear error when the dataset records no runnable architecture."""
    network, dataset = recorded_network(splits)
    first = next(m for m in network.template if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Conv2d):
        size = IMAGE_SIZES[dataset]
        return Probing(network, (first.in_channels, size, size), (0.0, 1.0), splits.normalizer)
    return Probing(network, (first.in_features,), (0.0, 1.0) if dataset else (-1.0, 1.0), splits.normalizer)


def take(ws: WeightSpace, index: Tensor) -> WeightSpace:
    """Networks ``index`` of a batch of networks."""
    index = index.to(ws.weights[0].device)
    return WeightSpace([w[index] for w in ws.weights], [b[index] for b in ws.biases], ws.spec)


# --------------------------------------------------------------------------- models
MODELS = ("ours", "ours_np", "gmn", "gmn_sign", "nfn", "flat", "statnn", "deepsets", "probe")
DEFAULT_MODELS = ("ours", "nfn", "flat", "statnn")
MODEL_HELP = {
    "ours": "metaopt InvariantDWSNet (DWS/HNP layers, hidden-neuron pooling, MLP head)",
    "ours_np": "metaopt InvariantNFN (NP layers, mean pooling, MLP head)",
    "gmn": "metaopt InvariantGMN (message passing on the graph of neurons and weights, mean/max read-out, MLP head)",
    "gmn_sign": "metaopt InvariantGMN(sign_symmetric=True): also exactly invariant to hidden sign flips (SIREN data)",
    "nfn": "nfn 0.1.2's NPLinear stack + HNPPool + MLP head (the `nfn` package's own layers)",
    "flat": "MLP on the flattened weight vector",
    "statnn": "per-tensor statistics + MLP (Unterthiner et al. 2020)",
    "deepsets": "per-parameter DeepSets",
    "probe": "learned probe inputs run through every network + MLP on the outputs (function space, not weights-only; "
             "ProbeGen, Kahana et al. 2025); supervised tasks on datasets that record their architecture",
}


@dataclass
class ModelConfig:
    """Sizes shared by all models, so no model gets a bigger head by accident."""

    hidden_channels: int = 16  # equivariant trunks (ours, nfn)
    num_layers: int = 3  # equivariant layers in the trunk
    head_hidden: int = 128  # MLP heads and the flat/stat MLP widths
    dropout: float = 0.0
    pooling: str = "mean"  # invariant pooling of ours/ours_np: "mean" or "meanmax" (metaopt.layers.InvariantPool)
    fourier_features: int = 0  # > 0: every model reads metaopt.layers.FourierFeatures of the (normalized) weights
    fourier_scale: float = 0.2  # std of their frequencies, in units of the normalized weights
    num_probes: int = 32  # inputs the probe model runs every network on
    probe_generator_depth: int = 4  # layers of its shared deep linear probe generator (0: free probes)


def parse_models(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise StandaloneError(f"unknown model(s) {unknown or text!r}; choose from {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise StandaloneError(f"model list {names} names a model twice")
    return names


class NFNInvariant(nn.Module):
    """The peer from the ``nfn`` package (Zhou et al. 2023): NPLinear(io_embed) -> ReLU stack, HNPPool,
    MLP head -- the invariant NFN of nfn's examples, built only from nfn's own layers.

    Our WeightSpace is translated to nfn's WeightSpaceFeatures on the fly: linear weights are
    ``[B, C, out, in]``; when any layer is a convolution, every weight becomes 6-D
    ``[B, C, out, in, kh, kw]`` (a linear layer reading a flattened feature map of ``s`` positions
    gets kernel ``(s, 1)``, a plain linear ``(1, 1)``), which is the layout nfn expects for CNNs.
    """

    def __init__(self, spec: WeightSpaceSpec, out_features: int, hidden_channels: int = 16, num_layers: int = 3,
                 head_hidden: int = 128, dropout: float = 0.0, in_channels: int = 1):
        super().__init__()
        try:
            from nfn.layers import HNPPool, NPLinear, TupleOp
        except ImportError as e:  # nfn is a dev extra
            raise StandaloneError("model 'nfn' needs the nfn package: pip install nfn==0.1.2 einops") from e
        nspec = nfn_network_spec(spec)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_layers):
            layers += [NPLinear(nspec, c, hidden_channels, io_embed=True), TupleOp(nn.ReLU())]
            c = hidden_channels
        self.trunk = nn.Sequential(*layers)
        self.pool = HNPPool(nspec)
        n_pool = hidden_channels * HNPPool.get_num_outs(nspec)
        head = [nn.Linear(n_pool, head_hidden), nn.ReLU()]
        if dropout:
            head.append(nn.Dropout(dropout))
        self.head = nn.Sequential(*head, nn.Linear(head_hidden, out_features))

    def forward(self, ws: WeightSpace) -> Tensor:
        return self.head(self.pool(self.trunk(to_nfn(ws))).flatten(1))


def _nfn_kernel(spec: WeightSpaceSpec, layer) -> tuple[int, ...]:
    if not any(l.kernel for l in spec.layers):
        return ()
    return layer.kernel if len(layer.kernel) == 2 else (layer.kernel + (1, 1))[:2]


def to_nfn(ws: WeightSpace):
    """Our WeightSpace as nfn's WeightSpaceFeatures: linear weights ``[B, C, out, in]``; when any layer is a
    convolution, every weight 6-D ``[B, C, out, in, kh, kw]`` (a linear layer reading a flattened map of ``s``
    positions gets kernel ``(s, 1)``, a plain linear ``(1, 1)``), the layout nfn expects for CNNs."""
    from nfn.common import WeightSpaceFeatures

    weights = [w.reshape(*w.shape[:4], *_nfn_kernel(ws.spec, l)) for w, l in zip(ws.weights, ws.spec.layers)]
    return WeightSpaceFeatures(weights, list(ws.biases))


def from_nfn(features, spec: WeightSpaceSpec) -> WeightSpace:
    """Inverse of :func:`to_nfn` (e.g. for an equivariant nfn stack's output)."""
    weights = [w.reshape(*w.shape[:4], *l.kernel) for w, l in zip(features.weights, spec.layers)]
    return WeightSpace(weights, list(features.biases), spec)


def nfn_network_spec(spec: WeightSpaceSpec):
    """nfn's NetworkSpec of the networks of ``spec``, in :func:`to_nfn`'s layout."""
    from nfn.common import network_spec_from_wsfeat

    return network_spec_from_wsfeat(to_nfn(WeightSpace([torch.zeros(1, 1, l.n_out, l.n_in, *l.kernel)
                                                         for l in spec.layers],
                                                        [torch.zeros(1, 1, l.n_out) for l in spec.layers], spec)))


def build_model(name: str, spec: WeightSpaceSpec, out_features: int, cfg: ModelConfig = ModelConfig(),
                probe: Probing | None = None, normalizer: Normalizer | None = None) -> nn.Module:
    """A model mapping one-channel weight spaces of ``spec`` to ``[B, out_features]``.

    With ``cfg.fourier_features``, every model, peers included, reads the same kind of encoded
    input (a :class:`~metaopt.layers.FourierFeatures` in front), so a table compares models, not
    inputs. The probe model runs the networks, so it needs ``probe`` (:func:`probing`); the
    sign-invariant GMN needs the splits' ``normalizer``, to undo its centring."""
    if name == "gmn_sign":
        if normalizer is None:
            raise StandaloneError("model 'gmn_sign' needs the splits' normalizer (its centring breaks sign flips)")
        if cfg.fourier_features:
            raise StandaloneError("model 'gmn_sign' is invariant to sign flips, which Fourier features of the "
                                  "weights are not; drop --fourier-features or the model")
        return nn.Sequential(UncentredWeights(normalizer), _build_trunk_and_head(name, spec, out_features, cfg, 1))
    if name == "probe":
        if probe is None:
            raise StandaloneError("model 'probe' runs the networks, so it needs their architecture, which this "
                                  "task does not pass (the supervised tasks classify, regress and generalization do)")
        if cfg.fourier_features:
            raise StandaloneError("model 'probe' runs the networks on their raw weights, so it cannot read Fourier "
                                  "features; drop --fourier-features or the model")
        model = ProbeNet(spec, probe.network.template, probe.input_shape, out_features, cfg.num_probes,
                         hidden=cfg.head_hidden, depth=3, dropout=cfg.dropout, probe_range=probe.input_range,
                         generator_depth=cfg.probe_generator_depth)
        return nn.Sequential(RawWeights(probe.normalizer), model)
    encoder = FourierFeatures(1, cfg.fourier_features, cfg.fourier_scale) if cfg.fourier_features else None
    c = encoder.out_channels if encoder is not None else 1
    model = _build_trunk_and_head(name, spec, out_features, cfg, c)
    return nn.Sequential(encoder, model) if encoder is not None else model


def _build_trunk_and_head(name: str, spec: WeightSpaceSpec, out_features: int, cfg: ModelConfig, c: int
                          ) -> nn.Module:
    h, L = cfg.hidden_channels, cfg.num_layers
    if name == "ours":
        return InvariantDWSNet(spec, c, out_features, hidden_channels=h, num_layers=L, head_hidden=cfg.head_hidden,
                               dropout=cfg.dropout, pooling=cfg.pooling)
    if name == "ours_np":
        return InvariantNFN(spec, c, out_features, hidden_channels=h, num_layers=L, head_hidden=cfg.head_hidden,
                            dropout=cfg.dropout, pooling=cfg.pooling)
    if name in ("gmn", "gmn_sign"):
        return InvariantGMN(spec, c, out_features, hidden_channels=h, num_layers=L, head_hidden=cfg.head_hidden,
                            dropout=cfg.dropout, sign_symmetric=name == "gmn_sign")
    if name == "nfn":
        return NFNInvariant(spec, out_features, h, L, cfg.head_hidden, cfg.dropout, in_channels=c)
    if name == "flat":
        return FlatMLP(spec, c, out_features, hidden=cfg.head_hidden, depth=3, dropout=cfg.dropout)
    if name == "statnn":
        return StatNN(spec, c, out_features, hidden=cfg.head_hidden, depth=3)
    if name == "deepsets":
        return DeepSets(spec, c, out_features, hidden=cfg.head_hidden)
    raise StandaloneError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 0  # stop after this many epochs without a better val score (0: never stop early)
    augment: bool = True  # random hidden permutations of every training batch
    sign_flips: bool = False  # and random sign flips of hidden sine neurons (SIREN data only; supervised tasks)
    canonical_signs: bool = False  # instead, every network's sine neurons with biases >= 0 (SIREN data only)
    image_warps: bool = False  # random small rotations, zooms, shifts, mirrors of 2-D INRs' images (classify)
    compile: bool | str = False  # torch.compile the models (supervised tasks); a string names the backend
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    eval_batch_size: int = 256


LossFn = Callable[[nn.Module, WeightSpace, Tensor], Tensor]  # (model, batch, batch indices) -> scalar loss
ScoreFn = Callable[[nn.Module], float]  # model -> validation score, higher is better


def require_siren(info: dict, what: str) -> None:
    if recorded(info, "w0") is None:
        raise StandaloneError(f"{what}: an exact symmetry of SIRENs only (odd sine activations), and this "
                              f"dataset records no w0: it is not a SIREN dataset")


def batch_augmentation(splits: Splits, sign_flips: bool = False, image_warps: bool = False,
                       canonical: bool = False, also_permute: bool = True
                       ) -> Callable[[WeightSpace, torch.Generator], WeightSpace]:
    """Training-batch augmentations that act on raw weights (normalization subtracts per-tensor
    means, so these maps of normalized values would not be exact), then hidden permutations when
    ``also_permute``:

    * ``image_warps``: :func:`.augment.image_warp`, each network redrawn as a slightly rotated,
      zoomed, shifted or mirrored image (then the canonical form again, with ``canonical``, since a
      shifted first-layer bias can change sign). Not a symmetry: the image augmentations of a CNN.
    * ``sign_flips``: each hidden sine neuron flips sign with probability 1/2 (exact, since sine is
      odd). An invariant model is blind to permutations, so they add nothing for it; sign flips are
      a symmetry it does *not* have built in, so each flip shows it a new network with the same
      label. Bias shifts by ``k pi / w0``, the other SIREN symmetry, are left out: they move trained
      biases far outside the range the test networks have.
    """
    if sign_flips:
        require_siren(splits.info, "sign flips")
    if image_warps and not draws_images(splits.spec):
        raise StandaloneError(f"image warps redraw 2-D images, so the networks must be chains of linear layers "
                              f"reading 2 coordinates; this dataset's are [{splits.spec}]")
    norm = splits.normalizer

    def transform(ws: WeightSpace, generator: torch.Generator) -> WeightSpace:
        raw = norm.inverse(ws)
        if image_warps:
            raw = image_warp(raw, generator)
            if canonical:
                raw = canonical_signs(raw)
        if sign_flips:
            raw = sign_flip(raw, generator)
        ws = norm(raw)
        return permute(ws, generator) if also_permute else ws

    return transform


def train_model(model: nn.Module, train: WeightSpace, loss_fn: LossFn, val_score: ScoreFn, cfg: TrainConfig,
                name: str = "model", logdir: str | Path | None = None,
                transform: Callable[[WeightSpace, torch.Generator], WeightSpace] | None = None) -> dict:
    """Adam with a cosine learning-rate schedule over ``cfg.epochs``; keeps the weights of the epoch
    with the best ``val_score`` (early stopping), loads them back into ``model`` and returns a summary.

    ``transform`` replaces the default augmentation (random hidden permutations) when given; the
    batch order and augmentations come from a generator seeded with ``cfg.seed``, so every model of
    a run sees exactly the same batches.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise StandaloneError(f"epochs and batch size must be at least 1, got {cfg.epochs} and {cfg.batch_size}")
    n = train.batch_size
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    writer = SummaryWriter(str(logdir)) if logdir is not None else None
    augment = transform or (permute if cfg.augment else None)
    best = {"score": -math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    history = []
    start, step, stale = time.perf_counter(), 0, 0
    bar = tqdm(range(cfg.epochs), desc=name, disable=not cfg.progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            batch = take(train, idx)
            if augment is not None:
                batch = augment(batch, gen)
            loss = loss_fn(model, batch, idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: training loss became {loss.item()} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
            step += 1
        model.eval()
        with torch.no_grad():
            score = float(val_score(model))
        if not math.isfinite(score):  # e.g. Kendall tau of constant predictions: never the best epoch
            score = -math.inf
        train_loss = total_loss / steps_per_epoch
        history.append({"epoch": epoch, "train_loss": train_loss, "val_score": score})
        if writer is not None:
            writer.add_scalar("train/loss", train_loss, epoch)
            writer.add_scalar("val/score", score, epoch)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], epoch)
        bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{score:.4g}")
        if score > best["score"] or best["epoch"] < 0:
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            stale = 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    if writer is not None:
        writer.close()
    model.load_state_dict(best["state"])
    model.eval()
    return {"best_epoch": best["epoch"], "best_val_score": best["score"], "epochs_run": len(history),
            "steps": step, "train_seconds": time.perf_counter() - start, "history": history}


@torch.no_grad()
def predict(model: nn.Module, ws: WeightSpace, batch_size: int = 256) -> Tensor:
    """``model`` on all networks of ``ws`` in eval mode, in batches: ``[n, out]``."""
    model.eval()
    outs = [model(take(ws, torch.arange(i, min(i + batch_size, ws.batch_size))))
            for i in range(0, ws.batch_size, batch_size)]
    return torch.cat(outs)


# --------------------------------------------------------------------------- results
def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def write_results(out: str | Path, task: str, rows: list[dict], columns: Sequence[str], header: dict,
                  notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """``results.json`` (every field of every row, e.g. training histories) and ``results.md`` (a table of
    ``columns`` per model), each written atomically."""
    out = Path(out)
    payload = {"task": task, **header, "rows": rows}
    atomic_write(out / "results.json", json.dumps(payload, indent=2, default=_json_default) + "\n")
    lines = [f"# {task}", ""]
    lines += [f"- {k}: {v if not isinstance(v, dict) else json.dumps(v)}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    if notes:
        lines += [""] + list(notes)
    atomic_write(out / "results.md", "\n".join(lines) + "\n")
    return out / "results.md", out / "results.json"


def _json_default(o):
    if isinstance(o, Tensor):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


# --------------------------------------------------------------------------- supervised tasks
class Objective:
    """What a supervised task predicts from a network's weights, and how it is scored.

    Subclasses set ``task``, ``column`` (the metadata column holding the target), ``metric`` (the
    headline score, also used for early stopping on val) and ``higher_is_better``.
    """

    task: str = ""
    column: str = ""
    metric: str = ""
    higher_is_better: bool = True

    def setup(self, splits: Splits) -> int:
        """Fit whatever the objective needs on the training split; return the number of outputs."""
        raise NotImplementedError

    def targets(self, splits: Splits, split: str) -> Tensor:
        return splits.meta[split][self.column]

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, out: Tensor, target: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def reference(self, splits: Splits) -> dict[str, float]:
        """Scores of a trivial predictor that reads no weights (chance level), for the table's notes."""
        return {}


def run_supervised(objective: Objective, data: str | Path | WeightDataset, out: str | Path,
                   models: Sequence[str] = DEFAULT_MODELS, model_cfg: ModelConfig = ModelConfig(),
                   train_cfg: TrainConfig = TrainConfig(), command: str = "") -> list[dict]:
    """Train every model in ``models`` on ``data`` for ``objective``; write ``out/results.{md,json}``
    and TensorBoard logs under ``out/tb/MODEL``; return the table rows."""
    models = parse_models(models)
    device = torch.device(train_cfg.device)
    if train_cfg.sign_flips and train_cfg.canonical_signs:
        raise StandaloneError("sign flips and canonical signs exclude each other: the flips would undo the "
                              "canonical form (pick one)")
    splits = load_splits(data, [objective.column], device, canonical=train_cfg.canonical_signs)
    transform = None
    if train_cfg.sign_flips or train_cfg.image_warps:
        transform = batch_augmentation(splits, train_cfg.sign_flips, train_cfg.image_warps, train_cfg.canonical_signs,
                                       train_cfg.augment)
    out_features = objective.setup(splits)
    targets = {s: objective.targets(splits, s).to(device) for s in ("train", "val", "test")}
    sign = 1.0 if objective.higher_is_better else -1.0
    probe = probing(splits) if "probe" in models else None
    if "gmn_sign" in models:
        require_siren(splits.info, "model 'gmn_sign' is invariant to hidden sign flips")
    rows = []
    for name in models:
        torch.manual_seed(train_cfg.seed)
        model = build_model(name, splits.spec, out_features, model_cfg, probe, splits.normalizer).to(device)
        if train_cfg.compile:  # in place: the state dict, and so the kept best epoch, keep their names
            model.compile(**({"backend": train_cfg.compile} if isinstance(train_cfg.compile, str) else {}))

        def loss_fn(m, batch, idx):
            return objective.loss(m(batch), targets["train"][idx.to(device)])

        def val_score(m):
            return sign * objective.scores(predict(m, splits.val, train_cfg.eval_batch_size),
                                           targets["val"])[objective.metric]

        summary = train_model(model, splits.train, loss_fn, val_score, train_cfg, name=f"{objective.task}/{name}",
                              logdir=Path(out) / "tb" / name, transform=transform)
        test = objective.scores(predict(model, splits.test, train_cfg.eval_batch_size), targets["test"])
        rows.append({"model": name, **{f"test_{k}": v for k, v in test.items()},
                     f"val_{objective.metric}": sign * summary["best_val_score"], "params": count_params(model),
                     "best_epoch": summary["best_epoch"], "train_seconds": summary["train_seconds"],
                     "description": MODEL_HELP[name], "history": summary["history"]})
    header = {"data": str(data) if not isinstance(data, WeightDataset) else "(in memory)",
              "architecture": str(splits.spec), "sizes": splits.sizes(), "target": objective.column,
              "command": command, "model_config": asdict(model_cfg),
              "train_config": {k: v for k, v in asdict(train_cfg).items() if k != "progress"},
              "reference": objective.reference(splits)}
    metric_cols = [k for k in rows[0] if k.startswith("test_")]
    notes = [f"Reference (no weights read): {json.dumps(header['reference'])}"] if header["reference"] else []
    write_results(out, objective.task, rows,
                  ["model", *metric_cols, f"val_{objective.metric}", "params", "best_epoch", "train_seconds"],
                  header, notes)
    return rows
