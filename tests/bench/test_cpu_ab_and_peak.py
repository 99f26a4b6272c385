"""Seven kernel-lab probes at tiny sizes: the interleaved A/B of the CPU backend's switches
(bench/kernels/cpu_ab.py) restores what it switched, the batch-1 step loops
(bench/kernels/cpu_step.py) time every loop and restore the weight-cache mode, the generation A/B
(bench/kernels/cpu_generate.py) restores its layout rule, the narrow kernel's probe
(bench/kernels/cpu_narrow.py) times both layouts and restores the layout choice, the packs' probe
(bench/kernels/cpu_pack.py) times the four packs of a training step, and the multiply-add peak
(bench/kernels/cpu_peak.py) counts its FLOPs right, runs its portable kernel on every machine, and
turns a results file into bounds that are checked by hand, and the one-thread-and-two forward probe
(bench/kernels/cpu_threads.py) gets its FLOP ratio and fractions of the peak right."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import fastmlstm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "kernels"))

import cpu_ab  # noqa: E402
import cpu_generate  # noqa: E402
import cpu_narrow  # noqa: E402
import cpu_pack  # noqa: E402
import cpu_peak  # noqa: E402
import cpu_step  # noqa: E402
import cpu_threads  # noqa: E402

CPU = fastmlstm.backend_status("cpu", "cpu")[0]


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
@pytest.mark.parametrize("switch", ["k-split", "buffer-cache", "bf16-xm"])
def test_the_ab_times_both_sides_and_restores_the_switch(tmp_path, switch, monkeypatch):
    from fastmlstm.ops.cpu import buffer_cache, layer

    packed = layer._packed
    monkeypatch.delenv(buffer_cache.ENV_CACHE_MB, raising=False)
    out = tmp_path / "ab.json"
    before = torch.ops.fastmlstm_cpu.set_k_split(0, 0)
    assert cpu_ab.main(["--switch", switch, "--H", "40", "--B", "3", "--T", "5", "--dtypes", "float32,bfloat16",
                        "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [c["dtype"] for c in cases] == ["float32", "bfloat16"]
    for c in cases:
        assert set(c["on_over_off"]) == {"fwd", "fwd-train", "bwd"} and all(v > 0 for v in c["ms"].values())
    assert torch.ops.fastmlstm_cpu.set_k_split(0, 0) == before  # the defaults, untouched
    assert buffer_cache.ENV_CACHE_MB not in os.environ and layer._packed is packed


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_step_loops_time_every_loop_and_restore_the_cache_mode(tmp_path, monkeypatch):
    from fastmlstm.nn.modules import FastMLSTM
    from fastmlstm.nn.weight_cache import ENV_WEIGHT_CACHE

    monkeypatch.setenv(ENV_WEIGHT_CACHE, "off")
    out = tmp_path / "step.json"
    assert cpu_step.main(["--H", "16", "--steps", "2", "--rounds", "1", "--out", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert len(case["ms_per_step"]) == 11 and all(v > 0 for v in case["ms_per_step"].values())
    assert {"step / forward T=1, float32", "step / forward T=1, bfloat16", "prepared / functional, float32"} <= \
        set(case["ratios"])
    assert os.environ[ENV_WEIGHT_CACHE] == "off" and FastMLSTM._prepared_steps is cpu_step._PREPARED


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_generation_ab_times_both_sides_and_restores_the_rule(tmp_path):
    from fastmlstm.ops.cpu import recurrence

    before = recurrence.STREAM_MIN_BYTES
    out = tmp_path / "generate.json"
    assert cpu_generate.main(["--H", "16", "--bytes", "2", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert set(case["ms_per_byte"]) == {"on", "off"} and all(v > 0 for v in case["ms_per_byte"].values())
    assert case["rule_applies"] is False and recurrence.STREAM_MIN_BYTES == before


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_generation_ab_of_the_prepared_step_switches_it_off_and_back(tmp_path, monkeypatch):
    import fastmlstm

    prepare, calls = fastmlstm.ops.prepare_sequence_step, []
    monkeypatch.setattr(fastmlstm.ops, "prepare_sequence_step", lambda *a: calls.append(a) or prepare(*a))
    spy = fastmlstm.ops.prepare_sequence_step
    out = tmp_path / "generate.json"
    assert cpu_generate.main(["--switch", "prepared", "--H", "16", "--bytes", "2", "--rounds", "1", "--threads", "1",
                              "--out", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["switch"] == "prepared" and all(v > 0 for v in case["ms_per_byte"].values())
    assert "rule_applies" not in case and fastmlstm.ops.prepare_sequence_step is spy
    assert len(calls) == 2  # rounds 0 and 1 with the step on; the off side never reached the door


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_generation_ab_of_the_sampler_restores_it_and_draws_the_same_bytes(tmp_path):
    from fastmlstm.models import generation, lm

    out = tmp_path / "generate.json"
    assert cpu_generate.main(["--switch", "sampler", "--H", "16", "--bytes", "2", "--rounds", "1", "--threads", "1",
                              "--out", str(out)]) == 0
    assert lm.sample_bytes is generation.sample_bytes
    logits = torch.randn(4, 256)
    for temperature, top_k in ((1.0, None), (0.7, 9), (0, None)):
        assert torch.equal(cpu_generate._multinomial(logits, temperature, top_k, torch.Generator().manual_seed(2)),
                           generation.sample_bytes(logits, temperature, top_k, torch.Generator().manual_seed(2)))


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_narrow_probe_times_both_layouts_and_restores_the_choice(tmp_path, monkeypatch):
    from fastmlstm.ops.cpu import layer, recurrence

    monkeypatch.setenv("FASTMLSTM_CPU_BF16", "portable")  # VNNI packs on every CPU (the portable twin)
    out = tmp_path / "narrow.json"
    assert cpu_narrow.main(["--H", "16", "--B", "1,3", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [(c["H"], c["B"]) for c in cases] == [(16, 1), (16, 3)] and all(c["narrow_over_vnni"] > 0 for c in cases)
    assert layer.layout is recurrence.layout


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_pack_probe_times_the_four_packs_of_a_training_step(tmp_path):
    out = tmp_path / "pack.json"
    assert cpu_pack.main(["--H", "18", "--dtypes", "float32,bfloat16", "--rounds", "1", "--threads", "1",
                          "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["package"] == str(Path(fastmlstm.__file__).parent)
    assert [(c["H"], c["dtype"]) for c in doc["cases"]] == [(18, "float32"), (18, "bfloat16")]
    for c in doc["cases"]:
        assert set(c["ms"]) == {"gates", "hm", "hh_t", "hm_t"} and all(v > 0 for v in c["ms"].values())


def test_the_flops_count_every_thread_chain_and_lane(monkeypatch):
    class Clock:  # every run takes 1 s per 1e6 iterations, whatever the thread count
        def run_threads(self, fn, threads, iters):
            return iters * 1e-6

    monkeypatch.setattr(cpu_peak, "_pointer", lambda so, name: 0)
    for kernel, per_chain in (("portable", 2), ("avx512-fma", 32), ("avx512-bf16", 64)):
        got = cpu_peak.measure_peak(Clock(), kernel, 3, 0.5, 2)
        assert got["GFLOPs"] == round(3 * cpu_peak.CHAINS * per_chain * 1e6 / 1e9, 2)
    with pytest.raises(RuntimeError, match="could not start"):
        cpu_peak.measure_peak(type("NoThreads", (), {"run_threads": lambda self, *a: -2.0})(), "portable", 2, 0.1, 1)


def test_the_portable_kernel_runs_here():
    got = cpu_peak.measure_peak(cpu_peak.build(), "portable", 2, 0.02, 1)
    assert got["GFLOPs"] > 0 and got["iters"] >= 1
    assert cpu_peak.available(["avx2"]) == ["portable"]  # fma missing: no avx2-fma kernel
    assert cpu_peak.available(["avx2", "fma", "avx512f", "avx512_bf16"]) == list(cpu_peak.KERNELS)


def test_every_kernel_this_cpu_reports_runs():
    measured = cpu_peak.peaks(1, 0.02, 1)
    assert set(measured) == set(cpu_peak.available())
    assert all(m["GFLOPs"] > 0 for m in measured.values())


def test_the_bounds_are_flops_over_the_peak_against_the_limit():
    peaks = {"portable": {"GFLOPs": 10.0}, "avx512-fma": {"GFLOPs": 100.0}, "avx512-bf16": {"GFLOPs": 200.0}}

    def row(impl, mode, dtype, ms, gflop):
        return {"impl": impl, "mode": mode, "dtype": dtype, "H": 8, "B": 2, "median_ms": ms,
                "roofline": {"flops": gflop * 1e9}}

    results = {"results": [row("fastmlstm-cpu", "fwd", "float32", 20.0, 1.25), row("nn-lstm", "fwd", "float32", 10.0, 1.0),
                           row("fastmlstm-cpu", "fwd", "bfloat16", 9.0, 1.25), row("nn-lstm", "fwd", "bfloat16", 8.0, 1.0),
                           row("fastmlstm-cpu", "step", "float32", 1.0, 1.0), row("nn-lstm", "step", "float32", 1.0, 1.0)]}
    got = {b["dtype"]: b for b in cpu_peak.bounds(results, peaks)}
    assert set(got) == {"float32", "bfloat16"}  # no limit for the step
    # float32: 1.25 GFLOP at 100 GFLOP/s = 12.5 ms > 1.1 x 10 ms: no code could meet it here.
    assert got["float32"]["bound_ms"] == 12.5 and got["float32"]["limit_ms"] == 11.0
    assert got["float32"]["verdict"] == "infeasible here" and got["float32"]["nn_lstm_frac_of_peak"] == 1.0
    # bfloat16: 1.25 GFLOP at 200 = 6.25 ms <= 1.25 x 8 ms.
    assert got["bfloat16"]["bound_ms"] == 6.25 and got["bfloat16"]["verdict"] == "feasible"
    assert got["bfloat16"]["peak_kernel"] == "avx512-bf16"


@pytest.mark.skipif(not CPU, reason="the cpu backend is unavailable")
def test_the_thread_probe_times_both_sides_at_each_count_and_restores_the_threads(tmp_path):
    peak = tmp_path / "peak.json"
    peak.write_text(json.dumps({"peaks": {"avx512-fma": {"threads": 2, "GFLOPs": 200.0},
                                          "avx512-bf16": {"threads": 2, "GFLOPs": 400.0}}}))
    out, before = tmp_path / "threads.json", torch.get_num_threads()
    argv = ["--H", "16", "--B", "3", "--T", "2", "--dtypes", "float32", "--threads", "1,2", "--rounds", "1",
            "--peak", str(peak), "--out", str(out)]
    assert cpu_threads.main(argv) == 0 and torch.get_num_threads() == before
    (case,) = json.loads(out.read_text())["cases"]
    one, two = case["per_threads"]["1"], case["per_threads"]["2"]
    for row in (one, two):
        ms, gflops = row["ms"], row["GFLOPs"]
        assert row["ratio"] == pytest.approx(ms["fastmlstm"] / ms["nn-lstm"], rel=2e-3)
        # Equal time would be 1.25x the LSTM's rate: the mLSTM does 5H(H + I) multiply-adds per row, the LSTM 4H(H + I).
        assert row["efficiency_ratio"] == pytest.approx(1.25 / row["ratio"], rel=2e-2)
        assert gflops["nn-lstm"] == pytest.approx(2 * 2 * 3 * 4 * 16 * (16 + 64) / ms["nn-lstm"] / 1e6, rel=2e-2)
    assert "fraction_of_peak" not in one
    assert two["fraction_of_peak"]["fastmlstm"] == pytest.approx(two["GFLOPs"]["fastmlstm"] / 200.0, rel=2e-2)
    assert case["speedup"]["fastmlstm"] == pytest.approx(one["ms"]["fastmlstm"] / two["ms"]["fastmlstm"], rel=2e-2)
