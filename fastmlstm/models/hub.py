"""The Hugging Face Hub, through the optional ``huggingface_hub`` package (``pip install 'fastmlstm[hub]'``).

Only the transfer lives here: :func:`download_files` fetches a repository's files into the Hub's
own cache (``$HF_HOME``, default ``~/.cache/huggingface``) and :func:`upload_folder` publishes a
folder. What the files hold (``config.json`` + ``model.safetensors``) is
:mod:`fastmlstm.models.serialization`'s business; it calls these for ``from_pretrained("user/repo")`` and
``ByteLM.push_to_hub``. ``huggingface_hub`` is imported on first use only, through
:func:`fastmlstm.errors.require`, so that without it everything else works and these say what to
install.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..data.fetch import DownloadError
from ..errors import InputError, MissingInputError, require

__all__ = ["UploadError", "download_files", "hub_module", "is_repo_id", "upload_folder"]


class UploadError(InputError):
    """The Hub refused an upload (no token, no write access) or could not be reached."""

# The Hub's rule for "namespace/name": letters, digits, '-', '_', '.'; no '--' or '..'; neither part
# starts or ends with '-' or '.'; at most 96 characters.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")
# A name ending like a model file is a path that is not there, not a repository.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".npy", ".json", ".safetensors")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repository id (``user/repo``) rather than a file path."""
    return (bool(_REPO_ID.fullmatch(name)) and len(name) <= 96 and "--" not in name and ".." not in name
            and not name.lower().endswith(_FILE_SUFFIXES))


def hub_module(feature: str):
    """huggingface_hub, or a MissingDependencyError saying how to install it (for ``feature``)."""
    return require("huggingface_hub", extra="hub", feature=feature)


def _hub_errors(hf) -> tuple[type, ...]:
    """What a huggingface_hub call raises for a missing repo or file, a refused token or a broken
    connection: its HTTP error class (an OSError subclass in some versions, not in others), its
    ValueError-based validation errors, and OSError for the network."""
    errors: list[type] = [OSError, ValueError]
    for module in (getattr(hf, "errors", None), getattr(hf, "utils", None)):
        cls = getattr(module, "HfHubHTTPError", None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def download_files(repo_id: str, filenames: list[str], *, revision: str | None = None,
                   token: str | bool | None = None) -> Path:
    """Fetch ``filenames`` of Hub model repository ``repo_id`` (at ``revision``) into the Hub's cache.

    Returns:
        The local snapshot folder holding them.

    Raises:
        InputError: ``repo_id`` is not ``user/name``, or ``filenames`` is not a non-empty list of
            relative file names (checked before huggingface_hub is needed).
        MissingDependencyError: huggingface_hub is not installed (the message says what to install).
        DownloadError: the repository, revision or a file is not there, access is refused, or the
            network fails; the message names the repository.
    """
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise InputError(f"a Hugging Face Hub repository id looks like 'user/name', got {repo_id!r}")
    if (not isinstance(filenames, (list, tuple)) or not filenames
            or not all(isinstance(f, str) and f and not f.startswith("/") and ".." not in f.split("/")
                       for f in filenames)):
        raise InputError(f"filenames must be a non-empty list of file names inside {repo_id!r}, got {filenames!r}")
    hf = hub_module(f"loading {repo_id!r} from the Hugging Face Hub")
    folders = set()
    for filename in filenames:
        try:
            path = hf.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, token=token)
        except _hub_errors(hf) as exc:
            raise DownloadError(f"could not fetch {filename} of {repo_id!r} from the Hugging Face Hub "
                                f"({_reason(exc)})") from exc
        folders.add(Path(path).parent)
    if len(folders) != 1:  # one revision's files share one snapshot folder; anything else is not one model
        raise DownloadError(f"the files of {repo_id!r} came from different snapshots: {sorted(map(str, folders))}")
    return folders.pop()


def upload_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                  token: str | None = None, commit_message: str = "Upload fastmlstm model",
                  revision: str | None = None) -> str:
    """Create model repository ``repo_id`` if needed and upload ``folder``'s files to it as one commit.

    Returns:
        The URL of the commit (or of the repository, for versions that do not report it).

    Raises:
        InputError: ``repo_id`` is not ``user/name``; MissingInputError: ``folder`` is not a folder.
        MissingDependencyError: huggingface_hub is not installed.
        UploadError: the Hub refused the upload (no token, no write access) or the network failed.
    """
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise InputError(f"a Hugging Face Hub repository id looks like 'user/name', got {repo_id!r}")
    if not Path(folder).is_dir():
        raise MissingInputError(f"no folder to upload at {folder}")
    hf = hub_module("push_to_hub")
    try:
        hf.create_repo(repo_id, private=private, token=token, exist_ok=True)
        info = hf.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                token=token, revision=revision)
    except _hub_errors(hf) as exc:
        raise UploadError(f"could not upload to {repo_id!r} on the Hugging Face Hub ({_reason(exc)})") from exc
    return str(getattr(info, "commit_url", None) or info)
