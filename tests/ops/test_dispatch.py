"""The self-validating dispatch of the Triton backend (fastmlstm/ops/triton/dispatch.py and
fastmlstm/ops/verdicts.py), on a CPU: stand-in candidates (a correct and faster one, a wrong one,
a slower one, one that raises, one that hangs) checked against a stand-in per-step path on a
stand-in device, so that the verdicts, their cache, FASTMLSTM_KERNEL and the log lines are all
exercised here; one test runs the real check (the interpreter's per-step path against float64).
The rule's designs come from the persistent schedules (pure functions of the shape)."""

import json
import logging
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
import tolerances

from fastmlstm import InputError
from fastmlstm.ops import reference, verdicts
from fastmlstm.ops.triton import dispatch, recurrence
from fastmlstm.ops.triton.configs import Device
from fastmlstm.ops.triton.persistent import schedule

H100 = Device(132, (9, 0), "NVIDIA H100 80GB HBM3")
B, H = 3, 8
TIMED = ("forward", "backward")


def _site(capability=(8, 0), driver="driver-1"):
    return verdicts.Site(torch.device("cpu"), "Test GPU", capability, 8, driver, "runtime-1")


def _slow(fn, seconds):
    def run(*args):
        time.sleep(seconds)
        return fn(*args)

    return run


def _candidate(name="graph", forward=reference.forward, backward=reference.backward):
    calls = []

    def counted_forward(*args):
        calls.append("forward")
        return forward(*args)

    return dispatch.Candidate(name, lambda *a: True, counted_forward, backward), calls


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """A stand-in device (no persistent design: not Hopper), a stand-in per-step path (the
    reference backend, 20 ms slower per call), a fresh cache and no registered candidates."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(verdicts.ENV_KERNEL, raising=False)
    monkeypatch.setattr(dispatch, "_site", lambda device: _site())
    monkeypatch.setattr(dispatch, "STEP", dispatch.Candidate("step", lambda *a: True, _slow(reference.forward, 0.02),
                                                             _slow(reference.backward, 0.02)))
    monkeypatch.setattr(dispatch, "CASES", ((3, False, False), (4, True, True)))
    monkeypatch.setattr(dispatch, "TIMING_T", 2)
    monkeypatch.setattr(dispatch, "_CANDIDATES", {})
    monkeypatch.setattr(dispatch, "_LOADERS", [])
    monkeypatch.setattr(dispatch, "_LOADED", [True])
    dispatch.reset()
    yield tmp_path / "cache" / "fastmlstm" / "kernels"
    _join_abandoned()
    dispatch.reset()


def _quick_checks(monkeypatch):
    """Checks without sleeps: the reference backend as the per-step path; the candidate timed 2x as fast."""
    monkeypatch.setattr(dispatch, "STEP", dispatch.Candidate("step", lambda *a: True, reference.forward,
                                                             reference.backward))
    monkeypatch.setattr(dispatch, "_timings", lambda *a: (dict.fromkeys(TIMED, 2.0), dict.fromkeys(TIMED, 1.0)))


def _mark_running(path: Path, pid: int) -> str:
    """Make the verdict at ``path`` the marker of a check by process ``pid`` here; returns the verdict."""
    stored = json.loads(text := path.read_text())
    stored["verdict"].update(status="running", pid=pid, host=os.uname().nodename, started=time.time())
    path.write_text(json.dumps(stored))
    return text


def _files(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]


def _statuses(cache: Path) -> dict:
    return {f["key"]["candidate"]: f["verdict"]["status"] for f in _files(cache)}


def _join_abandoned():
    for done in list(verdicts._ABANDONED):  # checks given up on: let them end (a test released them)
        done.wait(30)


def _choose(direction="forward", b=B, h=H):
    return dispatch.choose(b, h, torch.float32, torch.device("cpu"), direction)


# ---------------------------------------------------------------------------------- the rule

def test_design_for_follows_the_schedules():
    assert dispatch.design_for(128, 4096, torch.bfloat16, H100) == "cluster"
    assert dispatch.design_for(64, 1024, "bfloat16", H100) == "stationary"
    assert dispatch.design_for(64, 1024, torch.float32, H100) == "graph"  # no 32-bit persistent kernel
    assert dispatch.design_for(128, 4096, torch.float32, H100) == "step"  # not host-bound: nothing to gain
    assert dispatch.design_for(64, 1024, torch.bfloat16, None) == "step"
    assert dispatch.design_for(64, 1024, torch.bfloat16, Device(108, (8, 0), "A100")) == "graph"
    for B_, H_ in ((128, 4096), (128, 2048), (64, 1024), (1, 4096), (5, 72)):
        for direction in ("forward", "backward"):
            design = dispatch.design_for(B_, H_, torch.bfloat16, H100, direction)
            if design in dispatch.PERSISTENT_DESIGNS:
                assert schedule.plan(design, direction, B_, H_, 2, H100) is not None
            found = dispatch.designs(B_, H_, torch.bfloat16, H100, direction)
            assert found[0] == design and set(found) <= set(dispatch.DESIGNS)


def test_cpu_tensors_take_the_step_path_without_any_check(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(verdicts.ENV_KERNEL, "graph")
    dispatch.reset()
    assert dispatch.choose(4, 64, torch.bfloat16, torch.device("cpu")) == "step"
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.json"))


def test_the_backend_never_asks_the_dispatcher_for_cpu_tensors(monkeypatch):
    import fastmlstm.ops.triton as backend

    def refuse(*args):
        raise AssertionError("dispatch.choose called for CPU tensors")

    monkeypatch.setattr(dispatch, "choose", refuse)
    proj = torch.randn(2, 2, 5 * 16)
    w_hh, w_hm, h0, c0 = torch.randn(64, 16) / 4, torch.randn(16, 16) / 4, torch.zeros(2, 16), torch.zeros(2, 16)
    out, c_n, cells, act = backend.forward(proj, w_hh, w_hm, h0, c0, None, True, False)
    want = reference.forward(proj, w_hh, w_hm, h0, c0, None, True, False)
    assert tolerances.rel_err(out, want[0]) <= 1e-5 and tolerances.rel_err(c_n, want[1]) <= 1e-5
    grads = backend.backward(torch.ones_like(out), None, None, w_hh, w_hm, h0, c0, None, out, cells, act)
    assert len(grads) == 5 and torch.isfinite(grads[0]).all()


def test_a_chosen_candidate_yields_to_the_tested_path_where_it_may_not_run():
    cpu = torch.device("cpu")
    assert dispatch.runs_here("graph", cpu) and dispatch.runs_here("cluster", cpu)
    with verdicts.tested_path():
        assert not dispatch.runs_here("graph", cpu) and not dispatch.runs_here("stationary", cpu)
        with verdicts.tested_path():
            pass
        assert verdicts.tested_only()
    assert not verdicts.tested_only()
    seen = []
    worker = threading.Thread(target=lambda: seen.append(verdicts.tested_only()))
    with verdicts.tested_path():
        worker.start()
        worker.join()
    assert seen == [False]  # per thread


# ------------------------------------------------------------------------------ the verdicts

def test_a_correct_faster_candidate_is_checked_once_kept_and_used(stand_in, caplog):
    candidate, calls = _candidate()
    dispatch.register(candidate)
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        assert _choose() == "graph" and _choose("backward") == "graph"
    checked = len(calls)
    assert checked > 0
    [stored] = _files(stand_in)
    assert stored["verdict"]["status"] == "passed" and stored["key"]["candidate"] == "graph"
    assert stored["key"]["driver"] == "driver-1" and stored["key"]["B_class"] == 4 and stored["key"]["H"] == H
    assert set(stored["verdict"]["step_ms"]) == set(TIMED)
    errors = stored["verdict"]["errors"]["T=4 with lengths and cell states"]
    assert {"output", "c_n", "cell_states", "act", "grad_proj", "grad_weight_hh", "grad_weight_hm", "grad_h0",
            "grad_c0", "output (no saves)"} <= set(errors)
    assert sum("runs the forward and backward" in r.message for r in caplog.records) == 1
    assert any("checking the 'graph' kernel" in r.message for r in caplog.records)
    # The key's sources include those every candidate and the check run on (fastmlstm/ops, the reference).
    covered = set(dispatch._sources(candidate))
    assert {str(Path(m.__file__).parent) for m in (recurrence, verdicts, reference)} <= covered
    # The same shape class again, then a new process (memory dropped): no second check.
    assert dispatch.choose(4, H, torch.float32, torch.device("cpu")) == "graph"
    dispatch.reset()
    assert _choose() == "graph" and len(calls) == checked


@pytest.mark.parametrize("kind", ["wrong", "slower", "raises", "hangs"])
def test_a_bad_candidate_is_refused_with_one_log_line(stand_in, caplog, monkeypatch, kind):
    release = threading.Event()
    monkeypatch.setattr(verdicts, "BOUND_S", 2.0 if kind == "hangs" else 60.0)

    def wrong_backward(*args):
        grads = list(reference.backward(*args))
        grads[2] = grads[2] * 1.01  # one gradient of one weight, slightly off
        return tuple(grads)

    def raises(*args):
        raise RuntimeError("kernel exploded\nsecond line")

    def hangs(*args):
        release.wait(30)
        raise RuntimeError("released")

    forward, backward = reference.forward, reference.backward
    if kind == "wrong":
        backward = wrong_backward
    elif kind == "slower":
        forward, backward = _slow(forward, 0.06), _slow(backward, 0.06)
    elif kind == "raises":
        forward = raises
    else:
        forward = hangs
    dispatch.register(_candidate(forward=forward, backward=backward)[0])
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.INFO, logger="fastmlstm"):
            assert _choose() == "step" and _choose() == "step"
    finally:
        release.set()
    assert time.perf_counter() - start < 20
    [stored] = _files(stand_in)
    verdict = stored["verdict"]
    reason = {"wrong": "grad_weight_hm error", "slower": "", "raises": "raised RuntimeError: kernel exploded",
              "hangs": "did not finish within 2 s"}[kind]
    assert verdict["status"] == ("passed" if kind == "slower" else "failed") and reason in verdict["reason"]
    assert "second line" not in verdict["reason"]
    lines = [r for r in caplog.records if "per-step path" in r.message and "checking" not in r.message]
    assert len(lines) == 1
    assert lines[0].levelno == (logging.INFO if kind == "slower" else logging.WARNING)
    assert ("not faster" if kind == "slower" else reason) in lines[0].message


def test_running_out_of_memory_while_checking_is_not_kept(stand_in):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    dispatch.register(_candidate(forward=oom)[0])
    assert _choose() == "step" and not list(stand_in.glob("*.json"))
    dispatch.register(_candidate()[0])  # the next process (and a candidate that fits) checks again
    dispatch.reset()
    assert _choose() == "graph"
    # Out of memory while another process checking the same key finishes: its verdict stays.
    [path] = stand_in.glob("*.json")
    passed, _ = path.read_text(), path.unlink()
    dispatch.register(_candidate(forward=lambda *args: path.write_text(passed) and oom())[0])
    dispatch.reset()
    assert _choose() == "step" and path.read_text() == passed
    dispatch.reset()
    assert _choose() == "graph"


def test_a_candidate_faster_in_one_direction_runs_only_there(stand_in):
    dispatch.register(_candidate(backward=_slow(reference.backward, 0.06))[0])
    assert _choose("forward") == "graph" and _choose("backward") == "step"
    # Faster without saving for backward (inference), slower saving (training): not the forward.
    next(stand_in.glob("*.json")).unlink()
    dispatch.reset()
    dispatch.register(_candidate(forward=lambda *a: _slow(reference.forward, 0.06 if a[6] else 0.0)(*a))[0])
    assert _choose("forward") == "step" and _choose("backward") == "graph"
    [stored] = _files(stand_in)
    assert stored["verdict"]["candidate_ms"]["forward"] > stored["verdict"]["step_ms"]["forward"]


def test_a_machine_getting_faster_while_timing_favours_neither_kernel(stand_in, monkeypatch):
    """The same kernels as both, timed while the machine gets faster (clocks ramping up, a load going
    away: each call 0.02 ms quicker, from 2 ms): timed one after the other, the later one was "faster"."""
    monkeypatch.setattr(dispatch, "STEP", dispatch.Candidate("step", lambda *a: True, reference.forward,
                                                             reference.backward))
    timed = []

    def time_ms(fn, device, reps=5, warmup=1):
        samples = []
        for _ in range(warmup + reps):
            fn()
            timed.append(max(1.0, 2.0 - 0.02 * len(timed)))
            samples.append(timed[-1])
        return statistics.median(samples[warmup:])

    monkeypatch.setattr(verdicts, "time_ms", time_ms)
    dispatch.register(_candidate()[0])
    assert _choose("forward") == "step" and _choose("backward") == "step"
    assert _statuses(stand_in) == {"graph": "passed"}


def test_a_changed_key_part_checks_again_and_an_old_verdict_goes_once_stale(stand_in, monkeypatch):
    """Environments sharing ~/.cache (torch 2.13 and 2.14 taking turns) check once each (each used to
    delete the other's verdict: every start checked again); another key's verdict goes once STALE_S old."""
    _quick_checks(monkeypatch)
    candidate, calls = _candidate()
    dispatch.register(candidate)
    real, checked = verdicts.software(), []
    for version in ("2.13", "2.14", "2.13", "2.14"):
        monkeypatch.setattr(verdicts, "software", lambda version=version: {**real, "torch": version})
        dispatch.reset()
        before = len(calls)
        assert _choose() == "graph"
        checked.append(len(calls) > before)
    assert checked == [True, True, False, False] and len(list(stand_in.glob("*.json"))) == 2
    for old in stand_in.glob("*.json"):
        os.utime(old, (time.time() - verdicts.STALE_S - 60,) * 2)
    monkeypatch.setattr(dispatch, "_site", lambda device: _site(driver="driver-2"))
    dispatch.reset()
    before = len(calls)
    _choose()
    assert len(calls) > before and [f["key"]["driver"] for f in _files(stand_in)] == ["driver-2"]
    # Another shape class is another key, kept beside it; so is TF32 switched on (used to be missed).
    dispatch.choose(9, H, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(recurrence, "_dot_precision", lambda dtype: "tf32")
    assert _choose() == "graph" and sorted(f["key"]["precision"] for f in _files(stand_in)) == ["ieee", "ieee", "tf32"]


def test_a_corrupt_verdict_is_ignored_with_one_log_line_and_rewritten(stand_in, caplog, monkeypatch):
    """Also bytes that are not UTF-8, JSON nested too deep, fields of another type (these used to
    raise in the forward: UnicodeDecodeError, RecursionError, AttributeError, TypeError, OverflowError)."""
    _quick_checks(monkeypatch)
    dispatch.register(_candidate()[0])
    _choose()
    [path] = list(stand_in.glob("*.json"))
    good, here = json.loads(path.read_text()), {"host": os.uname().nodename, "started": time.time()}

    def edited(**fields):
        return json.dumps({**good, "verdict": {**good["verdict"], **fields}}).encode()

    for garbage in (b"{not json", json.dumps({"format": 1, "key": {}, "verdict": {"status": "passed"}}).encode(),
                    edited(status="maybe"), b"\xff\xfe not text", b"[" * 100_000, edited(step_ms="fast"),
                    edited(candidate_ms={"forward": 10**400}), edited(step_ms={"forward": "10"}),
                    edited(status="running", pid="1234", **here), edited(status="running", pid=2**70, **here),
                    edited(status="running", pid=os.getppid(), host=here["host"], started="yesterday"),
                    edited(status="running", pid=1, host="elsewhere", started=float("nan")),
                    edited(status="failed", reason=["a list"])):
        path.write_bytes(garbage)
        dispatch.reset()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fastmlstm"):
            assert _choose() == "graph" and _choose("backward") == "graph", garbage[:80]
        assert sum("ignoring the corrupt kernel verdict" in r.message for r in caplog.records) == 1, garbage[:80]
        assert json.loads(path.read_text())["verdict"]["status"] == "passed"


def test_an_unfinished_check_is_a_failure_and_a_live_one_is_waited_for(stand_in):
    candidate, calls = _candidate()
    dispatch.register(candidate)
    _choose()
    [path] = list(stand_in.glob("*.json"))
    # Another live process is checking: the step path meanwhile, and nothing is run or remembered.
    _mark_running(path, os.getppid())
    dispatch.reset()
    before = len(calls)
    assert _choose() == "step" and len(calls) == before
    # That process died (no such pid): the check never finished, so the candidate failed.
    _mark_running(path, 2**22 + 12345)
    assert _choose() == "step"
    verdict = json.loads(path.read_text())["verdict"]
    assert verdict["status"] == "failed" and "did not finish" in verdict["reason"] and len(calls) == before


def test_no_check_starts_while_one_past_its_bound_still_runs(stand_in, monkeypatch, caplog):
    """A check past its bound runs on (spinning on the GPU); another check started meanwhile shared
    the GPU (here: a lock), ran past its bound too and was kept as "failed". Now it waits."""
    _hopper(monkeypatch)
    _quick_checks(monkeypatch)
    monkeypatch.setattr(verdicts, "BOUND_S", 1.0)
    gpu, release = threading.Lock(), threading.Event()

    def hangs(*args):
        with gpu:
            release.wait(30)
        raise RuntimeError("released")

    def shares_the_gpu(fn):
        return lambda *args: gpu.acquire() and (gpu.release(), fn(*args))[1]

    dispatch.register(_candidate("stationary", forward=hangs)[0])
    dispatch.register(_candidate("graph", shares_the_gpu(reference.forward), shares_the_gpu(reference.backward))[0])
    try:
        with caplog.at_level(logging.WARNING, logger="fastmlstm"):
            assert _bf16() == "step" and _bf16() == "step"
        statuses = _statuses(stand_in)
    finally:
        release.set()
    assert statuses == {"stationary": "failed"}
    assert sum("still running; no other kernel is checked" in r.message for r in caplog.records) == 1
    _join_abandoned()
    monkeypatch.setattr(verdicts, "BOUND_S", 60.0)  # (then the other is checked, and runs)
    assert _bf16() == "graph" and _statuses(stand_in) == {"stationary": "failed", "graph": "passed"}


def test_a_check_interrupted_in_a_living_process_records_nothing(stand_in, monkeypatch):
    """Ctrl-C during the first check, the process living on (a notebook): its marker used to stay,
    read next as a check that died: "failed" for good."""
    _quick_checks(monkeypatch)

    def forward(*args):
        if len(calls) == 1:  # the check's first call: Ctrl-C, and it goes on meanwhile
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.5)
        return reference.forward(*args)

    candidate, calls = _candidate(forward=forward)
    dispatch.register(candidate)
    with pytest.raises(KeyboardInterrupt):
        _choose()
    assert _choose() == "step" and verdicts._ABANDONED  # its thread runs on: no other check meanwhile
    _join_abandoned()
    assert not _files(stand_in)
    assert _choose() == "graph" and [f["verdict"]["status"] for f in _files(stand_in)] == ["passed"]


def test_a_read_only_cache_still_decides_for_this_process(stand_in, caplog):
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("a file where the folder should be")
    dispatch.register(_candidate()[0])
    with caplog.at_level(logging.WARNING, logger="fastmlstm"):
        assert _choose() == "graph"
    assert any("cannot write the kernel verdict" in r.message for r in caplog.records)


def test_a_decided_call_costs_a_dict_lookup(stand_in, monkeypatch):
    dispatch.register(_candidate()[0])
    assert _choose() == "graph"

    def refuse(*args, **kwargs):
        raise AssertionError("decided again")

    monkeypatch.setattr(dispatch, "_decide", refuse)
    monkeypatch.setattr(verdicts, "decide", refuse)
    assert _choose() == "graph"


# ------------------------------------------------------------------------ FASTMLSTM_KERNEL

def test_kernel_step_checks_nothing_and_a_bad_value_is_a_clear_error(stand_in, monkeypatch):
    candidate, calls = _candidate()
    dispatch.register(candidate)
    monkeypatch.setenv(verdicts.ENV_KERNEL, "step")
    assert _choose() == "step" and not calls and not stand_in.exists()
    monkeypatch.setenv(verdicts.ENV_KERNEL, "fastest")
    with pytest.raises(InputError, match="FASTMLSTM_KERNEL must be one of .*'fastest'"):
        _choose()


def test_kernel_forces_a_failed_candidate_with_a_warning(stand_in, monkeypatch, caplog):
    dispatch.register(_candidate(forward=lambda *a: (_ for _ in ()).throw(RuntimeError("broken")))[0])
    monkeypatch.setenv(verdicts.ENV_KERNEL, "graph")
    with caplog.at_level(logging.WARNING, logger="fastmlstm"):
        assert _choose() == "graph"
    assert any("FASTMLSTM_KERNEL=graph runs the 'graph' kernel" in r.message and "failed its check" in r.message
               for r in caplog.records)
    monkeypatch.delenv(verdicts.ENV_KERNEL)
    assert _choose() == "step"  # not forced: the failed candidate never runs


def test_kernel_persistent_where_none_applies_is_a_clear_error(stand_in, monkeypatch):
    monkeypatch.setenv(verdicts.ENV_KERNEL, "persistent")
    dispatch.register(_candidate("cluster")[0])
    with pytest.raises(InputError, match=r"FASTMLSTM_KERNEL=persistent: no persistent kernel applies to float32 H=8"):
        _choose()


def _hopper(monkeypatch):
    """The stand-in site as a Hopper part: at bf16, B = 4, H = 64 every design applies."""
    monkeypatch.setattr(dispatch, "_site", lambda device: _site(capability=(9, 0)))
    site = _site(capability=(9, 0))
    device = Device(site.sms, site.capability, site.name)
    assert set(dispatch.designs(4, 64, torch.bfloat16, device)) == {"stationary", "cluster", "graph"}
    return device


def _bf16(direction="forward"):
    return dispatch.choose(4, 64, torch.bfloat16, torch.device("cpu"), direction)


def test_kernel_persistent_decides_for_good_only_once_every_candidate_has_its_verdict(stand_in, monkeypatch):
    """One failed, the other being checked by another process: the failed one runs for now, the
    other once it has passed (the failed one used to run for the rest of the process)."""
    _hopper(monkeypatch)
    _quick_checks(monkeypatch)
    dispatch.register(_candidate("cluster")[0])
    assert _bf16() == "cluster"
    [path] = stand_in.glob("cluster-*.json")
    passed = _mark_running(path, os.getppid())
    dispatch.register(_candidate("stationary", forward=lambda *a: (_ for _ in ()).throw(RuntimeError("broken")))[0])
    dispatch.reset()
    monkeypatch.setenv(verdicts.ENV_KERNEL, "persistent")
    assert _bf16() == "stationary"
    path.write_text(passed)  # that process finished
    assert _bf16() == "cluster"


def test_kernel_persistent_runs_the_fastest_persistent_candidate(stand_in, monkeypatch):
    _hopper(monkeypatch)
    monkeypatch.setenv(verdicts.ENV_KERNEL, "persistent")
    dispatch.register(_candidate("stationary", _slow(reference.forward, 0.01), _slow(reference.backward, 0.01))[0])
    dispatch.register(_candidate("cluster")[0])
    dispatch.register(_candidate("graph")[0])
    assert _bf16() == "cluster"
    monkeypatch.setenv(verdicts.ENV_KERNEL, "graph")
    assert _bf16() == "graph"


def test_the_fastest_passing_candidate_runs(stand_in, monkeypatch, caplog):
    """Three candidates apply and pass, each faster than the per-step path (20 ms slower per call):
    the fastest runs, in each direction on its own; one log line each says what it does."""
    _hopper(monkeypatch)
    dispatch.register(_candidate("stationary", _slow(reference.forward, 0.01), _slow(reference.backward, 0.01))[0])
    dispatch.register(_candidate("cluster", reference.forward, _slow(reference.backward, 0.015))[0])
    dispatch.register(_candidate("graph", _slow(reference.forward, 0.005), _slow(reference.backward, 0.005))[0])
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        assert _bf16("forward") == "cluster" and _bf16("backward") == "graph"
    assert {f["key"]["candidate"] for f in _files(stand_in)} == {"stationary", "cluster", "graph"}
    said = [r.message for r in caplog.records if "checking" not in r.message]
    assert sum("'cluster' kernel runs the forward for" in m and "fastest" in m for m in said) == 1
    assert sum("'graph' kernel runs the backward for" in m for m in said) == 1
    assert sum("'stationary' kernel passed its check" in m and "'cluster' and 'graph' kernel is faster" in m
               for m in said) == 1


def test_a_failed_fastest_candidate_leaves_the_next_fastest(stand_in, monkeypatch):
    _hopper(monkeypatch)

    def wrong_forward(*args):
        out = list(reference.forward(*args))
        out[0] = out[0] * 1.01
        return tuple(out)

    dispatch.register(_candidate("cluster", wrong_forward)[0])
    dispatch.register(_candidate("graph", _slow(reference.forward, 0.005), _slow(reference.backward, 0.005))[0])
    assert _bf16() == "graph"
    assert _statuses(stand_in) == {"cluster": "failed", "graph": "passed"}


def test_the_rule_takes_the_fastest_design_that_applies():
    times = {"step": 1.0, "graph": 0.5, "cluster": 0.4, "stationary": 0.3}
    assert dispatch.design_for(64, 1024, torch.bfloat16, H100, times=times) == "stationary"
    # A design that does not apply there never wins, whatever its time.
    assert dispatch.design_for(128, 4096, torch.bfloat16, H100, times=times) == "cluster"
    assert dispatch.design_for(128, 4096, torch.bfloat16, H100, times={"step": 1.0, "stationary": 0.1}) == "step"
    # No time: not a candidate (failed or not checked); ties go to the earlier design.
    assert dispatch.design_for(64, 1024, torch.bfloat16, H100, times={"step": 1.0, "graph": 1.0}) == "graph"
    assert dispatch.design_for(64, 1024, torch.bfloat16, H100, times={}) == "step"
    assert dispatch.design_for(64, 1024, torch.bfloat16, None, times=times) == "step"


# -------------------------------------------------------------------------- the real check

def test_the_check_against_the_interpreters_step_path(monkeypatch):
    """The real per-step path (Triton's interpreter) against float64: the reference backend in the
    same dtype passes as a candidate, and the same with one gradient slightly off fails."""
    monkeypatch.setattr(dispatch, "CASES", ((2, False, False), (3, True, True)))
    monkeypatch.setattr(dispatch, "TIMING_T", 1)
    monkeypatch.setattr(verdicts, "time_ms", lambda fn, device, reps=5, warmup=1: (fn(), 1.0)[1])
    good = dispatch.Candidate("graph", lambda *a: True, reference.forward, reference.backward)
    for dtype in (torch.float32, torch.bfloat16):
        verdict = dispatch.check(good, 2, 16, dtype, torch.device("cpu"))
        assert verdict.passed, verdict.reason

    def off(*args):
        grads = list(reference.backward(*args))
        grads[0] = grads[0] + 0.05 * grads[0].abs().max()
        return tuple(grads)

    bad = dispatch.Candidate("graph", lambda *a: True, reference.forward, off)
    verdict = dispatch.check(bad, 2, 16, torch.float32, torch.device("cpu"))
    assert not verdict.passed and verdict.reason.startswith("T=2: grad_proj error")


def test_the_rule_uses_the_test_suites_tolerances():
    assert verdicts.FACTOR == tolerances.FACTOR and verdicts.ABS == tolerances.ABS


def test_the_cache_lives_in_the_users_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert verdicts.cache_dir() == tmp_path / "fastmlstm" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert verdicts.cache_dir() == tmp_path / "home" / ".cache" / "fastmlstm" / "kernels"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real first use needs a GPU")
def test_on_a_gpu_the_first_call_checks_and_keeps_a_verdict(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(verdicts.ENV_KERNEL, raising=False)
    dispatch.reset()
    cuda = torch.device("cuda")
    site = verdicts.site_of(cuda)
    allowed = dispatch.designs(8, 128, torch.bfloat16, Device(site.sms, site.capability, site.name))
    assert "graph" in allowed
    name = dispatch.choose(8, 128, torch.bfloat16, cuda)
    assert name == "step" or name in allowed
    stored = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert stored and all(s["verdict"]["status"] in ("passed", "failed") for s in stored)
    assert all(s["key"]["device"] == torch.cuda.get_device_name(cuda) for s in stored)
    monkeypatch.setenv(verdicts.ENV_KERNEL, "step")
    assert dispatch.choose(8, 128, torch.bfloat16, cuda) == "step"
    dispatch.reset()
