"""Downloads that end: the overall deadline, the minimum-progress rule, what a stopped transfer
keeps and how the next call resumes it (with Range), exact byte counts, and the download folders'
errors. Against a loopback server that can send slowly or stop sending."""

from __future__ import annotations

import http.server
import math
import re
import threading
import time

import pytest

import fastmlstm
from fastmlstm.data import download as datasets_download
from fastmlstm.data.fetch import Deadline, DownloadError, fetch, partial_path
from fastmlstm.models.pretrained import download_model

BODY = bytes(range(256)) * 64  # 16 KiB


class Slow(http.server.ThreadingHTTPServer):
    """Serves ``files`` with Range; ``pace`` = (bytes per write, seconds between writes) or None
    for all at once; ``silent_after`` = stop sending (keep the connection open) after that many bytes."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.pace: tuple[int, float] | None = None
        self.silent_after: int | None = None
        self.ranges: list[str | None] = []
        self.stop = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        data = server.files.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        server.ranges.append(rng)
        start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        step, delay = server.pace or (len(body), 0.0)
        sent = 0
        while sent < len(body) and not server.stop.is_set():
            if server.silent_after is not None and sent >= server.silent_after:
                server.stop.wait(5)  # hold the connection open, sending nothing
                return
            end = sent + step if server.silent_after is None else min(sent + step, server.silent_after)
            try:
                self.wfile.write(body[sent:end])
                self.wfile.flush()
            except OSError:
                return
            sent = end
            if delay:
                time.sleep(delay)


@pytest.fixture
def slow():
    httpd = Slow()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()


def checksum(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_trickle_is_a_stall_and_what_arrived_is_kept_and_resumed(slow, tmp_path):
    slow.files["f.bin"] = BODY
    slow.pace = (10, 0.02)  # 500 bytes/s: under the 2000 bytes per 0.4 s asked for below
    dest = tmp_path / "f.bin"
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(f"{slow.url}/f.bin", dest, checksum=checksum(BODY), progress=False, stall_bytes=2000,
              stall_seconds=0.4, retries=1)
    assert time.monotonic() - started < 5
    kept = partial_path(dest).stat().st_size
    message = str(info.value)
    assert "stalled:" in message and "fewer than the 2000 in 0.4 s required" in message, message
    # the count in the message is what is on disk: nothing received was dropped
    assert f"stopped after {kept} of {len(BODY)} bytes" in message and f"the {kept} bytes received are kept" in message
    assert kept > 0 and partial_path(dest).read_bytes() == BODY[:kept]
    assert slow.ranges[0] is None and slow.ranges[1] is not None  # the one retry resumed with Range
    # the next call, on a good connection, resumes from the kept bytes
    slow.pace, slow.ranges[:] = None, []
    fetch(f"{slow.url}/f.bin", dest, checksum=checksum(BODY), progress=False)
    assert dest.read_bytes() == BODY and slow.ranges == [f"bytes={kept}-"]


def test_silence_is_a_stall(slow, tmp_path):
    slow.files["f.bin"] = BODY
    slow.silent_after = 4000
    with pytest.raises(DownloadError, match=r"stopped after 4000 of 16384 bytes \(stalled: no byte for 0.3 s\)"):
        fetch(f"{slow.url}/f.bin", tmp_path / "f.bin", checksum=checksum(BODY), progress=False, stall_seconds=0.3,
              retries=0)
    assert partial_path(tmp_path / "f.bin").stat().st_size == 4000


def test_the_deadline_ends_a_slow_but_moving_transfer(slow, tmp_path):
    slow.files["f.bin"] = BODY
    slow.pace = (256, 0.02)  # about 12 kB/s: moving (no stall), but 16 KiB takes over a second
    dest = tmp_path / "f.bin"
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"the 0.5 s time limit \(timeout, --timeout\) ran out") as info:
        fetch(f"{slow.url}/f.bin", dest, checksum=checksum(BODY), progress=False, timeout=0.5, stall_bytes=1)
    assert time.monotonic() - started < 3
    kept = partial_path(dest).stat().st_size
    assert 0 < kept < len(BODY) and f"after {kept} of {len(BODY)} bytes" in str(info.value)
    assert len(slow.ranges) == 1  # the deadline is for the whole call: no retry after it


def test_an_unchecked_download_keeps_nothing(slow, tmp_path):
    slow.files["f.bin"] = BODY
    slow.silent_after = 100
    with pytest.raises(DownloadError) as info:
        fetch(f"{slow.url}/f.bin", tmp_path / "f.bin", progress=False, stall_seconds=0.2, retries=0)
    assert "kept" not in str(info.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("rules, match", [
    ({"timeout": math.nan}, "timeout must be a positive number"), ({"timeout": -1}, "timeout must be"),
    ({"timeout": math.inf}, "timeout must be"), ({"timeout": "60"}, "timeout must be"),
    ({"stall_seconds": 0}, "stall_seconds must be"), ({"stall_seconds": math.nan}, "stall_seconds must be"),
    ({"stall_bytes": -1}, "stall_bytes must be"), ({"stall_bytes": 1.5}, "stall_bytes must be")])
def test_bad_rules_are_one_line_errors(rules, match, tmp_path):
    for call in (lambda: fetch("http://127.0.0.1:9/x", tmp_path / "x", **rules),
                 lambda: datasets_download.download("sst2", root=tmp_path, **rules),
                 lambda: download_model("openai-sentiment", root=tmp_path, **rules)):
        with pytest.raises(fastmlstm.InputError, match=match):
            call()
    assert Deadline.starting_now(None).remaining() is None


def test_download_model_shares_one_deadline_across_its_files(slow, tmp_path):
    import hashlib

    table = {}
    for i in range(15):
        data = bytes([i]) * 3000
        slow.files[f"{i}.npy"] = data
        table[f"{i}.npy"] = (len(data), hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    slow.pace = (500, 0.02)  # each file takes about 0.1 s: all 15 cannot make a 0.6 s deadline
    with pytest.raises(DownloadError, match=r"the 0.6 s time limit .* ran out"):
        download_model("openai-sentiment", root=tmp_path, mirror=slow.url, checksums=table, progress=False,
                       timeout=0.6, stall_bytes=1)
    done = [p.name for p in (tmp_path / "openai-sentiment").glob("*.npy")]
    assert 0 < len(done) < 15
    slow.pace = None
    folder = download_model("openai-sentiment", root=tmp_path, mirror=slow.url, checksums=table, progress=False)
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(table)


@pytest.mark.parametrize("call", ["dataset", "model"])
def test_a_root_that_cannot_be_a_folder_is_named(call, tmp_path, monkeypatch):
    def run(root):
        if call == "dataset":
            return datasets_download.download("sst2", root=root, mirror="http://127.0.0.1:9", progress=False)
        return download_model("openai-sentiment", root=root, mirror="http://127.0.0.1:9", progress=False)

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(fastmlstm.InputError, match=rf"{tmp_path / 'a-file'} is a file, not a folder"):
        run(tmp_path / "a-file")
    with pytest.raises(fastmlstm.InputError, match=rf"{tmp_path / 'a-file'} is a file, not a folder"):
        run(tmp_path / "a-file" / "below")
    (tmp_path / "locked").mkdir()
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda p, mode: False if "locked" in str(p) else real_access(p, mode))
    with pytest.raises(fastmlstm.InputError, match=rf"cannot write into the .* {tmp_path / 'locked'}.*permission"):
        run(tmp_path / "locked")
