"""Downloads against misbehaving HTTP servers (loopback only): wrong ranges, wrong lengths, odd
encodings, redirects, HTTP errors, stalls and trickles, resets, stale partial files, concurrent
calls, damaged archives, damaged SHA256SUMS, unwritable folders. Every case must end in the
library's own error (DownloadError, ChecksumError, InputError) within its time limit and leave the
data folder as it was."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import fastmlstm
from fastmlstm.data.fetch import ChecksumError, DownloadError, fetch, partial_path

BODY = bytes(range(256)) * 16  # 4 KiB


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Bad(http.server.ThreadingHTTPServer):
    """``routes[path]`` = a function (handler, range start or None) that writes the whole raw
    response; ``log`` = (path, Range header) per request; ``stop`` ends any waiting handler."""

    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict = {}
        self.log: list[tuple[str, str | None]] = []
        self.stop = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        self.server.log.append((self.path, rng))
        route = self.server.routes.get(self.path)
        start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else None
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self, start)
        except OSError:
            pass
        self.close_connection = True


def raw(handler, status: str, headers: dict, body: bytes = b"") -> None:
    """Write a response exactly as given (no header is added)."""
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    handler.wfile.write(head.encode() + body)
    handler.wfile.flush()


def serve(data: bytes, *, ranges: bool = True):
    """A well-behaved file route (Range, 416 past the end); ``ranges=False`` ignores Range."""
    def route(h, start):
        if start is not None and ranges:
            if start >= len(data):
                raw(h, "416 Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}", "Content-Length": 0})
                return
            raw(h, "206 Partial Content", {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                                           "Content-Length": len(data) - start}, data[start:])
            return
        raw(h, "200 OK", {"Content-Length": len(data)}, data)
    return route


@contextlib.contextmanager
def serving(httpd):
    """``httpd`` (a server with a ``stop`` event) serving from a thread until the block ends."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def bad():
    with serving(Bad()) as httpd:
        yield httpd


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


@pytest.fixture(autouse=True)
def _hard_limit():
    """No test here may hang: SIGALRM fails it after 20 s (interrupting a blocked socket read)."""
    import signal

    def expire(signum, frame):
        raise AssertionError("the test ran past its 20 s hard limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def get(bad, dest, path="/f", **kw):
    kw.setdefault("progress", False)
    return fetch(bad.url + path, dest, **kw)


# ------------------------------------------------------------------------------------------------
# Ranges


def test_200_to_a_range_request_restarts_the_partial_file(bad, tmp_path):
    bad.routes["/f"] = serve(BODY, ranges=False)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(BODY[:1000])
    get(bad, dest, checksum=sha256(BODY))
    assert dest.read_bytes() == BODY and bad.log == [("/f", "bytes=1000-")]
    assert listing(tmp_path) == {"f": BODY}


def test_206_that_does_not_start_where_asked_starts_over(bad, tmp_path):
    # a server that answers every request with the whole file as a 206 from byte 0: the resume
    # starts over without Range (the checksum judges the result); it failed every call while the
    # .part was there, and appending the body would have doubled its first 1000 bytes
    def route(h, start):
        raw(h, "206 Partial Content", {"Content-Range": f"bytes 0-{len(BODY) - 1}/{len(BODY)}",
                                       "Content-Length": len(BODY)}, BODY)
    bad.routes["/f"] = route
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(BODY[:1000])
    get(bad, dest, checksum=sha256(BODY))
    assert listing(tmp_path) == {"f": BODY} and bad.log == [("/f", "bytes=1000-"), ("/f", None)]


def test_206_to_a_request_without_range_is_refused(bad, tmp_path):
    def route(h, start):
        raw(h, "206 Partial Content", {"Content-Range": f"bytes 1000-{len(BODY) - 1}/{len(BODY)}",
                                       "Content-Length": len(BODY) - 1000}, BODY[1000:])
    bad.routes["/f"] = route
    with pytest.raises(DownloadError, match=r"asked for the whole file and the server sent 'bytes 1000-4095/4096'"):
        get(bad, tmp_path / "f")
    assert listing(tmp_path) == {}


def test_416_starts_over(bad, tmp_path):
    bad.routes["/f"] = serve(BODY)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(BODY + b"stale")
    get(bad, dest, checksum=sha256(BODY))
    assert bad.log == [("/f", f"bytes={len(BODY) + 5}-"), ("/f", None)] and listing(tmp_path) == {"f": BODY}


def test_416_to_a_request_without_range(bad, tmp_path):
    bad.routes["/f"] = lambda h, start: raw(h, "416 Range Not Satisfiable", {"Content-Length": 0})
    with pytest.raises(DownloadError, match=r"HTTP 416") as info:
        get(bad, tmp_path / "f", checksum=sha256(BODY))
    one_line(info.value)
    assert listing(tmp_path) == {}


def test_a_part_file_larger_than_the_known_size(bad, tmp_path):
    bad.routes["/f"] = serve(BODY)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(b"x" * (len(BODY) + 100))
    get(bad, dest, checksum=sha256(BODY), size=len(BODY))
    assert bad.log == [("/f", None)] and listing(tmp_path) == {"f": BODY}


def test_a_stale_part_file_fails_the_checksum_once_then_is_gone(bad, tmp_path):
    """A .part file from an older version of the file: the resumed result fails the checksum, the
    .part is deleted, and the next call starts from byte 0."""
    bad.routes["/f"] = serve(BODY)
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(b"old!" * 250)
    with pytest.raises(ChecksumError, match="the download was deleted") as info:
        get(bad, dest, checksum=sha256(BODY))
    one_line(info.value)
    assert listing(tmp_path) == {}
    get(bad, dest, checksum=sha256(BODY))
    assert bad.log[-1] == ("/f", None) and listing(tmp_path) == {"f": BODY}


# ------------------------------------------------------------------------------------------------
# Lengths and encodings


@pytest.mark.parametrize("checked", [True, False])
def test_a_body_shorter_than_its_content_length(bad, tmp_path, checked):
    bad.routes["/f"] = lambda h, start: raw(h, "200 OK", {"Content-Length": len(BODY)}, BODY[:1000])
    dest = tmp_path / "f"
    with pytest.raises(DownloadError, match=r"the connection broke after 1000 of 4096 bytes") as info:
        get(bad, dest, checksum=sha256(BODY) if checked else None, retries=1)
    one_line(info.value)
    assert listing(tmp_path) == ({"f.part": BODY[:1000]} if checked else {})
    assert len(bad.log) == 2


def test_a_body_longer_than_its_content_length_is_cut_at_the_length(bad, tmp_path):
    bad.routes["/f"] = lambda h, start: raw(h, "200 OK", {"Content-Length": len(BODY)}, BODY + b"garbage")
    get(bad, tmp_path / "f", checksum=sha256(BODY))
    assert listing(tmp_path) == {"f": BODY}


def test_no_content_length_and_a_size(bad, tmp_path):
    bad.routes["/f"] = lambda h, start: raw(h, "200 OK", {"Connection": "close"}, BODY)
    get(bad, tmp_path / "f", size=len(BODY))
    assert listing(tmp_path) == {"f": BODY}
    with pytest.raises(ChecksumError, match=r"the server sent more than 4000 bytes where 4000 were expected"):
        get(bad, tmp_path / "g", size=4000)
    with pytest.raises(ChecksumError, match=r"the server sent 4096 bytes where 5000 were expected"):
        get(bad, tmp_path / "g", size=5000)
    assert listing(tmp_path) == {"f": BODY}


def chunked(pieces, *, last=True):
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return out + (b"0\r\n\r\n" if last else b"")


def test_chunked_encoding(bad, tmp_path):
    pieces = [BODY[:1000], BODY[1000:3000], BODY[3000:]]
    bad.routes["/f"] = lambda h, start: raw(h, "200 OK", {"Transfer-Encoding": "chunked"}, chunked(pieces))
    get(bad, tmp_path / "f", checksum=sha256(BODY))
    assert listing(tmp_path) == {"f": BODY}
    # cut inside the chunks: an interrupted transfer, the bytes received are kept for a resume
    bad.routes["/g"] = lambda h, start: raw(h, "200 OK", {"Transfer-Encoding": "chunked"},
                                            chunked(pieces[:2], last=False) + b"400\r\n" + BODY[3000:3100])
    with pytest.raises(DownloadError, match=r"/g: the connection broke after 3100 of \? bytes") as info:
        get(bad, tmp_path / "g", path="/g", checksum=sha256(BODY), retries=0)
    one_line(info.value)
    assert partial_path(tmp_path / "g").read_bytes() == BODY[:3100]


def test_gzip_content_encoding_is_kept_as_sent(bad, tmp_path):
    """A server that gzips a body nobody asked to be encoded (fetch asks for identity): the bytes
    are what the server holds, and the checksum decides; nothing is silently decoded."""
    import gzip

    packed = gzip.compress(BODY)
    bad.routes["/f"] = lambda h, start: raw(h, "200 OK", {"Content-Encoding": "gzip",
                                                          "Content-Length": len(packed)}, packed)
    with pytest.raises(ChecksumError, match="the download was deleted"):
        get(bad, tmp_path / "f", checksum=sha256(BODY))
    assert listing(tmp_path) == {}
    get(bad, tmp_path / "f", checksum=sha256(packed))
    assert listing(tmp_path) == {"f": packed}


# ------------------------------------------------------------------------------------------------
# Redirects and HTTP errors


def redirect(to: str, code: int = 302):
    return lambda h, start: raw(h, f"{code} Moved", {"Location": to, "Content-Length": 0})


def test_redirects_to_another_port_keep_the_range(bad, tmp_path):
    other = Bad()
    thread = threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        other.routes["/real"] = serve(BODY)
        bad.routes["/f"] = redirect(other.url + "/real", 301)
        dest = tmp_path / "f"
        partial_path(dest).write_bytes(BODY[:100])
        get(bad, dest, checksum=sha256(BODY))
        assert listing(tmp_path) == {"f": BODY} and other.log == [("/real", "bytes=100-")]
    finally:
        other.shutdown()
        other.server_close()


def test_a_redirect_loop_and_bad_targets_are_one_line_errors(bad, tmp_path):
    bad.routes["/f"] = redirect("/g")
    bad.routes["/g"] = redirect("/f")
    with pytest.raises(DownloadError, match=r"could not fetch .*/f: HTTP 302.*infinite loop") as info:
        get(bad, tmp_path / "f")
    one_line(info.value)
    bad.routes["/h"] = redirect("file:///etc/passwd")
    with pytest.raises(DownloadError, match=r"could not fetch .*/h: HTTP 302") as info:
        get(bad, tmp_path / "f", path="/h")
    one_line(info.value)
    bad.routes["/k"] = lambda h, start: raw(h, "302 Moved", {"Content-Length": 0})  # no Location at all
    with pytest.raises(DownloadError, match=r"could not fetch .*/k: HTTP 302") as info:
        get(bad, tmp_path / "f", path="/k")
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("status", ["404 Not Found", "403 Forbidden", "500 Internal Server Error",
                                    "503 Service Unavailable"])
def test_http_errors_end_at_once_and_keep_the_part(bad, tmp_path, status):
    """An HTTP error is not retried (a 503's Retry-After is not waited for: the call ends now)
    and leaves the folder as it was: a resumable .part stays for the next call."""
    bad.routes["/f"] = lambda h, start: raw(h, status, {"Retry-After": "3600", "Content-Length": 5}, b"error")
    dest = tmp_path / "f"
    partial_path(dest).write_bytes(BODY[:10])
    started = time.monotonic()
    with pytest.raises(DownloadError, match=rf"could not fetch .*/f: HTTP {status}$") as info:
        get(bad, dest, checksum=sha256(BODY))
    assert time.monotonic() - started < 2 and len(bad.log) == 1
    one_line(info.value)
    assert listing(tmp_path) == {"f.part": BODY[:10]}


def test_a_garbled_status_line(bad, tmp_path):
    bad.routes["/f"] = lambda h, start: h.wfile.write(b"SPDY/9 what\r\n\r\n")
    with pytest.raises(DownloadError, match=r"could not fetch .*/f") as info:
        get(bad, tmp_path / "f")
    one_line(info.value)
    assert listing(tmp_path) == {}


def test_nothing_listening(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there now
    with pytest.raises(DownloadError, match=rf"could not fetch http://127.0.0.1:{port}/f: .*refused") as info:
        fetch(f"http://127.0.0.1:{port}/f", tmp_path / "f", progress=False)
    one_line(info.value)


# ------------------------------------------------------------------------------------------------
# Stalls, trickles, resets, the deadline


def trickle(data: bytes, step: int, delay: float, *, headers_too: bool = False):
    """Send ``step`` bytes every ``delay`` s (the headers too, with ``headers_too``)."""
    def route(h, start):
        start = start or 0
        head = (f"HTTP/1.1 {'206 Partial Content' if start else '200 OK'}\r\nContent-Length: {len(data) - start}\r\n"
                + (f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n" if start else "") + "\r\n")
        if headers_too:
            for i in range(len(head)):
                if h.server.stop.wait(delay):
                    return
                h.wfile.write(head[i].encode())
                h.wfile.flush()
        else:
            h.wfile.write(head.encode())
        for i in range(start, len(data), step):
            if h.server.stop.wait(delay):
                return
            h.wfile.write(data[i:i + step])
            h.wfile.flush()
    return route


def test_a_trickle_just_above_the_stall_rule_completes(bad, tmp_path):
    data = BODY[:2000]
    bad.routes["/f"] = trickle(data, 200, 0.05)  # 4000 bytes/s against a rule of 1000 bytes per 0.5 s
    get(bad, tmp_path / "f", checksum=sha256(data), stall_bytes=1000, stall_seconds=0.5, retries=0)
    assert listing(tmp_path) == {"f": data}


def test_a_trickle_just_below_the_stall_rule_stalls(bad, tmp_path):
    data = BODY[:2000]
    bad.routes["/f"] = trickle(data, 40, 0.05)  # 800 bytes/s against 1000 per 0.5 s
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"stalled: \d+ bytes in 0.5 s, fewer than the 1000 in 0.5 s") as info:
        get(bad, tmp_path / "f", checksum=sha256(data), stall_bytes=1000, stall_seconds=0.5, retries=0)
    assert time.monotonic() - started < 2
    kept = partial_path(tmp_path / "f").read_bytes()
    assert f"stopped after {len(kept)} of 2000 bytes" in one_line(info.value) and kept == data[:len(kept)]


def test_headers_trickled_forever_still_end_at_the_deadline(bad, tmp_path):
    """The deadline bounds the whole call: also a server that sends its status line and headers one
    byte at a time, each just before the no-byte rule would end it."""
    bad.routes["/f"] = trickle(BODY, 1, 0.05, headers_too=True)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"the 0.5 s time limit") as info:
        get(bad, tmp_path / "f", checksum=sha256(BODY), timeout=0.5, stall_bytes=1, stall_seconds=0.3,
            retries=0)
    assert time.monotonic() - started < 1.5
    one_line(info.value)


def test_headers_trickled_below_the_stall_rule_stall(bad, tmp_path):
    bad.routes["/f"] = trickle(BODY, 1, 0.05, headers_too=True)  # 20 bytes/s
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"/f: stalled: \d+ bytes in 0.3 s, fewer than the 1000 in 0.3 s") as info:
        get(bad, tmp_path / "f", checksum=sha256(BODY), stall_bytes=1000, stall_seconds=0.3, retries=0)
    assert time.monotonic() - started < 1.5
    one_line(info.value)


def test_silence_before_the_headers_is_a_stall(bad, tmp_path):
    bad.routes["/f"] = lambda h, start: h.server.stop.wait(10)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"could not fetch .*/f: .*(stalled|timed out)") as info:
        get(bad, tmp_path / "f", stall_seconds=0.3)
    assert time.monotonic() - started < 1.5
    one_line(info.value)


def reset(handler) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0) instead of an orderly close."""
    import struct

    handler.wfile.flush()
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()


def test_a_connection_reset_mid_body_is_resumed(bad, tmp_path):
    calls = []

    def route(h, start):
        calls.append(start)
        if len(calls) == 1:
            h.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:1500])
            h.wfile.flush()
            time.sleep(0.05)
            reset(h)
            return
        serve(BODY)(h, start)
    bad.routes["/f"] = route
    get(bad, tmp_path / "f", checksum=sha256(BODY))
    assert calls == [None, 1500] and listing(tmp_path) == {"f": BODY}


def test_a_reset_before_any_byte(bad, tmp_path):
    bad.routes["/f"] = lambda h, start: reset(h)
    with pytest.raises(DownloadError, match=r"could not fetch .*/f: ") as info:
        get(bad, tmp_path / "f", checksum=sha256(BODY))
    one_line(info.value)
    assert listing(tmp_path) == {}


# ------------------------------------------------------------------------------------------------
# Two downloads of one file at once


def twice_at_once(call) -> tuple[list, list]:
    """``call()`` in two threads at once: (what the calls returned, what they raised)."""
    results, errors = [], []

    def one():
        try:
            results.append(call())
        except Exception as exc:  # noqa: BLE001 (collected for the caller to check)
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    return results, errors


def test_two_threads_fetch_one_file_at_once(bad, tmp_path):
    data = bytes(range(256)) * 256  # 64 KiB, sent in pieces so that the two transfers overlap
    bad.routes["/f"] = trickle(data, 4096, 0.005)
    digests, errors = twice_at_once(lambda: get(bad, tmp_path / "f", checksum=sha256(data)))
    assert all(isinstance(e, fastmlstm.InputError) for e in errors), errors
    assert digests and listing(tmp_path) == {"f": data}


# ------------------------------------------------------------------------------------------------
# The folders: full, in the way, unwritable; the arguments


@pytest.fixture
def file_size_limit():
    """Writes past ``limit`` bytes of any one file fail with EFBIG, as on a full disk (RLIMIT_FSIZE)."""
    import resource
    import signal

    previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, previous[1]))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_signal)


@pytest.mark.parametrize("checked", [True, False])
def test_a_full_disk_is_a_write_error_not_a_network_one(bad, tmp_path, file_size_limit, checked):
    data = bytes(range(256)) * 512  # 128 KiB, past the 64 KiB limit below
    bad.routes["/f"] = serve(data)
    file_size_limit(64 * 1024)
    try:
        with pytest.raises(fastmlstm.InputError, match=r"cannot write .*f.part: File too large") as info:
            get(bad, tmp_path / "f", checksum=sha256(data) if checked else None)
    finally:
        file_size_limit(-1)  # back to what it was (replaced by the fixture's own reset too)
    assert not isinstance(info.value, DownloadError) and len(bad.log) == 1  # not retried as a broken connection
    one_line(info.value)
    kept = listing(tmp_path)
    assert kept == ({"f.part": data[:len(kept["f.part"])]} if checked else {})


def test_a_destination_that_is_a_folder(bad, tmp_path):
    bad.routes["/f"] = serve(BODY)
    (tmp_path / "f").mkdir()
    with pytest.raises(fastmlstm.InputError, match=r"cannot write .*/f: it is a directory") as info:
        get(bad, tmp_path / "f")
    one_line(info.value)
    assert bad.log == [] and listing(tmp_path) == {}


@pytest.mark.parametrize("retries", [-1, 1.5, "3", True])
def test_bad_retries(tmp_path, retries):
    with pytest.raises(fastmlstm.InputError, match="retries must be a whole number >= 0"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x", retries=retries)


def test_waiting_for_another_download_of_the_file_ends_at_the_deadline(bad, tmp_path):
    import fcntl
    import os

    bad.routes["/f"] = serve(BODY)
    fd = os.open(tmp_path / ".f.fastmlstm-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a fetch of the same file in another process holds
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"another download of .*/f is still under way .* the 0.3 s time "
                                                r"limit") as info:
            get(bad, tmp_path / "f", timeout=0.3)
        assert time.monotonic() - started < 1.5 and bad.log == []
        one_line(info.value)
    finally:
        os.close(fd)
    get(bad, tmp_path / "f")  # the holder is gone: its lock file is taken over, then removed
    assert listing(tmp_path) == {"f": BODY}


def test_a_redirect_from_https_to_plain_http_is_refused():
    # urllib follows it: a first download that nothing vouches for then travelled unencrypted
    import urllib.request

    from fastmlstm.data.fetch import _NoDowngrade

    handler = _NoDowngrade()
    request = urllib.request.Request("https://example.org/a.zip")
    with pytest.raises(DownloadError, match=r"redirected it from https to http://example.org/a.zip; refused"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://example.org/a.zip")
    followed = handler.redirect_request(request, None, 302, "Found", {}, "https://mirror.example.org/a.zip")
    assert followed.full_url == "https://mirror.example.org/a.zip"
    plain = urllib.request.Request("http://example.org/a.zip")  # http to http, or up to https: followed
    assert handler.redirect_request(plain, None, 301, "Moved", {}, "http://127.0.0.1/a.zip").full_url.endswith("a.zip")


@pytest.mark.parametrize("mirror", ["", "  ", "ftp://host/x", "/a/local/folder", 7])
def test_a_mirror_that_is_no_http_url_is_refused(tmp_path, mirror):
    # mirror="" fetched from the canonical hosts in silence
    from fastmlstm.data.download import download
    from fastmlstm.models.pretrained import download_model

    for call in (lambda: download("sst2", root=tmp_path, mirror=mirror, progress=False),
                 lambda: download_model("openai-sentiment", root=tmp_path, mirror=mirror, progress=False)):
        with pytest.raises(fastmlstm.InputError, match=r"mirror must be an http\(s\) base URL"):
            call()
    assert list(tmp_path.iterdir()) == []
