"""The evaluation sets' downloads, checked, into the data folder.

``download(name)`` downloads each of the dataset's files into ``<data>/downloads/`` (``<data>`` is
``$FASTMLSTM_DATA`` or ``~/.cache/fastmlstm/data``), checks it, and extracts the members the loaders
read into ``<data>/<folder>/`` in the layout :mod:`fastmlstm.data.datasets` expects. A dataset already
in place is not fetched again (``force=True`` does).

Checksums: where a published checksum exists it is pinned below (MD5s published with torchtext's
dataset definitions for aclImdb_v1.tar.gz and the MSRP files). For the others the SHA-256 of the
first download is recorded in ``<data>/downloads/SHA256SUMS`` and every later download of that
file must match it (trust on first use); ``checksums=`` pins any file by hand. A mismatch deletes
the download and raises :class:`ChecksumError`.

Pretrained models have their own registry and download (:mod:`fastmlstm.models.pretrained`).

Every file goes through :func:`fastmlstm.data.fetch.fetch`: it streams into ``<file>.part``, resumes an interrupted
transfer with an HTTP Range request when the result will be checked, and renames the file into
place only once it matches. ``timeout=`` bounds the whole call; a stalled transfer ends by the
minimum-progress rule (``stall_bytes`` in ``stall_seconds``) either way.

The dataset's folder is written as one set (:class:`fastmlstm._atomic.FileSet`): every file is
extracted in full first, then all of them replace their predecessors in one step, so a failed or
interrupted download leaves the folder as it was (a partly extracted folder could otherwise load
with part of its examples). Files in it that the download does not write are left alone. One
download at a time writes into a data folder (a lock on ``<data>/downloads``).

``mirror=`` fetches every file from ``<mirror>/<filename>`` instead of its canonical URL (for a
local copy, or where a canonical host has gone offline: the SemEval 2014 SICK host is old).
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from zlib import error as zlib_error

from .._atomic import FileSet, atomic_write, folder_lock, make_directory, recover
from ..errors import InputError
from .datasets import DATASETS, data_dir
from .fetch import (
    DEFAULT_TIMEOUT,
    STALL_BYTES,
    STALL_SECONDS,
    ChecksumError,
    Deadline,
    DownloadError,
    fetch,
    file_digest,
    parse_checksum,
)

__all__ = ["SOURCES", "ChecksumError", "DownloadError", "Remote", "download", "fetch", "file_digest"]


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


def _member_name(folder: Path, relative: str) -> str:
    """``relative`` as a path inside ``folder`` (posix form), refusing one that would leave it."""
    target = (folder / relative).resolve()
    if folder.resolve() not in target.parents:
        raise InputError(f"archive member would be written outside {folder}: {relative!r}")
    return target.relative_to(folder.resolve()).as_posix()


def _extract(archive: Path, members: tuple[tuple[str, str], ...], folder: Path, files: FileSet) -> int:
    """Write the archive's members that match ``members`` into the set ``files``; returns how many."""
    patterns = [(re.compile(p), dest) for p, dest in members]
    written = 0

    def place(name: str, read) -> None:
        nonlocal written
        for pattern, dest in patterns:
            if pattern.search(name):
                with files.open(_member_name(folder, pattern.sub(dest, name))) as out:
                    shutil.copyfileobj(read(), out)
                written += 1
                return

    try:
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
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib_error) as exc:
        raise InputError(f"{archive} is a damaged archive ({type(exc).__name__}: {exc}); delete it and retry") from None
    return written


def _fetch_checked(remote: Remote, cache: Path, manifest: dict[str, str], *, force: bool, mirror: str | None,
                   checksums: dict[str, str] | None, deadline, progress: bool) -> Path:
    """The remote's file in ``cache``, fetched (or, if already there, checked again) and recorded."""
    archive = cache / remote.filename
    pinned = (checksums or {}).get(remote.filename) or remote.checksum
    recorded = manifest.get(remote.filename)
    if force or not archive.is_file():
        url = f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url
        checksum = pinned or (f"sha256:{recorded}" if recorded else None)
        sha = fetch(url, archive, checksum=checksum, progress=progress, deadline=deadline())
    else:  # an earlier download: check it again before use
        sha = file_digest(archive)
        if pinned:
            algorithm, expected = parse_checksum(pinned)
            got = sha if algorithm == "sha256" else file_digest(archive, algorithm)
            if got != expected:
                raise ChecksumError(f"{archive}: {algorithm} is {got}, expected {expected}; delete it and retry")
        elif recorded and sha != recorded:
            raise ChecksumError(f"{archive}: sha256 is {sha}, but {recorded} was recorded when it was first "
                                f"downloaded ({cache / _MANIFEST}); delete it and retry")
    manifest[remote.filename] = sha
    _write_manifest(cache, manifest)
    return archive


def download(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    mirror: str | None = None,
    force: bool = False,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
    timeout: float | None = None,
    stall_bytes: int = STALL_BYTES,
    stall_seconds: float = STALL_SECONDS,
) -> Path:
    """Fetch dataset ``name`` (see :data:`SOURCES`) and lay it out for :func:`fastmlstm.datasets.load`.

    Args:
        name: ``sst2``, ``imdb``, ``mr``, ``cr``, ``subj``, ``mpqa``, ``msrp``, ``sick`` or ``yelp``.
        root: the data folder (default ``$FASTMLSTM_DATA`` or ``~/.cache/fastmlstm/data``).
        mirror: base URL to fetch ``<mirror>/<filename>`` from instead of the canonical URLs.
        force: fetch again even if the dataset already loads.
        checksums: ``{filename: "sha256:<hex>" | "md5:<hex>"}`` overriding the pinned/recorded ones.
        progress: show download progress bars.
        timeout: the deadline in seconds for the whole call (every file, retries included); None
            (default): each file gets :func:`~fastmlstm.data.fetch.fetch`'s own deadline (one hour).
        stall_bytes, stall_seconds: a transfer receiving fewer than ``stall_bytes`` bytes in
            ``stall_seconds`` (default 16 KiB in 60 s) has stalled (see :func:`~fastmlstm.data.fetch.fetch`).

    Returns:
        The dataset's folder, ``<root>/<folder>``.

    Raises:
        InputError: an unknown name, or a ``root`` that is a file or cannot be written (named).
        DownloadError, ChecksumError: as :func:`~fastmlstm.data.fetch.fetch`.

    Example::

        >>> fastmlstm.download.download("sst2", timeout=600)     # doctest: +SKIP
        PosixPath('/home/me/.cache/fastmlstm/data/sst2')
    """
    if name not in SOURCES:
        known = ", ".join(SOURCES)
        raise InputError(f"no download source for {name!r}; downloadable: {known}")
    whole_call = Deadline.starting_now(timeout, stall_bytes, stall_seconds)  # the rules are checked up front

    def deadline() -> Deadline:  # the call's one clock, or each file its own default one
        return whole_call if timeout is not None else Deadline.starting_now(DEFAULT_TIMEOUT, stall_bytes,
                                                                             stall_seconds)

    base = Path(root).expanduser() if root is not None else data_dir()
    folder = base / DATASETS[name].folder
    if folder.is_dir():
        recover(folder)
    if not force:
        try:
            DATASETS[name].loader(folder)
            return folder
        except FileNotFoundError:
            pass
    cache = base / "downloads"
    make_directory(cache, "download folder")
    with folder_lock(cache, f"fastmlstm: waiting for another process that is downloading into {base}"):
        manifest = _read_manifest(cache)
        archives = [(remote, _fetch_checked(remote, cache, manifest, force=force, mirror=mirror, checksums=checksums,
                                            deadline=deadline, progress=progress)) for remote in SOURCES[name]]
        with FileSet(folder, what="dataset folder") as files:
            for remote, archive in archives:
                if remote.members is None:
                    with open(archive, "rb") as src, files.open(
                            _member_name(folder, remote.destination_file or remote.filename)) as out:
                        shutil.copyfileobj(src, out)
                elif not _extract(archive, remote.members, folder, files):
                    raise InputError(f"{archive} holds none of the files {name} needs "
                                     f"({', '.join(p for p, _ in remote.members)})")
    DATASETS[name].loader(folder)  # what was fetched must load
    return folder
