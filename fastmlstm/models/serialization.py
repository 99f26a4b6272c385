"""Model files: every way a model is written to disk and read back, in one module.

Formats:
    model file (``.pt``)   a ``torch.save`` dict ``{"format": "fastmlstm.ByteLM", "version": 1,
                           "config": {...}, "state_dict": {...}}`` (:meth:`ByteLM.save`, :func:`save`)
    training checkpoint    ``train.py``'s ``ckpt-<step>.pt``: ``{"format": "fastmlstm.train", ...,
                           "model": <a model file's dict>}``; :func:`load` reads the model out of it
    released layout        the authors' directory of ``0.npy`` .. ``14.npy`` (:func:`load_openai`,
                           :func:`save_openai`; the array conversion is :mod:`fastmlstm.models.openai_weights`)
    pretrained folder      ``config.json`` (format, version, config, dtype) + ``model.safetensors`` (the
                           state dict: no pickle, read through a memory map): the Hugging Face Hub layout
                           (:meth:`ModelFileMixin.save_pretrained`, :func:`from_pretrained`)

:func:`from_pretrained` (and so every ``--model``) takes any of these paths, a registered name (its
checked download is :func:`fastmlstm.models.pretrained.download_model`) or a Hugging Face Hub id (the
transfer is :mod:`fastmlstm.models.hub`); what the files hold is decided here alone.

Loading never runs code from a file (``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``,
``safetensors.safe_open``), and any file that is not a readable model of this library raises
:class:`~fastmlstm.errors.ModelFileError` naming it and saying why. What we write carries the SHA-256
digest of its content (:mod:`fastmlstm.models._digest`: a ``"digest"`` entry of a ``.pt`` dict, the
``fastmlstm_digest`` metadata of ``model.safetensors``), checked on load: a file damaged after it was
written (a flipped byte, which neither format notices) is refused; files without one load unchecked.

The model classes inherit :class:`ModelFileMixin`, which gives them ``save`` and registers them by
their format name; this module never imports them, so the model code and its file code do not
depend on each other in a circle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .._atomic import FileSet, UnwritableError, atomic_save, committed_path, folder_lock, interrupted
from .._version import __version__
from ..errors import InputError, InputTypeError, MissingInputError, ModelFileError, out_of_memory
from ._checks import check_device, check_path, foreign_record, load_problem
from ._checks import first_line as _first_line
from ._digest import digest, digest_problem, seal
from ._state import load_state_problems, misfit, tensor_problems
from .openai_weights import is_openai_dir, read_released, released_arrays, write_released

__all__ = ["CHECKPOINT_FORMAT", "CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "ModelFileMixin", "from_pretrained",
           "is_pretrained_dir", "load", "load_model", "load_openai", "load_pretrained", "save", "save_openai",
           "save_pretrained"]

FORMAT = "fastmlstm.ByteLM"
VERSION = 1
CHECKPOINT_FORMAT = "fastmlstm.train"  # train.py's checkpoints: they carry a model file's dict under "model"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_MODEL_CLASSES: dict[str, type] = {}
logger = logging.getLogger("fastmlstm")


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
        # The digest lets a reader tell a damaged file from a good one (torch's zip does not check).
        path = check_path(path, "the path to save the model to")
        with _writing(path):
            atomic_save(seal(self.to_record()), path)

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created if needed), as one step.

        Both files are written in full before either replaces its predecessor, and they replace them
        together: if the save fails at any point (a full disk, an interruption), the folder keeps the
        previous model, byte for byte. Only these two files are written or replaced; anything else in
        the folder is left alone.

        Args:
            directory: the folder; other files in it are left alone.
            dtype: store the floating-point tensors in this dtype (``torch.bfloat16`` or
                ``"bfloat16"`` halves a float32 model; default: as they are).

        Returns:
            The folder. :func:`fastmlstm.from_pretrained` reads it back bit-exactly.

        Example::

            >>> model.save_pretrained("sentiment-bf16", dtype=torch.bfloat16)   # doctest: +SKIP
            >>> same = fastmlstm.from_pretrained("sentiment-bf16")             # doctest: +SKIP
        """
        return save_pretrained(self, directory, dtype=dtype)

    def push_to_hub(self, repo_id: str, *, dtype: torch.dtype | str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload fastmlstm model",
                    revision: str | None = None) -> str:
        """Publish the model on the Hugging Face Hub as ``config.json`` + ``model.safetensors``.

        Needs ``huggingface_hub`` (``pip install 'fastmlstm[hub]'``) and a token with write access
        (``token=``, or a prior ``huggingface-cli login``). Returns the commit's URL.

        Example::

            >>> model.push_to_hub("me/fastmlstm-sentiment", dtype="bfloat16")    # doctest: +SKIP
            >>> fastmlstm.from_pretrained("me/fastmlstm-sentiment")              # doctest: +SKIP
        """
        from .hub import hub_module, is_repo_id, upload_folder  # lazy: only pushing and Hub ids need it

        if not is_repo_id(repo_id):
            raise InputError(f"a Hugging Face Hub repository id looks like 'user/name', got {repo_id!r}")
        hub_module("push_to_hub")  # say what to install before spending time on the save
        with tempfile.TemporaryDirectory(prefix="fastmlstm-push-") as tmp:
            self.save_pretrained(tmp, dtype=dtype)
            return upload_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                                 revision=revision)


@contextlib.contextmanager
def _writing(path: Path):
    """A model save's OSError (a full disk, a read-only file system, no permission) as one
    :class:`~fastmlstm._atomic.UnwritableError` naming the user's path, not a temporary file beside
    it; the atomic writes have left what was there as it was."""
    try:
        yield
    except InputError:
        raise
    except OSError as exc:
        raise UnwritableError(f"cannot write {path}: {exc.strerror or exc} (what was there is unchanged)",
                              exc) from exc


def _parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype, or its name ("bfloat16", "torch.bfloat16")."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InputTypeError(f"dtype must be one of {', '.join(DTYPES)} (a torch.dtype or its name), got {dtype!r}")


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
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, OverflowError) as exc:
        raise ModelFileError(f"{source} holds a config that does not make a {fmt} model ({config!r:.200}): "
                             f"{_first_line(exc)}") from None
    problems = tensor_problems(model, state)
    if problems:
        raise misfit(source, config, problems)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        problems = load_state_problems(exc)
        if problems:
            raise misfit(source, config, problems) from None
        raise ModelFileError(f"{source} does not hold a valid {fmt} model: {_first_line(exc)}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{source} does not hold a valid {fmt} model: {_first_line(exc)}") from None
    # assign=True gave every parameter the stored tensor itself, in its stored dtype: a model saved
    # with tensors of different dtypes comes back as it was (casting all to one would round some).
    return model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)


def _check_model(model, what: str) -> None:
    if not isinstance(model, ModelFileMixin):
        raise InputTypeError(f"{what} takes a fastmlstm model (a fastmlstm.ByteLM), got {type(model).__name__}")


def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (a :class:`~fastmlstm.ByteLM`, config included) to ``path`` atomically."""
    _check_model(model, "fastmlstm.save")
    model.save(path)


def _read_record(path: Path, map_location) -> tuple[dict, dict]:
    """(the model's record, the whole record: the checkpoint's for a training checkpoint)."""
    if not path.exists():
        raise MissingInputError(f"no model file at {path}")
    if path.is_dir():
        hint = ("it holds the released layout: use fastmlstm.load_openai or fastmlstm.from_pretrained"
                if is_openai_dir(path) else "it holds a saved model folder: use fastmlstm.from_pretrained"
                if is_pretrained_dir(path) else "a model file is a single .pt file (for a model folder use "
                "fastmlstm.from_pretrained, or fastmlstm.load_openai for the released layout)")
        raise ModelFileError(f"{path} is a directory; {hint}")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise ModelFileError(f"{path} is not a readable fastmlstm model file: the file is empty")
    try:
        with warnings.catch_warnings():  # torch's remarks on pickle protocols are not the user's business
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 (truncated, a broken archive, text, a refused pickle: all one answer)
        if out_of_memory(exc):
            raise  # the machine's fault, not the file's
        raise ModelFileError(f"{path} is not a readable fastmlstm model file: {load_problem(exc, head)}") from None
    if not isinstance(record, dict):
        raise ModelFileError(f"{path} is not a fastmlstm model file (it holds a {type(record).__name__})")
    if "format" not in record and (foreign := foreign_record(record, head)):
        raise ModelFileError(f"{path} is not a fastmlstm model file: {foreign}")
    whole = record
    if record.get("format") == CHECKPOINT_FORMAT:
        record = record.get("model")
        if not isinstance(record, dict):
            raise ModelFileError(f"{path} is a training checkpoint without a model in it")
    return record, whole


def load(path: str | os.PathLike, *, map_location="cpu", backend: str = "auto"):
    """Load a model from a model file or a ``train.py`` checkpoint.

    Args:
        path: a ``.pt`` model file (:meth:`ByteLM.save`) or a ``train.py`` checkpoint ``ckpt-<step>.pt``.
        map_location: device for the tensors (as ``torch.load``'s).
        backend: recurrence backend of the returned model.

    Raises:
        MissingInputError: no file there. ModelFileError: not a readable fastmlstm model (empty,
        truncated, damaged (its content digest does not match), foreign, a newer version, or unsafe
        to unpickle; nothing in it is executed). InputError: a device that does not exist here.

    Example::

        >>> model = fastmlstm.load("runs/demo/model.pt")              # doctest: +SKIP
        >>> model.generate("This movie was", 100, seed=0)[0]          # doctest: +SKIP
    """
    path = check_path(path, "the model file's path")
    check_device(map_location, "map_location")  # else torch's error would blame the file
    record, whole = _read_record(path, map_location)
    fmt = record.get("format")
    if not isinstance(fmt, str) or fmt not in _MODEL_CLASSES:
        raise ModelFileError(f"{path} is not a fastmlstm model file (format {fmt!r} where "
                             f"{FORMAT!r} or {CHECKPOINT_FORMAT!r} was expected)")
    _check_version(record.get("version"), str(path))
    # After the version: a newer version may digest differently. A checkpoint's digest covers all of it.
    problem = digest_problem(whole)
    if problem:
        raise ModelFileError(f"{path} is not a readable fastmlstm model file: {problem}")
    state = record.get("state_dict")
    # The tensors are already where map_location put them; _build keeps them there.
    return _build(record.get("config"), state, fmt=fmt, backend=backend, source=str(path))


def _check_version(version, source: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{source} has a malformed version {version!r} (a whole number from 1 was expected); "
                             "the file is damaged or was not written by fastmlstm")
    if version > VERSION:
        raise ModelFileError(f"{source} was written by a newer fastmlstm (file version {version}; "
                             f"this one reads up to {VERSION}): upgrade fastmlstm")


def save_pretrained(model, directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` into ``directory``; see
    :meth:`ModelFileMixin.save_pretrained`.

    The two files are written in full, then replace the folder's two as one step
    (:class:`fastmlstm._atomic.FileSet`): a save that fails at any step leaves the previous model
    in place, byte-identical, and only these two files of the folder are ever written, moved or
    removed. The safetensors metadata repeats the config, so a folder mixing two saves' files (put
    together by hand) is refused on load, and holds the digest of the config and tensors, so a
    damaged file is too.
    """
    _check_model(model, "save_pretrained")
    dtype = _parse_dtype(dtype)
    directory = check_path(directory, "the model folder")
    if directory.exists() and not directory.is_dir():
        raise InputError(f"cannot save into {directory}: it is a file, and save_pretrained writes a folder")
    state = {name: t.detach().to(device="cpu", dtype=dtype if dtype is not None and t.is_floating_point()
                                 else t.dtype).contiguous()
             for name, t in model.state_dict().items()}
    config = dict(model.config)
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    # "format": "pt" is what other safetensors readers look for; fastmlstm's own keys are prefixed.
    metadata = {"format": "pt", "fastmlstm_format": model.FILE_FORMAT, "fastmlstm_version": str(VERSION),
                "fastmlstm_config": json.dumps(config, sort_keys=True)}
    metadata["fastmlstm_digest"] = digest(_weights_record(metadata, state))
    header = {"format": model.FILE_FORMAT, "version": VERSION, "config": config,
              "dtype": stored[0] if len(stored) == 1 else stored, "fastmlstm_version": __version__}
    with _writing(directory), FileSet(directory, what="model folder") as files:
        files.write(WEIGHTS_FILE, safetensors.torch.save(state, metadata=metadata))
        files.write(CONFIG_FILE, (json.dumps(header, indent=2) + "\n").encode())
    return directory


def _weights_record(metadata: dict, state: dict) -> dict:
    """What the digest in a safetensors file's metadata covers: the config it was written for and
    the tensors as stored (safetensors checks neither)."""
    record = {"config": metadata.get("fastmlstm_config"), "state_dict": state}
    return {**record, "digest": metadata["fastmlstm_digest"]} if "fastmlstm_digest" in metadata else record


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in storage of its own, 64-byte aligned like every torch allocation.

    safe_open's CPU tensors point into the memory-mapped file at the offsets its header gives
    (8-byte aligned only). Vectorized CPU kernels split a misaligned row differently, which changes
    the order of float additions: the loaded model would not compute bit-identically to the saved one.
    """
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def _committed(folder: Path, name: str) -> Path | None:
    """The file ``name`` of the model in ``folder``: where a save that could not finish (nor undo
    itself) left the previous model's copy, else the file itself; None if there is none."""
    try:
        return committed_path(folder, name)
    except InputError as exc:
        raise ModelFileError(str(exc)) from None


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``config.json`` and ``model.safetensors``."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [_committed(path, name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    return all(f is not None and f.is_file() for f in files)


def _read_config(config_file: Path) -> dict:
    try:
        header = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, absurdly nested
        raise ModelFileError(f"{config_file} is not a readable JSON file ({_first_line(exc)})") from None
    fmt = header.get("format") if isinstance(header, dict) else None
    if not isinstance(fmt, str) or fmt not in _MODEL_CLASSES:
        raise ModelFileError(f"{config_file} is not a fastmlstm model config (format {fmt!r:.80} where {FORMAT!r} "
                             "was expected)")
    _check_version(header.get("version"), str(config_file))
    if not isinstance(header.get("config"), dict):
        raise ModelFileError(f"{config_file} has no \"config\" object (the model's sizes)")
    return header


def _read_safetensors(weights: Path, device) -> tuple[dict, dict]:
    """(metadata, state dict) of a safetensors file, the tensors read as stored."""
    try:
        with safetensors.safe_open(str(weights), framework="pt", device=str(device or "cpu")) as f:
            metadata = f.metadata() or {}
            state = {name: _aligned(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118 (not iterable)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        # truncated, foreign, empty, a header that does not parse or describes tensors the file lacks
        raise ModelFileError(f"{weights} is not a readable safetensors file ({_first_line(exc)})") from None
    return metadata, state


def _read_folder(path: Path, device) -> tuple[dict, Path, dict, dict]:
    """(config.json's header, the weights file read, its metadata, its tensors) of a model folder,
    read under the folder's shared lock: a save into it (which holds the exclusive lock from start
    to commit) is never seen halfway, with one file of the new model and one of the old."""
    with folder_lock(path, f"fastmlstm: waiting for a save into {path} to finish", shared=True):
        config_file, weights = (_committed(path, name) for name in (CONFIG_FILE, WEIGHTS_FILE))
        for name, file in ((CONFIG_FILE, config_file), (WEIGHTS_FILE, weights)):
            if file is None or not file.is_file():
                raise MissingInputError(f"{path} has no {name} (a saved model folder holds {CONFIG_FILE} and "
                                        f"{WEIGHTS_FILE})")
        if interrupted(path):
            logger.warning("fastmlstm: the last save into %s did not finish; loading the model it held before", path)
        header = _read_config(config_file)
        return (header, weights, *_read_safetensors(weights, device))


def load_pretrained(path: str | os.PathLike, *, device=None, dtype: torch.dtype | str | None = None,
                    backend: str = "auto"):
    """Load a folder written by :meth:`ModelFileMixin.save_pretrained` (``config.json`` + ``model.safetensors``).

    The tensors are read as stored (bit-exact), straight onto ``device`` (default CPU), then cast
    to ``dtype`` if one is given. A folder whose last save failed midway and could not undo itself
    loads the model it held before (with a warning); the next save tidies it.

    Raises:
        MissingInputError: either file is missing. ModelFileError: not JSON, not a fastmlstm config,
        a newer version, an unreadable or damaged (digest) safetensors file, or tensors that do not
        fit the config. InputError: a device that does not exist here.
    """
    path = check_path(path, "the model folder")
    check_device(device)
    header, weights, metadata, state = _read_folder(path, device)
    problem = digest_problem(_weights_record(metadata, state))  # files from elsewhere carry none: no check
    if problem:
        raise ModelFileError(f"{weights} is not a readable fastmlstm model file: {problem}")
    try:
        written_for = json.loads(metadata["fastmlstm_config"]) if "fastmlstm_config" in metadata else None
    except (ValueError, RecursionError):
        written_for = "unreadable"
    if written_for is not None and written_for != header.get("config"):
        raise ModelFileError(f"{path / WEIGHTS_FILE} was written for the config {written_for!r:.200} but "
                             f"{path / CONFIG_FILE} says {header.get('config')}: the folder mixes two different saves")
    return _build(header.get("config"), state, fmt=header["format"], backend=backend, device=device,
                  dtype=_parse_dtype(dtype), source=str(path))


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
    check_device(device)
    path = check_path(path, "the released weights' folder")
    with folder_lock(path, f"fastmlstm: waiting for a save into {path} to finish", shared=True):  # see _read_folder
        config, state = read_released(path)
    return _build(config, state, backend=backend, device=device, dtype=dtype or torch.float32, source=str(path))


def save_openai(model, path: str | os.PathLike) -> None:
    """Write a :class:`~fastmlstm.ByteLM` in the released layout (15 float32 ``.npy`` files) to directory ``path``.

    A model without weight normalization is written with gains equal to its rows' norms, so the
    released equations reproduce its effective weights. The directory is created if needed. The 15
    files are written in full, then replace the folder's ``0.npy`` .. ``14.npy`` as one step: a
    failed export leaves the previous ones byte-identical; other files in the folder are left alone.

    Example::

        >>> fastmlstm.save_openai(model, "exported/")                          # doctest: +SKIP
        >>> fastmlstm.load_openai("exported/")                                 # doctest: +SKIP
    """
    _check_model(model, "save_openai")
    path = check_path(path, "the export folder")
    arrays = released_arrays(model)
    with _writing(path):
        write_released(arrays, path)


def _load_local(path: Path, *, device, dtype: torch.dtype | None, backend: str):
    if not path.is_dir():
        model = load(path, map_location=device or "cpu", backend=backend)
        return model if dtype is None else model.to(dtype)
    if _committed(path, CONFIG_FILE) or _committed(path, WEIGHTS_FILE):  # load_pretrained names a missing half
        return load_pretrained(path, device=device, dtype=dtype, backend=backend)
    if any(path.glob("*.npy")) or any(path.glob("*.npy.part")) or interrupted(path):
        # the released layout, or an unfinished download of it: load_openai names what is missing
        return load_openai(path, device=device, dtype=dtype, backend=backend)
    raise ModelFileError(f"{path} is a directory but holds neither a saved model ({CONFIG_FILE} + {WEIGHTS_FILE}) "
                         "nor the released layout (0.npy .. 14.npy)")


def from_pretrained(name_or_path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                    mirror: str | None = None, checksums: dict[str, tuple[int, str]] | None = None,
                    backend: str = "auto", dtype: torch.dtype | str | None = None, device=None,
                    revision: str | None = None, token: str | None = None, progress: bool = True):
    """Load a model by path, registered name or Hugging Face Hub id, in that order of precedence.

    Args:
        name_or_path: an existing path: a folder written by :meth:`~ModelFileMixin.save_pretrained`
            (``config.json`` + ``model.safetensors``), a folder in the released layout (``0.npy`` ..
            ``14.npy``), a ``.pt`` model file or a ``train.py`` checkpoint. Else a registered name
            (``"openai-sentiment"``: downloaded into the models folder, checked, on first use; see
            :func:`fastmlstm.models.pretrained.download_model`). Else a Hub id ``"user/repo"`` holding
            ``config.json`` + ``model.safetensors`` (needs ``pip install 'fastmlstm[hub]'``).
        root: models folder for registered names (default ``$FASTMLSTM_MODELS``, else
            ``~/.cache/fastmlstm/models``).
        mirror: fetch a registered model's files from ``<mirror>/<filename>``.
        checksums: ``{"0.npy": (size, blob_id), ...}`` replacing a registered model's published table.
        backend: recurrence backend of the returned model.
        dtype: cast the parameters (default: as stored; float32 for the released layout).
        device: where the parameters go (default CPU).
        revision, token: Hub revision (branch, tag or commit) and access token.
        progress: progress bars while downloading.

    Returns:
        The :class:`~fastmlstm.ByteLM` (in training mode, as ``torch`` modules start).

    Raises:
        MissingInputError: nothing by that name or path. ModelFileError: a file or folder that is
        not a readable model. DownloadError / ChecksumError: a failed or mismatching download.
        MissingDependencyError: a Hub id without huggingface_hub installed. InputError: an empty
        name, or a device that does not exist here.

    Example::

        >>> model = fastmlstm.from_pretrained("openai-sentiment")               # doctest: +SKIP
        >>> fastmlstm.probe.featurize(model, ["Great phone!"]).shape             # doctest: +SKIP
        (1, 4096)
    """
    dtype = _parse_dtype(dtype)
    check_device(device)  # before any download, and so that torch's error does not blame a good file
    check_path(name_or_path, "from_pretrained's name_or_path",
               "a model file or folder, a registered name or a Hugging Face Hub id")
    source = os.fspath(name_or_path)
    path = Path(source).expanduser()
    from .pretrained import MODELS, download_model  # lazy: the downloader and its tables are for names only

    registered = source in MODELS and not path.exists()
    if not registered and (mirror is not None or checksums is not None or root is not None):
        raise InputError(f"root=, mirror= and checksums= apply to registered models ({', '.join(MODELS)}), "
                         f"not to {source!r}")
    if path.exists():
        return _load_local(path, device=device, dtype=dtype, backend=backend)
    if registered:
        folder = download_model(source, root=root, mirror=mirror, checksums=checksums, recheck=False,
                                progress=progress)
        return _load_local(folder, device=device, dtype=dtype, backend=backend)
    from .hub import download_files, is_repo_id

    if is_repo_id(source):
        folder = download_files(source, [CONFIG_FILE, WEIGHTS_FILE], revision=revision, token=token)
        return _load_local(folder, device=device, dtype=dtype, backend=backend)
    raise MissingInputError(f"no model file or folder at {path} (a model is a path, a registered name such as "
                            f"{', '.join(MODELS)}, or a Hugging Face Hub id user/repo)")


def load_model(name_or_path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
               backend: str = "auto"):
    """What ``--model`` names, in eval mode: anything :func:`from_pretrained` takes.

    Args:
        name_or_path: a model file or checkpoint, a model folder (either layout), a registered
            name, or a Hugging Face Hub id.
        device: where the model goes (default: CUDA when available, else CPU).
        dtype: cast the parameters (default: as stored).
        backend: recurrence backend.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return from_pretrained(name_or_path, device=device, dtype=dtype, backend=backend).eval()
