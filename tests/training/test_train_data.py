"""The training job's data stage: which bytes every rank's rows read, checked against a layout
computed here from the corpus's raw bytes, and held-out data that is kept out of training."""

import shutil

import numpy as np
import pytest
import torch

from fastmlstm.training import main, parse_args
from fastmlstm.training.data import prepare_data
from fastmlstm.training.distributed import Context

TINY = ["--preset", "tiny", "--hidden", "8", "--embed", "4", "--batch", "2", "--seq", "8", "--steps", "1"]


class OneProcess(Context):
    """Rank ``rank`` of ``world`` without a process group: the collectives of one process."""

    def barrier(self) -> None:
        pass

    def all_ok(self, ok: bool) -> bool:
        return ok


def _data(tmp_path, world: int, rank: int, *flags: str):
    args = parse_args(["--preset", "tiny", "--out", str(tmp_path / "run"), *flags])
    args.steps = None  # one epoch, as the paper preset leaves it
    return prepare_data(args, OneProcess(rank, world, rank, torch.device("cpu")), tmp_path / "run"), args


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_rows_are_the_whole_batchs_rows_of_the_training_part_only(tmp_path, world):
    raw = np.random.default_rng(0).integers(0, 256, 5003, dtype=np.uint8).tobytes()  # not UTF-8, no final newline
    (tmp_path / "c.txt").write_bytes(raw)
    stream = raw + b"\n"  # the joined stream ends each source with a newline
    batch, seq, held = 6, 5, 700
    ranks = [_data(tmp_path, world, rank, "--data", str(tmp_path / "c.txt"), "--batch", str(batch), "--seq",
                   str(seq), "--eval-bytes", str(held)) for rank in range(world)]
    training, held_out = stream[: len(stream) - held], stream[len(stream) - held:]
    region = len(training) // batch
    per_epoch = (region - 1) // seq
    assert [(d.row_start, d.rows) for d, _ in ranks] == [(r * batch // world, batch // world) for r in range(world)]
    assert all(args.steps == per_epoch for _, args in ranks)
    for step in [0, 1, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch]:
        parts = [d.batcher.batch(step) for d, _ in ranks]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        assert all(p[2] == (step % per_epoch == 0) for p in parts)  # a new epoch: the carried state restarts
        start = (step % per_epoch) * seq
        for row in range(batch):
            window = training[row * region + start: row * region + start + seq + 1]
            assert bytes(x[row].numpy()) == window[:-1] and bytes(y[row].numpy()) == window[1:]
    # the held-out part, laid out the same way, is read only by the evaluation
    held_region = len(held_out) // batch
    for step in range(ranks[0][0].eval_batcher.steps_per_epoch):
        x = torch.cat([d.eval_batcher.batch(step)[0] for d, _ in ranks])
        for row in range(batch):
            assert bytes(x[row].numpy()) == held_out[row * held_region + step * seq: row * held_region + (step + 1) * seq]


@pytest.mark.parametrize("case", ["same-file", "file-in-data-folder", "data-in-eval-folder", "same-content"])
def test_held_out_data_that_is_also_trained_on_is_refused(tmp_path, capsys, case):
    docs = tmp_path / "docs"
    docs.mkdir()
    text = b"a review of a film that was fine\n" * 100
    (docs / "a.txt").write_bytes(text)
    (docs / "b.txt").write_bytes(text.upper())
    (tmp_path / "copy.txt").write_bytes(text)
    data, held = {"same-file": (docs / "a.txt", docs / "a.txt"), "file-in-data-folder": (docs, docs / "b.txt"),
                  "data-in-eval-folder": (docs / "a.txt", docs), "same-content": (docs / "a.txt", tmp_path / "copy.txt"),
                  }[case]
    assert main([*TINY, "--data", str(data), "--eval-data", str(held), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastmlstm train: error: --eval-data {held} is also trained on (--data {data})"), err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
    # held-out data of its own is fine
    shutil.copy(docs / "b.txt", tmp_path / "other.txt")
    d, _ = _data(tmp_path, 1, 0, "--data", str(docs / "a.txt"), "--eval-data", str(tmp_path / "other.txt"),
                 "--batch", "2", "--seq", "8")
    assert list(d.eval) == ["data"] and bytes(d.eval_batcher.batch(0)[0][0].numpy()) == text.upper()[:8]


def test_a_training_part_too_short_after_the_held_out_bytes_says_so(tmp_path, capsys):
    (tmp_path / "c.txt").write_bytes(b"x" * 99 + b"\n")
    assert main([*TINY, "--data", str(tmp_path / "c.txt"), "--eval-bytes", "90", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    # it said "the corpus has 10 bytes" of a 100-byte corpus, and did not name --eval-bytes
    assert err == ("fastmlstm train: error: the corpus less its last 90 bytes (--eval-bytes) has 10 bytes, too few "
                   "for one batch: 2 rows of 8 + 1 bytes need at least 18; use a larger corpus, --eval-bytes, "
                   "--batch or --seq smaller\n")


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
@pytest.mark.parametrize("case", ["same-file", "same-file-other-spelling", "file-in-folder", "folder-in-folder"])
def test_a_source_named_twice_is_refused(tmp_path, capsys, flag, case):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_bytes(b"one review, read once\n" * 50)
    (docs / "sub" / "b.txt").write_bytes(b"another one\n" * 50)
    (tmp_path / "train.txt").write_bytes(b"the training text\n" * 50)
    first, second = {"same-file": (docs / "a.txt", docs / "a.txt"),
                     "same-file-other-spelling": (docs / "a.txt", docs / "sub" / ".." / "a.txt"),
                     "file-in-folder": (docs, docs / "sub" / "b.txt"), "folder-in-folder": (docs / "sub", docs)}[case]
    other = ["--data", str(tmp_path / "train.txt")] if flag == "--eval-data" else []
    argv = [*TINY, *other, flag, str(first), flag, str(second), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # each was read twice: its text weighted double in the stream, without a word
    assert err.startswith(f"fastmlstm train: error: {flag} {second} repeats {flag} {first}"), err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_two_columns_of_one_table_are_two_sources(tmp_path):
    (tmp_path / "t.csv").write_text("title,text\n" + "a title,a longer text of the review\n" * 40)
    d, _ = _data(tmp_path, 1, 0, "--data", f"{tmp_path / 't.csv'}#title", "--data", f"{tmp_path / 't.csv'}#text",
                 "--batch", "2", "--seq", "8", "--eval-bytes", "0")
    assert d.batcher.steps_per_epoch > 0


def test_eval_bytes_and_eval_data_exclude_each_other(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"text to train on\n" * 50)
    (tmp_path / "b.txt").write_bytes(b"text to evaluate on\n" * 50)
    argv = [*TINY, "--data", str(tmp_path / "a.txt"), "--eval-data", str(tmp_path / "b.txt"), "--eval-bytes", "100",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2  # --eval-bytes was ignored without a word
    assert capsys.readouterr().err.startswith("fastmlstm train: error: --eval-bytes and --eval-data exclude each other")
    assert not (tmp_path / "run").exists()
