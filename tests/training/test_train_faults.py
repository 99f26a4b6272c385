"""Training never loses data: killed at random points (an update, a checkpoint write, an evaluation,
a metrics line, the final model write), a re-run of the same command always finishes with the
uninterrupted run's model and metrics; unreadable checkpoints stop a run instead of being silently
replaced, and pruning never deletes what the run just wrote."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from fastmlstm.training import main

ARGS = ["--preset", "tiny", "--hidden", "24", "--embed", "8", "--batch", "4", "--seq", "16", "--lr", "5e-3",
        "--steps", "60", "--ckpt-every", "10", "--eval-every", "20", "--log-every", "5", "--eval-bytes", "3000",
        "--keep", "2"]

# Installs one fault, then runs the training job; FAULT is "<point>:<n>": die (SIGKILL, no cleanup)
# at the n-th occurrence of the point.
FAULTY = r'''
import os, signal, sys
import torch
from fastmlstm.training import loop, main, metrics

point, n = os.environ["FAULT"].split(":")
seen = [0]

def due():
    seen[0] += 1
    return seen[0] == int(n)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def partial_write(file, obj_format):
    original = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == obj_format and due():
            f.write(b"\x80\x02 half a file")  # bytes of a temporary file on disk, then death
            f.flush()
            die()
        return original(obj, f, *args, **kwargs)
    torch.save = save

if point == "update":
    step = loop.train_step
    loop.train_step = lambda *a, **k: die() if due() else step(*a, **k)
elif point == "checkpoint":
    partial_write(None, "fastmlstm.train")
elif point == "final":
    partial_write(None, "fastmlstm.ByteLM")
elif point == "evaluation":
    loss = metrics.cross_entropy_sum  # only the held-out pass calls it through metrics
    metrics.cross_entropy_sum = lambda *a: die() if due() else loss(*a)
elif point == "metrics":
    write = metrics.Metrics.write
    def half_line(self, record):
        if due():
            self.file.write(__import__("json").dumps(record)[:7])
            self.file.flush()
            die()
        write(self, record)
    metrics.Metrics.write = half_line
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    words = b"the a movie film great bad plot acting loved hated it was and but not very".split()
    lines = [b" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(1200)]
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run(out, corpus, fault=None):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if fault:
        env["FAULT"] = fault
        cmd = [sys.executable, "-c", FAULTY]
    else:
        cmd = [sys.executable, str(REPO / "train.py")]
    return subprocess.run([*cmd, *ARGS, "--data", str(corpus), "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _strip_speed(records):
    return [{k: v for k, v in r.items() if k != "chars_per_s"} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    done = _run(out, corpus)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


_rng = random.Random(20261130)
FAULTS = [
    [f"update:{_rng.randint(2, 59)}"],
    [f"checkpoint:{_rng.randint(1, 5)}"],
    [f"evaluation:{_rng.randint(1, 5)}"],
    [f"metrics:{_rng.randint(2, 14)}"],
    ["final:1"],
    [f"update:{_rng.randint(2, 25)}", f"checkpoint:{_rng.randint(1, 3)}"],  # killed twice before finishing
]


@pytest.mark.parametrize("faults", FAULTS, ids=lambda f: "+".join(f))
def test_rerunning_after_a_kill_finishes_with_the_uninterrupted_model(faults, corpus, uninterrupted, tmp_path):
    for fault in faults:
        killed = _run(tmp_path, corpus, fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.returncode, killed.stdout + killed.stderr)
    done = _run(tmp_path, corpus)
    assert done.returncode == 0, done.stdout + done.stderr
    clean, resumed = _state(uninterrupted / "model.pt"), _state(tmp_path / "model.pt")
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)
    assert _strip_speed(_metrics(tmp_path)) == _strip_speed(_metrics(uninterrupted))
    assert not list(tmp_path.glob(".*.tmp"))  # temporaries of the killed writes are gone
    assert len(list(tmp_path.glob("ckpt-*.pt"))) <= 2


def _small(tmp_path, corpus, *extra):
    return [*ARGS, "--steps", "20", "--data", str(corpus), "--out", str(tmp_path), *extra]


def test_unreadable_checkpoints_stop_the_run_and_are_never_pruned(corpus, tmp_path, capsys):
    assert main(_small(tmp_path, corpus)) == 0
    ckpts = sorted(tmp_path.glob("ckpt-*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-00000010.pt", "ckpt-00000020.pt"]
    for p in ckpts:
        p.write_bytes(p.read_bytes()[:100])  # truncated
    (tmp_path / "model.pt").unlink()
    capsys.readouterr()
    assert main(_small(tmp_path, corpus)) == 2
    err = capsys.readouterr().err
    assert "none can be read" in err and "ckpt-00000010.pt" in err and "ckpt-00000020.pt" in err
    assert "--start-over" in err and err.count("\n") == 1
    assert sorted(tmp_path.glob("ckpt-*.pt")) == ckpts  # nothing touched

    assert main(_small(tmp_path, corpus, "--start-over")) == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-00000010.pt", "ckpt-00000010.pt.unreadable", "ckpt-00000020.pt",
                     "ckpt-00000020.pt.unreadable"]
    assert torch.load(tmp_path / "ckpt-00000020.pt", weights_only=True)["step"] == 20  # the new run's own


def test_a_newer_unreadable_checkpoint_is_set_aside_and_the_older_one_resumed(corpus, tmp_path, capsys):
    assert main(_small(tmp_path, corpus)) == 0
    final = _state(tmp_path / "model.pt")
    (tmp_path / "ckpt-00000020.pt").write_bytes(b"")
    (tmp_path / "model.pt").unlink()
    capsys.readouterr()
    assert main(_small(tmp_path, corpus)) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.out and "at update 10" in captured.out
    assert "ckpt-00000020.pt cannot be read" in captured.err and "kept aside" in captured.err
    assert (tmp_path / "ckpt-00000020.pt.unreadable").read_bytes() == b""
    resumed = _state(tmp_path / "model.pt")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_pruning_keeps_the_newest_by_step_and_never_what_it_just_wrote(corpus, tmp_path):
    assert main(_small(tmp_path, corpus, "--keep", "1")) == 0
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == ["ckpt-00000020.pt"]
