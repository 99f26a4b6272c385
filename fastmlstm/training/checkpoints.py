"""Stage 5, checkpointing: the run directory's checkpoints, written atomically and read back for
an exact resume."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from .._atomic import atomic_save
from ..errors import InputError
from ..serialization import CHECKPOINT_FORMAT
from .distributed import Context, gather_rows
from .metrics import LogWindow
from .state import TrainState, rng_state

__all__ = ["check_writable", "checkpoint_paths", "load_latest_checkpoint", "remove_stale_temporaries",
           "save_checkpoint"]

VERSION = 1


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to --out {out}: {exc.strerror or exc}") from exc


def checkpoint_paths(out: Path) -> list[Path]:
    return sorted(out.glob("ckpt-*.pt"))


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a write that was killed midway; the files they were to replace are intact."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_latest_checkpoint(out: Path) -> dict | None:
    for path in reversed(checkpoint_paths(out)):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable: fall back to the one before it
            print(f"train.py: skipping unreadable checkpoint {path.name}: {exc}", file=sys.stderr)
            continue
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not a train.py checkpoint")
        return ckpt
    return None


def save_checkpoint(ctx: Context, out: Path, state: TrainState, window: LogWindow, run: dict, epoch: int,
                    keep: int) -> None:
    """Every rank's carried state gathered, then rank 0 writes ``ckpt-<step>.pt`` and prunes to ``keep``."""
    all_h, all_c = gather_rows(ctx, state.h), gather_rows(ctx, state.c)
    # A checkpoint between two log records carries the partial window, so the record after a
    # resume averages the same updates as it would have without the interruption.
    log_window = window.snapshot(ctx)
    if not ctx.main:
        return
    atomic_save({"format": CHECKPOINT_FORMAT, "version": VERSION, "run": run, "step": state.step, "epoch": epoch,
                 "model": state.model.to_record(), "optimizer": state.optimizer.state_dict(), "h": all_h,
                 "c": all_c, "rng": rng_state(), "log_window": log_window},
                out / f"ckpt-{state.step:08d}.pt")
    for old in checkpoint_paths(out)[:-keep]:
        old.unlink(missing_ok=True)
