"""One config for a meta-training run: a dataclass, loadable from YAML and CLI flags.

Precedence, lowest first: dataclass defaults < the suite's recommended defaults < ``--config FILE``
< explicit CLI flags. The resolved config is written to ``LOGDIR/config.yaml`` so a run can be
resumed (and reproduced) from its directory alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["Config", "ConfigError", "ADAM_LR_GRID", "RESUMABLE_OVERRIDES", "add_config_flags", "config_from_args"]

# Half-decade grid for the Adam baseline.
ADAM_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

# Fields that may change on --resume without changing what the run computes.
RESUMABLE_OVERRIDES = frozenset({
    "outer_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "progress",
    "torch_threads", "device", "eval_tasks", "eval_steps", "eval_lrs",
})


class ConfigError(ValueError):
    """A config value or combination that cannot run."""


def _f(default: Any, help: str, choices: Sequence[Any] | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class Config:
    # what to train on
    suite: str = _f("tiny", "task suite name (see meta_train.suites.SUITES)")
    seed: int = _f(0, "seeds every random draw of the run; same seed, same run")
    outer_steps: int = _f(100, "number of outer (meta) updates")
    init_from: str = _f("", "start the meta-parameters from this safetensors file (a run's "
                        "optimizer.safetensors or meta_params.safetensors, or the shipped default) instead "
                        "of the suite's fresh initialisation; fine-tunes a learned optimizer")
    # gradient estimator
    estimator: str = _f("pes", "meta-gradient estimator", choices=("pes", "es", "tbptt"))
    sigma: float = _f(0.01, "ES/PES perturbation std")
    antithetic: bool = _f(True, "ES/PES: antithetic pairs (theta+eps, theta-eps); else (theta, theta+eps)")
    loss_transform: str = _f("none", "ES/PES: transform of the loss difference before weighting eps",
                             choices=("none", "relative", "sign"))
    meta_loss: str = _f("mean", "mean training loss over the truncation, its final-step loss, or mean "
                        "validation loss", choices=("mean", "final", "val"))
    second_order: bool = _f(False, "TBPTT: differentiate through the inner gradients too")
    # what one outer step simulates
    num_groups: int = _f(1, "independent task groups per outer step (split across workers)")
    tasks_per_group: int = _f(8, "tasks run as one batched population in each group")
    truncation_length: int = _f(10, "inner steps per truncated unroll")
    min_horizon: int = _f(50, "shortest inner run (log-uniform between min and max)")
    max_horizon: int = _f(200, "longest inner run")
    stagger: bool = _f(True, "cut each group's first inner run at a random point so groups reset at "
                       "different times and truncations cover whole runs")
    family_weights: list = _f([], "sampling weight of each of the suite's task families, in suite order "
                              "(empty: uniform)")
    augment_scale: float = _f(0.0, "task augmentation: rescale task parameters by a log-uniform factor "
                              "in [1/a, a] (0 disables)")
    # the learned rule (suites that train metaopt's LearnedOptimizer: small, large)
    max_mix: float = _f(0.5, "bound of the rule's additive gradient and parameter terms; 0 leaves only "
                        "per-neuron scales of Adam's direction")
    refresh_every: int = _f(1, "run the metanetwork every N inner steps, reusing its outputs in between")
    late_refresh_every: int = _f(0, "after the rule's warm-up (its first 100 inner steps), run the metanetwork "
                                 "every N inner steps instead (0: refresh_every throughout)")
    mix_decay_from: int = _f(0, "late phase: from inner step T = this on, the additive terms fade as T / t "
                             "(0: off)")
    amsgrad_from: int = _f(0, "late phase: from this inner step on, the second moment is AMSGrad's running "
                           "maximum (0: off)")
    lr_decay_from: int = _f(0, "late phase: from inner step D = this on, the step size decays as sqrt(D / t) "
                            "(0: off)")
    step_size: str = _f("fixed", "the rule's step size: the suite's lr (fixed), or 1.0 times Prodigy's distance "
                        "estimate (prodigy, the shipped default's; needed to fine-tune it)", choices=("fixed", "prodigy"))
    distance_weighted_momentum: bool = _f(False, "with step_size prodigy: the first moment averages d_t * g_t, "
                                          "Prodigy's momentum (the shipped default's)")
    param_term_follows_gradient: bool = _f(False, "the rule's parameter term is scaled by min(1, rms(g) / the "
                                           "rms Adam's second moment remembers), so it vanishes with the "
                                           "gradient (the shipped default's)")
    distance_init: float = _f(1e-6, "with step_size prodigy: the distance estimate's first value, its smallest "
                              "step size per unit lr (Prodigy's: 1e-6)")
    distance_growth: float = _f(0.0, "with step_size prodigy: the distance estimate grows at most this factor per "
                                "inner step (Prodigy's growth_rate; 0: unbounded)")
    hypergradient_from: int = _f(0, "from this inner step on, where a fit is at the floor its step size allows "
                                 "(the gradient far below the remembered one), the step size shrinks while new "
                                 "gradients oppose the last step: hypergradient descent (0: off; the shipped "
                                 "default's: 100)")
    # outer optimizer
    outer_lr: float = _f(1e-3, "Adam learning rate for the meta-parameters")
    outer_betas: list = _f([0.9, 0.999], "Adam betas for the meta-parameters")
    clip_grad_norm: float = _f(1.0, "clip the meta-gradient to this global L2 norm (0 disables)")
    # evaluation, logging, checkpoints
    eval_every: int = _f(0, "meta-evaluate against Adam every N outer steps (0 disables)")
    eval_tasks: int = _f(4, "tasks in the meta-evaluation")
    eval_steps: int = _f(100, "inner steps in the meta-evaluation")
    eval_lrs: list = _f(list(ADAM_LR_GRID), "Adam learning rates of the baseline")
    eval_seed: int = _f(1234, "seed of the fixed meta-evaluation tasks")
    log_every: int = _f(1, "write scalars every N outer steps")
    checkpoint_every: int = _f(50, "checkpoint every N outer steps (and at the end)")
    keep_checkpoints: int = _f(3, "how many checkpoints to keep")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda:LOCAL_RANK when available)")
    torch_threads: int = _f(0, "torch.set_num_threads (0 leaves the default)")
    progress: bool = _f(True, "show a tqdm progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"config field {f.name!r} = {getattr(self, f.name)!r}; choose from {list(choices)}")
        positive = ("outer_steps", "refresh_every", "num_groups", "tasks_per_group", "truncation_length",
                    "min_horizon", "log_every", "checkpoint_every", "keep_checkpoints", "eval_tasks", "eval_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.max_horizon < self.min_horizon:
            raise ConfigError(f"max_horizon ({self.max_horizon}) < min_horizon ({self.min_horizon})")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ConfigError(f"sigma must be a positive number, got {self.sigma}")
        if self.clip_grad_norm < 0 or self.eval_every < 0 or self.augment_scale < 0 or not self.max_mix >= 0 \
                or min(self.mix_decay_from, self.amsgrad_from, self.lr_decay_from, self.late_refresh_every,
                       self.hypergradient_from) < 0:
            raise ConfigError("clip_grad_norm, eval_every, augment_scale, max_mix, mix_decay_from, amsgrad_from, "
                              "lr_decay_from, late_refresh_every and hypergradient_from must be >= 0")
        if self.distance_growth and not (1 <= self.distance_growth < math.inf):
            raise ConfigError(f"distance_growth is a factor >= 1 (or 0 for unbounded), got {self.distance_growth}")
        if not (0 < self.distance_init < math.inf):
            raise ConfigError(f"distance_init must be a positive number, got {self.distance_init}")
        if self.augment_scale and self.augment_scale < 1:
            raise ConfigError(f"augment_scale is a factor >= 1 (or 0 to disable), got {self.augment_scale}")
        if any(not (w >= 0 and math.isfinite(w)) for w in self.family_weights) or \
                (self.family_weights and not sum(self.family_weights) > 0):
            raise ConfigError(f"family_weights must be non-negative numbers, not all zero; got {self.family_weights}")
        if len(self.outer_betas) != 2:
            raise ConfigError(f"outer_betas needs two numbers, got {self.outer_betas}")

    # --- YAML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "Config | None" = None) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        values = (base or cls()).to_dict() if base is not None else {}
        values.update(data)
        return cls(**values)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path, base: "Config | None" = None) -> "Config":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(data, base=base)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


# --- CLI ------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (``--outer-steps``...); defaults are None so we know what was given."""
    group = parser.add_argument_group("config (also settable in --config YAML)")
    for f in fields(Config):
        kw: dict[str, Any] = {"default": None, "dest": f.name, "help": f.metadata.get("help", "")}
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.type in ("list", list):
            kw["nargs"] = "+"
            kw["type"] = float
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, str)  # type: ignore[arg-type]
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f.name), **kw)


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields that were given explicitly on the command line."""
    out = {}
    for f in fields(Config):
        v = getattr(args, f.name, None)
        if v is not None:
            out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def config_from_args(args: argparse.Namespace, suite_defaults: dict[str, Any] | None = None) -> Config:
    """defaults < suite defaults < --config YAML < explicit flags."""
    values = Config().to_dict()
    values.update(suite_defaults or {})
    if getattr(args, "config", None):
        values = Config.from_yaml(args.config, base=Config(**values)).to_dict()
    values.update(cli_overrides(args))
    return Config(**values)
