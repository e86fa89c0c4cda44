"""CPU settings that decide whether small batched training is fast or slow.

Two problems show up on small CPU machines:

* glibc's malloc serves every block above a dynamic threshold (at most 32 MiB) with a
  fresh ``mmap`` and gives it back with ``munmap`` on free.  Training steps allocate and
  free the same multi-megabyte tensors every step, so each step pays for page faults
  and zeroing: about 2x slower and noisy timings.  :func:`tune_malloc` raises the mmap
  threshold to 1 GiB, stops trimming the heap top and pads heap growth, so freed blocks
  are reused.  ``import tasks`` calls it unless ``METAOPT_NO_MALLOC_TUNING=1``.
* Several processes that each run torch with one thread per core oversubscribe the
  cores; on a 2-core machine two processes with 2 threads each ran up to 50x slower.
  Worker processes (ES / PES populations, data loaders) should call
  :func:`set_worker_threads` first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

_MALLOC_SETTINGS = {
    M_MMAP_THRESHOLD: 1 << 30,  # 1 GiB: tensors below this come from the reusable heap
    M_TRIM_THRESHOLD: 2**31 - 1,  # never hand the heap top back to the OS
    M_TOP_PAD: 256 << 20,  # grow the heap in 256 MiB steps
}


def tune_malloc() -> bool:
    """Make glibc reuse freed tensor memory instead of unmapping it.

    Returns True when every setting was accepted, False on non-glibc systems (macOS,
    Windows, musl), where it does nothing.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 when glibc rejects the value.
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS.items())


def set_worker_threads(n: int = 1) -> None:
    """Limit torch in this process to ``n`` compute threads (and ``n`` inter-op threads).

    Call it at the start of every worker process, before any torch work: the inter-op
    pool can only be sized before its first use, so a late call keeps its old size.
    """
    if n < 1:
        raise ValueError(f"set_worker_threads needs n >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # pool already started; its size can no longer change
    os.environ["OMP_NUM_THREADS"] = str(n)  # for child processes this one starts
