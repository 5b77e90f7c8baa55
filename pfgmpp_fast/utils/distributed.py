"""One distributed and device setup for every command (after EDM's torch_utils/distributed.py).

One process, or one process per device under ``torchrun`` (WORLD_SIZE > 1): gloo on the
CPU, NCCL on CUDA. Everything that needs a rank, a world size, a barrier or this rank's
device asks this module; ``init_process_group`` is called here and nowhere else.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["pick_device", "set_cpu_threads", "init", "close", "get_rank", "get_world_size", "is_enabled",
           "barrier", "print0"]

_created_group = False


def pick_device(name: Optional[str] = "auto") -> torch.device:
    """'auto' (CUDA of this rank's LOCAL_RANK if available, else the CPU), 'cpu', 'cuda',
    'cuda:1', ...; a CUDA device that does not exist is a ValueError naming it."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def set_cpu_threads(device, threads: int) -> None:
    """torch's intra-op threads for CPU runs; 0 = torch's default. One thread avoids OpenMP
    oversubscription, which slows a 2-thread run 10–20× when other processes share the cores."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = torch's default), got {threads!r}")
    if torch.device(device).type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def init(device: Optional[str] = "auto") -> torch.device:
    """Pick this rank's device and, under torchrun, join the process group (idempotent).
    Returns the device."""
    global _created_group
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)          # before NCCL starts: it uses the current device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        _created_group = True
    return dev


def close() -> None:
    """Leave the process group if :func:`init` created it."""
    global _created_group
    if _created_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _created_group = False


def is_enabled() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def get_rank() -> int:
    return torch.distributed.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_enabled() else 1


def barrier() -> None:
    if is_enabled():
        torch.distributed.barrier()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (flushed)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)
