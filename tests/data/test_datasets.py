"""Dataset loaders on the real files ($FASTMLSTM_DATA, skipped when absent) and on small synthetic
files in the original formats and encodings; the downloader against a local HTTP server on
127.0.0.1 (never the internet)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastmlstm.data import datasets
from fastmlstm.data.datasets import DatasetNotFoundError, decode, load
from fastmlstm.data.download import ChecksumError, DownloadError, download, fetch

REAL = datasets.data_dir()  # $FASTMLSTM_DATA (CI: ../shared/data), else the user cache folder


def real(folder: str, *files: str):
    """Skip unless the shared corpora hold these files."""
    missing = [f for f in files if not (REAL / folder / f).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"real data not found: {REAL / folder} lacks {missing} "
                              "(set FASTMLSTM_DATA to the shared data folder)")


# ------------------------------------------------------------------------------------------
# Real files


@real("sst2", "train_binary_sent.csv", "dev_binary_sent.csv")
def test_real_sst2():
    s = load("sst2", REAL / "sst2")
    assert (len(s["train"]), len(s["dev"])) == (6920, 872) and "test" not in s
    assert set(np.unique(s["train"].labels)) == {0, 1}
    assert s["train"].texts[0].startswith("A stirring, funny and finally transporting")
    assert s["train"].labels[0] == 1
    assert any("," in t for t in s["train"].texts)  # quoted fields with commas survive


@real("imdb", "train.csv.gz")
def test_real_imdb_csv():
    train = load("imdb", REAL / "imdb")["train"]
    assert len(train) == 25000 and np.bincount(train.labels).tolist() == [12500, 12500]
    assert not any("<br" in t.lower() for t in train.texts)  # markup turned into newlines
    assert sum("\n" in t for t in train.texts) > 10000
    raw = load("imdb", REAL / "imdb", keep_markup=True)["train"]
    assert sum("<br />" in t for t in raw.texts) > 10000


@real("subj", "subj.subjective", "subj.objective")
def test_real_subj_windows_1252():
    s = load("subj", REAL / "subj")["all"]
    assert len(s) == 10000 and int(s.labels.sum()) == 5000 and s.labels[0] == 1
    text = "\n".join(s.texts)
    assert "\ufffd" not in text and "h\u00e9roes" in text  # 0xE9 read as é
    assert "\u2018" in text or "\u2019" in text  # 0x91/0x92 read as curly quotes


@real("mpqa", "mpqa.pos", "mpqa.neg")
def test_real_mpqa_skips_empty_lines():
    s = load("mpqa", REAL / "mpqa")["all"]
    assert (int(s.labels.sum()), int((s.labels == 0).sum())) == (3311, 7292)
    assert all(t.strip() for t in s.texts)


@real("msrp", "msr_paraphrase_train.txt")
def test_real_msrp_bom():
    s = load("msrp", REAL / "msrp")["train"]
    assert len(s) == 4076 and s.labels[0] == 1 and s.ids[0] == "702876-702977"
    assert s.first[0].startswith("Amrozi accused") and '"the witness"' in s.first[0]
    assert not any("\ufeff" in t for t in s.first + s.ids)


@real("sick", "SICK_train.txt", "SICK_trial.txt")
def test_real_sick():
    s = load("sick", REAL / "sick")
    assert len(s["train"]) == 4500 and len(s["dev"]) == 500 and "test" not in s
    assert s["train"].labels.dtype == np.float64 and s["train"].labels[0] == pytest.approx(4.5)
    assert 1.0 <= s["train"].labels.min() and s["train"].labels.max() <= 5.0


@real("amazon", "multidomain.csv.gz")
def test_real_multidomain():
    s = load("multidomain", REAL / "amazon")["all"]
    assert len(s) == 8000 and sorted(set(s.groups)) == ["books", "dvd", "electronics", "kitchen"]
    assert np.bincount(s.labels).tolist() == [4000, 4000]
    # 206 rows hold entities in the file; one review is escaped twice there (&amp;quot;) and keeps
    # one level, which featurize's html.unescape then removes
    assert sum("&quot;" in t or "&amp;" in t for t in s.texts) == 1


def test_default_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMLSTM_DATA", str(tmp_path))
    assert datasets.data_dir() == tmp_path and datasets.dataset_dir("multidomain") == tmp_path / "amazon"
    monkeypatch.delenv("FASTMLSTM_DATA")
    assert datasets.data_dir() == Path("~/.cache/fastmlstm/data").expanduser()


# ------------------------------------------------------------------------------------------
# Synthetic files in the original formats


def write(path: Path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_sst2_csv(tmp_path):
    write(tmp_path / "train_binary_sent.csv", 'label,sentence\n1,"Funny, warm and ""smart"""\n0,Dull .\n')
    write(tmp_path / "dev_binary_sent.csv", "label,sentence\n0,Bad\n1,Good\n")
    write(tmp_path / "test_binary_sent.csv", "label,sentence\n1,caf\u00e9\n")
    s = load("sst2", tmp_path)
    assert s["train"].texts == ['Funny, warm and "smart"', "Dull ."] and s["train"].labels.tolist() == [1, 0]
    assert s["test"].texts == ["caf\u00e9"]
    write(tmp_path / "dev_binary_sent.csv", "label,sentence\n2,Huh\n")
    with pytest.raises(ValueError, match=r"dev_binary_sent.csv, line 2: label '2'"):
        load("sst2", tmp_path)
    write(tmp_path / "dev_binary_sent.csv", "sentence,label\nHuh,1\n")
    with pytest.raises(ValueError, match="header"):
        load("sst2", tmp_path)


def test_sst2_missing_file_names_it(tmp_path):
    write(tmp_path / "train_binary_sent.csv", "label,sentence\n1,a\n")
    with pytest.raises(DatasetNotFoundError, match=r"dev_binary_sent.csv.*FASTMLSTM_DATA.*fastmlstm download sst2"):
        load("sst2", tmp_path)
    with pytest.raises(FileNotFoundError):  # DatasetNotFoundError is a FileNotFoundError
        load("sst2", tmp_path / "absent")


def test_imdb_acl_folders(tmp_path):
    base = tmp_path / "aclImdb"
    write(base / "train/pos/10_9.txt", "Loved it.<br /><br />Would watch again.")
    write(base / "train/pos/2_8.txt", "Fine<br/>film")
    write(base / "train/neg/3_1.txt", "Awful &amp; long.")
    write(base / "test/pos/0_10.txt", "Great")
    write(base / "test/neg/1_2.txt", "Bad")
    write(base / "train/unsup/5_0.txt", "ignored")
    s = load("imdb", tmp_path)
    assert s["train"].texts == ["Fine\nfilm", "Loved it.\nWould watch again.", "Awful &amp; long."]
    assert s["train"].labels.tolist() == [1, 1, 0] and len(s["test"]) == 2
    (base / "test/neg/1_2.txt").unlink()
    (base / "test/neg").rmdir()
    with pytest.raises(DatasetNotFoundError, match="neg/ folder"):
        load("imdb", tmp_path)


def test_imdb_csv_gz(tmp_path):
    write(tmp_path / "train.csv.gz", gzip.compress(b'label,text\n1,"Good<br />Really, good"\n0,Bad\n'))
    s = load("imdb", tmp_path)
    assert s["train"].texts == ["Good\nReally, good", "Bad"] and "test" not in s
    with pytest.raises(DatasetNotFoundError, match="aclImdb/train"):
        load("imdb", tmp_path / "empty")


def test_mr_windows_1252_and_blank_lines(tmp_path):
    write(tmp_path / "rt-polaritydata/rt-polarity.pos", b"simply a masterpiece \x96 c\xe9sar\n\ngreat fun . \n")
    write(tmp_path / "rt-polaritydata/rt-polarity.neg", b"a mess\r\n")
    s = load("mr", tmp_path)["all"]
    assert s.texts == ["simply a masterpiece \u2013 c\u00e9sar", "great fun . ", "a mess"]
    assert s.labels.tolist() == [1, 1, 0]


def test_cr(tmp_path):
    write(tmp_path / "custrev.pos", "works great\n")
    write(tmp_path / "custrev.neg", "broke in a week\nno signal\n")
    s = load("cr", tmp_path)["all"]
    assert s.texts == ["works great", "broke in a week", "no signal"] and s.labels.tolist() == [1, 0, 0]
    (tmp_path / "custrev.neg").unlink()
    with pytest.raises(DatasetNotFoundError, match="custrev.neg"):
        load("cr", tmp_path)


def test_subj_original_names_and_mixed_encodings(tmp_path):
    # a UTF-8 line and a Windows-1252 line in one file; 0x81 is undefined in Windows-1252
    write(tmp_path / "rotten_imdb/quote.tok.gt9.5000", "na\u00efve fun\n".encode() + b"\x93smart\x94 \x81\n")
    write(tmp_path / "rotten_imdb/plot.tok.gt9.5000", b"the plot follows a man .\n")
    s = load("subj", tmp_path)["all"]
    assert s.texts == ["na\u00efve fun", "\u201csmart\u201d \x81", "the plot follows a man ."]
    assert s.labels.tolist() == [1, 1, 0]


def test_mpqa_empty_lines(tmp_path):
    write(tmp_path / "mpqa.pos", "are also being encouraged\n\n  \nto win\n")
    write(tmp_path / "mpqa.neg", "\nfailed\n")
    s = load("mpqa", tmp_path)["all"]
    assert s.texts == ["are also being encouraged", "to win", "failed"] and s.labels.tolist() == [1, 1, 0]


def test_msrp_with_bom_and_header(tmp_path):
    body = ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
            '1\t702876\t702977\tHe called "the witness", twice.\tHe said "the witness".\r\n'
            "0\t2108705\t2108831\tA b.\tC d.\r\n")
    write(tmp_path / "msr_paraphrase_train.txt", b"\xef\xbb\xbf" + body.encode())
    write(tmp_path / "msr_paraphrase_test.txt", "1\t1\t2\tx\ty\n")  # no BOM, no header
    s = load("msrp", tmp_path)
    assert s["train"].first == ['He called "the witness", twice.', "A b."]
    assert s["train"].second[0] == 'He said "the witness".' and s["train"].labels.tolist() == [1, 0]
    assert s["train"].ids == ["702876-702977", "2108705-2108831"] and len(s["test"]) == 1
    write(tmp_path / "msr_paraphrase_test.txt", "1\tonly three\tfields\n")
    with pytest.raises(ValueError, match="line 1: expected 5 tab-separated fields"):
        load("msrp", tmp_path)


def test_sick_with_header(tmp_path):
    header = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    write(tmp_path / "SICK_train.txt", header + "1\tA dog runs\tA dog is running\t4.5\tENTAILMENT\n")
    write(tmp_path / "SICK_test_annotated.txt", header + "7\tA\tB\t1\tNEUTRAL\n")
    s = load("sick", tmp_path)
    assert s["train"].first == ["A dog runs"] and s["train"].labels.tolist() == [4.5]
    assert "dev" not in s and s["test"].ids == ["7"]
    write(tmp_path / "SICK_train.txt", header + "1\tA\tB\t7.5\tNEUTRAL\n")
    with pytest.raises(ValueError, match=r"outside \[1, 5\]"):
        load("sick", tmp_path)


def test_yelp_csv(tmp_path):
    rows = '"2","Great tacos.\\nFriendly staff, ""best"" in town."\n"1","Cold food."\n'
    write(tmp_path / "yelp_review_polarity_csv/train.csv", rows)
    s = load("yelp", tmp_path)
    assert s["train"].texts == ['Great tacos.\nFriendly staff, "best" in town.', "Cold food."]
    assert s["train"].labels.tolist() == [1, 0] and "test" not in s


def test_multidomain_original_review_files(tmp_path):
    review = ("<review>\n<rating>\n5.0\n</rating>\n<review_text>\nGreat &quot;value&quot;\n"
              "would buy &amp; recommend\n</review_text>\n</review>\n")
    write(tmp_path / "books/positive.review", review)
    write(tmp_path / "books/negative.review",
          b"<review>\n<review_text>\nfianc\x1a broke it \x96 sad\n</review_text>\n</review>\n")
    s = load("multidomain", tmp_path)["all"]
    assert s.texts == ['Great "value" would buy & recommend', "fianc\x1a broke it \u2013 sad"]
    assert s.labels.tolist() == [1, 0] and s.groups == ["books", "books"]


def test_decode():
    assert decode(b"\xef\xbb\xbfplain") == "plain"
    assert decode(b"caf\xe9 ok\nna\xc3\xafve") == "caf\u00e9 ok\nna\u00efve"
    assert decode(gzip.decompress(gzip.compress(b"x"))) == "x"


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'trec'"):
        load("trec")


def test_splits_check_their_lengths_when_made():
    from fastmlstm.errors import InputError, InputTypeError

    s = datasets.TextSplit(("a", "b", "c"), [0, 1, 0], groups=np.array(["x", "y", "z"]))
    assert s.texts == ["a", "b", "c"] and isinstance(s.labels, np.ndarray) and s.groups == ["x", "y", "z"]
    assert s.subset([2, 0]).labels.tolist() == [0, 0]
    with pytest.raises(InputError, match=r"3 texts but labels of shape \(2,\)"):
        datasets.TextSplit(["a", "b", "c"], [0, 1])
    with pytest.raises(InputError, match=r"labels of shape \(3, 1\)"):
        datasets.TextSplit(["a", "b", "c"], np.zeros((3, 1)))
    with pytest.raises(InputError, match="3 texts but 2 groups"):
        datasets.TextSplit(["a", "b", "c"], [0, 1, 0], groups=["x", "y"])
    with pytest.raises(InputTypeError, match="not a single str"):
        datasets.TextSplit("abc", [0, 1, 0])
    p = datasets.PairSplit(["a", "b"], ["c", "d"], np.array([1, 0]), ["1-2", "3-4"])
    assert p.subset([1]).ids == ["3-4"] and len(p) == 2
    with pytest.raises(InputError, match="2 first texts but 1 second texts"):
        datasets.PairSplit(["a", "b"], ["c"], np.array([1, 0]))
    with pytest.raises(InputError, match="2 pairs but labels of shape"):
        datasets.PairSplit(["a", "b"], ["c", "d"], np.array([1, 0, 1]))
    with pytest.raises(InputError, match="2 pairs but 1 ids"):
        datasets.PairSplit(["a", "b"], ["c", "d"], np.array([1, 0]), ["1-2"])


# ------------------------------------------------------------------------------------------
# Downloads from a local HTTP server


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/'www'; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()


def nb_acl12_zip(path: Path, pos=b"good\n\nfine\n"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data/mpqa/mpqa.pos", pos)
        z.writestr("data/mpqa/mpqa.neg", b"bad\n")
        z.writestr("data/rt10662/rt-polarity.pos", b"c\xe9sar\n")
        z.writestr("data/rt10662/rt-polarity.neg", b"dull\n")
        z.writestr("data/customerr/custrev.pos", b"ok\n")
        z.writestr("data/customerr/custrev.neg", b"no\n")
        z.writestr("data/subj/subj.subjective", b"i think\n")
        z.writestr("data/subj/subj.objective", b"it is\n")
        z.writestr("data/README", b"unused")


def test_download_zip_and_trust_on_first_use(server, tmp_path):
    base, www = server
    nb_acl12_zip(www / "datasmall_NB_ACL12.zip")
    root = tmp_path / "data"
    folder = download("mpqa", root=root, mirror=base, progress=False)
    assert folder == root / "mpqa" and sorted(p.name for p in folder.iterdir()) == ["mpqa.neg", "mpqa.pos"]
    assert load("mpqa", folder)["all"].texts == ["good", "fine", "bad"]
    sha = hashlib.sha256((www / "datasmall_NB_ACL12.zip").read_bytes()).hexdigest()
    assert (root / "downloads/SHA256SUMS").read_text() == f"{sha}  datasmall_NB_ACL12.zip\n"
    # the same archive serves MR without fetching again (the server no longer has it)
    (www / "datasmall_NB_ACL12.zip").rename(www / "moved.zip")
    assert load("mr", download("mr", root=root, mirror=base, progress=False))["all"].texts == ["c\u00e9sar", "dull"]
    # already in place: no network at all
    assert download("mpqa", root=root, mirror="http://127.0.0.1:9", progress=False) == folder
    # a changed file on the server no longer matches what was recorded on first use
    nb_acl12_zip(www / "datasmall_NB_ACL12.zip", pos=b"tampered\n")
    with pytest.raises(ChecksumError, match="expected " + sha):
        download("mpqa", root=root, mirror=base, force=True, progress=False)
    assert hashlib.sha256((root / "downloads/datasmall_NB_ACL12.zip").read_bytes()).hexdigest() == sha
    assert not [p for p in (root / "downloads").iterdir() if p.name.endswith(".part")]


def test_download_pinned_checksum(server, tmp_path):
    base, www = server
    body = b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\ta\tb\r\n"
    write(www / "msr_paraphrase_train.txt", body)
    write(www / "msr_paraphrase_test.txt", body)
    root = tmp_path / "data"
    # the pinned MD5 is the published one, which this file is not
    with pytest.raises(ChecksumError, match="md5"):
        download("msrp", root=root, mirror=base, progress=False)
    assert not (root / "downloads/msr_paraphrase_train.txt").exists()
    sha = "sha256:" + hashlib.sha256(body).hexdigest()
    folder = download("msrp", root=root, mirror=base, progress=False,
                      checksums={"msr_paraphrase_train.txt": sha, "msr_paraphrase_test.txt": sha})
    assert load("msrp", folder)["train"].first == ["a"]


def test_download_tar_members(server, tmp_path):
    base, www = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in [("yelp_review_polarity_csv/train.csv", b'"1","meh"\n"2","yum"\n'),
                           ("yelp_review_polarity_csv/test.csv", b'"2","wow"\n'),
                           ("yelp_review_polarity_csv/readme.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    write(www / "yelp_review_polarity_csv.tgz", buf.getvalue())
    folder = download("yelp", root=tmp_path / "data", mirror=base, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv"]
    assert load("yelp", folder)["train"].labels.tolist() == [0, 1]


def test_download_errors(server, tmp_path):
    base, www = server
    with pytest.raises(ValueError, match="no download source for 'multidomain'"):
        download("multidomain", root=tmp_path)
    with pytest.raises(ValueError, match="only http"):
        fetch("file:///etc/passwd", tmp_path / "x")
    with pytest.raises(DownloadError, match=r"could not fetch http://127.0.0.1:\d+/train_binary_sent.csv: HTTP 404"):
        download("sst2", root=tmp_path / "data", mirror=base, progress=False)
    write(www / "datasmall_NB_ACL12.zip", b"not an archive")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        download("cr", root=tmp_path / "data", mirror=base, progress=False)
    with zipfile.ZipFile(www / "datasmall_NB_ACL12.zip", "w") as z:
        z.writestr("data/other.txt", b"x")
    with pytest.raises(ValueError, match="none of the files"):
        download("cr", root=tmp_path / "data2", mirror=base, progress=False)
