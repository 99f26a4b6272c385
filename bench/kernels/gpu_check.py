"""The stages of bench/kernels/gpu_check.sh that are Python: the plan, the parity of the kernels no CPU
can run, the measured ceilings, and the correctness-gated sweep over launch configurations that
writes the tuned table.

    python bench/kernels/gpu_check.py plan              # stages, validation order, configurations, predictions
    python bench/kernels/gpu_check.py parity --out DIR  # every candidate kernel checked -> DIR/parity.json
    python bench/kernels/gpu_check.py ceilings --out DIR  # HBM copy, L2 read, launch cost -> DIR/ceilings.json
    python bench/kernels/gpu_check.py sweep --out DIR   # DIR/sweep.json, DIR/tuned.py and the package's table

The parity stage runs first: at each target shape, every candidate the dispatcher could pick there
(fastmlstm/ops/triton/dispatch.py: the persistent designs, the CUDA-graphed step loop) is checked the
way the library checks it on first use (against the per-step path and a float64 run, then timed),
and the verdicts go to DIR/parity.json and to the verdict cache the later stages read; then
ByteLM.generate's CUDA-graphed step is checked against its eager step.

The sweep, per target shape: start from the rule's plan; for each kernel in turn try each of its
candidates (``sweep.sweep_candidates``) with the other kernels at their best so far; a candidate
first runs forward and backward at the shape and must agree with the reference backend (the
correctness gate; a failure is recorded and never chosen), then the direction it belongs to is
timed (CUDA events, median). The best plan per shape goes to ``fastmlstm/ops/triton/tuned.py``
(which :func:`fastmlstm.ops.triton.configs.plan` reads) and to DIR/tuned.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pprint
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import costmodel  # noqa: E402
import sweep as sweep_space  # noqa: E402  (the candidates and the dispatch space)

from fastmlstm.ops.triton import configs  # noqa: E402

TUNED_FILE = REPO / "fastmlstm" / "ops" / "triton" / "tuned.py"
# (dtype, H, B): issue 6's targets and the cost model's rows.
TARGETS = (("bfloat16", 4096, 128), ("bfloat16", 2048, 128), ("bfloat16", 1024, 64), ("bfloat16", 4096, 1),
           ("float16", 1024, 64))
# The correctness gate: max |candidate - reference| / max |reference| over every output and
# gradient, both in the same dtype ("is this the same function?"; the tests judge accuracy).
GATE = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-4}

STAGES = (
    ("parity", "the kernels no CPU can run, first: each candidate the dispatcher could pick at the target shapes "
               "against the per-step path and the float64 truth, then timed; the generation graph against the "
               "eager step", "python bench/kernels/gpu_check.py parity --out OUTDIR"),
    ("tests", "GPU test suite at real sizes, the CUDA extension built and checked against the reference and "
              "the float64 truth", "python -m pytest -q -x tests/ops/test_recurrence.py tests/ops/test_cuda.py "
              "tests/ops/test_triton_configs.py tests/ops/test_dispatch.py tests/ops/test_graphs.py "
              "tests/ops/test_persistent_*.py tests/nn/test_modules.py -k 'not (float64_truth and H4096)'"),
    ("ceilings", "HBM copy and L2 read bandwidth, host cost of a Triton launch; the model again with them",
     "python bench/kernels/gpu_check.py ceilings --out OUTDIR"),
    ("sweep", "correctness-gated sweep over the launch configurations at the target shapes (the gate and "
              "its compiles in parallel processes, then the timing); best per shape -> "
              "fastmlstm/ops/triton/tuned.py", "python bench/kernels/gpu_check.py sweep --out OUTDIR"),
    ("bench", "the target cases with the model's prediction beside each measurement",
     "python bench/run.py --preset gpu-targets --impls fastmlstm-triton,fastmlstm-cuda,cudnn-lstm,mlstm-eager "
     "--warmup-ms 30 --rep-ms 150 --min-runs 5 --no-plots --out OUTDIR --name gpu-targets"),
)


# ----------------------------------------------------------------------------------------- plan

def plan_text(sms: int = 132, name: str = "H100-SXM") -> str:
    """What the check will do: stages, the configurations the sweep tries, the model's predictions."""
    device = configs.Device(sms=sms, capability=(9, 0), name=name)
    lines = ["== gpu_check plan", ""]
    for i, (stage, what, command) in enumerate(STAGES, 1):
        lines.append(f"{i}. {stage}: {what}\n     {command}")
    lines += ["", f"== validation order (stage 1, before anything else is timed) on a {sms}-SM Hopper"]
    for n, (dtype, H, B, names) in enumerate(parity_order(device), 1):
        lines.append(f"   {n}. {dtype} H={H} B={B}: " + (", ".join(names) if names else "no candidate applies")
                     + " -- each vs the per-step path and float64 (outputs, states, all gradients), then timed")
    lines.append(f"   {len(TARGETS) + 1}. generate-graph {GENERATION[0]} H={GENERATION[1]} B={GENERATION[2]}: "
                 "ByteLM.generate's CUDA-graphed step vs its eager step, then timed")
    lines += ["", f"== sweep candidates on a {sms}-SM Hopper (BB BN BK warps stages split pdl)"]
    for dtype, H, B in TARGETS:
        e = 2 if dtype != "float32" else 4
        lines.append(f"-- {dtype} H={H} B={B}")
        for k in configs.KERNELS:
            cands = sweep_space.sweep_candidates(k, B, H, e, device)
            text = ", ".join(f"{c.BB}/{c.BN}/{c.BK}/{c.num_warps}/{c.num_stages}/{c.split}/{int(c.pdl)}" for c in cands)
            lines.append(f"   {k:<6} rule {_short(configs.rule(k, B, H, e, device))}; {len(cands)} candidates: {text}")
    lines += ["", "== the cost model (bench/kernels/costmodel.py) for the rule's plans", "",
              costmodel.table(costmodel.model_rows()), "", costmodel.sources_table()]
    return "\n".join(lines)


def _short(c: configs.KernelConfig) -> str:
    return f"{c.BB}/{c.BN}/{c.BK}/{c.num_warps}/{c.num_stages}/{c.split}/{int(c.pdl)}"


# -------------------------------------------------------------------------------------- parity

# ByteLM.generate's graphed step is checked at this (dtype, H, samples): the host-bound case.
GENERATION = ("bfloat16", 1024, 64)
PARITY_BOUND_S = 60.0


def parity_order(device) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """(dtype, H, B, candidates in the order they are checked) per target: the designs the
    dispatcher's rule allows there, in either direction."""
    import torch

    from fastmlstm.ops.triton import dispatch

    order = []
    for dtype, H, B in TARGETS:
        names = []
        for direction in ("forward", "backward"):
            names += [n for n in dispatch.designs(B, H, getattr(torch, dtype), device, direction) if n not in names]
        order.append((dtype, H, B, tuple(names)))
    return order


def provenance(site=None) -> dict:
    """Where and when: device, driver, versions, commit, date (for every results file); ``site``: the
    device checked (default: the GPU here, if any)."""
    import datetime
    import platform
    import subprocess

    import torch

    from fastmlstm.ops import verdicts

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit or os.environ.get("FASTMLSTM_COMMIT", "unknown"), "host": platform.node(),
            **verdicts.software(), "cuda": torch.version.cuda}
    if site is None and torch.cuda.is_available():
        site = verdicts.site_of(torch.device("cuda"))
    info.update(site.identity() if site is not None else {"device": "none"})
    return info


def _margin(errors: dict, dtype) -> float:
    """The worst candidate error as a fraction of what the accuracy rule allows (<= 1 passes)."""
    from fastmlstm.ops import verdicts

    worst = 0.0
    for case in errors.values():
        for e in case.values():
            if isinstance(e, dict):
                worst = max(worst, e["candidate"] / (verdicts.FACTOR * e["tested"] + verdicts.ABS[dtype]))
    return worst


def _record(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(report, indent=1) + "\n")


def parity(out: Path, targets=None, site=None, generation: bool = True) -> dict:
    """Check every candidate at every target (``site``: a stand-in device for tests) and the
    generation graph; DIR/parity.json is rewritten after each check."""
    import dataclasses

    import torch

    from fastmlstm.ops import verdicts
    from fastmlstm.ops.triton import dispatch

    site = site or verdicts.site_of(torch.device("cuda"))
    device = dispatch._device(site)
    verdicts.BOUND_S = PARITY_BOUND_S
    dispatch._load_candidates()
    report = {"provenance": provenance(site), "checks": []}
    order = parity_order(device) if targets is None else [(d, H, B, tuple(n)) for d, H, B, n in targets]
    for dtype_name, H, B, names in order:
        dtype = getattr(torch, dtype_name)
        for name in names:
            row = {"dtype": dtype_name, "H": H, "B": B, "candidate": name}
            candidate = dispatch._CANDIDATES.get(name)
            if candidate is None or not candidate.applies(B, H, dtype, device):
                row["status"] = "not registered" if candidate is None else "does not apply"
            else:
                verdict = dispatch._verdict(candidate, B, H, dtype, site)
                row.update(dataclasses.asdict(verdict), margin=_margin(verdict.errors, dtype),
                           runs=[d for d in ("forward", "backward") if verdict.faster(d)])
            report["checks"].append(row)
            _record(out, report)
            speed = ", ".join(f"{d} {row['step_ms'][d] / row['candidate_ms'][d]:.2f}x"
                              for d in row.get("candidate_ms", {}) if row["candidate_ms"][d])
            print(f"   {row['status'].upper():<8} {name:<10} {dtype_name} H={H} B={B}"
                  + (f": {row['reason']}" if row.get("reason") else "")
                  + (f"; error {row['margin']:.2f} of the allowed; speed {speed} of the per-step path; runs "
                     f"{', '.join(row['runs']) or 'nowhere'}" if row["status"] == "passed" else ""), flush=True)
    if generation:
        report["generation"] = _generation_check()
        _record(out, report)
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    print(f"== parity: {len(report['checks'])} checks, {len(failed)} failed; {out / 'parity.json'}", flush=True)
    return report


def _generation_check() -> dict:
    """ByteLM.generate once at :data:`GENERATION` on the GPU: its first use checks the graphed step."""
    import torch

    from fastmlstm import ByteLM
    from fastmlstm.ops import verdicts

    dtype, H, B = GENERATION
    torch.manual_seed(0)
    model = ByteLM(hidden_size=H, embed_size=64, device="cuda", dtype=getattr(torch, dtype))
    start = time.perf_counter()
    model.generate("\n", 32, num_samples=B, seed=0)
    found = sorted(verdicts.cache_dir().glob("generate-graph-*.json"))
    result = {"dtype": dtype, "H": H, "B": B, "seconds": time.perf_counter() - start,
              "verdict": json.loads(found[-1].read_text())["verdict"] if found else None}
    v = result["verdict"]
    print(f"   {(v or {}).get('status', 'not checked').upper():<8} generate-graph {dtype} H={H} B={B}"
          + (f": {v['reason']}" if v and v.get("reason") else "")
          + (f"; {v['step_ms']['step'] / v['candidate_ms']['step']:.2f}x the eager step's speed"
             if v and v.get("candidate_ms") else ""), flush=True)
    return result


# ------------------------------------------------------------------------------------- timing

def _timer(device):
    """``time_ms(fn, reps=10, warmup=2)``: the verdicts' timer (CUDA events on a GPU) on ``device``."""
    import functools

    from fastmlstm.ops.verdicts import time_ms

    return functools.partial(time_ms, device=device, reps=10, warmup=2)


# ------------------------------------------------------------------------------------ ceilings

def ceilings(out: Path) -> dict:
    import torch
    import triton
    import triton.language as tl

    device = torch.device("cuda")
    time_ms = _timer(device)
    props = torch.cuda.get_device_properties(device)
    result = {"device": props.name, "sms": props.multi_processor_count}

    n = 256 * 2**20  # 1 GiB of float32
    buffers = [torch.randn(n, device=device), torch.empty(n, device=device)]
    ms = time_ms(lambda: buffers[1].copy_(buffers[0]), reps=20)
    result["hbm_copy_TBps"] = 2 * 4 * n / (ms * 1e9)
    buffers.clear()

    @triton.jit
    def _read(p, n_elem, reps, p_out, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(reps):
            for i in range(tl.program_id(0) * BLOCK, n_elem, tl.num_programs(0) * BLOCK):
                acc += tl.load(p + i + tl.arange(0, BLOCK))
        tl.store(p_out + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)

    # 16 MiB stays in L2 (50-60 MB): repeated reads of it measure L2 -> SM delivery.
    m, reps, block = 4 * 2**20, 50, 2048
    buf = torch.randn(m, device=device)
    programs = props.multi_processor_count * 8
    sink = torch.empty(programs * block, device=device)
    ms = time_ms(lambda: _read[(programs,)](buf, m, reps, sink, BLOCK=block), reps=10)
    result["l2_read_TBps"] = 4 * m * reps / (ms * 1e9)

    @triton.jit
    def _empty(p):
        pass

    _empty[(1,)](sink)
    torch.cuda.synchronize()
    launches = 2000
    t0 = time.perf_counter()
    for _ in range(launches):
        _empty[(1,)](sink)
    torch.cuda.synchronize()
    result["launch_us"] = (time.perf_counter() - t0) / launches * 1e6

    gpu = costmodel.gpu_of_device_name(props.name)
    result["model_gpu"] = gpu
    measured = {"hbm_TBps": result["hbm_copy_TBps"], "hbm_efficiency": 1.0, "l2_TBps": result["l2_read_TBps"],
                "cpu_launch_us": result["launch_us"]}
    rows = costmodel.model_rows(costmodel.gpus(**measured))
    result["model_with_measured"] = [r for r in rows if r["gpu"] == gpu] if gpu else rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceilings.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"== {props.name}: copy {result['hbm_copy_TBps']:.2f} TB/s, L2 read {result['l2_read_TBps']:.2f} TB/s, "
          f"Triton launch {result['launch_us']:.1f} us (host)")
    print("== the model with these measured numbers in place of the table's (achievable HBM = the copy):")
    print(costmodel.table(result["model_with_measured"]))
    return result


# --------------------------------------------------------------------------------------- sweep

def _inputs(T, B, H, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    proj = randn(T, B, 5 * H).to(dtype)
    w_hh = randn(4 * H, H, scale=H ** -0.5).to(dtype)
    w_hm = randn(H, H, scale=H ** -0.5).to(dtype)
    h0 = randn(B, H, scale=0.5)
    c0 = randn(B, H)
    grads = (randn(T, B, H).to(dtype), randn(B, H), None)
    return proj, w_hh, w_hm, h0, c0, grads


def _fwd_bwd(backend, proj, w_hh, w_hm, h0, c0, grads):
    from fastmlstm.ops import autograd

    out, c_n, cells, act = autograd.sequence_forward(proj, w_hh, w_hm, h0, c0, None, backend, True, False)
    bwd = autograd.sequence_backward(*grads, w_hh, w_hm, h0, c0, None, out, cells, act, backend)
    return (out, c_n, *bwd)


def _rel_diff(values, reference) -> float:
    worst = 0.0
    for a, b in zip(values, reference):
        a, b = a.float(), b.float()
        if not bool(a.isfinite().all()):
            return math.inf
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())
    return worst


def _device_info():
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return torch.device("cuda"), configs.Device(props.multi_processor_count, (props.major, props.minor), props.name)
    # The interpreter (CI): the code paths only; timings are meaningless there.
    return torch.device("cpu"), configs.Device(8, (8, 0), "cpu-interpreter")


_GATE_CACHE: dict = {}


def gate(job: tuple) -> dict:
    """Run one candidate (the rule's configs for the other kernels) forward and backward at its
    target shape and compare with the reference backend. In a worker process, this also compiles
    the candidate's kernels into Triton's disk cache for the timing pass."""
    import torch

    (dtype_name, H, B), T, kernel, config_dict = job
    device, dev = _device_info()
    key = (dtype_name, H, B, T)
    if key not in _GATE_CACHE:
        _GATE_CACHE.clear()  # one target's tensors at a time
        inputs = _inputs(T, B, H, getattr(torch, dtype_name), device)
        _GATE_CACHE[key] = (inputs, _fwd_bwd("reference", *inputs))
    inputs, reference = _GATE_CACHE[key]
    e = 2 if dtype_name != "float32" else 4
    plan = {**dict(configs.rule_plan(B, H, e, dev).__dict__), kernel: configs.KernelConfig(**config_dict)}
    plan.pop("source")
    record = {"dtype": dtype_name, "H": H, "B": B, "kernel": kernel, "config": config_dict}
    try:
        with configs.override(plan):
            diff = _rel_diff(_fwd_bwd("triton", *inputs), reference)
        record.update(rel_diff=diff, passed=diff <= GATE[dtype_name])
    except Exception as exc:  # a candidate that fails to compile or run is refused
        record.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    return record


def _time_direction(recurrence, time_ms, plan, direction, inputs, T, reps) -> float:
    """Microseconds per step of one direction of the recurrence with ``plan``."""
    proj, w_hh, w_hm, h0, c0, grads = inputs
    with configs.override(plan):
        if direction == "fwd":
            def fn():
                return recurrence.forward(proj, w_hh, w_hm, h0, c0, None, True, False)
        else:
            out, _, cells, act = recurrence.forward(proj, w_hh, w_hm, h0, c0, None, True, False)

            def fn():
                return recurrence.backward(*grads, w_hh, w_hm, h0, c0, None, out, cells, act)
        return time_ms(fn, reps=reps) / T * 1e3


def sweep(out: Path, targets=TARGETS, T: int = 8, reps: int = 10, max_candidates: int | None = None,
          table_path: Path | None = TUNED_FILE, workers: int = 1) -> list[dict]:
    import concurrent.futures
    import multiprocessing

    import torch

    from fastmlstm.ops.triton import recurrence

    device, dev = _device_info()
    time_ms = _timer(device)
    jobs = []
    for dtype_name, H, B in targets:
        e = 2 if dtype_name != "float32" else 4
        for kernel in configs.KERNELS:
            for cand in sweep_space.sweep_candidates(kernel, B, H, e, dev)[:max_candidates]:
                jobs.append(((dtype_name, H, B), T, kernel, cand.as_dict()))
    # 1. The gate, in parallel: each candidate's kernels compile once, into Triton's disk cache.
    start = time.perf_counter()
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # CUDA does not survive fork
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            gated = list(pool.map(gate, jobs))
    else:
        gated = [gate(job) for job in jobs]
    passed = {(g["dtype"], g["H"], g["B"], g["kernel"], json.dumps(g["config"], sort_keys=True)) for g in gated
              if g["passed"]}
    for g in gated:
        if not g["passed"]:
            print(f"   REFUSED {g['dtype']} H={g['H']} B={g['B']} {g['kernel']} {g['config']}: "
                  + (g.get("error") or f"diff {g['rel_diff']:.1e} > {GATE[g['dtype']]}"), flush=True)
    print(f"== gate: {len(passed)} of {len(jobs)} candidates passed ({time.perf_counter() - start:.0f} s)", flush=True)

    # 2. Timing, one kernel at a time with the others at their best so far (coordinate descent).
    entries, log = [], list(gated)
    for dtype_name, H, B in targets:
        dtype = getattr(torch, dtype_name)
        proj, w_hh, w_hm, h0, c0, grads = _inputs(T, B, H, dtype, device)
        e = 2 if dtype != torch.float32 else 4
        best = dict(configs.rule_plan(B, H, e, dev).__dict__)
        best.pop("source")

        def timed(plan, direction, inputs=(proj, w_hh, w_hm, h0, c0, grads)):
            return _time_direction(recurrence, time_ms, plan, direction, inputs, T, reps)

        rule_us = {d: timed(best, d) for d in ("fwd", "bwd")}
        for kernel in configs.KERNELS:
            direction = "fwd" if kernel in costmodel.DIRECTIONS["fwd"] else "bwd"
            results = []
            for cand in sweep_space.sweep_candidates(kernel, B, H, e, dev)[:max_candidates]:
                if (dtype_name, H, B, kernel, json.dumps(cand.as_dict(), sort_keys=True)) not in passed:
                    continue
                step_us = timed({**best, kernel: cand}, direction)
                results.append((step_us, cand))
                log.append({"dtype": dtype_name, "H": H, "B": B, "kernel": kernel, "config": cand.as_dict(),
                            "step_us": step_us, "direction": direction})
                print(f"   {dtype_name} H={H} B={B} {kernel} {_short(cand)}: {direction} {step_us:.1f} us/step",
                      flush=True)
            if results:
                best[kernel] = min(results, key=lambda r: r[0])[1]
        best_us = {d: timed(best, d) for d in ("fwd", "bwd")}
        gpu = costmodel.gpu_of_device_name(dev.name)
        predicted = {}
        if gpu:
            for d in ("fwd", "bwd"):
                row = costmodel.direction_cost(costmodel.GPUS[gpu], d, B, H, "bf16" if e == 2 else "fp32",
                                               plan=configs.StepPlan(**best))
                predicted[d] = row["predicted_us"]
        entry = {"device": dev.name, "dtype": dtype_name, "precision": "ieee", "B": B, "H": H,
                 "configs": {k: best[k].as_dict() for k in configs.KERNELS},
                 "step_us": {d: round(v, 2) for d, v in best_us.items()},
                 "rule_step_us": {d: round(v, 2) for d, v in rule_us.items()},
                 "predicted_us": predicted, "T": T}
        entries.append(entry)
        print(f"== {dtype_name} H={H} B={B}: rule fwd {rule_us['fwd']:.1f} / bwd {rule_us['bwd']:.1f} us per step; "
              f"best fwd {best_us['fwd']:.1f} / bwd {best_us['bwd']:.1f}"
              + (f"; model for the best plan {predicted}" if predicted else ""), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"device": dev.name, "entries": entries, "log": log}, indent=1) + "\n")
    text = tuned_source(merge(_current_entries(table_path), entries))
    (out / "tuned.py").write_text(text)
    if table_path is not None:
        table_path.write_text(text)
    return entries


def _current_entries(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)  # our own generated file
    return list(scope.get("ENTRIES", []))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    def key(e):
        return e["device"], e["dtype"], e["precision"], e["B"], e["H"]

    fresh = {key(e) for e in new}
    return [e for e in old if key(e) not in fresh] + list(new)


def tuned_source(entries: list[dict]) -> str:
    for entry in entries:
        sweep_space.check_entry(entry)  # never write a table outside the space the lab compiles and tests
    # Keep the module's docstring (everything above the ENTRIES assignment).
    lines = TUNED_FILE.read_text().splitlines(keepends=True) if TUNED_FILE.is_file() else []
    head = "".join(itertools.takewhile(lambda line: not line.startswith("ENTRIES"), lines))
    return head + "ENTRIES: list[dict] = " + pprint.pformat(entries, width=110, sort_dicts=False) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/kernels/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("plan", "parity", "ceilings", "sweep", "provenance"))
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--T", type=int, default=8, help="steps per timed call in the sweep")
    p.add_argument("--targets", help="comma-separated dtype:H:B (default: the target shapes)")
    p.add_argument("--max-candidates", type=int, help="at most this many candidates per kernel (tests)")
    p.add_argument("--table", type=Path, default=TUNED_FILE, help="tuned table to update (default: the package's)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that run the correctness gate (and so compile) in parallel")
    args = p.parse_args(argv)
    if args.stage == "plan":
        print(plan_text())
        return 0
    if args.stage == "ceilings":
        ceilings(args.out)
        return 0
    if args.stage == "provenance":
        print(json.dumps(provenance()))
        return 0
    if args.stage == "parity":
        report = parity(args.out)
        return 1 if any(c["status"] == "failed" for c in report["checks"]) else 0
    targets = TARGETS
    if args.targets:
        targets = tuple((d, int(h), int(b)) for d, h, b in (t.split(":") for t in args.targets.split(",")))
    sweep(args.out, targets, T=args.T, max_candidates=args.max_candidates, table_path=args.table,
          workers=args.workers)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
