"""The training loop: the five stages put together, with signals, checkpoints and the final model."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

import torch

from ..errors import InputError
from ..ops.registry import BackendUnavailableError
from .checkpoints import (check_writable, checkpoint_paths, find_latest_checkpoint, move_aside, refuse_unreadable,
                          remove_stale_temporaries, save_checkpoint)
from .config import check, parse_args
from .data import prepare_data
from .distributed import Context, init_context, run_collectively, write_on_main
from .metrics import LogWindow, Reporter, evaluate
from .state import build_state, check_backend, check_same_run, out_of_memory, run_descriptor
from .update import autocast_for, diverged, learning_rate, train_step, weights_finite

__all__ = ["main", "train"]


class StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop; the previous handlers come back after."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> StopFlag:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
        return 128 + int(self.signal or signal.SIGINT)


def _due(every: int, step: int, last: bool) -> bool:
    return bool(every and step % every == 0) or last


def _loop(args: argparse.Namespace, ctx: Context, out: Path, state, data, run: dict, window: LogWindow,
          reporter: Reporter, stop: StopFlag) -> int | None:
    """Updates until ``args.steps``; returns an exit code when a signal stopped it, else None."""
    forward = torch.nn.parallel.DistributedDataParallel(state.model) if ctx.distributed else state.model
    amp = autocast_for(args, ctx.device)
    while state.step < args.steps:
        x, y, new_epoch = data.batcher.batch(state.step)
        lr = learning_rate(args, state.step)
        try:
            loss = train_step(state, forward, x, y, new_epoch, lr, amp, args.clip)
        except RuntimeError as exc:
            # Weights gone NaN between two log records can make the optimizer itself fail (Adam's
            # step size overflowing float32 at a huge --lr): that is the divergence, not a bug.
            if weights_finite(state.model):
                raise
            raise diverged(f"update {state.step + 1} failed with the weights no longer finite "
                           f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
        window.add(loss)
        step, last = state.step, state.step == args.steps
        if _due(args.log_every, step, last):
            reporter.log_updates(step, data.batcher.epoch_and_position(step - 1)[0], lr, window)
        if data.eval_batcher is not None and _due(args.eval_every, step, last):
            with window.paused():  # evaluation time is not training throughput
                reporter.log_evaluation(step, evaluate(state.model, data.eval_batcher, ctx, amp))
        reporter.tick()
        # Ranks agree on stopping through a collective; across ranks it is polled only on log
        # steps, which synchronize anyway, so the hot loop gains no per-update host sync.
        stopping = False
        if not ctx.distributed or step % args.log_every == 0 or last:
            stopping = not ctx.all_ok(stop.signal is None)
        if _due(args.ckpt_every, step, last) or stopping:
            with window.paused():  # nor is checkpointing
                save_checkpoint(ctx, out, state, window, run, data.batcher.epoch_and_position(step)[0], args.keep)
        if stopping:
            if ctx.main:
                print(f"fastmlstm: interrupted at update {step}; checkpoint written. Re-run the same command "
                      "to resume.", file=sys.stderr, flush=True)
            return stop.exit_code
    return None


def _new_folders(path: Path) -> list[Path]:
    """The folders of ``path`` (itself included) that do not exist yet, outermost first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing[::-1]


def _accept(args: argparse.Namespace, ctx: Context, out: Path):
    """Check the run and build its state before the first update: (data, run descriptor, checkpoint
    or None, unreadable checkpoints, state). A run rejected here (an InputError, a model too big for
    memory included) leaves no folder behind that it created: what it made of --out (the byte
    streams) goes with it; a folder that was there is left as it was."""
    created = _new_folders(out)
    try:
        check_writable(out)
        if ctx.main:
            remove_stale_temporaries(out)
        data = prepare_data(args, ctx, out)
        run = run_descriptor(args, data)
        ckpt, unreadable = run_collectively(ctx, lambda: find_latest_checkpoint(out))
        if ckpt is None:
            refuse_unreadable(unreadable, start_over=args.start_over, out=out)
        else:
            check_same_run(ckpt["run"], run, out)
        state = run_collectively(ctx, lambda: build_state(args, ctx, data, ckpt))
    except InputError:
        # No barrier here: a rank may be rejecting alone. Only local rank 0 writes the streams.
        if ctx.main and created:
            shutil.rmtree(created[0], ignore_errors=True)
        raise
    return data, run, ckpt, unreadable, state


def _write_model(out: Path, state, keep: int) -> None:
    """The final model.pt (rank 0), then the checkpoints pruned to ``keep``."""
    state.model.save(out / "model.pt")
    # A run killed between its last checkpoint and the pruning after it resumes at the last
    # step and writes no checkpoint, so nothing would prune again: keep --keep here too.
    for old in checkpoint_paths(out)[: -keep]:
        old.unlink(missing_ok=True)


def train(args: argparse.Namespace, ctx: Context) -> int:
    """Train (or resume) the run ``args`` describes on this rank; returns the process's exit code.

    ``args`` is what :func:`fastmlstm.training.parse_args` returns; its numbers are checked again
    here (finite, in range; :data:`fastmlstm.options.OPTIONS`), so a Namespace edited in Python is
    held to the command line's rules. Bad input raises :class:`~fastmlstm.errors.InputError`.
    """
    check(args)
    check_backend(args, ctx)  # before --out is created or anything is written into it
    out = Path(args.out)
    data, run, ckpt, unreadable, state = _accept(args, ctx, out)
    ctx.barrier()  # every rank has read its checkpoint before rank 0 renames anything
    if ctx.main:
        move_aside(unreadable)
    window = LogWindow(ctx.device, ckpt and ckpt["log_window"], ctx.world)
    reporter = Reporter(out, ctx, args.steps, state.step, args.batch * args.seq)
    if ckpt is not None:
        reporter.say(f"fastmlstm: resuming {out} at update {state.step} of {args.steps}")
    try:
        with StopFlag() as stop:
            code = _loop(args, ctx, out, state, data, run, window, reporter, stop)
    finally:
        reporter.close()
    if code is None:
        # The last checkpoint checked the weights, but a run resumed at its last step writes none.
        if not ctx.all_ok(weights_finite(state.model)):
            raise diverged(f"the weights are no longer finite (NaN or inf) after update {state.step}")
        write_on_main(ctx, f"the model {out / 'model.pt'}", lambda: _write_model(out, state, args.keep))
        if ctx.main:
            print(f"fastmlstm: done, {args.steps} updates; model written to {out / 'model.pt'}", flush=True)
        code = 0
    # Leave together: a rank that tears its process group down while another still works can make
    # gloo abort the whole job at exit (seen once in CI: "terminate called without an active exception").
    ctx.barrier()
    return code


def main(argv: list[str] | None = None, prog: str = "fastmlstm train") -> int:
    """Parse the flags, train, and turn bad input into one ``<prog>: error: ...`` line and exit status 2."""
    try:
        args = parse_args(argv, prog)
        ctx = init_context()
    except SystemExit as exc:  # --help (0), or a malformed command line already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return train(args, ctx)
    except (InputError, BackendUnavailableError) as exc:  # the latter: a backend that fails on first use
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        print(f"{prog}: error: out of memory: {str(exc).strip().splitlines()[0][:300]}", file=sys.stderr)
        return 2
    finally:
        ctx.close()
