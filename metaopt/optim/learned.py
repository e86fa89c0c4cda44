"""The learned optimizer as a pure function: ``init(params)`` and ``update(meta_params, ...)``.

Every tensor argument has a leading batch dimension (a population of same-architecture tasks
in meta-training; 1 inside :class:`MetaNetOptimizer`), so one implementation serves both.

The update rule, per weight tensor W (rows = neurons it writes, columns = neurons it reads):

    u  = Adam's direction  m_hat / (sqrt(v_hat) + eps)
    dW = u * exp(r[row] + c[col]) + a[row] * g / rms(g) + d[row] * W / rms(W)

where r, c, a, d are per-neuron outputs of an equivariant metanetwork (NeuronSetLinear layers)
that reads each neuron's statistics of [Adam direction, gradient, parameters] over the weights
entering and leaving it, plus time features. Outputs are bounded (tanh) and the last layer starts
at zero, so an untrained optimizer is *exactly* Adam; meta-training can only add to it.
Everything it reads is a per-tensor-normalised mean over neurons, so the update commutes with
permutations of any neuron set, and it costs a few elementwise passes over the parameters.
With ``refresh_every`` > 1, r, c, a, d come from the last refresh; rms(g) (from v_hat) and rms(W)
are always this step's. Beyond the steps meta-training showed it, the config's late phase fades
the additive terms and decays the step size (``mix_decay_from``, ``lr_decay_from``; see
LearnedOptimizerConfig). With ``step_size="prodigy"`` the step size is lr times Prodigy's distance
estimate (``prodigy_distance``), and with ``distance_weighted_momentum`` the first moment weighs
each gradient by the estimate of its step, as Prodigy's does. With ``param_term_follows_gradient``
the parameter term is also multiplied by min(1, rms(g) / rms(g) from v_hat), so it vanishes where
the gradient does, and the rule's fixed points are the loss's stationary points.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..layers.neuron import NeuronGraph, NeuronSetLinear
from .structure import Structure, infer_structure

NUM_STATS = 5  # per neuron: means of Adam's direction, g, m, v and p^2, each normalised per tensor
NUM_FLAGS = 6  # has incoming weights, has outgoing weights, lone tensor; log set size, log fan-in, log fan-out
NUM_OUTPUTS = 7  # log-scales: weight row, weight column, bias; mixes: weight grad, weight param, bias grad, bias param
STEP_SIZES = ("fixed", "prodigy")
# the functional state's keys, in the order init and update give them (those the config uses)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "initial_params", "grad_sums", "distance",
              "distance_numerator", "coefficients", "last_directions", "step_scale")
# Prodigy's first distance estimate (config.distance_init's default), far too small on purpose: it only
# grows. Also the fixed scale of the estimate's weights, which cancels in its ratio
PRODIGY_D0 = 1e-6


class StepScalars(NamedTuple):
    """What the step count t contributes: 1 - beta2^t, Adam's scale sqrt(1 - beta2^t) / (1 - beta1^t),
    its eps, the time features, and the late phase's factor on the additive terms (1 before
    ``mix_decay_from``). Floats, or 0-d / 1-d tensors for compiled callers."""

    bc2: float | Tensor
    adam_scale: float | Tensor
    eps: float | Tensor
    time: Tensor
    mix_scale: float | Tensor


class TensorMultipliers(NamedTuple):
    """A refresh's per-neuron coefficients spread onto each tensor, in the shape the tensor is read
    in (``shapes``: weights ``[B, o, i, k]``, biases ``[B, o]``) and ready to broadcast against it:
    ``delta = u * scale + grad_mix * g + param_mix * p`` (no mixes when ``max_mix`` is 0)."""

    shapes: list[tuple[int, ...]]
    scale: list[Tensor]
    grad_mix: list[Tensor] | None
    param_mix: list[Tensor] | None


@dataclass(frozen=True)
class LearnedOptimizerConfig:
    lr: float = 1e-3  # the base step size it was meta-trained with; MetaNetOptimizer's default
    hidden: int = 32
    num_layers: int = 3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_log_scale: float = 2.0  # per-neuron step-size multipliers stay within exp(+-2)
    max_mix: float = 0.5  # additive gradient/parameter terms stay within +-0.5 per normalised unit
    time_scales: tuple[float, ...] = (10.0, 100.0, 1000.0)
    # the metanetwork runs at steps 1, 1 + k, 1 + 2k, ... and its per-neuron outputs are reused in
    # between: its cost and that of the neuron statistics, fixed per step whatever the model's size,
    # amortised over k steps (Shampoo and K-FAC refresh their preconditioners the same way)
    refresh_every: int = 1
    # the late phase, beyond what meta-training showed the rule (None: off). Near a minimum the
    # gradients vanish, Adam's second moment collapses with them and the normalised steps throw a
    # converged fit out of its basin (docs/optimizer.md, "late phase"). From step mix_decay_from on,
    # the additive terms fade as mix_decay_from / t; from step amsgrad_from on, the second moment is
    # AMSGrad's running maximum, so the preconditioner cannot collapse; from step lr_decay_from on,
    # the step size decays as sqrt(lr_decay_from / t), the schedule under which normalised steps converge
    mix_decay_from: int | None = None
    amsgrad_from: int | None = None
    lr_decay_from: int | None = None
    # "fixed": the step size is lr. "prodigy": it is lr * d_t, where d_t is Prodigy's running lower
    # estimate of the distance from the initial weights to a solution (Mishchenko & Defazio 2023;
    # see prodigy_distance), so lr becomes a multiplier (1.0 in the shipped default): one rule for
    # tasks whose best Adam lr differs by 100x (docs/optimizer.md, "Step size")
    step_size: str = "fixed"
    # with step_size "prodigy": the estimate's first value d_0. It only grows from there, so d_0 is also
    # the smallest step size per unit lr: Prodigy's 1e-6 starts far below any task's scale, and on a
    # task whose early gradients point nowhere in particular (a policy gradient before any reward)
    # the weights never move far enough for the estimate to grow (docs/optimizer.md, "Step size")
    distance_init: float = PRODIGY_D0
    # with step_size "prodigy": the estimate grows at most this factor per step (Prodigy's growth_rate;
    # None: unbounded, Prodigy's default). From a start near the task's scale the estimate can jump
    # 10x within ten steps, and a deep ReLU net dies of the jump (docs/optimizer.md, "Step size")
    distance_growth: float | None = None
    # the distance estimate is updated at every step up to this one, while it grows fastest, and
    # from then on with the metanetwork, at its refresh steps (LearnedOptimizer.distance_weights)
    distance_warmup: int = 100
    # after those first distance_warmup steps, the metanetwork runs every late_refresh_every steps
    # (None: refresh_every throughout). Its per-neuron outputs move slowly by then, while its cost,
    # fixed whatever the model's size, is most of the step's overhead over Adam on small models
    late_refresh_every: int | None = None
    # with step_size "prodigy": the first moment averages d_k * g_k rather than g_k (Prodigy's own
    # momentum), kept divided by the current d. While d grows 1e4-fold in its first ~20 steps, plain
    # momentum still carries the gradients of the tiny steps at full weight into the first large
    # ones: a stale, coherent push that killed the ReLU units of autoencoders (docs/optimizer.md)
    distance_weighted_momentum: bool = False
    # the parameter term d * W / rms(W) is scaled by min(1, rms(g) / rms of the gradient that Adam's
    # second moment remembers), per tensor: 1 at step 1 and while gradients keep their size, -> 0 as
    # they vanish. Without it the term does not vanish at a minimum, so the rule's fixed points are
    # not the loss's stationary points: a fit settles where the gradient balances a constant push
    param_term_follows_gradient: bool = False
    # from this step on, the step size also answers to the loss where a fit has reached the floor
    # its step size allows (hypergradient descent, Baydin et al. 2018, in multiplicative form): a
    # factor h <= 1 for the whole run, log h += rate * from / t * (gate * cos + 1 - gate), with cos
    # that of g_t and the last step's direction and gate = max(0, 1 - rho / hypergradient_gate),
    # rho = rms(g) / the rms Adam's second moment remembers (all tensors together). At a floor the
    # gradient has collapsed (rho ~ 1e-5 on a SIREN fit at 1e-13) while the steps bounce across the
    # minimum (cos < 0): h shrinks until they stop. Elsewhere (rho > gate) h grows back to 1: on
    # minibatch and valley-shaped losses cos is negative too, and shrinking the step there slowed
    # long runs 2-40x (docs/optimizer.md, "Step size at a floor")
    hypergradient_from: int | None = None
    hypergradient_rate: float = 0.2
    hypergradient_gate: float = 0.01

    def __post_init__(self):
        if self.step_size not in STEP_SIZES:
            raise ValueError(f"step_size must be one of {STEP_SIZES}, got {self.step_size!r}")
        if not (isinstance(self.distance_init, (int, float)) and 0 < self.distance_init < math.inf):
            raise ValueError(f"distance_init must be a positive number, got {self.distance_init!r}")
        growth = self.distance_growth
        if growth is not None and not (isinstance(growth, (int, float)) and 1 <= growth < math.inf):
            raise ValueError(f"distance_growth must be None (unbounded) or a factor >= 1, got {growth!r}")
        if not (isinstance(self.distance_warmup, int) and self.distance_warmup >= 0):
            raise ValueError(f"distance_warmup must be an integer step >= 0, got {self.distance_warmup!r}")
        if not (isinstance(self.refresh_every, int) and self.refresh_every >= 1):
            raise ValueError(f"refresh_every must be an integer >= 1, got {self.refresh_every!r}")
        late = self.late_refresh_every
        if late is not None and not (isinstance(late, int) and late >= 1):
            raise ValueError(f"late_refresh_every must be an integer >= 1 or None, got {late!r}")
        for name in ("hypergradient_rate", "hypergradient_gate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("mix_decay_from", "amsgrad_from", "lr_decay_from", "hypergradient_from"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be None (off) or an integer step >= 1, got {value!r}")

    @property
    def in_features(self) -> int:
        return 3 * NUM_STATS + NUM_FLAGS + len(self.time_scales)

    @classmethod
    def from_dict(cls, d: dict) -> "LearnedOptimizerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown learned-optimizer config keys: {sorted(unknown)}")
        d = dict(d)
        if "time_scales" in d:
            d["time_scales"] = tuple(d["time_scales"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _size_features(chain, j: int) -> tuple[float, float, float]:
    """Shape of neuron set j: how good step sizes depend on width, as in fan-in scaled inits.
    Sizes are invariant to permutations, so these features keep the update equivariant."""
    fan_in = math.prod(chain.layers[j - 1].view[1:]) if j > 0 else 0
    fan_out = math.prod(chain.layers[j].view[::2]) if j < len(chain.layers) else 0
    return tuple(math.log1p(x) / math.log(1000.0) for x in (chain.neuron_sizes[j], fan_in, fan_out))


def _row_col_means(quantities: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row and per-column means of several [B, o, i, k] tensors, as [B, o, Q] and [B, i, Q].

    Small tensors are stacked first (two reductions instead of 2Q: op overhead dominates);
    large ones are reduced one by one (a stack would copy them all: memory traffic dominates)."""
    _, o, i, k = quantities[0].shape
    o, i, k = max(o, 1), max(i, 1), max(k, 1)  # a zero-element tensor: empty sums, nothing to scale
    if quantities[0][0].numel() <= 1 << 15:
        stacked = torch.stack(list(quantities))  # [Q, B, o, i, k]
        return (stacked.sum((3, 4)).permute(1, 2, 0) * (1 / (i * k)),
                stacked.sum((2, 4)).permute(1, 2, 0) * (1 / (o * k)))
    # sums, scaled once: a mean is a sum and a division, two dispatches per quantity
    return (torch.stack([q.sum((2, 3)) for q in quantities], -1) * (1 / (i * k)),
            torch.stack([q.sum((1, 3)) for q in quantities], -1) * (1 / (o * k)))


def _stat_layout(structure: Structure, device) -> tuple[Tensor, Tensor]:
    """Constant tensors to normalise all statistics at once (see ``LearnedOptimizer.direction``).

    Stat tensors are numbered in chain order: each layer's weight, then its bias. Returns
    ``tensor_average`` [T, R], averaging the concatenated per-row stats (R rows) of each tensor,
    and ``norm_index`` [N, 3 * NUM_STATS], for each neuron's (incoming, bias, outgoing) features
    the column of the flattened [T, NUM_STATS] normalisers to multiply by (``5T`` = absent, zero).
    """
    stat_of, row_sizes, per_neuron = {}, [], []
    for chain in structure.chains:
        for layer in chain.layers:
            for index in (layer.weight, layer.bias):
                if index is not None:
                    stat_of[index] = len(row_sizes)
                    row_sizes.append(layer.view[0])
        weight_ids = [stat_of[layer.weight] for layer in chain.layers]
        bias_ids = [stat_of.get(layer.bias) for layer in chain.layers]
        for j, n in enumerate(chain.neuron_sizes):
            sources = (weight_ids[j - 1] if j > 0 else None, bias_ids[j - 1] if j > 0 else None,
                       weight_ids[j] if j < len(chain.layers) else None)
            columns = [-1 if t is None else t * NUM_STATS + f for t in sources for f in range(NUM_STATS)]
            per_neuron.append(torch.tensor(columns).expand(n, -1))
    T = len(row_sizes)
    columns = torch.cat(per_neuron)
    columns = columns.where(columns >= 0, T * NUM_STATS)
    average = torch.zeros(T, sum(row_sizes))
    start = 0
    for t, n in enumerate(row_sizes):
        average[t, start:start + n] = 1.0 / max(n, 1)  # a zero-element tensor has no rows to average
        start += n
    return average.to(device), columns.to(device)


def prodigy_distance(distance: Tensor, numerator: Tensor, grad_sums: Sequence[Tensor], grads: Sequence[Tensor],
                     params: Sequence[Tensor], initial: Sequence[Tensor], lr_factor: float,
                     beta3: float, max_growth: float = math.inf) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One step of Prodigy's distance estimate for a batch of tasks (``distance``, ``numerator``: [B]).

    With steps of size ``d_k * lr_factor_k`` along any direction, ``sum_k w_k <g_k, x_0 - x_k>`` over
    ``||sum_k w_k g_k||_1`` (weights ``w_k = d_k^2 lr_factor_k / PRODIGY_D0``, both sums discounted by
    ``beta3``) is a lower estimate of the distance to the solution: Prodigy's, with the weights of its
    Adam variant. It never shrinks: ``d`` is the running maximum (a non-finite or 0/0 estimate leaves
    it), and grows at most ``max_growth``-fold. Every term is a sum over all weights, so ``d`` is
    invariant to any permutation of neurons.
    Out of place, differentiable and vmappable; returns the new (distance, numerator, grad_sums).
    """
    weight = distance * distance * (lr_factor / PRODIGY_D0)  # [B]
    dot = sum((g * (p0 - p)).reshape(g.shape[0], -1).sum(1) for g, p, p0 in zip(grads, params, initial))
    numerator = beta3 * numerator + weight * dot
    grad_sums = [torch.addcmul(beta3 * s, weight.reshape((-1,) + (1,) * (g.dim() - 1)), g)
                 for s, g in zip(grad_sums, grads)]
    l1 = sum(s.abs().reshape(s.shape[0], -1).sum(1) for s in grad_sums)
    estimate = numerator / l1
    grown = torch.maximum(distance, estimate)
    if max_growth < math.inf:
        grown = torch.minimum(grown, distance * max_growth)
    distance = torch.where((l1 > 0) & torch.isfinite(estimate), grown, distance)
    return distance, numerator, grad_sums


class LearnedOptimizer(nn.Module):
    """Holds the metanetwork; its parameters are the meta-parameters meta-training learns."""

    def __init__(self, config: LearnedOptimizerConfig | None = None):
        super().__init__()
        self.config = config = config or LearnedOptimizerConfig()
        widths = [config.in_features] + [config.hidden] * (config.num_layers - 1) + [NUM_OUTPUTS]
        self.layers = nn.ModuleList(NeuronSetLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        with torch.no_grad():  # start as Adam exactly
            for p in self.layers[-1].parameters():
                p.zero_()
        self._structures: dict = {}
        self._graphs: dict = {}

    def with_config(self, **changes) -> "LearnedOptimizer":
        """The same meta-parameters under other settings (``refresh_every=4``, ...): a new module."""
        other = LearnedOptimizer(dataclasses.replace(self.config, **changes))
        other.load_state_dict(self.state_dict())
        return other.requires_grad_(next(self.parameters()).requires_grad)

    # ------------------------------------------------------------------ metanetwork
    def forward(self, x: Tensor, graph: NeuronGraph) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, graph)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    # ------------------------------------------------------------------ structure
    def structure_for(self, shapes: Sequence[tuple[int, ...]]) -> Structure:
        key = tuple(tuple(s) for s in shapes)
        if key not in self._structures:
            self._structures[key] = infer_structure(key)
        return self._structures[key]

    def _graph(self, structure: Structure, device) -> NeuronGraph:
        key = (structure, str(device))
        if key not in self._graphs:
            graph = NeuronGraph([c.neuron_sizes for c in structure.chains], device)
            flags = [[float(j > 0), float(j < len(c.layers)), float(c.lone), *_size_features(c, j)]
                     for c in structure.chains for j, n in enumerate(c.neuron_sizes) for _ in range(n)]
            graph.flags = torch.tensor(flags, device=device)  # [N, NUM_FLAGS]
            graph.tensor_average, graph.norm_index = _stat_layout(structure, device)
            self._graphs[key] = graph
        return self._graphs[key]

    def step_scalars(self, step, device) -> StepScalars:
        """A Python ``step`` gives Python floats (cheapest in eager mode); a tensor ``step`` keeps
        everything a tensor, so that a compiled step is not recompiled for every new step count.
        Compiled callers should call this *outside* the compiled code and pass the result as
        ``step``: inside, the compiler may recompute ``beta ** t`` for every element it fuses into."""
        if isinstance(step, StepScalars):
            return step
        c = self.config
        if isinstance(step, Tensor):
            t = step.to(device=device, dtype=torch.float64)
            bc1, bc2 = 1 - c.beta1 ** t, 1 - c.beta2 ** t
            time = torch.tanh(t / torch.tensor(c.time_scales, dtype=torch.float64, device=device))
            mix_scale = (c.mix_decay_from / t).clamp(max=1.0) if c.mix_decay_from else torch.ones_like(t)
            return StepScalars(bc2.float(), (bc2.sqrt() / bc1).float(), (c.eps * bc2.sqrt()).float(), time.float(),
                               mix_scale.float())
        step = float(step)
        bc1, bc2 = 1 - c.beta1 ** step, 1 - c.beta2 ** step
        time = torch.tensor([math.tanh(step / t) for t in c.time_scales], device=device)
        return StepScalars(bc2, math.sqrt(bc2) / bc1, c.eps * math.sqrt(bc2), time, self.mix_factor(step))

    # ------------------------------------------------------------------ pure interface
    def init(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        zeros = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        state = {"exp_avg": zeros, "exp_avg_sq": [z.clone() for z in zeros]}
        if self.config.amsgrad_from is not None:  # max(0, v) = v: the running maximum starts at amsgrad_from
            state["max_exp_avg_sq"] = [z.clone() for z in zeros]
        if self.config.step_size == "prodigy":
            batch = params[0].new_zeros(params[0].shape[0], dtype=torch.float32)
            state.update(initial_params=[p.detach().float().clone() for p in params],
                         grad_sums=[z.clone() for z in zeros], distance=[batch + self.config.distance_init],
                         distance_numerator=[batch])
        if self.config.hypergradient_from is not None:  # no last step yet: cos = 0 leaves h = 1
            state.update(last_directions=[z.clone() for z in zeros],
                         step_scale=[params[0].new_ones(params[0].shape[0], dtype=torch.float32)])
        if self.reuses_coefficients:  # placeholder: step 1 always runs the metanetwork
            graph = self._graph(self.structure_for([p.shape[1:] for p in params]), params[0].device)
            state["coefficients"] = [params[0].new_zeros(params[0].shape[0], graph.num_neurons,
                                                         self.num_coefficients, dtype=torch.float32)]
        return {k: state[k] for k in STATE_KEYS if k in state}

    def update(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor], grads: Sequence[Tensor],
               state: dict[str, list[Tensor]], step, lr: float | None = None, weight_decay: float = 0.0,
               structure: Structure | None = None) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """One step for a batch of tasks; differentiable in ``meta_params`` and ``params``.

        ``step`` counts from 1 (a Python int here: it decides whether the metanetwork runs).
        ``meta_params=None`` uses the module's own parameters; ``lr=None`` the base step size of
        the config. When the metanetwork does not run every step (``reuses_coefficients``), the
        state also carries the per-neuron coefficients of the last refresh (``"coefficients"``),
        reused until the next one; with
        ``config.amsgrad_from`` set, the running maximum of the second moment (``"max_exp_avg_sq"``);
        with ``config.step_size == "prodigy"``, the distance estimate (``"distance"``, [B]) and what it
        is made of (``prodigy_distance``), and the step size is ``lr * distance`` per task.
        """
        c = self.config
        lr = (c.lr if lr is None else lr) * self.lr_factor(step)
        extra = {}
        if c.step_size == "prodigy":
            extra = {k: state[k] for k in ("initial_params", "grad_sums", "distance", "distance_numerator")}
            weights = self.distance_weights(step)
            if weights is not None:
                distance, numerator, sums = prodigy_distance(state["distance"][0], state["distance_numerator"][0],
                                                             state["grad_sums"], grads, params, state["initial_params"],
                                                             *weights)
                extra.update(grad_sums=sums, distance=[distance], distance_numerator=[numerator])
            lr = lr * extra["distance"][0]
        exp_avg = state["exp_avg"]
        if c.step_size == "prodigy" and c.distance_weighted_momentum:
            ratio = state["distance"][0] / extra["distance"][0]  # [B]: d_{k-1} / d_k
            exp_avg = [m * ratio.reshape((-1,) + (1,) * (m.dim() - 1)) for m in exp_avg]
        exp_avg = [torch.lerp(m, g, 1 - c.beta1) for m, g in zip(exp_avg, grads)]
        exp_avg_sq = [v * c.beta2 + (1 - c.beta2) * g * g for v, g in zip(state["exp_avg_sq"], grads)]
        new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        second_moment = exp_avg_sq
        if c.amsgrad_from is not None:
            new_state["max_exp_avg_sq"] = state["max_exp_avg_sq"]
            if self.uses_max_second_moment(step):
                second_moment = new_state["max_exp_avg_sq"] = [torch.maximum(a, v) for a, v in
                                                               zip(state["max_exp_avg_sq"], exp_avg_sq)]
        reuse = None if self.refreshes(step) else state["coefficients"][0]
        deltas, coefficients = self.direction_and_coefficients(meta_params, params, grads, exp_avg, second_moment,
                                                               step, structure, reuse)
        if c.hypergradient_from is not None:
            scale = state["step_scale"][0]
            if self.adapts_step(step):
                per_task = lambda ts: torch.stack([t.reshape(t.shape[0], -1).sum(1) for t in ts]).sum(0)  # noqa: E731
                scale = self.step_scale(scale, per_task([g * d for g, d in zip(grads, state["last_directions"])]),
                                        per_task([g * g for g in grads]),
                                        per_task([d * d for d in state["last_directions"]]),
                                        per_task(second_moment) / (1 - c.beta2 ** step), step)
            new_state.update(last_directions=list(deltas), step_scale=[scale])
            lr = lr * scale
        rates = [lr.reshape((-1,) + (1,) * (p.dim() - 1)) if isinstance(lr, Tensor) else lr for p in params]
        new_params = [p - r * (d + weight_decay * p) for p, d, r in zip(params, deltas, rates)]
        if self.reuses_coefficients:
            new_state["coefficients"] = [coefficients]
        # in init's key order: callers that flatten the state (meta-training between truncations)
        # unflatten it with the structure init gave, which pairs leaves by position
        merged = {**new_state, **extra}
        return new_params, {k: merged[k] for k in STATE_KEYS if k in merged}

    def refreshes(self, step: int) -> bool:
        """Whether the metanetwork runs at ``step`` (counted from 1): steps 1, 1 + k, 1 + 2k, ...
        up to ``distance_warmup``, then every ``late_refresh_every`` steps from the warm-up's last."""
        c, step = self.config, int(step)
        if not self._late_period(step):
            return (step - 1) % c.refresh_every == 0
        last = 1 + (c.distance_warmup - 1) // c.refresh_every * c.refresh_every if c.distance_warmup else 1
        return (step - last) % c.late_refresh_every == 0

    def _late_period(self, step: int) -> bool:
        """Whether ``step`` is past the warm-up of a rule that then refreshes every ``late_refresh_every``."""
        return self.config.late_refresh_every is not None and int(step) > self.config.distance_warmup

    @property
    def reuses_coefficients(self) -> bool:
        """Whether some steps reuse the per-neuron outputs of the last refresh."""
        return self.config.refresh_every > 1 or (self.config.late_refresh_every or 1) > 1

    def refresh_period(self, step: int) -> int:
        """Steps between the metanetwork's runs around ``step``."""
        return self.config.late_refresh_every if self._late_period(step) else self.config.refresh_every

    def uses_max_second_moment(self, step: int) -> bool:
        """Whether ``step`` (counted from 1) reads AMSGrad's running maximum as its second moment."""
        return self.config.amsgrad_from is not None and int(step) >= self.config.amsgrad_from

    def mix_factor(self, step) -> float:
        """What the late phase multiplies the additive terms by at ``step`` (counted from 1)."""
        start = self.config.mix_decay_from
        return 1.0 if start is None else min(1.0, start / float(step))

    def distance_weights(self, step: int) -> tuple[float, float, float] | None:
        """``(lr_factor, beta3, max_growth)`` for ``prodigy_distance`` at ``step``, or None where the estimate
        stands still. Every step up to ``distance_warmup``; after it, only at the metanetwork's
        refresh steps, from that step's gradient standing for the steps since the last update
        (weight, discount and growth bound of that many steps): its cost, a few passes over the
        parameters, is then amortised as the metanetwork's is."""
        c, step = self.config, int(step)
        if step <= c.distance_warmup:
            gap = 1
        elif self.refreshes(step):
            gap = min(self.refresh_period(step), step - c.distance_warmup)
        else:
            return None
        growth = math.inf if c.distance_growth is None else c.distance_growth ** gap
        return self.lr_factor(step) * gap, math.sqrt(c.beta2) ** gap, growth

    def adapts_step(self, step) -> bool:
        """Whether ``step`` (counted from 1) updates the hypergradient factor on the step size: from
        ``hypergradient_from`` on, at the metanetwork's refresh steps (its few passes over the
        parameters and one sync amortised, as the distance estimate's are; the rate takes the gap)."""
        first = self.config.hypergradient_from
        return first is not None and int(step) >= max(first, 2) and self.refreshes(step)

    def step_scale(self, scale: Tensor, dot: Tensor, grad_square: Tensor, direction_square: Tensor,
                   remembered_square: Tensor, step) -> Tensor:
        """The hypergradient factor h after ``step`` (``config.hypergradient_from``): from ``scale``,
        ``log h += rate * from / step * (gate * cos + 1 - gate)``, at most 1. cos is that of this
        step's gradient (squared norm ``grad_square``) and the last step's direction
        (``direction_square``), ``dot`` their inner product; gate = max(0, 1 - rho / config.hypergradient_gate)
        with rho^2 = ``grad_square`` / ``remembered_square`` (the bias-corrected second moment's sum).
        All are sums over every tensor, so h is invariant to any permutation of neurons. The rate
        falls as 1 / t, as the fade and the step-size decay of the late phase do, and stands for the
        steps since the last update (the refresh period). Differentiable."""
        c = self.config
        # products and ratios clamped, not the norms: no sqrt at 0 (its gradient is inf); |dot| <= the norms' product
        cos = (dot * (grad_square * direction_square).clamp(min=1e-38).rsqrt()).clamp(-1.0, 1.0)
        rho = (grad_square / remembered_square.clamp(min=1e-38)).clamp(min=1e-38).sqrt()
        gate = (1 - rho / c.hypergradient_gate).clamp(min=0.0) if c.hypergradient_gate > 0 else torch.zeros_like(rho)
        gap = min(self.refresh_period(step), int(step) - max(c.hypergradient_from, 2) + 1)
        rate = c.hypergradient_rate * c.hypergradient_from / float(step) * gap
        return (scale * torch.exp(rate * (gate * cos + 1 - gate))).clamp(max=1.0)

    def lr_factor(self, step: int) -> float:
        """What the late phase multiplies the step size by at ``step`` (counted from 1)."""
        start = self.config.lr_decay_from
        return 1.0 if start is None or step <= start else math.sqrt(start / step)

    def direction(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor], grads: Sequence[Tensor],
                  exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], step,
                  structure: Structure | None = None) -> list[Tensor]:
        """The update direction (to be scaled by -lr), given already-updated moments.

        ``step`` counts from 1: a Python number, a 0-d tensor, or its ``step_scalars``.
        """
        return self.direction_and_coefficients(meta_params, params, grads, exp_avg, exp_avg_sq, step, structure)[0]

    @property
    def num_coefficients(self) -> int:
        """Per-neuron multipliers a refresh yields: 3 scales of Adam's direction (weight rows, weight
        columns, bias), and the 4 additive terms' coefficients when ``max_mix`` > 0."""
        return 7 if self.config.max_mix else 3

    def direction_and_coefficients(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor],
                                   grads: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor],
                                   step, structure: Structure | None = None,
                                   coefficients: Tensor | None = None,
                                   adam_direction: Sequence[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
        """:meth:`direction`, and the per-neuron coefficients ``[B, N, num_coefficients]`` it used.

        ``adam_direction``: Adam's bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)`` of every
        tensor, when the caller has it already (the optimizer gets it from torch's fused Adam kernel
        together with the moments); otherwise it is computed here from ``exp_avg`` and ``exp_avg_sq``.

        ``coefficients`` given (from an earlier step, see ``config.refresh_every``): reuse them
        instead of running the metanetwork, which skips the neuron statistics too: the part of a
        step whose cost does not shrink with the model. Written for few passes over the parameters
        and few small ops: per-tensor normalisers are computed for all tensors at once, so the
        fixed cost per step grows slowly with depth.
        """
        structure, graph, scalars, u, adam_scale = self._prepare(params, exp_avg, exp_avg_sq, step, structure,
                                                                 adam_direction)
        B = params[0].shape[0]
        if coefficients is None:
            coefficients = self._coefficients(meta_params, structure, graph, u, grads, exp_avg, exp_avg_sq, params,
                                              scalars.bc2, adam_scale, scalars.time)
        elif tuple(coefficients.shape) != (B, graph.num_neurons, self.num_coefficients):
            raise ValueError(f"reused coefficients have shape {tuple(coefficients.shape)}, this structure needs "
                             f"{(B, graph.num_neurons, self.num_coefficients)}")
        normalisers = None
        if self.config.max_mix:
            sizes = [max(p[0].numel(), 1) for p in params]
            g_square_sums = torch.stack([g.flatten(1).square().sum(1) for g in grads], 1) \
                if self.config.param_term_follows_gradient else None
            normalisers = self.mix_normalisers(torch.stack([v.flatten(1).sum(1) for v in exp_avg_sq], 1),
                                               torch.stack([p.flatten(1).square().sum(1) for p in params], 1),
                                               sizes, scalars.bc2, g_square_sums)
        multipliers = self.tensor_multipliers(coefficients, structure, adam_scale, scalars.mix_scale, normalisers)
        return self._deltas(multipliers, u, grads, params), coefficients

    @staticmethod
    def mix_normalisers(v_sums: Tensor, p_square_sums: Tensor, sizes: Sequence[int], bc2,
                        g_square_sums: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What the additive terms divide g and p by, per tensor (``[B, n]``, or ``[n]`` for sums
        ``[n]``) from the sums of its second moment and of its p^2: 1 / rms(g) (from Adam's
        bias-corrected second moment, exact at step 1) and 1 / rms(p). Taken at every step, reused
        coefficients or not: a tensor that starts at zero (a norm layer's bias) has 1 / rms(p) ~ 1e15
        at step 1, harmless then (p = 0) but not once p has moved. With this step's sums of g^2
        (``config.param_term_follows_gradient``), the second is also multiplied by
        min(1, rms(g) * the first)."""
        sizes = v_sums.new_tensor(sizes)
        g_norm, p_norm = (v_sums / sizes + 1e-30).div(bc2).rsqrt(), (p_square_sums / sizes + 1e-30).rsqrt()
        if g_square_sums is not None:
            p_norm = p_norm * ((g_square_sums / sizes).sqrt() * g_norm).clamp(max=1.0)
        return g_norm, p_norm

    def neuron_coefficients(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor],
                            grads: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], step,
                            structure: Structure | None = None,
                            adam_direction: Sequence[Tensor] | None = None) -> Tensor:
        """Only the metanetwork's part of :meth:`direction_and_coefficients`: the per-neuron
        coefficients of a refresh, for callers that apply them themselves (the eager optimizer)."""
        structure, graph, scalars, u, adam_scale = self._prepare(params, exp_avg, exp_avg_sq, step, structure,
                                                                 adam_direction)
        return self._coefficients(meta_params, structure, graph, u, grads, exp_avg, exp_avg_sq, params,
                                  scalars.bc2, adam_scale, scalars.time)

    def _prepare(self, params, exp_avg, exp_avg_sq, step, structure, adam_direction):
        """The structure, its neuron graph, the step's scalars and Adam's direction ``u`` with the
        scale still to apply to it (1 when the caller gave ``adam_direction``)."""
        structure = structure or self.structure_for([p.shape[1:] for p in params])
        if structure.num_params != len(params):
            raise ValueError(f"structure describes {structure.num_params} tensors, got {len(params)}")
        graph = self._graph(structure, params[0].device)
        scalars = self.step_scalars(step, params[0].device)
        if adam_direction is not None:
            return structure, graph, scalars, list(adam_direction), 1.0
        # Adam's direction is adam_scale * m / (sqrt(v) + eps * sqrt(bc2)); adam_scale rides on the
        # per-neuron scales, so u costs three passes over the parameters
        u = [m / (v.sqrt() + scalars.eps) for m, v in zip(exp_avg, exp_avg_sq)]
        return structure, graph, scalars, u, scalars.adam_scale

    def _coefficients(self, meta_params, structure: Structure, graph: NeuronGraph, u, grads, exp_avg, exp_avg_sq,
                      params, bc2, adam_scale, time) -> Tensor:
        """Run the metanetwork on the neurons' statistics; its outputs as per-neuron multipliers:
        exp(log-scale) of Adam's direction (weight rows, weight columns, bias) and, when ``max_mix``
        > 0, each additive term's mix (g and p of the weight and of the bias writing the neuron).
        The terms' normalisers 1 / rms are not part of them: every step takes its own (``mix_normalisers``)."""
        c = self.config
        B = params[0].shape[0]
        # Neuron statistics use only tensors Adam already has (plus p^2), reduced along rows and
        # columns; normalisers are tensor means, so statistics are scale-free and permutation-invariant.
        rows, set_feats = [], []  # rows: per stat tensor (weights, then bias), [B, o, 5]
        for chain in structure.chains:
            L = len(chain.layers)
            incoming: list = [None] * (L + 1)
            outgoing: list = [None] * (L + 1)
            bias_in: list = [None] * (L + 1)
            for l, layer in enumerate(chain.layers):
                uw, gw, mw, vw, pw = (t[layer.weight].reshape(B, *layer.view)
                                      for t in (u, grads, exp_avg, exp_avg_sq, params))
                incoming[l + 1], outgoing[l] = _row_col_means((uw, gw, mw, vw, pw * pw))
                rows.append(incoming[l + 1])
                if layer.bias is not None:
                    ub, gb, mb, vb, pb = (t[layer.bias] for t in (u, grads, exp_avg, exp_avg_sq, params))
                    bias_in[l + 1] = torch.stack([ub, gb, mb, vb, pb * pb], -1)  # [B, o, 5]
                    rows.append(bias_in[l + 1])
            for j, n in enumerate(chain.neuron_sizes):
                set_feats.append(torch.cat([t if t is not None else params[0].new_zeros(B, n, NUM_STATS)
                                            for t in (incoming[j], bias_in[j], outgoing[j])], -1))
        # Per-tensor normalisers for all tensors at once: (Adam's bias correction, 1/rms(g),
        # 1/rms(m) ~ 1/sqrt(mean v), 1/mean(v), 1/mean(p^2)), then spread onto the neurons' features.
        means = torch.matmul(graph.tensor_average, torch.cat(rows, 1)[..., 3:]) + 1e-30  # [B, T, 2]
        v_mean = means[..., :1]
        g_scales = (v_mean / bc2).rsqrt()  # [B, T, 1]: 1 / rms(g), exact at step 1
        norms = torch.cat([torch.ones_like(v_mean) * adam_scale, g_scales, v_mean.rsqrt(), means.reciprocal()], -1)
        norms = torch.cat([norms.flatten(1), norms.new_zeros(B, 1)], 1)  # [B, 5T + 1]; the last: absent stats
        stats = torch.cat(set_feats, 1) * norms[:, graph.norm_index]  # [B, N, 15]
        x = torch.cat([stats, graph.flags.expand(B, -1, -1), time.expand(B, graph.num_neurons, len(c.time_scales))], -1)

        out = self(x, graph) if meta_params is None else torch.func.functional_call(self, meta_params, (x, graph))
        out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)  # a broken metanetwork falls back to Adam
        scale = torch.exp(c.max_log_scale * torch.tanh(out[..., :3] / c.max_log_scale))
        if not c.max_mix:
            return scale
        return torch.cat([scale, c.max_mix * torch.tanh(out[..., 3:])], -1)

    def tensor_multipliers(self, coefficients: Tensor, structure: Structure, adam_scale=1.0,
                           mix_scale=1.0, normalisers: tuple[Tensor, Tensor] | None = None) -> TensorMultipliers:
        """Spread per-neuron coefficients ``[B, N, C]`` onto the tensors: a weight's scale is its
        row neuron's times its column neuron's; the additive terms' coefficients are its rows'.
        ``adam_scale`` (Adam's bias correction) rides on the row and bias scales; ``mix_scale`` (the
        late phase's fade) and the step's ``mix_normalisers`` on the additive terms (without them,
        the caller applies them: the optimizer keeps these multipliers from refresh to refresh)."""
        graph = self._graph(structure, coefficients.device)
        C = coefficients.shape[-1]
        # contiguous planes [B, C, N]: broadcasting a strided slice of [B, N, C] over a weight
        # defeats vectorisation (measured 2-3x slower per pass on the CPU)
        planes = coefficients.transpose(1, 2)
        factors = None
        if isinstance(adam_scale, Tensor) or adam_scale != 1.0:
            factors = coefficients.new_ones(C, 1)
            factors[0:3:2] = adam_scale
        if C > 3 and (isinstance(mix_scale, Tensor) or mix_scale != 1.0):
            factors = coefficients.new_ones(C, 1) if factors is None else factors
            factors[3:] = mix_scale
        if factors is not None:
            planes = planes * factors
        sets = planes.contiguous().split(graph.set_sizes, 2)
        B, n = coefficients.shape[0], structure.num_params
        shapes: list = [None] * n
        scale: list = [None] * n
        grad_mix: list = [None] * n
        param_mix: list = [None] * n
        s = 0  # first neuron set of the chain
        for chain in structure.chains:
            for l, layer in enumerate(chain.layers):
                rows, cols = sets[s + l + 1], sets[s + l]  # [B, C, o], [B, C, i]
                o, i, k = layer.view
                w = layer.weight
                shapes[w] = (B, o, i, k)
                row = rows.reshape(B, C, o, 1, 1)
                scale[w] = row[:, 0] * cols[:, 1].reshape(B, 1, i, 1)
                if C > 3:
                    grad_mix[w], param_mix[w] = row[:, 3], row[:, 4]
                if layer.bias is not None:
                    b = layer.bias
                    shapes[b], scale[b] = (B, o), rows[:, 2]
                    if C > 3:
                        grad_mix[b], param_mix[b] = rows[:, 5], rows[:, 6]
            s += len(chain.layers) + 1
        if C <= 3:
            return TensorMultipliers(shapes, scale, None, None)
        if normalisers is not None:
            g_norm, p_norm = normalisers
            grad_mix = [a * g_norm[:, t].reshape((B,) + (1,) * (a.dim() - 1)) for t, a in enumerate(grad_mix)]
            param_mix = [a * p_norm[:, t].reshape((B,) + (1,) * (a.dim() - 1)) for t, a in enumerate(param_mix)]
        return TensorMultipliers(shapes, scale, grad_mix, param_mix)

    @staticmethod
    def _deltas(multipliers: TensorMultipliers, u, grads, params) -> list[Tensor]:
        """Out of place (differentiable, vmappable): two or four passes over each weight."""
        deltas = []
        for t, shape in enumerate(multipliers.shapes):
            d = u[t].reshape(shape) * multipliers.scale[t]
            if multipliers.grad_mix is not None:
                d = torch.addcmul(d, multipliers.grad_mix[t], grads[t].reshape(shape))
                d = torch.addcmul(d, multipliers.param_mix[t], params[t].reshape(shape))
            deltas.append(d.reshape(params[t].shape))
        return deltas
