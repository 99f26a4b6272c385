"""Downloads that end: the overall deadline, the minimum-progress rule, what a stopped transfer
keeps and how the next call resumes it (with Range), exact byte counts, and the download folders'
errors. Against a loopback server that can send slowly or stop sending. Then the datasets' and
models' downloads against the misbehaving server of test_fetch_audit.py: SHA256SUMS edited or
damaged, a first download that does not load, unsafe archives, unwritable folders, two at once."""

from __future__ import annotations

import hashlib
import http.server
import math
import re
import threading
import time
from pathlib import Path

import pytest
from test_fetch_audit import (
    Bad,
    _hard_limit,
    bad,
    file_size_limit,
    listing,
    one_line,
    serve,
    serving,
    sha256,
    trickle,
    twice_at_once,
)

import fastmlstm
from fastmlstm.data import download as datasets_download
from fastmlstm.data.download import download
from fastmlstm.data.fetch import ChecksumError, Deadline, DownloadError, fetch, partial_path
from fastmlstm.errors import MissingDependencyError, MissingInputError
from fastmlstm.models.pretrained import download_model

assert Bad and _hard_limit and bad and file_size_limit  # the misbehaving server, its fixture, and the 20 s limit on every test here

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
    with serving(Slow()) as httpd:
        yield httpd


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


# ------------------------------------------------------------------------------------------------
# Datasets: SHA256SUMS, what a failed download leaves, archives


def sst2_files(tag: str) -> dict[str, bytes]:
    return {f"{split}_binary_sent.csv": f"label,sentence\n1,{tag} {split} good\n0,{tag} bad\n".encode()
            for split in ("train", "dev", "test")}


def put(bad, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        bad.routes[f"/{name}"] = serve(data)


def test_a_manifest_edited_by_hand(bad, tmp_path):
    """SHA256SUMS as sha256sum writes it (text or binary mode, any case) is read; a line that is not
    '<sha256>  <name>' is an error naming the file and the line, and nothing is changed."""
    files = sst2_files("a")
    put(bad, files)
    root = tmp_path / "data"
    download("sst2", root=root, mirror=bad.url, progress=False)
    sums = root / "downloads" / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    digest, name = lines[0].split("  ")
    sums.write_text("\n".join([f"{digest.upper()} *{name}"] + lines[1:]) + "\n\n")
    bad.log.clear()
    download("sst2", root=root, mirror=bad.url, progress=False, force=True)  # all three recorded: all checked
    assert len(bad.log) == 3 and sums.read_text().splitlines() == lines
    before = listing(root)
    for damaged in (b"\xff\xfe garbage\n", lines[0].encode()[:40] + b"\n", b"not a digest  train_binary_sent.csv\n"):
        sums.write_bytes(damaged + "\n".join(lines[1:]).encode())
        with pytest.raises(fastmlstm.InputError, match=rf"{sums}, line 1: .*fix or delete") as info:
            download("sst2", root=root, mirror=bad.url, progress=False, force=True)
        one_line(info.value)
        assert listing(root) == {**before, "downloads/SHA256SUMS": sums.read_bytes()}


def test_a_recorded_digest_edited_by_hand_refuses_the_file(bad, tmp_path):
    files = sst2_files("a")
    put(bad, files)
    root = tmp_path / "data"
    download("sst2", root=root, mirror=bad.url, progress=False)
    sums = root / "downloads" / "SHA256SUMS"
    sums.write_text(sums.read_text().replace(hashlib.sha256(files["dev_binary_sent.csv"]).hexdigest(), "0" * 64))
    before = listing(root)
    with pytest.raises(ChecksumError, match=r"dev_binary_sent.csv.*expected 0{64}") as info:
        download("sst2", root=root, mirror=bad.url, progress=False, force=True)
    one_line(info.value)
    assert listing(root) == before


def test_a_first_download_that_does_not_load_is_not_trusted(bad, tmp_path):
    """A server (a captive portal, a moved host) that answers with something other than the file:
    the first download fails to load, and neither its digest nor its files are kept, so that the
    next call, against the right file, succeeds."""
    good = sst2_files("a")
    put(bad, {**good, "train_binary_sent.csv": b"<html>please log in</html>\n"})
    root = tmp_path / "data"
    with pytest.raises(fastmlstm.InputError, match=r"^sst2: what was downloaded \(train_binary_sent.csv, "
                       r"dev_binary_sent.csv, test_binary_sent.csv\) does not load \(train_binary_sent.csv: expected "
                       r"a header row .*\); it was deleted, and nothing was recorded or extracted$") as info:
        download("sst2", root=root, mirror=bad.url, progress=False)
    one_line(info.value)
    assert listing(root) == {}
    put(bad, good)
    folder = download("sst2", root=root, mirror=bad.url, progress=False)
    assert listing(folder) == good


def zip_bytes(members) -> bytes:
    """A zip of (name, data, unix mode) members."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


MPQA = [("data/mpqa/mpqa.pos", b"good\n", 0o100644), ("data/mpqa/mpqa.neg", b"bad\n", 0o100644)]


@pytest.mark.parametrize("member, mode, match", [
    ("../../mpqa.pos", 0o100644, r"'../../mpqa.pos' of .* climbs out of the archive with '..'; refused"),
    ("/etc/mpqa.pos", 0o100644, r"'/etc/mpqa.pos' of .* has an absolute name"),
    ("data/mpqa/mpqa.pos", 0o120777, r"'data/mpqa/mpqa.pos' of .* is a symbolic or hard link"),
])
def test_archive_members_that_escape_or_link_are_refused(bad, tmp_path, member, mode, match):
    """A member that would be written (it matches what the dataset needs) must be a plain file
    with a relative name inside the archive; the data folder is left as it was."""
    root = tmp_path / "data"
    bad.routes["/datasmall_NB_ACL12.zip"] = serve(zip_bytes(MPQA))
    download("mpqa", root=root, mirror=bad.url, progress=False)
    before = listing(root)
    archive = zip_bytes([(member, b"/etc/passwd" if mode == 0o120777 else b"evil\n", mode), MPQA[1]])
    bad.routes["/datasmall_NB_ACL12.zip"] = serve(archive)
    pins = {"datasmall_NB_ACL12.zip": sha256(archive)}
    with pytest.raises(fastmlstm.InputError, match=match) as info:
        download("mpqa", root=root, mirror=bad.url, progress=False, force=True, checksums=pins)
    one_line(info.value)
    after = listing(root)
    assert after.pop("downloads/datasmall_NB_ACL12.zip") == archive  # it met its pinned checksum: kept, recorded
    assert after.pop("downloads/SHA256SUMS") == f"{sha256(archive)[7:]}  datasmall_NB_ACL12.zip\n".encode()
    assert after == {k: v for k, v in before.items() if k.startswith("mpqa/")}  # the dataset is as it was
    assert not list(tmp_path.glob("*.pos")) and not (tmp_path / "etc").exists()


def tar_bytes(members) -> bytes:
    """A tar.gz of (name, data or None, link target or None) members."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, __import__("io").BytesIO(data))
    return buf.getvalue()


def test_a_tar_symlink_member_and_a_truncated_tar(bad, tmp_path):
    root = tmp_path / "data"
    train = ("yelp_review_polarity_csv/train.csv", b'"1","meh"\n"2","yum"\n', None)
    test = ("yelp_review_polarity_csv/test.csv", b'"2","wow"\n', None)
    linked = tar_bytes([("yelp_review_polarity_csv/train.csv", None, "../../../etc/passwd"), test])
    bad.routes["/yelp_review_polarity_csv.tgz"] = serve(linked)
    with pytest.raises(fastmlstm.InputError, match=r"train.csv' of .* is a symbolic or hard link") as info:
        download("yelp", root=root, mirror=bad.url, progress=False)
    one_line(info.value)
    assert listing(root) == {}  # nothing vouched for the archive: it is deleted with the error
    good = tar_bytes([train, test])
    bad.routes["/yelp_review_polarity_csv.tgz"] = serve(good[:len(good) // 2])
    with pytest.raises(fastmlstm.InputError, match=r"damaged archive|neither a zip nor a tar") as info:
        download("yelp", root=root, mirror=bad.url, progress=False)
    one_line(info.value)
    assert listing(root) == {}
    bad.routes["/yelp_review_polarity_csv.tgz"] = serve(good)
    assert sorted(listing(download("yelp", root=root, mirror=bad.url, progress=False))) == ["test.csv", "train.csv"]



def test_an_unwritable_data_folder_changes_nothing(bad, tmp_path, monkeypatch):
    """Permissions are simulated (the tests may run as root): os.access says no for the folder."""
    put(bad, sst2_files("a"))
    root = tmp_path / "data"
    download("sst2", root=root, mirror=bad.url, progress=False)
    before = listing(root)
    real = __import__("os").access
    for locked in (root / "downloads", root / "sst2"):
        monkeypatch.setattr("os.access", lambda p, mode, locked=locked: False if Path(p) == locked else real(p, mode))
        with pytest.raises(fastmlstm.InputError, match=rf"cannot write into the .*{locked}: permission denied"):
            download("sst2", root=root, mirror=bad.url, progress=False, force=True)
        assert listing(root) == before


def test_a_dataset_download_ends_at_its_deadline(bad, tmp_path):
    files = sst2_files("a")
    for name, data in files.items():
        bad.routes[f"/{name}"] = trickle(data, 1, 0.05, headers_too=True)
    root = tmp_path / "data"
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"the 0.6 s time limit") as info:
        download("sst2", root=root, mirror=bad.url, progress=False, timeout=0.6, stall_bytes=1, stall_seconds=0.4)
    assert time.monotonic() - started < 1.6
    one_line(info.value)
    assert listing(root) == {}


def test_two_threads_download_one_model_at_once(bad, tmp_path):
    from fastmlstm.models.pretrained import MARKER, download_model

    table = {}
    for i in range(15):
        data = bytes([i]) * 2000
        bad.routes[f"/{i}.npy"] = trickle(data, 500, 0.002)
        table[f"{i}.npy"] = (len(data), hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    folders, errors = twice_at_once(lambda: download_model("openai-sentiment", root=tmp_path, mirror=bad.url,
                                                          checksums=table, progress=False))
    assert errors == [] and len(folders) == 2
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted([*table, MARKER]) and len(bad.log) == 15  # the second found it done


# ------------------------------------------------------------------------------------------------
# The Hub: arguments are checked before huggingface_hub is needed


def test_hub_arguments_are_checked_first(monkeypatch, tmp_path):
    import sys

    from fastmlstm.models import hub

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    for repo, files, match in [("not a repo", ["config.json"], "looks like 'user/name'"),
                               ("me/model", "config.json", "filenames must be a non-empty list of file names"),
                               ("me/model", [], "filenames must be a non-empty list"),
                               ("me/model", ["config.json", 3], "filenames must be"),
                               ("me/model", ["../x"], "filenames must be")]:
        with pytest.raises(fastmlstm.InputError, match=match) as info:
            hub.download_files(repo, files)
        assert not isinstance(info.value, MissingDependencyError)
    with pytest.raises(MissingInputError, match=rf"no folder to upload at {tmp_path / 'absent'}"):
        hub.upload_folder(tmp_path / "absent", "me/model")
    with pytest.raises(MissingDependencyError, match=r"pip install 'fastmlstm\[hub\]'"):
        hub.download_files("me/model", ["config.json"])


def test_a_full_disk_while_extracting_changes_nothing(bad, tmp_path, file_size_limit):
    files = {name: data * 300 for name, data in sst2_files("a").items()}  # about 10 kB each
    root = tmp_path / "data"
    (root / "downloads").mkdir(parents=True)
    for name, data in files.items():
        (root / "downloads" / name).write_bytes(data)
    pins = {name: sha256(data) for name, data in files.items()}
    before = listing(root)
    file_size_limit(4096)
    try:
        with pytest.raises(fastmlstm.InputError, match=rf"cannot write {root / 'sst2'}/\S+\.csv: File too large "
                                                       r"\(what was there is unchanged\)") as info:
            download("sst2", root=root, mirror=bad.url, checksums=pins, progress=False)
    finally:
        file_size_limit(-1)
    assert isinstance(info.value, OSError) and bad.log == []
    one_line(info.value)
    after = listing(root)
    assert after.pop("downloads/SHA256SUMS").count(b"\n") == 3  # the three checked files are recorded
    assert after == before and sorted(p.name for p in root.iterdir()) == ["downloads"]
