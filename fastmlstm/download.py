"""Downloads with checksums: the evaluation sets into the data folder, pretrained models into the models folder.

``download(name)`` downloads each of the dataset's files into ``<data>/downloads/`` (``<data>`` is
``$FASTMLSTM_DATA`` or ``~/.cache/fastmlstm/data``), checks it, and extracts the members the loaders
read into ``<data>/<folder>/`` in the layout :mod:`fastmlstm.datasets` expects. A dataset already
in place is not fetched again (``force=True`` does).

Checksums: where a published checksum exists it is pinned below (MD5s published with torchtext's
dataset definitions for aclImdb_v1.tar.gz and the MSRP files). For the others the SHA-256 of the
first download is recorded in ``<data>/downloads/SHA256SUMS`` and every later download of that
file must match it (trust on first use); ``checksums=`` pins any file by hand. A mismatch deletes
the download and raises :class:`ChecksumError`.

``download_model(name)`` fetches a registered pretrained model (:data:`MODELS`: the authors' released
``openai-sentiment``) into ``<models>/<name>/`` (``<models>`` is ``$FASTMLSTM_MODELS`` or
``~/.cache/fastmlstm/models``), every file checked against the git blob id its source repository
publishes. :func:`fastmlstm.from_pretrained` calls it for a registered name.

Every file goes through :func:`fetch`: it streams into ``<file>.part``, resumes an interrupted
transfer with an HTTP Range request when the result will be checked, and renames the file into
place only once it matches.

``mirror=`` fetches every file from ``<mirror>/<filename>`` instead of its canonical URL (for a
local copy, or where a canonical host has gone offline: the SemEval 2014 SICK host is old).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ._atomic import atomic_write
from .datasets import DATASETS, data_dir
from .errors import InputError

try:
    import fcntl
except ImportError:  # Windows has no advisory file locks
    fcntl = None

__all__ = ["MODELS", "SOURCES", "ChecksumError", "DownloadError", "ModelFile", "PretrainedModel", "Remote",
           "check_file", "download", "download_model", "fetch", "file_digest", "model_files", "models_dir",
           "registered_model"]


class DownloadError(InputError):
    """A file could not be fetched (no connection, an HTTP error, a timeout); the message names the URL."""


class ChecksumError(InputError):
    """A downloaded file does not match its expected checksum."""


@dataclass(frozen=True)
class Remote:
    """One file to fetch.

    Attributes:
        url: canonical http(s) URL.
        filename: name in ``<data>/downloads/`` (and under a mirror).
        members: for archives, ``(pattern, destination)`` pairs: every archive member whose path
            matches the regular expression ``pattern`` is written to the dataset folder at
            ``destination`` (a ``re.sub`` template, so groups can carry parts of the path). None
            for a plain file, which is copied to ``destination_file``.
        destination_file: where a plain file goes in the dataset folder.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"``, or None (trust on first use).
    """

    url: str
    filename: str
    members: tuple[tuple[str, str], ...] | None = None
    destination_file: str | None = None
    checksum: str | None = None


_SST = "https://raw.githubusercontent.com/openai/generating-reviews-discovering-sentiment/master/data/"
_SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"
_NB_ACL12 = _SENTEVAL + "datasmall_NB_ACL12.zip"  # Wang & Manning's MR/CR/SUBJ/MPQA, as SentEval fetches it
_SICK = "http://alt.qcri.org/semeval2014/task1/data/uploads/"

SOURCES: dict[str, tuple[Remote, ...]] = {
    "sst2": tuple(Remote(_SST + f"{s}_binary_sent.csv", f"{s}_binary_sent.csv",
                         destination_file=f"{s}_binary_sent.csv") for s in ("train", "dev", "test")),
    "imdb": (Remote("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz", "aclImdb_v1.tar.gz",
                    members=((r"^(?:.*/)?aclImdb/((?:train/(?:pos|neg|unsup)|test/(?:pos|neg))/\d+_\d+\.txt)$",
                              r"aclImdb/\1"),  # train/unsup: 50,000 unlabelled reviews, language-model text
                             (r"^(?:.*/)?aclImdb/README$", "aclImdb/README")),
                    checksum="md5:7c2ac02c03563afcf9b574c7e56c153a"),),
    "mr": (Remote(_NB_ACL12, "datasmall_NB_ACL12.zip",
                  members=((r"^(?:.*/)?rt-polarity\.(pos|neg)$", r"rt-polarity.\1"),)),),
    "cr": (Remote(_NB_ACL12, "datasmall_NB_ACL12.zip",
                  members=((r"^(?:.*/)?custrev\.(pos|neg)$", r"custrev.\1"),)),),
    "subj": (Remote(_NB_ACL12, "datasmall_NB_ACL12.zip",
                    members=((r"^(?:.*/)?subj\.(subjective|objective)$", r"subj.\1"),)),),
    "mpqa": (Remote(_NB_ACL12, "datasmall_NB_ACL12.zip",
                    members=((r"^(?:.*/)?mpqa\.(pos|neg)$", r"mpqa.\1"),)),),
    "msrp": (Remote(_SENTEVAL + "msr_paraphrase_train.txt", "msr_paraphrase_train.txt",
                    destination_file="msr_paraphrase_train.txt", checksum="md5:793daf7b6224281e75fe61c1f80afe35"),
             Remote(_SENTEVAL + "msr_paraphrase_test.txt", "msr_paraphrase_test.txt",
                    destination_file="msr_paraphrase_test.txt", checksum="md5:e437fdddb92535b820fe8852e2df8a49")),
    "sick": tuple(Remote(_SICK + f"sick_{s}.zip", f"sick_{s}.zip",
                         members=((rf"^(?:.*/)?SICK_{s}\.txt$", f"SICK_{s}.txt"),))
                  for s in ("train", "trial", "test_annotated")),
    "yelp": (Remote("https://s3.amazonaws.com/fast-ai-nlp/yelp_review_polarity_csv.tgz",
                    "yelp_review_polarity_csv.tgz",
                    members=((r"^(?:.*/)?yelp_review_polarity_csv/(train|test)\.csv$", r"\1.csv"),)),),
}

_MANIFEST = "SHA256SUMS"


def _hasher(algorithm: str, size: int):
    if algorithm == "git-blob":
        # git's object id of a file: sha1 over a header that carries the size, then the bytes. It is
        # what the authors' repository tree lists, so anyone can check a file against it.
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
        return h
    return hashlib.new(algorithm)


def _file_digests(path: str | os.PathLike, algorithms) -> dict[str, str]:
    """Hex digests of a file under each of ``algorithms`` (``md5``, ``sha256``, ``git-blob``), in one read."""
    size = os.path.getsize(path)
    hashers = {a: _hasher(a, size) for a in algorithms}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashers.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MB blocks: ``md5``, ``sha256``, or ``git-blob`` (git's blob id,
    ``sha1(b"blob <size>\\0" + content)``, the id a repository's tree lists for the file)."""
    return _file_digests(path, (algorithm,))[algorithm]


_DIGEST_LENGTHS = {"md5": 32, "sha256": 64, "git-blob": 40}


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, value = checksum.partition(":")
    if len(value) != _DIGEST_LENGTHS.get(algorithm, -1) or not re.fullmatch(r"[0-9a-f]+", value):
        raise InputError(f"a checksum is 'md5:<hex>', 'sha256:<hex>' or 'git-blob:<hex>', got {checksum!r}")
    return algorithm, value


def _read_manifest(folder: Path) -> dict[str, str]:
    path = folder / _MANIFEST
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest and name:
            entries[name] = digest
    return entries


def _write_manifest(folder: Path, entries: dict[str, str]) -> None:
    with atomic_write(folder / _MANIFEST, "w") as f:
        f.write("".join(f"{d}  {n}\n" for n, d in sorted(entries.items())))


def partial_path(destination: str | os.PathLike) -> Path:
    """Where :func:`fetch` keeps the bytes of ``destination`` until they are complete and checked."""
    destination = Path(destination)
    return destination.with_name(destination.name + ".part")


class _Interrupted(Exception):
    """A transfer that stopped before its last byte (connection cut or reset, a timeout mid-body)."""

    def __init__(self, reason: str, received: int):
        super().__init__(reason)
        self.reason, self.received = reason, received


def _open(url: str, offset: int, timeout: float):
    """The response for ``url`` from byte ``offset`` on (a Range request when ``offset`` > 0), or None
    when the server cannot serve that range."""
    headers = {"User-Agent": "fastmlstm-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None  # the partial file is no prefix of what the server has now: start over
        raise DownloadError(f"could not fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # no route, refused, timed out
        raise DownloadError(f"could not fetch {url}: {getattr(exc, 'reason', None) or exc}") from None


def _body_range(response, offset: int) -> tuple[int, int | None]:
    """(the file offset the body starts at, the whole file's size if the server says)."""
    if offset and response.status == 206:
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if m and int(m[1]) == offset:
            return offset, None if m[2] == "*" else int(m[2])
        raise DownloadError(f"could not fetch {response.url}: asked for bytes {offset}- and the server sent "
                            f"{response.headers.get('Content-Range')!r}")
    # 200: the whole file (a server that ignores Range sends all of it again, and the partial file restarts)
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _stream(response, out, *, start: int, total: int | None, size: int | None, progress: bool, label: str):
    """Copy the body into ``out`` from file offset ``start``: (bytes received, the error that cut it or
    None, whether it ran past ``size``)."""
    out.seek(start)
    out.truncate()
    received = 0
    with tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
              disable=not progress, leave=False) as bar:
        try:
            for block in iter(lambda: response.read(1 << 20), b""):
                if size is not None and start + received + len(block) > size:
                    return received, None, True  # stop early: no point fetching more of a file that cannot match
                out.write(block)
                received += len(block)
                bar.update(len(block))
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset, timed out
            return received, exc, False
        finally:
            out.flush()
            os.fsync(out.fileno())
    if total is not None and start + received < total:
        # http.client ends a body that stops short of its Content-Length as if it were complete
        return received, ConnectionError("the server closed the connection early"), False
    return received, None, False


def _transfer(url: str, part: Path, *, size: int | None, timeout: float, progress: bool, label: str) -> None:
    """Append what the server has beyond ``part``'s current bytes to ``part`` (or start it over)."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        if offset == size:
            return  # complete already (an earlier call stopped between its last byte and the check)
        offset = 0
    response = _open(url, offset, timeout)
    if response is None:
        offset, response = 0, _open(url, 0, timeout)
    with response:
        start, total = _body_range(response, offset)
        if size is not None and total is not None and total != size:  # the server says so up front
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{label} from {url}: the server has {total} bytes where {size} were expected; "
                                "nothing was kept")
        with open(part, "r+b" if part.exists() else "wb") as out:
            received, cut, too_long = _stream(response, out, start=start, total=total, size=size,
                                              progress=progress, label=label)
    got = start + received
    if too_long or (cut is None and size is not None and got != size):
        part.unlink()
        raise ChecksumError(f"{label} from {url}: the server sent {f'more than {size}' if too_long else got} "
                            f"bytes where {size} were expected; the download was deleted")
    if cut is not None:
        what = f"{type(cut).__name__}: {cut}" if str(cut) else type(cut).__name__
        raise _Interrupted(f"the connection broke after {got} of {total if total is not None else '?'} bytes "
                           f"({what[:200]})", received)


def fetch(url: str, destination: str | os.PathLike, *, checksum: str | None = None, size: int | None = None,
          timeout: float = 60.0, progress: bool = True, resume: bool | None = None, retries: int = 3) -> str:
    """Download ``url`` to ``destination`` atomically and return the file's SHA-256.

    The body streams into ``<destination>.part``; the complete file is checked against ``checksum``
    and ``size`` and only then renamed into place, so ``destination`` is either absent, the old file,
    or the new checked one. A mismatch deletes the download and raises :class:`ChecksumError`.

    Args:
        url: an http(s) URL (redirects are followed).
        destination: the file to write.
        checksum: ``"md5:<hex>"``, ``"sha256:<hex>"`` or ``"git-blob:<hex>"`` (git's blob id), or None.
        size: the exact size in bytes, or None. A longer body is cut off early and rejected.
        timeout: socket timeout in seconds.
        progress: show a progress bar.
        resume: continue a ``.part`` file left by an interrupted call with an HTTP Range request
            (a server that ignores Range sends the whole file, which then starts over). Default:
            only with a ``checksum``, so that a file stitched from two transfers is always verified.
        retries: a connection cut after some progress is resumed this many times within the call;
            after that the ``.part`` file is kept (when resumable) and the next call continues it.

    Raises:
        DownloadError: no connection, an HTTP error (404...), or a transfer cut too often; the message
            names the URL. ChecksumError: wrong size or checksum. InputError: not an http(s) URL.

    Example::

        >>> fetch("https://example.org/0.npy", "model/0.npy", size=65616,            # doctest: +SKIP
        ...       checksum="git-blob:64046c2bfcc46b04001ecc72c523fa06ea49da26")
    """
    if not re.match(r"^https?://", url):
        raise InputError(f"only http(s) URLs are fetched, got {url!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    algorithm, expected = _parse_checksum(checksum) if checksum else (None, None)
    resumable = expected is not None if resume is None else resume
    part = partial_path(destination)
    for attempt in range(retries + 1):
        if not resumable:
            part.unlink(missing_ok=True)  # only a checked file may be stitched together from two transfers
        try:
            _transfer(url, part, size=size, timeout=timeout, progress=progress, label=destination.name)
            break
        except _Interrupted as cut:
            if cut.received and attempt < retries:
                continue  # it was moving: pick up where it stopped
            kept = resumable and part.exists() and part.stat().st_size > 0
            if not kept:
                part.unlink(missing_ok=True)
            raise DownloadError(f"could not fetch {url}: {cut.reason}" + (
                f"; the {part.stat().st_size} bytes received are kept in {part} and the same command resumes "
                "from there" if kept else "")) from None
    digests = _file_digests(part, {"sha256", *([algorithm] if algorithm else [])})
    if expected is not None and digests[algorithm] != expected:
        got = part.stat().st_size
        part.unlink()
        raise ChecksumError(f"{destination.name} from {url}: {algorithm} is {digests[algorithm]} ({got} bytes), "
                            f"expected {expected}; the download was deleted")
    os.replace(part, destination)
    _fsync_directory(destination.parent)
    return digests["sha256"]


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable where the OS allows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _safe_target(folder: Path, relative: str) -> Path:
    target = (folder / relative).resolve()
    if folder.resolve() not in target.parents:
        raise InputError(f"archive member would be written outside {folder}: {relative!r}")
    return target


def _extract(archive: Path, members: tuple[tuple[str, str], ...], folder: Path) -> list[Path]:
    patterns = [(re.compile(p), dest) for p, dest in members]
    written = []

    def place(name: str, read) -> None:
        for pattern, dest in patterns:
            if pattern.search(name):
                target = _safe_target(folder, pattern.sub(dest, name))
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(target, suffix=".part") as out:
                    shutil.copyfileobj(read(), out)
                written.append(target)
                return

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    place(info.filename, lambda info=info: z.open(info))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as t:
            for member in t:
                if member.isfile():
                    place(member.name, lambda member=member: t.extractfile(member))
    else:
        raise InputError(f"{archive} is neither a zip nor a tar archive")
    return written


def download(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    mirror: str | None = None,
    force: bool = False,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch dataset ``name`` (see :data:`SOURCES`) and lay it out for :func:`fastmlstm.datasets.load`.

    Args:
        name: ``sst2``, ``imdb``, ``mr``, ``cr``, ``subj``, ``mpqa``, ``msrp``, ``sick`` or ``yelp``.
        root: the data folder (default ``$FASTMLSTM_DATA`` or ``~/.cache/fastmlstm/data``).
        mirror: base URL to fetch ``<mirror>/<filename>`` from instead of the canonical URLs.
        force: fetch again even if the dataset already loads.
        checksums: ``{filename: "sha256:<hex>" | "md5:<hex>"}`` overriding the pinned/recorded ones.
        progress: show download progress bars.
        timeout: socket timeout in seconds.

    Returns:
        The dataset's folder, ``<root>/<folder>``.

    Example::

        >>> fastmlstm.download.download("sst2")                 # doctest: +SKIP
        PosixPath('/home/me/.cache/fastmlstm/data/sst2')
    """
    if name not in SOURCES:
        known = ", ".join(SOURCES)
        raise InputError(f"no download source for {name!r}; downloadable: {known}")
    base = Path(root).expanduser() if root is not None else data_dir()
    folder = base / DATASETS[name].folder
    if not force:
        try:
            DATASETS[name].loader(folder)
            return folder
        except FileNotFoundError:
            pass
    cache = base / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(cache)
    for remote in SOURCES[name]:
        archive = cache / remote.filename
        pinned = (checksums or {}).get(remote.filename) or remote.checksum
        recorded = manifest.get(remote.filename)
        if force or not archive.is_file():
            url = f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url
            checksum = pinned or (f"sha256:{recorded}" if recorded else None)
            sha = fetch(url, archive, checksum=checksum, timeout=timeout, progress=progress)
        else:  # an earlier download: check it again before use
            sha = file_digest(archive)
            if pinned:
                algorithm, expected = _parse_checksum(pinned)
                got = sha if algorithm == "sha256" else file_digest(archive, algorithm)
                if got != expected:
                    raise ChecksumError(f"{archive}: {algorithm} is {got}, expected {expected}; delete it and retry")
            elif recorded and sha != recorded:
                raise ChecksumError(f"{archive}: sha256 is {sha}, but {recorded} was recorded when it was first "
                                    f"downloaded ({cache / _MANIFEST}); delete it and retry")
        manifest[remote.filename] = sha
        _write_manifest(cache, manifest)
        if remote.members is None:
            shutil.copyfile(archive, _safe_target(folder, remote.destination_file or remote.filename))
        elif not _extract(archive, remote.members, folder):
            raise InputError(f"{archive} holds none of the files {name} needs "
                             f"({', '.join(p for p, _ in remote.members)})")
    DATASETS[name].loader(folder)  # what was fetched must load
    return folder


# ------------------------------------------------------------------------------------------------
# Pretrained models: a registry of named models and their checked download into the models folder.

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
        entries[f.filename] = {"size": st.st_size, "blob_id": f.blob_id, "mtime_ns": st.st_mtime_ns}
    return entries


def _marker_matches(folder: Path, name: str, files: tuple[ModelFile, ...]) -> bool:
    """Whether the folder's marker says every file verified against these ids and none changed since."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return marker.get("model") == name and marker.get("files") == _marker_entries(folder, files)
    except (OSError, ValueError):
        return False


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
    timeout: float = 60.0,
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
            False trusts a marker whose sizes and modification times still match (what loading does).
        progress: progress bars on stderr.
        timeout: socket timeout in seconds.

    Returns:
        The model's folder.

    Example::

        >>> fastmlstm.download.download_model("openai-sentiment")       # doctest: +SKIP
        PosixPath('/home/me/.cache/fastmlstm/models/openai-sentiment')
    """
    model = registered_model(name)
    files = model_files(name, checksums)
    folder = models_dir(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        if not force and not recheck and _marker_matches(folder, name, files):
            return folder
        if force:
            (folder / MARKER).unlink(missing_ok=True)
        todo = list(files) if force else _recheck(folder, files, progress)
        if todo:
            (folder / MARKER).unlink(missing_ok=True)
        for f in todo:
            fetch(model.url(f.filename, mirror), folder / f.filename, checksum=f"git-blob:{f.blob_id}",
                  size=f.size if f.size_exact else None, timeout=timeout, progress=progress)
        if todo or not _marker_matches(folder, name, files):
            with atomic_write(folder / MARKER, "w") as out:
                json.dump({"model": name, "files": _marker_entries(folder, files)}, out, indent=1)
    return folder
