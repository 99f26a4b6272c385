"""The CPU forward beside torch.nn.LSTM's at one thread and at two, in one process: what the forward
targets' ratios are made of (bench/kernels/NOTES-cpu-kernels.md, "One thread and two").

    python bench/kernels/cpu_threads.py [--H 512,1024] [--B 16,64] [--dtypes float32,bfloat16]
                                        [--T 64] [--threads 1,2] [--rounds 9] [--peak FILE.json]
                                        [--out FILE.json]

Per case, FastMLSTM's and nn.LSTM's inference forward ([T, B, I] input, I = 64, the cpu-targets
preset's shapes) are called in turn at each thread count, round by round, so that both see the same
load; each figure is the median over rounds. Per thread count: the time ratio (fastmlstm over
nn.LSTM), each side's GFLOP/s over the FLOPs it must do (``workload.cost``: the multiplicative LSTM
does 5H(H + I) multiply-adds per row and step, the LSTM 4H(H + I), so equal efficiency gives 1.25),
``efficiency ratio`` (fastmlstm's GFLOP/s over nn.LSTM's), and with ``--peak`` (a ``cpu_peak.py``
results file of the same thread count) each side's fraction of the machine's multiply-add peak.
Across thread counts: each side's speed-up from the first to the last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py, workload.py

import measure  # noqa: E402
import workload  # noqa: E402

from fastmlstm import FastMLSTM  # noqa: E402

I = 64
PEAK_KERNEL = {"float32": "avx512-fma", "bfloat16": "avx512-bf16"}


def _sig(value: float) -> float:
    """``value`` to four significant digits."""
    return float(f"{value:.4g}")


def _timed(module, x) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        module(x)
    return time.perf_counter() - start


def _peaks(path: Path | None) -> dict:
    """{(threads, dtype): GFLOP/s} from a cpu_peak.py results file, or {}."""
    if path is None:
        return {}
    doc = json.loads(path.read_text())
    threads = {p["threads"] for p in doc["peaks"].values()}
    return {(t, dt): doc["peaks"][kernel]["GFLOPs"] for t in threads for dt, kernel in PEAK_KERNEL.items()
            if kernel in doc["peaks"]}


def case(H: int, B: int, dtype: str, T: int, threads: list[int], rounds: int, peaks: dict) -> dict:
    dt = getattr(torch, dtype)
    ours = FastMLSTM(I, H, backend="cpu").to(dt).eval()
    theirs = torch.nn.LSTM(I, H).to(dt).eval()
    x = torch.randn(T, B, I, dtype=dt)
    flops = {name: workload.cost(family, "fwd", H, B, T, I, dt.itemsize)[0]
             for name, family in (("fastmlstm", "mlstm"), ("nn-lstm", "lstm"))}
    times: dict[tuple[str, int], list[float]] = {(n, t): [] for n in flops for t in threads}
    for r in range(rounds + 1):  # round 0 warms both up at every thread count
        for t in threads:
            torch.set_num_threads(t)
            for name, module in (("fastmlstm", ours), ("nn-lstm", theirs)):
                took = _timed(module, x)
                if r:
                    times[(name, t)].append(took)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {"H": H, "B": B, "T": T, "I": I, "dtype": dtype, "per_threads": {}}
    for t in threads:
        gflops = {n: flops[n] / ms[(n, t)] / 1e6 for n in flops}
        row = {"ms": {n: _sig(ms[(n, t)]) for n in flops},
               "ratio": _sig(ms[("fastmlstm", t)] / ms[("nn-lstm", t)]),
               "GFLOPs": {n: _sig(g) for n, g in gflops.items()},
               "efficiency_ratio": _sig(gflops["fastmlstm"] / gflops["nn-lstm"])}
        if (t, dtype) in peaks:
            row["fraction_of_peak"] = {n: _sig(g / peaks[(t, dtype)]) for n, g in gflops.items()}
        out["per_threads"][str(t)] = row
    first, last = threads[0], threads[-1]
    out["speedup"] = {n: _sig(ms[(n, first)] / ms[(n, last)]) for n in flops}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--H", default="512,1024")
    p.add_argument("--B", default="16,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--threads", default="1,2", help="thread counts, each timed in every round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--peak", type=Path, help="a cpu_peak.py results file (fraction of the peak per side)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    peaks = _peaks(args.peak)
    before = torch.get_num_threads()
    doc = measure.probe_doc("bench/kernels/cpu_threads.py", sys.argv[1:] if argv is None else argv,
                            threads=threads, peak_file=str(args.peak) if args.peak else None, cases=[])
    try:
        for dtype in args.dtypes.split(","):
            for H in (int(h) for h in args.H.split(",")):
                for B in (int(b) for b in args.B.split(",")):
                    doc["cases"].append(case(H, B, dtype, args.T, threads, args.rounds, peaks))
                    print(json.dumps(doc["cases"][-1]), flush=True)
    finally:
        torch.set_num_threads(before)
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
