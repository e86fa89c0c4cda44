"""The outer loop: truncation schedules, combining estimates, Adam on the meta-parameters,
logging, meta-evaluation, and checkpoints that make a run resumable bit for bit.

One outer step: every task group this worker owns advances one truncation and yields an
:class:`~meta_train.estimators.Estimate`; estimates are combined across groups and workers
(:mod:`meta_train.distributed`); a finite meta-gradient is clipped and given to Adam, a non-finite
one is skipped (counted, warned about, and the offending groups restart with fresh tasks).
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metaopt.optim.checkpoint import CheckpointError as LearnedFileError, check_meta_tensors

from .checkpoint import (CheckpointDir, CheckpointError, atomic_write, capture_rng, decode_tree, encode_tree,
                         read_tensor_file, restore_rng, write_tensor_file)
from .config import RESUMABLE_OVERRIDES, Config
from .distributed import DistContext, owned_groups
from .estimators import Estimate, GradientEstimator, Particles, make_estimator
from .problem import MetaProblem, map_tensors

__all__ = ["TruncationSchedule", "GroupState", "MetaTrainer", "group_seed", "NonFiniteMetaGradient"]


class NonFiniteMetaGradient(RuntimeWarning):
    """A meta-gradient with NaN/inf entries; the outer update was skipped."""


def group_seed(seed: int, group: int) -> int:
    """Independent, well-mixed generator seeds per task group (and per purpose)."""
    return int(np.random.SeedSequence([seed, group]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TruncationSchedule:
    """Inner runs of log-uniform length, cut into truncations of ``truncation_length`` steps.

    Long and short inner runs both matter (a learned optimizer must not only be good at step 50),
    hence log-uniform horizons. With ``stagger``, a group's first run is entered at a uniformly
    random step, so groups reset at different times and, at any outer step, the truncations being
    estimated sit at all phases of an inner run instead of all at its start.
    """

    truncation_length: int
    min_horizon: int
    max_horizon: int
    stagger: bool = True

    def sample_horizon(self, generator: torch.Generator) -> int:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        lo, hi = math.log(self.min_horizon), math.log(self.max_horizon)
        return max(1, int(round(math.exp(lo + u * (hi - lo)))))

    def first_offset(self, horizon: int, generator: torch.Generator) -> int:
        return int(torch.randint(0, horizon, (), generator=generator)) if self.stagger else 0

    def length(self, step: int, horizon: int) -> int:
        return min(self.truncation_length, horizon - step)


@dataclass
class GroupState:
    """A task group's place in its inner run (``step`` of ``horizon``) and its estimator particles."""

    gid: int
    generator: torch.Generator
    particles: Particles | None = None
    step: int = 0
    horizon: int = 0
    runs: int = 0


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (and checkpoint there)."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested:  # second Ctrl-C: stop now
                signal.signal(signum, old[signum])
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write(f"meta_train: got signal {signum}; stopping after this outer step (again to abort)")

        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# learned-optimizer settings a fine-tune may change: how the rule uses the metanetwork's outputs
# (how often it runs, how far the additive terms reach, its late phase, how the momentum follows the
# step size, whether the parameter term follows the gradient, the step size's hypergradient factor,
# where the distance estimate starts and how fast it may grow),
# not what the meta-parameters mean
RETUNABLE = frozenset({"refresh_every", "late_refresh_every", "max_mix", "mix_decay_from", "amsgrad_from", "lr_decay_from",
                       "distance_weighted_momentum", "param_term_follows_gradient", "hypergradient_from",
                       "distance_init", "distance_growth"})


def _warm_start(init: dict[str, Tensor], path: str, problem: MetaProblem) -> dict[str, Tensor]:
    """The meta-parameters saved in ``path``, checked against the problem's names, shapes and config."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            saved, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"init_from {path}: cannot read it as safetensors ({e})") from e
    try:  # the same checks as loading a learned optimizer; raised as this package's CheckpointError
        check_meta_tensors(init, saved, f"init_from {path}")
    except LearnedFileError as e:
        raise CheckpointError(str(e)) from None
    mine = getattr(getattr(problem, "opt", None), "config", None)
    if "config" in metadata and hasattr(mine, "from_dict"):  # a learned-optimizer file says what it was made for
        try:
            theirs = type(mine).from_dict(json.loads(metadata["config"]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"init_from {path}: bad learned-optimizer config ({e})") from e
        differ = sorted(k for k, v in mine.to_dict().items() if getattr(theirs, k) != v and k not in RETUNABLE)
        if differ:
            raise CheckpointError(f"init_from {path}: made for a learned optimizer with other settings ("
                                  + ", ".join(f"{k}: file {getattr(theirs, k)!r} vs suite {getattr(mine, k)!r}"
                                              for k in differ) + ")")
    return {k: saved[k].to(init[k].device, init[k].dtype) for k in init}


class MetaTrainer:
    """Meta-trains ``problem`` as ``config`` says; ``train()`` runs (or resumes) to ``outer_steps``."""

    def __init__(self, config: Config, problem: MetaProblem, logdir: str | Path | None = None, *,
                 dist: DistContext | None = None, estimator: GradientEstimator | None = None,
                 resume: bool = False, evaluator: Any | None = None):
        self.config, self.problem = config, problem
        self.dist = dist or DistContext(device=torch.device(getattr(problem, "device", "cpu")))
        self.estimator = estimator or make_estimator(config)
        self.schedule = TruncationSchedule(config.truncation_length, config.min_horizon, config.max_horizon,
                                           config.stagger)
        init = problem.init_meta_params()
        if config.init_from:
            init = _warm_start(init, config.init_from, problem)
        self.names = list(init)
        self.meta = {k: nn.Parameter(v.detach().clone()) for k, v in init.items()}
        self.outer_opt = torch.optim.Adam(list(self.meta.values()), lr=config.outer_lr,
                                          betas=tuple(config.outer_betas))
        self.groups = [GroupState(g, torch.Generator().manual_seed(group_seed(config.seed, g)))
                       for g in owned_groups(config.num_groups, self.dist.rank, self.dist.world_size)]
        self.step = 0
        self.skipped = 0
        self.logdir = Path(logdir) if logdir is not None else None
        self.ckpt = CheckpointDir(self.logdir / "checkpoints") if self.logdir is not None else None
        self._evaluator = evaluator
        self._stop = _StopFlag()
        self.last_metrics: dict[str, Any] = {}
        if resume:
            self.load_latest()

    # --- one outer step -----------------------------------------------------------------------
    def meta_params(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self.meta.items()}

    def _new_run(self, group: GroupState, theta: dict[str, Tensor]) -> None:
        g = group.generator
        group.horizon = self.schedule.sample_horizon(g)
        group.step = self.schedule.first_offset(group.horizon, g) if group.runs == 0 else 0
        group.particles = self.estimator.start(self.problem, theta, self.config.tasks_per_group, g)
        group.runs += 1

    def estimate(self) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Advance every owned group one truncation; the combined meta-gradient and its statistics."""
        theta = self.meta_params()
        local: dict[int, Estimate] = {}
        for group in self.groups:
            if group.particles is None or group.step >= group.horizon:
                self._new_run(group, theta)
            k = self.schedule.length(group.step, group.horizon)
            est, group.particles = self.estimator.estimate(self.problem, theta, group.particles, k, group.generator)
            group.step += k
            local[group.gid] = est
            if not all(bool(torch.isfinite(v).all()) for v in est.grad.values()):
                group.particles = None  # diverged tasks: start this group afresh next step
        return self._combine(local)

    def _combine(self, local: dict[int, Estimate]) -> tuple[dict[str, Tensor], dict[str, float]]:
        sizes = [self.meta[k].numel() for k in self.names]
        d, g = sum(sizes), self.config.num_groups
        buf = torch.zeros(g, d + 5, dtype=torch.float64)
        for gid, est in local.items():
            buf[gid, :d] = torch.cat([est.grad[k].detach().reshape(-1).double().cpu() for k in self.names])
            buf[gid, d:] = torch.tensor([est.loss, est.num_samples, est.sq_norm_sum, est.particle_steps,
                                         float(self._stop.requested)], dtype=torch.float64)
        buf = self.dist.all_reduce_sum(buf)  # each row has exactly one nonzero contributor: exact
        flat = buf[:, :d].sum(dim=0) / g
        n = float(buf[:, d + 1].sum())
        sq = float(buf[:, d + 2].sum())
        mean_sq = float((flat**2).sum())
        var = (sq - n * mean_sq) / (n - 1) / n if n > 1 else float("nan")
        stats = {"meta_loss": float(buf[:, d].sum() / g), "grad_variance": var,
                 "particle_steps": float(buf[:, d + 3].sum()), "stop": float(buf[:, d + 4].max())}
        grads, off = {}, 0
        for k, size in zip(self.names, sizes):
            p = self.meta[k]
            grads[k] = flat[off:off + size].reshape(p.shape).to(device=p.device, dtype=p.dtype)
            off += size
        return grads, stats

    def outer_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        grads, stats = self.estimate()
        finite = all(bool(torch.isfinite(v).all()) for v in grads.values())
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in grads.values())) if finite else float("nan")
        if finite:
            for k, p in self.meta.items():
                p.grad = grads[k]
            if self.config.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(self.meta.values()), self.config.clip_grad_norm)
            self.outer_opt.step()
            self.outer_opt.zero_grad(set_to_none=True)
        else:
            self.skipped += 1
            msg = (f"non-finite meta-gradient at outer step {self.step + 1}; update skipped "
                   f"({self.skipped} so far), diverged task groups restart")
            warnings.warn(msg, NonFiniteMetaGradient, stacklevel=2)
        self.step += 1
        dt = time.perf_counter() - t0
        var = stats["grad_variance"]
        self.last_metrics = {
            "step": self.step, "meta_loss": stats["meta_loss"], "grad_norm": norm, "grad_variance": var,
            # |mean|^2 overestimates |true gradient|^2 by the variance; subtract it (can go below 0).
            "grad_snr": (norm**2 - var) / var if finite and var > 0 else float("nan"), "skipped": not finite,
            "skipped_total": self.skipped, "inner_steps_per_s": stats["particle_steps"] / max(dt, 1e-9),
            "seconds": dt, "stop": bool(stats["stop"]),
        }
        return self.last_metrics

    # --- the run --------------------------------------------------------------------------------
    def train(self, outer_steps: int | None = None) -> dict[str, Any]:
        cfg = self.config
        total = outer_steps or cfg.outer_steps
        main = self.dist.is_main
        writer = metrics_file = eval_file = None
        if main and self.logdir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.logdir.mkdir(parents=True, exist_ok=True)
            writer = SummaryWriter(str(self.logdir / "tb"), purge_step=self.step + 1 if self.step else None)
            metrics_file = self._open_metrics("metrics.jsonl")
            eval_file = self._open_metrics("meta_eval.jsonl") if cfg.eval_every else None
        bar = tqdm(total=total, initial=self.step, desc="meta-train", unit="step", dynamic_ncols=True,
                   disable=not (main and cfg.progress), leave=True)
        stopped = False
        try:
            if cfg.eval_every and self.step == 0 and main:
                self._meta_eval(writer, eval_file)
            with self._stop.installed():
                while self.step < total:
                    m = self.outer_step()
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{m['meta_loss']:.4g}", inner_steps_s=f"{m['inner_steps_per_s']:.3g}",
                                    refresh=False)
                    if main and (self.step % cfg.log_every == 0 or self.step == total):
                        self._log(writer, metrics_file, m)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and main:
                        self._meta_eval(writer, eval_file)
                    stopped = m["stop"]
                    if self.ckpt is not None and (self.step % cfg.checkpoint_every == 0 or self.step == total
                                                  or stopped):
                        self.save_checkpoint()
                    if stopped:
                        tqdm.write(f"meta_train: stopped at outer step {self.step}; continue with --resume")
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            for f in (metrics_file, eval_file):
                if f is not None:
                    f.close()
        return {"step": self.step, "stopped": stopped, "skipped": self.skipped, **{
            k: v for k, v in self.last_metrics.items() if k in ("meta_loss", "grad_norm")}}

    def _open_metrics(self, name: str):
        """A JSON-lines log, cut back to the resumed step so every step appears exactly once."""
        path = self.logdir / name
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if rec.get("step", math.inf) <= self.step:
                    kept.append(line)
            atomic_write(path, "".join(s + "\n" for s in kept))
        return path.open("a")

    def _log(self, writer, metrics_file, m: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps({k: v for k, v in m.items() if k != "stop"}) + "\n")
            metrics_file.flush()
        if writer is None:
            return
        s = m["step"]
        writer.add_scalar("meta/loss", m["meta_loss"], s)
        writer.add_scalar("meta/skipped_nonfinite", m["skipped_total"], s)
        writer.add_scalar("meta/outer_lr", self.outer_opt.param_groups[0]["lr"], s)
        for key, tag in (("grad_norm", "meta/grad_norm"), ("grad_variance", "estimator/variance"),
                         ("grad_snr", "estimator/snr")):
            if math.isfinite(m[key]):
                writer.add_scalar(tag, m[key], s)
        writer.add_scalar("throughput/inner_steps_per_s", m["inner_steps_per_s"], s)
        writer.add_scalar("throughput/outer_steps_per_s", 1.0 / max(m["seconds"], 1e-9), s)
        if all(p.numel() == 1 for p in self.meta.values()) and len(self.meta) <= 16:
            for k, p in self.meta.items():
                writer.add_scalar(f"meta_params/{k}", float(p.detach()), s)

    def _meta_eval(self, writer, eval_file=None) -> None:
        from .evaluate import MetaEvaluator
        if self._evaluator is None:
            cfg = self.config
            self._evaluator = MetaEvaluator(self.problem, lrs=cfg.eval_lrs, num_tasks=cfg.eval_tasks,
                                            num_steps=cfg.eval_steps, seed=cfg.eval_seed)
        result = self._evaluator(self.meta_params())
        summary = result.summary()
        if eval_file is not None:
            rows = {name: {**row, "adam": {str(lr): v for lr, v in row["adam"].items()}} for name, row in summary.items()}
            eval_file.write(json.dumps({"step": self.step, **rows}) + "\n")
            eval_file.flush()
        if writer is None:
            return
        for name, row in summary.items():
            tag = f"meta_eval/{name}"
            writer.add_scalar(f"{tag}/learned_final_loss", row["learned"], self.step)
            writer.add_scalar(f"{tag}/adam_best_final_loss", row["adam_best"], self.step)
            writer.add_scalar(f"{tag}/learned_over_adam_best", row["ratio"], self.step)
        writer.add_figure("meta_eval/curves", result.figure(), self.step)

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Every rank writes its groups; rank 0 writes the rest and commits after a barrier."""
        if self.ckpt is None:
            raise CheckpointError("this trainer has no logdir to checkpoint into")
        d = self.ckpt.prepare(self.step)
        tensors: dict[str, Tensor] = {}
        groups = {}
        for grp in self.groups:
            pre = f"g{grp.gid}"
            tensors[f"{pre}/generator"] = grp.generator.get_state()
            p = grp.particles
            groups[str(grp.gid)] = {
                "step": grp.step, "horizon": grp.horizon, "runs": grp.runs,
                "inner": None if p is None else encode_tree(p.inner, f"{pre}/inner", tensors),
                "extra": None if p is None else encode_tree(p.extra, f"{pre}/extra", tensors)}
        write_tensor_file(d / f"groups-rank{self.dist.rank}", tensors, {"groups": groups})
        if self.dist.is_main:
            main: dict[str, Tensor] = {f"meta/{k}": p.detach() for k, p in self.meta.items()}
            opt_state = self.outer_opt.state_dict()
            adam = {}
            for idx, st in opt_state["state"].items():
                adam[str(idx)] = {}
                for key, val in st.items():
                    if isinstance(val, Tensor):
                        main[f"adam/{idx}/{key}"] = val
                        adam[str(idx)][key] = None
                    else:
                        adam[str(idx)][key] = val
            groups_json = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in pg.items()}
                           for pg in opt_state["param_groups"]]
            meta = {"step": self.step, "skipped": self.skipped, "config": self.config.to_dict(),
                    "meta_params": {k: list(p.shape) for k, p in self.meta.items()},
                    "adam_state": adam, "adam_param_groups": groups_json, "world_size": self.dist.world_size,
                    "num_groups": self.config.num_groups, "rng": capture_rng(main)}
            write_tensor_file(d / "main", main, meta)
        self.dist.barrier()
        if self.dist.is_main:
            self.ckpt.commit(self.step)
            self.ckpt.prune(self.config.keep_checkpoints)
        self.dist.barrier()
        return d

    def load_latest(self) -> bool:
        """Continue from the newest committed checkpoint; False when there is none yet."""
        if self.ckpt is None:
            raise CheckpointError("resume needs a logdir")
        d = self.ckpt.latest()
        if d is None:
            return False
        tensors, meta = read_tensor_file(d / "main")
        self._check_compatible(d, meta)
        dev = self.dist.device
        with torch.no_grad():
            for k, p in self.meta.items():
                p.copy_(tensors[f"meta/{k}"])
        state = {}
        for idx, st in meta["adam_state"].items():
            state[int(idx)] = {key: (tensors[f"adam/{idx}/{key}"] if val is None else val) for key, val in st.items()}
        pgs = [dict(pg, betas=tuple(pg["betas"])) if "betas" in pg else pg for pg in meta["adam_param_groups"]]
        try:
            self.outer_opt.load_state_dict({"state": state, "param_groups": pgs})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"outer optimizer state in {d / 'main.json'} does not fit this run: {e}") from e
        restore_rng(tensors, meta["rng"])
        self.step, self.skipped = int(meta["step"]), int(meta["skipped"])
        # Group states may have been written by a different number of workers: look them up by id.
        wanted = {grp.gid: grp for grp in self.groups}
        found: set[int] = set()
        for shard in sorted(d.glob("groups-rank*.json")):
            side = json.loads(shard.read_text()) if shard.exists() else {}
            ids = {int(g) for g in side.get("meta", {}).get("groups", {})}
            if not ids & set(wanted):
                continue
            gt, gm = read_tensor_file(shard.with_suffix(""))
            for gid_s, info in gm["groups"].items():
                grp = wanted.get(int(gid_s))
                if grp is None:
                    continue
                grp.generator.set_state(gt[f"g{gid_s}/generator"])
                grp.step, grp.horizon, grp.runs = info["step"], info["horizon"], info["runs"]
                if info["inner"] is None:
                    grp.particles = None
                else:
                    to_dev = lambda t: t.to(dev)  # noqa: E731
                    grp.particles = Particles(map_tensors(to_dev, decode_tree(info["inner"], gt)),
                                              map_tensors(to_dev, decode_tree(info["extra"], gt)))
                found.add(int(gid_s))
        missing = sorted(set(wanted) - found)
        if missing:
            raise CheckpointError(f"checkpoint {d} has no state for task group(s) {missing}: a groups-rank*.json/"
                                  ".safetensors file is missing")
        if self.dist.is_main:
            self.ckpt.prune(self.config.keep_checkpoints)  # drop half-written newer step dirs
        return True

    def _check_compatible(self, d: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("config", {})
        mine = self.config.to_dict()
        differ = sorted(k for k in mine if k not in RESUMABLE_OVERRIDES and k in saved and saved[k] != mine[k])
        if differ:
            pairs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {mine[k]!r}" for k in differ)
            raise CheckpointError(f"checkpoint {d} was made with a different config ({pairs})")
        shapes = meta.get("meta_params", {})
        if list(shapes) != self.names:
            raise CheckpointError(f"checkpoint {d} has meta-parameters {list(shapes)}, but the problem has "
                                  f"{self.names}: the metanetwork changed")
        for k, p in self.meta.items():
            if list(p.shape) != shapes[k]:
                raise CheckpointError(f"checkpoint {d}: meta-parameter {k!r} has shape {shapes[k]}, the problem's "
                                      f"has {list(p.shape)}: the metanetwork changed")
