"""The machinery shared by the NP and DWS layers.

Every equivariant linear map between weight spaces is a sum of pooling, broadcasting and small
linear maps. We get all of them from one observation: a neuron set whose order does not matter
to the symmetry group (a *fixed* set: the input or output neurons in DWS/HNP) behaves exactly
like extra feature channels. So we *fold* such sets, and conv kernels, into the channel axis.
After folding, each tensor is a matrix over two permutable sets, a vector over one, or an
invariant, and the complete set of equivariant linear maps is (Zhou et al. 2023, Sec. 3):

* per neuron set ``s``: the features living on ``s`` (vectors over ``s``, row means of matrices
  whose rows are ``s``, column means of matrices whose columns are ``s``) mixed by one linear map
  and broadcast back to every tensor that touches ``s``;
* a global term: the means of every tensor mixed and broadcast everywhere;
* for matrices, a pointwise channel map of the matrix itself.

Nothing is lost by folding: the channel maps on folded sets are dense, which *is* the full
characterization (DWSNets' block cases). Dense maps over a large fixed set are expensive (the
first layer of a 784-input MLP would need 784^2 C^2 parameters), so a fixed set can instead be
*embedded*: treated like a permutable set and given position-dependent biases, which breaks the
unwanted symmetry at the cost of some expressivity in a single layer (not in a deep stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..weight_space import WeightSpace, WeightSpaceSpec


@dataclass(frozen=True)
class _Entry:
    """One weight or bias tensor as the layer sees it after folding."""

    sets: tuple[int, ...]  # the neuron sets of its kept axes, in order (rows first)
    fold: int  # channels are multiplied by this (folded fixed axes times kernel size)
    perm: tuple[int, ...]  # permutes [B, C, *axes] so folded axes precede kept ones
    folded_shape: tuple[int, ...]
    kept_shape: tuple[int, ...]


class NeuronLayout:
    """How a weight space's tensors are folded, given which fixed neuron sets to fold."""

    def __init__(self, spec: WeightSpaceSpec, fold_sets=()):
        self.spec = spec
        self.fold_sets = frozenset(fold_sets)
        self.entries: list[_Entry] = []
        for layer, (row, col), bias_set in zip(spec.layers, spec.weight_sets, spec.bias_sets):
            self.entries.append(self._entry((row, col) + (None,) * len(layer.kernel),
                                            (layer.n_out, layer.n_in, *layer.kernel)))
            self.entries.append(self._entry((bias_set,), (layer.n_out,)))
        self.kept_sets = sorted({s for e in self.entries for s in e.sets})

    def _entry(self, labels, sizes) -> _Entry:
        folded = [a for a, s in enumerate(labels) if s is None or s in self.fold_sets]
        kept = [a for a in range(len(labels)) if a not in folded]
        return _Entry(
            sets=tuple(labels[a] for a in kept),
            fold=math.prod(sizes[a] for a in folded),
            perm=(0, 1, *(2 + a for a in folded), *(2 + a for a in kept)),
            folded_shape=tuple(sizes[a] for a in folded),
            kept_shape=tuple(sizes[a] for a in kept),
        )

    def fold(self, ws: WeightSpace) -> list[Tensor]:
        out = []
        for e, t in zip(self.entries, ws.tensors()):
            B, C = t.shape[:2]
            out.append(t.permute(e.perm).reshape(B, C * e.fold, *e.kept_shape))
        return out

    def unfold(self, xs: list[Tensor], channels: int) -> WeightSpace:
        ts = []
        for e, x in zip(self.entries, xs):
            y = x.reshape(x.shape[0], channels, *e.folded_shape, *e.kept_shape)
            ts.append(y.permute(tuple(torch.argsort(torch.tensor(e.perm)).tolist())))
        return WeightSpace(ts[0::2], ts[1::2], self.spec)

    @staticmethod
    def pool(x: Tensor, reduce: str = "mean") -> Tensor:
        """``reduce`` (a Tensor method taking ``dim``: "mean", "amax") over every kept (permutable)
        axis: [B, c, *kept] -> [B, c]."""
        return getattr(x, reduce)(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x

    @staticmethod
    def _mean(x: Tensor, dim: int) -> Tensor:
        # sum-then-scale: the backward of sum is a free expand, that of mean a full-size division
        return x.sum(dim) * (1.0 / x.shape[dim])

    def pooled_features(self, xs: list[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
        """The global features [B, G] and, per kept set s, the features living on s [B, F_s, n_s].

        Each matrix is read once per axis; its global mean comes from its (small) row means.
        """
        per_set: dict[int, list[Tensor]] = {s: [] for s in self.kept_sets}
        glob = []
        for e, x in zip(self.entries, xs):
            if len(e.sets) == 2:
                rows, cols = self._mean(x, -1), self._mean(x, -2)
                per_set[e.sets[0]].append(rows)
                per_set[e.sets[1]].append(cols)
                glob.append(self._mean(rows, -1))
            elif len(e.sets) == 1:
                per_set[e.sets[0]].append(x)
                glob.append(self._mean(x, -1))
            else:
                glob.append(x)
        return torch.cat(glob, 1), {s: torch.cat(f, 1) for s, f in per_set.items()}

    def set_feature_dim(self, s: int, channels: int) -> int:
        return sum(channels * e.fold for e in self.entries if s in e.sets)

    def global_dim(self, channels: int) -> int:
        return sum(channels * e.fold for e in self.entries)


class EquivariantLinear(nn.Module):
    """The complete equivariant affine map for a given folding (see the module docstring).

    ``positional_sets`` are kept sets that get position-dependent biases (embedded fixed sets).
    All terms feeding one output tensor are initialised jointly, with the fan-in of their sum,
    so activations keep their scale whatever the depth or width of the network read.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, fold_sets=(),
                 positional_sets=()):
        super().__init__()
        self.spec, self.in_channels, self.out_channels = spec, in_channels, out_channels
        self.layout = layout = NeuronLayout(spec, fold_sets)
        self.positional_sets = frozenset(positional_sets) & set(layout.kept_sets)
        ci, co = in_channels, out_channels
        entries = layout.entries
        self._out_dims = [co * e.fold for e in entries]
        self._set_members = {s: [k for k, e in enumerate(entries) if s in e.sets] for s in layout.kept_sets}

        fans = []
        for e in entries:
            fan = layout.global_dim(ci) + sum(layout.set_feature_dim(s, ci) for s in e.sets)
            fans.append(fan + (ci * e.fold if len(e.sets) == 2 else 0))
        bounds = [1.0 / math.sqrt(f) for f in fans]

        def init(t: Tensor, rows_per_entry: list[tuple[int, int]]) -> nn.Parameter:
            with torch.no_grad():
                start = 0
                for k, n in rows_per_entry:
                    t[start:start + n].uniform_(-bounds[k], bounds[k])
                    start += n
            return nn.Parameter(t)

        all_rows = [(k, d) for k, d in enumerate(self._out_dims)]
        self.global_weight = init(torch.empty(sum(self._out_dims), layout.global_dim(ci)), all_rows)
        self.set_weights = nn.ParameterDict({
            str(s): init(torch.empty(sum(self._out_dims[k] for k in ks), layout.set_feature_dim(s, ci)),
                         [(k, self._out_dims[k]) for k in ks])
            for s, ks in self._set_members.items()
        })
        self.pointwise = nn.ParameterDict({
            str(k): init(torch.empty(co * e.fold, ci * e.fold), [(k, co * e.fold)])
            for k, e in enumerate(entries) if len(e.sets) == 2
        })
        self.biases = nn.ParameterList()
        for k, e in enumerate(entries):
            shape = [n if s in self.positional_sets else 1 for s, n in zip(e.sets, e.kept_shape)]
            self.biases.append(init(torch.empty(co * e.fold, *shape), [(k, co * e.fold)]))

    def forward(self, ws: WeightSpace) -> WeightSpace:
        if ws.channels != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {ws.channels}")
        if ws.spec.neuron_sizes != self.spec.neuron_sizes:
            raise ValueError(f"{type(self).__name__} was built for [{self.spec}], got [{ws.spec}]")
        layout = self.layout
        xs = layout.fold(ws)
        glob, feats = layout.pooled_features(xs)
        g = glob @ self.global_weight.t()
        # small terms first: bias + global + set terms, broadcast but not yet materialized
        small = [b + gk.view(*gk.shape, *([1] * (x.dim() - 2)))
                 for b, gk, x in zip(self.biases, g.split(self._out_dims, 1), xs)]
        set_terms: list[list[Tensor]] = [[] for _ in xs]
        for s, members in self._set_members.items():
            ys = torch.matmul(self.set_weights[str(s)], feats[s])
            for k, y in zip(members, ys.split([self._out_dims[k] for k in members], 1)):
                sets = layout.entries[k].sets
                set_terms[k].append(y if len(sets) == 1 else y.unsqueeze(-1) if sets[0] == s else y.unsqueeze(-2))
        outs = []
        for k, x in enumerate(xs):
            if str(k) in self.pointwise:  # matrix: one full-size tensor, the rest added in place
                # a 1x1 conv writes a fresh 4-D tensor (a view would make the in-place adds slow in autograd)
                out = F.conv2d(x, self.pointwise[str(k)][:, :, None, None])
                first, second = set_terms[k]  # row and column terms, [B, o, n, 1] and [B, o, 1, m]
                out = out.add_(first + small[k]).add_(second)
            else:
                out = small[k]
                for t in set_terms[k]:
                    out = out + t
            outs.append(out)
        return layout.unfold(outs, self.out_channels)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, folded sets={sorted(self.layout.fold_sets)}, "
                f"positional sets={sorted(self.positional_sets)}, params={sum(p.numel() for p in self.parameters())}")
