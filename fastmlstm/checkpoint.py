"""Saving and loading: atomic writes, and one-call model files.

A model file is a ``torch.save`` dict ``{"format": "fastmlstm.ByteLM", "version": 1, "config": {...},
"state_dict": {...}}``; a training checkpoint (``train.py``) holds one under the key ``"model"``, so
:func:`load` reads either.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._atomic import atomic_write

__all__ = ["atomic_save", "save", "load", "FORMAT"]

FORMAT = "fastmlstm.ByteLM"
VERSION = 1


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A reader (or a crash) never sees a half-written file: either the old file or the new one.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save {path}: directory {directory} does not exist")
    with atomic_write(path) as f:
        torch.save(obj, f)


def model_record(model) -> dict:
    return {"format": FORMAT, "version": VERSION, "config": dict(model.config), "state_dict": model.state_dict()}


def save(model, path: str | os.PathLike) -> None:
    """Write a :class:`~fastmlstm.ByteLM` (config included) to ``path`` atomically."""
    atomic_save(model_record(model), path)


def model_from_record(record: dict, *, backend: str = "auto", source: str = "checkpoint"):
    from .lm import ByteLM

    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{source} is not a fastmlstm model file (format {record.get('format')!r} "
                         f"where {FORMAT!r} was expected)" if isinstance(record, dict) else
                         f"{source} is not a fastmlstm model file")
    if record.get("version", 0) > VERSION:
        raise ValueError(f"{source} was written by a newer fastmlstm (file version {record['version']})")
    state = record["state_dict"]
    dtype = state["readout.weight"].dtype
    model = ByteLM(**record["config"], backend=backend, dtype=dtype)
    model.load_state_dict(state)
    return model


def load(path: str | os.PathLike, *, map_location="cpu", backend: str = "auto"):
    """Load a :class:`~fastmlstm.ByteLM` from a model file or a ``train.py`` checkpoint.

    Example::

        >>> model = fastmlstm.load("runs/demo/model.pt")              # doctest: +SKIP
        >>> model.generate("This movie was", 100, seed=0)[0]          # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; for the released-weights layout use fastmlstm.load_openai")
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    record = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(record, dict) and "model" in record and "format" not in record:
        record = record["model"]  # a training checkpoint
    return model_from_record(record, backend=backend, source=str(path))
