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


def _refuse_overlap(sources: list[Source], eval_sources: list[Source], records: tuple[dict, dict] | None = None
                    ) -> None:
    """Held-out sources that are also training sources (the same path, or one inside the other's
    folder; given both streams' ``records``, also the same content) would be evaluated after being
    trained on: refused, naming both."""
    digests = [[None] * len(sources), [None] * len(eval_sources)]
    if records is not None:
        # (an empty source has every empty source's digest, and holds nothing to leak)
        digests = [[r.get("sha256") if r.get("size") else None for r in record["sources"]] for record in records]
    for held, held_digest in zip(eval_sources, digests[1]):
        for trained, digest in zip(sources, digests[0]):
            a, b = held.path.resolve(), trained.path.resolve()
            if a == b or b in a.parents or a in b.parents or (digest is not None and digest == held_digest):
                raise InputError(f"--eval-data {held.path} is also trained on (--data {trained.path}): held-out "
                                 "data must not be in --data; leave --eval-data out to hold out the last "
                                 "--eval-bytes of --data instead")


def _refuse_repeats(sources: list[Source], flag: str) -> None:
    """A source named twice (the same file and column, or a file or folder inside another source's
    folder) would be read twice, its text weighted double in the stream: refused, naming both."""
    for i, later in enumerate(sources):
        for earlier in sources[:i]:
            a, b = earlier.path.resolve(), later.path.resolve()
            same = a == b and earlier.column == later.column
            if same or (a != b and (a in b.parents or b in a.parents)):
                raise InputError(f"{flag} {later.path} repeats {flag} {earlier.path}"
                                 f"{'' if same else ' (one holds the other)'}: each source is read once; "
                                 "name it once")


def _write_streams(args: argparse.Namespace, ctx: Context, out: Path) -> bool:
    """Parse the sources and, on each node's local rank 0, join them into ``corpus.bin``
    (and ``eval.bin``); returns whether held-out sources were given."""
    sources = [Source.parse(s) for s in args.data]
    eval_sources = [Source.parse(s) for s in args.eval_data or []]
    _refuse_repeats(sources, "--data")
    _refuse_repeats(eval_sources, "--eval-data")
    _refuse_overlap(sources, eval_sources)
    if ctx.local_rank == 0:
        try:
            record = build_stream(sources, out / "corpus.bin")
            if eval_sources:
                eval_record = build_stream(eval_sources, out / "eval.bin")
                _refuse_overlap(sources, eval_sources, (record, eval_record))
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
    held = eval_desc.get("last_bytes")
    # Where the bytes come short, the advice names the flags that change them.
    batcher = RowBatcher(train_stream, args.batch, args.seq, row_start, rows,
                         what=f"corpus less its last {held:,} bytes (--eval-bytes)" if held else "corpus",
                         advice=f"use a larger corpus, {'--eval-bytes, ' if held else ''}--batch or --seq smaller")
    eval_batcher = None
    if eval_stream is not None and len(eval_stream):
        eval_batcher = RowBatcher(eval_stream, args.batch, args.seq, row_start, rows, what="held-out part",
                                  advice=("use --eval-bytes larger (0: no evaluation)" if held else
                                          "use a larger --eval-data") + ", --batch or --seq smaller")
    if args.steps is None:
        args.steps = batcher.steps_per_epoch  # one epoch, as in the paper
    return Data(batcher, eval_batcher, corpus, eval_desc, rows, row_start)
