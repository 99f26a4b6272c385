"""What the run writes cannot be written (a full disk, a directory in the way): one clear error
line, the files written before it intact, and a re-run of the same command resumes exactly; and the
checkpoints themselves are the same for two runs of one command (every random generator seeded)."""

import errno
import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import word_corpus

from fastmlstm.training import loop, main, metrics

ARGS = ["--preset", "tiny", "--hidden", "16", "--embed", "8", "--batch", "4", "--seq", "16", "--lr", "5e-3",
        "--steps", "8", "--ckpt-every", "2", "--log-every", "2", "--eval-every", "4", "--eval-bytes", "1000",
        "--keep", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("corpus") / "reviews.txt", seed=5, lines=200)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main([*ARGS, "--data", str(corpus), "--out", str(out)]) == 0
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fastmlstm train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _raw_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _records(out):
    return [{k: v for k, v in r.items() if k != "chars_per_s"} for r in _raw_records(out)]


def _disk_full():
    return OSError(errno.ENOSPC, "No space left on device")


def _full_disk_at_checkpoint(monkeypatch, step):
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step and "optimizer" in obj:
            f.write(b"the first bytes of a checkpoint")
            raise _disk_full()
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _full_disk_at_metrics_record(monkeypatch, n):
    write, seen = metrics.Metrics.write, [0]

    def full(self, record):
        seen[0] += 1
        if seen[0] == n:
            raise _disk_full()
        write(self, record)

    monkeypatch.setattr(metrics.Metrics, "write", full)


def _full_disk_at_model(monkeypatch):
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" not in obj and "state_dict" in obj:
            raise _disk_full()
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("where, what, kept", [
    ("checkpoint", "the checkpoint {out}/ckpt-00000006.pt", "ckpt-00000004.pt"),
    ("metrics", "the metrics file {out}/metrics.jsonl", "ckpt-00000004.pt"),
    ("model", "the model {out}/model.pt", "ckpt-00000008.pt"),
])
def test_a_full_disk_is_one_error_line_and_the_rerun_resumes_exactly(where, what, kept, corpus, uninterrupted, tmp_path,
                                                                   capsys, monkeypatch):
    # It used to be an OSError traceback from inside the atomic write (and, under torchrun, rank 0
    # dying alone while the other ranks waited for it).
    argv = [*ARGS, "--data", str(corpus), "--out", str(tmp_path)]
    {"checkpoint": lambda: _full_disk_at_checkpoint(monkeypatch, 6),
     "metrics": lambda: _full_disk_at_metrics_record(monkeypatch, 4),
     "model": lambda: _full_disk_at_model(monkeypatch)}[where]()
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert f"cannot write {what.format(out=tmp_path)}: No space left on device" in err, err
    assert "re-run the same command to resume" in err, err
    assert not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / kept).exists()  # what was written before it is intact
    monkeypatch.undo()
    assert main(argv) == 0
    model = _weights(tmp_path / "model.pt")
    expected = _weights(uninterrupted / "model.pt")
    assert model.keys() == expected.keys() and all(torch.equal(model[k], expected[k]) for k in model)
    assert _records(tmp_path) == _records(uninterrupted)


@pytest.mark.parametrize("name", ["metrics.jsonl", "model.pt"])
def test_a_directory_where_an_output_goes_is_refused_before_the_first_update(name, corpus, tmp_path, capsys):
    # metrics.jsonl: an IsADirectoryError traceback; model.pt: an error only after the last update.
    (tmp_path / name).mkdir()
    assert main([*ARGS, "--data", str(corpus), "--out", str(tmp_path)]) == 2
    err = _one_error_line(capsys)
    assert f"cannot write {tmp_path / name}: it is a directory" in err, err
    assert not list(tmp_path.glob("ckpt-*")) and (tmp_path / name).is_dir()


def test_two_runs_of_one_command_write_the_same_random_states(corpus, tmp_path):
    # NumPy's and Python's generators were left as the process found them (seeded from the OS), so
    # the checkpoints of two identical runs differed in their recorded random states.
    states = []
    for run in ("a", "b"):
        np.random.seed(None)
        random.seed()
        assert main([*ARGS, "--steps", "2", "--data", str(corpus), "--out", str(tmp_path / run)]) == 0
        rng = torch.load(tmp_path / run / "ckpt-00000002.pt", weights_only=True)["rng"]
        states.append((rng["numpy"], rng["python"]))
    assert states[0] == states[1]


class _Clock:
    """Stands in for the time module in fastmlstm.training.metrics: its time moves only when told."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _taking(clock: _Clock, seconds: float, fn):
    def run(*args, **kwargs):
        clock.now += seconds
        return fn(*args, **kwargs)
    return run


def test_chars_per_s_counts_the_updates_timed_and_only_their_time(corpus, tmp_path, monkeypatch):
    # An evaluation in the middle of a log window restarted the clock but kept the updates before it
    # in the count (chars/s twice too high here), a checkpoint write counted as training time, and the
    # first record after a resume divided the interrupted run's updates by the resumed run's time.
    clock = _Clock()
    monkeypatch.setattr(metrics, "time", clock)
    monkeypatch.setattr(loop, "train_step", _taking(clock, 1.0, loop.train_step))  # each update: 1 s
    monkeypatch.setattr(loop, "evaluate", _taking(clock, 100.0, loop.evaluate))
    monkeypatch.setattr(loop, "save_checkpoint", _taking(clock, 50.0, loop.save_checkpoint))
    argv = [*ARGS, "--log-every", "4", "--eval-every", "2", "--ckpt-every", "3", "--keep", "5", "--data", str(corpus),
            "--out", str(tmp_path)]
    assert main(argv) == 0
    per_update = 4 * 16  # --batch x --seq bytes, in 1 s
    assert [r["chars_per_s"] for r in _raw_records(tmp_path) if "chars_per_s" in r] == [per_update] * 2
    # Resumed from update 6, halfway through the window that update 8 logs.
    (tmp_path / "ckpt-00000008.pt").unlink()
    (tmp_path / "model.pt").unlink()
    assert main(argv) == 0
    assert [r["chars_per_s"] for r in _raw_records(tmp_path) if "chars_per_s" in r] == [per_update] * 2


class _IdenticalRanks:
    """The collectives of ``world`` ranks that all hold this rank's numbers."""

    def __init__(self, world: int):
        self.world = world

    def sum(self, *values: float) -> list[float]:
        return [value * self.world for value in values]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 2), (None, 2)], ids=["2-to-1", "1-to-2", "2-to-2",
                                                                                   "older-checkpoint"])
def test_a_log_window_resumed_on_another_number_of_ranks_keeps_its_mean(before, after):
    # A checkpoint's partial window held the loss summed over the ranks, and the resumed run divided
    # it by its own number of ranks: a run of 2 ranks resumed as one process logged 1.5 x the loss.
    loss = torch.tensor(3.0, dtype=torch.float64)
    window = metrics.LogWindow(torch.device("cpu"))
    for _ in range(2):
        window.add(loss)
    saved = window.snapshot(_IdenticalRanks(before or after), step=2)
    if before is None:  # written before checkpoints said how many ranks summed it: the same as now
        saved = {k: v for k, v in saved.items() if k != "world"}
    resumed = metrics.LogWindow(torch.device("cpu"), saved, after)
    for _ in range(2):
        resumed.add(loss)
    assert resumed.close(_IdenticalRanks(after), step=4)[0] == pytest.approx(3.0 / math.log(2), rel=1e-12)
