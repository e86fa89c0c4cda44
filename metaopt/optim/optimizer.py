"""``MetaNetOptimizer``: the learned optimizer behind the ``torch.optim.Optimizer`` contract."""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .checkpoint import DEFAULT_PATH, CheckpointError, load_learned, load_meta_state
from .learned import PRODIGY_D0, LearnedOptimizer, LearnedOptimizerConfig, TensorMultipliers
from .structure import Structure, infer_structure, structure_from_module

# per-parameter float32 state: Adam's moments, AMSGrad's maximum from the rule's amsgrad_from on,
# with step_size "prodigy" the initial weights and the weighted gradient sum of the distance estimate,
# with the rule's hypergradient_from the step's direction (at the steps before those that read it),
# and for bfloat16 / float16 parameters their float32 master copy
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "initial_param", "grad_sum", "master_param", "last_direction")
_LOW_PRECISION = (torch.bfloat16, torch.float16)  # parameters updated through a float32 master copy
# the per-neuron coefficients of the last refresh when the learned optimizer reuses them
# (``refresh_every`` > 1); they describe all neurons, so they live in the state of the first parameter.
# Renamed from "neuron_coefficients", whose additive-term coefficients had their tensor's 1 / rms of
# the refresh step baked in (stale, and explosive for tensors that started at zero); a state dict
# that has that key drops it on load, and the next step refreshes
_COEFFICIENTS = "neuron_outputs"
_OLD_COEFFICIENTS = "neuron_coefficients"


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without a dispatch when it is already of that dtype (the step is op-bound)."""
    return t if t.dtype == dtype else t.to(dtype)


def _moments_and_direction(learned: LearnedOptimizer, params: list[Tensor], grads: list[Tensor],
                           exp_avg: list[Tensor], exp_avg_sq: list[Tensor], live: tuple[int, ...], step,
                           structure: Structure, coefficients: Tensor | None,
                           max_exp_avg_sq: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
    """Update the moments of the ``live`` tensors in place, then the learned direction of every tensor
    (and the per-neuron coefficients it used: ``coefficients`` if given, else fresh ones).
    ``max_exp_avg_sq`` given (the rule's late phase): it takes the running maximum of the second
    moment in place, and the direction reads it instead. Kernels Inductor can fuse (``compile=True``)."""
    c = learned.config
    m, v, g = ([t[i] for i in live] for t in (exp_avg, exp_avg_sq, grads))
    torch._foreach_lerp_(m, g, 1 - c.beta1)
    torch._foreach_mul_(v, c.beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - c.beta2)
    if max_exp_avg_sq is not None:
        torch._foreach_maximum_([max_exp_avg_sq[i] for i in live], v)
        exp_avg_sq = max_exp_avg_sq
    return learned.direction_and_coefficients(None, [p[None] for p in params], [gr[None] for gr in grads],
                                              [t[None] for t in exp_avg], [t[None] for t in exp_avg_sq], step,
                                              structure, coefficients)


class MetaNetOptimizer(torch.optim.Optimizer):
    """Train with a meta-learned, permutation-equivariant update rule as you would with Adam.

    Args:
        params: parameters, named parameters, or parameter groups (each may set ``lr`` and
            ``weight_decay``; weight decay is decoupled, as in AdamW).
        lr: base step size; None takes the learned optimizer's own (its ``config.lr``). With
            ``config.step_size == "prodigy"`` (the shipped default, lr 1.0) it multiplies the
            distance estimate d_t of Prodigy, kept for the whole optimizer (``distance()``), and
            the step size is lr * d_t; otherwise it is the step size itself, and an untrained
            metanetwork makes the optimizer Adam at this lr. The rule's late phase
            (``config.lr_decay_from``; the shipped default: step 100) multiplies each group's lr by
            sqrt(lr_decay_from / t) from then on, on top of any lr scheduler; from
            ``config.hypergradient_from`` (the shipped default: step 100) a factor h <= 1 on the
            whole step (``step_scale()``) shrinks it where the fit sits at its floor.
        learned: a :class:`LearnedOptimizer`, a path to a saved one, or None for the shipped default.
        module: the model, for exact weight-space structure; without it the structure is inferred
            from parameter shapes and order (``describe()`` shows what was inferred).
        compile: run the moment update and the metanetwork through ``torch.compile``: fewer,
            fused kernels per step (``benchmarks/optimizer_overhead.py --compile`` measures it),
            paid for by a compilation at the first step and whenever the model's shapes change.
        refresh_every: run the metanetwork every this many steps, throughout, and reuse its
            per-neuron coefficients in between (None: the learned optimizer's own settings, for
            the shipped default every 4th step, every 16th after step 100). Its cost does
            not shrink with the model, so on small models this is most of the step's overhead over
            Adam; docs/optimizer.md measures what it saves and what it changes.
        maximize: ascend the objective instead (as ``torch.optim.Adam(maximize=True)``): the rule
            reads the negated gradients. A group may set it too.
        step_size: "fixed" or "prodigy" to override the learned optimizer's own (the shipped
            default: "prodigy"). With "fixed", ``lr`` is the step size itself, as Adam's is, and
            must be given: the rule for policy gradients and deep saturating stacks, where the
            estimated step overshoots or never grows (docs/optimizer.md).

    The update of step t is computed in float32 whatever the parameter dtype; bfloat16 and float16
    parameters are updated through a float32 master copy kept in the state (one more tensor per
    parameter), so steps below their resolution accumulate instead of rounding away. A step whose
    gradients contain NaN or inf is skipped entirely (parameters and state untouched), with one
    warning per kind.
    """

    def __init__(self, params, lr: float | None = None, weight_decay: float = 0.0,
                 learned: LearnedOptimizer | str | os.PathLike | None = None, module: nn.Module | None = None,
                 compile: bool = False, refresh_every: int | None = None, maximize: bool = False,
                 step_size: str | None = None):
        if learned is None:
            learned = DEFAULT_PATH
        learned = learned if isinstance(learned, LearnedOptimizer) else load_learned(learned)
        if step_size is not None and step_size != learned.config.step_size:
            if step_size == "fixed" and lr is None:  # the rule's own lr multiplies an estimate: no step size
                raise ValueError("MetaNetOptimizer: step_size='fixed' makes lr the step size itself; give one "
                                 "(for example lr=1e-3, as for Adam)")
            learned = learned.with_config(step_size=step_size)
        if refresh_every is not None and (refresh_every, None) != (learned.config.refresh_every,
                                                                   learned.config.late_refresh_every):
            learned = learned.with_config(refresh_every=refresh_every, late_refresh_every=None)
        lr = learned.config.lr if lr is None else lr
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        # before the groups are added: add_param_group checks their lr against the rule
        self.learned = learned
        self.learned.requires_grad_(False)
        self._warned: set[str] = set()
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, maximize=maximize))
        self.module = module
        self._structure: Structure | None = None
        self.compile = compile
        self._compiled = None
        # the last refresh's coefficients and their TensorMultipliers, reused until the next refresh
        self._multipliers: tuple[Tensor, TensorMultipliers] | None = None
        self._learned_device: torch.device | None = None

    # ------------------------------------------------------------------ structure
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def structure(self) -> Structure:
        params = self._params()
        if self._structure is None or self._structure.num_params != len(params):
            self._structure = structure_from_module(self.module, params) if self.module is not None \
                else infer_structure([tuple(p.shape) for p in params])
            for st in self.state.values():  # coefficients of other neurons: the next step refreshes
                st.pop(_COEFFICIENTS, None)
        return self._structure

    def describe(self) -> str:
        """Which parameters form weight-space chains and which go the per-tensor path."""
        names = [n for g in self.param_groups for n in g.get("param_names", [])] or None
        return self.structure().describe(names)

    def _check_multiplier(self, lr: float) -> None:
        """An Adam-like lr with Prodigy's step size stalls training: say so (once)."""
        if self.learned.config.step_size == "prodigy" and lr < 0.1:
            self._warn_once("lr", f"MetaNetOptimizer: lr={lr:g} multiplies this rule's automatic step size "
                                  f"(Prodigy's distance estimate, which starts at {self.learned.config.distance_init:g}; "
                                  f"default lr 1.0). Below 0.1 "
                                  f"the estimate grows slowly or, from 0.01 down, not at all, and training stalls. "
                                  f"Leave lr unset, or for a fixed Adam-like step size pass step_size='fixed'")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        bad = [(i, p.dtype) for i, p in enumerate(self.param_groups[-1]["params"]) if not p.is_floating_point()]
        if bad:  # complex: a cast to float32 would silently drop the imaginary part; say so instead
            self.param_groups.pop()  # the optimizer stays as it was
            i, dtype = bad[0]
            raise TypeError(f"MetaNetOptimizer: parameter {i} of a group has dtype {dtype}; it reads real "
                            f"floating-point weights (for a complex tensor, optimize torch.view_as_real of it "
                            f"as a real parameter)")
        self._structure = None
        self._check_multiplier(self.param_groups[-1]["lr"])

    def _compiled_direction(self, device: torch.device):
        if self._compiled is None:
            # a tensor step keeps the step count out of the compiled code's guards (no recompiles);
            # on the CPU, Inductor's C++ wrapper saves Python work per call (measured; GPU: default wrapper)
            self._compiled = torch.compile(_moments_and_direction, dynamic=False,
                                           options={"cpp_wrapper": device.type == "cpu"})
        return self._compiled

    def _fused_deltas(self, params: list[Tensor], grads: list[Tensor], states: list[dict], live: list[int], step: int,
                      structure: Structure, reuse: Tensor | None,
                      max_exp_avg_sq: list[Tensor] | None, grad_norms: Tensor) -> tuple[list[Tensor], Tensor]:
        """The eager step on CPU and CUDA, as ``_moments_and_direction`` computes it, in few kernels
        and little Python: torch's fused Adam kernel updates the moments (and AMSGrad's maximum)
        and, applied to zeros at lr -1, writes Adam's bias-corrected direction into fresh buffers
        in one pass; the learned scales and additive terms then go into those buffers in place,
        spread onto the tensors once per refresh (``TensorMultipliers``), not once per step.
        The kernel reads memory flat: every tensor it gets must be contiguous (the state is)."""
        c = self.learned.config
        exp_avg, exp_avg_sq = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        second = exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq
        direction = [torch.zeros_like(m) for m in exp_avg]
        torch._fused_adam_([direction[i] for i in live], [grads[i] for i in live], [exp_avg[i] for i in live],
                           [exp_avg_sq[i] for i in live], [] if max_exp_avg_sq is None else [second[i] for i in live],
                           [torch.tensor(float(step), device=params[0].device)] * len(live),
                           amsgrad=max_exp_avg_sq is not None, lr=-1.0, beta1=c.beta1, beta2=c.beta2,
                           weight_decay=0.0, eps=c.eps, maximize=False)
        if len(live) < len(params):  # tensors without a gradient this step: their moments stand still
            bc1, bc2 = 1 - c.beta1 ** step, 1 - c.beta2 ** step
            for i in set(range(len(params))) - set(live):
                direction[i] = (exp_avg[i] / bc1) / (second[i].sqrt() / math.sqrt(bc2) + c.eps)
        coefficients = reuse
        if coefficients is None:
            batched = lambda ts: [t[None] for t in ts]  # noqa: E731 (the rule reads a population of one)
            coefficients = self.learned.neuron_coefficients(None, batched(params), batched(grads), batched(exp_avg),
                                                            batched(second), step, structure, batched(direction))
        if self._multipliers is None or self._multipliers[0] is not coefficients:
            self._multipliers = (coefficients, self.learned.tensor_multipliers(coefficients, structure))
        multipliers = self._multipliers[1]
        views = [d.view(shape) for d, shape in zip(direction, multipliers.shapes)]
        torch._foreach_mul_(views, multipliers.scale)
        if multipliers.grad_mix is not None:  # the additive terms, over this step's 1 / rms of g and p
            # per-tensor sums: torch._foreach_norm(second, 1) took 4x as long on the CPU (1M parameters)
            v_sums, p_norms = [v.sum() for v in second], torch._foreach_norm(params)
            g_square_sums = grad_norms.float().square() if c.param_term_follows_gradient else None
            g_norm, p_norm = self.learned.mix_normalisers(torch.stack(v_sums), torch.stack(p_norms).square(),
                                                          [max(p.numel(), 1) for p in params], 1 - c.beta2 ** step,
                                                          g_square_sums)
            # as Python floats (one sync): the addcmul takes them as its per-tensor scalars, with the
            # late phase's fade, instead of a multiplication of the mixes per step
            fade, n = self.learned.mix_factor(step), len(params)
            norms = torch.cat([g_norm, p_norm]).tolist()
            norms = norms if fade == 1.0 else [x * fade for x in norms]
            torch._foreach_addcmul_(views, [g.reshape(s) for g, s in zip(grads, multipliers.shapes)],
                                    multipliers.grad_mix, norms[:n])
            torch._foreach_addcmul_(views, [p.reshape(s) for p, s in zip(params, multipliers.shapes)],
                                    multipliers.param_mix, norms[n:])
        return direction, coefficients

    def distance(self) -> float | None:
        """Prodigy's current distance estimate d_t (the step size per unit lr) when the rule uses
        it (``config.step_size == "prodigy"``), else None. Kept in the first param group, so it is
        saved and restored with the state dict."""
        if self.learned.config.step_size != "prodigy":
            return None
        return self.param_groups[0].get("distance", self.learned.config.distance_init)

    def _update_distance(self, params: list[Tensor], grads: list[Tensor], states: list[dict], step: int) -> float:
        """``prodigy_distance`` over all parameters together, in place, at the steps
        ``LearnedOptimizer.distance_weights`` names: the same sums in few kernels."""
        group, weights = self.param_groups[0], self.learned.distance_weights(step)
        distance = group.get("distance", self.learned.config.distance_init)
        if weights is None:
            return distance
        lr_factor, beta3, max_growth = weights
        weight = distance * distance * lr_factor / PRODIGY_D0
        sums = [st["grad_sum"] for st in states]
        moved = torch._foreach_sub([st["initial_param"] for st in states], params)  # x_0 - x
        dots = [torch.dot(m.reshape(-1), g.reshape(-1)) for m, g in zip(moved, grads)]
        torch._foreach_mul_(sums, beta3)
        torch._foreach_add_(sums, grads, alpha=weight)
        # |s|.sum(), not torch._foreach_norm(sums, 1): 2-4x faster on the CPU (100k-1M parameters)
        l1s = [s.abs().sum() for s in sums]
        dot, l1 = torch.stack([torch.stack(dots).sum(), torch.stack(l1s).sum()]).tolist()  # one sync
        numerator = beta3 * group.get("distance_numerator", 0.0) + weight * dot
        estimate = numerator / l1 if l1 > 0 else math.nan
        if math.isfinite(estimate):
            distance = min(max(distance, estimate), distance * max_growth)
        group["distance"], group["distance_numerator"] = distance, numerator
        return distance

    def step_scale(self) -> float:
        """The hypergradient factor h on the step size (``config.hypergradient_from``; 1 before it
        and without it). Kept in the first param group, as the distance estimate is."""
        return self.param_groups[0].get("step_scale", 1.0)

    def _update_step_scale(self, grads: list[Tensor], grad_norms: Tensor, deltas: list[Tensor], states: list[dict],
                           second: list[Tensor], live: list[int], step: int) -> float:
        """``LearnedOptimizer.step_scale`` over all parameters together, at the steps it names: this
        step's gradients against the last step's directions (absent ones count as zero) and against
        ``second``, the second moment the step's direction read. The directions are kept only at the
        steps before those."""
        learned, group = self.learned, self.param_groups[0]
        if learned.adapts_step(step):
            directions = [st.pop("last_direction", None) for st in states]
            last = [(grads[i], directions[i]) for i in live if directions[i] is not None]
            if last:
                dot = torch.stack([torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in last]).sum()
                direction_square = torch.stack(torch._foreach_norm([d for _, d in last])).square().sum()
                remembered = torch.stack([v.sum() for v in second]).sum() / (1 - learned.config.beta2 ** step)
                scale = learned.step_scale(dot.new_tensor(self.step_scale()), dot, grad_norms.float().square().sum(),
                                           direction_square, remembered, step)
                group["step_scale"] = scale.item()
        if learned.adapts_step(step + 1):
            for i in live:
                states[i]["last_direction"] = deltas[i].reshape(grads[i].shape)
        return self.step_scale()

    # ------------------------------------------------------------------ step
    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        live = [p.grad is not None for p in params]
        if not any(live):
            return loss
        if any(p.grad.is_sparse for p in params if p.grad is not None):
            raise RuntimeError("MetaNetOptimizer does not support sparse gradients")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norms = torch.stack(torch._foreach_norm(grads))  # of mixed dtypes: promoted
        # one sum in float64 (no overflow of finite norms) and one sync: NaN or inf in any norm shows
        if not math.isfinite(norms.sum(dtype=torch.float64).item()):
            kind = "nan" if torch.isnan(norms).any() else "inf"
            self._warn_once(kind, f"MetaNetOptimizer: {kind} in gradients; skipping this step "
                                  f"(parameters and optimizer state unchanged)")
            return loss

        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = torch.tensor(0.0)
                # contiguous whatever the parameter's layout: the fused kernel reads memory flat
                st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        prodigy = self.learned.config.step_size == "prodigy"
        if prodigy:
            for p, st in zip(params, states):
                if "initial_param" not in st:  # the first step (or a state saved by a fixed-step rule)
                    st["initial_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format,
                                                        copy=True)
                    st["grad_sum"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        live_idx = [i for i, l in enumerate(live) if l]
        step = max(float(states[i]["step"]) for i in live_idx) + 1
        grads32 = [_cast(g, torch.float32) for g in grads]
        grads32 = [g if g.is_contiguous() else g.contiguous() for g in grads32]  # as the state (channels_last, ...)
        ascend = {id(p) for group in self.param_groups if group.get("maximize") for p in group["params"]}
        if ascend:  # the rule, its moments and its distance estimate all read the negated gradients
            grads32 = [g.neg() if id(p) in ascend else g for p, g in zip(params, grads32)]
        torch._foreach_add_([states[i]["step"] for i in live_idx], 1.0)
        device = params[0].device
        if self._learned_device != device:  # Module.to walks every parameter: only on a move
            self.learned.to(device)
            self._learned_device = device
        structure = self.structure()
        # absent after a change of structure: then this step refreshes
        reuse = None if self.learned.refreshes(step) else states[0].get(_COEFFICIENTS)
        max_exp_avg_sq = None
        if self.learned.uses_max_second_moment(step):
            for st in states:
                if "max_exp_avg_sq" not in st:  # from the first such step on: max(0, v) = v
                    st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])
            max_exp_avg_sq = [st["max_exp_avg_sq"] for st in states]
        # bfloat16 / float16 parameters are updated through a float32 master copy (the state's
        # "master_param"): a step below their resolution would otherwise be rounded away, and with
        # Prodigy's step size, which starts at 1e-6, the weights would never move and the estimate
        # never grow. A master that no longer rounds to the parameter (the parameter was set from
        # outside since the last step) is taken afresh from it
        low = [p.dtype in _LOW_PRECISION for p in params]
        for p, st, lo in zip(params, states, low):
            if lo and ("master_param" not in st or not torch.equal(st["master_param"].to(p.dtype), p)):
                st["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        params32 = [st["master_param"] if lo else _cast(p, torch.float32) for p, st, lo in zip(params, states, low)]
        lr_factor = self.learned.lr_factor(step)
        if prodigy:  # before the moments: with distance_weighted_momentum they follow d's change
            previous = self.distance()
            distance = self._update_distance(params32, grads32, states, step)
            lr_factor *= distance
            if self.learned.config.distance_weighted_momentum and distance != previous:
                torch._foreach_mul_([st["exp_avg"] for st in states], previous / distance)
        if not self.compile and device.type in ("cpu", "cuda"):  # torch has fused Adam kernels for these
            deltas, coefficients = self._fused_deltas(params32, grads32, states, live_idx, step, structure, reuse,
                                                      max_exp_avg_sq, norms)
        else:
            compute = self._compiled_direction(device) if self.compile else _moments_and_direction
            deltas, coefficients = compute(self.learned, params32, grads32, [st["exp_avg"] for st in states],
                                           [st["exp_avg_sq"] for st in states], tuple(live_idx),
                                           self.learned.step_scalars(torch.tensor(step), device)
                                           if self.compile else step, structure, reuse, max_exp_avg_sq)
        if self.learned.reuses_coefficients:
            states[0][_COEFFICIENTS] = coefficients
        if self.learned.config.hypergradient_from is not None:
            second = [st["exp_avg_sq"] for st in states] if max_exp_avg_sq is None else max_exp_avg_sq
            lr_factor *= self._update_step_scale(grads32, norms, deltas, states, second, live_idx, step)
        index = {id(p): i for i, p in enumerate(params)}
        for group in self.param_groups:
            lr, wd = group["lr"] * lr_factor, group["weight_decay"]
            chosen = [index[id(p)] for p in group["params"] if live[index[id(p)]]]
            targets = [params32[i] if low[i] else params[i] for i in chosen]  # the masters of low precision
            if not targets:
                continue
            if wd:
                torch._foreach_mul_(targets, 1 - lr * wd)
            updates = [_cast(deltas[i].view(t.shape), t.dtype) for i, t in zip(chosen, targets)]
            torch._foreach_add_(targets, updates, alpha=-lr)
            if any(low[i] for i in chosen):
                torch._foreach_copy_([params[i] for i in chosen if low[i]], [params32[i] for i in chosen if low[i]])
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["learned"] = {"config": self.learned.config.to_dict(),
                         "params": {k: v.clone() for k, v in self.learned.state_dict().items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        learned, saved_learned = self.learned, state_dict.pop("learned", None)
        if saved_learned is not None:
            try:
                config = LearnedOptimizerConfig.from_dict(saved_learned["config"])
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"optimizer state dict: bad learned-optimizer config ({e})") from e
            learned = LearnedOptimizer(config)
            load_meta_state(learned, saved_learned["params"], "optimizer state dict")
        params = self._params()
        saved = state_dict.get("state", {})
        for idx, st in saved.items():
            if not isinstance(idx, int) or idx >= len(params):
                raise CheckpointError(f"optimizer state dict: state for parameter {idx!r}, "
                                      f"but the optimizer has {len(params)} parameters")
            for key in _MOMENTS:
                if key in st and tuple(st[key].shape) != tuple(params[idx].shape):
                    raise CheckpointError(f"optimizer state dict: {key} of parameter {idx} has shape "
                                          f"{tuple(st[key].shape)}, the parameter has {tuple(params[idx].shape)}")
            if _COEFFICIENTS in st:
                need = (1, sum(sum(c.neuron_sizes) for c in self.structure().chains), learned.num_coefficients)
                if tuple(st[_COEFFICIENTS].shape) != need:
                    raise CheckpointError(f"optimizer state dict: {_COEFFICIENTS} has shape "
                                          f"{tuple(st[_COEFFICIENTS].shape)}; this model and rule need {need}")
        self.learned = learned.requires_grad_(False)
        self._learned_device, self._multipliers = None, None
        super().load_state_dict(state_dict)
        for st in self.state.values():
            st.pop(_OLD_COEFFICIENTS, None)
        # torch.optim casts state to the parameter dtype; ours stays float32 (bf16 resume is exact)
        for idx, st in saved.items():
            for key in (*_MOMENTS, _COEFFICIENTS):
                if key in st:
                    self.state[params[idx]][key] = st[key].detach().to(params[idx].device, torch.float32,
                                                                       memory_format=torch.contiguous_format, copy=True)
