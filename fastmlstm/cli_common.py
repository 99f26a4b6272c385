"""What the ``fastmlstm`` commands share: loading --model, reading texts and files, checking
destinations before any work, writing files atomically and printing strict JSON.

Every problem with what the user gave raises :class:`~fastmlstm.errors.InputError` naming the flag;
:func:`fastmlstm.cli.main` prints it as one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from ._atomic import atomic_write
from .errors import InputError, MissingInputError
from .ops.registry import BACKENDS, BackendUnavailableError, resolve_backend
from .options import check

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, *, device: str | None = None, dtype: str | None = None, backend: str = "auto"):
    """A ByteLM from what --model names (see :func:`fastmlstm.models.serialization.load_model`).

    --device is checked first (a device this machine lacks is the flag's fault, not the file's),
    and --backend against the model's device before any work is done with it."""
    from .models._checks import check_device
    from .models.serialization import load_model as load

    check_device(device, "--device")
    if not path.strip():
        raise InputError("--model is empty: give a model file or folder, a registered name or a Hub id")
    model = load(path, device=device, dtype=DTYPES[dtype] if dtype else None, backend=backend)
    if backend != "auto":  # auto always runs (FASTMLSTM_BACKEND naming one that cannot: main says so)
        try:
            resolve_backend(backend, next(model.parameters()).device)
        except BackendUnavailableError as exc:
            raise InputError(f"--backend {backend}: {exc}") from None
    return model


def write_file(path: str, write, mode: str = "wb") -> None:
    """Write ``path`` atomically with ``write(file)`` (a reader, or a crash, sees the old file or the
    whole new one); an unwritable destination is the user's input, reported in one line."""
    if Path(path).is_dir():
        raise InputError(f"cannot write {path}: it is a directory (give a file name)")
    try:
        with atomic_write(path, mode) as f:
            write(f)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def finite(value):
    """``value`` with every NaN or infinity (nested in dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(record: dict) -> str:
    """One line of strict JSON (RFC 8259 has no NaN: an undefined number, e.g. the correlation of
    constant predictions, is null)."""
    return json.dumps(finite(record), allow_nan=False)


def read_file(flag: str, path: str) -> bytes:
    """The bytes of the file a flag names; a missing file, a directory or an unreadable file is one line."""
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file")
    if not file.exists():
        raise MissingInputError(f"{flag} {path}: no such file")
    try:
        return file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


# How --input lines become the model's bytes. "bytes" is what the Python API does with bytes: the
# line exactly as stored, invalid UTF-8 included (a byte model reads any byte).
INPUT_ENCODINGS = ("bytes", "utf-8", "utf-8-or-cp1252")


def _decode_line(line: bytes, number: int, encoding: str, source: str) -> bytes | str:
    if encoding == "bytes":
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        if encoding == "utf-8":
            raise InputError(f"{source}, line {number}: not valid UTF-8 (byte {exc.start}); use "
                             "--input-encoding bytes to featurize the bytes as they are") from None
    from .data.datasets import decode  # the evaluation sets' rule: such a line is Windows-1252

    return decode(line)


def argument_bytes(text: str, flag: str = "--text") -> bytes:
    """A command-line text as the bytes the shell passed (Python decoded them with surrogateescape)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError as exc:
        raise InputError(f"{flag} holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
                         "which no bytes encode") from None


def read_texts(args) -> list:
    """Texts from --text (repeatable) and --input (one text per line, '-' for stdin).

    Both give the model the bytes the user gave: --text values as the command line's bytes
    (``os.fsencode``), --input lines per ``--input-encoding`` (default: their bytes as stored).
    """
    if args.input_encoding is not None and args.input is None:
        raise InputError("--input-encoding says how to read --input's lines; give --input FILE too")
    encoding = args.input_encoding or "bytes"
    texts = [argument_bytes(t) for t in args.text or []]
    if args.input is not None:
        data = sys.stdin.buffer.read() if args.input == "-" else read_file("--input", args.input)
        if not data:
            raise InputError(f"--input {'(stdin)' if args.input == '-' else args.input} is empty: it holds "
                             "no texts (one text per line)")
        if encoding != "bytes":
            data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is the file's, not the text's
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the final line ending
        source = "stdin" if args.input == "-" else args.input
        texts += [_decode_line(line.removesuffix(b"\r"), n, encoding, source)
                  for n, line in enumerate(lines, 1)]
    return texts


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model file/checkpoint, model folder (config.json + model.safetensors, or the released "
                   "layout), registered name (openai-sentiment) or Hugging Face Hub id (user/repo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the model (default: as stored)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="recurrence backend")


def _blocking_file(path: Path) -> Path | None:
    """The file that stands where ``path`` or one of its folders should be, if any."""
    for folder in (path, *path.parents):
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder``, or None if one can: tried with a
    temporary file (permission bits do not tell: root may write anywhere, and not into /sys)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fastmlstm-write-check-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(tmp)
    return None


def check_folder(flag: str, path: str | None) -> None:
    """Refuse, before any work, a folder flag that names a file (or lies under one) or where no
    file can be created."""
    if path is None:
        return
    if (blocking := _blocking_file(Path(path))) is not None:
        raise InputError(f"{flag} {path}: {blocking} is a file, not a folder")
    existing = next(folder for folder in (Path(path), *Path(path).parents) if folder.exists())
    if (reason := _unwritable(existing)) is not None:
        raise InputError(f"cannot write {flag} {path}: no file can be created in {existing} ({reason})")


def check_file(flag: str, path: str | None) -> None:
    """Refuse, before any work, a file flag that names a directory, lies under a file or in a
    folder that does not exist or cannot be written."""
    if path is None:
        return
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    if (blocking := _blocking_file(Path(path).parent)) is not None:
        raise InputError(f"{flag} {path}: {blocking} is a file, not a folder")
    if not Path(path).parent.is_dir():  # found before the work, not when its result is to be written
        raise MissingInputError(f"cannot write {flag} {path}: its folder {Path(path).parent} does not exist")
    if (reason := _unwritable(Path(path).parent)) is not None:
        raise InputError(f"cannot write {flag} {path}: no file can be created in {Path(path).parent} ({reason})")


def unit_from_probe(path: str) -> tuple[int, int]:
    """(sentiment unit, its sign) from the JSON that ``fastmlstm probe`` printed."""
    data = read_file("--probe", path)
    try:
        record = json.loads(data)
        unit, sign = record["sentiment_unit"], record.get("unit_sign") or 1
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"--probe {path}: expected the JSON that `fastmlstm probe` prints, with a "
                         f"sentiment_unit ({type(exc).__name__}: {exc})") from None
    if unit is None:
        raise InputError(f"--probe {path}: that probe found no sentiment unit (it used no feature); give --unit")
    if sign not in (1, -1) or isinstance(sign, bool):
        raise InputError(f"--probe {path}: unit_sign must be 1 or -1, got {sign!r}")
    return check("unit", unit, f"--probe {path}: sentiment_unit"), int(sign)


def encoding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-encoding", choices=INPUT_ENCODINGS, default=None,
                   help="bytes (default): each line's bytes as stored, as the Python API treats bytes; utf-8: "
                        "an invalid line is an error; utf-8-or-cp1252: such a line is read as Windows-1252 "
                        "(the evaluation sets' rule)")
