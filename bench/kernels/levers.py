"""Design changes weighed on paper with cost model v2, beside the designs the kernels implement
(bench/kernels/NOTES.md keeps the outcome):

    python bench/kernels/levers.py

Two kinds of lever, both priced from the table in ``gpu_table.py`` and never a measurement:

- a persistent design's schedule (``schedule.plan``, with other tile sizes where the lever says so)
  with changes, priced exactly as ``costmodel.persistent_cost`` prices the real one (:func:`what_if`);
- the weight-stationary design without split-K (:func:`nosplit_cost`), which has no schedule or
  kernel: each CTA owns a few hidden units over all of K, so a phase needs no reduction, but every
  CTA must receive the phase's whole activation.

A lever's "as built" row is the design the cost model prices for the row (the kernels as they are);
every other row is a kernel that does not exist.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import costmodel  # noqa: E402

# The finish before issue 22's rework, on today's schedules: one finisher per tile, one part per
# round, then the operands (the old kernels also gathered the four gates one after another, which
# this does not price: it is a lower bound on what the rework saved).
SERIAL_FINISH = {"gather_unroll": 1, "gate_gather_unroll": 1, "epilogue_prefetch": False, "finish_split": False}

# (name, H, B, design, changes): see what_if for the changes; design "nosplit": nosplit_cost.
LEVERS = (
    ("as built", 4096, 128, "cluster", {}),
    ("the finish before the rework: one finisher, one part per round", 4096, 128, "cluster",
     {"kernel": SERIAL_FINISH}),
    ("+ xm not saved (item 7)", 4096, 128, "cluster", {"save_xm": False}),
    ("as built", 2048, 128, "stationary", {}),
    ("the finish before the rework: one finisher, one part per round", 2048, 128, "stationary",
     {"kernel": SERIAL_FINISH}),
    ("cluster design, 64-row tiles, its 42 MB of weights marked to stay in L2 (more than l2_keep_MB)", 2048, 128,
     "cluster", {"plan": {"block_m": 64}, "weights": "l2"}),
    ("the same if 45 of the 50 MB of L2 could keep them", 2048, 128, "cluster",
     {"plan": {"block_m": 64}, "weights": "l2", "l2_keep_MB": 45}),
    ("as built", 1024, 64, "stationary", {}),
    ("+ a 0.5 us grid dependency (the table assumes 1.0)", 1024, 64, "stationary", {"grid_sync_us": 0.5}),
    ("no split-K: 8 units x all K per CTA", 1024, 64, "nosplit", {}),
    ("no split-K: 16 units per CTA pair, K halved, DSMEM reduction", 1024, 64, "nosplit", {"k_split": 2}),
    ("no split-K, pairs, and a 0.5 us grid dependency", 1024, 64, "nosplit", {"k_split": 2, "grid_sync_us": 0.5}),
    ("as built", 4096, 1, "cluster", {}),
    ("+ 40 MB of weights kept in L2 across steps, if 40 of the 50 MB can keep them (little else competes at B = 1)",
     4096, 1, "cluster", {"weights": 40e6, "l2_keep_MB": 40}),
)


def what_if(gpu, direction: str, B: int, H: int, design: str, weights="as scheduled", save_xm: bool = True,
            kernel: dict | None = None, plan: dict | None = None, **table_changes) -> dict | None:
    """``design``'s schedule with changes: ``plan`` keyword arguments of ``schedule.plan`` (tile
    sizes); ``weights`` "l2" (every streamed weight marked to stay in L2 across steps: no longer
    read from HBM where they fit the table's ``l2_keep_MB``, else counted from HBM again, as the
    cost model does for a real schedule), a byte count (that much of them) or "on chip" (in shared
    memory and registers: neither from HBM nor through L2, and no weight ingest); ``save_xm``
    False: the forward does not
    write xm into act (B H e bytes less per step); ``kernel``: how the kernel finishes a tile (the
    schedule's ``gather_unroll``, ``gate_gather_unroll``, ``epilogue_prefetch``, ``finish_split``);
    ``table_changes``: GPU table quantities (e.g. ``grid_sync_us``)."""
    from fastmlstm.ops.triton.persistent import schedule

    gpu = dataclasses.replace(gpu, **table_changes)
    sched = schedule.plan(design, costmodel.LONG[direction], B, H, 2, costmodel.device_of(gpu), **(plan or {}))
    if sched is None:
        return None
    streamed = sched.hbm_bytes_per_step - schedule.io_bytes(sched.direction, B, H, sched.dtype_bytes)[0]
    kept = streamed if weights in ("l2", "on chip") else 0 if weights == "as scheduled" else min(streamed, weights)
    xm = 0 if save_xm or direction != "fwd" else B * H * sched.dtype_bytes
    changes = {"hbm_bytes_per_step": sched.hbm_bytes_per_step - kept - xm}
    if weights == "on chip":
        changes.update(design="stationary", l2_bytes_per_step=sched.l2_bytes_per_step - streamed)
    elif kept:
        changes["l2_weight_bytes_per_step"] = sched.l2_weight_bytes_per_step + kept
    changed = {f.name: getattr(sched, f.name) for f in dataclasses.fields(sched)}
    changed.update(changes, **(kernel or {}))
    cost = costmodel.persistent_cost(gpu, types.SimpleNamespace(**changed))
    cost["weights_per_cta_KB"] = round(5 * H * H * sched.dtype_bytes / sched.ctas / 1024, 1)
    return cost


def nosplit_cost(gpu, direction: str, B: int, H: int, k_split: int = 1, **table_changes) -> dict | None:
    """The weight-stationary design without split-K across clusters (no kernel exists).

    Each group of ``k_split`` CTAs (a cluster) owns N = ceil(H k_split / SMs) hidden units,
    rounded up to the MMA's step of 8: all four gates of them in the gate product, so the cell
    update is local; the batch is the MMA's M (64 rows; B <= 64), and each CTA its 1/k_split of K,
    the cluster's partials reduced in distributed shared memory (one round behind a cluster
    barrier). Its weights sit in shared memory for the whole call. Every phase needs the whole
    activation of the one before ([B, K]: multicast to the CTAs of a cluster of 4 that take the same
    K share, but each SM still receives its share). Per phase, in dependency order: the grid
    dependency (``grid_sync_us``, then an L2 read of what it waited for), then the longer of the MMA
    (M = 64 rows whatever B) and the SM's ingest of its activation share, then the reduction; the epilogue's operands do not depend on
    the phase before and load during the wait. The backward's second product (dm = dz Wh) has
    K = 4H: its activation is four times the forward's. None where the weights do not fit."""
    gpu = dataclasses.replace(gpu, **table_changes)
    if B > 64:
        return None
    e = 2
    units = 8 * math.ceil(math.ceil(H * k_split / gpu.sms) / 8)
    ctas = math.ceil(H / units) * k_split
    products = {"fwd": (("hm", H, units), ("z", H, 4 * units)), "bwd": (("dh", H, units), ("dm", 4 * H, units))}
    resident = sum(K * n for _, K, n in products["fwd"]) * e / k_split  # both directions hold 5 H units' rows
    if resident + 4 * B * 64 * e + 4096 > gpu.smem_block_KB * 1024:
        return None
    rate = gpu.mma_TFLOPs_16bit * 1e6 / gpu.sms
    chain, phases = 0.0, []
    for product, K, n in products[direction]:
        k = K / k_split
        math_us = 2.0 * 64 * n * k / rate
        ingest_us = B * k * e / (gpu.sm_ingest_GBps * 1e3)
        reduce_us = (gpu.dsmem_latency_us + gpu.cluster_sync_us) * math.ceil(math.log2(k_split)) if k_split > 1 else 0.0
        sync_us = gpu.grid_sync_us + gpu.l2_latency_us
        took = sync_us + max(math_us, ingest_us) + reduce_us
        chain += took
        phases.append({"product": product, "math_us": round(math_us, 3), "ingest_us": round(ingest_us, 3),
                       "reduce_us": round(reduce_us, 3), "sync_us": round(sync_us, 3), "us": round(took, 3)})
    io_hbm, io_l2 = _io_bytes(direction, B, H, e)
    multicast = 4 // k_split  # clusters of 4 CTAs: 4 // k_split of them take each K share
    activations = sum(B * K * e for _, K, _ in products[direction]) * ctas // k_split // multicast
    terms = {"hbm": io_hbm / (gpu.hbm_TBps * gpu.hbm_efficiency * 1e6), "l2": (io_hbm + io_l2 + activations) /
             (gpu.l2_TBps * 1e6), "chain": chain}
    bound = max(terms, key=terms.get)
    return {"time_us": terms[bound], "bound": bound, "terms_us": {k: round(v, 3) for k, v in terms.items()},
            "phases": phases, "hbm_bytes": int(io_hbm), "l2_bytes": int(io_hbm + io_l2 + activations),
            "ctas": ctas, "units_per_cta": units, "weights_per_cta_KB": round(resident / 1024, 1)}


def _io_bytes(direction, B, H, e):
    from fastmlstm.ops.triton.persistent import schedule

    return schedule.io_bytes(costmodel.LONG[direction], B, H, e)


def lever_rows() -> list[dict]:
    rows = []
    for gpu in costmodel.GPUS.values():
        for name, H, B, design, changes in LEVERS:
            for direction in costmodel.DIRECTIONS:
                if design == "nosplit":
                    cost = nosplit_cost(gpu, direction, B, H, **changes)
                else:
                    cost = what_if(gpu, direction, B, H, design, **changes)
                if cost is None:
                    continue
                ideal = 5 * H * H * 2 / (gpu.hbm_TBps * 1e6)
                rows.append({"gpu": gpu.name, "H": H, "B": B, "direction": direction, "design": design, "lever": name,
                             "predicted_us": round(cost["time_us"], 2), "ratio": round(cost["time_us"] / ideal, 3),
                             "bound": cost["bound"], "target": costmodel.TARGETS.get((gpu.name, H, B)),
                             "hbm_MB": round(cost["hbm_bytes"] / 1e6, 1), "l2_MB": round(cost["l2_bytes"] / 1e6, 1),
                             "ctas": cost["ctas"], "weights_per_cta_KB": cost["weights_per_cta_KB"]})
    return rows


def table(rows: list[dict]) -> str:
    def verdict(r):
        if r["target"] is None:
            return "-"
        return f"{'met' if r['ratio'] <= r['target'] else 'not met'} (<= {r['target']})"

    lines = ["| gpu | H | B | dir | design | lever | CTAs | HBM MB | L2 MB | predicted us | x ideal | bound | target |",
             "|" + "---|" * 13]
    lines += [f"| {r['gpu']} | {r['H']} | {r['B']} | {r['direction']} | {r['design']} | {r['lever']} | {r['ctas']} | "
              f"{r['hbm_MB']:.1f} | {r['l2_MB']:.1f} | {r['predicted_us']:.1f} | {r['ratio']:.2f} | {r['bound']} | "
              f"{verdict(r)} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(lever_rows()))
