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
place only once it matches.

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

from .._atomic import atomic_write
from ..errors import InputError
from .datasets import DATASETS, data_dir
from .fetch import ChecksumError, DownloadError, fetch, file_digest, parse_checksum

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
                algorithm, expected = parse_checksum(pinned)
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
