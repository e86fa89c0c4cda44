"""The unroll problem that every gradient estimator works against, and its learned-optimizer instance.

An estimator needs three things from a problem: initial meta-parameters, fresh inner states for a
batch of tasks, and a way to run those inner states forward for a few steps under given
meta-parameters while reporting a loss per particle per step. That is :class:`MetaProblem`.

Particles and copies
--------------------
``init_inner(num_tasks, g)`` makes the state of ``num_tasks`` tasks. Estimators that compare several
meta-parameter vectors on the *same* task (antithetic ES: theta+eps and theta-eps) tile that state
``copies`` times along dim 0 with :func:`tile`, copy-major: particle ``c * num_tasks + i`` is copy
``c`` of task ``i``. ``unroll`` must treat all copies of a task as the same task: same data, same
minibatch at each step (draw one batch per step per task and reuse it for every copy). This is what
makes antithetic pairs cancel noise rather than add it.

Inner states
------------
An :data:`InnerState` is a tree of dicts/lists/tuples whose tensor leaves all have the particle
dimension first; non-tensor leaves (ints, floats, strings) are shared by the whole group. That is
all the checkpoint code and :func:`tile`/:func:`take` rely on, so a problem is free to put anything
else it needs there (task seeds, step counters).

Meta-parameters
---------------
``unroll(meta_params, ..., batched=False)``: one ``dict[str, Tensor]`` shared by all particles
(truncated backprop, evaluation). ``batched=True``: every tensor has a leading particle dim, one
meta-parameter vector per particle (ES/PES). Problems decide how to vectorize over that dim;
:class:`LearnedOptimizerProblem` uses ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "InnerState", "MetaProblem", "SupportsBaseline", "LearnedOptimizerProblem", "RandomRescale",
    "tile", "take", "num_particles", "map_tensors",
]

InnerState = Any  # tree of dict/list/tuple; tensor leaves have the particle dim first


@runtime_checkable
class MetaProblem(Protocol):
    """What the estimators need. See the module docstring for particles, copies and batching."""

    def init_meta_params(self) -> dict[str, Tensor]:
        """The starting point of meta-training (the metanetwork's initial parameters)."""

    def init_inner(self, num_tasks: int, generator: torch.Generator) -> InnerState:
        """Sample ``num_tasks`` tasks and their initial inner states (all randomness from ``generator``)."""

    def unroll(self, meta_params: Mapping[str, Tensor], inner: InnerState, num_steps: int,
               generator: torch.Generator, *, batched: bool) -> tuple[Tensor, InnerState]:
        """Advance every particle ``num_steps`` inner steps.

        Returns the per-step losses ``[particles, num_steps]`` (the quantity meta-training minimizes;
        training or validation loss, as the problem was configured) and the new inner state. Must be
        differentiable w.r.t. ``meta_params`` through ``torch.func.grad`` (for truncated backprop) and
        must draw minibatches only from ``generator``.
        """


@runtime_checkable
class SupportsBaseline(Protocol):
    """Problems that can also train their tasks with a hand-designed ``torch.optim`` optimizer."""

    def baseline_unroll(self, make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
                        inner: InnerState, num_steps: int, generator: torch.Generator) -> Tensor:
        """Train the (untiled) tasks of ``inner``; losses ``[num_tasks, num_steps]`` measured like ``unroll``."""


# --- tree helpers (dict / list / tuple trees with tensor leaves) ----------------------------------

def map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a dict/list/tuple tree; other leaves pass through."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, map_tensors(fn, v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree


def _tensor_leaves(tree: Any) -> list[Tensor]:
    out: list[Tensor] = []
    map_tensors(lambda t: out.append(t) or t, tree)
    return out


def num_particles(inner: InnerState) -> int:
    leaves = _tensor_leaves(inner)
    if not leaves:
        raise ValueError("inner state has no tensor leaves, so it has no particle dimension")
    return leaves[0].shape[0]


def tile(inner: InnerState, copies: int) -> InnerState:
    """Repeat every particle ``copies`` times, copy-major (particle c*n + i is copy c of i)."""
    return map_tensors(lambda t: t.repeat(copies, *([1] * (t.dim() - 1))), inner)


def take(inner: InnerState, index: Tensor | slice) -> InnerState:
    """Select particles (a slice or an index tensor) from every tensor leaf."""
    return map_tensors(lambda t: t[index], inner)


# --- task augmentation ----------------------------------------------------------------------------

class RandomRescale:
    """Reparametrize each task tensor as ``w = s * v`` with ``s`` log-uniform in ``[1/f, f]``.

    The task function is unchanged (``v`` starts at ``w0 / s``), but the optimizer sees parameters
    ``1/s`` times and gradients ``s`` times their usual size, so a learned optimizer cannot overfit
    the suite's typical parameter scale.
    """

    def __init__(self, max_factor: float = 10.0):
        if max_factor < 1:
            raise ValueError(f"max_factor must be >= 1, got {max_factor}")
        self.max_factor = float(max_factor)

    def sample(self, params: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """One scale per task per tensor, shaped ``[num_tasks, 1, ...]`` to broadcast against it."""
        out = {}
        log_f = math.log(self.max_factor)
        for name, p in params.items():
            u = torch.rand((p.shape[0],) + (1,) * (p.dim() - 1), generator=generator, dtype=torch.float64)
            out[name] = torch.exp((2 * u - 1) * log_f).to(device=p.device, dtype=p.dtype)
        return out


# --- the learned optimizer on a task population -----------------------------------------------------

class LearnedOptimizerProblem:
    """Meta-train ``opt`` (``metaopt.LearnedOptimizer``-like) on populations from task ``families``.

    Uses only these interfaces::

        opt.metanet, or opt itself if it is an nn.Module         # its parameters are the meta-parameters
        opt.init(params: list[Tensor[P, ...]]) -> state          # every state tensor has dim 0 = P
        opt.update(meta_params, params, grads, state, step, **update_kwargs) -> (new_params, new_state)
        family.population(seed, size) -> population
        population.init_params(seeds) -> dict[str, Tensor[P, ...]]
        population.loss(params, batch) -> Tensor[P]
        population.sample_batch(generator) -> batch
        population.evaluate(params) -> dict[str, Tensor[P]]     # only for meta_loss="val"
        population.to(device) -> population                     # optional: called when present

    A group of tasks is one population (one family, one seed); all its particles advance in lockstep,
    so ``step`` is a plain int; it counts from 1 (the update being made), as Adam-style bias
    corrections expect. Per-particle meta-parameters (ES/PES) go through ``torch.func.vmap``
    over ``opt.update`` with each particle seen as a population of one (``per_particle="vmap"``), or
    a Python loop (``"loop"``) for optimizers that vmap cannot handle.

    ``second_order=False`` stops gradients through the inner gradients (first-order truncated
    backprop, the usual choice); ES/PES are unaffected. ``meta_loss="val"`` reads
    ``population.evaluate(params)[val_key]`` after every update (``val_key`` may map family names to
    keys; the metric must be a loss, lower is better); tasks that evaluate under ``no_grad`` then
    only support ES/PES.
    """

    def __init__(self, opt: Any, families: Any, *, weights: Sequence[float] | None = None,
                 second_order: bool = False, meta_loss: str = "train", val_key: str | Mapping[str, str] = "loss",
                 augment: RandomRescale | None = None, per_particle: str = "vmap",
                 device: str | torch.device = "cpu", cache_size: int = 16,
                 update_kwargs: Mapping[str, Any] | None = None):
        self.opt = opt
        self.metanet = getattr(opt, "metanet", opt)
        if not isinstance(self.metanet, torch.nn.Module):
            raise TypeError(f"{type(opt).__name__} has no .metanet module and is not an nn.Module itself, so it "
                            "has no meta-parameters")
        self.update_kwargs = dict(update_kwargs or {})
        self.families = list(families) if isinstance(families, (list, tuple)) else [families]
        if not self.families:
            raise ValueError("LearnedOptimizerProblem needs at least one task family")
        w = torch.ones(len(self.families), dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (len(self.families),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.families)} non-negative numbers, got {weights}")
        self.weights = w / w.sum()
        if meta_loss not in ("train", "val"):
            raise ValueError(f"meta_loss must be 'train' or 'val', got {meta_loss!r}")
        if per_particle not in ("vmap", "loop"):
            raise ValueError(f"per_particle must be 'vmap' or 'loop', got {per_particle!r}")
        self.second_order = second_order
        self.meta_loss = meta_loss
        self.val_key = val_key
        self.augment = augment
        self.per_particle = per_particle
        self.device = torch.device(device)
        self.metanet.to(self.device)
        self._cache: OrderedDict[tuple[int, int, int], Any] = OrderedDict()
        self._cache_size = cache_size
        self._state_specs: dict[tuple, Any] = {}

    # -- names, for reports
    def family_name(self, index: int) -> str:
        fam = self.families[index]
        return str(getattr(fam, "name", type(fam).__name__))

    def task_name(self, inner: InnerState) -> str:
        return self.family_name(inner["family"])

    def population(self, family: int, seed: int, size: int) -> Any:
        """Populations are rebuilt from (family, seed, size), so inner states stay plain tensors."""
        key = (family, seed, size)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pop = self.families[family].population(seed, size)
        if hasattr(pop, "to"):  # optional (see the class docstring): tasks/ populations build on the CPU
            pop = pop.to(self.device)
        self._cache[key] = pop
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pop

    # -- MetaProblem
    def init_meta_params(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.metanet.named_parameters()}

    def init_inner(self, num_tasks: int, generator: torch.Generator) -> InnerState:
        family = int(torch.multinomial(self.weights, 1, generator=generator))
        task_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        init_seeds = torch.randint(0, 2**31 - 1, (num_tasks,), generator=generator).tolist()
        pop = self.population(family, task_seed, num_tasks)
        params = {k: v.detach().to(self.device) for k, v in pop.init_params(init_seeds).items()}
        for k, v in params.items():
            if v.shape[:1] != (num_tasks,):
                raise ValueError(f"population.init_params returned {k!r} with shape {tuple(v.shape)}; "
                                 f"expected a leading population dim of {num_tasks}")
        scales: dict[str, Tensor] = {}
        if self.augment is not None:
            scales = self.augment.sample(params, generator)
            params = {k: v / scales[k] for k, v in params.items()}
        leaves, spec = tree_flatten(self.opt.init(list(params.values())))
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != num_tasks:
                what = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
                raise ValueError(
                    f"opt.init returned a state whose leaf #{i} is {what}; LearnedOptimizerProblem needs "
                    f"every optimizer-state leaf to be a tensor with the population dim ({num_tasks}) first, "
                    "so particles can be tiled, perturbed and checkpointed independently")
        self._state_specs[self._spec_key(family, params)] = spec
        return {"params": params, "opt_state": list(leaves), "scales": scales, "step": 0,
                "family": family, "task_seed": task_seed, "num_tasks": num_tasks}

    def _spec_key(self, family: int, params: Mapping[str, Tensor]) -> tuple:
        return (family,) + tuple((k, tuple(v.shape[1:])) for k, v in params.items())

    def _state_spec(self, inner: InnerState) -> Any:
        key = self._spec_key(inner["family"], inner["params"])
        if key not in self._state_specs:  # e.g. after resuming from a checkpoint
            one = [v[:1].detach() for v in inner["params"].values()]
            self._state_specs[key] = tree_flatten(self.opt.init(one))[1]
        return self._state_specs[key]

    def _scaled(self, params: Mapping[str, Tensor], scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v * scales[k] for k, v in params.items()} if scales else dict(params)

    def _update(self, meta_params, params: list[Tensor], grads: list[Tensor], state, step: int, batched: bool):
        kw = self.update_kwargs
        if not batched:
            return self.opt.update(meta_params, params, grads, state, step, **kw)
        if self.per_particle == "vmap":
            one = lambda t: t.unsqueeze(1)  # noqa: E731 - each particle becomes a population of one
            fn = lambda mp, p, g, s: self.opt.update(mp, p, g, s, step, **kw)  # noqa: E731
            new_params, new_state = vmap(fn)(dict(meta_params), [one(p) for p in params],
                                             [one(g) for g in grads], tree_map(one, state))
            return [p.squeeze(1) for p in new_params], tree_map(lambda t: t.squeeze(1), new_state)
        outs = []
        for i in range(params[0].shape[0]):
            sl = lambda t: t[i:i + 1]  # noqa: E731
            outs.append(self.opt.update({k: v[i] for k, v in meta_params.items()}, [sl(p) for p in params],
                                        [sl(g) for g in grads], tree_map(sl, state), step, **kw))
        new_params = [torch.cat(ps) for ps in zip(*(o[0] for o in outs))]
        leaves, spec = tree_flatten(outs[0][1])
        all_leaves = [tree_flatten(o[1])[0] for o in outs]
        return new_params, tree_unflatten([torch.cat(ls) for ls in zip(*all_leaves)], spec)

    def unroll(self, meta_params: Mapping[str, Tensor], inner: InnerState, num_steps: int,
               generator: torch.Generator, *, batched: bool) -> tuple[Tensor, InnerState]:
        n = inner["num_tasks"]
        pop = self.population(inner["family"], inner["task_seed"], n)
        names = list(inner["params"])
        params = dict(inner["params"])
        scales = inner["scales"]
        total = params[names[0]].shape[0]
        if total % n:
            raise ValueError(f"inner state has {total} particles, not a multiple of its {n} tasks")
        copies = total // n
        state = tree_unflatten(list(inner["opt_state"]), self._state_spec(inner))
        step = inner["step"]

        def task_loss(p, sc, batch):
            losses = pop.loss(self._scaled(p, sc), batch)
            return losses.sum(), losses

        per_step = []
        for _ in range(num_steps):
            batch = pop.sample_batch(generator)
            grads_c, losses_c = [], []
            for c in range(copies):  # copies of a task share the batch
                sl = slice(c * n, (c + 1) * n)
                g, losses = grad(task_loss, has_aux=True)({k: v[sl] for k, v in params.items()},
                                                          {k: v[sl] for k, v in scales.items()}, batch)
                grads_c.append(g)
                losses_c.append(losses)
            grads = {k: torch.cat([g[k] for g in grads_c]) for k in names}
            if not self.second_order:
                grads = {k: v.detach() for k, v in grads.items()}
            new_params, state = self._update(meta_params, [params[k] for k in names], [grads[k] for k in names],
                                             state, step + 1, batched)
            params = dict(zip(names, new_params))
            step += 1
            if self.meta_loss == "train":
                per_step.append(torch.cat(losses_c))
            else:
                per_step.append(self._val_losses(pop, params, scales, n, copies, inner["family"]))
        new_inner = dict(inner, params=params, opt_state=tree_flatten(state)[0], step=step)
        losses = torch.stack(per_step, dim=1) if per_step else torch.zeros(total, 0, device=self.device)
        return losses, new_inner

    def _val_losses(self, pop, params, scales, n, copies, family) -> Tensor:
        out = []
        for c in range(copies):
            sl = slice(c * n, (c + 1) * n)
            metrics = pop.evaluate(self._scaled({k: v[sl] for k, v in params.items()},
                                                {k: v[sl] for k, v in scales.items()}))
            out.append(self._val_metric(metrics, family))
        return torch.cat(out)

    def _val_metric(self, metrics: Mapping[str, Tensor], family: int) -> Tensor:
        key = self.val_key if isinstance(self.val_key, str) else self.val_key.get(self.family_name(family))
        if key not in metrics:
            raise KeyError(f"population.evaluate of family {self.family_name(family)!r} returned {sorted(metrics)}; "
                           f"meta_loss='val' reads {key!r} (set val_key, per family if needed)")
        return metrics[key].to(self.device)

    # -- SupportsBaseline
    def baseline_unroll(self, make_optimizer, inner: InnerState, num_steps: int,
                        generator: torch.Generator) -> Tensor:
        n = inner["num_tasks"]
        pop = self.population(inner["family"], inner["task_seed"], n)
        # Baselines train the task as given: undo the augmentation's reparametrization.
        params = {k: v.detach().clone().requires_grad_(True)
                  for k, v in self._scaled(inner["params"], inner["scales"]).items()}
        if next(iter(params.values())).shape[0] != n:
            raise ValueError("baseline_unroll expects an untiled inner state (one particle per task)")
        opt = make_optimizer(list(params.values()))
        per_step = []
        for _ in range(num_steps):
            batch = pop.sample_batch(generator)
            opt.zero_grad(set_to_none=True)
            losses = pop.loss(params, batch)
            losses.sum().backward()
            opt.step()
            if self.meta_loss == "train":
                per_step.append(losses.detach())
            else:
                with torch.no_grad():
                    per_step.append(self._val_metric(pop.evaluate(params), inner["family"]).detach())
        return torch.stack(per_step, dim=1)
