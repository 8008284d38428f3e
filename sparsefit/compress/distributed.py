"""``torchrun`` support: start and end the process group, rank/world, barriers.

Layers are split round-robin over the ranks; rank 0 writes the untouched tensors and the
manifest. The CLI wraps a run in :func:`torchrun_session`; library users who start their own
process group call :func:`~sparsefit.compress.compress_checkpoint` inside it directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Start a gloo process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); True if started.

    Also divides the CPU threads between the ranks.
    """
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    return True


@contextmanager
def torchrun_session() -> Iterator[tuple[int, int]]:
    """Start the process group when launched by ``torchrun`` and end it afterwards; yields ``(rank, world)``.

    Without ``torchrun`` (or with a group already started by the caller) it does nothing.
    """
    started = init_distributed_from_env()
    try:
        yield dist_info()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
