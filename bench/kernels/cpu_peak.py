"""This CPU's multiply-add peak, and what it proves about the CPU targets (issue 24).

    python bench/kernels/cpu_peak.py [--threads 2] [--seconds 0.5] [--rounds 5]
                                     [--results bench/results/cpu-...json] [--out FILE.json]

A register-only loop of independent fused multiply-adds (no loads or stores, 12 accumulator
chains, more than latency x issue width on every x86 core we target) runs on ``--threads`` threads
at once, started together; the figure is the best of ``--rounds`` rounds of total multiply-add
FLOPs over wall time. Kernels, each compiled with its own target attribute from one C file by the
system C compiler and run only where the CPU reports the extension:

- ``portable``: scalar multiply and add in plain C, no ISA flags. Every machine runs it: it tests
  the harness (threads, timing, the FLOP count), not the peak.
- ``avx2-fma``: 256-bit ``vfmadd`` on float32 (8 lanes, 2 FLOPs each).
- ``avx512-fma``: 512-bit ``vfmadd`` on float32 (16 lanes).
- ``avx512-bf16``: 512-bit ``vdpbf16ps`` (16 lanes, each the float32 sum of two bf16 products:
  4 FLOPs per lane).

No program can run multiply-adds faster than the best of these, so FLOPs / peak is a true lower
bound on the time of any implementation that does those FLOPs. With ``--results`` (a
``bench/run.py`` results file), each case that has both fastmlstm and nn.LSTM rows gets that
bound for fastmlstm beside the target's limit (ratio x nn.LSTM's measured time of the same run):
where the bound exceeds the limit, no implementation of the multiplicative LSTM can meet that
target on this machine, whatever its code. Everything else stays a miss.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

CHAINS = 12
# name -> (C function, FLOPs per chain per iteration, required cpu_features()["vector_extensions"])
KERNELS = {
    "portable": ("peak_portable", 2, ()),
    "avx2-fma": ("peak_avx2", 16, ("avx2", "fma")),
    "avx512-fma": ("peak_avx512", 32, ("avx512f",)),
    "avx512-bf16": ("peak_avx512_bf16", 64, ("avx512f", "avx512_bf16")),
}
# Which kernels bound which dtype's arithmetic. A bf16 GEMM may also run in float32 after a
# conversion, so bf16's bound is the best of every kernel.
DTYPE_KERNELS = {"float32": ("avx2-fma", "avx512-fma", "portable"),
                 "bfloat16": ("avx512-bf16", "avx2-fma", "avx512-fma", "portable")}

_SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <time.h>

#define CHAINS 12
static volatile float sink;

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

void peak_portable(long iters) {
    float a[CHAINS]; float s = 0.f;
    for (int c = 0; c < CHAINS; ++c) a[c] = 1.f + c * 1e-3f;
    for (long i = 0; i < iters; ++i)
        for (int c = 0; c < CHAINS; ++c) a[c] = a[c] * 0.999999f + 1e-6f;
    for (int c = 0; c < CHAINS; ++c) s += a[c];
    sink = s;
}

#define BODY(T, SET, OP, RED)                                                        \
    T a[CHAINS]; const T b = SET(0.999999f), k = SET(1e-6f);                          \
    for (int c = 0; c < CHAINS; ++c) a[c] = SET(1.f + c * 1e-3f);                   \
    for (long i = 0; i < iters; ++i) {                                                \
        _Pragma("GCC unroll 12") for (int c = 0; c < CHAINS; ++c) a[c] = OP;          \
    }                                                                                 \
    float s = 0.f; for (int c = 0; c < CHAINS; ++c) s += RED(a[c]); sink = s;

static float red256(__m256 v) __attribute__((target("avx2,fma")));
static float red256(__m256 v) {
    float t[8], s = 0.f; _mm256_storeu_ps(t, v);
    for (int i = 0; i < 8; ++i) s += t[i];
    return s;
}
__attribute__((target("avx2,fma"))) void peak_avx2(long iters) {
    BODY(__m256, _mm256_set1_ps, _mm256_fmadd_ps(a[c], b, k), red256)
}

__attribute__((target("avx512f"))) static float red512(__m512 v) { return _mm512_reduce_add_ps(v); }
__attribute__((target("avx512f"))) void peak_avx512(long iters) {
    BODY(__m512, _mm512_set1_ps, _mm512_fmadd_ps(a[c], b, k), red512)
}

__attribute__((target("avx512f,avx512bf16"))) void peak_avx512_bf16(long iters) {
    __m512 a[CHAINS];
    const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
    const __m512bh y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
    for (int c = 0; c < CHAINS; ++c) a[c] = _mm512_set1_ps(1.f + c * 1e-3f);
    for (long i = 0; i < iters; ++i) {
        _Pragma("GCC unroll 12") for (int c = 0; c < CHAINS; ++c) a[c] = _mm512_dpbf16_ps(a[c], x, y);
    }
    float s = 0.f; for (int c = 0; c < CHAINS; ++c) s += _mm512_reduce_add_ps(a[c]); sink = s;
}

typedef void (*kernel_fn)(long);
struct job { kernel_fn fn; long iters; pthread_barrier_t *start; };

static void *worker(void *p) {
    struct job *j = (struct job *)p;
    pthread_barrier_wait(j->start);
    j->fn(j->iters);
    return 0;
}

/* Runs fn(iters) on `threads` threads released together; returns the wall seconds from the
   release to the last thread's end, or a negative number if a thread could not start. */
double run_threads(kernel_fn fn, int threads, long iters) {
    pthread_t tid[256]; struct job jobs[256]; pthread_barrier_t start;
    if (threads < 1 || threads > 256) return -1.0;
    pthread_barrier_init(&start, 0, threads + 1);
    for (int t = 0; t < threads; ++t) {
        jobs[t].fn = fn; jobs[t].iters = iters; jobs[t].start = &start;
        if (pthread_create(&tid[t], 0, worker, &jobs[t])) return -2.0;
    }
    pthread_barrier_wait(&start);
    double t0 = now();
    for (int t = 0; t < threads; ++t) pthread_join(tid[t], 0);
    double dt = now() - t0;
    pthread_barrier_destroy(&start);
    return dt;
}
"""


def build(cache_dir: Path | None = None) -> ctypes.CDLL:
    """Compiles the kernels with the system C compiler (``cc``) and loads them."""
    out = Path(cache_dir or tempfile.mkdtemp(prefix="fastmlstm-peak-"))
    src, lib = out / "peak.c", out / "peak.so"
    src.write_text(_SOURCE)
    cmd = ["cc", "-O2", "-shared", "-fPIC", "-pthread", str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cpu_peak: `{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
    so = ctypes.CDLL(str(lib))
    so.run_threads.restype = ctypes.c_double
    so.run_threads.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    return so


def available(features: list[str] | None = None) -> list[str]:
    """The kernels this CPU can run (``portable`` always)."""
    have = set(measure.cpu_features()["vector_extensions"] if features is None else features)
    return [name for name, (_, _, need) in KERNELS.items() if set(need) <= have]


def _pointer(so, name: str) -> int:
    return ctypes.cast(getattr(so, name), ctypes.c_void_p).value


def measure_peak(so: ctypes.CDLL, kernel: str, threads: int, seconds: float, rounds: int) -> dict:
    """Best-of-rounds GFLOP/s of `kernel` on `threads` threads running together."""
    fn_name, flops_per_chain, _ = KERNELS[kernel]
    fn = _pointer(so, fn_name)
    iters = 1000
    while True:  # size the loop to about `seconds`
        dt = so.run_threads(fn, threads, iters)
        if dt < 0:
            raise RuntimeError(f"cpu_peak: could not start {threads} threads")
        if dt >= seconds / 4 or iters > 1 << 40:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(dt, 1e-9)))
    flops = float(threads) * iters * CHAINS * flops_per_chain
    rates = [flops / so.run_threads(fn, threads, iters) / 1e9 for _ in range(rounds)]
    return {"kernel": kernel, "threads": threads, "iters": iters, "GFLOPs": round(max(rates), 2),
            "GFLOPs_rounds": [round(r, 2) for r in rates]}


def peaks(threads: int, seconds: float, rounds: int, features=None) -> dict:
    so = build()
    return {k: measure_peak(so, k, threads, seconds, rounds) for k in available(features)}


def dtype_peak(measured: dict, dtype: str) -> tuple[str, float]:
    """The fastest measured kernel that can carry `dtype`'s multiply-adds: (kernel, GFLOP/s)."""
    cands = [(measured[k]["GFLOPs"], k) for k in DTYPE_KERNELS[dtype] if k in measured]
    rate, kernel = max(cands)
    return kernel, rate


# The targets the bound is checked against: (mode, dtype) -> largest allowed fastmlstm / nn.LSTM.
LIMITS = {("fwd", "float32"): 1.1, ("fwd+bwd", "float32"): 1.25, ("train", "float32"): 1.25,
          ("fwd", "bfloat16"): 1.25}


def bounds(results: dict, measured: dict) -> list[dict]:
    """For each (mode, dtype, H, B) with a limit: fastmlstm's FLOPs over the peak against the limit."""
    rows = {}
    for r in results["results"]:
        if r.get("roofline") and r.get("median_ms"):
            rows[(r["impl"], r["mode"], r["dtype"], r["H"], r["B"])] = r
    out = []
    for (impl, mode, dtype, H, B), r in sorted(rows.items(), key=lambda kv: kv[0][1:]):
        other = rows.get(("nn-lstm", mode, dtype, H, B))
        if not impl.startswith("fastmlstm") or other is None or (mode, dtype) not in LIMITS:
            continue
        kernel, rate = dtype_peak(measured, dtype)
        limit_ms = LIMITS[mode, dtype] * other["median_ms"]
        bound_ms = r["roofline"]["flops"] / (rate * 1e9) * 1e3
        out.append({"mode": mode, "dtype": dtype, "H": H, "B": B, "limit": LIMITS[mode, dtype],
                    "nn_lstm_ms": round(other["median_ms"], 3),
                    "nn_lstm_frac_of_peak": round(other["roofline"]["flops"] / (rate * 1e6) / other["median_ms"], 3),
                    "fastmlstm_ms": round(r["median_ms"], 3),
                    "fastmlstm_frac_of_peak": round(bound_ms / r["median_ms"], 3),
                    "limit_ms": round(limit_ms, 3), "bound_ms": round(bound_ms, 3), "peak_kernel": kernel,
                    "verdict": "infeasible here" if bound_ms > limit_ms else "feasible"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results", type=Path, help="a bench/run.py results JSON to check the targets against")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--threads and --rounds must be >= 1 and --seconds > 0")
    doc = measure.probe_doc("bench/kernels/cpu_peak.py", sys.argv[1:])
    doc["peaks"] = peaks(args.threads, args.seconds, args.rounds)
    for k, v in doc["peaks"].items():
        print(f"{k:12s} {args.threads} threads: {v['GFLOPs']:8.1f} GFLOP/s (rounds {v['GFLOPs_rounds']})")
    if args.results:
        res = json.loads(args.results.read_text())
        doc["results_file"] = args.results.name
        doc["results_commit"] = res.get("commit")
        doc["bounds"] = bounds(res, doc["peaks"])
        for b in doc["bounds"]:
            print(f"{b['mode']:8s} {b['dtype']:8s} H={b['H']:5d} B={b['B']:3d}: bound {b['bound_ms']:9.2f} ms, "
                  f"limit {b['limit']} x {b['nn_lstm_ms']:.2f} = {b['limit_ms']:9.2f} ms "
                  f"(nn.LSTM at {b['nn_lstm_frac_of_peak']:.0%} of peak, fastmlstm at "
                  f"{b['fastmlstm_frac_of_peak']:.0%}): {b['verdict']}")
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
