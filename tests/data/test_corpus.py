"""Language-model byte streams: sources in their formats, the joined stream, and row layouts that
never overlap across rows or ranks."""

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR

from fastmlstm.data.corpus import RowBatcher, Source, build_stream, open_stream


def test_sources_are_joined_one_record_per_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first review\nsecond review")  # no final newline
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(b"zipped \xff\xfe invalid utf-8 kept\n")
    (tmp_path / "c.csv").write_bytes(
        b'label,text\n1,"a ""quoted"", multi\nline review"\n0,plain\n'
    )
    with gzip.open(tmp_path / "d.tsv.gz", "wt") as f:
        f.write("id\tbody\n1\ttab separated\n")
    sources = [Source.parse(tmp_path / "a.txt"), Source.parse(tmp_path / "b.txt.gz"),
               Source.parse(tmp_path / "c.csv"), Source.parse(f"{tmp_path / 'd.tsv.gz'}#body")]
    meta = build_stream(sources, tmp_path / "out" / "corpus.bin")
    data = open_stream(tmp_path / "out" / "corpus.bin")
    assert isinstance(data, np.memmap)
    assert bytes(data) == (b"first review\nsecond review\n" b"zipped \xff\xfe invalid utf-8 kept\n"
                           b'a "quoted", multi line review\nplain\n' b"tab separated\n")
    assert meta["bytes"] == len(data)
    # Same sources: reused, not rebuilt.
    before = (tmp_path / "out" / "corpus.bin").stat().st_mtime_ns
    build_stream(sources, tmp_path / "out" / "corpus.bin")
    assert (tmp_path / "out" / "corpus.bin").stat().st_mtime_ns == before


def test_tsv_fields_are_not_quoted(tmp_path):
    """TSV has no quoting: a review that starts with a quote (common in the Amazon review dumps) is
    its text, quotes included, not a malformed quoted field; CSV keeps its quoting."""
    (tmp_path / "r.tsv").write_text('id\ttext\n1\t"Great" movie, really\n2\tsaid "fine\n3\tlast\n')
    build_stream([Source.parse(tmp_path / "r.tsv")], tmp_path / "out" / "corpus.bin")
    assert bytes(open_stream(tmp_path / "out" / "corpus.bin")) == b'"Great" movie, really\nsaid "fine\nlast\n'


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Source.parse(tmp_path / "missing.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        Source.parse(tmp_path / "nothing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="applies to .csv/.tsv"):
        Source.parse(f"{tmp_path / 'x.txt'}#text")
    (tmp_path / "t.csv").write_text("label,body\n1,x\n")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: label, body\)"):
        build_stream([Source.parse(tmp_path / "t.csv")], tmp_path / "o.bin")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        build_stream([Source.parse(tmp_path / "empty.txt")], tmp_path / "o.bin")
    assert not (tmp_path / "o.bin").exists() and not list(tmp_path.glob(".o.bin*"))
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read corpus file"):
        build_stream([Source.parse(tmp_path / "bad.gz")], tmp_path / "o.bin")


@pytest.mark.parametrize("body, error", [
    # non-strict csv read the rest of the file into the open field: three records became one
    (b'label,text\n1,"hello\n0,bad\n1,bye\n', r"t.csv, line 4: malformed CSV: unexpected end of data"),
    # a row without the column was skipped in silence
    (b"label,text\n1,hello\n0\n1,bye\n", r"t.csv, line 3: 1 field\(s\), no column 'text'"),
    # an unquoted comma cut the text short in silence: "hello" trained on, " world" dropped
    (b"label,text\n1,hello, world\n0,bye\n", r"t.csv, line 2: 3 fields where the header has 2 \(an unquoted comma"),
    # a row short of a field took another field for the text in silence (here the label, "1")
    (b"id,text,label\n7,fine film,1\nawful,0\n", r"t.csv, line 3: 2 fields where the header has 3"),
])
def test_a_damaged_csv_row_is_an_error_not_dropped(tmp_path, body, error):
    (tmp_path / "t.csv").write_bytes(body)
    with pytest.raises(ValueError, match=error):
        build_stream([Source.parse(tmp_path / "t.csv")], tmp_path / "out" / "corpus.bin")
    assert not (tmp_path / "out" / "corpus.bin").exists()
    (tmp_path / "t.csv").write_bytes(b"label,text\r\n1,hello\r\n\r\n0,bye\r\n")  # CRLF and a blank line: fine
    build_stream([Source.parse(tmp_path / "t.csv")], tmp_path / "out" / "corpus.bin")
    assert bytes(open_stream(tmp_path / "out" / "corpus.bin")) == b"hello\nbye\n"


def test_a_directory_of_documents_is_one_record_per_file(tmp_path):
    docs = tmp_path / "aclImdb" / "train" / "unsup"
    docs.mkdir(parents=True)
    (docs / "1_0.txt").write_bytes(b"first review<br />with a\nnewline")
    (docs / "0_0.txt").write_bytes(b"second \xe9 review")
    (docs / ".hidden").write_bytes(b"skipped")
    (docs / "empty.txt").write_bytes(b"")
    meta = build_stream([Source.parse(tmp_path / "aclImdb" / "train")], tmp_path / "c.bin")
    assert bytes(open_stream(tmp_path / "c.bin")) == b"second \xe9 review\nfirst review<br />with a newline\n"
    assert [{k: v for k, v in d.items() if k != "sha256"} for d in meta["sources"]] == [
        {"directory": "train", "files": 3, "size": 47}]  # 31 + 16 + 0 bytes


def test_hidden_folders_of_a_directory_are_skipped_and_an_unlistable_one_is_an_error(tmp_path, monkeypatch):
    docs = tmp_path / "unsup"
    (docs / "sub").mkdir(parents=True)
    (docs / "0_0.txt").write_bytes(b"a review")
    (docs / "sub" / "1_0.txt").write_bytes(b"another")
    # a notebook's checkpoint copy (a document trained on twice) and a git object: not documents
    (docs / ".ipynb_checkpoints").mkdir()
    (docs / ".ipynb_checkpoints" / "0_0-checkpoint.txt").write_bytes(b"a review")
    (docs / "sub" / ".git" / "objects").mkdir(parents=True)
    (docs / "sub" / ".git" / "objects" / "ab").write_bytes(b"\x78\x01binary")
    meta = build_stream([Source.parse(docs)], tmp_path / "c.bin")
    assert bytes(open_stream(tmp_path / "c.bin")) == b"a review\nanother\n"
    assert meta["sources"][0]["files"] == 2
    # a subfolder that cannot be listed was skipped in silence (its documents missing from the corpus)
    scandir = os.scandir

    def refusing(path):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(ValueError, match=r"cannot list corpus folder .*sub: Permission denied"):
        Source.parse(docs)


def test_a_link_to_nothing_in_a_folder_is_an_error_not_one_document_fewer(tmp_path):
    docs = tmp_path / "unsup"
    docs.mkdir()
    (docs / "0_0.txt").write_bytes(b"a review")
    (docs / "1_0.txt").symlink_to(tmp_path / "moved" / "1_0.txt")  # its target went elsewhere
    with pytest.raises(FileNotFoundError, match=r"holds a symbolic link to nothing: .*1_0.txt"):
        Source.parse(docs)


def test_a_file_name_with_a_hash_is_that_file_not_a_column(tmp_path):
    (tmp_path / "reviews#2.txt").write_bytes(b"second batch of reviews\n")
    assert Source.parse(tmp_path / "reviews#2.txt") == Source(tmp_path / "reviews#2.txt")
    (tmp_path / "t#1.csv").write_bytes(b"label,body\n1,x\n")
    assert Source.parse(f"{tmp_path / 't#1.csv'}#body") == Source(tmp_path / "t#1.csv", "body")
    build_stream([Source.parse(tmp_path / "reviews#2.txt")], tmp_path / "c.bin")
    assert bytes(open_stream(tmp_path / "c.bin")) == b"second batch of reviews\n"


def test_a_gzip_file_not_named_gz_is_refused_not_trained_on_compressed(tmp_path):
    zipped = gzip.compress(b"a review\n" * 100)
    for name in ("reviews.txt", "reviews.TXT.GZ", "reviews.csv"):
        (tmp_path / name).write_bytes(zipped)
        with pytest.raises(ValueError, match=f"{name} is gzip-compressed but its name does not end in .gz"):
            Source.parse(tmp_path / name)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "0_0.txt").write_bytes(zipped)
    with pytest.raises(ValueError, match=r"0_0.txt is gzip-compressed"):
        build_stream([Source.parse(tmp_path / "docs")], tmp_path / "c.bin")
    (tmp_path / "docs" / "0_0.txt").rename(tmp_path / "docs" / "0_0.txt.gz")  # named for what it is: read
    build_stream([Source.parse(tmp_path / "docs")], tmp_path / "c.bin")
    assert bytes(open_stream(tmp_path / "c.bin")) == b"a review " * 100 + b"\n"


def test_a_path_that_is_no_file_says_what_it_is(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    with pytest.raises(FileNotFoundError, match="loop1 is a symbolic link to nothing"):
        Source.parse(tmp_path / "loop1")
    if Path("/dev/null").exists():
        with pytest.raises(ValueError, match="/dev/null is not a regular file or a directory"):
            Source.parse("/dev/null")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rows_and_ranks_read_disjoint_regions(world):
    stream = np.arange(10_000, dtype=np.int64)  # each byte's value is its offset
    rows, seq = 8, 7
    seen = {}
    for rank in range(world):
        per = rows // world
        batcher = RowBatcher(stream, rows, seq, rank * per, per)
        for step in range(batcher.steps_per_epoch):
            x, y, starts = batcher.batch(step)
            assert starts == (step == 0)
            assert (y[:, :-1] == x[:, 1:]).all()  # targets are the inputs shifted by one byte
            for r in range(per):
                row = rank * per + r
                window = set(x[r].tolist()) | set(y[r].tolist())
                assert all(row * batcher.region <= v < (row + 1) * batcher.region for v in window)
                seen.setdefault(row, []).extend(x[r].tolist())
        # the next epoch starts over at the same place
        assert batcher.batch(batcher.steps_per_epoch)[2] is True
        assert (batcher.batch(batcher.steps_per_epoch)[0] == batcher.batch(0)[0]).all()
    assert sorted(seen) == list(range(rows))
    everything = [v for row in seen.values() for v in row]
    assert len(everything) == len(set(everything))  # no byte is an input twice in an epoch


def test_a_corpus_shorter_than_one_batch_is_refused():
    with pytest.raises(ValueError, match=r"too few for one batch: 4 rows of 8 \+ 1 bytes"):
        RowBatcher(np.zeros(30, dtype=np.uint8), rows=4, seq=8)


@pytest.mark.skipif(not (DATA_DIR / "imdb" / "train.csv.gz").exists(), reason="shared data not present")
def test_real_csv_column_is_read(tmp_path):
    meta = build_stream([Source.parse(f"{DATA_DIR / 'imdb' / 'train.csv.gz'}#text")], tmp_path / "c.bin")
    data = open_stream(tmp_path / "c.bin")
    lines = bytes(data[:200_000]).split(b"\n")
    assert meta["bytes"] > 30_000_000 and len(lines) > 10
    assert not lines[0].startswith(b"label")


# ------------------------------------------------------------------------------------------
# The cache's content check


def _train(corpus, out, *extra):
    from fastmlstm.training import main as train

    return train(["--preset", "tiny", "--hidden", "8", "--embed", "4", "--batch", "2", "--seq", "16", "--steps", "6",
                  "--ckpt-every", "3", "--eval-bytes", "1000", "--seed", "3", "--data", str(corpus), "--out", str(out),
                  *extra])


def _corpus(path, seed=0, size=120_000):
    rng = np.random.default_rng(seed)
    words = np.array([b"good ", b"bad ", b"movie ", b"plot ", b"was ", b"the ", b"great\n", b"dull\n"])
    text = b"".join(rng.choice(words, size // 4))[: size - 1] + b"\n"
    path.write_bytes(text)
    return text


def test_a_cache_overwritten_in_place_is_rebuilt_and_training_resumes_as_if_nothing_happened(tmp_path, caplog):
    import torch

    import fastmlstm

    corpus = tmp_path / "corpus.txt"
    _corpus(corpus)
    assert _train(corpus, tmp_path / "fresh") == 0
    # The same run as if killed after step 3 (a copy without its later files), then 50 KB of its
    # cache overwritten in place.
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "fresh", out)
    for name in ("ckpt-00000006.pt", "model.pt"):
        (out / name).unlink()
    cache = out / "corpus.bin"
    size = cache.stat().st_size
    with open(cache, "r+b") as f:
        f.seek(20_000)
        f.write(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    assert cache.stat().st_size == size
    caplog.clear()
    assert _train(corpus, out) == 0
    lines = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert lines == [f"fastmlstm: rebuilding {cache}: its bytes changed since it was built (damaged or overwritten)"]
    assert bytes(open_stream(cache)) == bytes(open_stream(tmp_path / "fresh" / "corpus.bin"))
    resumed, fresh = fastmlstm.load(out / "model.pt"), fastmlstm.load(tmp_path / "fresh" / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values()))


def test_a_same_size_edit_of_a_source_is_seen(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    text = _corpus(corpus, size=20_000)
    out = tmp_path / "out" / "corpus.bin"
    first = build_stream([Source.parse(corpus)], out)
    caplog.clear()
    assert build_stream([Source.parse(corpus)], out) == first and not caplog.records  # unchanged: reused
    edited = text[:5000] + text[5000:5100].upper() + text[5100:]
    corpus.write_bytes(edited)
    second = build_stream([Source.parse(corpus)], out)
    assert [r.getMessage() for r in caplog.records] == [
        f"fastmlstm: rebuilding {out}: {corpus} changed since it was built (its content hash differs)"]
    assert bytes(open_stream(out)) == edited and second["bytes"] == first["bytes"]
    assert second["fingerprint"] != first["fingerprint"]  # checkpoints of the old content are another run's
    # a damaged or missing record is a rebuild too, never a reuse
    (out.with_suffix(".json")).write_text("{not json")
    caplog.clear()
    build_stream([Source.parse(corpus)], out)
    assert [r.getMessage() for r in caplog.records] == [
        f"fastmlstm: rebuilding {out}: its record is missing or unreadable"]


def test_a_cache_of_an_older_fastmlstm_keeps_its_runs_name(tmp_path, caplog):
    """corpus.json of the format before content hashes: the cache is rebuilt once, and if its bytes
    were right, the run's fingerprint stays the old one, so its checkpoints still resume."""
    from fastmlstm.data.corpus import fingerprint

    corpus = tmp_path / "corpus.txt"
    _corpus(corpus, size=5000)
    out = tmp_path / "corpus.bin"
    build_stream([Source.parse(corpus)], out)
    old = fingerprint([Source.parse(corpus)])
    out.with_suffix(".json").write_text(json.dumps({"fingerprint": old, "bytes": out.stat().st_size,
                                                    "sources": [Source.parse(corpus).describe()]}))
    assert build_stream([Source.parse(corpus)], out)["fingerprint"] == old
    assert "older fastmlstm" in caplog.records[0].getMessage()
    caplog.clear()
    assert build_stream([Source.parse(corpus)], out)["fingerprint"] == old and not caplog.records
