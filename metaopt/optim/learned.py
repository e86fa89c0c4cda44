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

NUM_STATS = 5  # per neuron: means of Adam's direction, g, m, v and p^2, each normalised per tensor
NUM_FLAGS = 6  # has incoming weights, has outgoing weights, lone tensor; log set size, log fan-in, log fan-out
NUM_OUTPUTS = 7  # log-scales: weight row, weight column, bias; mixes: weight grad, weight param, bias grad, bias param


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
            graph = NeuronGraph([c.neuron_sizes for c in structure.chains], device)
            flags = [[float(j > 0), float(j < len(c.layers)), float(c.lone), *_size_features(c, j)]
                     for c in structure.chains for j, n in enumerate(c.neuron_sizes) for _ in range(n)]
            graph.flags = torch.tensor(flags, device=device)  # [N, NUM_FLAGS]: in, out, lone
            self._graphs[key] = graph
        return self._graphs[key]

    # ------------------------------------------------------------------ pure interface
    def init(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        zeros = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        return {"exp_avg": zeros, "exp_avg_sq": [z.clone() for z in zeros]}

    def update(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor], grads: Sequence[Tensor],
               state: dict[str, list[Tensor]], step, lr: float | None = None, weight_decay: float = 0.0,
               structure: Structure | None = None) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """One step for a batch of tasks; differentiable in ``meta_params`` and ``params``.

        ``step`` counts from 1. ``meta_params=None`` uses the module's own parameters; ``lr=None``
        the base step size of the config.
        """
        c = self.config
        lr = c.lr if lr is None else lr
        exp_avg = [torch.lerp(m, g, 1 - c.beta1) for m, g in zip(state["exp_avg"], grads)]
        exp_avg_sq = [v * c.beta2 + (1 - c.beta2) * g * g for v, g in zip(state["exp_avg_sq"], grads)]
        deltas = self.direction(meta_params, params, grads, exp_avg, exp_avg_sq, step, structure)
        new_params = [p - lr * (d + weight_decay * p) for p, d in zip(params, deltas)]
        return new_params, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def direction(self, meta_params: dict[str, Tensor] | None, params: Sequence[Tensor], grads: Sequence[Tensor],
                  exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], step,
                  structure: Structure | None = None) -> list[Tensor]:
        """The update direction (to be scaled by -lr), given already-updated moments.

        ``step`` is a Python number (counting from 1). Written for few passes over the parameters:
        about eight full-size writes per tensor, against Adam's five.
        """
        c = self.config
        structure = structure or self.structure_for([p.shape[1:] for p in params])
        if structure.num_params != len(params):
            raise ValueError(f"structure describes {structure.num_params} tensors, got {len(params)}")
        B, device = params[0].shape[0], params[0].device
        graph = self._graph(structure, device)
        step = float(step)
        bc1, bc2 = 1 - c.beta1 ** step, 1 - c.beta2 ** step
        # Adam's direction is adam_scale * m / (sqrt(v) + eps * sqrt(bc2)); adam_scale rides on the
        # per-neuron scales below, so u costs three passes over the parameters
        adam_scale = math.sqrt(bc2) / bc1
        u = [m / (v.sqrt() + c.eps * math.sqrt(bc2)) for m, v in zip(exp_avg, exp_avg_sq)]

        # Neuron statistics use only tensors Adam already has (plus p^2), reduced along rows and
        # columns; normalisers are tensor means, so statistics are scale-free and permutation-invariant.
        views, set_feats = {}, []
        for chain in structure.chains:
            L = len(chain.layers)
            incoming: list = [None] * (L + 1)
            outgoing: list = [None] * (L + 1)
            bias_in: list = [None] * (L + 1)
            for l, layer in enumerate(chain.layers):
                o, i, k = layer.view
                uw, gw, mw, vw, pw = (t[layer.weight].reshape(B, o, i, k)
                                      for t in (u, grads, exp_avg, exp_avg_sq, params))
                p2 = pw * pw
                row = [q.mean((2, 3)) for q in (uw, gw, mw, vw, p2)]  # [B, o] each
                col = [q.mean((1, 3)) for q in (uw, gw, mw, vw, p2)]  # [B, i] each
                v_mean = row[3].mean(1, keepdim=True) + 1e-30
                p2_mean = row[4].mean(1, keepdim=True) + 1e-30
                g_scale = (v_mean / bc2).rsqrt()  # 1 / rms(g), exact at step 1
                norm = (adam_scale, g_scale, v_mean.rsqrt(), 1 / v_mean, 1 / p2_mean)
                incoming[l + 1] = torch.stack([q * z for q, z in zip(row, norm)], -1)
                outgoing[l] = torch.stack([q * z for q, z in zip(col, norm)], -1)
                views[layer.weight] = (uw, gw, pw, g_scale, p2_mean.rsqrt())
                if layer.bias is not None:
                    ub, gb, mb, vb, pb = (t[layer.bias] for t in (u, grads, exp_avg, exp_avg_sq, params))
                    vb_mean, pb2_mean = vb.mean(1, keepdim=True) + 1e-30, (pb * pb).mean(1, keepdim=True) + 1e-30
                    gb_scale = (vb_mean / bc2).rsqrt()
                    bias_in[l + 1] = torch.stack([ub * adam_scale, gb * gb_scale, mb * vb_mean.rsqrt(), vb / vb_mean,
                                                  pb * pb / pb2_mean], -1)
                    views[layer.bias] = (ub, gb, pb, gb_scale, pb2_mean.rsqrt())
            for j, n in enumerate(chain.neuron_sizes):
                set_feats.append(torch.cat([t if t is not None else params[0].new_zeros(B, n, NUM_STATS)
                                            for t in (incoming[j], bias_in[j], outgoing[j])], -1))
        time = torch.tanh(step / torch.tensor(c.time_scales, device=device))
        x = torch.cat([torch.cat(set_feats, 1), graph.flags.expand(B, -1, -1),
                       time.expand(B, graph.num_neurons, len(c.time_scales))], -1)

        out = self(x, graph) if meta_params is None else torch.func.functional_call(self, meta_params, (x, graph))
        out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)  # a broken metanetwork falls back to Adam
        scale = torch.exp(c.max_log_scale * torch.tanh(out[..., :3] / c.max_log_scale))
        mix = c.max_mix * torch.tanh(out[..., 3:])
        set_scale, set_mix = scale.split(graph.set_sizes, 1), mix.split(graph.set_sizes, 1)

        deltas: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        s = 0
        for chain in structure.chains:
            for l, layer in enumerate(chain.layers):
                rows, cols, rows_mix = set_scale[s + l + 1], set_scale[s + l], set_mix[s + l + 1]
                uw, gw, pw, g_scale, p_scale = views[layer.weight]
                d = uw * ((rows[..., 0] * adam_scale)[:, :, None, None] * cols[..., 1][:, None, :, None])
                d = torch.addcmul(d, (rows_mix[..., 0] * g_scale)[:, :, None, None], gw)
                d = torch.addcmul(d, (rows_mix[..., 1] * p_scale)[:, :, None, None], pw)
                deltas[layer.weight] = d.reshape(params[layer.weight].shape)
                if layer.bias is not None:
                    ub, gb, pb, gb_scale, pb_scale = views[layer.bias]
                    deltas[layer.bias] = ub * (rows[..., 2] * adam_scale) + rows_mix[..., 2] * gb_scale * gb \
                        + rows_mix[..., 3] * pb_scale * pb
            s += len(chain.layers) + 1
        return deltas
