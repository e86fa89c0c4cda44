"""INR fitting: a SIREN fitted to one signal (an image, or a 1-D sine wave); metric PSNR.

Recipe (used by every INR task here and by the benchmark):

* inputs: the pixel grid, each axis ``linspace(-1, 1, n)`` (28x28 for Fashion-MNIST, 8x8
  for digits, ``points`` for sine waves), flattened row-major; coordinate 0 is the row;
* network: SIREN ``in -> hidden... -> 1``, default 2->32->32->1; every hidden layer is
  ``sin(w0 (W x + b))`` with ``w0 = 30``; the last layer is linear;
* init, one of :data:`SIREN_INITS`:

  - ``"sitzmann"`` (Sitzmann et al. 2020, the default of :func:`siren`): first layer weights
    U(+-1/n_in), later weights U(+-sqrt(6/n_in)/w0); biases keep nn.Linear's default
    U(+-1/sqrt(n_in)), as in the reference SIREN code, so the first layer's phases are spread
    over many periods;
  - ``"dwsnets"`` (the convention of DWSNets' published INR datasets, and the default of
    ``python -m tasks make-data``): every sine layer, the first included, U(+-sqrt(6/n_in)/w0)
    with zero biases; the linear output layer keeps nn.Linear's default. Its first layer starts
    at low frequencies with no phase, so fits are blurrier (about 21 dB after 1000 steps on
    Fashion-MNIST against 40 dB in ~335) but the weights say far more about the image: INR
    classification on 800 training INRs rose from chance to 0.33 (docs/results.md);
* prediction ``net(x) + 0.5`` against targets in [0, 1], so a zero-output net predicts
  mid-grey; loss: mean squared error over all pixels; ``psnr = 10 log10(1 / mse)``.

:func:`fit_inrs` trains a whole population with a hand-written forward/backward and one
fused Adam update over a flat parameter buffer, which is how the INR throughput benchmark
runs; the functional :meth:`INRTask.loss` is the reference it is tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .base import Batch, Forward, Network, Params, Population, Sine, Task, TaskFamily, choose
from .data import FASHION_MNIST_DIR, load_images, sine_wave
from .siren_kernels import angle_sum_sin_cos, first_layer_grads, sin_cos

INR_DATASETS = ("fashion_mnist", "fashion_mnist_8x8", "digits", "sine")


SIREN_INITS = ("sitzmann", "dwsnets")


def siren_bounds(w0: float, init: str = "sitzmann", sine_layers: int = 1):
    """``bounds(position, fan_in) -> (weight, bias)`` of the uniform init named ``init``."""
    if init not in SIREN_INITS:
        raise ValueError(f"unknown SIREN init {init!r}; known: {SIREN_INITS}")

    def bounds(position: int, fan_in: int) -> tuple[float, float]:
        if init == "dwsnets":
            if position < sine_layers:
                return math.sqrt(6.0 / fan_in) / w0, 0.0
            return 1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in)  # nn.Linear's default
        weight = 1.0 / fan_in if position == 0 else math.sqrt(6.0 / fan_in) / w0
        return weight, 1.0 / math.sqrt(fan_in)

    return bounds


def siren(in_features: int = 2, hidden: Sequence[int] = (32, 32), out_features: int = 1, w0: float = 30.0,
          init: str = "sitzmann") -> Network:
    """SIREN as ``nn.Sequential(Linear, Sine, ..., Linear)`` with the init of the module docstring."""
    if not hidden:
        raise ValueError("a SIREN needs at least one hidden (sine) layer")
    bounds = siren_bounds(w0, init, len(hidden))
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), Sine(w0)]
        width = h
    layers.append(nn.Linear(width, out_features))
    name = f"siren[{'-'.join(map(str, (in_features, *hidden, out_features)))},w0={w0:g}" + \
        ("]" if init == "sitzmann" else f",{init} init]")
    return Network(layers, name, init=bounds)


def grid(shape: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Per-axis coordinates in [-1, 1] and the flattened grid ``[prod(shape), len(shape)]``."""
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    return axes, coords


def psnr(mse: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB for signals in [0, 1]."""
    return 10.0 * torch.log10(1.0 / mse)


class INRData(NamedTuple):
    axes: list[Tensor]
    coords: Tensor  # [N, d]
    targets: Tensor  # [P, N, 1]


class INRTask(Task):
    """Fit a SIREN to one signal in [0, 1] (an image ``[H, W]`` or a 1-D wave ``[L]``).

    Every batch is the whole signal: INR fitting here is full-batch, so the generator
    passed to ``sample_batch`` is not used.
    """

    def __init__(self, network: Network, signal: Tensor, seed: int):
        super().__init__(network, seed)
        if signal.dim() not in (1, 2):
            raise ValueError(f"INR signals must be [L] or [H, W], got shape {tuple(signal.shape)}")
        in_features = network.shapes["0.weight"][1]
        if in_features != signal.dim():
            raise ValueError(f"{network.name} takes {in_features}-D coordinates, the signal is {signal.dim()}-D")
        self.signal = signal.float()

    def population_key(self) -> tuple:
        return super().population_key() + (tuple(self.signal.shape),)

    @classmethod
    def stack_data(cls, tasks: Sequence["INRTask"]) -> INRData:
        axes, coords = grid(tasks[0].signal.shape)
        targets = torch.stack([t.signal.reshape(-1, 1) for t in tasks])
        return INRData(axes, coords, targets)

    def batch_from(self, data: INRData, generator: torch.Generator | None) -> Batch:
        P = data.targets.shape[0]
        return Batch(data.coords.expand(P, *data.coords.shape), data.targets)

    def losses(self, forward: Forward, batch: Batch) -> Tensor:
        prediction = forward(batch.inputs) + 0.5
        if prediction.shape != batch.targets.shape:
            raise ValueError(f"predictions {tuple(prediction.shape)} do not match targets {tuple(batch.targets.shape)}")
        return (prediction - batch.targets).square().mean(dim=(1, 2))

    def metrics(self, data: INRData, forward: Forward) -> dict[str, Tensor]:
        mse = self.losses(forward, self.batch_from(data, None))
        return {"psnr": psnr(mse), "mse": mse}

    @torch.no_grad()
    def render(self, params: Params) -> Tensor:
        """The fitted signal, shaped like the target."""
        return (self._forward(params)(self.data.coords[None])[0] + 0.5).reshape(self.signal.shape)


class INRFamily(TaskFamily):
    """SIRENs fitted to images of one dataset (or to sine waves); members differ in the signal.

    ``widths`` and ``depths`` (number of sine layers) are sampled per population; the
    image is picked by the task seed among the first ``images`` images of ``split``.
    """

    name = "inr"

    def __init__(self, dataset: str = "fashion_mnist", widths: Sequence[int] = (16, 32), depths: Sequence[int] = (1, 2),
                 w0: float = 30.0, images: int = 1000, split: str = "train", points: int = 128,
                 path: str = FASHION_MNIST_DIR):
        if dataset not in INR_DATASETS:
            raise ValueError(f"unknown INR dataset {dataset!r}; known: {INR_DATASETS}")
        self.dataset, self.widths, self.depths, self.w0 = dataset, tuple(widths), tuple(depths), w0
        self.points = points
        self.images = None if dataset == "sine" else load_images(dataset, split, images, path)[0]

    def sample_config(self, rng: np.random.Generator) -> dict:
        return {"width": choose(rng, self.widths, "widths"), "depth": choose(rng, self.depths, "depths")}

    def make_task(self, config: dict, seed: int) -> INRTask:
        if self.images is None:
            signal = sine_wave(seed, self.points)
        else:
            signal = self.images[int(np.random.default_rng([seed, 2]).integers(len(self.images)))]
        net = siren(signal.dim(), [config["width"]] * config["depth"], 1, self.w0)
        return INRTask(net, signal, seed)


# ---------------------------------------------------------------------------------------
# Fast population fitting: hand-written backward + fused Adam.


class _Layer(NamedTuple):
    weight: Tensor
    bias: Tensor


class SirenFit:
    """Adam on a population of SIRENs over the full pixel grid, without autograd.

    Why it is faster than autograd on ``Population.loss``:

    * the first sine layer on a grid factorises: ``sin(a_i + b_j) = sin a_i cos b_j +
      cos a_i sin b_j`` (angle addition), so it needs sines of ``n_rows + n_cols`` values
      instead of ``n_rows * n_cols``, and the same for the cosine of its backward pass
      (:func:`tasks.siren_kernels.angle_sum_sin_cos` writes both in one pass);
    * the backward pass reuses forward buffers in place and folds ``w0`` into the small weights;
      the last hidden layer's gradient, an outer product of the output weights and the residual,
      stays factored, and the first layer's gradients are sums along the grid's rows and columns
      (:func:`tasks.siren_kernels.first_layer_grads`, one compiled pass);
    * all members' parameters live in one flat ``[P, D]`` buffer, so Adam is a handful of
      big tensor ops for the whole population;
    * members run in chunks so a chunk's activations stay in cache;
    * every hidden sine comes with its cosine from one compiled pass
      (:func:`tasks.siren_kernels.sin_cos`), 2.1x faster on CPU than numpy's SIMD sine and cosine apart.

    ``torch.compile`` is deliberately not used: on CPU, inductor fuses the factorised
    first layer back into one loop over all pixels and evaluates the four small sines and
    cosines per pixel with scalar ``std::sin``, which made the step about 3-4x slower.
    """

    def __init__(self, population: Population, seeds: Sequence[int], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, chunk: int = 16):
        task = population.tasks[0]
        if not isinstance(task, INRTask):
            raise TypeError(f"SirenFit fits INR tasks, got {type(task).__name__}")
        layers = list(population.network.template)
        self.w0 = layers[1].w0
        self.shape = tuple(task.signal.shape)
        if len(self.shape) not in (1, 2):
            raise ValueError(f"SirenFit handles 1-D and 2-D grids, got {self.shape}")
        data = population.device_data()  # follows Population.to(device): the whole fit runs there
        self.axes = data.axes
        self.targets = data.targets  # [P, N, 1]
        self.lr, self.betas, self.eps = lr, betas, eps

        init = {k: v.to(population.device) for k, v in population.init_params(seeds).items()}
        self.names = list(init)
        self.flat = torch.cat([init[k].flatten(1) for k in self.names], dim=1)  # [P, D]
        self.grad = torch.zeros_like(self.flat)
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)
        self.t = 0
        self.shapes = [init[k].shape[1:] for k in self.names]
        self.chunk = chunk
        self._split_chunks()

    def __len__(self) -> int:
        return self.flat.shape[0]

    def _split_chunks(self) -> None:
        P, chunk = len(self), self.chunk
        bounds = [(c, min(c + chunk, P)) for c in range(0, P, chunk)]
        self.chunks = [(self._views(self.flat[a:b]), self._views(self.grad[a:b]), self.targets[a:b]) for a, b in bounds]

    def keep(self, mask: Tensor) -> None:
        """Keep only the members where ``mask`` [len(self)] is True, so later steps skip the
        others (members that reached a target early): the buffers are compacted in place."""
        mask = torch.as_tensor(mask, device=self.flat.device)
        if mask.shape != (len(self),) or mask.dtype != torch.bool:
            raise ValueError(f"keep needs a boolean mask of shape ({len(self)},), got {mask.dtype} {tuple(mask.shape)}")
        self.flat, self.grad, self.m, self.v = (t[mask] for t in (self.flat, self.grad, self.m, self.v))
        self.targets = self.targets[mask]
        self._split_chunks()

    def _views(self, flat: Tensor) -> list[_Layer]:
        """Per-layer (weight, bias) views into a flat ``[p, D]`` buffer."""
        views, offset = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            views.append(flat[:, offset:offset + n].view(flat.shape[0], *shape))
            offset += n
        return [_Layer(views[i], views[i + 1]) for i in range(0, len(views), 2)]

    def params(self) -> Params:
        """Current parameters, stacked (a copy)."""
        views = [t for layer in self._views(self.flat) for t in layer]
        return {name: view.clone() for name, view in zip(self.names, views)}

    def _first_layer(self, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Sine and cosine of the first layer's pre-activation on the grid, ``[p, H, N]`` views of
        ``[p, N, H]`` memory (neuron-minor, so the angle-addition products below run over contiguous rows)."""
        w0 = self.w0
        a = w0 * torch.addcmul(b[:, None, :], self.axes[0][None, :, None], w[:, None, :, 0])  # [p, n0, H]
        if len(self.axes) == 1:
            sin, cos = sin_cos(a)
            return sin.transpose(1, 2), cos.transpose(1, 2)
        c = w0 * (self.axes[1][None, :, None] * w[:, None, :, 1])  # [p, n1, H]
        sin, cos = angle_sum_sin_cos(*sin_cos(a), *sin_cos(c))  # [p, n0, n1, H]
        p, H = w.shape[0], w.shape[1]
        return sin.view(p, -1, H).transpose(1, 2), cos.view(p, -1, H).transpose(1, 2)

    def _loss_and_grads(self, layers: list[_Layer], targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        # Activations are [p, H, N] (the first layer's are views of [p, N, H] memory): the output layer
        # is then a [1, H] x [H, N] matmul, 2x faster than [N, H] x [H, 1] here.
        w0 = self.w0
        N = targets.shape[1]
        h, cos1 = self._first_layer(*layers[0])
        inputs, cosines = [h], []  # inputs of the later layers; cosines of the hidden pre-activations
        for layer in layers[1:-1]:
            h, cos = sin_cos(torch.bmm(w0 * layer.weight, h), w0 * layer.bias)  # [p, K, N], the bias added in the pass
            cosines.append(cos)
            inputs.append(h)
        last = layers[-1]
        residual = torch.baddbmm(last.bias[:, :, None], last.weight, h).add_(0.5).sub_(targets.transpose(1, 2))
        mse = residual.square().mean(dim=(1, 2))

        g = residual.mul_(2.0 / N)  # dL/d(output), [p, 1, N]
        grads = [torch.bmm(g, h.transpose(1, 2)), g.sum(2)]
        # w0 dL/dh = scale * dh (w0 from the sine's argument w0 (W h + b)), kept factored while it is the
        # outer product last.weight^T g
        scale, dh = last.weight.transpose(1, 2) * w0, g  # [p, H, 1], [p, 1, N]
        for layer, cos, h_in in zip(reversed(layers[1:-1]), reversed(cosines), reversed(inputs[:-1])):
            e = cos.mul_(dh)  # w0 dL/da = scale * e, with a the layer's pre-activation
            grads = [torch.bmm(e, h_in.transpose(1, 2)).mul_(scale), e.sum(2, keepdim=True).mul_(scale)[..., 0]] + grads
            dh = torch.bmm(e.transpose(1, 2), layer.weight * scale).transpose(1, 2)  # [p, H_in, N], laid out as h_in
            scale = w0
        # w0 dL/d(first pre-activation) = scale * cos1 * dh, summed against the grid; dh is [p, 1, N] when
        # there is one hidden layer (then scale carries the output weights)
        dh = dh.expand_as(cos1).transpose(1, 2)
        first = first_layer_grads(cos1.transpose(1, 2), dh, self.axes).mul_(scale)  # [p, H, d + 1]
        return mse, [first[..., :-1], first[..., -1]] + grads

    def step(self) -> Tensor:
        """One Adam step for every member; returns each member's mse before the step."""
        mse = self.measure()
        self.update()
        return mse

    def measure(self) -> Tensor:
        """Each member's mse [len(self)] at the current parameters, and the gradients :meth:`update` applies
        (in between, :meth:`keep` can drop members whose parameters are to stay as they are now)."""
        losses = []
        for layers, grad_views, targets in self.chunks:
            mse, grads = self._loss_and_grads(layers, targets)
            for view, g in zip((t for layer in grad_views for t in layer), grads):
                view.copy_(g)
            losses.append(mse)
        return torch.cat(losses)

    def update(self) -> None:
        # Same update as torch.optim.Adam (no weight decay), for all members in one go.
        self.t += 1
        b1, b2 = self.betas
        self.m.lerp_(self.grad, 1 - b1)
        self.v.mul_(b2).addcmul_(self.grad, self.grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.flat.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


def fit_inrs(population: Population, seeds: Sequence[int], steps: int = 1000, lr: float = 1e-3,
             chunk: int = 16) -> tuple[Params, Tensor]:
    """Fit every member of an INR population with Adam; returns params and the final mse [P]."""
    fit = SirenFit(population, seeds, lr=lr, chunk=chunk)
    for _ in range(steps):
        fit.step()
    with torch.no_grad():
        final = population.loss(fit.params(), population.sample_batch(None))
    return fit.params(), final
