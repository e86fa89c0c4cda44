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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ..layers.neuron import NeuronGraph, NeuronSetLinear
from .structure import Structure, infer_structure

NUM_STATS = 5  # mean u, mean u^2, mean g, mean g^2, mean p^2 (g, p normalised per tensor)
NUM_FLAGS = 3  # has incoming weights, has outgoing weights, lone tensor
NUM_OUTPUTS = 7  # weight: row log-scale, column log-scale, row grad mix, row param mix; bias: the three


@dataclass(frozen=True)
class LearnedOptimizerConfig:
    hidden: int = 32
    num_layers: int = 3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_log_scale: float = 2.0  # per-neuron step-size multipliers stay within exp(+-2)
    max_mix: float = 0.5  # additive gradient/parameter terms stay within +-0.5 per normalised unit
    time_scales: tuple[float, ...] = (10.0, 100.0, 1000.0)

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


def _mean_sq(x: Tensor) -> Tensor:
    """Per-example mean square over all but the batch dim, shaped to broadcast back."""
    return x.square().mean(dim=tuple(range(1, x.dim())), keepdim=True)


def _neuron_stats(qs, scales, dims) -> Tensor:
    """[B, n, NUM_STATS]: means of each quantity over ``dims``, times its per-tensor normaliser."""
    return torch.stack([q.mean(dims) if s is None else q.mean(dims) * s.flatten(1) for q, s in zip(qs, scales)], -1)


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
            self._graphs[key] = NeuronGraph([c.neuron_sizes for c in structure.chains], device)
        return self._graphs[key]

    # ------------------------------------------------------------------ pure interface
    def init(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        zeros = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        return {"exp_avg": zeros, "exp_avg_sq": [z.clone() for z in zeros]}

    def update(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor], grads: Sequence[Tensor],
               state: dict[str, list[Tensor]], step, lr: float = 1e-3, weight_decay: float = 0.0,
               structure: Structure | None = None) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """One step for a batch of tasks; differentiable in ``meta_params`` and ``params``.

        ``step`` counts from 1. ``meta_params=None`` uses the module's own parameters.
        """
        c = self.config
        exp_avg = [torch.lerp(m, g, 1 - c.beta1) for m, g in zip(state["exp_avg"], grads)]
        exp_avg_sq = [v * c.beta2 + (1 - c.beta2) * g * g for v, g in zip(state["exp_avg_sq"], grads)]
        deltas = self.direction(meta_params, params, grads, exp_avg, exp_avg_sq, step, structure)
        new_params = [p - lr * (d + weight_decay * p) for p, d in zip(params, deltas)]
        return new_params, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def direction(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor], grads: Sequence[Tensor],
                  exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], step,
                  structure: Structure | None = None) -> list[Tensor]:
        """The update direction (to be scaled by -lr), given already-updated moments."""
        c = self.config
        structure = structure or self.structure_for([p.shape[1:] for p in params])
        if structure.num_params != len(params):
            raise ValueError(f"structure describes {structure.num_params} tensors, got {len(params)}")
        B = params[0].shape[0]
        step_t = torch.as_tensor(step, dtype=torch.float32, device=params[0].device)
        bc1, bc2 = 1 - c.beta1 ** step_t, 1 - c.beta2 ** step_t
        adam = [(m / bc1) / ((v / bc2).sqrt() + c.eps) for m, v in zip(exp_avg, exp_avg_sq)]

        # Per tensor: its [B, o, i, k] view, the normalisers of g and p, and neuron statistics.
        views, set_feats = {}, []
        for chain in structure.chains:
            L = len(chain.layers)
            incoming: list = [None] * (L + 1)
            outgoing: list = [None] * (L + 1)
            bias_in: list = [None] * (L + 1)
            for l, layer in enumerate(chain.layers):
                o, i, k = layer.view
                u, g, p = (t[layer.weight].reshape(B, o, i, k) for t in (adam, grads, params))
                gs, ps = _mean_sq(g).add(1e-30).rsqrt(), _mean_sq(p).add(1e-30).rsqrt()
                views[layer.weight] = (u, g, p, gs, ps)
                qs = (u, u * u, g, g * g, p * p)
                scales = (None, None, gs, gs * gs, ps * ps)
                incoming[l + 1] = _neuron_stats(qs, scales, (2, 3))
                outgoing[l] = _neuron_stats(qs, scales, (1, 3))
                if layer.bias is not None:
                    ub, gb, pb = adam[layer.bias], grads[layer.bias], params[layer.bias]
                    gbs, pbs = _mean_sq(gb).add(1e-30).rsqrt(), _mean_sq(pb).add(1e-30).rsqrt()
                    views[layer.bias] = (ub, gb, pb, gbs, pbs)
                    bias_in[l + 1] = torch.stack([ub, ub * ub, gb * gbs, (gb * gbs) ** 2, (pb * pbs) ** 2], -1)
            for j, n in enumerate(chain.neuron_sizes):
                parts = [t if t is not None else params[0].new_zeros(B, n, NUM_STATS).float()
                         for t in (incoming[j], bias_in[j], outgoing[j])]
                flags = torch.tensor([float(j > 0), float(j < L), float(chain.lone)], device=params[0].device)
                parts.append(flags.expand(B, n, NUM_FLAGS))
                set_feats.append(torch.cat(parts, -1))
        x = torch.cat(set_feats, 1)
        time = torch.tanh(step_t / torch.tensor(c.time_scales, device=x.device))
        x = torch.cat([x, time.expand(B, x.shape[1], len(c.time_scales))], -1)

        graph = self._graph(structure, x.device)
        if meta_params is None:
            out = self(x, graph)
        else:
            out = torch.func.functional_call(self, meta_params, (x, graph))
        out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)  # a broken metanetwork falls back to Adam
        log_scale = c.max_log_scale * torch.tanh(out[..., [0, 1, 4]] / c.max_log_scale)
        mix = c.max_mix * torch.tanh(out[..., [2, 3, 5, 6]])
        per_set_scale = log_scale.split(graph.set_sizes, 1)
        per_set_mix = mix.split(graph.set_sizes, 1)

        deltas: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        s = 0
        for chain in structure.chains:
            for l, layer in enumerate(chain.layers):
                rows_scale, cols_scale, rows_mix = per_set_scale[s + l + 1], per_set_scale[s + l], per_set_mix[s + l + 1]
                u, g, p, gs, ps = views[layer.weight]
                scale = torch.exp(rows_scale[..., 0])[:, :, None] * torch.exp(cols_scale[..., 1])[:, None, :]
                d = u * scale[..., None] + (rows_mix[..., 0, None, None] * gs) * g + (rows_mix[..., 1, None, None] * ps) * p
                deltas[layer.weight] = d.reshape(params[layer.weight].shape)
                if layer.bias is not None:
                    ub, gb, pb, gbs, pbs = views[layer.bias]
                    deltas[layer.bias] = ub * torch.exp(rows_scale[..., 2]) + rows_mix[..., 2] * gbs * gb \
                        + rows_mix[..., 3] * pbs * pb
            s += len(chain.layers) + 1
        return deltas
