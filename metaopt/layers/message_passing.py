"""Message passing on the graph of a network's neurons: nonlinear interactions along every weight.

The NP/DWS layers let neurons interact only through pooled *linear* maps: what neuron j of one
layer learns about neuron i of the layer before is a sum weighted by W[j, i]. Graph metanetworks
(Lim et al. 2024; Kofinas et al. 2024; ScaleGMN, Kalogeropoulos et al. 2024) read the same weights as a
graph instead, neurons as nodes and weights as edges, and compute each edge's message by an MLP of
(the weight, the features of both its neurons). That nonlinearity lets a message depend on the
product of what the two neurons carry, which a linear map cannot express.

Every map here is shared by all neurons of a set (and all edges of a layer) and aggregates by means
over neurons, so a stack of :class:`MessagePassing` rounds is equivariant to permutations of the
hidden neurons. The input and output neurons are not interchangeable: they get learned position
embeddings. Conv kernels (and flattened-map positions) become edge channels.

Networks with odd activations (sine, tanh) have one more exact symmetry: flipping the sign of a
hidden neuron's incoming weights and bias and of its outgoing weights keeps the function. With
``sign_symmetric=True`` every piece is also equivariant to these flips (ScaleGMN's sign case):
a hidden neuron's features change sign with it, an edge's with the product of its two neurons'
signs, so only odd maps act on them (bias-free linear maps, RMS norms, products of features whose
signs cancel, and gates ``u * sigmoid(g(|u|))``), and the read-out pools absolute values and
quadratic forms. Canonicalizing the signs instead (``bias >= 0``) jumps wherever a bias crosses 0,
which after a short fit from zero biases is many neurons.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..weight_space import WeightSpace, WeightSpaceSpec


class WeightGraph:
    """Node features per neuron set ``[B, n_s, D]`` and edge features per weight layer ``[B, n_out, n_in, D]``."""

    def __init__(self, nodes: list[Tensor], edges: list[Tensor]):
        if len(nodes) != len(edges) + 1:
            raise ValueError(f"a chain of {len(edges)} weight layers has {len(edges) + 1} neuron sets, "
                             f"got {len(nodes)}")
        self.nodes, self.edges = nodes, edges


class GraphEncoder(nn.Module):
    """A one-chain weight space as a :class:`WeightGraph` of ``dim`` features.

    Edges read their weight (every channel and kernel position) and neurons their bias, through
    one map per layer, so layers stay apart; input and output neurons also get one embedding per
    position, since they are not interchangeable. With ``sign_symmetric`` the maps have no additive
    bias, which would not flip with a neuron.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, dim: int, sign_symmetric: bool = False):
        super().__init__()
        self.spec = spec
        with_bias = not sign_symmetric
        self.edge_in = nn.ModuleList(nn.Linear(in_channels * l.kernel_size, dim, bias=with_bias)
                                     for l in spec.layers)
        self.bias_in = nn.ModuleList(nn.Linear(in_channels, dim, bias=with_bias) for _ in spec.layers)
        sizes = spec.neuron_sizes
        self.input_embed = nn.Parameter(torch.randn(sizes[0], dim) * 0.5)
        self.output_embed = nn.Parameter(torch.randn(sizes[-1], dim) * 0.5)

    def forward(self, ws: WeightSpace) -> WeightGraph:
        if ws.spec.neuron_sizes != self.spec.neuron_sizes:
            raise ValueError(f"{type(self).__name__} was built for [{self.spec}], got [{ws.spec}]")
        B = ws.batch_size
        edges = []
        for w, lin in zip(ws.weights, self.edge_in):
            # [B, C, n_out, n_in, *kernel] -> [B, n_out, n_in, C * kernel]
            x = w.flatten(4) if w.dim() > 4 else w.unsqueeze(-1)
            edges.append(lin(x.permute(0, 2, 3, 1, 4).flatten(3)))
        nodes = [self.input_embed.expand(B, -1, -1)]
        for b, lin in zip(ws.biases, self.bias_in):
            nodes.append(lin(b.transpose(1, 2)))
        nodes[-1] = nodes[-1] + self.output_embed
        return WeightGraph(nodes, edges)


class MessagePassing(nn.Module):
    """One round, both directions: every edge updates from (itself, its two neurons) by a residual
    MLP, then every neuron from the mean message of its incoming and of its outgoing edges.

    The maps are shared by all layers of the network read (the encoder's per-layer maps tell them
    apart), as in graph metanetworks.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.edge_norm, self.node_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.edge_self = nn.Linear(dim, dim)
        self.edge_src = nn.Linear(dim, dim, bias=False)
        self.edge_dst = nn.Linear(dim, dim, bias=False)
        self.edge_out = nn.Linear(dim, dim)
        self.node_mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, g: WeightGraph) -> WeightGraph:
        h = [self.node_norm(x) for x in g.nodes]
        incoming = [torch.zeros_like(h[0])] + [None] * (len(h) - 1)  # the input neurons have no incoming edges
        outgoing = [None] * (len(h) - 1) + [torch.zeros_like(h[-1])]
        edges = []
        for l, e in enumerate(g.edges):
            src, dst = self.edge_src(h[l]), self.edge_dst(h[l + 1])  # [B, n_in, D], [B, n_out, D]
            message = torch.relu(self.edge_self(self.edge_norm(e)) + dst.unsqueeze(2) + src.unsqueeze(1))
            edges.append(e + self.edge_out(message))
            incoming[l + 1] = message.mean(2)
            outgoing[l] = message.mean(1)
        nodes = [x + self.node_mlp(torch.cat([hx, i, o], -1))
                 for x, hx, i, o in zip(g.nodes, h, incoming, outgoing)]
        return WeightGraph(nodes, edges)


class _SignGate(nn.Module):
    """``u * sigmoid(g(|u|))``: a nonlinearity that commutes with flipping the sign of ``u``.
    ``per_channel`` makes ``g`` diagonal, for the many edges."""

    def __init__(self, dim: int, per_channel: bool = False):
        super().__init__()
        self.gate = _ChannelAffine(dim) if per_channel else nn.Linear(dim, dim)

    def forward(self, u: Tensor) -> Tensor:
        return u * torch.sigmoid(self.gate(u.abs()))


class _ChannelAffine(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, x, self.weight)


class SignMessagePassing(nn.Module):
    """:class:`MessagePassing` for odd activations: equivariant to hidden permutations *and* sign flips.

    An edge's feature flips with each of its two neurons, a hidden neuron's with itself. So the
    edge update adds (edge map) + (map of one end) * (map of the other end), and the message to a
    neuron multiplies a map of the edge by a map of the neuron at the far end: the far end's sign
    cancels, the near end's remains. Every linear map is bias-free; gates add the nonlinearity.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.edge_norm, self.node_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.edge_maps = nn.Linear(dim, 3 * dim, bias=False)  # edge update, forward and backward messages
        self.node_maps = nn.Linear(dim, 4 * dim, bias=False)  # as destination, as source, far end fwd / bwd
        self.edge_gate = _SignGate(dim, per_channel=True)
        self.node_update = nn.Linear(3 * dim, dim, bias=False)
        self.node_gate = _SignGate(dim)

    def forward(self, g: WeightGraph) -> WeightGraph:
        h = [self.node_norm(x) for x in g.nodes]
        # per neuron: its map as an edge's destination, as its source, and as the far end of a
        # forward / backward message
        maps = [self.node_maps(x).chunk(4, -1) for x in h]
        incoming = [torch.zeros_like(h[0])] + [None] * (len(h) - 1)
        outgoing = [None] * (len(h) - 1) + [torch.zeros_like(h[-1])]
        edges = []
        for l, e in enumerate(g.edges):
            update, fwd, bwd = self.edge_maps(self.edge_norm(e)).chunk(3, -1)
            dst, src = maps[l + 1][0], maps[l][1]
            edges.append(e + self.edge_gate(update + dst.unsqueeze(2) * src.unsqueeze(1)))
            incoming[l + 1] = (fwd * maps[l][2].unsqueeze(1)).mean(2)
            outgoing[l] = (bwd * maps[l + 1][3].unsqueeze(2)).mean(1)
        nodes = [x + self.node_gate(self.node_update(torch.cat([hx, i, o], -1)))
                 for x, hx, i, o in zip(g.nodes, h, incoming, outgoing)]
        return WeightGraph(nodes, edges)


class GraphPool(nn.Module):
    """Invariant read-out: mean and max over each hidden set's neurons and each layer's edges; the
    output neurons, and up to ``max_positional`` input neurons, kept by position (more inputs, as
    in an image classifier, are pooled too)."""

    def __init__(self, spec: WeightSpaceSpec, dim: int, max_positional: int = 16, sign_symmetric: bool = False):
        super().__init__()
        sizes = spec.neuron_sizes
        self.keep_inputs = sizes[0] <= max_positional
        inputs = sizes[0] if self.keep_inputs else 2
        # with signs: |h| and the quadratic form h * (M h) of each hidden neuron, |e| of each edge
        self.quadratic = nn.Linear(dim, dim, bias=False) if sign_symmetric else None
        hidden = 4 if sign_symmetric else 2
        self.out_features = dim * (inputs + sizes[-1] + hidden * (len(sizes) - 2) + 2 * spec.num_layers)

    def forward(self, g: WeightGraph) -> Tensor:
        first = g.nodes[0]
        parts = [first.flatten(1)] if self.keep_inputs else [first.mean(1), first.amax(1)]
        parts.append(g.nodes[-1].flatten(1))
        hidden, edges = g.nodes[1:-1], g.edges
        if self.quadratic is not None:
            hidden = [torch.cat([x.abs(), x * self.quadratic(x)], -1) for x in hidden]
            edges = [e.abs() for e in edges]
        parts += [r for x in hidden for r in (x.mean(1), x.amax(1))]
        parts += [r for e in edges for r in (e.mean((1, 2)), e.amax(dim=(1, 2)))]
        return torch.cat(parts, 1)
