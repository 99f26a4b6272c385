"""Byte streams for language-model training, memory-mapped so corpora larger than RAM stay flat.

Sources are text files, gzip text files, columns of CSV/TSV files (plain or gzip), given as
``path`` or ``path.csv.gz#column``, or directories of one-document files (e.g. IMDB's
``aclImdb/train/unsup``). They are turned into one byte stream on disk: text files are copied as
they are (any bytes: it is a byte model); each CSV row's field and each file of a directory becomes
one record with its internal newlines replaced by spaces; sources and records are joined with a
newline, as in the paper's corpus of one review per line. A file is decompressed when its name ends
in ``.gz``; gzip content under another name is refused rather than trained on as compressed bytes.
A directory's hidden files and folders (``.git``, ``.ipynb_checkpoints``) are not documents. A CSV/TSV
row must have the header's number of fields (a stray delimiter would cut the text short or shift it);
CSV fields may be quoted, TSV ones are not (a quote is part of the text).

Layout of a training run (:class:`RowBatcher`): the stream is cut into ``rows`` contiguous regions
of equal length, one per batch row of the *global* batch; update ``s`` gives every row the next
``seq + 1`` bytes of its own region. Distributed ranks take disjoint blocks of rows, so no two rows
or ranks ever read the same bytes. When a region is used up every row starts over at its beginning
(a new epoch), which is where the carried recurrent state is reset.

The stream is a cache, ``corpus.bin``, with its record ``corpus.json``; the two are replaced together
(:class:`fastmlstm._atomic.FileSet`), so a failed build leaves the previous pair as it was. Every
:func:`build_stream` (so every training start and resume) checks it before reuse: the SHA-256 of
each source file's bytes must equal the one recorded when the cache was built (so a same-size edit
of a source is seen), and the SHA-256 of the cache's own bytes must equal its record (so a cache
damaged in place is seen). Both are hashed in 16 MiB chunks on several threads. Any mismatch, a
missing or unreadable record, or a record of an older fastmlstm logs one line saying which and
rebuilds the cache; a rebuilt stream of the same sources is the same bytes, so a resumed run goes on
exactly. The check reads every source and the cache once per start: its cost is that of reading
and hashing them, not of rebuilding.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._atomic import FileSet
from ..errors import InputError, MissingInputError

__all__ = ["RowBatcher", "Source", "build_stream", "content_digest", "open_stream"]

_CHUNK = 1 << 20
_HASH_CHUNK = 16 << 20  # the unit of the content hashes: chunks are hashed in parallel, then their digests
_RECORD_FORMAT = 2  # corpus.json with content hashes (1: names and sizes only)
_GZIP_MAGIC = b"\x1f\x8b"
logger = logging.getLogger("fastmlstm")


def _refuse_misnamed_gzip(path: Path, head: bytes) -> None:
    """A gzip file is decompressed by its name (.gz); one named otherwise would be trained on as its
    compressed bytes."""
    if head.startswith(_GZIP_MAGIC) and path.suffix != ".gz":
        raise InputError(f"corpus file {path} is gzip-compressed but its name does not end in .gz, so its "
                         "compressed bytes would be the corpus: give it a .gz ending (lower case), or gunzip it")


@dataclass(frozen=True)
class Source:
    """One corpus source: a file (text, .gz, .csv, .tsv, .csv.gz, .tsv.gz; for tables, a column) or
    a directory whose files (recursively, in sorted order, hidden ones skipped) are one record each.
    ``parse("reviews.csv#body")`` names a column; a path that itself holds a "#" is that path."""

    path: Path
    column: str | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> Source:
        spec = str(spec)
        column = None
        # A file name may hold a "#" (reviews#2.txt): a spec that names a path as it is is that path.
        if "#" in spec and not os.path.lexists(os.path.expanduser(spec)):
            spec, column = spec.rsplit("#", 1)
            if not column:
                raise InputError(f"empty column name in corpus source {spec + '#'!r}")
        source = cls(Path(spec).expanduser(), column)
        if source.path.is_dir():
            if column is not None:
                raise InputError(f"{source.path}: a #column applies to .csv/.tsv files only")
            if not source.files():
                raise InputError(f"corpus directory {source.path} holds no files")
            return source
        if not source.path.is_file():
            if source.path.is_symlink():
                raise MissingInputError(f"corpus file {source.path} is a symbolic link to nothing (its target is "
                                        "missing, or the links form a loop)")
            if source.path.exists():
                raise InputError(f"corpus file {source.path} is not a regular file or a directory")
            raise MissingInputError(f"corpus file {source.path} does not exist")
        if column is not None and source.delimiter is None:
            raise InputError(f"{source.path}: a #column applies to .csv/.tsv files only")
        try:
            with open(source.path, "rb") as f:
                _refuse_misnamed_gzip(source.path, f.read(len(_GZIP_MAGIC)))
        except OSError as exc:
            raise InputError(f"cannot read corpus file {source.path}: {exc.strerror or exc}") from None
        return source

    def files(self) -> list[Path]:
        """A directory's files, sorted; hidden files and whatever is in hidden folders (.git,
        .ipynb_checkpoints) skipped. A folder that cannot be listed, or a link to nothing, is an
        error, not fewer documents."""

        def refuse(exc: OSError):
            raise InputError(f"cannot list corpus folder {exc.filename}: {exc.strerror or exc}")

        found = []
        for folder, subfolders, names in os.walk(self.path, onerror=refuse):  # symlinked folders not followed
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            found.extend(Path(folder, n) for n in names if not n.startswith("."))
        dangling = [p for p in found if p.is_symlink() and not p.exists()]
        if dangling:  # a document that went missing, not one fewer document
            raise MissingInputError(f"corpus folder {self.path} holds a symbolic link to nothing: {dangling[0]} "
                                    f"(its target is missing{f'; {len(dangling)} such links' if len(dangling) > 1 else ''})")
        return sorted(p for p in found if p.is_file())

    @property
    def compressed(self) -> bool:
        return self.path.suffix == ".gz"

    @property
    def delimiter(self) -> str | None:
        suffix = Path(self.path.stem).suffix if self.compressed else self.path.suffix
        return {".csv": ",", ".tsv": "\t"}.get(suffix.lower())

    def open_binary(self):
        return gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")

    def describe(self) -> dict:
        if self.path.is_dir():
            files = self.files()
            return {"directory": self.path.name, "files": len(files), "size": sum(f.stat().st_size for f in files)}
        return {"file": self.path.name, "column": self.column, "size": self.path.stat().st_size}

    def write_records(self, out) -> int:
        """Append this source's bytes to the binary file ``out``; return the number of bytes written."""
        if self.path.is_dir():
            written = 0
            for path in self.files():
                opener = gzip.open if path.suffix == ".gz" else open
                try:
                    with opener(path, "rb") as f:
                        record = f.read()
                except (OSError, EOFError, zlib.error) as exc:
                    raise InputError(f"cannot read corpus file {path}: {exc}") from exc
                _refuse_misnamed_gzip(path, record[: len(_GZIP_MAGIC)])
                record = record.replace(b"\r\n", b" ").replace(b"\n", b" ").replace(b"\r", b" ")
                if record:
                    out.write(record + b"\n")
                    written += len(record) + 1
            return written
        written = 0
        try:
            with self.open_binary() as f:
                if self.delimiter is None:
                    last = b""
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        last = chunk[-1:]
                    if written and last != b"\n":
                        out.write(b"\n")
                        written += 1
                    return written
                # surrogateescape keeps every byte: invalid UTF-8 passes through unchanged.
                text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
                # CSV, strict: a quote that never closes is an error, not the rest of the file read as one
                # field. TSV has no quoting (IANA's text/tab-separated-values, as the Amazon review dumps
                # and the evaluation loaders read it): a quote is a character of the text.
                quoting = {"quoting": csv.QUOTE_NONE} if self.delimiter == "\t" else {}
                reader = csv.reader(text, delimiter=self.delimiter, strict=True, **quoting)
                header = next(reader, None)
                if header is None:
                    return 0
                header = [h.lstrip("\ufeff") for h in header]
                column = self.column or "text"
                if column not in header:
                    shown = ", ".join(h if h.isprintable() and len(h) <= 40 else repr(h[:40]) for h in header[:20])
                    raise InputError(f"{self.path}: no column {column!r} (columns: {shown}"
                                     f"{', ...' if len(header) > 20 else ''}); name one as {self.path}#COLUMN")
                index = header.index(column)
                for row in reader:
                    if not row:  # a blank line
                        continue
                    if len(row) != len(header):
                        self._refuse_row(row, header, index, reader.line_num)
                    record = row[index].replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
                    data = record.encode("utf-8", errors="surrogateescape") + b"\n"
                    out.write(data)
                    written += len(data)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: a damaged gzip stream
            raise InputError(f"cannot read corpus file {self.path}: {exc}") from exc
        except csv.Error as exc:
            kind = "CSV" if self.delimiter == "," else "TSV"
            raise InputError(f"{self.path}, line {reader.line_num}: malformed {kind}: {exc} "
                             "(a quote that is not closed?)") from exc
        return written

    def _refuse_row(self, row: list[str], header: list[str], index: int, line: int) -> None:
        """A row whose field count is not the header's: its text could be cut short at a stray
        delimiter, or another field's text taken for the column's."""
        if len(row) <= index:
            raise InputError(f"{self.path}, line {line}: {len(row)} field(s), no column {header[index]!r} "
                             f"(field {index + 1} of the header's {len(header)})")
        raise InputError(f"{self.path}, line {line}: {len(row)} fields where the header has {len(header)} "
                         f"(an unquoted {'comma' if self.delimiter == ',' else 'tab'} in a field?)")


def _chunk_digest(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(_HASH_CHUNK)).digest()


def _combine(chunk_digests: list[bytes], size: int) -> str:
    return hashlib.sha256(b"%d\0" % size + b"".join(chunk_digests)).hexdigest()


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 over the SHA-256s of a file's 16 MiB chunks and its size (hex). The chunks are hashed
    on up to 8 threads (hashlib releases the GIL), so a big file is read at the disk's pace."""
    path = Path(path)
    size = path.stat().st_size
    offsets = range(0, size, _HASH_CHUNK)
    if len(offsets) <= 1:
        return _combine([_chunk_digest(path, 0)] if size else [], size)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(offsets))) as pool:
        return _combine(list(pool.map(lambda offset: _chunk_digest(path, offset), offsets)), size)


class _HashingWriter:
    """Passes writes to a binary file and computes :func:`content_digest` of what was written."""

    def __init__(self, out):
        self.out, self.size, self.digests = out, 0, []
        self._chunk = hashlib.sha256()
        self._in_chunk = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        view = memoryview(data)
        while view:
            take = min(len(view), _HASH_CHUNK - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == _HASH_CHUNK:
                self.digests.append(self._chunk.digest())
                self._chunk, self._in_chunk = hashlib.sha256(), 0
        self.size += len(data)
        return len(data)

    def digest(self) -> str:
        return _combine(self.digests + ([self._chunk.digest()] if self._in_chunk else []), self.size)


def source_digest(source: Source) -> str:
    """Content hash of a source's files as they are on disk (a directory: each file's relative path
    and hash, in order)."""
    path = source.path
    try:
        if not source.path.is_dir():
            return content_digest(path)
        h = hashlib.sha256()
        for path in source.files():
            h.update(f"{path.relative_to(source.path).as_posix()}\0{content_digest(path)}\n".encode())
        return h.hexdigest()
    except OSError as exc:
        raise InputError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None


def fingerprint(sources: list[Source], digests: list[str] | None = None) -> str:
    """Identifies a corpus by its files' names, columns and sizes (not their location) and, given
    ``digests`` (:func:`source_digest` of each), their content."""
    described = [s.describe() for s in sources]
    if digests is not None:
        described = [dict(d, sha256=digest) for d, digest in zip(described, digests)]
    blob = json.dumps(described, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_record(meta_path: Path) -> dict | None:
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _name(described: dict) -> tuple:
    return described.get("file") or described.get("directory"), described.get("column")


def _stale(path: Path, record: dict | None, sources: list[Source], digests: list[str]) -> str | None:
    """Why the cache at ``path`` cannot be reused for ``sources`` (None: it can)."""
    if not path.exists():
        return "it does not exist" if record is None else "it is missing"
    if record is None:
        return "its record is missing or unreadable"
    if record.get("format") != _RECORD_FORMAT:
        return "it was built by an older fastmlstm, without content hashes"
    recorded = record.get("sources")
    if (not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded)
            or [_name(r) for r in recorded] != [_name(s.describe()) for s in sources]):
        return "it was built from other sources"
    for source, digest, was in zip(sources, digests, recorded):
        if digest != was.get("sha256"):
            return f"{source.path} changed since it was built (its content hash differs)"
    if path.stat().st_size != record.get("bytes"):
        return f"it has {path.stat().st_size:,} bytes where its record says {record.get('bytes')}"
    if content_digest(path) != record.get("sha256"):
        return "its bytes changed since it was built (damaged or overwritten)"
    return None


def build_stream(sources: list[Source], path: str | os.PathLike) -> dict:
    """Write the joined byte stream of ``sources`` to ``path`` (atomically) and a ``.json`` record beside it.

    If ``path`` already holds the stream of the same sources it is reused, after the content check
    described in the module's docstring; otherwise (re)built, with one log line saying why when a
    cache was there. Returns the record: ``{"format", "fingerprint", "bytes", "sha256", "sources"}``.
    """
    if not sources:
        raise InputError("no corpus given: pass at least one --data file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # reviews can be long
    path = Path(path)
    meta_path = path.with_suffix(".json")
    digests = [source_digest(s) for s in sources]
    record = _read_record(meta_path)
    why = _stale(path, record, sources, digests)
    if why is None:
        return record
    if path.exists() or record is not None:
        logger.warning("fastmlstm: rebuilding %s: %s", path, why)
    # A cache of an older fastmlstm names its runs by names and sizes only: if the rebuilt stream is
    # the very same bytes, its runs keep that name, so that they still resume.
    legacy = None
    if (record is not None and "format" not in record and record.get("fingerprint") == fingerprint(sources)
            and path.is_file() and path.stat().st_size == record.get("bytes")):
        legacy = content_digest(path)
    with FileSet(path.parent, what="corpus folder") as files:  # the stream and its record replace the old pair together
        with files.open(path.name) as out:
            writer = _HashingWriter(out)
            total = sum(source.write_records(writer) for source in sources)
        if total == 0:
            names = ", ".join(str(s.path) for s in sources)
            raise InputError(f"the corpus is empty: {names} {'hold' if len(sources) > 1 else 'holds'} no bytes")
        identity = record["fingerprint"] if legacy is not None and legacy == writer.digest() else fingerprint(
            sources, digests)
        meta = {"format": _RECORD_FORMAT, "fingerprint": identity, "bytes": total, "sha256": writer.digest(),
                "sources": [dict(s.describe(), sha256=d) for s, d in zip(sources, digests)]}
        files.write(meta_path.name, json.dumps(meta, indent=1).encode())
    return meta


def open_stream(path: str | os.PathLike) -> np.ndarray:
    """The stream as a read-only memory map (uint8): nothing is read until it is indexed."""
    return np.memmap(path, dtype=np.uint8, mode="r")


class RowBatcher:
    """Batches of ``seq + 1`` bytes for rows ``[row_start, row_start + row_count)`` of ``rows``.

    Row r reads region ``[r L, (r + 1) L)`` of ``stream`` with ``L = len(stream) // rows``; update
    s reads bytes ``[p, p + seq]`` of every region, with ``p = (s mod S) * seq`` and
    ``S = (L - 1) // seq`` updates per epoch. Inputs are the first ``seq`` bytes, targets the last.
    """

    def __init__(self, stream: np.ndarray, rows: int, seq: int, row_start: int = 0, row_count: int | None = None,
                 what: str = "corpus", advice: str = "use a larger corpus, --batch or --seq smaller"):
        row_count = rows - row_start if row_count is None else row_count
        if not (0 <= row_start and row_count > 0 and row_start + row_count <= rows):
            raise InputError(f"rows [{row_start}, {row_start + row_count}) do not fit in {rows} rows")
        self.stream = stream
        self.rows, self.seq = rows, seq
        self.region = len(stream) // rows
        self.steps_per_epoch = (self.region - 1) // seq if self.region > 0 else 0
        if self.steps_per_epoch < 1:
            raise InputError(
                f"the {what} has {len(stream):,} byte{'' if len(stream) == 1 else 's'}, too few for one batch: "
                f"{rows} rows of {seq} + 1 bytes need at least {rows * (seq + 1):,}; {advice}"
            )
        self.offsets = (np.arange(row_start, row_start + row_count, dtype=np.int64) * self.region)[:, None]
        self._window = np.arange(seq + 1, dtype=np.int64)[None, :]

    def epoch_and_position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs [rows, seq] uint8, targets [rows, seq] uint8, starts_epoch) for update ``step``."""
        _, position = self.epoch_and_position(step)
        window = np.asarray(self.stream[self.offsets + position * self.seq + self._window])
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:], position == 0
