"""Weight-space augmentations: transformations of a network's weights that keep its function.

For any MLP, permuting hidden neurons is exact (:func:`metaopt.random_hidden_perms`). A SIREN
(hidden layers ``sin(w0 (W h + b))``) has two more exact symmetries per hidden neuron ``j``,
because sine is odd and anti-periodic (``sin(-z) = -sin z``, ``sin(z + pi) = -sin z``):

* **sign flip**: negate row ``j`` of ``W`` and ``b[j]`` (the neuron now outputs ``-sin z``) and
  negate column ``j`` of the next weight (which undoes it);
* **bias shift**: add ``m pi / w0`` to ``b[j]`` (the neuron outputs ``(-1)^m sin z``) and multiply
  column ``j`` of the next weight by ``(-1)^m``.

:func:`siren_symmetry` draws one sign and one shift per hidden neuron per network and applies both
(plus a permutation): the augmented network renders the very same image, but its weights differ in
ways an invariant-by-construction model is *not* blind to, so contrastive training must learn them.
:func:`canonical_signs` goes the other way for the sign flips: it maps a network and all its
sign-flipped twins to one representative, so a model need not learn them at all.
:func:`gaussian_noise` is an inexact augmentation (nearby functions), the usual SimCLR companion.

:func:`image_warp` is not a symmetry: it changes the image a 2-D SIREN draws, by a small random
rotation, scaling, translation and mirror, as image classifiers augment their inputs. For an INR
``f`` the warped image ``f(A x + t)`` is exact in weight space, because ``x`` enters only the first
layer: ``W1 <- W1 A`` and ``b1 <- b1 + W1 t``. So a weight-space classifier gets the image
augmentations a CNN would, without rendering or refitting anything.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metaopt.weight_space import WeightSpace, WeightSpaceSpec, random_hidden_perms

__all__ = ["siren_symmetry", "sign_flip", "bias_shift", "canonical_signs", "gaussian_noise", "permute", "random_warps",
           "warp_inputs", "draws_images", "image_warp"]


def _check_linear(ws: WeightSpace, what: str) -> None:
    if any(layer.kernel for layer in ws.spec.layers):
        raise ValueError(f"{what} is a symmetry of SIRENs (chains of Linear layers); this weight space has "
                         f"convolutions: [{ws.spec}]")


def _apply(ws: WeightSpace, signs: list[Tensor], shifts: list[Tensor], w0: float) -> WeightSpace:
    """Hidden set k+1 (output of weight k): row sign ``signs[k]``, bias shift ``shifts[k] * pi / w0``,
    and the compensating column factor ``signs[k] * (-1)^shifts[k]`` on weight k+1. Each ``[B, n]``."""
    weights, biases = list(ws.weights), list(ws.biases)
    for k, (s, m) in enumerate(zip(signs, shifts)):
        s = s.to(weights[k])
        m = m.to(weights[k])
        weights[k] = weights[k] * s[:, None, :, None]
        biases[k] = biases[k] * s[:, None, :] + (m * (math.pi / w0))[:, None, :]
        parity = 1.0 - 2.0 * torch.remainder(m, 2)  # (-1)^m
        weights[k + 1] = weights[k + 1] * (s * parity)[:, None, None, :]
    return WeightSpace(weights, biases, ws.spec)


def sign_flip(ws: WeightSpace, generator: torch.Generator | None = None, p: float = 0.5) -> WeightSpace:
    """Flip each hidden sine neuron's sign with probability ``p`` (exact for SIRENs, any w0)."""
    _check_linear(ws, "sign_flip")
    B = ws.batch_size
    signs = [torch.where(torch.rand(B, n, generator=generator) < p, -1.0, 1.0) for n in ws.spec.hidden_sizes]
    zeros = [torch.zeros(B, n) for n in ws.spec.hidden_sizes]
    return _apply(ws, signs, zeros, 1.0)


def bias_shift(ws: WeightSpace, w0: float, generator: torch.Generator | None = None, max_shift: int = 2
               ) -> WeightSpace:
    """Shift each hidden sine neuron's bias by ``m pi / w0`` with ``m`` uniform in ``[-max_shift, max_shift]``."""
    _check_linear(ws, "bias_shift")
    B = ws.batch_size
    shifts = [torch.randint(-max_shift, max_shift + 1, (B, n), generator=generator).float()
              for n in ws.spec.hidden_sizes]
    ones = [torch.ones(B, n) for n in ws.spec.hidden_sizes]
    return _apply(ws, ones, shifts, w0)


def canonical_signs(ws: WeightSpace) -> WeightSpace:
    """Each hidden sine neuron flipped, if need be, so that its bias (channel 0) is non-negative.

    The sign-flip symmetry quotiented out instead of augmented: all ``2^n`` sign-flipped twins of a
    network share this representative, and it commutes with hidden permutations. Like any canonical
    form it jumps where a bias crosses 0.
    """
    _check_linear(ws, "canonical_signs")
    signs = [torch.where(b[:, 0] < 0, -1.0, 1.0) for b in ws.biases[:-1]]
    return _apply(ws, signs, [torch.zeros_like(s) for s in signs], 1.0)


def permute(ws: WeightSpace, generator: torch.Generator | None = None) -> WeightSpace:
    """An independent random permutation of every hidden layer of every network."""
    if not ws.spec.hidden_sizes:
        return ws
    return ws.permute_hidden(random_hidden_perms(ws.spec, generator, batch_size=ws.batch_size))


def siren_symmetry(ws: WeightSpace, w0: float, generator: torch.Generator | None = None, max_shift: int = 2
                   ) -> WeightSpace:
    """A random element of the SIREN's exact symmetry group: signs, bias shifts and permutations."""
    _check_linear(ws, "siren_symmetry")
    B = ws.batch_size
    signs = [torch.where(torch.rand(B, n, generator=generator) < 0.5, -1.0, 1.0) for n in ws.spec.hidden_sizes]
    shifts = [torch.randint(-max_shift, max_shift + 1, (B, n), generator=generator).float()
              for n in ws.spec.hidden_sizes]
    return permute(_apply(ws, signs, shifts, w0), generator)


def gaussian_noise(ws: WeightSpace, std: float, generator: torch.Generator | None = None) -> WeightSpace:
    """Add ``N(0, std^2)`` to every weight and bias (inexact: a nearby function)."""
    if std == 0:
        return ws
    return ws.map(lambda t: t + std * torch.randn(t.shape, generator=generator).to(t))


def random_warps(n: int, generator: torch.Generator | None = None, degrees: float = 10.0, scale: float = 0.1,
                 shift: float = 0.1, mirror: bool = True) -> tuple[Tensor, Tensor]:
    """``n`` random affine maps ``x -> A x + t`` of the plane: ``A`` ([n, 2, 2]) a rotation by up to
    ``degrees``, a zoom by a factor in ``[1 - scale, 1 + scale]`` and, with ``mirror``, a flip of
    the second (column) axis with probability 1/2; ``t`` ([n, 2]) uniform in ``[-shift, shift]^2``."""
    if degrees < 0 or not 0 <= scale < 1 or shift < 0:
        raise ValueError(f"warps need degrees >= 0, 0 <= scale < 1 and shift >= 0, got {degrees}, {scale}, {shift}")
    u = torch.rand(n, 5, generator=generator) * 2 - 1  # angle, zoom, mirror, two shifts: uniform in [-1, 1]
    angle = u[:, 0] * math.radians(degrees)
    zoom = 1 + u[:, 1] * scale
    flip = torch.where(u[:, 2] < 0, -1.0, 1.0) if mirror else torch.ones(n)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    A = torch.stack([torch.stack([cos, -sin * flip], -1), torch.stack([sin, cos * flip], -1)], -2)
    return A, u[:, 3:] * shift


def warp_inputs(ws: WeightSpace, A: Tensor, t: Tensor) -> WeightSpace:
    """Network ``i`` of ``ws`` (any activation) becomes ``x -> f_i(A[i] x + t[i])``: its first
    layer's weight times ``A[i]`` and its bias plus that weight times ``t[i]``. Raw weights in and out."""
    _check_linear(ws, "warp_inputs")
    d = ws.spec.layers[0].n_in
    if A.shape != (ws.batch_size, d, d) or t.shape != (ws.batch_size, d):
        raise ValueError(f"warp_inputs needs A [{ws.batch_size}, {d}, {d}] and t [{ws.batch_size}, {d}] for "
                         f"{ws.batch_size} networks reading {d} coordinates; got {tuple(A.shape)} and {tuple(t.shape)}")
    w, b = ws.weights[0], ws.biases[0]  # [B, C, H, d], [B, C, H]
    A, t = A.to(w), t.to(w)
    weights, biases = list(ws.weights), list(ws.biases)
    weights[0] = w @ A[:, None]
    biases[0] = b + (w @ t[:, None, :, None]).squeeze(-1)
    return WeightSpace(weights, biases, ws.spec)


def draws_images(spec: WeightSpaceSpec) -> bool:
    """Whether networks of ``spec`` can be image INRs that :func:`image_warp` redraws: a chain of
    linear layers reading 2 coordinates."""
    return not any(layer.kernel or layer.kind != "linear" for layer in spec.layers) and spec.layers[0].n_in == 2


def image_warp(ws: WeightSpace, generator: torch.Generator | None = None, degrees: float = 10.0,
               scale: float = 0.1, shift: float = 0.1, mirror: bool = True) -> WeightSpace:
    """Each 2-D INR of ``ws`` redrawn through its own :func:`random_warps` (``shift`` in grid units:
    the pixel grid spans [-1, 1], so 0.1 is 1.35 pixels of a 28x28 image). Label-preserving for
    small values, like a CNN's augmentations of its input images."""
    _check_linear(ws, "image_warp")
    if not draws_images(ws.spec):
        raise ValueError(f"image_warp redraws 2-D images; this weight space's first layer reads "
                         f"{ws.spec.layers[0].n_in} coordinates: [{ws.spec}]")
    return warp_inputs(ws, *random_warps(ws.batch_size, generator, degrees, scale, shift, mirror))
