"""Cost model v2 (bench/kernels/costmodel.py): rows computed by hand, and the properties that make
its floor a lower bound and its predictions honest. Pure arithmetic: well under a second."""

import sys
import types
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "bench" / "kernels"
sys.path.insert(0, str(LAB))

import costmodel  # noqa: E402
import sweep  # noqa: E402

from fastmlstm.ops.triton import configs  # noqa: E402

H100, H200 = costmodel.GPUS["H100-SXM"], costmodel.GPUS["H200"]
# Bytes and FLOPs of the H = 4096 and H = 1024 weights (5 H^2 bf16 values), and the chip's
# shared memory plus register files: 132 SMs x (228 + 256) KB.
W4096 = 5 * 4096 * 4096 * 2          # 167,772,160
W1024 = 5 * 1024 * 1024 * 2          # 10,485,760
ONCHIP = 132 * (228 + 256) * 1024    # 65,421,312
HBM_H100 = 3.35 * 0.90 * 1e6         # bytes per microsecond at the measured copy fraction
HBM_H200 = 4.8 * 0.90 * 1e6
CHAIN = 2 * 475 / (1.98 * 1e3)       # two idle far-L2 round trips, 0.4798 us


def test_floor_h100_4096_128_forward_by_hand():
    f = costmodel.floor_cost(H100, "fwd", 128, 4096)
    from_hbm = W4096 - ONCHIP - 50e6                  # 52,350,848 B no design keeps near the SMs
    state = 128 * 4096 * (11 * 2 + 4)                 # 13,631,488 B of proj_t in, h, c, gates, hm out
    assert f["hbm_bytes"] == from_hbm + state
    hbm_us = (from_hbm + state) / HBM_H100            # 21.885 us
    l2_us = (W4096 - ONCHIP + state + 128 * 4096 * 2 * 2) / 9.0e6   # 13.120 us: weights off chip, state, h and m
    math_us = 2 * 5 * 4096**2 * 128 / 989e6           # 21.714 us at the datasheet peak
    assert f["terms_us"] == pytest.approx({"hbm": hbm_us, "l2": l2_us, "math": math_us, "chain": CHAIN}, abs=1e-3)
    assert f["floor_us"] == pytest.approx(21.8847, abs=1e-3) and f["bound"] == "hbm"
    assert f["weights_from"] == "partly from HBM"


def test_floor_h100_1024_64_backward_by_hand():
    f = costmodel.floor_cost(H100, "bwd", 64, 1024)
    state = 64 * 1024 * (13 * 2 + 4)                  # 1,966,080 B: dout, gates, xm, hm, c in; dz, dxm, dhm out
    assert W1024 < ONCHIP and f["weights_from"] == "on chip"
    assert f["terms_us"]["hbm"] == pytest.approx(state / HBM_H100, abs=1e-3)                   # 0.652 us
    assert f["terms_us"]["l2"] == pytest.approx((state + 64 * 1024 * 2 * (1 + 4)) / 9.0e6, abs=1e-3)  # 0.291 us
    assert f["terms_us"]["math"] == pytest.approx(2 * 5 * 1024**2 * 64 / 989e6, abs=1e-3)     # 0.679 us
    assert f["floor_us"] == pytest.approx(0.6785, abs=1e-3) and f["bound"] == "math"


def test_floor_h200_4096_1_by_hand():
    """At B = 1 the tensor cores still compute 8 columns (their smallest n), and L2 binds."""
    f = costmodel.floor_cost(H200, "fwd", 1, 4096)
    from_hbm = W4096 - ONCHIP - 60e6                  # 42,350,848 B
    state = 4096 * 26
    assert f["terms_us"]["hbm"] == pytest.approx((from_hbm + state) / HBM_H200, abs=1e-3)       # 9.828 us
    l2 = W4096 - ONCHIP + state + 4096 * 2 * 2                                                  # 102,473,728 B
    assert f["terms_us"]["l2"] == pytest.approx(l2 / 9.8e6, abs=1e-3)                           # 10.457 us
    assert f["terms_us"]["math"] == pytest.approx(2 * 5 * 4096**2 * 8 / 989e6, abs=1e-3)        # 1.357 us
    assert f["bound"] == "l2"


def test_streaming_floor_keeps_nothing_across_steps():
    f = costmodel.floor_cost(H100, "fwd", 128, 4096, weights_stream=True)
    assert f["hbm_bytes"] == W4096 + 128 * 4096 * 26
    assert f["floor_us"] == pytest.approx((W4096 + 128 * 4096 * 26) / HBM_H100, abs=1e-3)     # 60.17 us, 1.20 x ideal


def test_step_kernel_math_counts_only_the_sms_it_occupies():
    """bwd_m at H = 4096, B = 128 under the rule: 32 hidden tiles x split 2 = 64 programs on 132 SMs;
    the busiest SM does 1/64 of the FLOPs at 1/132 of the rate (issue 22's ~1.77 x ideal)."""
    config = configs.rule("bwd_m", 128, 4096, 2, costmodel.device_of(H100))
    assert (config.BB, config.BN, config.split) == (128, 128, 2)
    k = costmodel.kernel_cost(H100, "bwd_m", 128, 4096, "bf16", config)
    flops = 2 * 128 * (4 * 4096) * 4096
    assert k["programs"] == 64 and k["active_sms"] == 64
    assert k["terms_us"]["math"] == pytest.approx(flops / 64 / (798e6 / 132), abs=1e-2)      # 44.40 us


def test_math_with_a_partial_last_wave():
    gpu = costmodel.gpus(sms=4, mma_TFLOPs_16bit=4)["H100-SXM"]   # 1e6 FLOP per microsecond per SM
    # 6 equal items on 4 SMs: the busiest SM runs 2 of them.
    assert costmodel._busiest_math_us(gpu, 6e6, 6, gpu.mma_TFLOPs_16bit) == pytest.approx(2.0)
    assert costmodel._busiest_math_us(gpu, 2e6, 2, gpu.mma_TFLOPs_16bit) == pytest.approx(1.0)  # 2 SMs idle


def _toy_schedule(design="cluster", reduction="l2", **kernel):
    """Two phases on 2 CTAs, 64-row tiles, K blocks of 64, B = 8 (MMA N 16): phase 0 is one tile
    split in two parts (CTA 0 then CTA 1, which finishes it); in phase 1 each CTA owns a tile."""
    phase = types.SimpleNamespace
    phases = (phase(index=0, product="hm", K=128, block_m=64, block_k=64, sync="grid"),
              phase(index=1, product="z", K=64, block_m=64, block_k=64, sync="grid"))
    tile = types.SimpleNamespace
    tiles = (tile(cta=0, phase=0, kb_lo=0, kb_hi=1, part=0, parts=2), tile(cta=1, phase=0, kb_lo=1, kb_hi=2, part=1, parts=2),
             tile(cta=0, phase=1, kb_lo=0, kb_hi=1, part=0, parts=1), tile(cta=1, phase=1, kb_lo=0, kb_hi=1, part=0, parts=1))
    return types.SimpleNamespace(
        design=design, direction="forward", B=8, H=64, dtype_bytes=2, ctas=2, cluster=2, active_sms=2, split_k=2,
        reduction=reduction, resident_weight_bytes_per_cta=0, block_b=16, phases=phases, tiles=tiles,
        hbm_bytes_per_step=4e6, l2_bytes_per_step=3e6, onchip_bytes_per_step=0, multicast_bytes_saved_per_step=0,
        weight_bytes_per_call=0, **kernel)


def test_persistent_cost_by_hand():
    # 2 SMs at 1e6 FLOP/us each; 1e5 B/us of ingest per SM; HBM 1e6 B/us; L2 2e6 B/us.
    gpu = costmodel.gpus(sms=2, mma_TFLOPs_16bit=2, sm_ingest_GBps=100, hbm_TBps=1, hbm_efficiency=1, l2_TBps=2,
                         grid_sync_us=1.0, l2_latency_us=0.5, hbm_latency_us=0.8)["H100-SXM"]
    mma = 2 * 64 * 16 * 64 / 1e6          # one K block: 64 rows x 16 batch columns x 64 -> 0.131 us
    store = 64 * 8 * 4 / 1e5              # the float32 partial [64, 8] -> 0.0205 us
    sync = 1.0 + 0.5                      # grid dependency, then an L2 read of what it waited for
    # Phase 0: CTA 1 finishes the 2-part tile: ticket 0.5, then its one epilogue chunk (64 units x
    # 32 batch rows covers B = 8) loads the parts one after another (2 x 0.5) and then the operands
    # (0.8); the parts' 4 KB at the ingest rate are less.
    p0 = mma + store + 0.5 + (2 * 0.5 + 0.8) + sync
    # Phase 1: each CTA finishes its own 1-part tile: one round (0.5) + operands (0.8), no ticket.
    p1 = mma + store + (0.5 + 0.8) + sync
    c = costmodel.persistent_cost(gpu, _toy_schedule())
    assert [p["us"] for p in c["phases"]] == pytest.approx([p0, p1], abs=2e-3)
    assert c["terms_us"]["hbm"] == pytest.approx(4.0) and c["terms_us"]["l2"] == pytest.approx(1.5)
    assert c["time_us"] == pytest.approx(p0 + p1, abs=2e-3) and c["bound"] == "chain"
    # Four parts per round and the operands issued before them: the chunk waits for the longer of
    # one L2 round trip (0.5) and the operands' HBM latency (0.8).
    fast = costmodel.persistent_cost(gpu, _toy_schedule(gather_unroll=4, epilogue_prefetch=True))
    assert [p["us"] for p in fast["phases"]] == pytest.approx([mma + store + 0.5 + 0.8 + sync,
                                                              mma + store + 0.8 + sync], abs=2e-3)
    # Every part finishes a slice: the 2-part tile's one chunk falls to part 1 (chunks [p/2, (p+1)/2)
    # of 1), and part 0 still waits for the ticket before its empty slice: both CTAs take
    # mma + store + ticket, CTA 1 also its chunk.
    split = costmodel.persistent_cost(gpu, _toy_schedule(gather_unroll=4, epilogue_prefetch=True, finish_split=True))
    assert split["phases"][0]["finish_us"] == pytest.approx(0.5 + 0.8, abs=1e-3)
    # A stationary design receives no weights: only the activation tile [8, 64], 1,024 B.
    s = costmodel.persistent_cost(gpu, _toy_schedule(design="stationary"))
    assert s["phases"][0]["ingest_us"] == pytest.approx(1024 / 1e5, abs=1e-3)
    # A DSMEM reduction of 2 parts stores no partial: one tree round, a remote access (0.1) behind a
    # cluster barrier (0.15), after the ticket; then the operands (0.8).
    d = costmodel.persistent_cost(gpu, _toy_schedule(reduction="dsmem"))
    assert d["phases"][0]["finish_us"] == pytest.approx(0.5 + 0.25 + 0.8, abs=1e-3)
    assert d["phases"][0]["store_us"] == 0


def test_the_model_reads_the_kernels_epilogue_as_written():
    """The finish the model prices is the Gluon kernels': the schedule's epilogue chunk and gather
    rounds are the kernels' EPI_M x EPI_B, GATHER and GATE_GATHER, and the model's chunk count is
    the schedule's."""
    import re

    from fastmlstm.ops.triton.persistent import schedule

    source = (LAB.parents[1] / "fastmlstm" / "ops" / "triton" / "persistent" / "gluon_common.py").read_text()

    def constant(name):
        return int(re.search(rf"^{name} = gl.constexpr\((\d+)\)", source, re.M).group(1))

    assert constant("EPI_M") == schedule.EPILOGUE_ROWS
    assert constant("EPI_M") * constant("EPI_B") == schedule.EPILOGUE_VALUES
    assert constant("GATHER") == schedule.GATHER_UNROLL and constant("GATE_GATHER") == schedule.GATE_GATHER_UNROLL
    for H, B in costmodel.MODEL_SHAPES:
        sched = costmodel.schedule_for("cluster", "fwd", B, H, 2, H100)
        assert sched.finish_split and sched.epilogue_prefetch
        for phase in sched.phases:
            assert costmodel._chunks(sched, phase) == sched.chunks(phase)


def test_the_finish_as_the_kernels_run_it_by_hand():
    """H100, H = 4096, B = 128, forward hm: 256-unit tiles of 16 chunks (4 x 64 units, 4 x 32 rows),
    split in up to 9 parts; the CTA of the part that finishes the most chunks (2) waits for its
    ticket (0.3 us), then per chunk max(ceil(9 / 4) = 3 L2 round trips, the operands' 0.8 us)."""
    sched = costmodel.schedule_for("cluster", "fwd", 128, 4096, 2, H100)
    hm = sched.phases[0]
    tile = max((t for t in sched.tiles if t.phase == 0 and t.parts == 9),
               key=lambda t: sched.finish_slice(hm, t.part, t.parts)[1] - sched.finish_slice(hm, t.part, t.parts)[0])
    lo, hi = sched.finish_slice(hm, tile.part, tile.parts)
    assert (sched.chunks(hm), hi - lo) == (16, 2)
    assert costmodel._finish_us(H100, sched, hm, tile) == pytest.approx(0.3 + 2 * max(3 * 0.3, 0.8), abs=1e-6)


def test_rows_price_what_the_dispatcher_picks():
    """A row's design is the dispatcher's rule (the fastest design that applies) on the model's
    predictions: no design the dispatcher may run there is predicted faster."""
    from fastmlstm.ops.triton.dispatch import design_for, designs

    for gpu in costmodel.GPUS.values():
        for H, B in costmodel.MODEL_SHAPES:
            for direction in costmodel.DIRECTIONS:
                row = costmodel.direction_cost(gpu, direction, B, H)
                allowed = (*designs(B, H, "bfloat16", costmodel.device_of(gpu), costmodel.LONG[direction]), "step")
                times = {d: costmodel.design_cost(gpu, d, direction, B, H)["time_us"] for d in allowed}
                assert row["design"] == design_for(B, H, "bfloat16", costmodel.device_of(gpu),
                                                   direction=costmodel.LONG[direction], times=times)
                assert row["predicted_us"] == pytest.approx(min(times.values()), abs=0.01)
                if row["design"] in ("cluster", "stationary"):  # the schedule's own bytes and launch shape
                    sched = costmodel.schedule_for(row["design"], direction, B, H, 2, gpu)
                    assert (row["hbm_bytes"], row["l2_bytes"], row["ctas"], row["cluster"], row["active_sms"]) == (
                        sched.hbm_bytes_per_step, sched.l2_bytes_per_step, sched.ctas, sched.cluster,
                        sched.active_sms)
                alternatives = costmodel.alternatives(gpu, direction, B, H)
                assert {d for d, t in alternatives.items() if t is not None} == set(allowed)


def test_the_per_step_path_is_host_bound_without_a_graph():
    step = costmodel.direction_cost(H100, "fwd", 64, 1024, design="step")
    graph = costmodel.direction_cost(H100, "fwd", 64, 1024, design="graph")
    assert step["predicted_us"] == pytest.approx(2 * 12.0) and step["bound"] == "host"
    assert graph["predicted_us"] == pytest.approx(sum(k["time_us"] for k in graph["kernels"]), abs=0.01)
    assert graph["predicted_us"] < step["predicted_us"]


@pytest.mark.parametrize("l2, sync", [(5.5, 0.5), (9.0, 1.0), (14.0, 2.0), (20.0, 0.2)])
def test_no_design_beats_the_floor(l2, sync):
    """At every modelled shape, on both GPUs and across the uncertain numbers, every design the
    dispatcher can pick predicts no less than the floor; streaming designs no less than the
    streaming floor."""
    for gpu in costmodel.gpus(l2_TBps=l2, grid_sync_us=sync).values():
        for H, B in costmodel.MODEL_SHAPES + ((512, 16), (1536, 32), (3000, 200)):
            for direction in costmodel.DIRECTIONS:
                floor = costmodel.floor_cost(gpu, direction, B, H)["floor_us"]
                streaming = costmodel.floor_cost(gpu, direction, B, H, weights_stream=True)["floor_us"]
                for design in costmodel.DESIGN_NAMES:
                    cost = costmodel.design_cost(gpu, design, direction, B, H)
                    if cost is None:
                        continue
                    assert cost["time_us"] >= floor, (gpu.name, H, B, direction, design)
                    if design in ("cluster", "step", "graph"):
                        assert cost["time_us"] >= streaming, (gpu.name, H, B, direction, design)


def test_no_swept_plan_beats_the_floor():
    for gpu in costmodel.GPUS.values():
        device = costmodel.device_of(gpu)
        for H, B in costmodel.MODEL_SHAPES:
            candidates = {k: sweep.sweep_candidates(k, B, H, 2, device) for k in configs.KERNELS}
            for direction, kernels in costmodel.DIRECTIONS.items():
                floor = costmodel.floor_cost(gpu, direction, B, H)["floor_us"]
                for first in candidates[kernels[0]]:
                    for second in candidates[kernels[1]]:
                        plan = configs.StepPlan(**{**{k: c[0] for k, c in candidates.items()},
                                                   kernels[0]: first, kernels[1]: second})
                        assert costmodel.direction_cost(gpu, direction, B, H, plan=plan)["predicted_us"] >= floor


def test_predictions_respect_their_own_bytes():
    """No prediction beats its design's HBM and L2 bytes at the table's bandwidths, or the host."""
    for r in costmodel.model_rows():
        gpu = costmodel.GPUS[r["gpu"]]
        assert r["predicted_us"] >= r["hbm_bytes"] / (gpu.hbm_TBps * gpu.hbm_efficiency * 1e6) - 0.01
        assert r["predicted_us"] >= r["l2_bytes"] / (gpu.l2_TBps * 1e6) - 0.01
        assert r["floor_us"] <= r["floor_streaming_us"] <= r["predicted_us"] + (0 if r["design"] != "stationary" else 1e9)
        if r["design"] == "step":
            assert r["predicted_us"] >= 2 * gpu.cpu_launch_us


def test_the_floor_only_rises_with_slower_hardware():
    slow = costmodel.gpus(l2_TBps=2.0, hbm_TBps=1.0, mma_peak_TFLOPs_16bit=300)["H100-SXM"]
    for H, B in costmodel.MODEL_SHAPES:
        for direction in costmodel.DIRECTIONS:
            assert costmodel.floor_cost(slow, direction, B, H)["floor_us"] >= costmodel.floor_cost(
                H100, direction, B, H)["floor_us"]


def test_targets_are_judged_on_the_rows():
    rows = costmodel.model_rows()
    report = costmodel.target_report(rows)
    by_row = {(r["gpu"], r["H"], r["B"], r["direction"]): r for r in rows}
    assert {(t["gpu"], t["H"], t["B"]) for t in report if t["check"] == "ratio"} == set(costmodel.TARGETS)
    for t in report:
        r = by_row[(t["gpu"], t["H"], t["B"], t["direction"])]
        if t["check"] == "ratio":
            assert t["met"] == (r["predicted_us"] <= costmodel.TARGETS[(t["gpu"], t["H"], t["B"])] * r["ideal_us"] + 0.01)
        else:
            assert r["B"] >= costmodel.BUSY_MIN_BATCH and t["met"] == (r["active_sms"] == r["sms"])
        assert bool(t["why_not"]) != t["met"]


def test_every_number_has_a_source_and_assumptions_are_marked():
    fields = set(costmodel.GPU.__dataclass_fields__) - {"name"}
    assert {row[0] for row in costmodel.TABLE} == fields
    for name, h100, h200, source in costmodel.TABLE:
        assert h100 > 0 and h200 > 0 and len(source) > 20, name
    assert {"grid_sync_us", "cluster_sync_us", "launch_gap_us"} <= set(costmodel.assumptions())
    assert "l2_TBps" not in costmodel.assumptions()


def test_benchmark_predictions_carry_the_floor_and_the_per_call_cost():
    for mode, T in (("step", 1), ("fwd", 64), ("fwd+bwd", 64)):
        p = costmodel.predict("H100-SXM", mode, "bfloat16", 4096, 128, T)
        assert p["floor_ms"] <= p["predicted_ms"], (mode, p)
    # The stationary design loads its weights once per call: a one-step call pays all of it.
    one = costmodel.predict("H100-SXM", "step", "bfloat16", 1024, 64)
    row = costmodel.direction_cost(H100, "fwd", 64, 1024)
    if row["design"] == "stationary":
        assert one["predicted_ms"] * 1e3 == pytest.approx(row["predicted_us"] + row["per_call_us"], abs=0.02)
        assert row["per_call_us"] >= W1024 / HBM_H100
    assert costmodel.predict("H100-SXM", "featurize", "bfloat16", 4096, 128) is None
    assert costmodel.predict("H100-SXM", "fwd", "float32", 4096, 128) is None


def test_levers_price_the_real_schedules():
    """levers.py: "as built" is the model's row; dropping the xm save takes B H e bytes off the
    forward's HBM traffic and nothing off the backward's; the finish before the rework is never
    faster; weights kept in L2 beyond the table's l2_keep_MB count as HBM traffic again."""
    import levers

    rows = {(r["gpu"], r["H"], r["B"], r["direction"], r["lever"]): r for r in levers.lever_rows()}
    for (gpu, H, B, direction, lever), r in rows.items():
        if lever == "as built":
            row = costmodel.direction_cost(costmodel.GPUS[gpu], direction, B, H)
            assert (r["design"], r["predicted_us"]) == (row["design"], pytest.approx(row["predicted_us"], abs=0.01))
            before = [x for (g, h, b, d, name), x in rows.items() if (g, h, b, d) == (gpu, H, B, direction)
                      and name.startswith("the finish before")]
            assert all(x["predicted_us"] >= r["predicted_us"] - 1e-6 for x in before)
    no_xm = "+ xm not saved (item 7)"
    base, fewer = rows[("H100-SXM", 4096, 128, "fwd", "as built")], rows[("H100-SXM", 4096, 128, "fwd", no_xm)]
    assert base["hbm_MB"] - fewer["hbm_MB"] == pytest.approx(128 * 4096 * 2 / 1e6, abs=0.11)
    assert rows[("H100-SXM", 4096, 128, "bwd", no_xm)]["hbm_MB"] == rows[("H100-SXM", 4096, 128, "bwd", "as built")][
        "hbm_MB"]
    spilled = next(r for k, r in rows.items() if k[:4] == ("H100-SXM", 2048, 128, "fwd") and "42 MB" in k[4])
    assert spilled["hbm_MB"] > 42 and spilled["bound"] == "hbm"


def test_the_design_without_split_k_by_hand():
    """levers.nosplit_cost, H100, H = 1024, B = 64, forward: 8 units per CTA (ceil(1024 / 132) = 8)
    on 128 CTAs; per phase a 1.3 us grid dependency, then the SM's ingest of the whole [64, 1024]
    activation (131 KB at 127 GB/s: 1.032 us) outlasts the MMA (64 rows x 8 or 32 units x 1024)."""
    import levers

    c = levers.nosplit_cost(H100, "fwd", 64, 1024)
    ingest = 64 * 1024 * 2 / 127e3
    assert (c["ctas"], c["units_per_cta"]) == (128, 8)
    assert [p["math_us"] for p in c["phases"]] == pytest.approx([2 * 64 * 8 * 1024 / (798e6 / 132),
                                                                 2 * 64 * 32 * 1024 / (798e6 / 132)], abs=1e-3)
    assert c["time_us"] == pytest.approx(2 * (1.0 + 0.3 + ingest), abs=2e-3) and c["bound"] == "chain"
    # The backward's dm = dz Wh takes all of dz [64, 4096]: four times the ingest.
    assert levers.nosplit_cost(H100, "bwd", 64, 1024)["phases"][1]["ingest_us"] == pytest.approx(4 * ingest, abs=1e-3)
    assert levers.nosplit_cost(H100, "fwd", 128, 1024) is None  # the batch is one MMA's 64 rows
