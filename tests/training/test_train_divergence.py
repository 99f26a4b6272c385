"""A run that cannot go on stops with one clear line and writes nothing from its broken state: a
diverged run (a loss or weights that are no longer finite: too high a learning rate) keeps its last
good checkpoint and writes no model; a model too big for memory is said so, before anything is
written."""

import json

import pytest
import torch
from conftest import word_corpus

from fastmlstm.models.lm import ByteLM
from fastmlstm.training import loop, main, state
from fastmlstm.training.checkpoints import find_latest_checkpoint

ARGS = ["--preset", "tiny", "--hidden", "24", "--embed", "8", "--batch", "4", "--seq", "16", "--lr", "5e-3",
        "--eval-bytes", "1000", "--keep", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("corpus") / "reviews.txt", seed=2, lines=300)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fastmlstm train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("log_every", ["5", "10"])
def test_a_huge_learning_rate_stops_with_one_clear_error(log_every, corpus, tmp_path, capsys):
    # --lr 1e37 (below the largest Adam can apply to float32 weights): the loss is not finite from
    # update 1 (NaN, or inf where the GEMMs round the weights' overflow another way: BLAS fallback).
    argv = [*ARGS, "--lr", "1e37", "--steps", "40", "--ckpt-every", "10", "--log-every", log_every,
            "--data", str(corpus), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert any(f"training diverged: the loss of updates 1..{log_every} is {v}" in err for v in ("nan", "inf")), err
    assert "a lower --lr" in err, err
    assert not (tmp_path / "model.pt").exists() and not list(tmp_path.glob("ckpt-*"))
    assert all(r["bits_per_byte"] == r["bits_per_byte"] for r in _records(tmp_path))  # no NaN record


@pytest.mark.parametrize("lr", ["1e38", "1e300", "1e308"])
def test_a_learning_rate_adam_cannot_apply_is_refused_before_anything_is_written(lr, corpus, tmp_path, capsys):
    # Adam's first step is 10 x --lr, applied to float32 weights: above float32's range torch used
    # to fail inside the optimizer with a traceback (1e300: "value cannot be converted to type
    # float without overflow" at update 1, the weights still finite).
    out = tmp_path / "run"
    assert main([*ARGS, "--lr", lr, "--steps", "4", "--data", str(corpus), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"--lr must be at most 3.4e+37, got {float(lr)!r}" in err, err
    assert not out.exists()


def test_an_optimizer_failing_on_weights_no_longer_finite_is_the_divergence(corpus, tmp_path, capsys, monkeypatch):
    # What Adam does when its step size stops fitting a float32 after the weights went NaN between
    # two log records: the RuntimeError is the divergence, said in one line, not a traceback.
    update = loop.train_step

    def failing(train_state, *args, **kwargs):
        if train_state.step == 6:
            with torch.no_grad():
                for p in train_state.model.parameters():
                    p.fill_(float("nan"))
            raise RuntimeError("value cannot be converted to type float without overflow")
        return update(train_state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing)
    argv = [*ARGS, "--steps", "40", "--ckpt-every", "10", "--log-every", "10", "--data", str(corpus),
            "--out", str(tmp_path)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert "update 7 failed with the weights no longer finite" in err and "overflow" in err, err
    assert not (tmp_path / "model.pt").exists() and not list(tmp_path.glob("ckpt-*"))


@pytest.mark.parametrize("log_every, why", [("5", "the loss of updates 11..15 is nan"),
                                            ("30", "the weights are no longer finite (NaN or inf) after update 20")],
                         ids=["caught-at-a-log-record", "caught-at-a-checkpoint"])
def test_divergence_after_a_checkpoint_keeps_it_and_writes_nothing_more(log_every, why, corpus, tmp_path, capsys,
                                                                         monkeypatch):
    update = loop.train_step

    def diverging(train_state, *args, **kwargs):  # the weights blow up at update 12
        loss = update(train_state, *args, **kwargs)
        if train_state.step == 12:
            with torch.no_grad():
                for p in train_state.model.parameters():
                    p.fill_(float("nan"))
        return loss

    monkeypatch.setattr(loop, "train_step", diverging)
    argv = [*ARGS, "--steps", "30", "--ckpt-every", "10", "--log-every", log_every, "--data", str(corpus),
            "--out", str(tmp_path)]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert f"training diverged: {why}" in err and "a lower --lr" in err, err
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000010.pt"]
    latest, unreadable = find_latest_checkpoint(tmp_path)
    assert latest["step"] == 10 and not unreadable
    assert all(torch.isfinite(t).all() for t in latest["model"]["state_dict"].values())
    assert not (tmp_path / "model.pt").exists()
    assert all(r.get("bits_per_byte", 0) == r.get("bits_per_byte", 0) for r in _records(tmp_path))


def test_a_model_too_big_for_memory_is_one_clear_error_before_anything_is_written(corpus, tmp_path, capsys,
                                                                                     monkeypatch):
    class TooBig(ByteLM):
        def __init__(self, *args, device=None, **kwargs):
            super().__init__(*args, device=device, **kwargs)
            if str(device) != "meta":
                torch.empty(2**62, dtype=torch.uint8)  # the allocator's own error, on any machine

    monkeypatch.setattr(state, "ByteLM", TooBig)
    out = tmp_path / "run"
    assert main([*ARGS, "--steps", "4", "--data", str(corpus), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "out of memory building the model" in err and "--hidden 24, --embed 8" in err, err
    assert "can't allocate memory" in err and "parameters" in err, err
    assert not out.exists()  # the byte streams it had written went with the rejected run
