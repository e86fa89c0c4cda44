"""Weight spaces: the weights and biases of a batch of same-architecture networks.

A network with L weight layers has L + 1 *neuron sets*: set 0 is the input, set L the output,
sets 1..L-1 are hidden. Weight ``i`` (0-based) maps set ``i`` to set ``i + 1``, so its rows live
on set ``i + 1`` and its columns on set ``i``; bias ``i`` lives on set ``i + 1``. Permuting a
hidden set (rows of W_i and b_i, columns of W_{i+1}) leaves the network's function unchanged;
that is the symmetry every layer in :mod:`metaopt.layers` respects.

Tensors are stored as ``weights[i]: [B, C, n_out, n_in, *kernel]`` and ``biases[i]: [B, C, n_out]``
(batch of networks, feature channels). A Linear layer that reads a flattened conv feature map
(``c`` channels times ``s`` spatial positions) is stored with ``n_in = c`` and ``kernel = (s,)``,
so permuting a conv channel moves its whole block of columns, as it must.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LayerSpec", "WeightSpaceSpec", "WeightSpace", "UnsupportedLayerError", "random_hidden_perms"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class UnsupportedLayerError(ValueError):
    """A module or tensor that a weight space cannot represent."""


@dataclass(frozen=True)
class LayerSpec:
    """One weight layer: sizes, kernel, and the names its tensors have in a state dict."""

    n_out: int
    n_in: int
    kernel: tuple[int, ...] = ()
    kind: str = "linear"  # "linear" (kernel=(s,) when it reads a flattened conv map), "conv1d", "conv2d"
    has_bias: bool = True
    weight_name: str = ""
    bias_name: str = ""

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the weight as the module stores it."""
        if self.kind == "linear":
            return (self.n_out, self.n_in * math.prod(self.kernel))
        return (self.n_out, self.n_in, *self.kernel)

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)


@dataclass(frozen=True)
class WeightSpaceSpec:
    """The architecture of a weight space and its symmetry.

    ``weight_sets[i] = (i + 1, i)`` names the neuron sets of weight i's (row, column) axes and
    ``bias_sets[i] = i + 1`` that of bias i; equal set numbers are tied (permuted together).
    ``permutable_sets`` are the hidden sets 1..L-1; sets 0 (input) and L (output) are fixed.
    """

    layers: tuple[LayerSpec, ...]
    neuron_sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("a weight space needs at least one layer")
        for i in range(1, len(self.layers)):
            if self.layers[i].n_in != self.layers[i - 1].n_out:
                raise ValueError(
                    f"layer {i} reads {self.layers[i].n_in} neurons but layer {i - 1} writes "
                    f"{self.layers[i - 1].n_out}: not a chain"
                )
        sizes = (self.layers[0].n_in,) + tuple(layer.n_out for layer in self.layers)
        object.__setattr__(self, "neuron_sizes", sizes)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def weight_sets(self) -> tuple[tuple[int, int], ...]:
        return tuple((i + 1, i) for i in range(self.num_layers))

    @property
    def bias_sets(self) -> tuple[int, ...]:
        return tuple(i + 1 for i in range(self.num_layers))

    @property
    def permutable_sets(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_layers))

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return self.neuron_sizes[1:-1]

    def num_params(self) -> int:
        return sum(math.prod(l.param_shape) + (l.n_out if l.has_bias else 0) for l in self.layers)

    def __str__(self) -> str:
        parts = []
        for l in self.layers:
            k = "x".join(map(str, l.kernel))
            parts.append(f"{l.kind}({l.n_in}->{l.n_out}{', k=' + k if k else ''})")
        return " | ".join(parts)


def _infer_layer(module: nn.Module, name: str, prev: LayerSpec | None) -> LayerSpec:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise UnsupportedLayerError(f"{name} ({module}): grouped convolutions are not supported")
        if prev is not None and prev.kind == "linear":
            raise UnsupportedLayerError(f"{name} ({module}): a convolution after a Linear layer is not supported")
        kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        return LayerSpec(module.out_channels, module.in_channels, tuple(module.kernel_size), kind,
                         module.bias is not None, f"{name}.weight", f"{name}.bias")
    n_out, n_in = module.weight.shape
    kernel: tuple[int, ...] = ()
    if prev is not None and prev.kind != "linear" and n_in != prev.n_out:
        if n_in % prev.n_out:
            raise UnsupportedLayerError(
                f"{name} ({module}) reads {n_in} features, not a multiple of the previous conv's "
                f"{prev.n_out} channels: cannot tie its columns to those channels"
            )
        kernel, n_in = (n_in // prev.n_out,), prev.n_out
    return LayerSpec(n_out, n_in, kernel, "linear", module.bias is not None, f"{name}.weight", f"{name}.bias")


def spec_from_module(module: nn.Module) -> WeightSpaceSpec:
    """Read the chain of Linear/Conv layers of ``module`` (in registration order)."""
    layers: list[LayerSpec] = []
    for name, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        if isinstance(sub, _SUPPORTED):
            layer = _infer_layer(sub, name, layers[-1] if layers else None)
            if layers and layer.n_in != layers[-1].n_out:
                raise UnsupportedLayerError(
                    f"{name} ({sub}) reads {layer.n_in} neurons but the previous layer writes "
                    f"{layers[-1].n_out}: not a chain of layers"
                )
            layers.append(layer)
        elif own:
            raise UnsupportedLayerError(
                f"{name or 'the module'} ({type(sub).__name__}) has parameters but is not "
                f"nn.Linear/nn.Conv1d/nn.Conv2d; a weight space holds only chains of those"
            )
    if not layers:
        raise UnsupportedLayerError(f"{type(module).__name__} has no nn.Linear/nn.Conv layers")
    return WeightSpaceSpec(tuple(layers))


def spec_from_state_dict(state_dict: dict[str, Tensor]) -> WeightSpaceSpec:
    """Infer the layer chain from ``*.weight`` / ``*.bias`` keys in order (2-D: Linear, 3-D/4-D: conv)."""
    layers: list[LayerSpec] = []
    keys = list(state_dict)
    i = 0
    while i < len(keys):
        key, w = keys[i], state_dict[keys[i]]
        if not key.endswith("weight") or w.dim() < 2:
            raise UnsupportedLayerError(
                f"state dict entry {key!r} with shape {tuple(w.shape)} is not the weight of a Linear/Conv layer"
            )
        if w.dim() > 4:
            raise UnsupportedLayerError(f"state dict entry {key!r}: {w.dim() - 2}-D convolutions are not supported")
        prefix = key[: -len("weight")]
        has_bias = i + 1 < len(keys) and keys[i + 1] == prefix + "bias"
        kind = {2: "linear", 3: "conv1d", 4: "conv2d"}[w.dim()]
        n_out, n_in, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        prev = layers[-1] if layers else None
        if kind == "linear" and prev is not None and prev.kind != "linear" and n_in != prev.n_out:
            if n_in % prev.n_out:
                raise UnsupportedLayerError(f"{key!r}: {n_in} columns are not a multiple of {prev.n_out} channels")
            kernel, n_in = (n_in // prev.n_out,), prev.n_out
        layers.append(LayerSpec(n_out, n_in, kernel, kind, has_bias, key, prefix + "bias"))
        i += 2 if has_bias else 1
    return WeightSpaceSpec(tuple(layers))


def _permute_axis(x: Tensor, perm: Tensor, axis: int) -> Tensor:
    """Permute ``x`` along ``axis``; ``perm`` is [n] (same for the batch) or [B, n] (one per network)."""
    perm = perm.to(x.device)
    if perm.dim() == 1:
        return x.index_select(axis, perm)
    shape = [1] * x.dim()
    shape[0], shape[axis] = perm.shape
    return x.gather(axis, perm.view(shape).expand(*x.shape[:axis], perm.shape[1], *x.shape[axis + 1:]))


def random_hidden_perms(spec: WeightSpaceSpec, generator: torch.Generator | None = None,
                        batch_size: int | None = None) -> list[Tensor]:
    """One random permutation per hidden set ([n] or [batch_size, n] each)."""
    def one(n):
        if batch_size is None:
            return torch.randperm(n, generator=generator)
        return torch.stack([torch.randperm(n, generator=generator) for _ in range(batch_size)])
    return [one(n) for n in spec.hidden_sizes]


class WeightSpace:
    """A batch of networks' weights and biases with feature channels (see module docstring).

    Build one with :meth:`from_modules`, :meth:`from_state_dicts` or ``WeightSpace(weights, biases)``.
    Arithmetic (``+ - *``, :meth:`map`) acts elementwise, so it commutes with hidden permutations.
    """

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor], spec: WeightSpaceSpec | None = None):
        weights, biases = tuple(weights), tuple(biases)
        if len(weights) != len(biases):
            raise ValueError(f"{len(weights)} weight tensors but {len(biases)} bias tensors")
        if not weights:
            raise ValueError("a weight space needs at least one layer")
        B, C = weights[0].shape[:2]
        for i, (w, b) in enumerate(zip(weights, biases)):
            if w.dim() < 4 or b.dim() != 3:
                raise ValueError(
                    f"layer {i}: expected weights [B, C, n_out, n_in, *kernel] and biases [B, C, n_out], "
                    f"got {tuple(w.shape)} and {tuple(b.shape)}"
                )
            if tuple(w.shape[:2]) != (B, C) or tuple(b.shape[:2]) != (B, C) or b.shape[2] != w.shape[2]:
                raise ValueError(
                    f"layer {i}: weight {tuple(w.shape)} and bias {tuple(b.shape)} disagree with each other "
                    f"or with layer 0's batch/channels ({B}, {C})"
                )
        if spec is None:
            spec = WeightSpaceSpec(tuple(
                LayerSpec(w.shape[2], w.shape[3], tuple(w.shape[4:]),
                          "linear" if w.dim() == 4 else f"conv{w.dim() - 4}d",
                          weight_name=f"layers.{i}.weight", bias_name=f"layers.{i}.bias")
                for i, w in enumerate(weights)))
        else:
            for i, (w, layer) in enumerate(zip(weights, spec.layers)):
                if tuple(w.shape[2:]) != (layer.n_out, layer.n_in, *layer.kernel):
                    raise ValueError(f"layer {i}: weight shape {tuple(w.shape)} does not match spec {layer}")
            if len(weights) != spec.num_layers:
                raise ValueError(f"{len(weights)} layers given, spec has {spec.num_layers}")
        self.weights, self.biases, self.spec = weights, biases, spec

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_modules(cls, modules: nn.Module | Iterable[nn.Module]) -> "WeightSpace":
        """Stack same-architecture networks into a weight space with one channel."""
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        if not modules:
            raise ValueError("from_modules needs at least one module")
        spec = spec_from_module(modules[0])
        for j, m in enumerate(modules[1:], start=1):
            other = spec_from_module(m)
            if other != spec:
                raise ValueError(f"module {j} has architecture [{other}] but module 0 has [{spec}]")
        return cls.from_state_dicts([m.state_dict() for m in modules], spec)

    @classmethod
    def from_state_dicts(cls, state_dicts: Sequence[dict[str, Tensor]], spec: WeightSpaceSpec | None = None
                         ) -> "WeightSpace":
        if isinstance(state_dicts, dict):
            state_dicts = [state_dicts]
        state_dicts = [{k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")} for sd in state_dicts]
        spec = spec or spec_from_state_dict(state_dicts[0])
        weights, biases = [], []
        for layer in spec.layers:
            ws, bs = [], []
            for j, sd in enumerate(state_dicts):
                if layer.weight_name not in sd:
                    raise KeyError(f"state dict {j} has no {layer.weight_name!r}")
                w = sd[layer.weight_name]
                if tuple(w.shape) != layer.param_shape:
                    raise ValueError(f"state dict {j}: {layer.weight_name!r} has shape {tuple(w.shape)}, "
                                     f"expected {layer.param_shape}")
                ws.append(w.detach().reshape(layer.n_out, layer.n_in, *layer.kernel))
                bs.append(sd[layer.bias_name].detach() if layer.has_bias else w.new_zeros(layer.n_out))
            weights.append(torch.stack(ws)[:, None])
            biases.append(torch.stack(bs)[:, None])
        return cls(weights, biases, spec)

    @classmethod
    def from_flat(cls, flat: Tensor, spec: WeightSpaceSpec) -> "WeightSpace":
        """Inverse of :meth:`flatten`: ``flat`` is [B, C, spec.num_params()]-like (all weights then biases per layer)."""
        weights, biases, pos = [], [], 0
        B, C = flat.shape[:2]
        for layer in spec.layers:
            shape = (layer.n_out, layer.n_in, *layer.kernel)
            n = math.prod(shape)
            weights.append(flat[..., pos:pos + n].reshape(B, C, *shape))
            pos += n
            biases.append(flat[..., pos:pos + layer.n_out])
            pos += layer.n_out
        if pos != flat.shape[-1]:
            raise ValueError(f"flat tensor has {flat.shape[-1]} entries, the spec needs {pos}")
        return cls(weights, biases, spec)

    # ----------------------------------------------------------------- conversions
    def flatten(self) -> Tensor:
        """[B, C, total]: every weight then its bias, layer by layer (biases of bias-free layers included)."""
        B, C = self.batch_size, self.channels
        return torch.cat([t.reshape(B, C, -1) for w, b in self for t in (w, b)], dim=-1)

    def to_params(self) -> OrderedDict:
        """All networks as one stacked state dict ``{name: [B, *param_shape]}`` (needs one channel): the
        layout ``torch.func.vmap`` over ``functional_call`` takes, to run every network at once."""
        if self.channels != 1:
            raise ValueError(f"to_params needs 1 channel, this weight space has {self.channels}")
        params = OrderedDict()
        for layer, w, b in zip(self.spec.layers, self.weights, self.biases):
            params[layer.weight_name] = w[:, 0].reshape(self.batch_size, *layer.param_shape)
            if layer.has_bias:
                params[layer.bias_name] = b[:, 0]
        return params

    def to_state_dicts(self) -> list[OrderedDict]:
        """One state dict per network (needs one channel), keyed as the source modules were."""
        if self.channels != 1:
            raise ValueError(f"to_state_dicts needs 1 channel, this weight space has {self.channels}")
        params = self.to_params()
        return [OrderedDict((k, v[j]) for k, v in params.items()) for j in range(self.batch_size)]

    def to_modules(self, template: nn.Module) -> list[nn.Module]:
        """Copies of ``template`` carrying each network's weights."""
        modules = []
        for sd in self.to_state_dicts():
            m = copy.deepcopy(template)
            m.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
            modules.append(m)
        return modules

    # ----------------------------------------------------------------- structure
    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    @property
    def channels(self) -> int:
        return self.weights[0].shape[1]

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        return iter(zip(self.weights, self.biases))

    def tensors(self) -> list[Tensor]:
        return [t for pair in self for t in pair]

    def __repr__(self) -> str:
        return f"WeightSpace(batch={self.batch_size}, channels={self.channels}, [{self.spec}])"

    @classmethod
    def cat_channels(cls, spaces: Sequence["WeightSpace"]) -> "WeightSpace":
        """Stack feature channels, e.g. [params, grads, momenta] -> one input to a metanetwork."""
        first = spaces[0]
        for s in spaces[1:]:
            if s.spec.neuron_sizes != first.spec.neuron_sizes or s.batch_size != first.batch_size:
                raise ValueError(f"cannot stack channels of {s} and {first}")
        return cls([torch.cat(ws, 1) for ws in zip(*(s.weights for s in spaces))],
                   [torch.cat(bs, 1) for bs in zip(*(s.biases for s in spaces))], first.spec)

    def split_channels(self, sizes: Sequence[int]) -> list["WeightSpace"]:
        parts_w = [torch.split(w, list(sizes), dim=1) for w in self.weights]
        parts_b = [torch.split(b, list(sizes), dim=1) for b in self.biases]
        return [WeightSpace([p[k] for p in parts_w], [p[k] for p in parts_b], self.spec) for k in range(len(sizes))]

    # ----------------------------------------------------------------- elementwise
    def map(self, fn: Callable[[Tensor], Tensor]) -> "WeightSpace":
        return WeightSpace([fn(w) for w in self.weights], [fn(b) for b in self.biases], self.spec)

    def zip_map(self, fn: Callable[..., Tensor], *others: "WeightSpace") -> "WeightSpace":
        return WeightSpace([fn(*ts) for ts in zip(self.weights, *(o.weights for o in others))],
                           [fn(*ts) for ts in zip(self.biases, *(o.biases for o in others))], self.spec)

    def _binary(self, other, op):
        if isinstance(other, WeightSpace):
            return self.zip_map(op, other)
        return self.map(lambda t: op(t, other))

    def __add__(self, other):
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._binary(other, torch.sub)

    def __mul__(self, other):
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __neg__(self):
        return self.map(torch.neg)

    def detach(self) -> "WeightSpace":
        return self.map(Tensor.detach)

    def to(self, *args, **kwargs) -> "WeightSpace":
        return self.map(lambda t: t.to(*args, **kwargs))

    # ----------------------------------------------------------------- symmetry
    def permute_hidden(self, perms: Sequence[Tensor]) -> "WeightSpace":
        """Apply the coupled action: hidden set k (1..L-1) is permuted by ``perms[k - 1]``.

        For each hidden layer this permutes rows of W_{k-1} and b_{k-1} and columns of W_k, so
        the networks compute the same functions. Each perm is [n_k] or [B, n_k].
        """
        if len(perms) != len(self.spec.hidden_sizes):
            raise ValueError(f"expected {len(self.spec.hidden_sizes)} permutations (one per hidden layer), "
                             f"got {len(perms)}")
        for k, (p, n) in enumerate(zip(perms, self.spec.hidden_sizes)):
            if p.shape[-1] != n:
                raise ValueError(f"permutation {k} has length {p.shape[-1]}, hidden layer {k} has {n} neurons")
        weights, biases = list(self.weights), list(self.biases)
        for k, p in enumerate(perms):
            weights[k] = _permute_axis(weights[k], p, 2)
            biases[k] = _permute_axis(biases[k], p, 2)
            weights[k + 1] = _permute_axis(weights[k + 1], p, 3)
        return WeightSpace(weights, biases, self.spec)
