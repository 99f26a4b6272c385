"""train.py: loss falls, distributed runs, exact resume after an interruption, clear errors."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DATA_DIR, REPO

import fastmlstm
from fastmlstm._atomic import atomic_save
from fastmlstm.training import loop

sys.path.insert(0, str(REPO))
import train  # noqa: E402

SMALL = ["--preset", "tiny", "--hidden", "32", "--embed", "16", "--batch", "4", "--seq", "16", "--lr", "5e-3"]
REAL_CORPUS = DATA_DIR / "amazon" / "all_beauty.txt.gz"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 kB of synthetic review-like text."""
    g = torch.Generator().manual_seed(0)
    words = b"the a movie film great bad plot acting loved hated it was and but not very".split()
    lines = []
    for _ in range(1500):
        n = int(torch.randint(4, 12, (1,), generator=g))
        lines.append(b" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)))
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def records(out, key):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def run_script(args, **kwargs):
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path.name} appeared:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


def same_model(a, b):
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.skipif(not REAL_CORPUS.exists(), reason="shared data not present")
def test_loss_falls_on_a_real_corpus(tmp_path):
    assert train.main([*SMALL, "--data", str(REAL_CORPUS), "--out", str(tmp_path), "--hidden", "48",
                       "--batch", "8", "--seq", "32", "--steps", "250", "--log-every", "25",
                       "--eval-every", "125", "--eval-bytes", "20000"]) == 0
    bpb = records(tmp_path, "bits_per_byte")
    assert [s for s, _ in bpb] == list(range(25, 251, 25))
    assert bpb[-1][1] < bpb[0][1] - 1.0 and bpb[-1][1] < 4.0, bpb
    evals = records(tmp_path, "eval_bits_per_byte")
    assert [s for s, _ in evals] == [125, 250] and evals[1][1] < evals[0][1] < 4.5, evals
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "bits_per_byte", "lr", "chars_per_s"} <= first.keys()
    model = fastmlstm.load(tmp_path / "model.pt")  # the final model loads in one call
    assert model.config == {"hidden_size": 48, "embed_size": 16, "weight_norm": True}


def _reference_forward(p, x, h, c):
    """The documented byte LM in float64 (MODEL.md): weight-normalized multiplicative LSTM, gates i, f, o, u."""
    def wn(name):  # each output row scaled to norm g
        v = p[f"rnn.{name}_v"]
        return p[f"rnn.{name}_g"][:, None] * v / v.norm(dim=1, keepdim=True)

    w_ih, w_hh, w_im, w_hm = wn("weight_ih"), wn("weight_hh"), wn("weight_im"), wn("weight_hm")
    H, outputs = h.shape[1], []
    for e in p["embedding.weight"][x.long()].unbind(1):
        z = e @ w_ih.T + ((e @ w_im.T) * (h @ w_hm.T)) @ w_hh.T + p["rnn.bias_ih"]
        i, f, o = (torch.sigmoid(z[:, k * H:(k + 1) * H]) for k in range(3))
        c = f * c + i * torch.tanh(z[:, 3 * H:])
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, 1) @ p["readout.weight"].T + p["readout.bias"], h, c


def _reference_bits(p, x, y, h, c):
    logits, h, c = _reference_forward(p, x, h, c)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1).long()), h, c


def _reference_run(init, batches, *, lr, clip, eval_batcher, eval_at):
    """docs/training.md's updates, written out: mean loss over every byte, state carried (detached) and
    zeroed at an epoch's start, global norm clipped, Adam (0.9, 0.999, 1e-8) at lr (1 - (k - 1) / N)."""
    p = {k: v.double().clone().requires_grad_(True) for k, v in init.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    h = c = torch.zeros(batches[0][0].shape[0], init["rnn.weight_hm_v"].shape[0], dtype=torch.float64)
    losses, lrs, evals = [], [], {}
    for k, (x, y, new_epoch) in enumerate(batches, 1):
        if new_epoch:
            h = c = torch.zeros_like(h)
        loss, h, c = _reference_bits(p, x, y, h, c)
        grads = torch.autograd.grad(loss, list(p.values()))
        h, c = h.detach(), c.detach()
        scale = min(1.0, clip / (float(torch.cat([g.reshape(-1) for g in grads]).norm()) + 1e-6))
        lrs.append(lr * (1 - (k - 1) / len(batches)))
        with torch.no_grad():
            for (name, w), g in zip(p.items(), grads):
                m[name].mul_(0.9).add_(0.1 * scale * g)
                v2[name].mul_(0.999).add_(0.001 * (scale * g) ** 2)
                w -= lrs[-1] * (m[name] / (1 - 0.9 ** k)) / ((v2[name] / (1 - 0.999 ** k)).sqrt() + 1e-8)
            losses.append(float(loss))
            if k in eval_at:
                eh = ec = torch.zeros_like(h)
                total = 0.0
                for s in range(eval_batcher.steps_per_epoch):
                    ex, ey, _ = eval_batcher.batch(s)
                    bits, eh, ec = _reference_bits(p, ex, ey, eh, ec)
                    total += float(bits)
                evals[k] = total / eval_batcher.steps_per_epoch / math.log(2)
    return {k: w.detach() for k, w in p.items()}, losses, lrs, evals


def test_updates_metrics_and_model_are_the_documented_recipe(tmp_path, monkeypatch):
    # The training loop against an independent float64 implementation of docs/training.md's updates,
    # fed the batches the run read (the byte stream is the data's business, not this test's).
    (tmp_path / "c.txt").write_bytes(b"".join(b"review %d: the plot was not very good, %d\n" % (i, i * i)
                                              for i in range(7)))
    seen, evaluated = [], []
    train_step, evaluate = loop.train_step, loop.evaluate

    def record_step(state, forward, x, y, new_epoch, *args):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})
        seen.append((x.clone(), y.clone(), new_epoch))
        return train_step(state, forward, x, y, new_epoch, *args)

    def record_evaluate(model, batcher, *args):
        evaluated.append(batcher)
        return evaluate(model, batcher, *args)

    monkeypatch.setattr(loop, "train_step", record_step)
    monkeypatch.setattr(loop, "evaluate", record_evaluate)
    out = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--hidden", "8", "--embed", "4", "--batch", "4", "--seq", "8", "--lr", "0.01",
                       "--clip", "0.05", "--steps", "8", "--log-every", "2", "--eval-every", "4", "--eval-bytes", "150",
                       "--data", str(tmp_path / "c.txt"), "--out", str(out)]) == 0
    init, batches = seen[0], seen[1:]
    assert [b[2] for b in batches].count(True) >= 2  # the rows started over at least once
    weights, losses, lrs, evals = _reference_run(init, batches, lr=0.01, clip=0.05, eval_batcher=evaluated[0],
                                                 eval_at={4, 8})
    model = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for name, w in weights.items():
        moved = (w - init[name].double()).abs().max()  # by about 8 steps of 0.01 / (1 - 0.9)
        assert (model[name].double() - w).abs().max() <= 1e-3 * moved, name
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "lr" in r] == [2, 4, 6, 8]
    for r in logged:
        k = r["step"]
        if "lr" in r:
            assert r["lr"] == pytest.approx(lrs[k - 1], rel=1e-12)
            assert r["bits_per_byte"] == pytest.approx((losses[k - 2] + losses[k - 1]) / 2 / math.log(2), abs=1e-5)
        else:
            assert r["eval_bits_per_byte"] == pytest.approx(evals[k], abs=1e-5)
    assert sorted(evals) == sorted(r["step"] for r in logged if "eval_bits_per_byte" in r)


RESUME_ARGS = ["--steps", "150", "--ckpt-every", "20", "--eval-every", "50", "--log-every", "10",
               "--eval-bytes", "3000", "--keep", "2"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_script([*SMALL, *RESUME_ARGS, "--data", str(corpus), "--out", str(out)])
    output = proc.communicate()[0]  # (waits, and closes the pipe)
    assert proc.returncode == 0, output
    return out


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill-9", "ctrl-c", "sigterm"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(how, corpus, uninterrupted, tmp_path):
    args = [*SMALL, *RESUME_ARGS, "--data", str(corpus), "--out", str(tmp_path)]
    proc = run_script(args)
    wait_for(tmp_path / "ckpt-00000040.pt", proc)
    proc.send_signal(how)
    output = proc.communicate()[0]
    # The shell's convention: killed by a signal -> 128 + its number (130 Ctrl-C, 143 SIGTERM).
    assert proc.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 128 + how), output
    interrupted_at = max(int(p.stem.split("-")[1]) for p in tmp_path.glob("ckpt-*.pt"))
    assert 40 <= interrupted_at < 150
    assert len(list(tmp_path.glob("ckpt-*.pt"))) <= 2  # --keep
    resumed = run_script(args)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"resuming {tmp_path} at update {interrupted_at}" in output
    assert same_model(tmp_path / "model.pt", uninterrupted / "model.pt")
    assert records(tmp_path, "bits_per_byte") == records(uninterrupted, "bits_per_byte")
    assert records(tmp_path, "eval_bits_per_byte") == records(uninterrupted, "eval_bits_per_byte")


def test_two_process_gloo_run_through_torchrun(corpus, tmp_path):
    common = [*SMALL, "--data", str(corpus), "--steps", "12", "--log-every", "3", "--eval-every", "6",
              "--ckpt-every", "6", "--eval-bytes", "3000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *common, "--out", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    ddp = records(tmp_path / "ddp", "bits_per_byte")
    assert [s for s, _ in ddp] == [3, 6, 9, 12]  # rank 0 alone writes metrics: each step once
    assert [s for s, _ in records(tmp_path / "ddp", "eval_bits_per_byte")] == [6, 12]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("ckpt-*.pt")) == ["ckpt-00000006.pt", "ckpt-00000012.pt"]
    assert (tmp_path / "ddp" / "model.pt").exists()
    # --batch is the global batch: two ranks of 2 rows see the same data as one process of 4 rows.
    assert train.main([*common, "--out", str(tmp_path / "single")]) == 0
    single = records(tmp_path / "single", "bits_per_byte")
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-3, (ddp, single)
    # The ranks average their gradients: 2 x 2 rows update the model as 4 rows do, to float rounding.
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("ddp", "single"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


def test_a_checkpoint_from_a_different_run_is_refused(corpus, tmp_path, capsys):
    base = [*SMALL, "--data", str(corpus), "--out", str(tmp_path), "--steps", "4", "--eval-bytes", "3000"]
    assert train.main(base) == 0
    capsys.readouterr()
    assert train.main([*base, "--hidden", "40"]) == 2
    assert re.search(r"^fastmlstm train: error: .*different run \(hidden: 32 in the checkpoint, 40 now\)",
                     capsys.readouterr().err)
    assert (tmp_path / "model.pt").exists() and list(tmp_path.glob("ckpt-*.pt"))  # the run it refused is kept


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "{d}/missing.txt"], "missing.txt does not exist"),
        (["--data", "{d}/empty.txt"], "the corpus is empty"),
        (["--data", "{d}/short.txt", "--eval-bytes", "0"], "too few for one batch"),
        (["--data", "{d}/short.txt"], "leaves nothing of the 10-byte corpus"),
        (["--data", "{d}/ok.txt", "--out", "{d}/file/sub"], "cannot write to --out"),
        (["--data", "{d}/ok.txt", "--batch", "0"], "argument --batch: must be an integer >= 1, got '0'"),
        (["--data", "{d}/ok.txt", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
        (["--data", "{d}/ok.txt", "--clip", "nan"], "argument --clip: must be a finite number >= 0, got 'nan'"),
        (["--data", "{d}/no-files"], "holds no files"),
        (["--data", "{d}/ok.txt"], None),  # bytes that are not UTF-8 at all: fine for a byte model
    ],
    ids=["missing", "empty", "short", "short-heldout", "unwritable", "batch-0", "lr-nan", "clip-nan", "empty-dir",
         "not-utf8-ok"],
)
def test_bad_input_gives_a_clear_error(extra, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"too short\n")
    (tmp_path / "ok.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "file").write_text("a file, not a directory")
    (tmp_path / "no-files").mkdir()
    argv = [*SMALL, "--steps", "2", "--eval-bytes", "1000", "--out", str(tmp_path / "run"),
            *(a.format(d=tmp_path) for a in extra)]
    if message is None:
        assert train.main(argv) == 0
    else:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastmlstm train: error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.tmp"))
    # A rejected run leaves no --out folder behind (it made one to build the byte stream in).
    assert (tmp_path / "run").exists() == (message is None)


def test_a_rejected_run_leaves_an_existing_out_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert train.main([*SMALL, "--data", str(tmp_path / "empty.txt"), "--out", str(out)]) == 2
    assert "the corpus is empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_checkpoints_are_never_half_written(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_written_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_save({"step": 1}, tmp_path / "a.pt")
        fastmlstm.ByteLM(8, 4).save(tmp_path / "m.pt")
    finally:
        os.umask(old)
    for name in ("a.pt", "m.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
