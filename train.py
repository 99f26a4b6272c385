#!/usr/bin/env python
"""Train the byte-level multiplicative-LSTM language model of Radford et al. (2017).

    # a few minutes on a laptop CPU
    python train.py --preset tiny --data ../shared/data/imdb/unsup.txt.gz --out runs/tiny
    # the paper's recipe (H = 4096, batch 128 x 256 bytes, Adam 5e-4 decayed linearly to zero), 4 GPUs
    torchrun --nproc_per_node=4 train.py --data reviews.txt.gz --out runs/paper

Truncated backpropagation through time with persistent state: the final (h, c) of one update,
detached, is the initial state of the next for the same batch row, reset when the rows' regions of
the byte stream start over. ``--batch`` is the global batch, split across ranks; each row (and so
each rank) reads its own contiguous region of the stream.

Outputs in ``--out``: ``metrics.jsonl`` (one JSON object per logged step), ``ckpt-<step>.pt``
checkpoints (the last ``--keep``), ``model.pt`` (the final model, for ``fastmlstm.load``), and
``corpus.bin`` (the joined byte stream). Re-running the same command with the same ``--out`` resumes
from the last checkpoint and gives the same result as an uninterrupted run (bit-exact on CPU).
Ctrl-C (SIGINT) or SIGTERM writes a checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastmlstm
from fastmlstm._atomic import atomic_write
from fastmlstm.checkpoint import atomic_save, model_record
from fastmlstm.corpus import RowBatcher, Source, build_stream, open_stream

LN2 = math.log(2.0)
CHECKPOINT_FORMAT = "fastmlstm.train"

PRESETS = {
    # The paper: one layer, H = 4096, E = 64, 128 x 256 bytes, Adam 5e-4 decayed to zero over one epoch.
    "paper": dict(hidden=4096, embed=64, batch=128, seq=256, lr=5e-4, steps=None, clip=1.0,
                  eval_every=1000, ckpt_every=1000, log_every=10, eval_bytes=None),
    # Minutes on a laptop CPU: small enough to see bits/byte fall well below 3 on review text.
    "tiny": dict(hidden=256, embed=64, batch=32, seq=64, lr=2e-3, steps=2000, clip=1.0,
                 eval_every=250, ckpt_every=250, log_every=10, eval_bytes=200_000),
}

# Settings that define the run: a checkpoint made with other values belongs to another run.
RUN_KEYS = ("hidden", "embed", "weight_norm", "batch", "seq", "lr", "steps", "clip", "seed", "precision",
            "corpus", "eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, metavar="FILE[#COLUMN]",
                   help="corpus file (text, .gz, .csv/.tsv[.gz] with #column, default column 'text'); repeatable")
    p.add_argument("--eval-data", action="append", metavar="FILE[#COLUMN]",
                   help="held-out corpus (repeatable); default: the last --eval-bytes of --data")
    p.add_argument("--eval-bytes", type=int, default=None,
                   help="bytes held out from the end of --data for evaluation (paper preset: 1%%, at most "
                        "10 MB; tiny preset: 200 kB)")
    p.add_argument("--out", required=True, help="run directory: metrics, checkpoints, final model")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="defaults for the flags below (default: paper)")
    p.add_argument("--steps", type=int, help="optimizer updates (paper preset: one epoch)")
    p.add_argument("--hidden", type=int, help="hidden size H")
    p.add_argument("--embed", type=int, help="byte embedding size E")
    p.add_argument("--no-weight-norm", dest="weight_norm", action="store_false", help="plain recurrent matrices")
    p.add_argument("--batch", type=int, help="global batch: rows of the byte stream per update, split across ranks")
    p.add_argument("--seq", type=int, help="bytes per row per update (truncated BPTT length)")
    p.add_argument("--lr", type=float, help="Adam learning rate, decayed linearly to zero over --steps")
    p.add_argument("--clip", type=float, help="clip the gradient norm to this (0: off)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=fastmlstm.BACKENDS, help="recurrence backend")
    p.add_argument("--eval-every", type=int, help="evaluate every N updates (0: only at the end)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N updates (0: only at the end)")
    p.add_argument("--log-every", type=int, help="write a metrics record every N updates")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed")
    p.set_defaults(weight_norm=True)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("hidden", "embed", "batch", "seq", "log_every", "keep"):
        if getattr(args, key) < 1:
            raise SystemExit(f"train.py: --{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for key in ("eval_every", "ckpt_every"):
        if getattr(args, key) < 0:
            raise SystemExit(f"train.py: --{key.replace('_', '-')} must be >= 0")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"train.py: --steps must be at least 1, got {args.steps}")
    if args.lr <= 0 or args.clip < 0:
        raise SystemExit("train.py: --lr must be > 0 and --clip >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Distributed context


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

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (so that all ranks fail together, none hangs)."""
        if not self.distributed:
            return ok
        flag = torch.tensor([int(ok)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()


def init_context() -> Context:
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


# --------------------------------------------------------------------------------------------
# Run directory: writability, checkpoints, metrics


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SystemExit(f"train.py: cannot write to --out {out}: {exc.strerror or exc}") from exc


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
            raise SystemExit(f"train.py: {path} is not a train.py checkpoint")
        return ckpt
    return None


def check_same_run(saved: dict, current: dict, out: Path) -> None:
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
             for k in RUN_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise SystemExit(f"train.py: {out} holds checkpoints of a different run ("
                         + "; ".join(diffs) + "). Resume with the same settings, or use a new --out.")


class Metrics:
    """metrics.jsonl: one JSON object per line, appended as training goes."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps are redone.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_write(path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------------------------
# Training


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.array(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py_state = random.getstate()
    random.setstate((py_state[0], tuple(state["python"]), py_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rows(ctx: Context, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (in rank order) on every rank."""
    if not ctx.distributed:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts).cpu()


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, 256).float(), targets.reshape(-1).long(), reduction="sum")


@torch.no_grad()
def evaluate(model, batcher: RowBatcher, ctx: Context, amp) -> float:
    """Held-out bits per byte over the whole held-out stream, state carried across updates."""
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


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = init_context()
    try:
        return train(args, ctx)
    finally:
        if ctx.distributed:
            dist.destroy_process_group()


def train(args: argparse.Namespace, ctx: Context) -> int:
    out = Path(args.out)
    check_writable(out)
    if args.batch % ctx.world:
        raise SystemExit(f"train.py: --batch {args.batch} must be divisible by the number of ranks ({ctx.world})")
    rows = args.batch // ctx.world
    row_start = ctx.rank * rows
    if ctx.main:
        remove_stale_temporaries(out)

    # ---- data: the local rank 0 of each node writes the stream; everyone memory-maps it.
    def prepare_data():
        sources = [Source.parse(s) for s in args.data]
        eval_sources = [Source.parse(s) for s in args.eval_data or []]
        if ctx.local_rank == 0:
            build_stream(sources, out / "corpus.bin")
            if eval_sources:
                build_stream(eval_sources, out / "eval.bin")
        return sources, eval_sources

    try:
        sources, eval_sources = run_collectively(ctx, prepare_data)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"train.py: {exc}") from exc
    ctx.barrier()
    corpus_meta = json.loads((out / "corpus.json").read_text())
    stream = open_stream(out / "corpus.bin")
    if eval_sources:
        eval_stream = open_stream(out / "eval.bin")
        train_stream = stream
        eval_desc = {"data": json.loads((out / "eval.json").read_text())["fingerprint"]}
    else:
        eval_bytes = args.eval_bytes if args.eval_bytes is not None else min(len(stream) // 100, 10_000_000)
        if eval_bytes < 0 or eval_bytes >= len(stream):
            raise SystemExit(f"train.py: --eval-bytes {eval_bytes} leaves nothing of the {len(stream):,}-byte corpus")
        train_stream = stream[: len(stream) - eval_bytes]
        eval_stream = stream[len(stream) - eval_bytes:] if eval_bytes else None
        eval_desc = {"last_bytes": eval_bytes}
    try:
        batcher = RowBatcher(train_stream, args.batch, args.seq, row_start, rows)
        eval_batcher = None
        if eval_stream is not None and len(eval_stream):
            eval_batcher = RowBatcher(eval_stream, args.batch, args.seq, row_start, rows, what="held-out part")
    except ValueError as exc:
        raise SystemExit(f"train.py: {exc}") from exc
    if args.steps is None:
        args.steps = batcher.steps_per_epoch  # one epoch, as in the paper

    run = {"hidden": args.hidden, "embed": args.embed, "weight_norm": args.weight_norm, "batch": args.batch,
           "seq": args.seq, "lr": args.lr, "steps": args.steps, "clip": args.clip, "seed": args.seed,
           "precision": args.precision, "corpus": corpus_meta["fingerprint"], "eval": eval_desc}

    # ---- model, optimizer, state
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and ctx.device.type == "cuda")
    amp = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    torch.manual_seed(args.seed)
    model = fastmlstm.ByteLM(args.hidden, args.embed, weight_norm=args.weight_norm, backend=args.backend)
    model.to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    H = args.hidden
    h = torch.zeros(rows, H, device=ctx.device)
    c = torch.zeros(rows, H, device=ctx.device)
    start = 0

    ckpt = run_collectively(ctx, lambda: load_latest_checkpoint(out))
    if ckpt is not None:
        check_same_run(ckpt["run"], run, out)
        model.load_state_dict(ckpt["model"]["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        h = ckpt["h"][row_start:row_start + rows].to(ctx.device)
        c = ckpt["c"][row_start:row_start + rows].to(ctx.device)
        set_rng_state(ckpt["rng"])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if ctx.distributed else model

    def save_checkpoint(step: int) -> None:
        all_h, all_c = gather_rows(ctx, h), gather_rows(ctx, c)
        # A checkpoint between two log records carries the partial window, so the record after a
        # resume averages the same updates as it would have without the interruption.
        window_sum, = ctx.sum(window_loss.item())
        if not ctx.main:
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "version": 1, "run": run, "step": step,
                     "epoch": batcher.epoch_and_position(step)[0], "model": model_record(model),
                     "optimizer": optimizer.state_dict(), "h": all_h, "c": all_c, "rng": rng_state(),
                     "log_window": {"loss_sum": window_sum, "steps": window_steps}},
                    out / f"ckpt-{step:08d}.pt")
        for old in checkpoint_paths(out)[:-args.keep]:
            old.unlink(missing_ok=True)

    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics = Metrics(out / "metrics.jsonl", start) if ctx.main else None
    chars_per_update = args.batch * args.seq
    progress = None
    if ctx.main:
        if ckpt is not None:
            print(f"train.py: resuming {out} at update {start} of {args.steps}", flush=True)
        if sys.stdout.isatty():
            from tqdm import tqdm

            progress = tqdm(total=args.steps, initial=start, unit="upd", dynamic_ncols=True)

    window_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    window_steps, window_start = 0, time.perf_counter()
    if ckpt is not None:
        window_loss += ckpt["log_window"]["loss_sum"] / ctx.world  # summed back over ranks when logged
        window_steps = ckpt["log_window"]["steps"]
    step = start
    try:
        while step < args.steps:
            x, y, new_epoch = batcher.batch(step)
            if new_epoch:
                h.zero_()
                c.zero_()
            lr = args.lr * (1.0 - step / args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with amp():
                logits, (h_n, c_n) = ddp(x.to(ctx.device, non_blocking=True), (h, c))
            loss = cross_entropy_sum(logits, y.to(ctx.device, non_blocking=True)) / y.numel()
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            h, c = h_n.detach(), c_n.detach()
            step += 1
            window_loss += loss.detach()
            window_steps += 1

            last = step == args.steps
            if step % args.log_every == 0 or last:
                mean_loss, = ctx.sum(window_loss.item() / window_steps)
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": batcher.epoch_and_position(step - 1)[0],
                          "bits_per_byte": mean_loss / ctx.world / LN2, "lr": lr,
                          "chars_per_s": chars_per_update * window_steps / elapsed}
                if ctx.main:
                    metrics.write(record)
                    if progress is not None:
                        progress.set_postfix(bpb=f"{record['bits_per_byte']:.3f}",
                                             chars_s=f"{record['chars_per_s']:,.0f}")
                    else:
                        print(f"step {step}/{args.steps}  bits/byte {record['bits_per_byte']:.4f}  "
                              f"lr {lr:.2e}  chars/s {record['chars_per_s']:,.0f}", flush=True)
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if eval_batcher is not None and ((args.eval_every and step % args.eval_every == 0) or last):
                eval_bpb = evaluate(model, eval_batcher, ctx, amp)
                if ctx.main:
                    metrics.write({"step": step, "eval_bits_per_byte": eval_bpb})
                    message = f"step {step}/{args.steps}  held-out bits/byte {eval_bpb:.4f}"
                    print(message, flush=True) if progress is None else progress.write(message)
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if progress is not None:
                progress.update(1)
            # Ranks agree on stopping through a collective; across ranks it is polled only on log
            # steps, which synchronize anyway, so the hot loop gains no per-update host sync.
            stopping = False
            if not ctx.distributed or step % args.log_every == 0 or last:
                stopping = not ctx.all_ok(stop["signal"] is None)
            if (args.ckpt_every and step % args.ckpt_every == 0) or last or stopping:
                save_checkpoint(step)
            if stopping:
                if ctx.main:
                    print(f"train.py: interrupted at update {step}; checkpoint written. Re-run the same "
                          f"command to resume.", file=sys.stderr, flush=True)
                ctx.barrier()
                return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()

    if ctx.main:
        model.save(out / "model.pt")
        print(f"train.py: done, {args.steps} updates; model written to {out / 'model.pt'}", flush=True)
    # Leave together: a rank that tears its process group down while another still works can make
    # gloo abort the whole job at exit (seen once in CI: "terminate called without an active exception").
    ctx.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
