"""``python -m meta_train.standalone TASK --data DIR --out DIR``: train our metanetwork and the peers on
one weight-space dataset, same data and budget, and write ``OUT/results.md`` and ``OUT/results.json``.

::

    python -m meta_train.standalone make-small-data digits-inrs --out data/digits_inrs
    python -m meta_train.standalone classify --data data/digits_inrs --out runs/classify
    python -m meta_train.standalone regress --data data/sine_inrs --out runs/regress --target frequency
    python -m meta_train.standalone generalization --data data/cnn_zoo --out runs/gen --models ours,statnn
    python -m meta_train.standalone embed --data data/digits_inrs --out runs/embed     # + runs/embed/tsne.png
    python -m meta_train.standalone edit --data data/digits_inrs --out runs/edit       # + runs/edit/edits.png
    python -m meta_train.standalone make-small-data cnn-zoo --out data/cnn_zoo
    python -m meta_train.standalone curves runs/classify runs/classify_gmn --out curves.png   # runs side by side
    python -m meta_train.standalone adapt --data data/cnn_zoo --out runs/adapt --shift rot90   # + adapt.png
    tensorboard --logdir runs

Models: ours (InvariantDWSNet), ours_np (InvariantNFN), nfn (the nfn package's NPLinear model),
flat (MLP on the weight vector), statnn (weight statistics + MLP), deepsets, probe (runs every
network on learned inputs: function space, for the supervised tasks).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

import torch

from metaopt.layers import POOLINGS
from tasks.data import FASHION_MNIST_DIR

from .edit import EDITORS
from .harness import DEFAULT_MODELS, MODEL_HELP, ModelConfig, StandaloneError, TrainConfig, run_supervised

__all__ = ["main", "build_parser", "TASKS"]

EDIT_DEFAULT = ("ours", "nfn", "flat")
TASKS = {
    "classify": "INR classification (label column, test accuracy)",
    "regress": "scalar regression from INR weights (default target: frequency; test MSE)",
    "generalization": "classifier zoo: predict test_accuracy, Kendall tau on test networks",
    "embed": "SimCLR embeddings from SIREN-symmetry augmentations; linear probe, kNN, t-SNE plot",
    "edit": "INR editing: equivariant map to the weights of the dilated image; test MSE, edits.png",
    "adapt": "domain adaptation: classifier-zoo weights -> weights for shifted inputs; target accuracy, adapt.png",
}


def _add_common(p: argparse.ArgumentParser, default_epochs: int) -> None:
    p.add_argument("--data", required=True, help="weight-dataset folder (shard-*.safetensors)")
    p.add_argument("--out", required=True, help="output folder: results.md, results.json, tb/")
    p.add_argument("--models", default=None,
                   help=f"comma-separated (default: {','.join(DEFAULT_MODELS)}; for edit: {','.join(EDIT_DEFAULT)}; "
                        f"for adapt: {','.join(EDITORS)}), "
                        "from: " + "; ".join(f"{k}: {v}" for k, v in MODEL_HELP.items()))
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=0, help="early-stop after N epochs without val improvement (0: off)")
    p.add_argument("--no-augment", action="store_true", help="no random hidden permutations of training batches")
    p.add_argument("--hidden-channels", type=int, default=16, help="channels of the equivariant trunks")
    p.add_argument("--num-layers", type=int, default=3, help="equivariant layers in the trunks")
    p.add_argument("--head-hidden", type=int, default=128, help="width of MLP heads and of the flat/stat MLPs")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meta_train.standalone", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, default_epochs in (("classify", 50), ("regress", 50), ("generalization", 50), ("embed", 50),
                                 ("edit", 50), ("adapt", 20)):
        sp = sub.add_parser(name, help=TASKS[name])
        _add_common(sp, default_epochs)
        if name in ("classify", "regress", "generalization", "embed"):
            sp.add_argument("--pooling", choices=POOLINGS, default="mean",
                            help="invariant pooling of ours/ours_np: mean, or mean and max over hidden neurons "
                                 "(default mean)")
            sp.add_argument("--fourier-features", type=int, default=0, metavar="M",
                            help="every model reads M random Fourier features (sin and cos) of each normalized "
                                 "weight besides the weight itself (default 0: off)")
            sp.add_argument("--fourier-scale", type=float, default=ModelConfig.fourier_scale,
                            help="std of those features' frequencies, in normalized-weight units "
                                 f"(default {ModelConfig.fourier_scale})")
        if name in ("classify", "regress", "generalization"):
            sp.add_argument("--num-probes", type=int, default=ModelConfig.num_probes,
                            help="inputs the probe model runs every network on (default "
                                 f"{ModelConfig.num_probes})")
            sp.add_argument("--probe-generator-depth", type=int, default=ModelConfig.probe_generator_depth,
                            help="linear layers of the probe model's shared probe generator (ProbeGen); 0: free "
                                 f"probes (default {ModelConfig.probe_generator_depth})")
            sp.add_argument("--compile", action="store_true",
                            help="torch.compile every model (fuses the message-passing models' elementwise work; "
                                 "the first batches wait for the compiler)")
        if name in ("classify", "regress"):
            sp.add_argument("--sign-flips", action="store_true",
                            help="also flip the signs of random hidden sine neurons in training batches (an exact "
                                 "SIREN symmetry that invariant models lack; SIREN datasets only)")
            sp.add_argument("--canonical-signs", action="store_true",
                            help="flip each hidden sine neuron of every network so its bias is >= 0 before "
                                 "training: the sign symmetry removed instead of augmented (SIREN datasets "
                                 "only; excludes --sign-flips)")
        if name == "classify":
            sp.add_argument("--image-warps", action="store_true",
                            help="redraw each training INR as a slightly rotated, zoomed, shifted or mirrored image "
                                 "(exact edits of its first layer; 2-D INR datasets only)")
        if name == "regress":
            sp.add_argument("--target", default="frequency", help="metadata column to regress")
        if name == "classify":
            sp.add_argument("--target", default="label", help="metadata column of class ids")
        if name == "generalization":
            from .generalization import LOSSES as RANK_LOSSES

            sp.add_argument("--target", default="test_accuracy", help="metadata column to rank by")
            sp.add_argument("--loss", choices=RANK_LOSSES, default="mse",
                            help="mse: on the standardized target (default); rank: pairwise logistic loss on the "
                                 "order alone (the table then has no MSE)")
        if name == "embed":
            sp.add_argument("--target", default="label", help="class column, used only to evaluate the embeddings")
            sp.add_argument("--dim", type=int, default=32, help="embedding size")
            sp.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature")
            sp.add_argument("--noise", type=float, default=0.05, help="Gaussian noise of the views (normalized units)")
        if name in ("embed", "edit"):
            sp.add_argument("--w0", type=float, default=None,
                            help="the SIRENs' w0 (default: the dataset's recorded w0, else 30)")
        if name in ("embed", "edit", "adapt"):
            sp.add_argument("--no-plot", action="store_true", help="skip the plot")
        if name == "edit":
            sp.add_argument("--size", type=int, default=None,
                            help="image side in pixels (default: the dataset's recorded image_size)")
            sp.add_argument("--kernel", type=int, default=3, help="dilation window (pixels)")
            sp.add_argument("--edit-scale", type=float, default=0.01,
                            help="initial per-tensor scale of the edits (learned), in units of each tensor's std")
        if name == "adapt":
            from .adapt import LOSSES, SHIFTS

            sp.add_argument("--shift", default="rot90", help=f"the target domain: {SHIFTS}")
            sp.add_argument("--image-batch", type=int, default=128, help="target images per training step")
            sp.add_argument("--loss", choices=LOSSES, default="matched",
                            help="matched: cross-entropy at the unadapted network's logit scale (default); ce: plain "
                                 "cross-entropy (the editors then learn to make every network unsure)")
            sp.add_argument("--edit-scale", type=float, default=1.0,
                            help="initial per-tensor scale of the weight update (learned), in each tensor's std")
            sp.add_argument("--finetune-steps", type=int, default=10,
                            help="reference row: Adam steps per test network on target images (0: no such row)")
            sp.add_argument("--finetune-lr", type=float, default=1e-2, help="learning rate of that reference")
            sp.add_argument("--val-images", type=int, default=None,
                            help="last training-part images held out for validation (default 10%%, at most 5000)")
            sp.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
            sp.add_argument("--images-dir", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST idx files")
            sp.add_argument("--group-by", default="epoch",
                            help="metadata column: a second table of target accuracy per value ('' for none)")
    sp = sub.add_parser("curves", help="validation score and training loss per epoch of several runs, one picture")
    sp.add_argument("runs", nargs="+", help="run folders (each with the results.json a task wrote)")
    sp.add_argument("--out", required=True, help="picture to write (e.g. curves.png)")
    sp.add_argument("--labels", default=None, help="comma-separated, one per run (default: the folders' names)")
    from .smalldata import KINDS

    sp = sub.add_parser("make-small-data", help="build a small dataset for tests and CPU runs")
    sp.add_argument("kind", choices=sorted(KINDS))
    sp.add_argument("--out", required=True)
    sp.add_argument("--n-train", type=int, default=400, help="networks in train (INR kinds)")
    sp.add_argument("--n-val", type=int, default=100)
    sp.add_argument("--n-test", type=int, default=100)
    sp.add_argument("--steps", type=int, default=300, help="SIREN fitting steps (INR kinds)")
    sp.add_argument("--shared-init", action="store_true", help="every SIREN starts from the same init (INR kinds)")
    sp.add_argument("--n-per-run", type=int, default=40, help="CNNs per training run (cnn-zoo)")
    sp.add_argument("--seed", type=int, default=0)
    return p


def _objective(task: str, target: str, loss: str = "mse"):
    if task == "classify":
        from .classify import Classification
        return Classification(target)
    if task == "regress":
        from .regress import Regression
        return Regression(target)
    if task == "generalization":
        from .generalization import Generalization
        return Generalization(target, loss)
    raise StandaloneError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def _make_small_data(args) -> None:
    from tasks.weight_data import existing_shards, shard_path

    from .smalldata import cnn_zoo, digits_inrs, sine_inrs

    if existing_shards(args.out):
        raise StandaloneError(f"{args.out} already holds a dataset; choose an empty folder")
    if args.kind == "digits-inrs":
        ds = digits_inrs(args.n_train, args.n_val, args.n_test, steps=args.steps, seed=args.seed,
                         shared_init=args.shared_init)
    elif args.kind == "sine-inrs":
        ds = sine_inrs(args.n_train, args.n_val, args.n_test, steps=args.steps, seed=args.seed,
                       shared_init=args.shared_init)
    else:
        ds = cnn_zoo(n_per_run=args.n_per_run, seed=args.seed)
    ds.save_shard(shard_path(args.out, 0))
    print(f"wrote {ds} to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.task == "make-small-data":
            _make_small_data(args)
            return 0
        if args.task == "curves":
            from .curves import plot_curves

            labels = args.labels.split(",") if args.labels else None
            print(f"wrote {plot_curves(args.runs, args.out, labels)}")
            return 0
        if args.threads:
            torch.set_num_threads(args.threads)
        model_cfg = ModelConfig(args.hidden_channels, args.num_layers, args.head_hidden, args.dropout,
                                getattr(args, "pooling", ModelConfig.pooling),
                                getattr(args, "fourier_features", ModelConfig.fourier_features),
                                getattr(args, "fourier_scale", ModelConfig.fourier_scale),
                                getattr(args, "num_probes", ModelConfig.num_probes),
                                getattr(args, "probe_generator_depth", ModelConfig.probe_generator_depth))
        train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, patience=args.patience, augment=not args.no_augment,
                                sign_flips=getattr(args, "sign_flips", TrainConfig.sign_flips),
                                canonical_signs=getattr(args, "canonical_signs", TrainConfig.canonical_signs),
                                image_warps=getattr(args, "image_warps", TrainConfig.image_warps),
                                compile=getattr(args, "compile", TrainConfig.compile), seed=args.seed,
                                device=args.device, progress=not args.no_progress)
        command = "python -m meta_train.standalone " + shlex.join(argv)
        models = args.models or ",".join({"edit": EDIT_DEFAULT, "adapt": EDITORS}.get(args.task, DEFAULT_MODELS))
        if args.task == "adapt":
            from .adapt import run_adapt

            rows = run_adapt(args.data, args.out, models, model_cfg, train_cfg, args.shift, args.image_batch,
                             args.loss, args.finetune_steps, args.finetune_lr, args.val_images, args.test_images,
                             args.images_dir, args.edit_scale, args.group_by or None, not args.no_plot, command)
        elif args.task == "edit":
            from .edit import run_edit

            rows = run_edit(args.data, args.out, models, model_cfg, train_cfg, args.size, args.w0, args.kernel,
                            not args.no_plot, command, args.edit_scale)
        elif args.task == "embed":
            from .embed import run_embed

            rows = run_embed(args.data, args.out, models, model_cfg, train_cfg, args.dim, args.temperature,
                             args.noise, args.w0, args.target, not args.no_plot, command)
        else:
            objective = _objective(args.task, args.target, getattr(args, "loss", "mse"))
            rows = run_supervised(objective, args.data, args.out, models, model_cfg, train_cfg, command)
    except (StandaloneError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
