"""The data writers under injected faults (tests/faults.py: each file-system step fails in turn):
fetch over an existing file, a dataset download over an existing folder, and a corpus cache
rebuilt over an old one. After every failure the previous state is byte-identical; a completed
run gives the new state."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from faults import fresh_copy, hunt, snapshot
from test_fetch import Slow, slow  # noqa: F401 (the server fixture)

from fastmlstm.data.corpus import Source, build_stream, open_stream
from fastmlstm.data.datasets import load
from fastmlstm.data.download import download
from fastmlstm.data.fetch import fetch

assert Slow


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_fetch_over_an_existing_file(slow, tmp_path):  # noqa: F811
    old, new = b"old contents\n" * 100, b"new contents!\n" * 100
    slow.files["f.bin"] = new
    template = tmp_path / "template"
    template.mkdir()
    (template / "f.bin").write_bytes(old)

    def previous_ok(state: Path, error) -> None:
        now = snapshot(state)
        assert now["f.bin"] == hashlib.sha256(old).hexdigest(), error
        assert set(now) <= {"f.bin", "f.bin.part"}, (error, now)  # at most the bytes kept for a resume
        fetch(f"{slow.url}/f.bin", state / "f.bin", checksum=sha256(new), progress=False)  # ... which completes
        assert (state / "f.bin").read_bytes() == new and not (state / "f.bin.part").exists()

    hunt(lambda: fresh_copy(template, tmp_path / "work"),
         lambda state: fetch(f"{slow.url}/f.bin", state / "f.bin", checksum=sha256(new), progress=False),
         previous_ok, lambda state: (state / "f.bin").read_bytes() == new or pytest.fail("new file"))


def _sst2(label: str) -> dict[str, bytes]:
    return {f"{split}_binary_sent.csv": f"label,sentence\n1,{label} {split} good\n0,{label} bad\n".encode()
            for split in ("train", "dev", "test")}


def test_a_dataset_downloaded_again(slow, tmp_path):  # noqa: F811
    """force=True with new files on the server: the dataset folder (and a file the user put there)
    stays byte-identical whatever fails; the archives already fetched are kept and checked."""
    old, new = _sst2("old"), _sst2("new")
    slow.files.update(old)
    template = tmp_path / "template"
    download("sst2", root=template, mirror=slow.url, progress=False)
    (template / "sst2" / "notes.txt").write_text("mine")
    slow.files.update(new)
    pins = {name: sha256(data) for name, data in new.items()}
    before = {k: v for k, v in snapshot(template).items() if k.startswith("sst2")}

    def run(root: Path):
        return download("sst2", root=root, mirror=slow.url, force=True, checksums=pins, progress=False)

    def previous_ok(root: Path, error) -> None:
        assert {k: v for k, v in snapshot(root).items() if k.startswith("sst2")} == before, error
        assert load("sst2", root / "sst2")["train"].texts[0] == "old train good", error
        run(root)  # the next call completes it
        new_ok(root)

    def new_ok(root: Path) -> None:
        assert load("sst2", root / "sst2")["train"].texts[0] == "new train good"
        assert (root / "sst2" / "notes.txt").read_text() == "mine"

    hunt(lambda: fresh_copy(template, tmp_path / "work"), run, previous_ok, new_ok)


def test_a_corpus_cache_rebuilt_over_an_old_one(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    (template / "corpus.txt").write_bytes(b"first version of the corpus\n" * 50)
    build_stream([Source.parse(template / "corpus.txt")], template / "out" / "corpus.bin")
    (template / "corpus.txt").write_bytes(b"other version of the corpus\n" * 50)  # same size
    before = snapshot(template / "out")

    def run(state: Path):
        return build_stream([Source.parse(state / "corpus.txt")], state / "out" / "corpus.bin")

    def previous_ok(state: Path, error) -> None:
        assert snapshot(state / "out") == before, error
        run(state)
        new_ok(state)

    def new_ok(state: Path) -> None:
        assert bytes(open_stream(state / "out" / "corpus.bin")) == b"other version of the corpus\n" * 50

    hunt(lambda: fresh_copy(template, tmp_path / "work"), run, previous_ok, new_ok)
