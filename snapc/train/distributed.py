"""Data parallelism through torch.distributed, as ``torchrun`` sets it up.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is started with
NCCL on CUDA and gloo on CPU, the student is wrapped in DistributedDataParallel, and each rank
takes its slice of every global batch. Without it everything degrades to one process and the
same code path runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "setup_world", "teardown_world"]


@dataclass(frozen=True)
class World:
    """This process's place in the data-parallel group."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is the process that logs and writes files."""
        return self.rank == 0

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``value`` averaged over all ranks (itself in one process)."""
        if self.size == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.size

    def agree(self, flag: bool) -> bool:
        """Return rank 0's ``flag`` on every rank (so all stop on the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            dist.barrier()

    def local_slice(self, batch: int) -> slice:
        """Return this rank's rows of a global batch of ``batch`` rows."""
        per = batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def setup_world(device: str) -> World:
    """Return the World of this process, starting the process group under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from snapc.errors import SnapcError

        raise SnapcError("--train-device cuda but no CUDA device is visible; use cpu or auto")
    if size == 1:
        return World(0, 1, dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev)


def teardown_world(world: World) -> None:
    """End the process group started by :func:`setup_world`, if any."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
