"""Data-parallel training under ``torchrun`` (DDP): gloo on CPU, NCCL on GPU.

Launch any training command with ``torchrun``; the trainer reads the environment torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc_per_node 2 -m qsmrim train --patches CACHE --out MODEL_DIR

Each process trains on its shard of every epoch (:class:`torch.utils.data.DistributedSampler`)
with ``batch_size / world_size`` patches per step, so the global batch matches a one-process
run; gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`.
Validation is sharded too and gathered, so every rank takes the same early-stopping decision.
Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from qsm_core.errors import InputError

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "barrier", "gather_arrays",
           "broadcast_object", "wrap_model", "env_world_size"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group if launched by ``torchrun`` (else a one-process ``DistInfo``).

    Parameters
    ----------
    device : str
        ``cpu`` (gloo backend) or ``cuda`` (NCCL; each process takes GPU ``LOCAL_RANK``).

    Returns
    -------
    DistInfo
    """
    world = env_world_size()
    if world <= 1 and not dist.is_initialized():
        return DistInfo(device=device)
    use_cuda = str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for but no CUDA device is available; "
                         "use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, device=device, backend=dist.get_backend(),
                    owns_group=owns)
    log.info("distributed: rank %d of %d (%s) on %s", info.rank, info.world_size,
             info.backend, info.device)
    return info


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a one-process run)."""
    if info.distributed:
        dist.barrier()


def gather_arrays(info: DistInfo, arr: np.ndarray) -> list[np.ndarray]:
    """Every rank's ``arr``, in rank order, on every rank."""
    if not info.distributed:
        return [arr]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, arr)
    return out


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Wrap in :class:`DistributedDataParallel` when distributed (else return ``model``)."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if str(info.device).startswith("cuda"):
        return DistributedDataParallel(model, device_ids=[info.local_rank])
    return DistributedDataParallel(model)
