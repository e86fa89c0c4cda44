import platform

import pytest
import torch

from metaopt import cpu


def test_tune_malloc_reports_whether_it_applied():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert cpu.tune_malloc() is on_glibc


def test_set_worker_threads():
    before = torch.get_num_threads()
    try:
        cpu.set_worker_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="n >= 1"):
        cpu.set_worker_threads(0)
