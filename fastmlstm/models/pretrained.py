"""Pretrained models: a registry of named models (:data:`MODELS`: the authors' released
``openai-sentiment``) and their checked download into the models folder.

``download_model(name)`` fetches a registered model into ``<models>/<name>/`` (``<models>`` is
``$FASTMLSTM_MODELS`` or ``~/.cache/fastmlstm/models``), every file checked against the git blob id
its source repository publishes, through :func:`fastmlstm.data.fetch.fetch`.
:func:`fastmlstm.from_pretrained` calls it for a registered name.

The folder is complete when its marker ``fastmlstm-verified.json`` says so: it is removed before
any file changes and written last, once every file has verified, with each file's size, blob id,
inode and modification and change times. Loading trusts the marker only while all of these are
unchanged (the change time moves on any write, even one that restores the modification time);
anything else re-hashes the files, with one log line, and fetches what does not match. Every file
in the folder has verified against its id when it was renamed into place, so an interrupted or
failed download leaves only files of the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .._atomic import atomic_write, make_directory
from ..data.fetch import (
    DEFAULT_TIMEOUT,
    STALL_BYTES,
    STALL_SECONDS,
    ChecksumError,
    Deadline,
    DownloadError,
    check_mirror,
    fetch,
    file_digest,
)
from ..errors import InputError

try:
    import fcntl
except ImportError:  # Windows has no advisory file locks
    fcntl = None

__all__ = ["MARKER", "MODELS", "ChecksumError", "DownloadError", "ModelFile", "PretrainedModel", "check_file",
           "download_model", "model_files", "models_dir", "registered_model"]

ENV_MODELS = "FASTMLSTM_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/fastmlstm/models")
MARKER = "fastmlstm-verified.json"  # written into a model's folder once every file in it has verified
logger = logging.getLogger("fastmlstm")


@dataclass(frozen=True)
class ModelFile:
    """One file of a pretrained model.

    Attributes:
        filename: its name in the model's folder (and under a mirror).
        size: its size in bytes.
        blob_id: git's blob id of the file (``sha1(b"blob <size>\\0" + content)``), as the source
            repository's tree lists it: the authority on the file's content.
        size_exact: False where ``size`` is derived (e.g. from the array shape) rather than published;
            then only the blob id decides, and a different size is reported, not refused early.
    """

    filename: str
    size: int
    blob_id: str
    size_exact: bool = True


@dataclass(frozen=True)
class PretrainedModel:
    """A named model that :func:`download_model` fetches into ``<models>/<name>/``.

    Attributes:
        name: the registered name (what ``--model`` and ``from_pretrained`` take).
        base_url: each file is fetched from ``base_url + filename``.
        files: the files, each with its size and git blob id.
        layout: ``"released"`` (the authors' 15 ``.npy`` files) or ``"pretrained"`` (config.json +
            model.safetensors).
        description: one line for listings.
    """

    name: str
    base_url: str
    files: tuple[ModelFile, ...]
    layout: str
    description: str

    def url(self, filename: str, mirror: str | None = None) -> str:
        """Where ``filename`` is fetched from: the source, or ``<mirror>/<filename>``."""
        return f"{mirror.rstrip('/')}/{filename}" if mirror else self.base_url + filename


# Published tree of openai/generating-reviews-discovering-sentiment at 0032e4b, folder model/. The 8
# small files' sizes are the published ones; the 7 large ones' are derived from their shapes with the
# 80-byte .npy header the small ones have, so for those the blob id alone decides.
_OPENAI_TABLE = (
    ("0.npy", 65616, "64046c2bfcc46b04001ecc72c523fa06ea49da26", True),
    ("1.npy", 4194384, "48a9ce0d01b7f8394345f3587559ce8ce7e47841", False),
    ("2.npy", 67108944, "9a78f2c8f5447d0eb2c93d6f8f2632483441a072", False),
    ("3.npy", 67108944, "8dc8daffdd0317fe2062ce7730608f2d1ace7737", False),
    ("4.npy", 67108944, "90ff06565ee66227c075ea724d010a0dd87b76d9", False),
    ("5.npy", 67108944, "181109eb9fbea7529d9ccbbade234365f40914ee", False),
    ("6.npy", 1048656, "875fadb36c969edabffd35df7702c80de2fb895e", True),
    ("7.npy", 67108944, "5f946abd4eb767a0c04941eb90f8bee718ccceef", False),
    ("8.npy", 65616, "3fd585ae5e53cae155ea8b760950db24ab13424b", True),
    ("9.npy", 65616, "45d5ce521c7b10f3e6ccc702f902846e3e1d4216", True),
    ("10.npy", 65616, "068c953b192b871251d2b67f4c3c4cf76700dbf1", True),
    ("11.npy", 16464, "4266d2a2ffde97cc74cb54707f5b6fc74b924cea", True),
    ("12.npy", 16464, "6116d17dec7f722b55248e632c25be47cf13b6a4", True),
    ("13.npy", 4194384, "21a442e141da569d96d1739aa9fe3277544255ef", False),
    ("14.npy", 1104, "0f452d14e0ac21f47c4c68de3b4427dee9b5ce6a", True),
)

MODELS: dict[str, PretrainedModel] = {
    "openai-sentiment": PretrainedModel(
        name="openai-sentiment",
        base_url="https://github.com/openai/generating-reviews-discovering-sentiment/raw/master/model/",
        files=tuple(ModelFile(*row) for row in _OPENAI_TABLE),
        layout="released",
        description="Radford et al. (2017): byte multiplicative LSTM, H = 4096, E = 64, float32 (330 MB); "
                    "sentiment unit 2388"),
}


def models_dir(root: str | os.PathLike | None = None) -> Path:
    """The models folder: ``root`` if given, else ``$FASTMLSTM_MODELS``, else ``~/.cache/fastmlstm/models``."""
    if root is not None:
        return Path(root).expanduser()
    value = os.environ.get(ENV_MODELS)
    return Path(value).expanduser() if value else DEFAULT_MODELS_DIR.expanduser()


def registered_model(name: str) -> PretrainedModel:
    """The registry entry for ``name``; an :class:`InputError` listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"no registered model {name!r}; registered: {', '.join(MODELS)}") from None


def model_files(name: str, checksums: dict[str, tuple[int, str]] | None = None) -> tuple[ModelFile, ...]:
    """The files of registered model ``name``, with ``checksums`` (``{"0.npy": (size, blob_id), ...}``,
    any subset) replacing the published size and blob id of the files they name."""
    model = registered_model(name)
    overrides = dict(checksums or {})
    unknown = sorted(set(overrides) - {f.filename for f in model.files})
    if unknown:
        raise InputError(f"checksums names {', '.join(unknown)}, which {name} does not have "
                         f"({model.files[0].filename} .. {model.files[-1].filename})")
    files = []
    for f in model.files:
        if f.filename not in overrides:
            files.append(f)
            continue
        entry = overrides[f.filename]
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], int)
                or entry[0] < 0 or not isinstance(entry[1], str) or not re.fullmatch(r"[0-9a-f]{40}", entry[1])):
            raise InputError(f"checksums[{f.filename!r}] must be (size in bytes, 40-hex git blob id), got {entry!r}")
        files.append(ModelFile(f.filename, entry[0], entry[1]))
    return tuple(files)


def check_file(path: Path, expected: ModelFile) -> str | None:
    """Why the file at ``path`` is not ``expected`` (size, then git blob id), or None if it is."""
    size = path.stat().st_size
    if expected.size_exact and size != expected.size:
        return f"{size} bytes where {expected.size} were expected"
    blob = file_digest(path, "git-blob")
    if blob != expected.blob_id:
        return f"git blob id {blob} ({size} bytes) where {expected.blob_id} was expected"
    return None


def _marker_entries(folder: Path, files: tuple[ModelFile, ...]) -> dict:
    entries = {}
    for f in files:
        st = (folder / f.filename).stat()
        entries[f.filename] = {"size": st.st_size, "blob_id": f.blob_id, "mtime_ns": st.st_mtime_ns,
                               "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    return entries


def _marker_problem(folder: Path, name: str, files: tuple[ModelFile, ...]) -> str | None:
    """Why the folder's marker does not vouch for these files as they are now (None: it does)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return "it has no marker"
    except (OSError, ValueError) as exc:
        return f"its marker cannot be read ({type(exc).__name__})"
    if not isinstance(marker, dict) or marker.get("model") != name or not isinstance(marker.get("files"), dict):
        return "its marker is for another model"
    try:
        now = _marker_entries(folder, files)
    except OSError:
        return "a file is missing"
    for filename, entry in now.items():
        if marker["files"].get(filename) != entry:
            return f"{filename} changed since it was verified"
    return None


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """One download per model folder at a time (e.g. several ranks of a torchrun job loading it)."""
    if fcntl is None:  # no advisory locks (Windows): concurrent downloads are caught by the checksums
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("fastmlstm: waiting for another process that is downloading into %s", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _recheck(folder: Path, files: tuple[ModelFile, ...], progress: bool) -> list[ModelFile]:
    """Check the files already in ``folder`` offline; remove the bad ones. Returns the files to fetch."""
    missing = []
    for f in tqdm(files, desc=f"checking {folder.name}", unit="file", disable=not progress, leave=False):
        path = folder / f.filename
        problem = check_file(path, f) if path.is_file() else "missing"
        if problem is None:
            continue
        if problem != "missing":
            (folder / MARKER).unlink(missing_ok=True)  # the folder stops being verified before it changes
            path.unlink()
            logger.warning("fastmlstm: %s does not match its checksum (%s); removed, fetching it again",
                           path, problem)
        missing.append(f)
    return missing


def download_model(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    mirror: str | None = None,
    checksums: dict[str, tuple[int, str]] | None = None,
    force: bool = False,
    recheck: bool = True,
    progress: bool = True,
    timeout: float | None = None,
    stall_bytes: int = STALL_BYTES,
    stall_seconds: float = STALL_SECONDS,
) -> Path:
    """Fetch registered model ``name`` (see :data:`MODELS`) into ``<models>/<name>/`` and verify it.

    Every file is downloaded to ``<file>.part`` (resumed with an HTTP Range request if an earlier
    run was interrupted), checked against its size and git blob id, and only then renamed into
    place; a bad download is deleted and raises :class:`ChecksumError` naming the file. The marker
    ``fastmlstm-verified.json`` is written last, once all files verify, so an unfinished folder is
    never taken for a complete one (it also lacks files, so :func:`fastmlstm.load_openai` refuses it).

    Args:
        name: a registered name, e.g. ``"openai-sentiment"``.
        root: the models folder (default ``$FASTMLSTM_MODELS``, else ``~/.cache/fastmlstm/models``).
        mirror: fetch ``<mirror>/<filename>`` instead of the source URLs.
        checksums: ``{"0.npy": (size, blob_id), ...}`` replacing the published values of those files.
        force: fetch every file again.
        recheck: re-hash the files already present (offline); a bad one is removed and fetched again.
            False trusts a marker whose files are unchanged since it was written (what loading does).
        progress: progress bars on stderr.
        timeout: the deadline in seconds for the whole call (every file, retries included); None
            (default): each file gets :func:`~fastmlstm.data.fetch.fetch`'s own deadline (one hour).
            What was received is kept and the same call resumes it.
        stall_bytes, stall_seconds: a transfer receiving fewer than ``stall_bytes`` bytes in
            ``stall_seconds`` (default 16 KiB in 60 s) has stalled (see :func:`~fastmlstm.data.fetch.fetch`).

    Returns:
        The model's folder.

    Raises:
        InputError: an unknown name, bad rules, or a ``root`` that is a file or cannot be written
        (named). DownloadError, ChecksumError: as :func:`~fastmlstm.data.fetch.fetch`.

    Example::

        >>> fastmlstm.download.download_model("openai-sentiment", timeout=1800)   # doctest: +SKIP
        PosixPath('/home/me/.cache/fastmlstm/models/openai-sentiment')
    """
    model = registered_model(name)
    files = model_files(name, checksums)
    mirror = check_mirror(mirror)
    whole_call = Deadline.starting_now(timeout, stall_bytes, stall_seconds)  # the rules are checked up front
    folder = models_dir(root) / name
    created = make_directory(folder, "models folder")
    try:
        with _folder_lock(folder):
            problem = None if force or recheck else _marker_problem(folder, name, files)
            if not force and not recheck and problem is None:
                return folder
            if problem is not None and problem != "it has no marker":
                logger.warning("fastmlstm: checking %s again: %s", folder, problem)
            if force:
                (folder / MARKER).unlink(missing_ok=True)
            todo = list(files) if force else _recheck(folder, files, progress)
            if todo:
                (folder / MARKER).unlink(missing_ok=True)
            for f in todo:
                deadline = whole_call if timeout is not None else Deadline.starting_now(DEFAULT_TIMEOUT, stall_bytes,
                                                                                         stall_seconds)
                fetch(model.url(f.filename, mirror), folder / f.filename, checksum=f"git-blob:{f.blob_id}",
                      size=f.size if f.size_exact else None, progress=progress, deadline=deadline)
            if todo or _marker_problem(folder, name, files) is not None:
                with atomic_write(folder / MARKER, "w") as out:
                    json.dump({"model": name, "files": _marker_entries(folder, files)}, out, indent=1)
    except BaseException:
        if folder in created:  # a first download that failed with nothing to resume leaves no empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return folder
