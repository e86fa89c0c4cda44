"""Compiled passes (numba) of a SIREN fit, each reading its inputs once and writing all its outputs.

* :func:`sin_cos`: the sine and cosine of a hidden layer's pre-activation, its bias added on the way;
* :func:`angle_sum_sin_cos`: the sines and cosines of the first layer on a grid, by angle addition;
* :func:`first_layer_grads`: the first layer's weight and bias gradients, as sums along the grid.

Together they took a Fashion-MNIST SirenFit step from about 165 to 145 us per INR on this
project's CPUs (two processes at once; docs/standalone.md). GPUs, and tensors that are not
contiguous float32 on the CPU, take the equivalent torch operations.

Why :func:`sin_cos`: a SIREN fit needs both ``sin(a)`` (forward) and ``cos(a)`` (backward) of every hidden
pre-activation. numpy's SIMD float32 sine and cosine take about 210 us each for the 400k values
of a 16-INR chunk on this project's CPUs (torch's eager ones 2.4x longer), a fifth of a fit's
time. The numba loop below shares one range reduction between the two and compiles to the
CPU's vector instructions: about 200 us for both (``benchmarks/tasks.py`` measures the fit).

Method (the classic single-precision one, as in Cephes' ``sinf``): ``x = j pi/2 + r`` with
``j = round(x 2/pi)`` and ``r`` from a three-part split of ``pi/2`` (the first part has 8
significant bits, so ``j`` times it is exact while ``|j| < 2^16``), then minimax polynomials for
``sin r`` and ``cos r`` on ``[-pi/4, pi/4]`` and a quadrant swap. Largest error against float64:
9.3e-8 up to ``|x| = 65536`` (numpy's: 7e-8). Inputs beyond :data:`REDUCTION_LIMIT` in magnitude
and infinities (the whole tensor is then redone), and anything that is not a contiguous float32
CPU tensor, go to ``torch.sin``/``torch.cos``; NaN stays NaN.
"""

from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

REDUCTION_LIMIT = 65536.0  # |x| below this keeps j = round(x 2/pi) under 2^16

_f = np.float32
_TWO_OVER_PI = _f(2.0 / np.pi)
# pi/2 = _PIO2_1 + _PIO2_2 + _PIO2_3 (float32 parts; the first two have few significant bits)
_PIO2_1, _PIO2_2, _PIO2_3 = _f(1.5703125), _f(4.837512969970703125e-4), _f(7.54978995489188216e-8)
_S1, _S2, _S3 = _f(-1.6666654611e-1), _f(8.3321608736e-3), _f(-1.9515295891e-4)  # sin r = r + r^3 P(r^2)
_C1, _C2, _C3 = _f(4.166664568298827e-2), _f(-1.388731625493765e-3), _f(2.443315711809948e-5)  # cos r
_HALF, _ONE = _f(0.5), _f(1.0)


# No "nnan"/"ninf" fast-math flags: NaN and infinity must come out as NaN, never as a number. No on-disk
# cache either (it needs a writable folder): compiling takes about a second, once per process.
_compiled = numba.njit(fastmath={"contract", "nsz", "arcp", "afn"}, boundscheck=False, error_model="numpy")


@_compiled
def _sincos_kernel(x, shift, s, c):  # x, s, c [R, C], shift [R]; returns how many |x + shift| are too large
    too_large = 0
    for row in range(x.shape[0]):
        for i in range(x.shape[1]):
            v = x[row, i] + shift[row]
            too_large += abs(v) >= REDUCTION_LIMIT  # infinities too; NaN gives NaN below anyway
            j = np.floor(v * _TWO_OVER_PI + _HALF)
            r = ((v - j * _PIO2_1) - j * _PIO2_2) - j * _PIO2_3
            z = r * r
            sin_r = r + r * z * (_S1 + z * (_S2 + z * _S3))
            cos_r = _ONE - _HALF * z + z * z * (_C1 + z * (_C2 + z * _C3))
            q = np.int32(j) & 3  # the quadrant (garbage when too large: the caller redoes those)
            odd = (q & 1) == 1
            a = cos_r if odd else sin_r
            b = sin_r if odd else cos_r
            s[row, i] = -a if q & 2 else a  # quadrants 2, 3: sin < 0
            c[row, i] = -b if (q + 1) & 2 else b  # quadrants 1, 2: cos < 0
    return too_large


def _kernel_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad


def sin_cos(x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sine and cosine of ``x + shift[..., None]`` (``shift`` of shape ``x.shape[:-1]``, for example a
    layer's bias; none when None), in one numba pass for contiguous float32 CPU tensors."""
    if shift is not None and shift.shape != x.shape[:-1]:
        raise ValueError(f"shift has shape {tuple(shift.shape)}, need x's without the last dimension "
                         f"{tuple(x.shape[:-1])}")
    if _kernel_ok(x) and x.numel() and (shift is None or _kernel_ok(shift)):
        rows = x.view(-1, x.shape[-1]) if shift is not None else x.view(1, -1)
        shift_rows = shift.reshape(-1) if shift is not None else x.new_zeros(1)
        s, c = torch.empty_like(x), torch.empty_like(x)
        if not _sincos_kernel(*(t.numpy() for t in (rows, shift_rows, s.view(rows.shape), c.view(rows.shape)))):
            return s, c
    y = x if shift is None else x + shift[..., None]
    return torch.sin(y), torch.cos(y)


@_compiled
def _angle_sum_kernel(sin_a, cos_a, sin_b, cos_b, s, c):  # [p, m, H], [p, n, H] -> [p, m, n, H]
    for k in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(s.shape[2]):
                for h in range(s.shape[3]):
                    s[k, i, j, h] = sin_a[k, i, h] * cos_b[k, j, h] + cos_a[k, i, h] * sin_b[k, j, h]
                    c[k, i, j, h] = cos_a[k, i, h] * cos_b[k, j, h] - sin_a[k, i, h] * sin_b[k, j, h]


def angle_sum_sin_cos(sin_a: Tensor, cos_a: Tensor, sin_b: Tensor, cos_b: Tensor) -> tuple[Tensor, Tensor]:
    """Sine and cosine of ``a[:, i] + b[:, j]`` for every ``i, j``: ``[p, m, n, H]`` each, from the sines and
    cosines of ``a`` (``[p, m, H]``) and ``b`` (``[p, n, H]``), by angle addition.

    Why: the first SIREN layer on an ``m x n`` grid has pre-activations ``a_i + b_j`` (row term plus
    column term), so its ``m n H`` sines need only ``(m + n) H`` true ones. One compiled pass writes
    both outputs: 2.1x faster than torch's four elementwise passes here (tensors that are not
    contiguous float32 on the CPU take those passes)."""
    (p, m, H), n = sin_a.shape, sin_b.shape[1]
    if sin_b.shape != (p, n, H) or cos_a.shape != sin_a.shape or cos_b.shape != sin_b.shape:
        raise ValueError(f"need sin_a, cos_a [p, m, H] and sin_b, cos_b [p, n, H]; got {tuple(sin_a.shape)}, "
                         f"{tuple(cos_a.shape)}, {tuple(sin_b.shape)}, {tuple(cos_b.shape)}")
    if all(map(_kernel_ok, (sin_a, cos_a, sin_b, cos_b))):
        s, c = sin_a.new_empty(p, m, n, H), sin_a.new_empty(p, m, n, H)
        _angle_sum_kernel(*(t.numpy() for t in (sin_a, cos_a, sin_b, cos_b, s, c)))
        return s, c
    sa, ca, sb, cb = sin_a[:, :, None], cos_a[:, :, None], sin_b[:, None], cos_b[:, None]
    return torch.mul(sa, cb).addcmul_(ca, sb), torch.mul(ca, cb).addcmul_(sa, sb, value=-1.0)


@_compiled
def _first_layer_grads_kernel(cos, dh, row, col, out):  # [p, m, n, H] twice, [m], [n] -> out [p, 3, H]
    p, m, n, H = cos.shape
    row_sum = np.empty(H, dtype=cos.dtype)
    for k in range(p):
        out[k] = 0
        for i in range(m):
            row_sum[:] = 0
            for j in range(n):
                for h in range(H):
                    e = cos[k, i, j, h] * dh[k, i, j, h]
                    row_sum[h] += e
                    out[k, 1, h] += col[j] * e
            for h in range(H):
                out[k, 0, h] += row[i] * row_sum[h]
                out[k, 2, h] += row_sum[h]


def first_layer_grads(cos: Tensor, dh: Tensor, axes: Sequence[Tensor]) -> Tensor:
    """``sum over pixels of [coordinates, 1] * cos * dh``, ``[p, H, d + 1]``: the first SIREN layer's weight
    and bias gradients (up to ``w0``), from the cosine of its pre-activation and the gradient reaching its
    sine, both ``[p, pixels, H]`` with the pixels of the grid ``axes`` (``d`` coordinate vectors) row-major.

    Why: one compiled pass reads the two tensors once and sums along rows and columns of the grid,
    instead of writing their product and multiplying it with the ``[d + 1, pixels]`` grid."""
    p, N, H = cos.shape
    if dh.shape != cos.shape or N != math.prod(len(a) for a in axes) or len(axes) not in (1, 2):
        raise ValueError(f"need cos and dh [p, pixels, H] on a grid of 1 or 2 axes; got {tuple(cos.shape)}, "
                         f"{tuple(dh.shape)}, axes of {[len(a) for a in axes]}")
    row, col = axes if len(axes) == 2 else (axes[0], axes[0].new_zeros(1))  # 1-D: one column at 0
    if all(map(_kernel_ok, (cos, dh, row, col))):
        out = cos.new_empty(p, 3, H)
        _first_layer_grads_kernel(*(t.numpy() for t in (cos.view(p, len(row), len(col), H),
                                                        dh.view(p, len(row), len(col), H), row, col, out)))
    else:  # the same sums in torch ops
        e = (cos * dh).reshape(p, len(row), len(col), H)
        row_sums = e.sum(2)  # [p, m, H]
        out = torch.stack([(row[:, None] * row_sums).sum(1), (col[:, None] * e.sum(1)).sum(1), row_sums.sum(1)], 1)
    return (out if len(axes) == 2 else out[:, [0, 2]]).transpose(1, 2)
