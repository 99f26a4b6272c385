"""Stage 1, data: the corpus as one memory-mapped byte stream, split into training and held-out
parts, and the row batchers that give each rank its rows of every update."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ..data.corpus import RowBatcher, Source, build_stream, open_stream
from ..errors import InputError
from .distributed import Context, run_collectively

__all__ = ["Data", "prepare_data"]


@dataclass
class Data:
    batcher: RowBatcher  # this rank's rows of the training stream
    eval_batcher: RowBatcher | None  # the same rows of the held-out stream, if any
    corpus: str  # fingerprint of the training sources
    eval: dict  # what the held-out part is: {"data": fingerprint} or {"last_bytes": n}
    rows: int  # rows of the global batch this rank owns
    row_start: int  # the first of them


def _write_streams(args: argparse.Namespace, ctx: Context, out: Path) -> bool:
    """Parse the sources and, on each node's local rank 0, join them into ``corpus.bin``
    (and ``eval.bin``); returns whether held-out sources were given."""
    sources = [Source.parse(s) for s in args.data]
    eval_sources = [Source.parse(s) for s in args.eval_data or []]
    if ctx.local_rank == 0:
        try:
            build_stream(sources, out / "corpus.bin")
            if eval_sources:
                build_stream(eval_sources, out / "eval.bin")
        except OSError as exc:  # e.g. a full disk under --out
            raise InputError(f"cannot write the byte stream into {out}: {exc}") from exc
    return bool(eval_sources)


def _split(args: argparse.Namespace, out: Path, has_eval_data: bool):
    """(training stream, held-out stream or None, description of the held-out part)."""
    stream = open_stream(out / "corpus.bin")
    if has_eval_data:
        fingerprint = json.loads((out / "eval.json").read_text())["fingerprint"]
        return stream, open_stream(out / "eval.bin"), {"data": fingerprint}
    eval_bytes = args.eval_bytes if args.eval_bytes is not None else min(len(stream) // 100, 10_000_000)
    if eval_bytes < 0 or eval_bytes >= len(stream):
        raise InputError(f"--eval-bytes {eval_bytes} leaves nothing of the {len(stream):,}-byte corpus")
    held_out = stream[len(stream) - eval_bytes:] if eval_bytes else None
    return stream[: len(stream) - eval_bytes], held_out, {"last_bytes": eval_bytes}


def prepare_data(args: argparse.Namespace, ctx: Context, out: Path) -> Data:
    """Build (or reuse) the byte streams and this rank's batchers; ``args.steps`` defaults to one epoch."""
    if args.batch % ctx.world:
        raise InputError(f"--batch {args.batch} must be divisible by the number of ranks ({ctx.world})")
    rows = args.batch // ctx.world
    row_start = ctx.rank * rows
    has_eval_data = run_collectively(ctx, lambda: _write_streams(args, ctx, out))
    ctx.barrier()
    corpus = json.loads((out / "corpus.json").read_text())["fingerprint"]
    train_stream, eval_stream, eval_desc = _split(args, out, has_eval_data)
    batcher = RowBatcher(train_stream, args.batch, args.seq, row_start, rows)
    eval_batcher = None
    if eval_stream is not None and len(eval_stream):
        eval_batcher = RowBatcher(eval_stream, args.batch, args.seq, row_start, rows, what="held-out part")
    if args.steps is None:
        args.steps = batcher.steps_per_epoch  # one epoch, as in the paper
    return Data(batcher, eval_batcher, corpus, eval_desc, rows, row_start)
