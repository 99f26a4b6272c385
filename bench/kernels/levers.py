"""Design changes weighed on paper with cost model v2, for the rows that miss an issue 22 target
(bench/kernels/NOTES.md keeps the outcome):

    python bench/kernels/levers.py

Each lever is a persistent design's schedule (GPU-B1's ``schedule.plan``, with other tile sizes
where the lever says so) with changes, priced exactly as ``costmodel.persistent_cost`` prices the
real one. A lever is a prediction for a kernel that does not exist yet, not a measurement.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import costmodel  # noqa: E402

# (name, H, B, design, changes): see what_if for the changes.
# The finish that every lever below builds on (FAST): each chunk loads up to 4 parts at once
# (fused_step.py's GATHER), the epilogue's operands are loaded before the gather, and with SPLIT
# every part finishes 1/parts of the tile (a reduce-scatter) instead of one finisher doing all.
FAST = {"gather_unroll": 4, "epilogue_prefetch": True}
SPLIT = {**FAST, "finish_split": True}
LEVERS = (
    ("as scheduled", 4096, 128, "cluster", {}),
    ("gather 4 parts at once + operands prefetched", 4096, 128, "cluster", {"kernel": FAST}),
    ("... + every part finishes a slice", 4096, 128, "cluster", {"kernel": SPLIT}),
    ("... + xm not saved (item 7)", 4096, 128, "cluster", {"kernel": SPLIT, "save_xm": False}),
    ("as scheduled", 2048, 128, "cluster", {}),
    ("gather 4 at once + prefetched + slices", 2048, 128, "cluster", {"kernel": SPLIT}),
    ("... + 64-row tiles (fewer parts)", 2048, 128, "cluster", {"kernel": SPLIT, "plan": {"block_m": 64}}),
    ("... + weights kept in L2 across steps", 2048, 128, "cluster",
     {"kernel": SPLIT, "plan": {"block_m": 64}, "weights": "l2"}),
    ("... + weights on chip (smem + registers)", 2048, 128, "cluster",
     {"kernel": SPLIT, "plan": {"block_m": 64}, "weights": "on chip"}),
    ("as scheduled", 1024, 64, "stationary", {}),
    ("gather 4 at once + prefetched + slices", 1024, 64, "stationary", {"kernel": SPLIT}),
    ("... + 64-row tiles (fewer parts)", 1024, 64, "stationary", {"kernel": SPLIT, "plan": {"block_m": 64}}),
    ("... + grid dependency 0.5 us", 1024, 64, "stationary",
     {"kernel": SPLIT, "plan": {"block_m": 64}, "grid_sync_us": 0.5}),
    ("as scheduled", 4096, 1, "cluster", {}),
    ("gather 4 at once + prefetched + slices", 4096, 1, "cluster", {"kernel": SPLIT}),
    ("... + 40 MB of weights kept in L2 across steps", 4096, 1, "cluster", {"kernel": SPLIT, "weights": 40e6}),
)


def what_if(gpu, direction: str, B: int, H: int, design: str, weights="as scheduled", save_xm: bool = True,
            kernel: dict | None = None, plan: dict | None = None, **table_changes) -> dict | None:
    """``design``'s schedule with changes: ``plan`` keyword arguments of ``schedule.plan`` (tile
    sizes); ``weights`` "l2" (kept in L2 across steps: no longer read from HBM), a byte count (that
    much of them kept in L2) or "on chip" (in shared memory and registers: neither from HBM nor
    through L2, and no weight ingest); ``save_xm`` False: the forward does not write xm into act
    (B H e bytes less per step); ``kernel``: how the kernel finishes a tile (``gather_unroll``,
    ``epilogue_prefetch``, ``finish_split``: see ``costmodel._finish_us``); ``table_changes``: GPU
    table quantities (e.g. ``grid_sync_us``)."""
    from fastmlstm.ops.triton.persistent import schedule

    gpu = dataclasses.replace(gpu, **table_changes)
    sched = schedule.plan(design, costmodel.LONG[direction], B, H, 2, costmodel.device_of(gpu), **(plan or {}))
    if sched is None:
        return None
    w = 5 * H * H * sched.dtype_bytes if sched.design == "cluster" else 0
    kept = w if weights in ("l2", "on chip") else 0 if weights == "as scheduled" else min(w, weights)
    xm = 0 if save_xm or direction != "fwd" else B * H * sched.dtype_bytes
    changes = {"hbm_bytes_per_step": sched.hbm_bytes_per_step - kept - xm}
    if weights == "on chip":
        changes.update(design="stationary", l2_bytes_per_step=sched.l2_bytes_per_step - w)
    changed = {f.name: getattr(sched, f.name) for f in dataclasses.fields(sched)}
    changed.update(changes, **(kernel or {}))
    cost = costmodel.persistent_cost(gpu, types.SimpleNamespace(**changed))
    cost["weights_per_cta_KB"] = round(5 * H * H * sched.dtype_bytes / sched.ctas / 1024, 1)
    return cost


def lever_rows() -> list[dict]:
    rows = []
    for gpu in costmodel.GPUS.values():
        for name, H, B, design, changes in LEVERS:
            for direction in costmodel.DIRECTIONS:
                cost = what_if(gpu, direction, B, H, design, **changes)
                if cost is None:
                    continue
                ideal = 5 * H * H * 2 / (gpu.hbm_TBps * 1e6)
                rows.append({"gpu": gpu.name, "H": H, "B": B, "direction": direction, "design": design, "lever": name,
                             "predicted_us": round(cost["time_us"], 2), "ratio": round(cost["time_us"] / ideal, 3),
                             "bound": cost["bound"], "target": costmodel.TARGETS.get((gpu.name, H, B)),
                             "hbm_MB": round(cost["hbm_bytes"] / 1e6, 1), "l2_MB": round(cost["l2_bytes"] / 1e6, 1),
                             "weights_per_cta_KB": cost["weights_per_cta_KB"]})
    return rows


def table(rows: list[dict]) -> str:
    def verdict(r):
        if r["target"] is None:
            return "-"
        return f"{'met' if r['ratio'] <= r['target'] else 'not met'} (<= {r['target']})"

    lines = ["| gpu | H | B | dir | design | lever | HBM MB | L2 MB | predicted us | x ideal | bound | target |",
             "|" + "---|" * 12]
    lines += [f"| {r['gpu']} | {r['H']} | {r['B']} | {r['direction']} | {r['design']} | {r['lever']} | "
              f"{r['hbm_MB']:.1f} | {r['l2_MB']:.1f} | {r['predicted_us']:.1f} | {r['ratio']:.2f} | {r['bound']} | "
              f"{verdict(r)} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(lever_rows()))
