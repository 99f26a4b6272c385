"""The Triton dispatcher's launch configurations (``fastmlstm.ops.triton.configs``): the split-K
ticket protocol (splits of 1 and 3, uneven: 3 does not divide the K blocks), gathering partials,
the dispatcher's sources (rule, tuned table, override) and the form it checks a tuned entry for,
the device guard and the 32-bit size guard of the Triton backend. Each kernel runs under Triton's
interpreter (on a GPU: natively) through the backend contract.

Every config of the dispatch space against the float64 truth, and the space itself, are tested
with the kernel lab that defines them (``bench/kernels/sweep.py``): ``tests/bench/test_sweep.py``.
"""

import dataclasses

import contract
import pytest
import torch
from conftest import DEVICE, ON_GPU

import fastmlstm
from fastmlstm.ops import autograd
from fastmlstm.ops.triton import configs

pytestmark = pytest.mark.skipif(not fastmlstm.backend_status("triton", DEVICE)[0],
                                reason="the Triton backend cannot run here")


def _inputs(T, B, H, dtype, seed=0):
    return contract.inputs(T, B, H, dtype, ragged=True, seed=seed, device=DEVICE)


_run = contract.run


def test_split_k_results_are_independent_of_the_split_count():
    """Splits change only the float32 summation order: close to each other, and the tickets are
    back to zero after every launch (a stale ticket would skip an epilogue: NaN from poisoning)."""
    H = 37
    inputs = _inputs(4, 5, H, torch.float32, seed=1)
    base = configs.KernelConfig(BB=16, BN=16, BK=16, num_warps=4, num_stages=2)
    results = []
    for split in (1, 2, 3):
        with configs.override(dataclasses.replace(base, split=split)):
            results.append(_run("triton", *inputs))
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-5)


def test_split_k_is_deterministic():
    inputs = _inputs(3, 5, 37, torch.bfloat16, seed=2)
    with configs.override(configs.KernelConfig(BB=16, BN=16, BK=16, num_warps=4, num_stages=2, split=3)):
        first = _run("triton", *inputs)
        second = _run("triton", *inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_gathering_partials_several_at_a_time_changes_no_bit(monkeypatch):
    """The epilogue loads 1, 2 or 4 split partials per round (GATHER); it adds them in split order
    whatever the round size, padding a short last round with -0.0, so the results are bitwise equal."""
    inputs = _inputs(3, 5, 80, torch.float32, seed=4)
    config = configs.KernelConfig(BB=16, BN=16, BK=16, num_warps=1, num_stages=2, split=5)  # 8 values per thread
    results = {}
    for budget, gather in ((8, 1), (16, 2), (32, 4)):
        monkeypatch.setattr(configs, "_GATHER_VALUES_PER_THREAD", budget)
        assert configs.gather_unroll("bwd_m", config) == gather
        with configs.override(config):
            results[gather] = _run("triton", *inputs)
    for gather in (2, 4):
        for name in results[1]:
            assert torch.equal(results[gather][name], results[1][name]), (gather, name)


def test_empty_splits_are_harmless():
    """More splits than K blocks: the override caps them at the K blocks."""
    inputs = _inputs(2, 3, 20, torch.float32, seed=3)
    ref = _run("reference", *inputs)
    with configs.override(configs.KernelConfig(BB=16, BN=16, BK=16, num_warps=4, num_stages=2, split=16)):
        plan = configs.plan(3, 20, "float32", "ieee", None, interpret=True)
        assert plan.fwd_m.split == 2 and plan.bwd_m.split == 5  # cdiv(20, 16) and cdiv(80, 16) blocks
        got = _run("triton", *inputs)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the dispatcher

H100 = configs.Device(sms=132, capability=(9, 0), name="NVIDIA H100 80GB HBM3")
A100 = configs.Device(sms=108, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")


@pytest.mark.parametrize("device", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_the_rule_splits_within_the_k_blocks_and_fits_shared_memory(device, dtype_bytes):
    """(That every rule config lies in the dispatch space: tests/bench/test_sweep.py.)"""
    for B in (1, 2, 16, 17, 33, 64, 100, 128, 129, 512, 4096):
        for H in (5, 64, 257, 1024, 4096):
            for k in configs.KERNELS:
                c = configs.rule(k, B, H, dtype_bytes, device)
                assert 1 <= c.split <= configs.k_blocks(k, H, c)
                assert c.pdl == (device.capability >= (9, 0))
                assert configs.pipeline_bytes(k, c, dtype_bytes) <= configs.SMEM_BUDGET


def test_rule_reads_wide_rows_and_fills_the_gpu():
    """Backward weight rows (n-contiguous) and forward ones (k-contiguous) are read 128 bytes at a
    time in 16-bit, and the grid is never starved: at least half a program per SM where B >= 64
    (the cost model's choice; bench/kernels/NOTES.md), two where B <= 16."""
    for B, per_sm in ((128, 0.5), (64, 0.5), (1, 2)):
        for k in configs.KERNELS:
            c = configs.rule(k, B, 4096, 2, H100)
            if k in ("bwd_h", "bwd_m"):
                assert c.BN * 2 >= 128
            else:
                assert c.BK * 2 >= 128
            n, b = configs.tiles(k, B, 4096, c)
            assert c.split * n * b >= per_sm * H100.sms * 0.95, (k, B, c)


def test_the_plan_prefers_override_then_interpreter_then_tuned_then_rule(monkeypatch):
    entry = {"device": H100.name, "dtype": "bfloat16", "precision": "ieee", "B": 128, "H": 4096,
             "configs": {k: dataclasses.replace(configs.rule(k, 128, 4096, 2, H100), split=1).as_dict()
                         for k in configs.KERNELS}}
    monkeypatch.setattr(configs, "_tuned_entries", lambda: [entry])
    assert configs.plan(128, 4096, "bfloat16", "ieee", H100, interpret=False).source == "tuned"
    assert configs.plan(128, 4096, "bfloat16", "ieee", H100, interpret=False).fwd_m.split == 1
    assert configs.plan(64, 4096, "bfloat16", "ieee", H100, interpret=False).source == "rule"
    assert configs.plan(128, 4096, "float16", "ieee", H100, interpret=False).source == "rule"
    assert configs.plan(128, 4096, "bfloat16", "ieee", H100, interpret=True).source == "interpreter"
    with configs.override(configs.INTERPRETER_CONFIG):
        assert configs.plan(128, 4096, "bfloat16", "ieee", H100, interpret=False).source == "override"


@pytest.mark.parametrize("change,match", [
    ({"dtype": "float64"}, "unknown dtype"),
    ({"precision": "fast"}, "unknown precision"),
    ({"B": 0}, "B must be a positive int"),
    ({"configs": {"fwd_m": {}}}, "expected exactly"),
    ({"configs": {k: {"BB": 16} for k in configs.KERNELS}}, "bad config for fwd_m"),
    ({"configs": {k: dict(configs.INTERPRETER_CONFIG.as_dict(), BB=24) for k in configs.KERNELS}}, "power of two"),
])
def test_a_malformed_tuned_entry_is_refused(monkeypatch, change, match):
    """The dispatcher checks a tuned entry's form when it reads it (whether its configs lie in the
    dispatch space is checked where the table is written and in tests/bench/test_sweep.py)."""
    entry = {"device": H100.name, "dtype": "bfloat16", "precision": "ieee", "B": 128, "H": 4096,
             "configs": {k: configs.rule(k, 128, 4096, 2, H100).as_dict() for k in configs.KERNELS}}
    assert configs.validate_entry(entry)["fwd_m"] == configs.rule("fwd_m", 128, 4096, 2, H100)
    bad = {**entry, **change}
    with pytest.raises(ValueError, match=match):
        configs.validate_entry(bad)
    monkeypatch.setattr(configs, "_tuned_entries", lambda: [bad])
    if bad["B"] == 128:  # the plan reads the entry of its own shape only
        with pytest.raises(ValueError, match=match):
            configs.plan(128, 4096, bad["dtype"], bad["precision"], H100, interpret=False)


def test_the_committed_tuned_table_has_the_form_the_dispatcher_reads():
    from fastmlstm.ops.triton import tuned

    for entry in tuned.ENTRIES:
        configs.validate_entry(entry)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        configs.KernelConfig(BB=24, BN=16, BK=16, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="num_warps"):
        configs.KernelConfig(BB=16, BN=16, BK=16, num_warps=3, num_stages=2)
    with pytest.raises(ValueError, match="split"):
        configs.KernelConfig(BB=16, BN=16, BK=16, num_warps=4, num_stages=2, split=0)
    with pytest.raises(ValueError, match="unknown kernels"), configs.override({"fwd_x": configs.INTERPRETER_CONFIG}):
        pass


# ------------------------------------------------------------------------------ guards

def test_size_guard_refuses_offsets_past_32_bits():
    """Kernel offsets are 32-bit: 4 H^2 and 6 H B must stay below 2^31, checked before anything
    is allocated or launched (meta tensors: no memory behind them)."""
    from fastmlstm.ops import triton as triton_backend

    def args(B, H):
        proj = torch.empty(0, B, 5 * H, device="meta")
        w_hh = torch.empty(4 * H, H, device="meta")
        w_hm = torch.empty(H, H, device="meta")
        state = torch.empty(B, H, device="meta")
        return proj, w_hh, w_hm, state, state, None, False, False

    with pytest.raises(ValueError, match=r"4\*H\^2 and 6\*H\*B below 2\^31; got H=23171, B=1"):
        triton_backend.forward(*args(1, 23171))  # 4 H^2 = 2,147,581,924
    with pytest.raises(ValueError, match="got H=64, B=5592406"):
        triton_backend.forward(*args(5592406, 64))  # 6 H B = 2,147,483,904
    out = torch.empty(0, 5592406, 64, device="meta")
    with pytest.raises(ValueError, match="got H=64, B=5592406"):
        triton_backend.backward(None, None, None, None, None, None, None, None, out, None, None)
    with pytest.raises(ValueError, match="at most 1048560 rows per call"):
        triton_backend.forward(*args(1048561, 8))  # within 32 bits, but 65536 batch tiles of 16
    # Just below the limits the guard lets it through.
    from fastmlstm.ops.triton.recurrence import _check_sizes

    _check_sizes(1, 23170)
    _check_sizes(1048560, 64)


def test_tensors_on_another_device_are_refused():
    """The backend runs on proj's device; a weight elsewhere is an error that names both."""
    from fastmlstm.ops import triton as triton_backend

    H, B = 8, 2
    proj = torch.zeros(1, B, 5 * H, device=DEVICE)
    w_hh = torch.zeros(4 * H, H, device="meta")
    w_hm = torch.zeros(H, H, device=DEVICE)
    state = torch.zeros(B, H, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight_hh is on meta but the recurrence runs on"):
        triton_backend.forward(proj, w_hh, w_hm, state, state, None, False, False)


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_device_other_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the launches go to cuda:1 (the device guard), so
    the results are right and live there."""
    proj, w_hh, w_hm, h0, c0, lengths, grads = _inputs(3, 4, 24, torch.float32)
    on_1 = [t.to("cuda:1") for t in (proj, w_hh, w_hm, h0, c0, lengths)]
    grads_1 = [g.to("cuda:1") for g in grads]
    with torch.cuda.device(0):
        fwd = autograd.sequence_forward(*on_1, "triton", True, True)
        bwd = autograd.sequence_backward(*grads_1, *on_1[1:], fwd[0], fwd[2], fwd[3], "triton")
        torch.cuda.synchronize(1)
    assert all(t.device == torch.device("cuda:1") for t in (*fwd, *bwd))
    ref = _run("reference", proj, w_hh, w_hm, h0, c0, lengths, grads)
    names = ("output", "c_n", "cell_states", "act", "grad_proj", "grad_weight_hh", "grad_weight_hm", "grad_h0",
             "grad_c0")
    for name, value in zip(names, (*fwd, *bwd)):
        if name != "act":
            torch.testing.assert_close(value.double().cpu(), ref[name], rtol=1e-5, atol=1e-5)
