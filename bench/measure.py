"""How the benchmark measures: timing, peak memory, the device's two ceilings, the environment.

Timing
    CUDA: one pair of CUDA events around every timed call, a 256 MiB buffer overwritten between
    calls so no call finds the previous one's data in L2 (what ``triton.testing.do_bench`` does),
    warm-up first, then at least ``min_runs`` calls and about ``rep_ms`` of them; the median is
    reported with the 10th and 90th percentiles. CPU: the same with ``time.perf_counter``; presets
    that say ``interleave`` (and ``run.py --interleave``) time the implementations of a case call by
    call in turn (``time_interleaved``), so a load that changes meanwhile weighs on all alike.

Peak memory (``peak_mem_mb`` = ``static_mem_mb`` + ``activation_mem_mb``)
    ``static_mem_mb``: the bytes of the tensors the case holds before a call (parameters, optimizer
    state, one input set), counted exactly. ``activation_mem_mb``: the growth of memory during one
    call over what was held before it. CUDA: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` minus ``memory_allocated`` before the call. CPU: torch has no CPU
    allocator statistics (and tracemalloc does not see its allocations), so the process's peak
    resident set is used: free heap memory is handed back to the OS first (glibc ``malloc_trim``),
    then the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, the call runs,
    and the mark is read, minus the resident set (VmRSS) before the call. The allocator is left as
    it is (changing its settings would change the timings too). The value is page-granular and
    includes allocator fragmentation and library scratch memory (oneDNN, MKL): an upper bound of
    torch's own peak. Where /proc/self/clear_refs cannot be written the CPU value is null.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import write_atomic

from fastmlstm.nn.precision import native_16bit_gemm

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    n_runs: int


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summarize(times_ms: list[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.1), _quantile(s, 0.9), s[0], len(s))


def _call_count(estimate_ms: float, budget_ms: float, lo: int, hi: int) -> int:
    """Calls that fill ``budget_ms``, at least ``lo`` (``min_runs`` wins over the cap ``hi``)."""
    return int(max(lo, min(hi, budget_ms / max(estimate_ms, 1e-3))))


def time_calls(fn, device: torch.device, *, warmup_ms: float, rep_ms: float, min_runs: int,
               max_runs: int = 1000) -> Timing:
    """Median time of ``fn()`` (which must do the whole case, rotating its own inputs). Python's
    cyclic garbage collector is paused meanwhile (tensors are freed by reference counting), so
    a collection of unrelated objects does not land inside one timed call."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            return _time_cuda(fn, warmup_ms, rep_ms, min_runs, max_runs)
        return _time_cpu(fn, warmup_ms, rep_ms, min_runs, max_runs)
    finally:
        if enabled:
            gc.enable()


def _time_cpu(fn, warmup_ms, rep_ms, min_runs, max_runs) -> Timing:
    fn()  # first call: lazy initialization, compilation; never timed
    t0 = time.perf_counter()
    fn()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(_call_count(estimate_ms, warmup_ms, 0, max_runs) - 1):
        fn()
    times = []
    for _ in range(_call_count(estimate_ms, rep_ms, min_runs, max_runs)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summarize(times)


def time_interleaved(fns: dict, *, warmup_ms: float, rep_ms: float, min_runs: int, max_runs: int = 1000) -> dict:
    """Median times of several ``fn()`` on the CPU, called in turn round after round (the order
    rotates every round): each sees the same share of whatever else the machine runs meanwhile, so
    their ratios hold under a load that changes over minutes. Returns ``{name: Timing}``."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        estimate = {}
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            estimate[name] = (time.perf_counter() - t0) * 1e3
        per_round = sum(estimate.values())
        for _ in range(_call_count(per_round, warmup_ms, 0, max_runs) - 1):
            for fn in fns.values():
                fn()
        names = list(fns)
        times = {name: [] for name in names}
        for r in range(_call_count(per_round, rep_ms, min_runs, max_runs)):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: _summarize(v) for name, v in times.items()}
    finally:
        if enabled:
            gc.enable()


def loop_medians(fns: dict, *, reps: int, rounds: int, digits: int = 4) -> dict:
    """The kernel lab's probes' loop timing: each round calls every ``fn()`` ``reps`` times in a row,
    one after the other; round 0 warms up. Returns ``{name: median ms per call}`` over the other
    ``rounds`` rounds, rounded to ``digits``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if r:
                times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return {name: round(statistics.median(v), digits) for name, v in times.items()}


_L2_FLUSH: dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _L2_FLUSH:
        _L2_FLUSH[index] = torch.empty(256 * MiB // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[index]


def _time_cuda(fn, warmup_ms, rep_ms, min_runs, max_runs) -> Timing:
    device = torch.device("cuda", torch.cuda.current_device())
    cache = _flush_buffer(device)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = start.elapsed_time(end) / 3
    for _ in range(_call_count(estimate_ms, warmup_ms, 1, max_runs)):
        fn()
    n = _call_count(estimate_ms, rep_ms, min_runs, max_runs)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ----------------------------------------------------------------------------------------- memory

def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include cached heap memory
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_memory_supported() -> bool:
    return platform.system() == "Linux" and _reset_peak_rss()


def activation_memory_mb(fn, device: torch.device) -> float | None:
    """Growth of memory during one ``fn()`` over what was held before it, in MiB (see module doc).
    Tensors are freed by reference counting as soon as the previous call's results are dropped."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del result
        return (peak - before) / MiB
    if not cpu_peak_memory_supported():
        return None
    _trim_heap()
    before = _status_kb("VmRSS")
    _reset_peak_rss()
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return max(0, peak - before) / 1024


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


# -------------------------------------------------------------------------------------- ceilings

def measure_ceilings(device: torch.device, dtypes, *, copy_mib: int, matmul_n: int, rep_ms: float) -> dict:
    """The device's copy bandwidth and matmul rate, measured now (METHOD.md: a large
    device-to-device copy counting bytes read plus written; a large matrix product)."""
    src = torch.randn(copy_mib * MiB // 4, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda: dst.copy_(src), device, warmup_ms=rep_ms / 4, rep_ms=rep_ms, min_runs=5)
    copy_gbps = 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9
    del src, dst
    rates = {}
    for dtype in dtypes:
        n = matmul_n
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = time_calls(lambda: a @ b, device, warmup_ms=rep_ms / 4, rep_ms=rep_ms, min_runs=5)
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
        del a, b
    return {"copy_GBps": copy_gbps, "copy_MiB": copy_mib, "matmul_TFLOPs": rates, "matmul_n": matmul_n}


def step_gemm_rate(rows: int, K: int, N: int, dtype: torch.dtype, *, rep_ms: float = 300.0) -> dict:
    """The rate of torch.mm at one recurrent step's shape, [rows, K] x [K, N] in ``dtype`` on the
    current torch threads: the roofline a CPU featurization is held to (every step is such a product,
    or, for the multiplicative LSTM, two dependent ones with the same total N). The weight stays the
    same across calls, as a recurrence's does; the activations rotate."""
    device = torch.device("cpu")
    w = torch.randn(K, N).mul_(K ** -0.5).to(dtype)
    xs = [torch.randn(rows, K).to(dtype) for _ in range(3)]
    out = torch.empty(rows, N, dtype=dtype)
    it = iter(range(1 << 62))

    def call():
        return torch.mm(xs[next(it) % 3], w, out=out)

    t = time_calls(call, device, warmup_ms=rep_ms / 4, rep_ms=rep_ms, min_runs=5)
    return {"shape": [rows, K, N], "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "median_ms": t.median_ms, "GFLOPs": 2.0 * rows * K * N / (t.median_ms * 1e-3) / 1e9}


# ----------------------------------------------------------------------------------- environment

def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with family/model, core count and hypervisor."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    fields.setdefault(k, v)
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    extra = []
    if "cpu family" in fields and "model" in fields:
        extra.append(f"family {fields['cpu family']} model {fields['model']}")
    extra.append(f"{os.cpu_count()} cores")
    if "hypervisor" in fields.get("flags", "").split():
        extra.append("virtualized")
    return f"{name} ({', '.join(extra)})"


_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
                 "amx_tile")


def cpu_features() -> dict:
    """The CPU's vector extensions (from /proc/cpuinfo), what PyTorch dispatches its kernels to,
    and whether oneDNN has native 16-bit GEMMs here: what decides the CPU results."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass

    return {"vector_extensions": [f for f in _VECTOR_FLAGS if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_native_bf16": native_16bit_gemm(torch.bfloat16),
            "onednn_native_fp16": native_16bit_gemm(torch.float16)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # Only the code that is measured: the package, its extension sources and the benchmark.
        status = git("status", "--porcelain", "--", "fastmlstm", "bench", "csrc").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "untracked": None}
    modified = [line[3:] for line in status if not line.startswith("??")]
    untracked = [line[3:] for line in status if line.startswith("??")]
    # bench/results is where this run writes; files appearing there are not code.
    modified = [p for p in modified if not p.startswith("bench/results/")]
    untracked = [p for p in untracked if not p.startswith("bench/results/")]
    return {"commit": commit or None, "dirty": bool(modified), "modified": modified, "untracked": untracked}


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"unavailable ({type(exc).__name__})"
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------ probe files
def probe_doc(script: str, argv: list[str], **fields) -> dict:
    """The start of a kernel-lab probe's results file: the machine, the versions and commit, the
    package it times (``package``: the fastmlstm directory imported, so that runs of two trees,
    alternated, compare a change), the command that ran (``python <script> <argv>``), ``fields``,
    and the load average now."""
    import fastmlstm

    return {"device": cpu_name(), "cpu_features": cpu_features(), **versions(), **git_commit(),
            "package": os.path.dirname(fastmlstm.__file__),
            "command": " ".join(["python", script, *argv]), **fields, "load_average_start": load_average()}


def finish_probe_doc(doc: dict, out) -> None:
    """Adds the load average at the end and writes ``doc`` as JSON to ``out`` (a Path) if given."""
    doc["load_average_end"] = load_average()
    if out:
        write_atomic(out, json.dumps(doc, indent=1) + "\n")
