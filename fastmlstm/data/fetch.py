"""One checked HTTP transfer, the way every download of fastmlstm goes (evaluation sets, pretrained
models): :func:`fetch` streams a URL into ``<file>.part``, resumes an interrupted transfer with an
HTTP Range request when the result will be checked, checks size and checksum (``md5``, ``sha256`` or
git's blob id), and renames the file into place only once it matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import InputError

__all__ = ["ChecksumError", "DownloadError", "fetch", "file_digest", "file_digests", "parse_checksum",
           "partial_path", "fsync_directory"]


class DownloadError(InputError):
    """A file could not be fetched (no connection, an HTTP error, a timeout); the message names the URL."""


class ChecksumError(InputError):
    """A downloaded file does not match its expected checksum."""


def _hasher(algorithm: str, size: int):
    if algorithm == "git-blob":
        # git's object id of a file: sha1 over a header that carries the size, then the bytes. It is
        # what the authors' repository tree lists, so anyone can check a file against it.
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
        return h
    return hashlib.new(algorithm)


def file_digests(path: str | os.PathLike, algorithms) -> dict[str, str]:
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
    return file_digests(path, (algorithm,))[algorithm]


_DIGEST_LENGTHS = {"md5": 32, "sha256": 64, "git-blob": 40}


def parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, value = checksum.partition(":")
    if len(value) != _DIGEST_LENGTHS.get(algorithm, -1) or not re.fullmatch(r"[0-9a-f]+", value):
        raise InputError(f"a checksum is 'md5:<hex>', 'sha256:<hex>' or 'git-blob:<hex>', got {checksum!r}")
    return algorithm, value


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
    algorithm, expected = parse_checksum(checksum) if checksum else (None, None)
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
    digests = file_digests(part, {"sha256", *([algorithm] if algorithm else [])})
    if expected is not None and digests[algorithm] != expected:
        got = part.stat().st_size
        part.unlink()
        raise ChecksumError(f"{destination.name} from {url}: {algorithm} is {digests[algorithm]} ({got} bytes), "
                            f"expected {expected}; the download was deleted")
    os.replace(part, destination)
    fsync_directory(destination.parent)
    return digests["sha256"]


def fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable where the OS allows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
