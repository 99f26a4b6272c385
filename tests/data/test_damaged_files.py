"""Damaged evaluation-set files: each is one InputError naming the file (and line), never rows
dropped, merged or cut short in silence, and never a traceback from inside the reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from fastmlstm.data.datasets import load
from fastmlstm.errors import InputError


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def sst2(folder: Path, dev: bytes | str) -> Path:
    write(folder / "train_binary_sent.csv", "label,sentence\n1,good\n0,bad\n")
    write(folder / "dev_binary_sent.csv", dev)
    return folder


def test_csv_quote_that_never_closes(tmp_path):
    # non-strict csv reads the rest of the file into that one field: three rows become one
    sst2(tmp_path, 'label,sentence\n1,"good\n0,bad\n1,fine\n')
    with pytest.raises(InputError, match=r"dev_binary_sent.csv, line 2: malformed CSV"):
        load("sst2", tmp_path)
    sst2(tmp_path, 'label,sentence\n0,bad\n1,"go"od\n')  # text after a closing quote
    with pytest.raises(InputError, match=r"dev_binary_sent.csv, line 3: malformed CSV"):
        load("sst2", tmp_path)


def test_csv_row_with_more_fields_than_the_header(tmp_path):
    sst2(tmp_path, "label,sentence\n1,good, really good\n0,bad\n")  # the text was cut at the comma
    with pytest.raises(InputError, match=r"dev_binary_sent.csv, line 2: 3 fields where 2"):
        load("sst2", tmp_path)
    write(tmp_path / "imdb/train.csv.gz", gzip.compress(b"label,text\n1,ok\n0\n"))
    with pytest.raises(InputError, match=r"train.csv.gz, line 3: 1 fields where 2"):
        load("imdb", tmp_path / "imdb")


def test_blitzer_csv_short_row(tmp_path):
    write(tmp_path / "multidomain.csv", "label,text,domain,rating,title\n1,good,books,5,t\n0,bad\n")
    with pytest.raises(InputError, match=r"multidomain.csv, line 3: 2 fields where 5"):  # was an IndexError
        load("multidomain", tmp_path)


def test_yelp_rows_have_two_fields(tmp_path):
    write(tmp_path / "train.csv", '"2","good"\n"1","bad","extra"\n')
    with pytest.raises(InputError, match=r"train.csv, line 2: 3 fields where 2"):
        load("yelp", tmp_path)


@pytest.mark.parametrize("name, files, empty", [
    ("sst2", {"train_binary_sent.csv": "label,sentence\n1,a\n"}, "dev_binary_sent.csv"),  # a header only
    ("subj", {"subj.subjective": "fun\n"}, "subj.objective"),
    ("mpqa", {"mpqa.pos": "good\n"}, "mpqa.neg"),
    ("msrp", {}, "msr_paraphrase_train.txt"),
    ("sick", {"SICK_train.txt": "1\ta\tb\t3.5\tNEUTRAL\n"}, "SICK_trial.txt"),
])
def test_a_file_without_examples(tmp_path, name, files, empty):
    for fname, text in files.items():
        write(tmp_path / fname, text)
    write(tmp_path / empty, "label,sentence\n" if name == "sst2" else "\n \n")
    with pytest.raises(InputError, match=rf"{empty} holds no examples"):  # was a split of one class, or none
        load(name, tmp_path)


def test_blitzer_review_file_without_reviews(tmp_path):
    write(tmp_path / "books/positive.review", "<review>\n<review_text>\nGreat\n</review_text>\n</review>\n")
    write(tmp_path / "books/negative.review", "")
    with pytest.raises(InputError, match=r"negative.review holds no <review_text>"):
        load("multidomain", tmp_path)


def test_line_endings_lf_crlf_and_cr(tmp_path):
    for ending in ("\n", "\r\n", "\r"):
        write(tmp_path / "subj.subjective", ending.join(["fun", "smart", ""]))
        write(tmp_path / "subj.objective", ending.join(["a man walks .", ""]))
        s = load("subj", tmp_path)["all"]
        assert s.texts == ["fun", "smart", "a man walks ."], repr(ending)
        write(tmp_path / "msr_paraphrase_train.txt", ending.join(["1\t1\t2\ta\tb", "0\t3\t4\tc\td", ""]))
        assert load("msrp", tmp_path)["train"].second == ["b", "d"], repr(ending)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_files_are_refused(tmp_path, encoding):
    write(tmp_path / "subj.subjective", "fun\nsmart\n".encode(encoding))
    write(tmp_path / "subj.objective", "a man walks .\n")
    with pytest.raises(InputError, match=r"subj.subjective looks like UTF-(16|32) text"):
        load("subj", tmp_path)


def test_tsv_rows_with_extra_fields(tmp_path):
    write(tmp_path / "msr_paraphrase_train.txt", "1\t1\t2\ta\tb\n0\t3\t4\tc\td\te\n")
    with pytest.raises(InputError, match=r"line 2: expected 5 tab-separated fields, got 6"):
        load("msrp", tmp_path)
    write(tmp_path / "SICK_train.txt", "1\ta\tb\t3.5\tNEUTRAL\textra\n")
    with pytest.raises(InputError, match=r"line 1: expected 4 to 5 tab-separated fields, got 6"):
        load("sick", tmp_path)


def test_a_folder_where_a_file_should_be(tmp_path):
    sst2(tmp_path, "label,sentence\n1,a\n")
    (tmp_path / "dev_binary_sent.csv").unlink()
    (tmp_path / "dev_binary_sent.csv").mkdir()
    with pytest.raises(InputError, match=r"dev_binary_sent.csv is a folder"):
        load("sst2", tmp_path)
    write(tmp_path / "sick/SICK_train.txt", "1\ta\tb\t3.5\tNEUTRAL\n")
    (tmp_path / "sick/SICK_trial.txt").mkdir()  # an optional split: it was left out in silence
    with pytest.raises(InputError, match=r"SICK_trial.txt is a folder"):
        load("sick", tmp_path / "sick")
    write(tmp_path / "imdb/aclImdb/train/pos/1_9.txt", "good")
    write(tmp_path / "imdb/aclImdb/train/neg/2_1.txt", "bad")
    (tmp_path / "imdb/aclImdb/train/neg/3_2.txt").mkdir()  # was an IsADirectoryError traceback
    with pytest.raises(InputError, match=r"cannot read .*3_2.txt: Is a directory"):
        load("imdb", tmp_path / "imdb")
    with pytest.raises(InputError, match=r"is a file; give the dataset's folder"):
        load("sst2", tmp_path / "imdb/aclImdb/train/pos/1_9.txt")
