"""The equivariant core on a GPU: same outputs as on the CPU, and the same symmetry.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import pytest
import torch

from _archs import batch, max_diff
from metaopt import random_hidden_perms
from test_equivariance import EQUIVARIANT, INVARIANT, TOL

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("exact_fp32")]
ARCHS = ["mlp3", "mlp5", "cnn2d_flatten", "cnn1d"]


def _cuda(ws):
    return ws.map(lambda t: t.cuda())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", sorted(EQUIVARIANT) + sorted(INVARIANT))
def test_gpu_matches_cpu_and_keeps_symmetry(arch, kind):
    ws = batch(arch, n=3, channels=2)
    torch.manual_seed(0)
    layer = {**EQUIVARIANT, **INVARIANT}[kind](ws.spec, 2).eval()
    cpu_out = layer(ws)
    gpu_layer, gpu_ws = layer.cuda(), _cuda(ws)
    gpu_out = gpu_layer(gpu_ws)
    assert max_diff(cpu_out, gpu_out.cpu() if isinstance(gpu_out, torch.Tensor) else gpu_out.map(torch.Tensor.cpu)) \
        < 1e-4
    perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1), batch_size=3)
    permuted = gpu_layer(_cuda(ws.permute_hidden(perms)))
    expected = gpu_out if kind in INVARIANT else gpu_out.permute_hidden([p.cuda() for p in perms])
    assert max_diff(permuted, expected) < TOL
