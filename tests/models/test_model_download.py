"""The checked download of pretrained models (``fastmlstm download openai-sentiment``, ``from_pretrained``
by name), against a loopback HTTP server that speaks HTTP Range and can cut a transfer short.

The 8 small released files are served as they are published (../shared/data/openai-release) and
must verify against the published git blob ids; the 7 large ones are small stand-ins with a
test-only checksum table. Loading and featurizing use stand-ins for all 15 files (H = 24), compared
with the NumPy implementation of the released equations in test_openai_weights.py.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR
from test_openai_weights import TEXTS, paper_bytes, released_numpy, write_released

import fastmlstm
from fastmlstm import cli
from fastmlstm.data import fetch as transfer
from fastmlstm.models import pretrained
from fastmlstm.models.pretrained import MARKER, ChecksumError, DownloadError, ModelFile, download_model, model_files
from fastmlstm.probe import featurize

NAME = "openai-sentiment"
RELEASE = DATA_DIR / "openai-release"
REAL = ["0.npy", "6.npy", "8.npy", "9.npy", "10.npy", "11.npy", "12.npy", "14.npy"]  # the 8 files shipped here
LARGE = ["1.npy", "2.npy", "3.npy", "4.npy", "5.npy", "7.npy", "13.npy"]
ALL = [f"{i}.npy" for i in range(15)]
needs_release = pytest.mark.skipif(not all((RELEASE / f).is_file() for f in REAL),
                                   reason="the 8 released files are not in $FASTMLSTM_DATA/openai-release")


def blob_id(data: bytes) -> str:
    """git's blob id, computed here independently of fastmlstm.download."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def npy_bytes(array: np.ndarray, path: Path) -> bytes:
    np.save(path, array)
    return path.read_bytes()


class Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes) at ``/<name>``; logs (name, Range header) per request;
    ``cuts[name]`` is a list of byte counts: each request pops one and sends only that many bytes
    of its body before closing the connection; ``ranges=False`` ignores Range like a plain server;
    ``lengths=False`` sends no Content-Length (the body ends when the connection closes)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ranges = True
        self.lengths = True
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def requested(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.requests if n == name]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        self.server.requests.append((name, rng))
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and self.server.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if self.server.lengths:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cuts = self.server.cuts.get(name)
        if cuts:
            self.wfile.write(body[: cuts.pop(0)])  # then the connection closes: the client sees a short body
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def published(server, tmp_path):
    """The 8 real files and 7 small stand-ins on the server; the stand-ins' test-only checksum table."""
    for name in REAL:
        server.files[name] = (RELEASE / name).read_bytes()
    rng = np.random.default_rng(0)
    table = {}
    for name in LARGE:
        data = npy_bytes(rng.standard_normal((3, 5)).astype(np.float32), tmp_path / name)
        server.files[name] = data
        table[name] = (len(data), blob_id(data))
    return table


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def fetched(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / NAME).iterdir() if p.name.endswith(".npy")}


def get(root, server, table, **kw):
    return download_model(NAME, root=root, mirror=server.url, checksums=table, progress=False, **kw)


# ------------------------------------------------------------------------------------------------
# The table


def test_the_table_names_url_size_and_blob_id_of_all_15_files():
    model = pretrained.MODELS[NAME]
    files = model_files(NAME)
    assert [f.filename for f in files] == ALL
    for f in files:
        assert re.fullmatch(r"[0-9a-f]{40}", f.blob_id) and f.size > 0
        assert model.url(f.filename) == ("https://github.com/openai/generating-reviews-discovering-sentiment/raw/"
                                         f"master/model/{f.filename}")
        assert model.url(f.filename, "http://m/x/") == f"http://m/x/{f.filename}"
    # the 7 large sizes are derived from the shapes: 80-byte header + float32 data
    H, E = 4096, 64
    derived = {"1.npy": E * 4 * H, "2.npy": H * H, "3.npy": H * H, "4.npy": H * H, "5.npy": H * H,
               "7.npy": H * H, "13.npy": H * 256}
    for f in files:
        if f.filename in derived:
            assert not f.size_exact and f.size == 80 + 4 * derived[f.filename]
        else:
            assert f.size_exact


@needs_release
def test_the_real_files_match_the_published_ids():
    for f in model_files(NAME):
        if f.filename in REAL:
            data = (RELEASE / f.filename).read_bytes()
            assert (len(data), blob_id(data)) == (f.size, f.blob_id), f.filename
            assert transfer.file_digest(RELEASE / f.filename, "git-blob") == f.blob_id


def test_checksum_overrides_are_checked():
    with pytest.raises(fastmlstm.InputError, match="99.npy"):
        model_files(NAME, {"99.npy": (1, "0" * 40)})
    with pytest.raises(fastmlstm.InputError, match=r"checksums\['3.npy'\] must be \(size in bytes, 40-hex"):
        model_files(NAME, {"3.npy": "sha256:00"})
    with pytest.raises(fastmlstm.InputError, match="no registered model 'gpt'"):
        download_model("gpt")
    override = model_files(NAME, {"3.npy": (10, "a" * 40)})
    assert override[3] == ModelFile("3.npy", 10, "a" * 40) and override[4] == model_files(NAME)[4]


def test_models_folder_from_root_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMLSTM_MODELS", str(tmp_path / "env"))
    assert pretrained.models_dir() == tmp_path / "env"
    assert pretrained.models_dir(tmp_path / "root") == tmp_path / "root"
    monkeypatch.delenv("FASTMLSTM_MODELS")
    assert pretrained.models_dir() == Path("~/.cache/fastmlstm/models").expanduser()


# ------------------------------------------------------------------------------------------------
# Downloads


@needs_release
def test_download_verifies_real_ids_and_resumes_a_cut_connection(server, published, tmp_path):
    server.cuts["6.npy"] = [100_000]  # the 1 MB wmx breaks off once, after 100,000 bytes
    folder = get(tmp_path, server, published)
    assert folder == tmp_path / NAME
    assert fetched(tmp_path) == server.files
    assert server.requested("6.npy") == [None, "bytes=100000-"]
    assert all(len(server.requested(f)) == 1 for f in ALL if f != "6.npy")
    assert sorted(p.name for p in folder.iterdir()) == sorted(ALL + [MARKER])  # no .part left behind
    marker = json.loads((folder / MARKER).read_text())
    assert marker["model"] == NAME and marker["files"]["0.npy"]["blob_id"] == model_files(NAME)[0].blob_id


@needs_release
@pytest.mark.parametrize("ranges", [True, False])
def test_an_interrupted_earlier_run_is_resumed(server, published, tmp_path, ranges):
    """A .part file left by a killed run continues with a Range request; a server that ignores
    Range sends the whole file, which then starts over. Either way the result verifies."""
    server.ranges = ranges
    data = server.files["6.npy"]
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "6.npy.part").write_bytes(data[:300_000])
    get(tmp_path, server, published)
    assert server.requested("6.npy") == ["bytes=300000-"]
    assert fetched(tmp_path)["6.npy"] == data


@needs_release
def test_a_connection_cut_too_often_keeps_the_part_and_the_next_run_resumes(server, published, tmp_path):
    server.cuts["9.npy"] = [1000, 1000, 1000, 1000]  # the first try and all 3 retries break
    with pytest.raises(DownloadError, match=r"/9.npy: the connection broke after 4000 of 65616 bytes.*"
                                            r"kept in .*9.npy.part"):
        get(tmp_path, server, published)
    folder = tmp_path / NAME
    assert (folder / "9.npy.part").stat().st_size == 4000 and not (folder / MARKER).exists()
    with pytest.raises(FileNotFoundError, match="missing 9.npy"):  # an unfinished folder does not load
        fastmlstm.from_pretrained(folder)
    get(tmp_path, server, published)
    assert server.requested("9.npy")[-1] == "bytes=4000-"
    assert fetched(tmp_path) == server.files and (folder / MARKER).exists()


@needs_release
def test_a_corrupted_file_is_named_and_removed(server, published, tmp_path):
    good = server.files["10.npy"]
    server.files["10.npy"] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(ChecksumError, match=r"10.npy from http://127.0.0.1:\d+/10.npy: git-blob is [0-9a-f]{40} "
                                            r"\(65616 bytes\), expected 068c953b192b871251d2b67f4c3c4cf76700dbf1"):
        get(tmp_path, server, published)
    folder = tmp_path / NAME
    assert not (folder / "10.npy").exists() and not (folder / "10.npy.part").exists()
    assert not (folder / MARKER).exists()
    with pytest.raises(FileNotFoundError, match="missing 10.npy"):
        fastmlstm.from_pretrained(folder)
    server.files["10.npy"] = good
    get(tmp_path, server, published)
    assert fetched(tmp_path) == server.files


@needs_release
@pytest.mark.parametrize("lengths", [True, False])
@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_a_wrong_size_is_refused(server, published, tmp_path, change, lengths):
    """With a Content-Length the size is refused before the body is read; without one, as soon as
    the body runs past the size, or once it ends short of it."""
    server.lengths = lengths
    good = server.files["14.npy"]
    server.files["14.npy"] = good + b"\0" * 5000 if change == "longer" else good[:1000]
    if lengths:
        expected = "has 6104 bytes" if change == "longer" else "has 1000 bytes"
    else:
        expected = "sent more than 1104 bytes" if change == "longer" else "sent 1000 bytes"
    with pytest.raises(ChecksumError, match=rf"14.npy from .*: the server {expected} where 1104 were expected"):
        get(tmp_path, server, published)
    assert not any((tmp_path / NAME).glob("14.npy*")) and not (tmp_path / NAME / MARKER).exists()


@needs_release
def test_a_missing_file_is_a_404_naming_the_url(server, published, tmp_path):
    del server.files["3.npy"]
    with pytest.raises(DownloadError, match=r"could not fetch http://127.0.0.1:\d+/3.npy: HTTP 404"):
        get(tmp_path, server, published)
    assert not (tmp_path / NAME / MARKER).exists() and not any((tmp_path / NAME).glob("3.npy*"))


def test_no_server_at_all(tmp_path):
    with pytest.raises(DownloadError, match=r"could not fetch http://127.0.0.1:9/0.npy"):
        download_model(NAME, root=tmp_path, mirror="http://127.0.0.1:9", progress=False, timeout=5)
    assert not (tmp_path / NAME).exists()  # the first download left an empty model folder behind


@needs_release
def test_a_rerun_checks_what_is_present_offline_and_refetches_only_a_bad_file(server, published, tmp_path, caplog):
    folder = get(tmp_path, server, published)
    # everything present and verified: no network at all (nothing listens on port 9)
    assert download_model(NAME, root=tmp_path, mirror="http://127.0.0.1:9", checksums=published,
                          progress=False) == folder
    # a file damaged on disk is found by the re-check, named, removed and fetched again
    server.requests.clear()
    data = bytearray((folder / "11.npy").read_bytes())
    data[200] ^= 0xFF
    (folder / "11.npy").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fastmlstm"):
        get(tmp_path, server, published)
    assert "11.npy does not match its checksum (git blob id" in caplog.text
    assert [name for name, _ in server.requests] == ["11.npy"]
    assert fetched(tmp_path) == server.files and (folder / MARKER).exists()
    # force fetches everything again
    server.requests.clear()
    get(tmp_path, server, published, force=True)
    assert sorted(name for name, _ in server.requests) == sorted(ALL)


def test_fetch_partial_file_cases(server, tmp_path):
    """fetch on its own: a stale partial file longer than the remote one (the server answers 416,
    the transfer starts over); a complete partial file (verified and renamed, no request); and no
    checksum, where a partial file is never resumed because nothing would check the result."""
    data = bytes(range(256)) * 40
    server.files["f.bin"] = data
    url, dest = f"{server.url}/f.bin", tmp_path / "f.bin"
    checksum = f"git-blob:{blob_id(data)}"
    transfer.partial_path(dest).write_bytes(b"x" * (len(data) + 10))
    transfer.fetch(url, dest, checksum=checksum, progress=False)
    assert dest.read_bytes() == data and server.requested("f.bin") == [f"bytes={len(data) + 10}-", None]
    dest.unlink()
    server.requests.clear()
    transfer.partial_path(dest).write_bytes(data)
    transfer.fetch(url, dest, checksum=checksum, size=len(data), progress=False)
    assert dest.read_bytes() == data and server.requests == []
    transfer.partial_path(dest).write_bytes(b"junk")
    transfer.fetch(url, tmp_path / "f.bin", progress=False)
    assert dest.read_bytes() == data and server.requested("f.bin") == [None]
    assert not transfer.partial_path(dest).exists()
    with pytest.raises(fastmlstm.InputError, match="'git-blob:<hex>'"):
        transfer.fetch(url, dest, checksum="git-blob:123")


# ------------------------------------------------------------------------------------------------
# From a registered name to features


@pytest.fixture
def standins(server, tmp_path):
    """All 15 files as a small model (H = 24, E = 8) on the server; (arrays, checksum table)."""
    arrays = write_released(tmp_path / "src", seed=4)
    table = {}
    for name in ALL:
        data = (tmp_path / "src" / name).read_bytes()
        server.files[name] = data
        table[name] = (len(data), blob_id(data))
    return arrays, table


def test_from_pretrained_by_name_downloads_checks_loads_and_matches_the_released_equations(server, standins,
                                                                                           tmp_path):
    arrays, table = standins
    root = tmp_path / "models"
    model = fastmlstm.from_pretrained(NAME, root=root, mirror=server.url, checksums=table, progress=False)
    assert model.config == {"hidden_size": 24, "embed_size": 8, "weight_norm": True}
    feats = featurize(model, TEXTS, progress=False)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(feats[i], np.tanh(released_numpy(arrays, paper_bytes(text))[2]),
                                   rtol=1e-4, atol=2e-5)
    # the second time it loads from the folder: no request at all
    server.requests.clear()
    again = fastmlstm.from_pretrained(NAME, root=root, mirror=server.url, checksums=table, progress=False)
    assert server.requests == [] and same_weights(again, model)
    # the folder itself is a released-layout path
    assert same_weights(fastmlstm.from_pretrained(root / NAME), model)


def test_a_changed_file_is_caught_on_load(server, standins, tmp_path):
    """Loading trusts the marker only while every file keeps its size and modification time;
    otherwise it re-checks, and a mismatch is fetched again before the model loads."""
    _, table = standins
    root = tmp_path / "models"
    fastmlstm.from_pretrained(NAME, root=root, mirror=server.url, checksums=table, progress=False)
    with open(root / NAME / "12.npy", "ab") as f:
        f.write(b"\0")
    server.requests.clear()
    fastmlstm.from_pretrained(NAME, root=root, mirror=server.url, checksums=table, progress=False)
    assert [name for name, _ in server.requests] == ["12.npy"]
    assert (root / NAME / "12.npy").read_bytes() == server.files["12.npy"]


# ------------------------------------------------------------------------------------------------
# The command line: `fastmlstm download openai-sentiment` and `--model openai-sentiment`


@pytest.fixture
def registered_standins(server, standins, monkeypatch, tmp_path):
    """The registry entry pointed at the loopback server with the stand-ins' table (the command line
    has no --checksums); $FASTMLSTM_MODELS set to a fresh folder."""
    _, table = standins
    entry = replace(pretrained.MODELS[NAME], base_url=server.url + "/",
                    files=tuple(ModelFile(name, *table[name]) for name in ALL))
    monkeypatch.setitem(pretrained.MODELS, NAME, entry)
    monkeypatch.setenv("FASTMLSTM_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_download_then_probe_by_name(registered_standins, server, capsys, tmp_path):
    code, out, err = run(capsys, "download", NAME, "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == NAME and report["folder"] == str(registered_standins / NAME)
    assert [f["file"] for f in report["files"]] == ALL
    for f in report["files"]:
        assert f["url"] == f"{server.url}/{f['file']}" and f["size"] == len(server.files[f["file"]])
        assert f["blob_id"] == blob_id(server.files[f["file"]])
    server.requests.clear()
    code, out, err = run(capsys, "featurize", "--model", NAME, "--text", "Great phone", "--device", "cpu",
                         "-o", tmp_path / "f.npy", "--no-progress")
    assert code == 0, err
    assert np.load(tmp_path / "f.npy").shape == (1, 24) and server.requests == []
    # --root and --mirror
    code, out, err = run(capsys, "download", NAME, "--root", tmp_path / "other", "--mirror", server.url + "/",
                         "--no-progress")
    assert code == 0 and json.loads(out)["folder"] == str(tmp_path / "other" / NAME)


def test_cli_download_errors_are_one_line(registered_standins, server, capsys):
    good = server.files["2.npy"]
    server.files["2.npy"] = good[:-1] + b"\0"
    code, out, err = run(capsys, "download", NAME, "--no-progress")
    assert code == 2 and out == ""
    assert err.startswith("fastmlstm download: error: 2.npy from ") and "git-blob is" in err
    assert len(err.strip().splitlines()) == 1
    # --model by name downloads on first use (progress bars on stderr, then the one error line)
    code, _, err = run(capsys, "probe", "--model", NAME, "--task", "sst2")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("fastmlstm probe: error: 2.npy from ") and "git-blob is" in last
