"""Evaluate meta-parameters against Adam on fixed tasks: a markdown table and loss-curve PNGs.

Adam gets a half-decade learning-rate grid and is judged at its best rate per task family, which is
the comparison a learned optimizer has to win. Learned optimizer and Adam see the same tasks, the
same initializations and the same minibatches (both replay the same generator seeds).

"Final loss" is the mean loss over the last 10% of inner steps (minibatch losses are noisy).

Command line::

    python -m meta_train.evaluate runs/a                 # latest checkpoint of a run, its suite
    python -m meta_train.evaluate runs/a/meta_params.safetensors --suite tiny --steps 500 --out eval/
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .config import ADAM_LR_GRID, Config
from .problem import MetaProblem

__all__ = ["EvalResult", "MetaEvaluator", "evaluate_against_adam", "write_report", "load_meta_params", "main"]


def _final(curves: Tensor) -> Tensor:
    """Mean over the last 10% of steps (at least one), per task."""
    k = max(1, curves.shape[-1] // 10)
    return curves[..., -k:].mean(dim=-1)


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


@dataclass
class EvalResult:
    """Loss curves ``[tasks, steps]`` per task family: the learned optimizer's and Adam's per lr."""

    learned: dict[str, Tensor]
    adam: dict[str, dict[float, Tensor]]
    lrs: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per family: final losses of learned and every Adam lr, best Adam lr, learned / best Adam."""
        out = {}
        for name, curves in self.learned.items():
            learned = float(_final(curves).mean())
            adam = {lr: float(_final(c).mean()) for lr, c in self.adam[name].items()}
            finite = {lr: v for lr, v in adam.items() if math.isfinite(v)}
            best_lr = min(finite, key=finite.get) if finite else float("nan")
            best = finite.get(best_lr, float("nan"))
            out[name] = {"learned": learned, "adam": adam, "adam_best_lr": best_lr, "adam_best": best,
                         "ratio": learned / best if best and math.isfinite(best) else float("nan")}
        return out

    def markdown(self, title: str = "Learned optimizer vs Adam") -> str:
        rows = self.summary()
        head = ["task", "learned"] + [f"Adam {lr:g}" for lr in self.lrs] + ["best Adam (lr)", "learned / best"]
        lines = [f"## {title}", "", "Final loss (mean over the last 10% of inner steps, averaged over tasks; "
                 "lower is better).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in rows.items():
            cells = [name, _fmt(r["learned"])] + [_fmt(r["adam"].get(lr, float("nan"))) for lr in self.lrs]
            edge = r["adam_best_lr"] in (min(self.lrs), max(self.lrs)) and len(self.lrs) > 1
            cells += [f"{_fmt(r['adam_best'])} ({r['adam_best_lr']:g}{'*' if edge else ''})", _fmt(r["ratio"])]
            lines.append("| " + " | ".join(cells) + " |")
        if any(r["adam_best_lr"] in (min(self.lrs), max(self.lrs)) for r in rows.values()) and len(self.lrs) > 1:
            lines += ["", "\\* Adam's best rate is at the edge of the grid; a wider grid may do better."]
        return "\n".join(lines) + "\n"

    def figure(self, name: str | None = None):
        """A matplotlib Figure (Agg canvas, no global backend change) of mean loss curves."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        names = [name] if name is not None else list(self.learned)
        fig = Figure(figsize=(5.5 * len(names), 4))
        FigureCanvasAgg(fig)
        summary = self.summary()
        for i, n in enumerate(names):
            ax = fig.add_subplot(1, len(names), i + 1)
            cmap = __import__("matplotlib").colormaps["viridis"]
            for j, (lr, c) in enumerate(self.adam[n].items()):
                best = lr == summary[n]["adam_best_lr"]
                ax.plot(c.mean(0).numpy(), color=cmap(j / max(1, len(self.adam[n]) - 1)),
                        lw=2 if best else 0.8, alpha=1 if best else 0.6, label=f"Adam {lr:g}" + (" (best)" if best else ""))
            ax.plot(self.learned[n].mean(0).numpy(), color="crimson", lw=2.5, label="learned")
            curves = torch.cat([self.learned[n].flatten()] + [c.flatten() for c in self.adam[n].values()])
            if bool((curves[torch.isfinite(curves)] > 0).all()):
                ax.set_yscale("log")
            ax.set_xlabel("inner step")
            ax.set_ylabel("loss")
            ax.set_title(n)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _eval_generator(seed: int, group: int) -> torch.Generator:
    from .loop import group_seed
    return torch.Generator().manual_seed(group_seed(seed, 1_000_000 + group))


class MetaEvaluator:
    """Fixed evaluation tasks; Adam's curves are computed once and reused for every evaluation."""

    def __init__(self, problem: MetaProblem, *, lrs: Sequence[float] = ADAM_LR_GRID, num_tasks: int = 4,
                 num_groups: int = 1, num_steps: int = 100, seed: int = 1234, progress: bool = False):
        if not hasattr(problem, "baseline_unroll"):
            raise TypeError(f"{type(problem).__name__} has no baseline_unroll, so it cannot be compared with Adam")
        self.problem, self.lrs = problem, [float(lr) for lr in lrs]
        self.num_tasks, self.num_groups, self.num_steps, self.seed = num_tasks, num_groups, num_steps, seed
        self.progress = progress
        self._adam: dict[str, dict[float, Tensor]] | None = None

    def _groups(self):
        for g in range(self.num_groups):
            gen = _eval_generator(self.seed, g)
            inner = self.problem.init_inner(self.num_tasks, gen)
            name = self.problem.task_name(inner) if hasattr(self.problem, "task_name") else "task"
            yield name, inner, gen

    @staticmethod
    def _collect(parts: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {}
        for name, c in parts:
            out.setdefault(name, []).append(c.detach().float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def adam_curves(self) -> dict[str, dict[float, Tensor]]:
        if self._adam is None:
            from tqdm.auto import tqdm
            per_lr = {}
            for lr in tqdm(self.lrs, desc="Adam baseline", disable=not self.progress, leave=False):
                parts = [(name, self.problem.baseline_unroll(lambda ps: torch.optim.Adam(ps, lr=lr), inner,
                                                             self.num_steps, gen))
                         for name, inner, gen in self._groups()]
                per_lr[lr] = self._collect(parts)
            names = next(iter(per_lr.values())).keys() if per_lr else []
            self._adam = {n: {lr: per_lr[lr][n] for lr in self.lrs} for n in names}
        return self._adam

    def learned_curves(self, meta_params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        theta = {k: v.detach() for k, v in meta_params.items()}
        with torch.no_grad():
            parts = [(name, self.problem.unroll(theta, inner, self.num_steps, gen, batched=False)[0])
                     for name, inner, gen in self._groups()]
        return self._collect(parts)

    def __call__(self, meta_params: Mapping[str, Tensor]) -> EvalResult:
        adam = self.adam_curves()
        return EvalResult(self.learned_curves(meta_params), adam, list(self.lrs))


def evaluate_against_adam(problem: MetaProblem, meta_params: Mapping[str, Tensor], *,
                          lrs: Sequence[float] = ADAM_LR_GRID, num_tasks: int = 4, num_groups: int = 1,
                          num_steps: int = 100, seed: int = 1234, progress: bool = False) -> EvalResult:
    """Run the learned optimizer and Adam (every lr) on the same ``num_groups x num_tasks`` tasks."""
    ev = MetaEvaluator(problem, lrs=lrs, num_tasks=num_tasks, num_groups=num_groups, num_steps=num_steps,
                       seed=seed, progress=progress)
    return ev(meta_params)


def write_report(result: EvalResult, out_dir: str | Path, title: str = "Learned optimizer vs Adam") -> Path:
    """``report.md`` (table + image links), ``curves-<task>.png`` per family, ``summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [result.markdown(title), ""]
    for name in result.learned:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        png = out / f"curves-{safe}.png"
        result.figure(name).savefig(png, dpi=110)
        md.append(f"![{name}]({png.name})")
    (out / "summary.json").write_text(json.dumps(
        {n: {**r, "adam": {str(k): v for k, v in r["adam"].items()}} for n, r in result.summary().items()}, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def load_meta_params(source: str | Path) -> tuple[dict[str, Tensor], Config | None]:
    """Meta-parameters from a run directory (latest checkpoint) or a ``.safetensors`` file."""
    import safetensors.torch
    from .checkpoint import CheckpointDir, CheckpointError, read_tensor_file
    src = Path(source)
    if src.is_file():
        return dict(safetensors.torch.load_file(str(src))), None
    d = CheckpointDir(src / "checkpoints").latest()
    config = Config.from_yaml(src / "config.yaml") if (src / "config.yaml").exists() else None
    if d is None:
        final = src / "meta_params.safetensors"
        if final.exists():
            return dict(safetensors.torch.load_file(str(final))), config
        raise CheckpointError(f"{src} has no checkpoint and no meta_params.safetensors")
    tensors, meta = read_tensor_file(d / "main")
    return {k.removeprefix("meta/"): v for k, v in tensors.items() if k.startswith("meta/")}, \
        config or Config.from_dict(meta["config"])


def main(argv: Sequence[str] | None = None) -> int:
    from .suites import build_problem
    p = argparse.ArgumentParser(prog="python -m meta_train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run directory or meta-parameter .safetensors file")
    p.add_argument("--suite", help="suite to evaluate on (default: the run's)")
    p.add_argument("--out", help="output directory (default: SOURCE_RUN/eval)")
    p.add_argument("--tasks", type=int, default=8, help="tasks per group")
    p.add_argument("--groups", type=int, default=2, help="task groups (each samples a family)")
    p.add_argument("--steps", type=int, help="inner steps (default: the run's max_horizon)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(ADAM_LR_GRID), help="Adam learning rates")
    p.add_argument("--seed", type=int, default=4321, help="seed of the evaluation tasks")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    meta, config = load_meta_params(args.source)
    config = config or Config()
    if args.suite:
        config = config.replace(suite=args.suite)
    # Evaluate plain tasks on training loss, without the augmentation used to meta-train.
    problem = build_problem(config.replace(augment_scale=0.0, meta_loss="mean", family_weights=[]), torch.device(args.device))
    result = evaluate_against_adam(problem, {k: v.to(args.device) for k, v in meta.items()}, lrs=args.lrs,
                                   num_tasks=args.tasks, num_groups=args.groups,
                                   num_steps=args.steps or config.max_horizon, seed=args.seed, progress=True)
    src = Path(args.source)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "eval"
    path = write_report(result, out, title=f"{config.suite}: learned optimizer vs Adam")
    print(result.markdown(f"{config.suite}: learned optimizer vs Adam"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
