"""Many workers: task groups split across processes with ``torch.distributed``.

How it works
------------
An outer step estimates the meta-gradient on ``num_groups`` independent task groups. Group ``g``
draws every random number (tasks, minibatches, perturbations) from its own generator, seeded by
``(seed, g)``, so its estimate does not depend on which worker computes it. Worker ``r`` of ``W``
owns groups ``r, r + W, r + 2W, ...``. After the local estimates are in, each worker writes them
into its rows of a ``[num_groups, D]`` zero buffer and the buffer is all-reduced (sum); every row
then holds exactly one worker's numbers (adding zeros is exact), and every worker averages the rows
in the same order. The combined meta-gradient, and so the whole run, is bit-for-bit the same for any
number of workers, including one. Every worker applies the same Adam update to its own copy of the
meta-parameters; rank 0 alone writes logs, meta-evaluations and the main checkpoint file, and each
rank writes the states of the groups it owns.

Single machine
--------------
::

    python -m meta_train --suite small --num-groups 8 --outer-steps 5000 --logdir runs/a
    torchrun --nproc_per_node=4 -m meta_train --suite small --num-groups 8 --outer-steps 5000 --logdir runs/a

On CPU the backend is gloo (give each worker ``OMP_NUM_THREADS=1`` or ``--torch-threads 1`` and
at most one worker per core); with CUDA it is NCCL and worker ``r`` uses ``cuda:LOCAL_RANK``.
``num_groups`` must be at least the number of workers; make it a multiple of it to balance load.

Multi-node
----------
Start the same command on every node; the logdir must be on a filesystem all nodes share (each
rank writes its own checkpoint file, and ``--resume`` reads all of them)::

    # on each of 2 nodes, 8 GPUs each
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-id=run42 \\
        --rdzv-endpoint=NODE0_HOSTNAME:29500 \\
        -m meta_train --suite large --num-groups 64 --outer-steps 20000 --logdir /shared/runs/run42

Resume with the same command plus ``--resume``; the worker count may change between runs (group
states are looked up by group id), but the results then differ from an uninterrupted run only by
the scheduling of evaluation, never numerically. On SLURM, launch one ``torchrun`` per node with
``srun`` and take the endpoint from the first host of ``$SLURM_JOB_NODELIST``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "owned_groups"]


@dataclass
class DistContext:
    """Where this process sits; ``world_size == 1`` means no process group at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """NCCL needs CUDA tensors; gloo takes CPU ones."""
        if self.world_size > 1 and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        out = t.to(self.comm_device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (or run alone without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world == 1:
        return DistContext(0, 1, local_rank, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"device_id": dev} if backend == "nccl" else {}))
        here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, here)


def owned_groups(num_groups: int, rank: int, world_size: int) -> list[int]:
    """Round-robin ownership of task groups."""
    if num_groups < world_size:
        raise ValueError(f"num_groups ({num_groups}) must be at least the number of workers ({world_size}); "
                         "every worker needs a task group")
    return list(range(rank, num_groups, world_size))
