"""Training never loses data: killed at random points (an update, a checkpoint write, an evaluation,
a metrics line, the final model write, and anywhere at all: the n-th call into the package or the
n-th file operation, n drawn from a fixed seed), a re-run of the same command always finishes with
the uninterrupted run's model and metrics; unreadable checkpoints stop a run instead of being
silently replaced, checkpoints with flipped bytes are set aside like unreadable ones, and pruning
never deletes what the run just wrote."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, word_corpus
from faults import flip_a_tensor_byte

import fastmlstm
from fastmlstm.training import main

ARGS = ["--preset", "tiny", "--hidden", "24", "--embed", "8", "--batch", "4", "--seq", "16", "--lr", "5e-3",
        "--steps", "60", "--ckpt-every", "10", "--eval-every", "20", "--log-every", "5", "--eval-bytes", "3000",
        "--keep", "2"]

# Installs one fault, then runs the training job; FAULT is "<point>:<n>": die (SIGKILL, no cleanup)
# at the n-th occurrence of the point. The points "call" (every call into fastmlstm's code and every
# C function it calls, the kernels in fastmlstm/ops aside: their first use may build and cache an
# extension, which would make the count differ between runs) and "io" (only the file operations
# among those: open, write, flush, fsync, rename, unlink...) are counted by a profile hook;
# "count:0" runs to the end and writes both counts to $EVENTS. With $CLI the job runs as
# `fastmlstm train` (fastmlstm.cli.main).
FAULTY = r'''
import io, json, os, signal, sys
import torch
import fastmlstm
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
elif point in ("call", "io", "count"):
    package = os.path.dirname(fastmlstm.__file__)
    kernels = os.path.join(package, "ops")
    IO = {"open", "write", "writelines", "flush", "fsync", "fdatasync", "replace", "rename", "unlink", "remove",
          "close", "truncate", "ftruncate", "mkdir", "rmdir", "fchmod", "chmod", "utime"}
    counts = {"call": 0, "io": 0}

    def file_operation(function):  # os's (posix) functions, open() and file objects' methods, not str.replace
        if getattr(function, "__name__", "") not in IO:
            return False
        owner = getattr(function, "__self__", None)
        return getattr(function, "__module__", None) in ("posix", "io") or isinstance(owner, io.IOBase) or (
            getattr(owner, "__name__", None) == "posix")

    def ours(frame):
        if frame is None:
            return False
        file = frame.f_code.co_filename
        return file.startswith(package) and not file.startswith(kernels)

    def hook(frame, event, arg):
        if event == "call" and ours(frame):
            counts["call"] += 1
        elif event == "c_call" and (ours(frame) or ours(frame.f_back)):  # f_back: through pathlib, os
            counts["call"] += 1
            counts["io"] += file_operation(arg)
        else:
            return
        if point != "count" and counts[point] == int(n):
            where = f"{os.path.relpath(frame.f_code.co_filename, package)}:{frame.f_lineno} {frame.f_code.co_name}"
            sys.stderr.write(f"killed at {point} {n}: {where}" + (f" -> {arg.__name__}" if event == "c_call" else "")
                             + "\n")
            sys.stderr.flush()
            die()

    sys.setprofile(hook)
if os.environ.get("CLI"):
    from fastmlstm.cli import main as cli_main
    code = cli_main(["train", *sys.argv[1:]])
else:
    code = main(sys.argv[1:])
sys.setprofile(None)
if point == "count":
    with open(os.environ["EVENTS"], "w") as f:
        json.dump(counts, f)
sys.exit(code)
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("corpus") / "reviews.txt", seed=1, lines=1200)


def _run(out, corpus, fault=None, cli=False, events=None):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if fault:
        env.update({"FAULT": fault, "CLI": "1" if cli else "", "EVENTS": str(events or "")})
        cmd = [sys.executable, "-c", FAULTY]
    elif cli:
        cmd = [sys.executable, "-m", "fastmlstm", "train"]
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
    """The run without interruption, counting its calls and file operations (into ``<out>.events``)."""
    out = tmp_path_factory.mktemp("clean")
    done = _run(out, corpus, "count:0", cli=True, events=out.with_suffix(".events"))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _check_same_result(out, uninterrupted):
    clean, resumed = _state(uninterrupted / "model.pt"), _state(out / "model.pt")
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)
    assert _strip_speed(_metrics(out)) == _strip_speed(_metrics(uninterrupted))
    assert not list(out.glob(".*.tmp"))  # temporaries of the killed writes are gone
    assert len(list(out.glob("ckpt-*.pt"))) <= 2


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
    _check_same_result(tmp_path, uninterrupted)


# Kill points anywhere in a run: (what is counted, the point as a fraction) for each kill of a
# case, then a re-run to the end. The first fraction is of the uninterrupted run's count; a later
# one of what was left after the kill before (a re-run resumes, so it is shorter), and if the re-run
# ends before it, it simply finished.
_kill_rng = random.Random(25)
RANDOM_KILLS = [[(kind, round(_kill_rng.random(), 3)) for kind in kinds] for kinds in (("call",), ("io", "io"))]


@pytest.mark.parametrize("kills", RANDOM_KILLS, ids=lambda k: "+".join(f"{kind}@{at}" for kind, at in k))
def test_killed_anywhere_then_rerun_gives_the_uninterrupted_model(kills, corpus, uninterrupted, tmp_path):
    totals = json.loads(uninterrupted.with_suffix(".events").read_text())
    assert totals["io"] > 100 and totals["call"] > 10 * totals["io"], totals  # the hook saw the run
    left = 1.0
    for i, (kind, at) in enumerate(kills):
        n = max(1, round(at * left * totals[kind]))
        left *= 1 - at
        killed = _run(tmp_path, corpus, f"{kind}:{n}", cli=True)
        # The first kill always comes: a fresh run makes exactly the counted calls.
        allowed = (-signal.SIGKILL,) if i == 0 else (-signal.SIGKILL, 0)
        assert killed.returncode in allowed, (kind, n, killed.returncode, killed.stdout + killed.stderr)
    done = _run(tmp_path, corpus, cli=True)  # `fastmlstm train`, the same command again
    assert done.returncode == 0, done.stdout + done.stderr
    _check_same_result(tmp_path, uninterrupted)


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


def test_a_checkpoint_with_flipped_bytes_is_set_aside_and_the_one_before_resumed(corpus, tmp_path, capsys):
    # A finished run whose last checkpoint got damaged: re-running it must not build model.pt from
    # the damaged one (it used to load silently and replace the good model).
    assert main(_small(tmp_path, corpus)) == 0
    final = _state(tmp_path / "model.pt")
    flip_a_tensor_byte(tmp_path / "ckpt-00000020.pt")
    damaged = (tmp_path / "ckpt-00000020.pt").read_bytes()
    capsys.readouterr()
    assert main(_small(tmp_path, corpus)) == 0
    captured = capsys.readouterr()
    assert "ckpt-00000020.pt cannot be read" in captured.err and "the file is damaged" in captured.err
    assert "SHA-256 digest" in captured.err and "kept aside as ckpt-00000020.pt.unreadable" in captured.err
    assert "resuming" in captured.out and "at update 10" in captured.out
    assert (tmp_path / "ckpt-00000020.pt.unreadable").read_bytes() == damaged
    resumed = _state(tmp_path / "model.pt")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    with pytest.raises(fastmlstm.ModelFileError, match="the file is damaged"):  # nor is it a model file
        fastmlstm.load(tmp_path / "ckpt-00000020.pt.unreadable")


def test_a_checkpoint_without_a_digest_still_resumes(corpus, tmp_path, capsys):
    """Checkpoints of older versions carry no digest: they are read as before, without the check."""
    assert main(_small(tmp_path, corpus)) == 0
    final = _state(tmp_path / "model.pt")
    old = torch.load(tmp_path / "ckpt-00000010.pt", weights_only=True)
    assert old.pop("digest").startswith("sha256:")
    torch.save(old, tmp_path / "ckpt-00000010.pt")
    (tmp_path / "ckpt-00000020.pt").unlink()
    (tmp_path / "model.pt").unlink()
    capsys.readouterr()
    assert main(_small(tmp_path, corpus)) == 0
    captured = capsys.readouterr()
    assert "at update 10" in captured.out and "cannot be read" not in captured.err
    resumed = _state(tmp_path / "model.pt")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_pruning_keeps_the_newest_by_step_and_never_what_it_just_wrote(corpus, tmp_path):
    assert main(_small(tmp_path, corpus, "--keep", "1")) == 0
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == ["ckpt-00000020.pt"]


def test_a_run_resumed_at_its_last_step_still_keeps_only_keep_checkpoints(corpus, tmp_path):
    # Killed after the last checkpoint was written and before the older ones were pruned (found by
    # the random kills above): the re-run resumes at the last step and writes no checkpoint.
    assert main(_small(tmp_path, corpus, "--steps", "6", "--ckpt-every", "2", "--keep", "3")) == 0
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == 3
    (tmp_path / "model.pt").unlink()
    assert main(_small(tmp_path, corpus, "--steps", "6", "--ckpt-every", "2")) == 0  # --keep 2
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    assert (tmp_path / "model.pt").exists()
