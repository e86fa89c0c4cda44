"""Command line of the ``tasks`` package: ``python -m tasks make-data {inr,sine,zoo} --out DIR [options]``.

Builds a weight-space dataset folder (see :mod:`tasks.make_data` and ``docs/standalone.md``),
then prints where it went and a short summary.  Re-running the same command resumes a killed
build, or returns at once when the folder is complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _worker(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"K/N needs 0 <= K < N, got {text!r}")
    return k, n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="dataset folder (created; an existing one is resumed)")
    p.add_argument("--seed", type=int, default=0, help="build seed; every network's seed derives from it (default 0)")
    p.add_argument("--shard-size", type=_positive_int, help="networks (models for zoo) trained together and stored per shard "
                        "(default: inr 256, sine 1000, zoo 50)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when there is a GPU)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads (default: torch's choice); 1 is much faster on a machine whose cores "
                        "other processes keep busy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--worker", type=_worker, default=(0, 1), metavar="K/N",
                   help="start with shards i with i %% N == K, then take the shards no process has started; start N "
                        "processes (K = 0 .. N-1, same command otherwise, e.g. one thread each on a multi-core CPU) "
                        "to build one folder together")


def _fit_options(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    from .inr import SIREN_INITS

    p.add_argument("--steps", type=_positive_int, default=steps, help=f"max Adam steps per INR (default {steps})")
    p.add_argument("--lr", type=_positive_float, default=lr, help=f"Adam learning rate (default {lr:g})")
    p.add_argument("--hidden", type=_positive_int, nargs="+", default=[32, 32],
                   help="SIREN hidden widths (default 32 32)")
    p.add_argument("--w0", type=_positive_float, default=30.0, help="SIREN frequency factor (default 30)")
    p.add_argument("--init", choices=SIREN_INITS, default="dwsnets",
                   help="SIREN init (tasks.inr): dwsnets = DWSNets' datasets (low first-layer frequencies, zero "
                        "biases; blurrier fits whose weights are far easier to read), sitzmann = the SIREN paper's "
                        "(default dwsnets)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--target-psnr", type=_positive_float, default=40.0,
                      help="freeze an INR once its PSNR reaches this many dB (default 40)")
    stop.add_argument("--no-early-stop", action="store_true", help="always run --steps")


def parser() -> argparse.ArgumentParser:
    from .make_data import IMAGE_INR_DATASETS, IMAGE_SIZES

    root = argparse.ArgumentParser(prog="python -m tasks", description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-data", help="build a weight-space dataset",
                               description="Build a weight-space dataset folder (shards + recipe.json).")
    kinds = make.add_subparsers(dest="kind", required=True)

    inr = kinds.add_parser("inr", help="SIRENs fitted to images (Fashion-MNIST, digits)",
                           description="Fit a 2-D SIREN to every image of a dataset (train 55k / val 5k / test 10k "
                                       "for Fashion-MNIST; 1258 / 180 / 359 for digits).")
    inr.add_argument("--dataset", default="fashion_mnist", choices=IMAGE_INR_DATASETS)
    inr.add_argument("--views", type=_positive_int, default=1, help="independent fits per image (default 1)")
    inr.add_argument("--limit", type=_positive_int, help="only the first LIMIT images of each split")
    inr.add_argument("--data-dir", help="folder with the Fashion-MNIST idx .gz files "
                                        "(default /usr/share/datasets/fashion-mnist)")
    _fit_options(inr, steps=1000, lr=5e-4)
    _common(inr)

    sine = kinds.add_parser("sine", help="SIRENs fitted to sine waves a sin(b x)",
                            description="Fit a 1-D SIREN to each of N waves a sin(b x), x in [-pi, pi].")
    sine.add_argument("--n", type=_positive_int, default=5000, help="number of waves (default 5000)")
    sine.add_argument("--points", type=_positive_int, default=256, help="grid points per wave (default 256)")
    sine.add_argument("--amplitude", type=float, nargs=2, default=[1.0, 1.0], metavar=("LOW", "HIGH"),
                      help="range of a, uniform (default 1 1: pure sin(b x), DWSNets' frequency-regression data; "
                           "give a range for self-supervised data)")
    sine.add_argument("--frequency", type=float, nargs=2, default=[0.5, 10.0], metavar=("LOW", "HIGH"),
                      help="range of b, uniform (default 0.5 10)")
    _fit_options(sine, steps=1500, lr=1e-3)
    _common(sine)

    zoo = kinds.add_parser("zoo", help="CNN classifiers with varied hyperparameters (generalization prediction)",
                           description="Train small CNNs of one architecture with varied lr, weight decay, init "
                                       "scale and training-set fraction; store checkpoints with their accuracy.")
    zoo.add_argument("--models", type=_positive_int, default=200, help="number of models (default 200)")
    zoo.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8], help="checkpoint epochs (default 1 2 4 8)")
    zoo.add_argument("--dataset", default="fashion_mnist_8x8", choices=sorted(IMAGE_SIZES))
    zoo.add_argument("--channels", type=_positive_int, nargs="+", default=[8, 8], help="conv widths (default 8 8)")
    zoo.add_argument("--train-size", type=_positive_int, default=2000, help="training pool size (default 2000)")
    zoo.add_argument("--test-size", type=_positive_int, help="test images (default: the whole test split)")
    zoo.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    ranges = (("--lr", (1e-4, 1e-2), "log-uniform"), ("--weight-decay", (1e-6, 1e-2), "log-uniform"),
              ("--init-scale", (0.5, 2.0), "log-uniform"), ("--train-fraction", (0.1, 1.0), "uniform"))
    for flag, default, what in ranges:
        zoo.add_argument(flag, type=float, nargs=2, default=list(default), metavar=("LOW", "HIGH"),
                         help=f"range, {what} (default {default[0]:g} {default[1]:g})")
    zoo.add_argument("--data-dir", help="folder with the Fashion-MNIST idx .gz files")
    _common(zoo)
    return root


def _build(args: argparse.Namespace) -> Path:
    from . import make_data
    from .data import FASHION_MNIST_DIR

    common = {"seed": args.seed, "device": args.device, "progress": not args.quiet, "worker": args.worker}
    if args.shard_size:
        common["shard_size"] = args.shard_size
    if args.kind in ("inr", "sine"):
        common.update(steps=args.steps, lr=args.lr, hidden=args.hidden, w0=args.w0, init=args.init,
                      target_psnr=None if args.no_early_stop else args.target_psnr)
    if args.kind == "inr":
        return make_data.build_image_inrs(args.out, dataset=args.dataset, views=args.views, limit=args.limit,
                                          data_dir=args.data_dir or FASHION_MNIST_DIR, **common)
    if args.kind == "sine":
        return make_data.build_sine_inrs(args.out, n=args.n, points=args.points, amplitude=args.amplitude,
                                         frequency=args.frequency, **common)
    return make_data.build_classifier_zoo(
        args.out, n_models=args.models, epochs=args.epochs, dataset=args.dataset, channels=args.channels,
        train_size=args.train_size, test_size=args.test_size, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, init_scale=args.init_scale, train_fraction=args.train_fraction,
        data_dir=args.data_dir or FASHION_MNIST_DIR, **common)


def summary(folder: Path) -> str:
    """Counts per split and the quality column's range, for the end of a build."""
    from .weight_data import SPLITS, WeightDataset

    data = WeightDataset.load(folder)
    lines = [f"{len(data)} networks in {folder} ({len(list(folder.glob('shard-*.safetensors')))} shards): "
             f"{data.spec}"]
    for name, code in SPLITS.items():
        mask = data.meta["split"] == code
        if "psnr" in data.meta:
            p = data.meta["psnr"][mask]
            stat = (f"PSNR mean {p.mean():.2f} dB (min {p.min():.2f}, max {p.max():.2f}), "
                    f"steps mean {data.meta['steps'][mask].float().mean():.0f}") if mask.any() else ""
        else:
            last = mask & (data.meta["epoch"] == data.meta["epoch"].max())
            acc = data.meta["test_accuracy"][last]
            stat = (f"{int(last.sum())} models; final-epoch test accuracy {acc.min():.3f} .. {acc.max():.3f} "
                    f"(mean {acc.mean():.3f})") if last.any() else ""
        lines.append(f"  {name:<5} {int(mask.sum()):>7}  {stat}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .weight_data import WeightDataError, missing_shards

    if args.threads:
        from metaopt.cpu import set_worker_threads

        set_worker_threads(args.threads)
    try:
        out = _build(args)
    except FileNotFoundError as e:  # the Fashion-MNIST files
        print(f"error: {e}\n(on the command line, point --data-dir at that folder)", file=sys.stderr)
        return 2
    except (ValueError, WeightDataError) as e:  # bad options, recipe mismatch
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = missing_shards(out)
    if missing:  # shards other processes are building
        print(f"worker {args.worker[0]}/{args.worker[1]}: done; {len(missing)} shard(s) of {out} are being built by "
              f"other processes, the folder loads once every worker has finished")
        return 0
    print(summary(out))
    print(f"load it with: tasks.weight_data.WeightDataset.load({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
