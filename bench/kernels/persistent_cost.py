"""The persistent kernels in cost model v2 (``costmodel.py`` re-exports these): one step of a
``fastmlstm.ops.triton.persistent`` schedule, priced from the schedule itself (the same tile plan
the kernels run), with the split-tile finish as the kernels do it.

Every time comes from the GPU table (``gpu_table.py``), where each number has its source.
"""

from __future__ import annotations

import math

from gpu_table import GPU


def _hbm_us(gpu, nbytes):
    return nbytes / (gpu.hbm_TBps * gpu.hbm_efficiency * 1e6)


def _l2_us(gpu, nbytes):
    return nbytes / (gpu.l2_TBps * 1e6)


def _tile_work(sched, tile) -> tuple[float, int]:
    """(tensor-core FLOPs, bytes into the SM) of one contribution of a schedule: the MMA runs on
    whole tiles (block_m rows of weights x block_b batch columns, whole K blocks); the SM receives
    its weight tiles but the resident ones (``tile.resident`` leading blocks; a schedule that does
    not say: all of a stationary design's) and the multicast activation tile [B, its K range]."""
    phase = sched.phases[tile.phase]
    blocks = tile.kb_hi - tile.kb_lo
    resident = getattr(tile, "resident", blocks if sched.design == "stationary" else 0)

    def k_len(lo):
        return max(0, min(tile.kb_hi * phase.block_k, phase.K) - lo * phase.block_k)

    flops = 2.0 * phase.block_m * sched.block_b * blocks * phase.block_k
    weights = phase.block_m * k_len(tile.kb_lo + resident) * sched.dtype_bytes
    return flops, weights + sched.B * k_len(tile.kb_lo) * sched.dtype_bytes


# How a schedule finishes its tiles when it does not say (the kernels before issue 22's finish
# rework, and the toy schedules of the tests): one finisher per tile, the parts loaded one at a
# time, then the operands. The kernels' schedules carry their own (``schedule.Schedule``:
# epilogue_rows, epilogue_values, gather_unroll, gate_gather_unroll, epilogue_prefetch,
# finish_split); tests/bench/test_costmodel.py ties those to the Gluon source.
FINISH_DEFAULTS = {"epilogue_rows": 64, "epilogue_values": 2048, "gather_unroll": 1, "gate_gather_unroll": 1,
                   "epilogue_prefetch": False, "finish_split": False}


def _finish(sched, key):
    return getattr(sched, key, FINISH_DEFAULTS[key])


def _chunks(sched, phase) -> int:
    """Epilogue chunks of one output tile (``schedule.chunk_count``: units-major chunks of at most
    epilogue_rows units and epilogue_values values per CTA)."""
    units_per_tile = getattr(phase, "units_per_tile", phase.block_m // 4 if phase.product == "z" else phase.block_m)
    rows = min(_finish(sched, "epilogue_rows"), units_per_tile)
    cols = max(1, _finish(sched, "epilogue_values") // rows)
    return math.ceil(units_per_tile / rows) * math.ceil(sched.B / cols)


def _finish_us(gpu: GPU, sched, phase, tile, prefetched: bool = False) -> float:
    """Time a CTA spends finishing its share of ``tile`` once its contributions are stored (B1's
    reduction "l2": partials in a workspace, gathered in part order).

    With ``finish_split`` every part finishes chunks [p n / P, (p + 1) n / P) of the tile's n
    epilogue chunks, else the last part all of them. A split tile first waits for its ticket (an L2
    round trip). Each chunk loads its parts in ceil(P / unroll) rounds of L2 round trips (unroll:
    ``gather_unroll``, ``gate_gather_unroll`` for "z", whose rounds load every gate) and its
    operands (one HBM latency): issued before the gather (``epilogue_prefetch``, or ``prefetched``:
    a lever) they overlap it, max of the two, else one after the other. At least the parts' bytes
    at the SM's ingest rate. "dsmem": a tree of ceil(log2(P)) remote rounds behind cluster
    barriers; "tma_add": one L2 round trip; both then the chunks' operand latencies (no schedule
    uses either)."""
    parts, n = tile.parts, _chunks(sched, phase)
    if _finish(sched, "finish_split"):
        mine = (tile.part + 1) * n // parts - tile.part * n // parts
    else:
        mine = n if tile.part == parts - 1 else 0
    if mine == 0:
        return gpu.l2_latency_us if parts > 1 and _finish(sched, "finish_split") else 0.0
    ticket = gpu.l2_latency_us if parts > 1 else 0.0
    overlap = prefetched or _finish(sched, "epilogue_prefetch")
    if sched.reduction == "l2":
        unroll = _finish(sched, "gate_gather_unroll" if phase.product == "z" else "gather_unroll")
        gather = math.ceil(parts / unroll) * gpu.l2_latency_us
        chunk = max(gather, gpu.hbm_latency_us) if overlap else gather + gpu.hbm_latency_us
        by_bytes = parts * phase.block_m * sched.B * 4 * mine / n / (gpu.sm_ingest_GBps * 1e3)
        return ticket + max(mine * chunk, by_bytes)
    operands = 0.0 if overlap else mine * gpu.hbm_latency_us
    if sched.reduction == "dsmem" and parts > 1:
        return ticket + math.ceil(math.log2(parts)) * (gpu.dsmem_latency_us + gpu.cluster_sync_us) + operands
    if sched.reduction == "tma_add" and parts > 1:
        return ticket + gpu.l2_latency_us + operands
    return operands


def persistent_cost(gpu: GPU, sched, prefetched: bool = False) -> dict:
    """A persistent kernel from its schedule (``fastmlstm.ops.triton.persistent.schedule``).

    The weights stream (or sit in shared memory) independently of the step's dependency chain: a
    CTA prefetches the next phase's weight tiles while it waits at a barrier, so the HBM, L2 and
    shared-memory traffic overlaps the chain. The chain is, per phase in dependency order, the
    slowest CTA: its tensor-core time over its tiles (at its SM's share of the measured rate) or its
    operand ingest, whichever is longer; then, with the "l2" reduction, storing its float32
    partials and its share of the finish of each of its tiles (:func:`_finish_us`: the ticket of a
    split tile, the chunks it finishes); then the phase's synchronisation ("grid": ``grid_sync_us`` and an L2 read of
    what it waited for; "cluster": ``cluster_sync_us`` and a DSMEM read). Step = max(HBM, L2,
    shared-memory reads, chain). It assumes the prefetch outlasts a barrier (a 1 us barrier at
    3 TB/s is 3 MB chip-wide, 23 KB per SM, inside the pipeline's stages). ``prefetched``: the
    epilogues' operands loaded before the gather where the schedule does not say so (a lever,
    ``levers.py``).
    """
    chain, phase_rows = 0.0, []
    ingest_rate = gpu.sm_ingest_GBps * 1e3
    for phase in sched.phases:
        per_cta: dict[int, list[float]] = {}
        for tile in sched.tiles:
            if tile.phase != phase.index:
                continue
            flops, ingest = _tile_work(sched, tile)
            acc = per_cta.setdefault(tile.cta, [0.0, 0.0, 0.0, 0.0])  # flops, ingest, partial stores, finishing
            acc[0] += flops
            acc[1] += ingest
            if sched.reduction == "l2":
                acc[2] += phase.block_m * sched.B * 4 / ingest_rate
            acc[3] += _finish_us(gpu, sched, phase, tile, prefetched)
        rate = gpu.mma_TFLOPs_16bit * 1e6 / gpu.sms
        times = {cta: max(a[0] / rate, a[1] / ingest_rate) + a[2] + a[3] for cta, a in per_cta.items()}
        slowest = max(times, key=times.get)
        a = per_cta[slowest]
        sync = getattr(phase, "sync", "grid")
        sync_us = (gpu.grid_sync_us + gpu.l2_latency_us if sync == "grid"
                   else gpu.cluster_sync_us + gpu.dsmem_latency_us if sync == "cluster" else 0.0)
        took = times[slowest] + sync_us
        chain += took
        phase_rows.append({"product": phase.product, "sync": sync, "ctas": len(per_cta),
                           "parts": max(t.parts for t in sched.tiles if t.phase == phase.index),
                           "math_us": round(a[0] / rate, 3), "ingest_us": round(a[1] / ingest_rate, 3),
                           "store_us": round(a[2], 3), "finish_us": round(a[3], 3), "sync_us": round(sync_us, 3),
                           "us": round(took, 3)})
    # Weights a schedule keeps in L2 across steps count as HBM traffic where they exceed what this
    # GPU's L2 is assumed to hold beside the step's own traffic (l2_keep_MB).
    kept = getattr(sched, "l2_weight_bytes_per_step", 0)
    spilled = kept if kept > gpu.l2_keep_MB * 1e6 else 0
    terms = {
        "hbm": _hbm_us(gpu, sched.hbm_bytes_per_step + spilled),
        "l2": _l2_us(gpu, sched.l2_bytes_per_step),
        "smem": sched.onchip_bytes_per_step / (gpu.sms * gpu.smem_bytes_per_clock * gpu.clock_GHz * 1e3),
        "chain": chain,
    }
    bound = max(terms, key=terms.get)
    return {"design": sched.design, "time_us": terms[bound], "bound": bound,
            "terms_us": {k: round(v, 3) for k, v in terms.items()}, "phases": phase_rows,
            "ctas": sched.ctas, "cluster": sched.cluster, "active_sms": sched.active_sms, "split_k": sched.split_k,
            "reduction": sched.reduction, "hbm_bytes": int(sched.hbm_bytes_per_step + spilled),
            "l2_kept_bytes": int(kept - spilled),
            "l2_bytes": int(sched.l2_bytes_per_step), "onchip_bytes": int(sched.onchip_bytes_per_step),
            "multicast_bytes_saved": int(sched.multicast_bytes_saved_per_step),
            "resident_weight_bytes_per_cta": int(sched.resident_weight_bytes_per_cta),
            # Once per call, not per step: the stationary design's weight load and the launch.
            "per_call_us": _hbm_us(gpu, getattr(sched, "weight_bytes_per_call", 0)) + gpu.launch_gap_us}
