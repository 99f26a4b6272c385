"""The evaluation sets' downloads, checked, into the data folder.

``download(name)`` downloads each of the dataset's files into ``<data>/downloads/`` (``<data>`` is
``$FASTMLSTM_DATA`` or ``~/.cache/fastmlstm/data``), checks it, and extracts the members the loaders
read into ``<data>/<folder>/`` in the layout :mod:`fastmlstm.data.datasets` expects. A dataset already
in place is not fetched again (``force=True`` does).

Checksums: where a published checksum exists it is pinned below (MD5s published with torchtext's
dataset definitions for aclImdb_v1.tar.gz and the MSRP files). For the others the SHA-256 of the
first download is recorded in ``<data>/downloads/SHA256SUMS`` and every later download of that
file must match it (trust on first use); ``checksums=`` pins any file by hand. A mismatch deletes
the download and raises :class:`ChecksumError`. A first download is trusted only once the dataset
it makes loads (checked in a scratch folder before anything is extracted or recorded): a server
that answers with something else (a login page) gets an error, the download is deleted, and the
next call fetches it again. SHA256SUMS is read as ``sha256sum`` writes it; a line that is not
``<sha256>  <filename>`` is an error naming the line, not skipped (which would trust the file anew).

Pretrained models have their own registry and download (:mod:`fastmlstm.models.pretrained`).

Every file goes through :func:`fastmlstm.data.fetch.fetch`: it streams into ``<file>.part``, resumes an interrupted
transfer with an HTTP Range request when the result will be checked, and renames the file into
place only once it matches. ``timeout=`` bounds the whole call; a stalled transfer ends by the
minimum-progress rule (``stall_bytes`` in ``stall_seconds``) either way.

The dataset's folder is written as one set (:class:`fastmlstm._atomic.FileSet`): every file is
extracted in full first, then all of them replace their predecessors in one step, so a failed or
interrupted download leaves the folder as it was (a partly extracted folder could otherwise load
with part of its examples). Files in it that the download does not write are left alone. One
download at a time writes into a data folder (a lock on ``<data>/downloads``). An archive member
the dataset would use must be a plain file whose name neither is absolute nor climbs out with
``..``; a link or such a name is refused with an error naming it.

``mirror=`` fetches every file from ``<mirror>/<filename>`` instead of its canonical URL (for a
local copy, or where a canonical host has gone offline: the SemEval 2014 SICK host is old).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from zlib import error as zlib_error

from .._atomic import FileSet, UnwritableError, atomic_write, folder_lock, make_directory, recover
from ..errors import InputError
from .datasets import DATASETS, data_dir
from .fetch import (
    DEFAULT_TIMEOUT,
    STALL_BYTES,
    STALL_SECONDS,
    ChecksumError,
    Deadline,
    DownloadError,
    check_mirror,
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



_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum's text ("  ") and binary (" *") forms


def _read_manifest(folder: Path) -> dict[str, str]:
    """``{filename: sha256}`` from ``folder/SHA256SUMS``; a line that is not ``<sha256>  <filename>``
    is an InputError naming the file and line (dropping it would quietly trust the file anew)."""
    path = folder / _MANIFEST
    if not path.is_file():
        return {}
    entries: dict[str, str] = {}
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        line = raw.decode("utf-8", "backslashreplace").strip()
        m = _MANIFEST_LINE.fullmatch(line) if line.isprintable() else None
        if not line:
            continue
        if m is None or entries.get(m[2], m[1].lower()) != m[1].lower():
            what = f"got {line[:80]!r}" if m is None else f"a second, different digest for {m[2]}"
            raise InputError(f"{path}, line {number}: expected '<sha256>  <filename>' (as sha256sum writes it), "
                             f"{what}; fix or delete the line (a file without one is trusted anew when next "
                             "downloaded)")
        entries[m[2]] = m[1].lower()
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


def _refuse_unsafe_member(archive: Path, name: str, link: bool) -> None:
    """A member the dataset would use must be a plain file with a relative name that stays inside
    the archive's tree: a link, an absolute name or one that climbs out with '..' is refused."""
    posix = name.replace("\\", "/")
    why = ("is a symbolic or hard link" if link else
           "has an absolute name" if posix.startswith("/") or re.match(r"[A-Za-z]:", posix) else
           "climbs out of the archive with '..'" if ".." in posix.split("/") else None)
    if why:
        raise InputError(f"archive member {name!r} of {archive} {why}; refused (an unsafe or damaged archive)")


def _extract(archive: Path, members: tuple[tuple[str, str], ...], folder: Path, open_file) -> int:
    """Write the archive's members that match ``members`` through ``open_file`` (the dataset folder's
    path -> a binary file to write); returns how many."""
    patterns = [(re.compile(p), dest) for p, dest in members]
    written = 0

    def place(name: str, read, link: bool = False) -> None:
        nonlocal written
        for pattern, dest in patterns:
            if pattern.search(name):
                _refuse_unsafe_member(archive, name, link)
                with open_file(_member_name(folder, pattern.sub(dest, name))) as out:
                    shutil.copyfileobj(read(), out)
                written += 1
                return

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        place(info.filename, lambda info=info: z.open(info),
                              stat.S_ISLNK(info.external_attr >> 16))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as t:
                for member in t:
                    if member.isfile() or member.issym() or member.islnk():
                        place(member.name, lambda member=member: t.extractfile(member), not member.isfile())
        else:
            raise InputError(f"{archive} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib_error) as exc:
        raise InputError(f"{archive} is a damaged archive ({type(exc).__name__}: {exc}); delete it and retry") from None
    return written


def _fetch_checked(remote: Remote, cache: Path, manifest: dict[str, str], *, force: bool, mirror: str | None,
                   checksums: dict[str, str] | None, deadline, progress: bool) -> tuple[Path, str, bool]:
    """The remote's file in ``cache``, fetched (or, if already there, checked again): (path, its
    SHA-256, whether nothing vouches for it yet: no pinned checksum and none recorded)."""
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
    return archive, sha, not pinned and not recorded


def _lay_out(name: str, archives: list[tuple[Remote, Path]], folder: Path, open_file) -> None:
    """Write the dataset's files from ``archives`` through ``open_file(name)`` (a binary file to write
    that path of ``folder``)."""
    for remote, archive in archives:
        if remote.members is None:
            with open(archive, "rb") as src, open_file(_member_name(folder, remote.destination_file
                                                                    or remote.filename)) as out:
                shutil.copyfileobj(src, out)
        elif not _extract(archive, remote.members, folder, open_file):
            raise InputError(f"{archive} holds none of the files {name} needs "
                             f"({', '.join(p for p, _ in remote.members)})")


def _check_first_use(name: str, archives: list[tuple[Remote, Path]], untrusted: list[Path], folder: Path,
                     cache: Path) -> None:
    """Trust on first use, but only what loads: lay the dataset out in a scratch folder and load it.
    If that fails, the files nothing vouched for are deleted (the next call fetches them again)
    and the error names them; the dataset folder and SHA256SUMS are left as they were."""

    @contextlib.contextmanager
    def scratch_file(relative: str):
        path = scratch / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                yield out
        except OSError as exc:  # a full disk: the writes into ``out`` fail through the yield
            raise UnwritableError(f"cannot write {path}: {exc.strerror or exc}", exc) from None

    with tempfile.TemporaryDirectory(prefix=".check-", dir=cache) as where:
        scratch = Path(where)
        try:
            _lay_out(name, archives, folder, scratch_file)
            DATASETS[name].loader(scratch)
        except InputError as exc:
            for path in untrusted:
                path.unlink(missing_ok=True)
            reason = " ".join(str(exc).replace(f"{scratch}{os.sep}", "").replace(str(scratch), folder.name).split())
            raise InputError(f"{name}: what was downloaded ({', '.join(p.name for p in untrusted)}) does not load "
                             f"({reason[:300]}); it was deleted, and nothing was recorded or extracted") from None


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
    mirror = check_mirror(mirror)
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
        archives, untrusted = [], []
        for remote in SOURCES[name]:
            archive, sha, first_use = _fetch_checked(remote, cache, manifest, force=force, mirror=mirror,
                                                     checksums=checksums, deadline=deadline, progress=progress)
            archives.append((remote, archive))
            if first_use and archive not in untrusted:
                untrusted.append(archive)
            manifest[remote.filename] = sha
        if untrusted:
            _check_first_use(name, archives, untrusted, folder, cache)
        _write_manifest(cache, manifest)  # what is recorded is checked: pinned, recorded before, or it loads
        try:
            with FileSet(folder, what="dataset folder") as files:
                _lay_out(name, archives, folder, files.open)
        except OSError as exc:  # a full disk while extracting (the folder is as it was: FileSet)
            if isinstance(exc, InputError):
                raise
            raise UnwritableError(f"cannot write the dataset folder {folder}: {exc.strerror or exc}; nothing in it "
                                  "was changed", exc) from None
    DATASETS[name].loader(folder)  # what was fetched must load
    return folder
