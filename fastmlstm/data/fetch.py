"""One checked HTTP transfer, the way every download of fastmlstm goes (evaluation sets, pretrained
models): :func:`fetch` streams a URL into ``<file>.part``, resumes an interrupted transfer with an
HTTP Range request when the result will be checked, checks size and checksum (``md5``, ``sha256`` or
git's blob id), and renames the file into place only once it matches.

Every transfer ends: an overall deadline (``timeout``, default :data:`DEFAULT_TIMEOUT`) bounds the
whole call, retries included, and a minimum-progress rule ends a stalled transfer (fewer than
``stall_bytes`` received in any ``stall_seconds``; no byte at all for ``stall_seconds`` is one
too). Both apply to every byte a connection reads, the status line and headers as well as the
body, so a server that trickles its headers cannot hold a call past its deadline. The body is read
in pieces of at most 64 KiB as they arrive, so every byte received is on disk when a transfer
stops; a stall is retried from where it stopped (HTTP Range), and what a checked transfer received
is kept in ``<file>.part`` for the next call to resume. Two calls for one destination (threads or
processes) take turns (a lock file beside it, removed afterwards).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows has no advisory file locks
    fcntl = None

from .._atomic import DirectoryInTheWayError, UnwritableError, fsync_directory, make_directory
from ..errors import InputError

__all__ = ["DEFAULT_TIMEOUT", "STALL_BYTES", "STALL_SECONDS", "ChecksumError", "Deadline", "DownloadError",
           "check_mirror", "fetch", "file_digest", "file_digests", "fsync_directory", "parse_checksum", "partial_path"]

# One file's default deadline: a 67 MB file (the released model's largest) needs 19 kB/s to make it.
DEFAULT_TIMEOUT = 3600.0
# A stall: fewer than STALL_BYTES in STALL_SECONDS (about 270 bytes/s), or no byte for STALL_SECONDS.
STALL_BYTES = 16 * 1024
STALL_SECONDS = 60.0
_PIECE = 64 * 1024


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


@dataclass(frozen=True)
class Deadline:
    """When a download must end and what counts as a stall; one is shared by all files of a call.

    Attributes:
        timeout: seconds from ``start`` for everything (connections, retries, bodies); None: no deadline.
        stall_bytes, stall_seconds: a transfer receiving fewer than ``stall_bytes`` bytes in any
            ``stall_seconds`` (or none at all for ``stall_seconds``) has stalled.
        start: ``time.monotonic()`` when the clock started.
    """

    timeout: float | None = DEFAULT_TIMEOUT
    stall_bytes: int = STALL_BYTES
    stall_seconds: float = STALL_SECONDS
    start: float = 0.0

    @classmethod
    def starting_now(cls, timeout: float | None = DEFAULT_TIMEOUT, stall_bytes: int = STALL_BYTES,
                     stall_seconds: float = STALL_SECONDS) -> Deadline:
        """The rules, checked (one InputError naming the bad value), with the clock started now."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise InputError(f"timeout must be a positive number of seconds (or None for no deadline), got {timeout!r}")
        if isinstance(stall_bytes, bool) or not isinstance(stall_bytes, int) or stall_bytes < 0:
            raise InputError(f"stall_bytes must be a whole number of bytes >= 0, got {stall_bytes!r}")
        if (isinstance(stall_seconds, bool) or not isinstance(stall_seconds, (int, float))
                or not math.isfinite(stall_seconds) or stall_seconds <= 0):
            raise InputError(f"stall_seconds must be a positive number of seconds, got {stall_seconds!r}")
        return cls(timeout, stall_bytes, float(stall_seconds), time.monotonic())

    def remaining(self) -> float | None:
        return None if self.timeout is None else self.start + self.timeout - time.monotonic()

    def wait_limit(self) -> float:
        """How long one network operation may block: the stall time, less if the deadline is nearer."""
        remaining = self.remaining()
        return self.stall_seconds if remaining is None else max(0.001, min(self.stall_seconds, remaining))

    def passed(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def describe(self) -> str:
        return f"the {self.timeout:g} s time limit (timeout, --timeout) ran out"


class _Interrupted(Exception):
    """A transfer that stopped before its last byte (connection cut or reset, a stall, the deadline)."""

    def __init__(self, reason: str, received: int, final: bool = False):
        super().__init__(reason)
        self.reason, self.received, self.final = reason, received, final


class _Stalled(TimeoutError):
    """A connection that broke the minimum-progress rule or ran into the deadline (the message says which)."""


class _MeteredReader(io.RawIOBase):
    """The reading side of one connection, every byte of it (status line, headers, body): each read
    waits at most :meth:`Deadline.wait_limit`, none starts after the deadline, and a read that ends
    a ``stall_seconds`` window with fewer than ``stall_bytes`` in it raises :class:`_Stalled`."""

    def __init__(self, sock, deadline: Deadline):
        super().__init__()
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline
        self._window_start, self._window_bytes = time.monotonic(), 0
        self._stalled: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        deadline = self._deadline
        if self._stalled:  # found by the last read, whose bytes went to the caller first
            raise _Stalled(self._stalled)
        if deadline.passed():
            raise _Stalled(deadline.describe())
        self._sock.settimeout(deadline.wait_limit())
        try:
            n = self._raw.readinto(buffer)
        except (TimeoutError, socket.timeout):  # socket.timeout: not yet a TimeoutError on Python 3.9
            raise _Stalled(deadline.describe() if deadline.passed() else
                           f"stalled: no byte for {deadline.stall_seconds:g} s") from None
        now = time.monotonic()
        self._window_bytes += n or 0
        if n and now - self._window_start >= deadline.stall_seconds:
            if self._window_bytes < deadline.stall_bytes:
                self._stalled = (f"stalled: {self._window_bytes} bytes in {round(now - self._window_start, 1):g} s, "
                                 f"fewer than the {deadline.stall_bytes} in {deadline.stall_seconds:g} s required")
            self._window_start, self._window_bytes = now, 0
        return n

    def close(self) -> None:
        self._raw.close()  # the socket closes once http.client has let go of it too
        super().close()


class _MeteredSocket:
    """A connected socket whose reader is a :class:`_MeteredReader`; everything else is the socket's."""

    def __init__(self, sock, deadline: Deadline):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "r", *args, **kwargs):
        if mode != "rb":
            return self._sock.makefile(mode, *args, **kwargs)
        return io.BufferedReader(_MeteredReader(self._sock, self._deadline))

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _Metering:
    """Mixed into urllib's HTTP(S) handlers: every connection they open reads through a meter."""

    deadline: Deadline

    def do_open(self, http_class, req, **kwargs):
        def connection(*args, **kw):
            conn = http_class(*args, **kw)
            plain_connect = conn.connect

            def connect():
                plain_connect()
                conn.sock = _MeteredSocket(conn.sock, self.deadline)

            conn.connect = connect
            return conn

        return super().do_open(connection, req, **kwargs)


class _HTTPHandler(_Metering, urllib.request.HTTPHandler):
    pass


_HANDLERS = [_HTTPHandler]
if hasattr(urllib.request, "HTTPSHandler"):  # Python built with ssl
    class _HTTPSHandler(_Metering, urllib.request.HTTPSHandler):
        pass

    _HANDLERS.append(_HTTPSHandler)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects as urllib follows them, but never from https to plain http (a first download that
    no checksum vouches for would then travel unencrypted)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.full_url.lower().startswith("https://") and not newurl.lower().startswith("https://"):
            raise DownloadError(f"could not fetch {req.full_url}: the server redirected it from https to "
                                f"{_one_line(newurl)}; refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _one_line(reason) -> str:
    """A server's text (a reason phrase, a bad status line) as one line of at most 300 characters."""
    return " ".join(str(reason).split())[:300]


def _open(url: str, offset: int, deadline: Deadline):
    """The response for ``url`` from byte ``offset`` on (a Range request when ``offset`` > 0), or None
    when the server cannot serve that range. Every read, headers included, obeys ``deadline``."""
    headers = {"User-Agent": "fastmlstm-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    handlers = [cls() for cls in _HANDLERS]
    for handler in handlers:
        handler.deadline = deadline
    try:
        opener = urllib.request.build_opener(*handlers, _NoDowngrade)
        return opener.open(urllib.request.Request(url, headers=headers), timeout=deadline.wait_limit())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None  # the partial file is no prefix of what the server has now: start over
        raise DownloadError(f"could not fetch {url}: HTTP {exc.code} {_one_line(exc.reason)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # no route, refused, timed out
        raise DownloadError(f"could not fetch {url}: {_one_line(getattr(exc, 'reason', None) or exc)}") from None


def _respond(url: str, offset: int, deadline: Deadline):
    """(response, the file offset its body starts at, the whole file's size if the server says):
    from byte ``offset``, or from byte 0 where the server cannot serve that range (416, or a 206
    that starts elsewhere: the partial file then restarts, and the checksum judges the result)."""
    response = _open(url, offset, deadline) if offset else None
    if response is not None:
        where = _body_range(response, offset)
        if where is not None:
            return (response, *where)
        response.close()
    response = _open(url, 0, deadline)
    return (response, *_body_range(response, 0))


def _body_range(response, offset: int) -> tuple[int, int | None] | None:
    """(the file offset the body starts at, the whole file's size if the server says); None for a
    206 to a Range request that starts elsewhere."""
    if response.status == 206:  # a part of the file: it must start at the byte asked for (0 without Range)
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if m and int(m[1]) == offset:
            return offset, None if m[2] == "*" else int(m[2])
        if offset:
            return None
        response.close()
        raise DownloadError(f"could not fetch {response.url}: asked for the whole file and the server sent "
                            f"{_one_line(response.headers.get('Content-Range'))!r}")
    # 200: the whole file (a server that ignores Range sends all of it again, and the partial file restarts)
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _stream(response, out, *, start: int, total: int | None, size: int | None, progress: bool, label: str):
    """Copy the body into ``out`` from file offset ``start``: (bytes received, why it stopped short
    (an exception) or None, whether it ran past ``size``). Reads what has arrived, at most 64 KiB at a
    time, so that nothing received is lost when the transfer stops."""
    out.seek(start)
    out.truncate()
    received = 0
    with tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
              disable=not progress, leave=False) as bar:
        try:
            while True:
                block = response.read1(_PIECE)  # bounded by the deadline and the stall rule (_MeteredReader)
                if not block:
                    break
                if size is not None and start + received + len(block) > size:
                    return received, None, True  # stop early: no point fetching more of a file that cannot match
                _write(out, block)
                received += len(block)
                bar.update(len(block))
        except UnwritableError:
            raise
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset, a stall, the deadline
            return received, exc, False
        finally:
            _write(out, None)  # flush and fsync: a full disk may only show here
    if total is not None and start + received < total:
        # http.client ends a body that stops short of its Content-Length as if it were complete
        return received, ConnectionError("the server closed the connection early"), False
    return received, None, False


def _write(out, block: bytes | None) -> None:
    """Write ``block`` to the partial file ``out`` (None: flush and fsync it); a failure (a full
    disk, a read-only file system) is an :class:`UnwritableError` naming the file, not a network error."""
    try:
        if block is None:
            out.flush()
            os.fsync(out.fileno())
        else:
            out.write(block)
    except OSError as exc:
        raise UnwritableError(f"cannot write {out.name}: {exc.strerror or exc}", exc) from None


def _transfer(url: str, part: Path, *, size: int | None, deadline: Deadline, progress: bool, label: str) -> None:
    """Append what the server has beyond ``part``'s current bytes to ``part`` (or start it over)."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        if offset == size:
            return  # complete already (an earlier call stopped between its last byte and the check)
        offset = 0
    response, start, total = _respond(url, offset, deadline)
    with response:
        if size is not None and total is not None and total != size:  # the server says so up front
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{label} from {url}: the server has {total} bytes where {size} were expected; "
                                "nothing was kept")
        try:
            out = open(part, "r+b" if part.exists() else "wb")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            raise UnwritableError(f"cannot write {part}: {exc.strerror or exc}", exc) from None
        with out:
            received, cut, too_long = _stream(response, out, start=start, total=total, size=size,
                                              progress=progress, label=label)
    got = start + received
    if too_long or (cut is None and size is not None and got != size):
        part.unlink()
        raise ChecksumError(f"{label} from {url}: the server sent {f'more than {size}' if too_long else got} "
                            f"bytes where {size} were expected; the download was deleted")
    if cut is not None:
        what = str(cut) if isinstance(cut, TimeoutError) and str(cut) else (
            f"{type(cut).__name__}: {cut}" if str(cut) else type(cut).__name__)
        stopped = "stopped" if isinstance(cut, TimeoutError) else "the connection broke"
        raise _Interrupted(f"{stopped} after {got} of {total if total is not None else '?'} bytes "
                           f"({what[:200]})", received, final=deadline.passed())


def check_mirror(mirror) -> str | None:
    """``mirror=`` of the downloads: None (the canonical URLs) or an http(s) base URL; an empty or
    other value is an InputError (an empty one fetched from the canonical hosts in silence)."""
    if mirror is None:
        return None
    if not isinstance(mirror, str) or not re.match(r"^https?://[^/\s]", mirror.strip()):
        raise InputError(f"mirror must be an http(s) base URL (files are fetched from <mirror>/<filename>), "
                         f"got {mirror!r}")
    return mirror.strip()


def fetch(url: str, destination: str | os.PathLike, *, checksum: str | None = None, size: int | None = None,
          timeout: float | None = DEFAULT_TIMEOUT, stall_bytes: int = STALL_BYTES,
          stall_seconds: float = STALL_SECONDS, progress: bool = True, resume: bool | None = None, retries: int = 3,
          deadline: Deadline | None = None) -> str:
    """Download ``url`` to ``destination`` atomically and return the file's SHA-256.

    The body streams into ``<destination>.part``; the complete file is checked against ``checksum``
    and ``size`` and only then renamed into place, so ``destination`` is either absent, the old file,
    or the new checked one. A mismatch deletes the download and raises :class:`ChecksumError`.

    Args:
        url: an http(s) URL (redirects are followed).
        destination: the file to write.
        checksum: ``"md5:<hex>"``, ``"sha256:<hex>"`` or ``"git-blob:<hex>"`` (git's blob id), or None.
        size: the exact size in bytes, or None. A longer body is cut off early and rejected.
        timeout: the deadline in seconds for the whole call (connecting, every retry, the body);
            None: none. Default one hour (:data:`DEFAULT_TIMEOUT`).
        stall_bytes, stall_seconds: the minimum-progress rule: fewer than ``stall_bytes`` bytes
            received in ``stall_seconds`` (default 16 KiB in 60 s), or no byte at all for
            ``stall_seconds``, is a stall. A stall after some progress is retried (within
            ``retries`` and the deadline) from where it stopped.
        progress: show a progress bar.
        resume: continue a ``.part`` file left by an interrupted call with an HTTP Range request
            (a server that ignores Range sends the whole file, which then starts over). Default:
            only with a ``checksum``, so that a file stitched from two transfers is always verified.
        retries: a transfer cut or stalled after some progress is resumed this many times within
            the call; after that (or at the deadline) the ``.part`` file is kept (when resumable) and
            the next call continues it.
        deadline: a :class:`Deadline` already running (several files sharing one ``timeout``);
            it replaces ``timeout``, ``stall_bytes`` and ``stall_seconds``.

    Raises:
        DownloadError: no connection, an HTTP error (404...; not retried, a Retry-After is not
            waited for), a transfer cut too often, a stall, the deadline (also while another call
            for the same destination holds it), or a 206 answer that does not start at the byte
            asked for; the message names the URL and the bytes received. ChecksumError: wrong size
            or checksum. InputError: not an http(s) URL, a bad rule or ``retries``, a destination
            that is a folder, or a destination folder that cannot be created or written;
            UnwritableError (an InputError) when writing the file fails (a full disk), with the
            bytes of a resumable transfer kept.

    Example::

        >>> fetch("https://example.org/0.npy", "model/0.npy", size=65616,            # doctest: +SKIP
        ...       checksum="git-blob:64046c2bfcc46b04001ecc72c523fa06ea49da26", timeout=600)
    """
    if not isinstance(url, str) or not re.match(r"^https?://", url):
        raise InputError(f"only http(s) URLs are fetched, got {url!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InputError(f"retries must be a whole number >= 0, got {retries!r}")
    deadline = deadline or Deadline.starting_now(timeout, stall_bytes, stall_seconds)
    destination = Path(destination)
    if destination.is_dir():
        raise DirectoryInTheWayError(f"cannot write {destination}: it is a directory (give a file name)")
    make_directory(destination.parent, "download folder")
    algorithm, expected = parse_checksum(checksum) if checksum else (None, None)
    resumable = expected is not None if resume is None else resume
    part = partial_path(destination)
    with _exclusive(destination, url, deadline), _unwritable(part, resumable):
        for attempt in range(retries + 1):
            if not resumable:
                part.unlink(missing_ok=True)  # only a checked file may be stitched together from two transfers
            try:
                if deadline.passed():
                    raise _Interrupted(f"{deadline.describe()} before the transfer began", 0, final=True)
                _transfer(url, part, size=size, deadline=deadline, progress=progress, label=destination.name)
                break
            except _Interrupted as cut:
                if cut.received and attempt < retries and not cut.final:
                    continue  # it was moving: pick up where it stopped
                _give_up(url, part, cut.reason, resumable)
        digests = file_digests(part, {"sha256", *([algorithm] if algorithm else [])})
        if expected is not None and digests[algorithm] != expected:
            got = part.stat().st_size
            part.unlink()
            raise ChecksumError(f"{destination.name} from {url}: {algorithm} is {digests[algorithm]} ({got} bytes), "
                                f"expected {expected}; the download was deleted")
        os.replace(part, destination)
        fsync_directory(destination.parent)
    return digests["sha256"]


@contextlib.contextmanager
def _unwritable(part: Path, resumable: bool):
    """On an :class:`UnwritableError`, keep what a resumable transfer wrote (a prefix of the file,
    for the next call) and remove anything else."""
    try:
        yield
    except UnwritableError:
        if not resumable:
            with contextlib.suppress(OSError):
                part.unlink()
        raise


@contextlib.contextmanager
def _exclusive(destination: Path, url: str, deadline: Deadline):
    """One :func:`fetch` of ``destination`` at a time (threads or processes): an advisory lock on
    ``.<destination's name>.fastmlstm-lock`` beside it, removed again when the call ends. A call
    that waits for another one waits within its own deadline."""
    if fcntl is None:  # no advisory locks (Windows): two calls at once are caught by the checks only
        yield
        return
    lock = destination.with_name(f".{destination.name}.fastmlstm-lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(f"cannot write into the download folder {lock.parent}: {exc.strerror or exc}") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline.passed():
                        raise DownloadError(f"could not fetch {url}: another download of {destination} is still "
                                            f"under way ({lock} is locked) and {deadline.describe()}") from None
                    time.sleep(min(0.05, deadline.wait_limit()))
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break  # else the holder removed the file before we locked it: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked, so that a waiter on this file sees it is gone and retries
        os.close(fd)


def _give_up(url: str, part: Path, reason: str, resumable: bool) -> None:
    """Raise the DownloadError for a transfer that stopped for good, keeping what a resumable one received."""
    kept = resumable and part.exists() and part.stat().st_size > 0
    if not kept:
        part.unlink(missing_ok=True)
    raise DownloadError(f"could not fetch {url}: {reason}" + (
        f"; the {part.stat().st_size} bytes received are kept in {part} and the same command resumes "
        "from there" if kept else "")) from None
