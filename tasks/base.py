"""The task interface: functional tasks, populations of tasks, task families.

A task is a training problem seen two ways:

* functional: parameters are a ``dict[str, Tensor]`` and ``loss(params, batch)`` is a pure
  function of tensors, so it works under ``torch.func.grad`` / ``vmap`` and under autograd
  through several inner steps (differentiable unrolls for meta-training);
* modular: ``module()`` builds the ``nn.Sequential`` of the same architecture, whose
  ``named_parameters()`` use the same names, for users and for the learned optimizer.

ES and PES train many tasks at once, so every family is written once, batched over a
leading population dimension P (stacked parameters, stacked batches, ``bmm`` and grouped
convolutions).  A single :class:`Task` is the P = 1 case of the same code, so a
population and its members cannot disagree.

Layouts inside :meth:`Network.forward`: dense activations are ``[P, B, F]``; conv
activations are ``[B, P*C, H, W]`` so that one grouped convolution (groups=P) runs every
member's conv layer at once.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

Params = dict[str, Tensor]
# Maps member-stacked inputs [P, B, ...] to outputs [P, B, ...]: the functional network with
# given parameters, or (P = 1) an nn.Module.  The loss hooks only see this.
Forward = Callable[[Tensor], Tensor]
# (position among weight layers, fan_in) -> (weight bound, bias bound) of a uniform init
InitBounds = Callable[[int, int], "tuple[float, float]"]


class Sine(nn.Module):
    """SIREN activation ``sin(w0 * x)``; after a Linear layer it gives ``sin(w0 (W x + b))``."""

    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "sine": Sine,
}
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, Sine, nn.Identity)
_POOLING = (nn.MaxPool2d, nn.AvgPool2d)


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def torch_default_bounds(position: int, fan_in: int) -> tuple[float, float]:
    """nn.Linear / nn.Conv2d's own default init: U(+-1/sqrt(fan_in)) for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return bound, bound


class Network:
    """An ``nn.Sequential`` architecture plus a functional forward batched over members.

    Supported layers: ``nn.Linear``, ``nn.Conv2d`` (groups=1, zero padding), ``nn.Flatten()``,
    max/avg pooling and elementwise activations -- the chains of Linear/Conv layers that
    the equivariant metanetworks read.
    """

    def __init__(self, layers: Sequence[nn.Module], name: str, init: InitBounds = torch_default_bounds):
        self.template = nn.Sequential(*layers).requires_grad_(False)
        self.name = name
        self.init_bounds = init
        for i, layer in enumerate(self.template):
            _check_layer(i, layer)
        self.shapes = {n: tuple(p.shape) for n, p in self.template.named_parameters()}

    def __repr__(self) -> str:
        return f"Network({self.name})"

    def module(self) -> nn.Sequential:
        """A fresh trainable copy of the architecture (load parameters into it with ``load``)."""
        return copy.deepcopy(self.template).requires_grad_(True)

    def init_params(self, seed: int) -> Params:
        """Parameters drawn from a private generator, so the global RNG is left alone."""
        g = torch.Generator().manual_seed(int(seed))
        params: Params = {}
        position = 0
        for name, layer in self.template.named_children():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            fan_in = layer.weight[0].numel()
            w_bound, b_bound = self.init_bounds(position, fan_in)
            params[f"{name}.weight"] = _uniform(layer.weight.shape, w_bound, g)
            if layer.bias is not None:
                params[f"{name}.bias"] = _uniform(layer.bias.shape, b_bound, g)
            position += 1
        return params

    def check(self, params: Params) -> int:
        """The population size P of ``params``; a clear error if names or shapes are off."""
        if set(params) != set(self.shapes):
            raise ValueError(
                f"{self.name}: parameter names {sorted(params)} do not match the architecture's "
                f"{sorted(self.shapes)}"
            )
        sizes = set()
        for name, shape in self.shapes.items():
            got = tuple(params[name].shape)
            if got[1:] != shape:
                raise ValueError(
                    f"{self.name}: parameter {name!r} has shape {got}, expected (P, {', '.join(map(str, shape))}) "
                    "with a leading population dim (Task.loss adds it for single tasks)"
                )
            sizes.add(got[0])
        if len(sizes) != 1:
            raise ValueError(f"{self.name}: parameters disagree on the population size: {sorted(sizes)}")
        return sizes.pop()

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Outputs of every member on its own inputs: ``x`` is ``[P, B, ...]``, the result ``[P, B, out]``."""
        P = self.check(params)
        if x.dim() < 3 or x.shape[0] != P:
            raise ValueError(f"{self.name}: inputs must be [P={P}, B, ...], got shape {tuple(x.shape)}")
        B = x.shape[1]
        spatial = False  # True while x is in the grouped-conv layout [B, P*C, H, W]
        for name, layer in self.template.named_children():
            if isinstance(layer, nn.Linear):
                if x.dim() != 3:
                    raise ValueError(f"{self.name}: Linear layer {name} got inputs {tuple(x.shape)}; add nn.Flatten()")
                x = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x, params[f"{name}.weight"].transpose(1, 2))
            elif isinstance(layer, nn.Conv2d):
                if not spatial:
                    if x.dim() != 5:
                        raise ValueError(f"{self.name}: Conv2d layer {name} needs [P, B, C, H, W] inputs, got {tuple(x.shape)}")
                    x = _conv_layout(x.transpose(0, 1).reshape(B, -1, *x.shape[-2:]))
                    spatial = True
                bias = params.get(f"{name}.bias")
                x = F.conv2d(x, params[f"{name}.weight"].flatten(0, 1), None if bias is None else bias.flatten(),
                             layer.stride, layer.padding, layer.dilation, groups=P)
            elif isinstance(layer, nn.Flatten):
                x = x.reshape(B, P, -1).transpose(0, 1) if spatial else x.flatten(2)
                spatial = False
            else:  # activations work in any layout; pooling needs the conv layout
                if isinstance(layer, _POOLING) and not spatial:
                    x = _conv_layout(x.transpose(0, 1).reshape(B, -1, *x.shape[-2:]))
                    spatial = True
                x = layer(x)
        if spatial:
            x = x.reshape(B, P, *x.shape[1:]).transpose(0, 1)
        return x


def _conv_layout(x: Tensor) -> Tensor:
    """Channels-last on the CPU: oneDNN's grouped convolutions (one group per member) run about
    1.8x faster forward+backward in it (benchmarks/tasks.py, CNN population)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def mlp(in_features: int, hidden: Sequence[int], out_features: int, act: str = "relu",
        flatten: bool = False) -> Network:
    """``[Flatten ->] (Linear -> act) * len(hidden) -> Linear``."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation(act)]
        width = h
    layers.append(nn.Linear(width, out_features))
    return Network(layers, f"mlp[{'-'.join(map(str, (in_features, *hidden, out_features)))},{act}]")


def _check_layer(i: int, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"layer {i}: only Conv2d with groups=1, numeric zero padding is supported, got {layer}")
    elif isinstance(layer, nn.Flatten):
        if (layer.start_dim, layer.end_dim) != (1, -1):
            raise ValueError(f"layer {i}: only nn.Flatten() with default dims is supported, got {layer}")
    elif not isinstance(layer, (nn.Linear, *_ELEMENTWISE, *_POOLING)):
        raise ValueError(f"layer {i}: unsupported layer type {type(layer).__name__}")


def _uniform(shape: Iterable[int], bound: float, g: torch.Generator) -> Tensor:
    return (torch.rand(tuple(shape), generator=g) * 2 - 1) * bound


def _unsqueeze(tree: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tree)


def _first(tree: Any) -> Any:
    return tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, tree)


class Task(ABC):
    """One training problem: architecture, data, objective, metric.

    Families implement four hooks, each batched over a leading member dim P; the public
    single-task methods below run them with P = 1, and :class:`Population` runs them for
    many members.  Batches are NamedTuples of tensors.  The loss and metric hooks get the
    network as a ``forward`` function, so the same code serves parameters (functional
    path) and ``nn.Module`` objects (``module_loss``, used by :func:`train`).
    """

    def __init__(self, network: Network, seed: int):
        self.network = network
        self.seed = int(seed)
        self._data: Any = None

    # ---- hooks: the family-specific part, batched over members ----------------------
    @classmethod
    @abstractmethod
    def stack_data(cls, tasks: Sequence["Task"]) -> Any:
        """Everything the members need at run time, stacked once per population."""

    @abstractmethod
    def batch_from(self, data: Any, generator: torch.Generator) -> Any:
        """Per-member batches with a leading P on every tensor."""

    @abstractmethod
    def losses(self, forward: Forward, batch: Any) -> Tensor:
        """Training loss of each member, shape [P]."""

    @abstractmethod
    def metrics(self, data: Any, forward: Forward) -> dict[str, Tensor]:
        """Evaluation metrics of each member, each of shape [P]."""

    def population_key(self) -> tuple:
        """What members of one population must share (architecture and objective settings)."""
        return (type(self).__name__, self.network.name)

    # ---- single-task interface -------------------------------------------------------
    @property
    def data(self) -> Any:
        if self._data is None:
            self._data = self.stack_data([self])
        return self._data

    def init_params(self, seed: int) -> Params:
        return self.network.init_params(seed)

    def sample_batch(self, generator: torch.Generator) -> Any:
        return _first(self.batch_from(self.data, generator))

    def loss(self, params: Params, batch: Any) -> Tensor:
        return self.losses(self._forward(params), _unsqueeze(batch))[0]

    def module_loss(self, module: nn.Module, batch: Any) -> Tensor:
        """The same loss, computed by running ``module`` (the plain PyTorch path)."""
        return self.losses(lambda x: module(x[0]).unsqueeze(0), _unsqueeze(batch))[0]

    @torch.no_grad()
    def evaluate(self, params: Params) -> dict[str, float]:
        return {k: float(v[0]) for k, v in self.metrics(self.data, self._forward(params)).items()}

    def _forward(self, params: Params) -> Forward:
        stacked = _unsqueeze(params)
        return lambda x: self.network.forward(stacked, x)

    def module(self, params: Params | None = None) -> nn.Sequential:
        """A fresh ``nn.Sequential``, holding ``params`` if given (else ``init_params(0)``)."""
        return self.load(self.network.module(), self.init_params(0) if params is None else params)

    def load(self, module: nn.Module, params: Params) -> nn.Module:
        """Copy ``params`` into ``module`` in place (names and shapes must match)."""
        own = dict(module.named_parameters())
        if set(own) != set(params):
            raise ValueError(f"module parameters {sorted(own)} do not match {sorted(params)}")
        with torch.no_grad():
            for name, p in own.items():
                if p.shape != params[name].shape:
                    raise ValueError(f"parameter {name!r}: module has {tuple(p.shape)}, params have {tuple(params[name].shape)}")
                p.copy_(params[name])
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.network.name}, seed={self.seed})"


class Population:
    """Many tasks of one architecture, run as one stacked computation.

    Every tensor in params and batches has a leading member dim P; ``loss`` returns [P],
    so ``loss(...).sum()`` differentiates to every member's own gradient.
    """

    def __init__(self, tasks: Sequence[Task]):
        if not tasks:
            raise ValueError("a population needs at least one task")
        key = tasks[0].population_key()
        for i, t in enumerate(tasks):
            if t.population_key() != key:
                raise ValueError(f"task {i} ({t.population_key()}) cannot share a population with task 0 ({key})")
        self.tasks = list(tasks)
        self.network = tasks[0].network
        self.data = type(tasks[0]).stack_data(self.tasks)
        self.device = torch.device("cpu")
        self._device_data = None  # self.data on self.device, for evaluation

    def to(self, device: torch.device | str) -> "Population":
        """Compute on ``device``. Batches are still drawn on the CPU, from the CPU generator, and
        then moved: the same seeds give the same batches on every device."""
        self.device = torch.device(device)
        self._device_data = None if self.device.type == "cpu" else _to_device(self.data, self.device)
        return self

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"Population({len(self)} x {self.tasks[0]!r})"

    def init_params(self, seeds: Sequence[int]) -> Params:
        if len(seeds) != len(self):
            raise ValueError(f"need one seed per member: got {len(seeds)} seeds for {len(self)} members")
        members = [self.network.init_params(s) for s in seeds]
        return {k: torch.stack([m[k] for m in members]) for k in members[0]}

    def sample_batch(self, generator: torch.Generator) -> Any:
        batch = self.tasks[0].batch_from(self.data, generator)
        return batch if self._device_data is None else _to_device(batch, self.device)

    def loss(self, params: Params, batch: Any) -> Tensor:
        P = self.network.check(params)
        if P != len(self):
            raise ValueError(f"params hold {P} members, the population has {len(self)}")
        return self.tasks[0].losses(lambda x: self.network.forward(params, x), batch)

    @torch.no_grad()
    def evaluate(self, params: Params) -> dict[str, Tensor]:
        return self.tasks[0].metrics(self.device_data(), lambda x: self.network.forward(params, x))

    def device_data(self) -> Any:
        """The stacked task data on this population's device (``data`` itself on the CPU)."""
        return self.data if self._device_data is None else self._device_data

    def module(self, params: Params, i: int) -> nn.Sequential:
        """Member ``i`` as an ``nn.Sequential``."""
        return self.tasks[i].module(member(params, i))


def _to_device(tree: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


def member(params: Params, i: int) -> Params:
    """Member ``i``'s parameters from stacked population parameters."""
    return {k: v[i] for k, v in params.items()}


class TaskFamily(ABC):
    """A distribution over tasks, so meta-training sees many problems instead of one.

    ``sample_config`` draws what a population shares (architecture, width, depth,
    activation, ...); ``make_task`` adds what members may differ in (data subset, seed).
    """

    name: str = "family"

    @abstractmethod
    def sample_config(self, rng: np.random.Generator) -> dict:
        """Architecture and settings shared by a population."""

    @abstractmethod
    def make_task(self, config: dict, seed: int) -> Task:
        """A task of this configuration; ``seed`` picks its data (image, subset, episodes)."""

    def sample(self, seed: int) -> Task:
        return self.make_task(self.sample_config(np.random.default_rng([seed, 0])), seed)

    def population(self, seed: int, size: int) -> Population:
        """``size`` tasks of one sampled configuration, each with its own data seed."""
        if size < 1:
            raise ValueError(f"population size must be >= 1, got {size}")
        config = self.sample_config(np.random.default_rng([seed, 0]))
        return Population([self.make_task(config, member_seed(seed, i)) for i in range(size)])


def member_seed(seed: int, i: int) -> int:
    """A data seed for member ``i`` of the population drawn with ``seed``."""
    return int(np.random.SeedSequence([seed, i, 1]).generate_state(1)[0])


def choose(rng: np.random.Generator, options: Sequence, what: str) -> Any:
    if len(options) == 0:
        raise ValueError(f"no {what} to choose from")
    return options[int(rng.integers(len(options)))]


def train(task: Task, optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
          steps: int, seed: int = 0) -> list[float]:
    """Plain baseline loop: the task's ``nn.Module`` trained by a ``torch.optim`` optimizer.

    ``seed`` sets both the initial parameters and the batch order.  Returns the loss of
    every step.
    """
    module = task.module(task.init_params(seed))
    optimizer = optimizer_factory(module.parameters())
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = task.module_loss(module, task.sample_batch(generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_population(population: Population, optimizer_factory: Callable[[Iterable[Tensor]], torch.optim.Optimizer],
                     steps: int, seeds: Sequence[int], generator_seed: int = 0) -> tuple[Params, Tensor]:
    """Train every member at once; returns the final params and the losses ``[steps, P]``.

    Elementwise optimizers (SGD, Adam, ...) applied to stacked tensors update each member
    exactly as if it were trained alone.
    """
    params = {k: v.requires_grad_() for k, v in population.init_params(seeds).items()}
    optimizer = optimizer_factory(params.values())
    generator = torch.Generator().manual_seed(generator_seed)
    history = []
    for _ in range(steps):
        losses = population.loss(params, population.sample_batch(generator))
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        history.append(losses.detach())
    return {k: v.detach() for k, v in params.items()}, torch.stack(history)


class Batch(NamedTuple):
    """Inputs and targets: the batch type of the supervised families."""

    inputs: Tensor
    targets: Tensor
