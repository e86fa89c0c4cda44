"""Sine and cosine of one tensor in one pass: the SIREN fit's hottest elementwise step.

Why: a SIREN fit needs both ``sin(a)`` (forward) and ``cos(a)`` (backward) of every hidden
pre-activation. numpy's SIMD float32 sine and cosine take about 210 us each for 400k values on
this project's CPUs (torch's eager ones 2.4x longer), and together they were a fifth of a
fit's time. The numba loop below shares one range reduction between the two and compiles
to AVX-512/AVX2 code: about 175 us for both (``benchmarks/tasks.py`` measures it).

Method (the classic single-precision one, as in Cephes' ``sinf``): ``x = j pi/2 + r`` with
``j = round(x 2/pi)`` and ``r`` from a three-part split of ``pi/2`` (fused multiply-adds keep
every product exact up to ``|j| < 2^16``), then minimax polynomials for ``sin r`` and ``cos r``
on ``[-pi/4, pi/4]`` and a quadrant swap. Largest error against float64: 9.3e-8 (numpy's:
7e-8). Inputs beyond :data:`REDUCTION_LIMIT` in magnitude, infinities and NaNs, and anything
that is not a contiguous float32 CPU tensor, go to ``torch.sin``/``torch.cos``.
"""

from __future__ import annotations

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


# No "nnan"/"ninf" fast-math flags: NaN and infinity must come out as NaN, never as a number.
@numba.njit(fastmath={"contract", "nsz", "arcp", "afn"}, boundscheck=False, error_model="numpy", cache=True)
def _sincos_kernel(x, s, c):  # flat float32 arrays; returns how many |x| are too large for the reduction
    too_large = 0
    for i in range(x.size):
        v = x[i]
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
        s[i] = -a if q & 2 else a  # quadrants 2, 3: sin < 0
        c[i] = -b if (q + 1) & 2 else b  # quadrants 1, 2: cos < 0
    return too_large


def _kernel_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad


def sin_cos(x: Tensor, sin_out: Tensor | None = None, cos_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(torch.sin(x), torch.cos(x))``, in one numba pass for contiguous float32 CPU tensors.

    ``sin_out`` / ``cos_out`` (new tensors when None) must not overlap ``x`` or each other."""
    for name, out in (("sin_out", sin_out), ("cos_out", cos_out)):
        if out is not None and out.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    if _kernel_ok(x) and x.numel():
        s = torch.empty_like(x) if sin_out is None else sin_out
        c = torch.empty_like(x) if cos_out is None else cos_out
        if _kernel_ok(s) and _kernel_ok(c) and not _sincos_kernel(x.view(-1).numpy(), s.view(-1).numpy(),
                                                                   c.view(-1).numpy()):
            return s, c
    s = torch.sin(x) if sin_out is None else torch.sin(x, out=sin_out)
    return s, torch.cos(x) if cos_out is None else torch.cos(x, out=cos_out)
