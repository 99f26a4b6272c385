"""One process or many (torchrun): the rank's place, its device, and collectives that fail together."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError

__all__ = ["Context", "gather_rows", "init_context", "run_collectively", "write_on_main"]


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (so that all ranks fail together, none hangs)."""
        if not self.distributed:
            return ok
        flag = torch.tensor([int(ok)], device=self._collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def init_context() -> Context:
    """The rank's context from torchrun's environment (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, device)


def run_collectively(ctx: Context, fn):
    """Run ``fn`` on every rank; if it fails anywhere, raise on every rank instead of hanging."""
    error = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, on this rank, after the others have heard
        error, result = exc, None
    if not ctx.all_ok(error is None):
        raise error if error is not None else RuntimeError("another rank failed (see its error)")
    return result


def write_on_main(ctx: Context, what: str, write) -> None:
    """Run ``write`` on rank 0 (the rank that writes the run's files); every rank learns how it went.

    An OSError there (a full disk, a read-only file system, a directory in the way) becomes, on
    every rank, an InputError naming ``what`` and the cause, instead of a traceback on rank 0 while
    the other ranks wait for it. The atomic writes leave the files before it as they were.
    """
    error = None
    if ctx.main:
        try:
            write()
        except Exception as exc:  # re-raised below, after the other ranks have heard
            error = exc
    if ctx.all_ok(error is None):
        return
    if error is None:
        raise InputError(f"rank 0 could not write {what} (see its error)")
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        raise InputError(f"cannot write {what}: {reason}. The files written before it are intact: free the space "
                         "or fix the folder, then re-run the same command to resume") from error
    raise error


def gather_rows(ctx: Context, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (in rank order) on every rank, on the CPU."""
    if not ctx.distributed:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts).cpu()
