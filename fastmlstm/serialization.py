"""Model files: every way a model is written to disk and read back, in one module.

Formats:
    model file (``.pt``)   a ``torch.save`` dict ``{"format": "fastmlstm.ByteLM", "version": 1,
                           "config": {...}, "state_dict": {...}}`` (:meth:`ByteLM.save`, :func:`save`)
    training checkpoint    ``train.py``'s ``ckpt-<step>.pt``: ``{"format": "fastmlstm.train", ...,
                           "model": <a model file's dict>}``; :func:`load` reads the model out of it
    released layout        the authors' directory of ``0.npy`` .. ``14.npy`` (:func:`load_openai`,
                           :func:`save_openai`; the array conversion is :mod:`fastmlstm.openai_weights`)

Loading never runs code from a file (``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``),
and any file that is not a readable model of this library raises
:class:`~fastmlstm.errors.ModelFileError` naming it and saying why.

The model classes inherit :class:`ModelFileMixin`, which gives them ``save`` and registers them by
their format name; this module never imports them, so the model code and its file code do not
depend on each other in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._atomic import atomic_save
from .errors import MissingInputError, ModelFileError
from .openai_weights import is_openai_dir, read_released, released_arrays, write_released

__all__ = ["CHECKPOINT_FORMAT", "FORMAT", "ModelFileMixin", "load", "load_model", "load_openai", "save",
           "save_openai"]

FORMAT = "fastmlstm.ByteLM"
VERSION = 1
CHECKPOINT_FORMAT = "fastmlstm.train"  # train.py's checkpoints: they carry a model file's dict under "model"

_MODEL_CLASSES: dict[str, type] = {}


class ModelFileMixin:
    """File I/O for a model class: ``save`` and construction from a record.

    A subclass sets ``FILE_FORMAT`` (the ``"format"`` string its files carry) and a ``config``
    property whose dict rebuilds it (``cls(**config)``); it is then found by :func:`load`.
    """

    FILE_FORMAT = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("FILE_FORMAT"):
            _MODEL_CLASSES[cls.FILE_FORMAT] = cls

    def to_record(self) -> dict:
        """The dict a model file holds: format, version, config and state dict."""
        return {"format": self.FILE_FORMAT, "version": VERSION, "config": dict(self.config),
                "state_dict": self.state_dict()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (config included) to ``path`` atomically; read it back with ``fastmlstm.load``.

        Example::

            >>> model.save("model.pt")                                   # doctest: +SKIP
            >>> same = fastmlstm.load("model.pt")                        # doctest: +SKIP
        """
        atomic_save(self.to_record(), path)


def _model_class(fmt: str, source: str) -> type:
    try:
        return _MODEL_CLASSES[fmt]
    except KeyError:
        raise ModelFileError(f"{source} holds a model of format {fmt!r}, which this fastmlstm does not know "
                             f"(known: {', '.join(sorted(_MODEL_CLASSES))})") from None


def _build(config: dict, state: dict, *, fmt: str = FORMAT, backend: str = "auto", device=None,
           dtype: torch.dtype | None = None, source: str):
    """A model of format ``fmt`` from its config and state dict, without a throw-away initialization."""
    cls = _model_class(fmt, source)
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ModelFileError(f"{source} has no config/state_dict dicts")
    try:
        model = cls(**config, backend=backend, device="meta")
        model.load_state_dict(state, assign=True)
    except (TypeError, RuntimeError, KeyError, AttributeError) as exc:
        # A config the class does not accept, or tensors that do not fit it.
        raise ModelFileError(f"{source} does not hold a valid {fmt} model: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    stored = next(iter(state.values())).dtype if state else torch.float32
    return model.to(device=device, dtype=dtype or stored)


def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (a :class:`~fastmlstm.ByteLM`, config included) to ``path`` atomically."""
    model.save(path)


def _read_record(path: Path, map_location) -> dict:
    if not path.exists():
        raise MissingInputError(f"no model file at {path}")
    if path.is_dir():
        hint = ("it holds the released layout: use fastmlstm.load_openai" if is_openai_dir(path)
                else "a model file is a single .pt file (for the released layout use fastmlstm.load_openai)")
        raise ModelFileError(f"{path} is a directory; {hint}")
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # empty, truncated, not a torch file, or a pickle naming a disallowed global
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no further detail"
        if path.stat().st_size == 0:
            reason = "the file is empty"
        raise ModelFileError(f"{path} is not a readable fastmlstm model file ({type(exc).__name__}: "
                             f"{reason[:300]})") from None
    if not isinstance(record, dict):
        raise ModelFileError(f"{path} is not a fastmlstm model file (it holds a {type(record).__name__})")
    if record.get("format") == CHECKPOINT_FORMAT:
        record = record.get("model")
        if not isinstance(record, dict):
            raise ModelFileError(f"{path} is a train.py checkpoint without a model in it")
    return record


def load(path: str | os.PathLike, *, map_location="cpu", backend: str = "auto"):
    """Load a model from a model file or a ``train.py`` checkpoint.

    Args:
        path: a ``.pt`` model file (:meth:`ByteLM.save`) or a ``train.py`` checkpoint ``ckpt-<step>.pt``.
        map_location: device for the tensors (as ``torch.load``'s).
        backend: recurrence backend of the returned model.

    Raises:
        MissingInputError: no file there. ModelFileError: not a readable fastmlstm model (empty,
        truncated, foreign, a newer version, or unsafe to unpickle; nothing in it is executed).

    Example::

        >>> model = fastmlstm.load("runs/demo/model.pt")              # doctest: +SKIP
        >>> model.generate("This movie was", 100, seed=0)[0]          # doctest: +SKIP
    """
    path = Path(path)
    record = _read_record(path, map_location)
    fmt = record.get("format")
    if fmt not in _MODEL_CLASSES:
        raise ModelFileError(f"{path} is not a fastmlstm model file (format {fmt!r} where "
                             f"{FORMAT!r} or {CHECKPOINT_FORMAT!r} was expected)")
    if not isinstance(record.get("version"), int) or record["version"] > VERSION:
        raise ModelFileError(f"{path} was written by a newer fastmlstm (file version {record.get('version')!r}; "
                             f"this one reads up to {VERSION}): upgrade fastmlstm")
    state = record.get("state_dict")
    # The tensors are already where map_location put them; _build keeps them there.
    return _build(record.get("config"), state, fmt=fmt, backend=backend, source=str(path))


def load_openai(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None, backend: str = "auto"):
    """Load the released weights (a directory of ``0.npy`` .. ``14.npy``) into a :class:`~fastmlstm.ByteLM`.

    Args:
        path: the directory (``model/`` in the authors' repository).
        device, dtype: of the returned model's parameters (default: CPU, float32, the files' precision).
        backend: recurrence backend of the returned model.

    Returns:
        A weight-normalized ``ByteLM(hidden_size=H, embed_size=E)`` whose forward pass computes the
        released model's equations (H = 4096, E = 64 for the released files).

    Example::

        >>> model = fastmlstm.load_openai("generating-reviews-discovering-sentiment/model")  # doctest: +SKIP
        >>> feats = fastmlstm.probe.featurize(model, ["demo!"])                               # doctest: +SKIP
        >>> feats.shape                                                                       # doctest: +SKIP
        (1, 4096)
    """
    config, state = read_released(path)
    return _build(config, state, backend=backend, device=device, dtype=dtype or torch.float32, source=str(path))


def save_openai(model, path: str | os.PathLike) -> None:
    """Write a :class:`~fastmlstm.ByteLM` in the released layout (15 float32 ``.npy`` files) to directory ``path``.

    A model without weight normalization is written with gains equal to its rows' norms, so the
    released equations reproduce its effective weights. The directory is created if needed; the
    files are written under temporary names first and renamed into place.

    Example::

        >>> fastmlstm.save_openai(model, "exported/")                          # doctest: +SKIP
        >>> fastmlstm.load_openai("exported/")                                 # doctest: +SKIP
    """
    write_released(released_arrays(model), path)


def load_model(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None, backend: str = "auto"):
    """Any model path: a model file or checkpoint, or a released-layout directory; in eval mode.

    Args:
        path: what ``--model`` takes on the command line.
        device: where the model goes (default: CUDA when available, else CPU).
        dtype: cast the parameters (default: as stored).
        backend: recurrence backend.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(path)
    if path.is_dir():
        if not is_openai_dir(path):
            raise ModelFileError(f"{path} is a directory but not the released layout (0.npy .. 14.npy); "
                                 "--model takes a fastmlstm model file, a train.py checkpoint or that layout")
        model = load_openai(path, device=device, dtype=dtype, backend=backend)
    else:
        model = load(path, map_location=device, backend=backend)
        if dtype is not None:
            model = model.to(dtype)
    return model.eval()

