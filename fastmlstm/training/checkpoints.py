"""Stage 5, checkpointing: the run directory's checkpoints, written atomically and read back for
an exact resume.

Every checkpoint carries the SHA-256 digest of its content (:mod:`fastmlstm.models._digest`),
checked when it is read: torch's zip archive checks nothing, so a flipped byte in a tensor would
otherwise be resumed from without a word. A checkpoint whose content does not match is unreadable
like a truncated one: set aside, and the run resumes from the newest good one. Checkpoints of older
versions, without a digest, are read without the check."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import torch

from .._atomic import atomic_save
from ..errors import InputError
from ..models._digest import digest_problem, seal
from ..models.serialization import CHECKPOINT_FORMAT
from .distributed import Context, gather_rows, write_on_main
from .metrics import LogWindow
from .state import TrainState, rng_state
from .update import diverged, weights_finite

__all__ = ["check_writable", "checkpoint_paths", "find_latest_checkpoint", "move_aside", "remove_stale_temporaries",
           "refuse_unreadable", "save_checkpoint"]

VERSION = 1
OUTPUTS = ("metrics.jsonl", "model.pt")  # the run's files besides its checkpoints and byte streams
CHECKPOINT_KEYS = ("format", "run", "step", "model", "optimizer", "h", "c", "rng", "log_window")


def check_writable(out: Path) -> None:
    """``out`` is a folder this process can write into, and no directory sits where the run's own
    files go (found now, not after the last update)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to --out {out}: {exc.strerror or exc}") from exc
    for name in OUTPUTS:
        if (out / name).is_dir():
            raise InputError(f"cannot write {out / name}: it is a directory; move it out of --out {out}")


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(r"ckpt-(\d+)\.pt", path.name)
    return int(match.group(1)) if match else None


def checkpoint_paths(out: Path) -> list[Path]:
    """The run's checkpoints, oldest (lowest step) first."""
    paths = [p for p in out.glob("ckpt-*.pt") if _step_of(p) is not None]
    return sorted(paths, key=_step_of)


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a write that was killed midway; the files they were to replace are intact."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents; raises ValueError saying why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # empty, truncated, corrupted, or not a torch file at all
        raise ValueError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                         ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or missing:
        raise ValueError(f"not a complete training checkpoint (missing {', '.join(missing) or 'its format'})")
    problem = digest_problem(ckpt)
    if problem:
        raise ValueError(problem)
    return ckpt


def find_latest_checkpoint(out: Path) -> tuple[dict | None, list[tuple[Path, str]]]:
    """(the newest readable checkpoint or None, [(path, why) of every newer one that is unreadable]).

    Reads only: nothing is moved or deleted here, so every rank can call it.
    """
    unreadable = []
    for path in reversed(checkpoint_paths(out)):
        try:
            return _read_checkpoint(path), unreadable
        except ValueError as exc:
            unreadable.append((path, str(exc)))
    return None, unreadable


def refuse_unreadable(unreadable: list[tuple[Path, str]], *, start_over: bool, out: Path) -> None:
    """When checkpoints exist and none can be read, stop with an error naming them, unless
    ``start_over`` (``--start-over``) says to train again from step 0. Called on every rank alike."""
    if unreadable and not start_over:
        listing = "; ".join(f"{p.name}: {why}" for p, why in unreadable)
        raise InputError(f"{out} holds checkpoints but none can be read ({listing}). Nothing was changed. "
                         "Restore a good checkpoint, or re-run with --start-over to train from step 0 "
                         "(the unreadable files are then kept aside as <name>.unreadable)")


def move_aside(unreadable: list[tuple[Path, str]]) -> None:
    """Rename unreadable checkpoints to ``<name>.unreadable`` (rank 0, after every rank has read):
    they are kept for inspection but never resumed from, counted or pruned again."""
    for path, why in unreadable:
        target = path.with_name(path.name + ".unreadable")
        path.replace(target)
        print(f"fastmlstm: {path.name} cannot be read ({why}); kept aside as {target.name}", file=sys.stderr)


def save_checkpoint(ctx: Context, out: Path, state: TrainState, window: LogWindow, run: dict, epoch: int,
                    keep: int) -> None:
    """Every rank's carried state gathered, then rank 0 writes ``ckpt-<step>.pt`` and prunes to ``keep``.

    A diverged state (weights or the window's loss not finite) raises TrainingDiverged on every
    rank instead: a checkpoint of it would replace good ones with one nothing can go on from.
    """
    if not ctx.all_ok(weights_finite(state.model)):
        raise diverged(f"the weights are no longer finite (NaN or inf) after update {state.step}")
    all_h, all_c = gather_rows(ctx, state.h), gather_rows(ctx, state.c)
    # A checkpoint between two log records carries the partial window, so the record after a
    # resume averages the same updates as it would have without the interruption.
    log_window = window.snapshot(ctx, state.step)
    written = out / f"ckpt-{state.step:08d}.pt"

    def write() -> None:
        atomic_save(seal({"format": CHECKPOINT_FORMAT, "version": VERSION, "run": run, "step": state.step,
                          "epoch": epoch, "model": state.model.to_record(),
                          "optimizer": state.optimizer.state_dict(), "h": all_h, "c": all_c, "rng": rng_state(),
                          "log_window": log_window}), written)
        # Keep the newest `keep` by step, the one just written among them; a file of a later step than
        # this one cannot belong to this run's past (it was set aside at start) and is left alone.
        older = [p for p in checkpoint_paths(out) if _step_of(p) < state.step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            old.unlink(missing_ok=True)

    write_on_main(ctx, f"the checkpoint {written}", write)
