"""Stage 4, logging and evaluation: the running log window, ``metrics.jsonl`` records, the progress
bar, and held-out bits per byte."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .._atomic import atomic_write
from ..data.corpus import RowBatcher
from .distributed import Context, write_on_main
from .update import LN2, cross_entropy_sum, diverged

__all__ = ["LogWindow", "Metrics", "Reporter", "evaluate"]


def _record_step(line: str) -> int | None:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return None


class Metrics:
    """metrics.jsonl: one JSON object per line, appended as training goes."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            # Drop what was logged after the checkpoint we resume from (those steps are redone) and
            # a last line cut short by a kill.
            kept = [line for line in path.read_text().splitlines()
                    if _record_step(line) is not None and _record_step(line) <= resume_step]
            with atomic_write(path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class LogWindow:
    """The losses of the updates since the last log record (summed on the device: no host sync), and
    the time those updates took.

    Their sum reaches the host only when a record or a checkpoint is written; that is where a loss
    that stopped being finite (NaN, inf: the run diverged) is caught, at no cost to the updates.
    The clock counts only the updates this process ran since the last record: :meth:`paused`
    leaves out what happens between them (evaluations, checkpoint writes), and the updates of an
    interrupted run, which a checkpoint's partial window brings back for the loss, are not timed.
    """

    def __init__(self, device: torch.device, saved: dict | None = None, world: int = 1):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.steps = 0  # updates in the loss
        self.timed = 0  # updates in the time
        self.start = time.perf_counter()
        if saved is not None:  # the partial window a checkpoint carried
            # Summed over the ranks that wrote it (checkpoints before "world" was recorded: as many as
            # now); each rank takes the mean over them, which close() sums back over the ranks.
            self.loss += saved["loss_sum"] / saved.get("world", world)
            self.steps = saved["steps"]

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1
        self.timed += 1

    def snapshot(self, ctx: Context, step: int = 0) -> dict:
        """The partial window for a checkpoint of update ``step``; raises TrainingDiverged if its
        loss is not finite (on every rank alike: the sum is over all of them)."""
        window_sum, = ctx.sum(self.loss.item())
        self._check(window_sum, step)
        return {"loss_sum": window_sum, "steps": self.steps, "world": ctx.world}

    def close(self, ctx: Context, step: int = 0) -> tuple[float, float, int]:
        """(bits per byte averaged over the window and the ranks, seconds of the timed updates, timed
        updates); then reset. Raises TrainingDiverged if the window's loss is not finite (``step``:
        its last update)."""
        mean_loss, = ctx.sum(self.loss.item() / self.steps)
        self._check(mean_loss, step)
        elapsed, timed = time.perf_counter() - self.start, self.timed
        self.loss.zero_()
        self.steps = self.timed = 0
        self.start = time.perf_counter()
        return mean_loss / ctx.world / LN2, elapsed, timed

    @contextmanager
    def paused(self):
        """Leave the time spent inside out of the window's (evaluations, checkpoints: not updates)."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - begin

    def _check(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            first = step - self.steps + 1
            updates = f"update {step}" if first == step else f"updates {first}..{step}"
            raise diverged(f"the loss of {updates} is {loss} (not a finite number)")


class Reporter:
    """Rank 0's outputs: metrics.jsonl records and a progress bar (on a terminal) or log lines."""

    def __init__(self, out: Path, ctx: Context, total: int, start: int, chars_per_update: int):
        self.ctx, self.total, self.chars_per_update = ctx, total, chars_per_update
        self.path = out / "metrics.jsonl"
        self.metrics = None

        def open_metrics() -> None:
            self.metrics = Metrics(self.path, start)

        write_on_main(ctx, f"the metrics file {self.path}", open_metrics)
        self.progress = None
        if ctx.main and sys.stdout.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=total, initial=start, unit="upd", dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self.ctx.main:
            print(message, flush=True) if self.progress is None else self.progress.write(message)

    def log_updates(self, step: int, epoch: int, lr: float, window: LogWindow) -> None:
        bits_per_byte, elapsed, timed = window.close(self.ctx, step)
        record = {"step": step, "epoch": epoch, "bits_per_byte": bits_per_byte, "lr": lr,
                  "chars_per_s": self.chars_per_update * timed / elapsed}
        self._write(record)
        if not self.ctx.main:
            return
        if self.progress is not None:
            self.progress.set_postfix(bpb=f"{bits_per_byte:.3f}", chars_s=f"{record['chars_per_s']:,.0f}")
        else:
            self.say(f"step {step}/{self.total}  bits/byte {bits_per_byte:.4f}  lr {lr:.2e}  "
                     f"chars/s {record['chars_per_s']:,.0f}")

    def _write(self, record: dict) -> None:
        """One record, on rank 0; a write that fails (a full disk) stops every rank with one error line."""
        write_on_main(self.ctx, f"the metrics file {self.path}", lambda: self.metrics.write(record))

    def log_evaluation(self, step: int, bits_per_byte: float) -> None:
        self._write({"step": step, "eval_bits_per_byte": bits_per_byte})
        if self.ctx.main:
            self.say(f"step {step}/{self.total}  held-out bits/byte {bits_per_byte:.4f}")

    def tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


@torch.no_grad()
def evaluate(model, batcher: RowBatcher, ctx: Context, amp) -> float:
    """Held-out bits per byte: the mean cross entropy / ln 2 over every byte predicted of the held-out
    stream, read as the training stream is (this rank's rows, state carried from zero), summed over ranks."""
    model.eval()
    state, total, count = None, 0.0, 0
    for step in range(batcher.steps_per_epoch):
        x, y, _ = batcher.batch(step)
        with amp():
            logits, state = model(x.to(ctx.device), state)
        total += cross_entropy_sum(logits, y.to(ctx.device)).item()
        count += y.numel()
    model.train()
    total, count = ctx.sum(total, count)
    return total / count / LN2
