"""``python -m meta_train``: meta-train on a suite, log to TensorBoard, checkpoint, resume.

::

    python -m meta_train --suite tiny --outer-steps 200 --logdir runs/tiny
    python -m meta_train --logdir runs/tiny --resume --outer-steps 400     # continue (and extend) it
    torchrun --nproc_per_node=4 -m meta_train --suite small --num-groups 8 --logdir runs/s
    tensorboard --logdir runs

Every config field is a flag (``--estimator es``, ``--sigma 0.02``, ``--no-antithetic``...) and can
come from ``--config FILE.yaml``; the resolved config is saved as ``LOGDIR/config.yaml``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import CheckpointDir, atomic_write
from .config import RESUMABLE_OVERRIDES, Config, ConfigError, add_config_flags, cli_overrides, config_from_args

__all__ = ["main", "build_parser", "resolve_config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meta_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", help="run directory: config.yaml, checkpoints/, tb/, metrics.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --logdir from its latest checkpoint (starts it if there is none)")
    p.add_argument("--config", help="YAML file of config fields (flags given explicitly win)")
    p.add_argument("--list-suites", action="store_true", help="print the registered suites and exit")
    add_config_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The run's config, and whether there is a previous run to continue."""
    from .suites import get_suite
    logdir = Path(args.logdir)
    saved_path = logdir / "config.yaml"
    has_run = saved_path.exists() or CheckpointDir(logdir / "checkpoints").latest() is not None
    if args.resume and saved_path.exists():
        saved = Config.from_yaml(saved_path)
        given = cli_overrides(args)
        if args.config:
            given = {**Config.from_yaml(args.config, base=saved).to_dict(), **given}
        changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
        locked = sorted(k for k in changed if k not in RESUMABLE_OVERRIDES)
        if locked:
            desc = ", ".join(f"{k}: saved {getattr(saved, k)!r}, given {changed[k]!r}" for k in locked)
            raise ConfigError(f"--resume cannot change {desc}; only {sorted(RESUMABLE_OVERRIDES)} may change. "
                              "Start a new --logdir to change the others.")
        return saved.replace(**changed), True
    if has_run and not args.resume:
        raise ConfigError(f"{logdir} already holds a run; pass --resume to continue it or choose another --logdir")
    suite = args.suite
    if suite is None and args.config:
        suite = Config.from_yaml(args.config).suite
    suite = suite or Config().suite
    return config_from_args(args, dict(get_suite(suite).defaults, suite=suite)), False


def export_optimizer(problem, meta_params, path: Path, **metadata) -> bool:
    """Save a meta-trained ``metaopt`` LearnedOptimizer where ``MetaNetOptimizer(learned=path)`` reads it."""
    from metaopt.optim import LearnedOptimizer, save_learned
    opt = getattr(problem, "opt", None)
    if not isinstance(opt, LearnedOptimizer):
        return False
    exported = LearnedOptimizer(opt.config)
    exported.load_state_dict({k: v.detach().cpu() for k, v in meta_params.items()})
    save_learned(exported, path, **{k: str(v) for k, v in metadata.items()})
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .suites import SUITES, build_problem
    if args.list_suites:
        for s in SUITES.values():
            print(f"{s.name:8s} {s.description}")
        return 0
    if not args.logdir:
        print("error: --logdir is required", file=sys.stderr)
        return 2
    try:
        config, resuming = resolve_config(args)
    except (ConfigError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .distributed import init_distributed
    from .evaluate import MetaEvaluator
    from .loop import MetaTrainer

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    dist = init_distributed(config.device)
    try:
        logdir = Path(args.logdir)
        if dist.is_main:
            logdir.mkdir(parents=True, exist_ok=True)
            atomic_write(logdir / "config.yaml", config.to_yaml())
        # Global RNGs seed whatever the suite's constructors draw (e.g. metanetwork init).
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        problem = build_problem(config, dist.device)
        evaluator = None
        if config.eval_every and dist.is_main:
            eval_problem = build_problem(config.replace(augment_scale=0.0, meta_loss="mean", family_weights=[]),
                                         dist.device)
            evaluator = MetaEvaluator(eval_problem, lrs=config.eval_lrs, num_tasks=config.eval_tasks,
                                      num_steps=config.eval_steps, seed=config.eval_seed)
        trainer = MetaTrainer(config, problem, logdir, dist=dist, resume=resuming, evaluator=evaluator)
        if resuming and dist.is_main:
            print(f"meta_train: resuming {logdir} at outer step {trainer.step}", file=sys.stderr)
        result = trainer.train()
        if dist.is_main:
            import safetensors.torch
            atomic_write(logdir / "meta_params.safetensors", safetensors.torch.save(
                {k: v.detach().cpu().contiguous() for k, v in trainer.meta_params().items()}))
            export_optimizer(problem, trainer.meta_params(), logdir / "optimizer.safetensors",
                             suite=config.suite, outer_step=result["step"], seed=config.seed)
            print(f"meta_train: step {result['step']}/{config.outer_steps}, meta-loss "
                  f"{result.get('meta_loss', float('nan')):.5g}, skipped {result['skipped']}; logs in {logdir}",
                  file=sys.stderr)
        return 130 if result["stopped"] else 0
    finally:
        dist.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
