"""``Ranks``: the training CLI's view of torch.distributed — one process, or one rank of a torchrun job.

Under ``torchrun`` (detected by ``WORLD_SIZE`` in the environment, with ``RANK`` and ``LOCAL_RANK``) the
process group is initialised from the environment (``env://``: ``MASTER_ADDR`` / ``MASTER_PORT``), with gloo
on the CPU and nccl on CUDA, where rank r trains on ``cuda:LOCAL_RANK``. Without it, a ``Ranks`` of one rank
makes every collective a no-op, so the training loop has one code path for both.

Rows are shared out contiguously: of ``rows`` rows, rank r of W takes ``[⌊rows·r/W⌋, ⌊rows·(r+1)/W⌋)``, so
the ranks' shares differ by at most one row and, concatenated in rank order, give back the whole range.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes, its training ``device``, and the process group's
    ``backend`` ("gloo" or "nccl"; None when there is no process group, i.e. a plain single process)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes files."""
        return self.rank == 0

    def shard(self, rows: int) -> slice:
        """This rank's contiguous share of ``rows`` rows (see the module docstring)."""
        return slice(rows * self.rank // self.world, rows * (self.rank + 1) // self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (itself when there is no process group)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def close(self, finished: bool = True) -> None:
        """Destroy the process group, if this Ranks made one. When every rank ``finished`` (no error), they
        first meet at a barrier: a gloo rank that tears its group down while a peer is still using it can
        abort its process at exit ("terminate called without an active exception")."""
        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()

    def exit(self, status: int) -> int:
        """``status`` — but a gloo rank (after :meth:`close`) ends its process here with it, its output flushed,
        without the interpreter's finalization: there, with torch 2.11, a finished gloo rank aborted now and then
        ("terminate called without an active exception", SIGABRT, so torchrun failed the run) — 1 of 16 two-rank
        runs of tests/test_distributed.py's torchrun case, after both ranks had passed the barrier and destroyed
        the group. Gloo's worker threads still own objects that are destroyed at finalization
        (pytorch/pytorch#179291 describes the same abort)."""
        if self.distributed and self.backend == "gloo":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise RuntimeError(f"torchrun environment: {name} must be an integer, got {text!r} "
                           f"(set all of {', '.join(ENV_VARS)})") from None


def from_env(device_type: str) -> Ranks:
    """A single-process Ranks on ``device_type``, or, under torchrun, this rank with its process group
    initialised (gloo for "cpu", nccl for "cuda" on ``cuda:LOCAL_RANK``)."""
    if not under_torchrun():
        return Ranks(torch.device(device_type))
    world, rank, local_rank = (_env_int(name) for name in ENV_VARS)
    if device_type == "cuda":
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device(device_type), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    return Ranks(device, rank, world, backend)
