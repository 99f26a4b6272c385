"""What is wrong with the input of the model-file functions, said before (or instead of) torch's
own error: a path that is not one, a device that does not exist here, and why ``torch.load``
could not read a file (:mod:`fastmlstm.models.serialization` raises the errors)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import InputError, InputTypeError

__all__ = ["check_device", "check_path", "first_line", "foreign_record", "load_problem"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def check_path(path, what: str, expected: str = "a path") -> Path:
    """``path`` (a str or os.PathLike) as a Path; an InputTypeError for anything else (``None``)
    and an InputError for the empty string, which pathlib would silently read as ``.``."""
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if isinstance(text, str):
            if not text:
                raise InputError(f"{what} is an empty string; give {expected}")
            return Path(text)
    raise InputTypeError(f"{what} must be {expected} (a str or os.PathLike), got {type(path).__name__}")


def _cuda_problem(device: torch.device) -> str | None:
    if not torch.cuda.is_available():
        why = "this PyTorch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return f"asks for CUDA, which is not available here ({why}); use cpu"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"asks for CUDA device {device.index}, but there {'is' if count == 1 else 'are'} only {count}"
    return None


def check_device(device, what: str = "device") -> None:
    """Refuse, before any file is read, a device that does not exist (``"foo"``) or that this
    machine lacks (``"cuda"`` without CUDA): torch would otherwise fail inside the load, and its
    error would read as if the file were bad. Devices other than a str, int or torch.device (a
    ``map_location`` dict or function) are torch's to check."""
    if device is None or not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{what} {device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    problem = None
    if parsed.type == "cuda":
        problem = _cuda_problem(parsed)
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        problem = "asks for Apple's MPS, which is not available here; use cpu"
    if problem:
        raise InputError(f"{what} {device!r} {problem}")


# How a file begins tells what it is, to say so when torch cannot read it.
_SIGNATURES = ((b"\x93NUMPY", ("a NumPy .npy array (the released layout is a folder of them: use "
                              "fastmlstm.load_openai or fastmlstm.from_pretrained on the folder)")),
               (b"\x1f\x8b", "a gzip file"), (b"PK\x05\x06", "an empty zip archive"))


def _what_it_is(head: bytes) -> str | None:
    """What a file beginning with ``head`` is, when that shows it is no torch file; else None."""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # torch's zip archive, or its older pickle format: torch's own error says more
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            return f"it is {what}, not a model file"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return ("it is a safetensors file, not a model file (load the folder holding it and its config.json "
                "with fastmlstm.from_pretrained)")
    for cut in range(4):  # the 64 bytes may end inside a UTF-8 character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in "\t\n\r" for c in text):
            return "it holds text, not a model file"
        break
    return "it is not a torch file (a model file is what ByteLM.save writes)"


def load_problem(exc: BaseException, head: bytes) -> str:
    """Why torch could not read a file beginning with ``head``, said for this library: never
    torch's advice to turn off the check that refused it."""
    text = str(exc)
    name = re.search(r"GLOBAL ([\w.]+)", text)
    if name:
        return (f"it asks to run or build the Python object {name[1]}, which a model file never needs; "
                "it was refused and nothing in it was run")
    what = _what_it_is(head)
    if what:
        return what
    operand = re.search(r"Unsupported operand \d+", text)
    if operand or "weights_only" in text:
        return ("its pickle holds something other than tensors and plain data"
                f"{f' ({operand[0]})' if operand else ''}; nothing in it was run")
    if head.startswith(b"PK\x03\x04"):  # torch's own words for a cut file are "Invalid argument" and the like
        return f"it is a truncated or damaged torch archive ({first_line(exc).split('. This is an internal')[0]})"
    return first_line(exc)


def foreign_record(record: dict, head: bytes) -> str | None:
    """What a dict that torch read but that has no ``"format"`` is, when that can be said: torch
    reads a safetensors file too, and a bare state dict is the commonest foreign ``.pt``."""
    what = _what_it_is(head)
    if what and "safetensors" in what:
        return what
    if record and all(isinstance(k, str) for k in record) and all(isinstance(v, torch.Tensor) for v in record.values()):
        return (f"it holds a bare state dict ({len(record)} tensors, no config), not a model file (what "
                "ByteLM.save writes); build the ByteLM and call load_state_dict on it")
    return None
