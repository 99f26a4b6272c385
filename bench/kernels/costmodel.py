"""Cost model v2 of one time step of fastmlstm's recurrence on an H100 SXM and an H200 (issue 22).

Per GPU, shape (H, B) and direction (forward: hm = h Wmh^T, then z = m Wh^T and the cell update;
backward: dh = dhm Wmh, the cell derivatives, then dm = dz Wh) a row gives three times:

``predicted_us``
    the design the dispatcher picks, priced from what it launches. The dispatcher checks every
    candidate that applies on the device at hand and runs the fastest of those that passed
    (``fastmlstm.ops.triton.dispatch.design_for`` on the checks' timings); the model applies the
    same rule to its own predictions: a row's design is the fastest under the model of the designs
    that apply there (``dispatch.designs`` and the per-step path), as if every candidate passed.

    - "step" / "graph": the per-step Triton kernels (``fused_step.py``) with the configs of
      ``fastmlstm.ops.triton.configs``, one kernel after the other, :func:`kernel_cost` each;
      "step" is bounded below by the host's launches, "graph" (the step loop captured in a CUDA
      graph) is not.
    - "cluster" / "stationary": a persistent kernel, priced from its schedule
      (``fastmlstm.ops.triton.persistent.schedule.plan``: the same tile plan the kernel runs, so
      the bytes here are the kernel's), :func:`persistent_cost`.

``floor_us``
    a lower bound for *any* design on that GPU under the table's ceilings (:func:`floor_cost`).
``ideal_us``
    the issue's yardstick: 5 H^2 weight bytes at the datasheet HBM bandwidth (not a bound: a
    design that keeps weights on chip or in L2 beats it).

Every time is built from ``TABLE``, where each number has its source; those marked "assumption"
are what ``bench/kernels/gpu_check.sh`` measures first (``assumptions()`` lists them).

Run ``python bench/kernels/costmodel.py`` for the rows and the targets of issue 22
(``--sensitivity``: the rows against the L2 bandwidth and the grid-barrier cost).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

try:
    from fastmlstm.ops.triton import configs as _configs
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fastmlstm.ops.triton import configs as _configs

if str(Path(__file__).resolve().parent) not in sys.path:  # gpu_table.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_table import GPU, GPU_NAMES, GPUS, TABLE, assumptions, gpu_of_device_name, gpus  # noqa: F401


def _hbm_us(gpu, nbytes):
    return nbytes / (gpu.hbm_TBps * gpu.hbm_efficiency * 1e6)


def _l2_us(gpu, nbytes):
    return nbytes / (gpu.l2_TBps * 1e6)


def _busiest_math_us(gpu, flops: float, units: int, rate_TFLOPs: float) -> float:
    """Tensor-core time of ``flops`` spread evenly over ``units`` equal work items, on the SMs that
    actually get them: the busiest SM runs ceil(units / SMs) items at its 1/SMs share of the rate
    (fewer items than SMs leave SMs idle; more leave a partial last wave)."""
    waves = math.ceil(units / gpu.sms)
    return waves * (flops / units) / (rate_TFLOPs * 1e6 / gpu.sms)


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
# The two dependent products of a direction, as (K, N) in units of H: forward hm = h Wmh^T, then
# the gates z = m Wh^T; backward dh = dhm Wmh, then dm = dz Wh.
PHASES = {"fwd": ((1, 1), (1, 4)), "bwd": ((1, 1), (4, 1))}
LONG = {"fwd": "forward", "bwd": "backward"}

# ------------------------------------------------------------------- the per-step Triton kernels


def _epilogue_bytes(kernel: str, B: int, H: int, e: int) -> int:
    """Bytes the epilogue of a training step reads and writes once (SAVE on; HAS_DOUT on; no
    lengths, no cell-state gradients)."""
    BH = B * H
    if kernel == "fwd_m":
        return BH * e * (1 + 1 + 2)               # xm in; m out; xm and hm saved
    if kernel == "fwd_z":
        return BH * (4 * e + 4 + 4 + e + 4 * e)   # gate inputs, c_prev in; c, h out; gates saved
    if kernel == "bwd_h":
        return BH * (e + 4 * e + 8 + 8 + 4 * e)   # dout, gates, c and c_prev, dc r/w; dz out
    if kernel == "bwd_m":
        return BH * e * (2 + 2)                   # xm, hm in; dxm, dhm out
    raise ValueError(kernel)


def epilogue_latency(gpu: GPU, kernel: str, config: _configs.KernelConfig) -> float:
    """Latency the epilogue adds after the K loop (microseconds), as the kernels order their loads:
    nothing where the operands are loaded before the K loop (no workspace; ``static.py`` checks
    the PTX); with split-K a ticket (an L2 round trip), then ceil(S / GATHER) rounds of partial
    loads per gate tile overlapping the operands' HBM latency; bwd_h one such wait per column chunk."""
    ws = _configs.uses_workspace(kernel, config)
    ticket = gpu.l2_latency_us if ws else 0.0
    gathers = 4 if kernel in _configs.GATE_KERNELS else 1
    rounds = math.ceil(config.split / _configs.gather_unroll(kernel, config))
    partials = gathers * rounds * gpu.l2_latency_us if ws else 0.0
    if kernel == "bwd_h":
        chunks = config.BN // _configs.epilogue_width(kernel, config)
        return ticket + chunks * max(partials, gpu.hbm_latency_us)
    if ws:
        return ticket + max(partials, gpu.hbm_latency_us)
    return 0.0


def kernel_cost(gpu: GPU, kernel: str, B: int, H: int, dtype: str, config: _configs.KernelConfig,
                precision: str = "ieee") -> dict:
    """One launch of a per-step kernel: max(HBM, L2 delivery, busiest SM's ingest, Little's law,
    tensor-core time on the SMs the grid occupies) + a fill latency + the epilogue's exposed
    latency + the launch gap (PDL's residual with PDL)."""
    e = DTYPE_BYTES[dtype]
    K = _configs.K_OF[kernel] * H
    N = 4 * H if kernel in _configs.GATE_KERNELS else H
    n_tiles, b_tiles = _configs.tiles(kernel, B, H, config)
    programs = config.split * n_tiles * b_tiles
    cols = config.BN * (4 if kernel in _configs.GATE_KERNELS else 1)

    weights = K * N * e
    epilogue = _epilogue_bytes(kernel, B, H, e)
    ws = config.split * B * N * 4 if _configs.uses_workspace(kernel, config) else 0
    # The workspace stays in L2 when it takes at most half of it; else it is written to and read
    # back from HBM as well.
    ws_spills = ws > 0.5 * gpu.l2_MB * 1e6
    hbm = weights + B * K * e + epilogue + (2 * ws if ws_spills else 0)
    l2 = weights * b_tiles + n_tiles * B * K * e + epilogue + 2 * ws

    # Little's law: (num_stages - 1) stages of operand tiles in flight per resident program.
    stage = (min(config.BB, B) * config.BK + config.BK * cols) * e
    smem = config.num_stages * (config.BB * config.BK + config.BK * cols) * e
    per_sm = max(1, min(int(gpu.smem_block_KB * 1024 // max(smem, 1)), 2048 // (32 * config.num_warps)))
    resident = min(programs, gpu.sms * per_sm)
    in_flight = resident * max(1, config.num_stages - 1) * stage

    rows = max(config.BB, 16)  # tl.dot computes whole tiles: masked rows still cost arithmetic
    flops = 2.0 * rows * b_tiles * K * N
    rate = gpu.mma_TFLOPs_16bit if e == 2 else (gpu.mma_TFLOPs_tf32 if precision == "tf32" else gpu.fma_TFLOPs_fp32)
    terms = {
        "hbm": _hbm_us(gpu, hbm),
        "l2": _l2_us(gpu, l2),
        "sm_ingest": math.ceil(programs / gpu.sms) * (l2 / programs) / (gpu.sm_ingest_GBps * 1e3),
        "in_flight": hbm / (in_flight / gpu.hbm_latency_us),
        "math": _busiest_math_us(gpu, flops, programs, rate),
    }
    fixed = gpu.hbm_latency_us + epilogue_latency(gpu, kernel, config)
    fixed += gpu.pdl_gap_us if config.pdl else gpu.launch_gap_us
    bound = max(terms, key=terms.get)
    return {
        "kernel": kernel, "config": config.as_dict(), "programs": programs, "active_sms": min(programs, gpu.sms),
        "hbm_bytes": int(hbm), "l2_bytes": int(l2), "bytes_in_flight": int(in_flight), "flops": flops,
        "terms_us": {k: round(v, 3) for k, v in terms.items()}, "fixed_us": round(fixed, 3), "bound": bound,
        "time_us": terms[bound] + fixed,
    }


DIRECTIONS = {"fwd": ("fwd_m", "fwd_z"), "bwd": ("bwd_h", "bwd_m")}


def device_of(gpu: GPU) -> _configs.Device:
    return _configs.Device(sms=int(gpu.sms), capability=(9, 0), name=gpu.name)


def step_cost(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16", precision: str = "ieee",
              plan: _configs.StepPlan | None = None, graph: bool = False) -> dict:
    """The per-step path: its two kernels one after the other (the second needs all of the first's
    output); without a CUDA graph ("step") no faster than the host issues the launches."""
    if plan is None:
        plan = _configs.rule_plan(B, H, DTYPE_BYTES[dtype], device_of(gpu))
    kernels = [kernel_cost(gpu, k, B, H, dtype, plan[k], precision) for k in DIRECTIONS[direction]]
    gpu_us = sum(k["time_us"] for k in kernels)
    host_us = 0.0 if graph else len(kernels) * gpu.cpu_launch_us
    binding = "host" if host_us > gpu_us else "+".join(k["bound"] for k in kernels)
    return {"design": "graph" if graph else "step", "time_us": max(gpu_us, host_us), "bound": binding,
            "ctas": max(k["programs"] for k in kernels), "cluster": 1,
            "active_sms": min(k["active_sms"] for k in kernels),
            "hbm_bytes": sum(k["hbm_bytes"] for k in kernels), "l2_bytes": sum(k["l2_bytes"] for k in kernels),
            "onchip_bytes": 0, "multicast_bytes_saved": 0, "kernels": kernels}


# --------------------------------------------------------------------- the persistent kernels

from persistent_cost import (  # noqa: E402, F401  (in persistent_cost.py beside this file)
    FINISH_DEFAULTS, _chunks, _finish, _finish_us, _tile_work, persistent_cost,
)


def schedule_for(design: str, direction: str, B: int, H: int, e: int, gpu: GPU):
    """GPU-B1's schedule of a persistent design (None where it does not apply or is not built)."""
    return _schedule(design, LONG[direction], B, H, e, device_of(gpu))


@functools.lru_cache(maxsize=256)
def _schedule(design, direction, B, H, e, device):
    try:
        from fastmlstm.ops.triton.persistent import schedule
    except ImportError:
        return None
    return schedule.plan(design, direction, B, H, e, device)


# ------------------------------------------------------------------------------------ the floor

# What must cross HBM per row and hidden unit of a training step, whatever the design (e bytes per
# 16-bit value, float32 cell state): what the step reads that was made before the loop, and what
# it makes that is kept for later.
#   forward: proj_t (4 gate inputs and xm) in; h_t, c_t (float32), the gates and hm out
#   backward: dout_t, the saved gates, xm and hm, c_t (float32) in; dz_t and dxm (dproj), dhm out
FLOOR_STATE = {"fwd": lambda e: 11 * e + 4, "bwd": lambda e: 13 * e + 4}


def floor_cost(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16", weights_stream: bool = False) -> dict:
    """A lower bound on one direction of a step for any design, under the table's ceilings.

    Each term bounds the time on its own, with everything else free, so their maximum does too:

    - HBM: the weights that no design can keep near the SMs across steps, at most all of the
      shared memory and register files (``onchip``: 132 x (228 + 256) KB, as if nothing else
      needed them) and all of L2, plus ``FLOOR_STATE`` (the carried c, h, dc and everything made and
      used within the step assumed to stay on chip), at the measured copy fraction of the datasheet.
    - L2: what must come into the SMs through L2: the weights not held on chip, the state, and each
      product's activation operand once (as if one multicast reached every SM).
    - math: the step's useful FLOPs (rows padded to the tensor cores' n = 8) on every SM at the
      datasheet's peak, or on the FMA units if that is less.
    - chain: each of the step's two all-to-all dependencies (the second product needs all of the
      first; the next step needs all of this one) costs at least one idle L2 round trip.

    Nothing in it is restricted to tile shapes, split counts or program counts; no host time.
    ``weights_stream``: the same bound for designs that keep no weight across steps (the cluster
    design's family), to place those designs.
    """
    e = DTYPE_BYTES[dtype]
    weights = 5 * H * H * e
    onchip = 0 if weights_stream else gpu.sms * (gpu.smem_sm_KB + gpu.regfile_sm_KB) * 1024
    in_l2 = 0 if weights_stream else gpu.l2_MB * 1e6
    state = B * H * FLOOR_STATE[direction](e)
    from_hbm = max(0.0, weights - onchip - in_l2)
    through_l2 = max(0.0, weights - onchip) + state + sum(B * kf * H * e for kf, _ in PHASES[direction])
    useful = 2.0 * 5 * H * H
    math_us = min(useful * (math.ceil(B / 8) * 8) / (gpu.mma_peak_TFLOPs_16bit * 1e6),
                  useful * B / (gpu.fma_TFLOPs_fp32 * 1e6))
    terms = {"hbm": _hbm_us(gpu, from_hbm + state), "l2": _l2_us(gpu, through_l2), "math": math_us,
             "chain": len(PHASES[direction]) * gpu.l2_idle_latency_cycles / (gpu.clock_GHz * 1e3)}
    bound = max(terms, key=terms.get)
    where = "on chip" if weights <= onchip else "on chip and L2" if from_hbm == 0 else "partly from HBM"
    return {"floor_us": terms[bound], "bound": bound, "terms_us": {k: round(v, 3) for k, v in terms.items()},
            "weights_from": "HBM" if weights_stream else where, "hbm_bytes": int(from_hbm + state)}


# ----------------------------------------------------------------------------------- one row

# Issue 22's targets for bf16, as (GPU, H, B) -> the largest predicted / ideal in each direction;
# every SM busy in the rows with B >= BUSY_MIN_BATCH.
TARGETS = {("H100-SXM", 4096, 128): 1.25, ("H100-SXM", 2048, 128): 1.15, ("H100-SXM", 1024, 64): 1.2,
           ("H100-SXM", 4096, 1): 1.15, ("H200", 4096, 128): 1.35}
BUSY_MIN_BATCH = 64
MODEL_SHAPES = ((4096, 128), (2048, 128), (1024, 64), (4096, 1))
DESIGN_NAMES = ("stationary", "cluster", "graph", "step")


def picked_design(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16",
                  costs: dict[str, dict | None] | None = None) -> tuple[str, str]:
    """(design, where the choice came from): the dispatcher's rule (``dispatch.design_for``: the
    fastest design that applies) on the model's predicted times (``costs``: :func:`design_cost` of
    each design, computed here when not given)."""
    try:
        from fastmlstm.ops.triton.dispatch import design_for
    except ImportError:
        return "step", "no fastmlstm.ops.triton.dispatch in this checkout: the per-step path"
    torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    if costs is None:
        costs = {d: design_cost(gpu, d, direction, B, H, dtype) for d in DESIGN_NAMES}
    times = {d: c["time_us"] for d, c in costs.items() if c is not None}
    design = design_for(B, H, torch_name, device_of(gpu), direction=LONG[direction], times=times)
    return design, "dispatch.design_for on the predicted times (the fastest design that applies)"


def design_cost(gpu: GPU, design: str, direction: str, B: int, H: int, dtype: str = "bf16") -> dict | None:
    """One design's cost of a direction of a step (None where the design does not apply)."""
    if design in ("step", "graph"):
        return step_cost(gpu, direction, B, H, dtype, graph=design == "graph")
    sched = schedule_for(design, direction, B, H, DTYPE_BYTES[dtype], gpu)
    return None if sched is None else persistent_cost(gpu, sched)


def direction_cost(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16", precision: str = "ieee",
                   plan: _configs.StepPlan | None = None, design: str | None = None) -> dict:
    """One model row: a direction of one time step with the design the dispatcher picks (or
    ``design``; ``plan``: the per-step path with these launch configs, as the GPU sweep asks)."""
    e = DTYPE_BYTES[dtype]
    if plan is not None:
        design, source = "step", "the plan given"
        cost = step_cost(gpu, direction, B, H, dtype, precision, plan)
    elif design:
        source, cost = "asked for", design_cost(gpu, design, direction, B, H, dtype)
    else:
        costs = {d: design_cost(gpu, d, direction, B, H, dtype) for d in DESIGN_NAMES}
        design, source = picked_design(gpu, direction, B, H, dtype, costs)
        cost = costs[design]
        if cost is None:
            raise ValueError(f"design {design!r} does not apply to H={H}, B={B} ({direction}) on {gpu.name}")
    ideal = 5 * H * H * e / (gpu.hbm_TBps * 1e6)
    floor = floor_cost(gpu, direction, B, H, dtype)
    target = TARGETS.get((gpu.name, H, B)) if dtype == "bf16" else None
    busy_needed = B >= BUSY_MIN_BATCH
    row = {
        "gpu": gpu.name, "dtype": dtype, "H": H, "B": B, "direction": direction, "design": design,
        "design_source": source, "sms": int(gpu.sms), "ctas": cost["ctas"], "cluster": cost["cluster"],
        "active_sms": cost["active_sms"], "programs": cost["ctas"],
        "hbm_bytes": cost["hbm_bytes"], "l2_bytes": cost["l2_bytes"], "onchip_bytes": cost["onchip_bytes"],
        "multicast_bytes_saved": cost["multicast_bytes_saved"],
        "predicted_us": round(cost["time_us"], 2), "ideal_us": round(ideal, 2),
        "cudnn_ideal_us": round(4 * H * H * e / (gpu.hbm_TBps * 1e6), 2),
        "ratio": round(cost["time_us"] / ideal, 3), "bound": cost["bound"],
        "floor_us": round(floor["floor_us"], 2), "floor_ratio": round(floor["floor_us"] / ideal, 3),
        "floor_bound": floor["bound"], "floor_terms_us": floor["terms_us"],
        "floor_weights_from": floor["weights_from"],
        "floor_streaming_us": round(floor_cost(gpu, direction, B, H, dtype, weights_stream=True)["floor_us"], 2),
        "target_ratio": target, "meets_target": None if target is None else bool(cost["time_us"] <= target * ideal),
        "every_sm_busy": cost["active_sms"] >= gpu.sms, "busy_required": busy_needed,
    }
    row["per_call_us"] = round(cost.get("per_call_us", 0.0), 2)
    row.update({k: cost[k] for k in ("kernels", "terms_us", "phases", "split_k", "reduction",
                                     "resident_weight_bytes_per_cta") if k in cost})
    return row


def applicable(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16") -> tuple[str, ...]:
    """The designs the dispatcher may run at a shape (``dispatch.designs``, and the per-step path)."""
    try:
        from fastmlstm.ops.triton.dispatch import designs
    except ImportError:
        return ("step",)
    torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    return (*designs(B, H, torch_name, device_of(gpu), LONG[direction]), "step")


def alternatives(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16") -> dict[str, float | None]:
    """Every design's predicted time at a shape (None where the dispatcher would not run it)."""
    out, allowed = {}, applicable(gpu, direction, B, H, dtype)
    for design in DESIGN_NAMES:
        cost = design_cost(gpu, design, direction, B, H, dtype) if design in allowed else None
        out[design] = None if cost is None else round(cost["time_us"], 2)
    return out


def model_rows(gpu_table: dict[str, GPU] | None = None, shapes=MODEL_SHAPES, dtype: str = "bf16") -> list[dict]:
    rows = []
    for gpu in (gpu_table or GPUS).values():
        for H, B in shapes:
            for direction in DIRECTIONS:
                row = direction_cost(gpu, direction, B, H, dtype)
                row["designs_us"] = alternatives(gpu, direction, B, H, dtype)
                rows.append(row)
    return rows


def target_report(rows: list[dict]) -> list[dict]:
    """Issue 22's done criteria on the model's rows: each target ratio per direction, and every SM
    busy in the rows with B >= 64; ``met`` False with the reason where the honest model misses."""
    out = []
    for r in rows:
        checks = []
        if r["target_ratio"] is not None:
            checks.append(("ratio", r["meets_target"], f"{r['ratio']:.3f} x ideal <= {r['target_ratio']}"))
        if r["busy_required"]:
            checks.append(("every SM busy", r["every_sm_busy"], f"{r['active_sms']} of {r['sms']} SMs"))
        for what, met, detail in checks:
            reason = "" if met else (f"{r['design']} is {r['bound']}-bound; the floor is {r['floor_ratio']:.2f} x ideal "
                                     f"({r['floor_bound']}), {r['floor_streaming_us'] / r['ideal_us']:.2f} x with every "
                                     f"weight streamed each step")
            out.append({"gpu": r["gpu"], "H": r["H"], "B": r["B"], "direction": r["direction"], "design": r["design"],
                        "check": what, "met": bool(met), "detail": detail, "why_not": reason})
    return out


# ------------------------------------------------------------------------- for bench/run.py

def predict(gpu_name: str, mode: str, dtype: str, H: int, B: int, T: int = 1,
            table: dict[str, GPU] | None = None) -> dict | None:
    """Predicted time of a benchmark case (``bench/run.py`` prints it beside the measurement), with
    the issue's ideal and the floor no design can beat: step, fwd (T steps) and fwd+bwd (T steps
    each way) of the recurrence alone, per call (a persistent design's once-per-call cost added);
    None for modes the model does not cover (featurize, train) or float32."""
    table = table or GPUS
    if gpu_name not in table or dtype not in ("bfloat16", "float16", "bf16", "fp16"):
        return None
    gpu = table[gpu_name]
    short = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    directions = {"step": ("fwd",), "fwd": ("fwd",), "fwd+bwd": ("fwd", "bwd")}.get(mode)
    if directions is None:
        return None
    steps = 1 if mode == "step" else T
    rows = [direction_cost(gpu, d, B, H, short) for d in directions]
    out = {f"{key}_ms": steps * sum(r[f"{key}_us"] for r in rows) / 1e3 for key in ("predicted", "ideal", "floor")}
    out["predicted_ms"] += sum(r["per_call_us"] for r in rows) / 1e3  # a persistent kernel's launch and weight load
    return out


def annotate(record: dict, device_name: str, ceilings: dict | None = None) -> dict | None:
    """The model beside one bench/run.py measurement on a GPU: the prediction for fastmlstm's kernels
    at the record's case, with the table's numbers and, when ``ceilings`` holds the run's measured
    copy bandwidth, with that in place of the achievable HBM bandwidth. None where the model does
    not apply (another GPU, featurize and train, float32)."""
    gpu = gpu_of_device_name(device_name)
    if gpu is None:
        return None
    case = (gpu, record["mode"], record["dtype"], record["H"], record["B"], record.get("T", 1))
    predicted = predict(*case)
    if predicted is None:
        return None
    out = {"gpu": gpu, **{k: round(v, 4) for k, v in predicted.items()}}
    if ceilings and ceilings.get("copy_GBps"):
        measured = gpus(hbm_TBps=ceilings["copy_GBps"] / 1e3, hbm_efficiency=1.0)
        again = predict(*case, table=measured)
        out["predicted_ms_measured_hbm"] = round(again["predicted_ms"], 4)
    out["ratio"] = round(record["median_ms"] / out["predicted_ms"], 3) if record.get("median_ms") else None
    return out


# ---------------------------------------------------------------------------------- tables

def table(rows: list[dict]) -> str:
    head = ("| gpu | dtype | H | B | dir | design | CTAs x cluster | active SMs | HBM MB | L2 MB | on-chip MB "
            "| predicted us | ideal us | ratio | bound | floor us (ratio) | floor, weights streamed | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        target = "-" if r["target_ratio"] is None else f"<= {r['target_ratio']}: {'met' if r['meets_target'] else 'NOT met'}"
        lines.append(f"| {r['gpu']} | {r['dtype']} | {r['H']} | {r['B']} | {r['direction']} | {r['design']} | "
                     f"{r['ctas']} x {r['cluster']} | {r['active_sms']} | {r['hbm_bytes'] / 1e6:.1f} | "
                     f"{r['l2_bytes'] / 1e6:.1f} | {r['onchip_bytes'] / 1e6:.1f} | {r['predicted_us']:.1f} | "
                     f"{r['ideal_us']:.1f} | {r['ratio']:.2f} | {r['bound']} | {r['floor_us']:.1f} "
                     f"({r['floor_ratio']:.2f}, {r['floor_bound']}) | {r['floor_streaming_us'] / r['ideal_us']:.2f} | "
                     f"{target} |")
    return "\n".join(lines)


def designs_table(rows: list[dict]) -> str:
    lines = ["| gpu | H | B | dir | " + " | ".join(DESIGN_NAMES) + " | ideal us | picked |",
             "|" + "---|" * (len(DESIGN_NAMES) + 6)]
    for r in rows:
        cells = ["-" if r["designs_us"][d] is None else f"{r['designs_us'][d]:.1f}" for d in DESIGN_NAMES]
        lines.append(f"| {r['gpu']} | {r['H']} | {r['B']} | {r['direction']} | " + " | ".join(cells)
                     + f" | {r['ideal_us']:.1f} | {r['design']} |")
    return "\n".join(lines)


def sources_table() -> str:
    lines = ["| quantity | H100-SXM | H200 | source |", "|---|---|---|---|"]
    lines += [f"| {name} | {h100} | {h200} | {source} |" for name, h100, h200, source in TABLE]
    return "\n".join(lines)


def sensitivity(l2_values=(5.5, 7.0, 10.0, 14.0), sync_values=(0.5, 1.0, 2.0)) -> str:
    """How the picked designs' ratios and the floor move with the L2 bandwidth and the cost of a
    grid-wide dependency, the two numbers the model is least sure of."""
    lines = ["| L2 TB/s | grid sync us | gpu | H | B | fwd ratio | bwd ratio | floor fwd | floor bwd |",
             "|---|---|---|---|---|---|---|---|---|"]
    for l2 in l2_values:
        for sync in sync_values:
            for gpu in gpus(l2_TBps=l2, grid_sync_us=sync).values():
                for H, B in MODEL_SHAPES:
                    r = [direction_cost(gpu, d, B, H) for d in DIRECTIONS]
                    lines.append(f"| {l2} | {sync} | {gpu.name} | {H} | {B} | {r[0]['ratio']:.2f} | {r[1]['ratio']:.2f} "
                                 f"| {r[0]['floor_ratio']:.2f} | {r[1]['floor_ratio']:.2f} |")
    return "\n".join(lines)


def targets_table(report: list[dict]) -> str:
    lines = ["| gpu | H | B | dir | design | check | met | detail | why not |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['gpu']} | {t['H']} | {t['B']} | {t['direction']} | {t['design']} | {t['check']} | "
              f"{'yes' if t['met'] else 'NO'} | {t['detail']} | {t['why_not']} |" for t in report]
    return "\n".join(lines)


if __name__ == "__main__":
    rows = model_rows()
    print(sources_table(), "", table(rows), "", designs_table(rows), "", targets_table(target_report(rows)), sep="\n")
    if "--sensitivity" in sys.argv:
        print()
        print(sensitivity())

