"""A conservative cost model of one time step of fastmlstm's Triton kernels on an H100 SXM and an H200.

For every kernel of a step it counts the bytes that must come from HBM and the bytes that must cross
from L2 into the multiprocessors (weights, the activation operand once per hidden tile, split-K
partials, epilogue operands), the programs, the bytes a program keeps in flight, and the FLOPs; and
it turns them into a lower-bound time under stated assumptions. The launch configurations are the
ones the dispatcher picks (``fastmlstm.ops.triton.configs``), so the model predicts what runs.

Time of one kernel (microseconds)::

    max(hbm_bytes / (HBM bandwidth x achievable fraction),    # the memory roofline
        l2_bytes / L2 bandwidth,                              # delivery from L2 into the SMs
        busiest SM's bytes / per-SM ingest,                   # too few programs, or waves
        hbm_bytes / (bytes in flight / HBM latency),          # Little's law
        FLOPs / matrix rate)                                  # never binding at these shapes in 16-bit
    + fill (one HBM latency: nothing overlaps the first loads of a dependent kernel)
    + epilogue (``epilogue_latency``: nothing where the operands are loaded before the K loop; with
      split-K a ticket, then partials and operands together; bwd_h one latency per column chunk)
    + launch gap (dependent launch without PDL; a smaller residual with PDL)

A direction (forward: fwd_m then fwd_z; backward: bwd_h then bwd_m) is the sum of its kernels: the
second kernel needs all of the first one's output, so nothing of one overlaps the other beyond what
PDL's early launch hides. The step is then bounded below by the host: each launch costs the Python
side ``cpu_launch_us`` and the GPU cannot run ahead of the launches. What the model does not credit:
weights staying in L2 across steps (true from H of about 1400 down: the prediction is pessimistic
there), L1 hits, and any overlap of the epilogue of one program with the main loop of another.

``ideal_us`` is the issue's yardstick: 5 H^2 weight bytes per direction at the datasheet HBM
bandwidth; ``cudnn_ideal_us`` the same for a cuDNN LSTM's 4 H^2.

Run ``python bench/kernels/costmodel.py`` for the model's rows as a table (``--before``: the launch shapes
before issue 15 under the same model; ``--sensitivity``: the rows against the L2 bandwidth).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

try:
    from fastmlstm.ops.triton import configs as _configs
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fastmlstm.ops.triton import configs as _configs

# ------------------------------------------------------------------------------------------ GPUs
# One row per quantity: (name, H100 SXM, H200, source). "assumption" marks a lead that
# bench/kernels/gpu_check.sh measures on the first GPU run (bench/kernels/NOTES.md keeps the outcome).
TABLE = [
    ("sms", 132, 132,
     "NVIDIA H100 datasheet / Hopper whitepaper (SXM5: 132 SMs); H200: same GH100 configuration, and "
     "PyTorch reported 132 multiprocessors on this workplace's H200 (.library/device/KINDS.md, 2026-10-28)"),
    ("hbm_TBps", 3.35, 4.8, "NVIDIA H100 SXM and H200 SXM datasheets (peak HBM3 / HBM3e bandwidth)"),
    ("hbm_efficiency", 0.90, 0.90,
     "measured here on an H200: a device-to-device copy moved 4.3 TB/s of the 4.8 (KINDS.md, 2026-10-28 and "
     "2026-11-04); the same fraction is assumed for the H100"),
    ("l2_MB", 50, 60,
     "H100: Hopper whitepaper (50 MB on SXM5); H200: 60 MB as PyTorch reported it here (KINDS.md, 2026-10-28)"),
    ("l2_TBps", 5.5, 5.5,
     "assumption: NVIDIA publishes no L2 bandwidth for Hopper; third-party microbenchmarks of an H100 PCIe "
     "(Chips and Cheese, 'Nvidia's H100: Funny L2, and Tons of Bandwidth', 2023) put L2 reads at about "
     "5.5 TB/s and issue 15's estimate used 5.5-7; the low end, unscaled for the SXM parts' higher clock, "
     "for both (same die)"),
    ("sm_ingest_GBps", 112, 112,
     "assumption: 64 bytes per clock per SM from L2 at 1.755 GHz"),
    ("mma_TFLOPs_16bit", 788, 788,
     "measured here on an H200: an 8192^3 bf16 matmul at 788 TFLOP/s on random data (KINDS.md, 2026-10-28); "
     "datasheets give 989 dense for both"),
    ("mma_TFLOPs_tf32", 394, 394, "datasheets' 494 dense TF32, scaled by the measured bf16 fraction (788/989)"),
    ("fma_TFLOPs_fp32", 67, 67, "NVIDIA H100 SXM / H200 datasheets (FP32, non-tensor)"),
    ("hbm_latency_us", 0.8, 0.8, "assumption: HBM load latency under load"),
    ("l2_latency_us", 0.3, 0.3, "assumption: L2 hit or atomic round trip"),
    ("launch_gap_us", 2.0, 2.0,
     "assumption: gap between dependent kernels in one stream, no CUDA graph; gpu_check.sh measures it"),
    ("pdl_gap_us", 0.5, 0.5,
     "assumption: what programmatic dependent launch leaves of the gap (the wait for the previous grid's "
     "memory flush)"),
    ("cpu_launch_us", 12.0, 12.0,
     "host time of one launch from Python: Triton 3.x's JITFunction dispatch (argument binding, cache "
     "lookup, driver call) was measured by others at 8.7 us (vLLM PR 34838, GB200 host, 2026), ~11 us "
     "(tritonbench PR 1002, 2026) and 12.5 us for a 19-argument kernel (facebookexperimental/triton PR "
     "1231, 2026); our kernels take 15-20 arguments. Plus fastmlstm's own side, 1.4-2.6 us per launch "
     "on this project's 2-core EPYC (bench/kernels/launch_overhead.py, "
     "bench/results/launch-overhead-amd-epyc-family-25-model-1-2026-11-30.json). gpu_check.sh measures "
     "the whole on the GPU's host"),
    ("smem_block_KB", 227, 227, "CUDA programming guide: compute capability 9.0, 227 KB of shared memory per block"),
]
GPU_NAMES = ("H100-SXM", "H200")


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    hbm_TBps: float
    hbm_efficiency: float
    l2_MB: float
    l2_TBps: float
    sm_ingest_GBps: float
    mma_TFLOPs_16bit: float
    mma_TFLOPs_tf32: float
    fma_TFLOPs_fp32: float
    hbm_latency_us: float
    l2_latency_us: float
    launch_gap_us: float
    pdl_gap_us: float
    cpu_launch_us: float
    smem_block_KB: float


def gpus(**overrides) -> dict[str, GPU]:
    """The table as GPU records; ``overrides`` replace a quantity for every GPU (e.g. measured values)."""
    out = {}
    for i, name in enumerate(GPU_NAMES):
        values = {row[0]: row[1 + i] for row in TABLE}
        values.update(overrides)
        out[name] = GPU(name=name, **values)
    return out


GPUS = gpus()

# ----------------------------------------------------------------------------------- one kernel

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}


def _epilogue_bytes(kernel: str, B: int, H: int, e: int) -> int:
    """Bytes the epilogue of a training step reads and writes once (SAVE on; HAS_DOUT on; no
    lengths, no cell-state gradients)."""
    BH = B * H
    if kernel == "fwd_m":
        return BH * e * (1 + 1 + 2)               # xm in; m out; xm and hm saved
    if kernel == "fwd_z":
        return BH * (4 * e + 4 + 4 + e + 4 * e)   # gate inputs, c_prev in; c, h out; gates saved
    if kernel == "bwd_h":
        return BH * (e + 4 * e + 8 + 8 + 4 * e)   # dout, gates, c and c_prev, dc r/w; dz out (no dh round
        #                                          trip: only lengths make a step read dh back)
    if kernel == "bwd_m":
        return BH * e * (2 + 2)                   # xm, hm in; dxm, dhm out
    raise ValueError(kernel)


def epilogue_latency(gpu: GPU, kernel: str, config: _configs.KernelConfig) -> float:
    """Latency the epilogue adds after the K loop (microseconds), as the kernels order their loads.

    - Without a workspace, fwd_m, fwd_z and bwd_m load the epilogue's operands before the K loop
      (``bench/kernels/static.py`` checks that the PTX issues loads there): the loop's duration covers their
      latency, so nothing is added.
    - With split-K, the last program draws its ticket (an L2 round trip), then issues the operands'
      loads (HBM) and gathers the partials: ``_gather`` loads GATHER partials (1, 2 or 4,
      ``configs.gather_unroll``) per round and adds them before the next round, so ceil(S / GATHER)
      L2 latencies one after another (four such loops, one per gate, in the gate kernel),
      overlapping the operands' one HBM latency.
    - bwd_h's epilogue runs over BN / EPI_BN column chunks, one after another (a loop: unrolling it
      made compiles slow, and ``tl.range(num_stages=2)`` does not pipeline it, checked in the PTX),
      each loading its operands together with its partials.
    """
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
    """Bytes, programs and the lower-bound time of one launch of ``kernel`` with ``config``."""
    e = DTYPE_BYTES[dtype]
    K = _configs.K_OF[kernel] * H
    N = 4 * H if kernel in _configs.GATE_KERNELS else H
    n_tiles, b_tiles = _configs.tiles(kernel, B, H, config)
    S = config.split
    programs = S * n_tiles * b_tiles
    cols = config.BN * (4 if kernel in _configs.GATE_KERNELS else 1)

    weights = K * N * e
    activation = B * K * e
    epilogue = _epilogue_bytes(kernel, B, H, e)
    ws = S * B * N * 4 if _configs.uses_workspace(kernel, config) else 0
    # The workspace stays in L2 when it takes at most half of it; else count it as written and read
    # back from HBM as well.
    ws_spills = ws > 0.5 * gpu.l2_MB * 1e6
    hbm = weights + activation + epilogue + (2 * ws if ws_spills else 0)
    l2 = weights * b_tiles + n_tiles * activation + epilogue + 2 * ws

    # Little's law: (num_stages - 1) stages of operand tiles in flight per resident program.
    stage = (min(config.BB, B) * config.BK + config.BK * cols) * e
    smem = config.num_stages * (config.BB * config.BK + config.BK * cols) * e
    per_sm = max(1, min(int(gpu.smem_block_KB * 1024 // max(smem, 1)), 2048 // (32 * config.num_warps)))
    resident = min(programs, gpu.sms * per_sm)
    in_flight = resident * max(1, config.num_stages - 1) * stage
    busiest = math.ceil(programs / gpu.sms) * (l2 / programs)

    rows = max(config.BB, 16)  # tl.dot computes whole tiles: masked rows still cost arithmetic
    flops = 2.0 * rows * b_tiles * K * N
    if e == 2:
        rate = gpu.mma_TFLOPs_16bit
    else:
        rate = gpu.mma_TFLOPs_tf32 if precision == "tf32" else gpu.fma_TFLOPs_fp32

    terms = {
        "hbm": hbm / (gpu.hbm_TBps * gpu.hbm_efficiency * 1e6),
        "l2": l2 / (gpu.l2_TBps * 1e6),
        "sm_ingest": busiest / (gpu.sm_ingest_GBps * 1e3),
        "in_flight": hbm / (in_flight / gpu.hbm_latency_us),
        "math": flops / (rate * 1e6),
    }
    fixed = gpu.hbm_latency_us  # the first loads
    fixed += epilogue_latency(gpu, kernel, config)
    fixed += gpu.pdl_gap_us if config.pdl else gpu.launch_gap_us
    bound = max(terms, key=terms.get)
    return {
        "kernel": kernel, "config": config.as_dict(), "programs": programs, "hbm_bytes": int(hbm),
        "l2_bytes": int(l2), "bytes_in_flight": int(in_flight), "flops": flops,
        "terms_us": {k: round(v, 3) for k, v in terms.items()}, "fixed_us": round(fixed, 3), "bound": bound,
        "time_us": terms[bound] + fixed,
    }


# ------------------------------------------------------------------------------------ the floor

# The two dependent products of a direction, as (K, N) in units of H: forward hm = h Wmh^T, then
# the gates z = m Wh^T; backward dh = dhm Wmh, then dm = dz Wh.
PHASES = {"fwd": ((1, 1), (1, 4)), "bwd": ((1, 1), (4, 1))}
# What must cross HBM per row and hidden unit of a training step, whatever the design (e bytes per
# 16-bit value, float32 state): inputs written before the loop and outputs kept for later.
#   forward: proj_t (4 gate inputs and xm) in; h_t out, c_t (float32) out, the gates and hm saved
#   backward: dout_t, the saved gates, xm and hm, c_t (float32) in; dz_t and dxm (dproj), dhm out
FLOOR_STATE = {"fwd": lambda e: 11 * e + 4, "bwd": lambda e: 13 * e + 4}


def _phase_delivery_us(gpu: GPU, K: int, N: int, B: int, e: int, weights_via_l2: bool, min_programs: int) -> float:
    """Least time to bring one product's operands into the SMs: over every split of the weights
    into S slices of K times n_h tiles of N (S n_h >= min_programs programs), each program receives
    its weight block (unless the weights live in shared memory), the activation columns of its K
    slice, and, with S > 1, the float32 partials are written and read back; bound by the L2's
    bandwidth and by the busiest SM's ingest."""
    weights = K * N * e if weights_via_l2 else 0
    best = math.inf
    for S in range(1, 17):
        n_b = 16
        while n_b <= N:
            n_h = math.ceil(N / n_b)
            programs = S * n_h
            if programs >= min_programs:
                l2 = weights + n_h * B * K * e + (2 * S * B * N * 4 if S > 1 else 0)
                ingest = math.ceil(programs / gpu.sms) * (l2 / programs) / (gpu.sm_ingest_GBps * 1e3)
                best = min(best, max(l2 / (gpu.l2_TBps * 1e6), ingest))
            n_b *= 2
    return best


def floor_cost(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16", min_programs: int = 1) -> dict:
    """A lower bound on one direction of a step for *any* design Triton 3.9 can express, under the
    table's numbers: the yardstick the rule's prediction is judged against, and the proof where
    issue 15's bound (<= 1.25x ideal) cannot be met.

    Optimistic wherever a design could be:
    - the weights stay on chip when they fit the SMs' shared memory together (a persistent kernel),
      else in L2 when they fit it, else they stream from HBM once;
    - only what must cross HBM does (``FLOOR_STATE``): the carried state (c, dc, h) and everything
      produced and consumed within the step stay in L2;
    - the best split of each product over the SMs (``_phase_delivery_us``), with no multicast and no
      distributed shared memory (``triton.language`` 3.9 has neither), so every program that reads
      a K slice receives the activation columns of it through L2;
    - HBM and L2 transfers of the two products overlap completely; each of the two dependencies
      (the second product needs all of the first; the next step needs all of this one) costs one
      grid-wide signal (the cheaper of an L2 atomic round trip and PDL's residual gap) and one L2
      read of what it waited for; no host time (CUDA graphs or a persistent kernel).
    ``min_programs`` restricts the split to at least that many programs (issue 15 asks for two per
    SM from B = 64).
    """
    e = DTYPE_BYTES[dtype]
    weights = 5 * H * H * e
    in_smem = weights <= gpu.sms * gpu.smem_block_KB * 1024
    in_l2 = weights <= gpu.l2_MB * 1e6
    hbm = (0 if in_smem or in_l2 else weights) + B * H * FLOOR_STATE[direction](e)
    delivery = sum(_phase_delivery_us(gpu, kf * H, nf * H, B, e, not in_smem, min_programs)
                   for kf, nf in PHASES[direction])
    hbm_us = hbm / (gpu.hbm_TBps * gpu.hbm_efficiency * 1e6)
    sync_us = len(PHASES[direction]) * (min(gpu.l2_latency_us, gpu.pdl_gap_us) + gpu.l2_latency_us)
    where = "shared memory" if in_smem else "L2" if in_l2 else "HBM"
    return {"floor_us": max(hbm_us, delivery) + sync_us, "hbm_us": hbm_us, "delivery_us": delivery,
            "sync_us": sync_us, "weights_from": where}


# ----------------------------------------------------------------------------------- one step

# Issue 15's bound: each direction <= 1.25x its ideal, with >= 2 programs per SM from B = 64.
BOUND_RATIO = 1.25
BOUND_PROGRAMS_PER_SM = 2
BOUND_MIN_BATCH = 64

DIRECTIONS = {"fwd": ("fwd_m", "fwd_z"), "bwd": ("bwd_h", "bwd_m")}
# The rows issue 15 asks for (bf16), and the other target shapes of the benchmark.
MODEL_SHAPES = ((4096, 128), (2048, 128), (1024, 64), (4096, 1))


def device_of(gpu: GPU) -> _configs.Device:
    return _configs.Device(sms=gpu.sms, capability=(9, 0), name=gpu.name)


def direction_cost(gpu: GPU, direction: str, B: int, H: int, dtype: str = "bf16", precision: str = "ieee",
                   plan: _configs.StepPlan | None = None) -> dict:
    """One model row: a direction of one time step with the dispatcher's plan (or ``plan``)."""
    e = DTYPE_BYTES[dtype]
    if plan is None:
        plan = _configs.rule_plan(B, H, e, device_of(gpu))
    kernels = [kernel_cost(gpu, k, B, H, dtype, plan[k], precision) for k in DIRECTIONS[direction]]
    gpu_us = sum(k["time_us"] for k in kernels)
    host_us = len(kernels) * gpu.cpu_launch_us
    ideal = 5 * H * H * e / (gpu.hbm_TBps * 1e6)
    predicted = max(gpu_us, host_us)
    programs = min(k["programs"] for k in kernels)
    floor = floor_cost(gpu, direction, B, H, dtype)
    wants_programs = B >= BOUND_MIN_BATCH
    floor_bound = floor_cost(gpu, direction, B, H, dtype, BOUND_PROGRAMS_PER_SM * gpu.sms) if wants_programs else floor
    return {
        "gpu": gpu.name, "dtype": dtype, "H": H, "B": B, "direction": direction,
        "programs": min(k["programs"] for k in kernels), "sms": gpu.sms,
        "hbm_bytes": sum(k["hbm_bytes"] for k in kernels), "l2_bytes": sum(k["l2_bytes"] for k in kernels),
        "bytes_in_flight": min(k["bytes_in_flight"] for k in kernels),
        "predicted_us": round(predicted, 2), "ideal_us": round(ideal, 2),
        "cudnn_ideal_us": round(4 * H * H * e / (gpu.hbm_TBps * 1e6), 2),
        "ratio": round(predicted / ideal, 3), "bound": "host" if host_us > gpu_us else "gpu",
        "floor_us": round(floor["floor_us"], 2), "floor_ratio": round(floor["floor_us"] / ideal, 3),
        "floor_weights_from": floor["weights_from"],
        "floor_ratio_at_bound_programs": round(floor_bound["floor_us"] / ideal, 3),
        "meets_bound": predicted <= BOUND_RATIO * ideal and (
            not wants_programs or programs >= BOUND_PROGRAMS_PER_SM * gpu.sms),
        "bound_feasible": floor_bound["floor_us"] <= BOUND_RATIO * ideal,
        "kernels": [{**k, "time_us": round(k["time_us"], 2)} for k in kernels],
    }


def model_rows(gpu_table: dict[str, GPU] | None = None, shapes=MODEL_SHAPES, dtype: str = "bf16") -> list[dict]:
    rows = []
    for gpu in (gpu_table or GPUS).values():
        for H, B in shapes:
            for direction in DIRECTIONS:
                rows.append(direction_cost(gpu, direction, B, H, dtype))
    return rows


def predict(gpu_name: str, mode: str, dtype: str, H: int, B: int, T: int = 1,
            table: dict[str, GPU] | None = None) -> dict | None:
    """Predicted time of a benchmark case (``bench/run.py`` prints it beside the measurement), with
    the issue's ideal and the floor no design can beat (``floor_cost``): step, fwd (T steps) and
    fwd+bwd (T steps each way) of the recurrence alone; None for modes the model does not cover
    (featurize, train) or float32."""
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
    return {f"{key}_ms": steps * sum(r[f"{key}_us"] for r in rows) / 1e3 for key in ("predicted", "ideal", "floor")}


def annotate(record: dict, device_name: str, ceilings: dict | None = None) -> dict | None:
    """The model beside one bench/run.py measurement on a GPU: the prediction for fastmlstm's Triton
    kernels at the record's case (whatever implementation it measured, so every row shows the
    yardstick), with the table's numbers and, when ``ceilings`` holds the run's measured copy
    bandwidth, with that in place of the achievable HBM bandwidth. None where the model does not
    apply (another GPU, featurize and train, float32)."""
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


def gpu_of_device_name(name: str) -> str | None:
    """The model's GPU for a CUDA device name (torch.cuda.get_device_name), if it models it."""
    if "H200" in name:
        return "H200"
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return "H100-SXM"
    return None


def table(rows: list[dict]) -> str:
    head = ("| gpu | dtype | H | B | direction | programs | SMs | HBM MB | L2 MB | predicted us | ideal us | ratio "
            "| bound | floor us | floor ratio (at 2/SM) | issue 15's bound: met / feasible |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        binding = r["bound"] if r["bound"] == "host" else "+".join(k["bound"] for k in r["kernels"])
        at_bound = f" ({r['floor_ratio_at_bound_programs']:.2f})" if r["B"] >= BOUND_MIN_BATCH else ""
        lines.append(f"| {r['gpu']} | {r['dtype']} | {r['H']} | {r['B']} | {r['direction']} | {r['programs']} | "
                     f"{r['sms']} | {r['hbm_bytes'] / 1e6:.1f} | {r['l2_bytes'] / 1e6:.1f} | {r['predicted_us']:.1f} | "
                     f"{r['ideal_us']:.1f} | {r['ratio']:.2f} | {binding} | {r['floor_us']:.1f} | "
                     f"{r['floor_ratio']:.2f}{at_bound} | {'yes' if r['meets_bound'] else 'no'} / "
                     f"{'yes' if r['bound_feasible'] else 'no'} |")
    return "\n".join(lines)


def sources_table() -> str:
    lines = ["| quantity | H100-SXM | H200 | source |", "|---|---|---|---|"]
    lines += [f"| {name} | {h100} | {h200} | {source} |" for name, h100, h200, source in TABLE]
    return "\n".join(lines)


def legacy_plan(B: int, H: int) -> _configs.StepPlan:
    """The launch shapes of the kernels before issue 15 (one batch tile of up to 128 rows, 32 hidden
    units per program, no split, 3 stages, no PDL), for comparing designs under one model. The
    old bwd_h kept its whole tile in registers; the model charges it the workspace round trip
    today's bwd_h takes at that tile size, a small overstatement of its time."""
    bb = min(128, max(16, 1 << max(0, (B - 1).bit_length())))
    config = _configs.KernelConfig(BB=bb, BN=32 if H >= 1024 else 16, BK=64, num_warps=8 if bb >= 128 else 4,
                                   num_stages=3)
    return _configs.StepPlan(**{k: config for k in _configs.KERNELS}, source="legacy")


def compare_legacy() -> str:
    lines = ["| gpu | H | B | before fwd us | before bwd us | now fwd us | now bwd us | ideal us | "
             "before L2 MB fwd/bwd | now L2 MB fwd/bwd | programs before / now |", "|" + "---|" * 11]
    for gpu in GPUS.values():
        for H, B in MODEL_SHAPES:
            old = [direction_cost(gpu, d, B, H, plan=legacy_plan(B, H)) for d in DIRECTIONS]
            new = [direction_cost(gpu, d, B, H) for d in DIRECTIONS]
            lines.append(f"| {gpu.name} | {H} | {B} | {old[0]['predicted_us']:.1f} | {old[1]['predicted_us']:.1f} | "
                         f"{new[0]['predicted_us']:.1f} | {new[1]['predicted_us']:.1f} | {new[0]['ideal_us']:.1f} | "
                         f"{old[0]['l2_bytes'] / 1e6:.0f}/{old[1]['l2_bytes'] / 1e6:.0f} | "
                         f"{new[0]['l2_bytes'] / 1e6:.0f}/{new[1]['l2_bytes'] / 1e6:.0f} | "
                         f"{old[0]['programs']} / {min(new[0]['programs'], new[1]['programs'])} |")
    return "\n".join(lines)


def sensitivity(l2_values=(5.5, 7.0, 10.0, 14.0)) -> str:
    """How the rule's predictions and the floor move with the L2 bandwidth, the least certain
    number (ratios to ideal; the floor also with issue 15's >= 2 programs per SM)."""
    lines = ["| L2 TB/s | gpu | H | B | fwd ratio | bwd ratio | floor fwd (at 2/SM) | floor bwd (at 2/SM) |",
             "|---|---|---|---|---|---|---|---|"]
    for l2 in l2_values:
        for gpu in gpus(l2_TBps=l2).values():
            for H, B in MODEL_SHAPES[:3]:
                r = [direction_cost(gpu, d, B, H) for d in DIRECTIONS]
                floors = [f"{x['floor_ratio']:.2f} ({x['floor_ratio_at_bound_programs']:.2f})" for x in r]
                lines.append(f"| {l2} | {gpu.name} | {H} | {B} | {r[0]['ratio']:.2f} | {r[1]['ratio']:.2f} | "
                             f"{floors[0]} | {floors[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(sources_table())
    print()
    print(table(model_rows()))
    if "--before" in sys.argv:
        print()
        print(compare_legacy())
    if "--sensitivity" in sys.argv:
        print()
        print(sensitivity())
