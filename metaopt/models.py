"""Metanetworks: equivariant (WeightSpace -> WeightSpace) and invariant (WeightSpace -> Tensor).

``NFN`` stacks NP layers, ``DWSNet`` stacks DWS/HNP layers; their ``Invariant*`` versions add
invariant pooling and an MLP head. The baselines the literature compares against live here too.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .layers import (ChannelDropout, DWSLinear, Elementwise, GraphEncoder, GraphPool, InvariantPool, MessagePassing,
                     NPLinear, SignMessagePassing, WeightSpaceNorm)
from .weight_space import WeightSpace, WeightSpaceSpec

__all__ = ["NFN", "DWSNet", "InvariantNFN", "InvariantDWSNet", "InvariantGMN", "FlatMLP", "DeepSets", "StatNN",
           "ProbeNet"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class _EquivariantStack(nn.Sequential):
    """linear -> [norm] -> act -> [dropout], repeated; the last linear has no activation."""

    def __init__(self, spec: WeightSpaceSpec, make_linear: Callable[[int, int], nn.Module], in_channels: int,
                 out_channels: int, hidden_channels: int, num_layers: int, activation: str, dropout: float,
                 norm: bool):
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            mods.append(make_linear(a, b))
            if i < num_layers - 1:
                if norm:
                    mods.append(WeightSpaceNorm(2 * spec.num_layers, b))
                mods.append(Elementwise(_activation(activation)))
                if dropout:
                    mods.append(ChannelDropout(dropout))
        super().__init__(*mods)
        self.spec = spec

    def zero_last_(self) -> None:
        """Zero the output layer, so the metanetwork starts by predicting exactly 0 (residual use)."""
        with torch.no_grad():
            for p in self[-1].parameters():
                p.zero_()


class NFN(_EquivariantStack):
    """Equivariant NFN of NP layers (input/output positions embedded by default)."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_channels: int = 1,
                 hidden_channels: int = 32, num_layers: int = 3, io_embed: bool = True,
                 activation: str = "relu", dropout: float = 0.0, norm: bool = False):
        super().__init__(spec, lambda a, b: NPLinear(spec, a, b, io_embed=io_embed), in_channels, out_channels,
                         hidden_channels, num_layers, activation, dropout, norm)


class DWSNet(_EquivariantStack):
    """Equivariant DWSNet of DWS/HNP layers (see :class:`DWSLinear` for ``max_dense_io``)."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_channels: int = 1,
                 hidden_channels: int = 32, num_layers: int = 3, max_dense_io: int | None = 8,
                 activation: str = "relu", dropout: float = 0.0, norm: bool = False):
        super().__init__(spec, lambda a, b: DWSLinear(spec, a, b, max_dense_io=max_dense_io), in_channels,
                         out_channels, hidden_channels, num_layers, activation, dropout, norm)


def _mlp(in_features: int, hidden: int, out_features: int, depth: int, activation: str,
         dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(d, hidden), _activation(activation)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, out_features))
    return nn.Sequential(*layers)


class _InvariantNet(nn.Module):
    def __init__(self, trunk: _EquivariantStack, pool: InvariantPool, out_features: int, head_hidden: int,
                 head_layers: int, activation: str, dropout: float):
        super().__init__()
        self.trunk, self.pool = trunk, pool
        self.head = _mlp(pool.out_features(trunk[-1].out_channels), head_hidden, out_features, head_layers, activation, dropout)

    def forward(self, ws: WeightSpace) -> Tensor:
        return self.head(self.pool(self.trunk(ws)))


class InvariantNFN(_InvariantNet):
    """NP trunk, pooling over all neurons (mean, or mean and max), MLP head: [B, out_features]."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_features: int = 1,
                 hidden_channels: int = 32, num_layers: int = 3, io_embed: bool = True,
                 head_hidden: int = 256, head_layers: int = 2, activation: str = "relu", dropout: float = 0.0,
                 norm: bool = False, pooling: str = "mean"):
        trunk = NFN(spec, in_channels, hidden_channels, hidden_channels, num_layers, io_embed, activation,
                    dropout, norm)
        super().__init__(trunk, InvariantPool(spec, pooling=pooling), out_features, head_hidden, head_layers,
                         activation, dropout)


class InvariantDWSNet(_InvariantNet):
    """DWS trunk, pooling over hidden neurons (input/output positions kept; mean, or mean and max), MLP head."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_features: int = 1,
                 hidden_channels: int = 32, num_layers: int = 3, max_dense_io: int | None = 8,
                 head_hidden: int = 256, head_layers: int = 2, activation: str = "relu", dropout: float = 0.0,
                 norm: bool = False, pooling: str = "mean"):
        trunk = DWSNet(spec, in_channels, hidden_channels, hidden_channels, num_layers, max_dense_io, activation,
                       dropout, norm)
        super().__init__(trunk, InvariantPool(spec, keep_io=True, pooling=pooling), out_features, head_hidden,
                         head_layers, activation, dropout)


class InvariantGMN(nn.Module):
    """Graph metanetwork: the weights as a graph of neurons, rounds of :class:`MessagePassing`,
    mean/max read-out, MLP head: [B, out_features]. Neurons interact nonlinearly along every
    weight, which the NP/DWS trunks' pooled linear maps cannot do. ``sign_symmetric=True`` (for
    odd activations: SIRENs, tanh) makes it invariant to hidden sign flips as well
    (:class:`SignMessagePassing`)."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_features: int = 1, hidden_channels: int = 32,
                 num_layers: int = 3, head_hidden: int = 256, head_layers: int = 2, activation: str = "relu",
                 dropout: float = 0.0, sign_symmetric: bool = False):
        super().__init__()
        self.encoder = GraphEncoder(spec, in_channels, hidden_channels, sign_symmetric)
        layer = SignMessagePassing if sign_symmetric else MessagePassing
        self.rounds = nn.ModuleList(layer(hidden_channels) for _ in range(num_layers))
        self.pool = GraphPool(spec, hidden_channels, sign_symmetric=sign_symmetric)
        self.head = _mlp(self.pool.out_features, head_hidden, out_features, head_layers, activation, dropout)

    def forward(self, ws: WeightSpace) -> Tensor:
        g = self.encoder(ws)
        for mp in self.rounds:
            g = mp(g)
        return self.head(self.pool(g))


# --------------------------------------------------------------------------- baselines
class FlatMLP(nn.Module):
    """MLP on the vectorized weights: the baseline that ignores the symmetry altogether."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_features: int = 1, hidden: int = 256,
                 depth: int = 3, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        total = sum(l.n_out * l.n_in * l.kernel_size + l.n_out for l in spec.layers)
        self.net = _mlp(in_channels * total, hidden, out_features, depth, activation, dropout)

    def forward(self, ws: WeightSpace) -> Tensor:
        return self.net(ws.flatten().flatten(1))


class DeepSets(nn.Module):
    """Per-parameter DeepSets: embed each parameter with its value(s) and a learned tensor
    embedding, average, then an MLP. Invariant to *all* permutations within a tensor."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_features: int = 1, hidden: int = 128,
                 activation: str = "relu"):
        super().__init__()
        self.tensor_embed = nn.Parameter(torch.randn(2 * spec.num_layers, hidden) * 0.1)
        self.phi = _mlp(in_channels, hidden, hidden, 2, activation)
        self.rho = _mlp(hidden * 2 * spec.num_layers, hidden, out_features, 2, activation)

    def forward(self, ws: WeightSpace) -> Tensor:
        pooled = []
        for k, t in enumerate(ws.tensors()):
            x = t.flatten(2).transpose(1, 2)  # [B, n, C]
            pooled.append(torch.relu(self.phi(x) + self.tensor_embed[k]).mean(1))
        return self.rho(torch.cat(pooled, -1))


class StatNN(nn.Module):
    """Statistics of each tensor (mean, std, quantiles) fed to an MLP (Unterthiner et al. 2020)."""

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, spec: WeightSpaceSpec, in_channels: int = 1, out_features: int = 1, hidden: int = 256,
                 depth: int = 3, activation: str = "relu"):
        super().__init__()
        n_stats = 2 + len(self.QUANTILES)
        self.register_buffer("q", torch.tensor(self.QUANTILES))
        self.net = _mlp(2 * spec.num_layers * in_channels * n_stats, hidden, out_features, depth, activation)

    def forward(self, ws: WeightSpace) -> Tensor:
        feats = []
        for t in ws.tensors():
            x = t.flatten(2)  # [B, C, n]
            std, mean = torch.std_mean(x, dim=-1, unbiased=False)
            qs = torch.quantile(x, self.q.to(x.dtype), dim=-1).permute(1, 2, 0)  # [B, C, Q]
            feats.append(torch.cat([mean[..., None], std[..., None], qs], -1).flatten(1))
        return self.net(torch.cat(feats, -1))


class ProbeNet(nn.Module):
    """Reads networks by running them: probe inputs go through every network, an MLP reads the outputs.

    Probing, the function-space alternative to reading weights (Kahana et al., ICLR 2025,
    "ProbeGen"). It sees the function, not the weights, so it is invariant to *every* symmetry
    that leaves the function unchanged (hidden permutations, ReLU rescaling, SIREN sign flips),
    but it needs the architecture itself (``template``, whose parameter names are the spec's
    ``weight_name`` / ``bias_name``) and raw weights, not normalized ones. Several outputs are
    read as log-probabilities and probabilities (a classifier's logits carry an arbitrary offset
    and scale), one output as a value.

    With ``generator_depth`` > 0 the probes are ProbeGen's: one learned code per probe mapped by a
    shared *deep linear* generator (``generator_depth`` linear layers, no activations), whose
    overparameterization biases the probes towards shared structure and overfits less than
    free probes; with 0 each probe is a free tensor. Either way they start around the middle of
    ``probe_range``.
    """

    def __init__(self, spec: WeightSpaceSpec, template: nn.Module, input_shape: Sequence[int], out_features: int = 1,
                 num_probes: int = 32, hidden: int = 256, depth: int = 3, activation: str = "relu",
                 dropout: float = 0.0, probe_range: tuple[float, float] = (0.0, 1.0), generator_depth: int = 4,
                 code_dim: int = 32, generator_width: int = 64):
        super().__init__()
        names = {n for n, _ in template.named_parameters()}
        wanted = [n for layer in spec.layers for n in (layer.weight_name, layer.bias_name if layer.has_bias else None)
                  if n is not None]
        missing = [n for n in wanted if n not in names]
        if missing or len(wanted) != len(names):
            raise ValueError(f"ProbeNet's template has parameters {sorted(names)}, the weight space names "
                             f"{wanted}: they must be the same tensors")
        self._template = (template,)  # structure only: kept out of parameters(), state_dict() and .to()
        self.spec = spec
        self.input_shape = tuple(input_shape)
        if generator_depth < 0 or num_probes < 1:
            raise ValueError(f"ProbeNet needs num_probes >= 1 and generator_depth >= 0, got {num_probes}, "
                             f"{generator_depth}")
        if generator_depth:
            dims = [code_dim] + [generator_width] * (generator_depth - 1) + [math.prod(self.input_shape)]
            self.codes = nn.Parameter(torch.randn(num_probes, code_dim))
            self.generator = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])))
            with torch.no_grad():
                self.generator[-1].bias.fill_(sum(probe_range) / 2)
            self.register_parameter("probes", None)
        else:
            self.codes, self.generator = None, None
            self.probes = nn.Parameter(torch.empty(num_probes, *self.input_shape).uniform_(*probe_range))
        n_out = spec.layers[-1].n_out
        features = num_probes * (2 * n_out if n_out > 1 else 1)
        self.net = _mlp(features, hidden, out_features, depth, activation, dropout)

    def _apply(self, fn, *args, **kwargs):
        self._template[0]._apply(fn)  # buffers of the architecture (if any) follow the model's device and dtype
        return super()._apply(fn, *args, **kwargs)

    def probe_inputs(self) -> Tensor:
        """The inputs every network is run on, ``[num_probes, *input_shape]``."""
        if self.generator is None:
            return self.probes
        return self.generator(self.codes).view(-1, *self.input_shape)

    def forward(self, ws: WeightSpace) -> Tensor:
        from torch.func import functional_call, vmap

        if ws.spec != self.spec:
            raise ValueError(f"ProbeNet was built for {self.spec}, got a weight space of {ws.spec}")
        if ws.channels != 1:
            raise ValueError(f"ProbeNet reads one-channel weight spaces (the networks themselves), got {ws.channels}")
        template, probes = self._template[0], self.probe_inputs()
        outputs = vmap(lambda p: functional_call(template, p, (probes,)))(ws.to_params())  # [B, K, n_out]
        if outputs.shape[-1] > 1:
            outputs = torch.cat([outputs.log_softmax(-1), outputs.softmax(-1)], -1)
        return self.net(outputs.flatten(1))
