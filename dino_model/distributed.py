"""Process-group setup from torchrun's environment, and the few collective helpers training needs.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set) :func:`init`
joins the process group: NCCL when the device is a GPU, gloo on CPU. Without those variables it does nothing and
every helper behaves as a world of one, so ``python -m dino_model.train`` runs in a single process unchanged.

    >>> ctx = init("auto")        # DistContext(rank=0, world_size=1, local_rank=0, device=device('cpu'))
    >>> all_reduce_mean(t)        # in place; a no-op in a single process
    >>> cleanup()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "init",
    "cleanup",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_mean",
    "all_reduce_max",
    "broadcast_object",
    "resolve_device",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global and local rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes shared files and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is initialised (torchrun, even with a single rank)."""
        return is_distributed()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; ``cuda`` fails clearly without a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA GPU is available (use 'auto' or 'cpu')")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher following its env:// convention) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun described (idempotent), pick this rank's device and return where we are.

    The backend follows the device: NCCL for CUDA, gloo for CPU. A process not started by torchrun is a world of
    one and creates no process group.
    """
    if not launched_by_torchrun():
        return DistContext(0, 1, 0, resolve_device(device, 0))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL init, so each rank's communicator binds its own GPU
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistContext(rank, world_size, local_rank, dev)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks, in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks, in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (plain picklable values only, e.g. a checkpoint name)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
