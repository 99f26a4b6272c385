"""Where fwd+bwd time goes on the CPU backend, beside torch.nn.LSTM: the measured cause behind a
CPU fwd+bwd ratio (bench/kernels/NOTES-cpu.md).

    python bench/kernels/cpu_breakdown.py [--H 512,1024] [--B 16,64] [--T 64] [--I 64] [--threads 2]
                                          [--dtypes float32,bfloat16] [--ops 12] [--out FILE.json]

For each dtype and (H, B), ``--threads`` torch threads (default 2), interleaved call by call:
- ``fwd_train``: the forward under autograd (activations saved), fastmlstm and nn.LSTM;
- ``fwd_bwd``: forward + gradients of the input and every parameter; ``bwd`` = fwd_bwd - fwd_train;
- ``bwd_gemm_floor``: the backward's GEMMs alone, as MKL runs them with the same shapes: the per-step
  recurrent products (fastmlstm: [B, H] x [H, H] and [B, 4H] x [4H, H]; nn.LSTM: [B, 4H] x [4H, H])
  in a T-step loop (``bwd_recurrent_gemms``), plus the weight-gradient and input-gradient products
  over all T * B rows at once (``bwd_batched_gemms``);
- ``bwd_rest`` = bwd - bwd_gemm_floor: the pointwise cell derivatives, recomputation, copies, and
  what the GEMMs lose by running inside the loop;
- ``fast_fwd_bwd_no_weight_norm``: fastmlstm's fwd_bwd without weight normalization (nn.LSTM has
  none), and ``fast_fwd_bwd_eager_weight_norm`` with the eager formula instead of PyTorch's fused
  kernel (fastmlstm.nn.modules.weight_norm), timed in the same rounds;
- with ``--ops``, ``fast_ops_ms``: fastmlstm's fwd_bwd by operator (torch.profiler, self CPU ms
  per call, the largest ``--ops`` operators): the forward and backward loops, the weight-gradient
  GEMMs, the weight packs, weight normalization's pointwise operators.

The JSON names the package it timed (``package``, as every probe's: ``measure.probe_doc``), so that
runs of two trees, alternated, compare a change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

import fastmlstm  # noqa: E402


def _median_ms(fns: dict, rounds: int) -> dict:
    """Median ms of each callable, calls interleaved round by round (same load for all)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _gemm_floor(T, B, H, I, gates_products, part="all", dtype=torch.float32):
    """The backward's GEMMs with MKL: ``"recurrent"``, the T steps of the per-step products (the
    sequential chain); ``"batched"``, the weight gradients and the input gradient over all T * B rows
    at once (what does not depend on the chain); ``"all"``, both."""
    rows = T * B
    mlstm = len(gates_products) == 2
    def randn(*shape):
        return torch.randn(*shape).to(dtype)

    rec = [(randn(B, k), randn(k, H)) for k in gates_products]
    wg = [(randn(n, rows), randn(rows, k)) for n, k in
          ([(4 * H, H), (H, H), (5 * H, I + 1)] if mlstm else [(4 * H, H), (4 * H, I + 1)])]
    gx = (randn(rows, 5 * H if mlstm else 4 * H), randn(5 * H if mlstm else 4 * H, I))

    def run():
        if part in ("all", "recurrent"):
            for _ in range(T):
                for a, b in rec:
                    torch.mm(a, b)
        if part in ("all", "batched"):
            for a, b in wg:
                torch.mm(a, b)
            torch.mm(*gx)
    return run


def case(H: int, B: int, T: int, I: int, rounds: int, dtype: torch.dtype = torch.float32, ops: int = 0) -> dict:
    torch.manual_seed(0)
    fast = fastmlstm.FastMLSTM(I, H, backend="cpu", dtype=dtype)
    plain = fastmlstm.FastMLSTM(I, H, backend="cpu", dtype=dtype, weight_norm=False)
    lstm = torch.nn.LSTM(I, H, dtype=dtype)
    x = torch.randn(T, B, I).to(dtype).requires_grad_()
    gy = torch.randn(T, B, H).to(dtype)

    def fwd(m):
        return lambda: m(x)[0]

    def fwd_bwd(m):
        params = list(m.parameters())
        return lambda: torch.autograd.grad(m(x)[0], [x, *params], gy)

    t = _median_ms({"fast_fwd_train": fwd(fast), "lstm_fwd_train": fwd(lstm),
                    "fast_fwd_bwd": fwd_bwd(fast), "lstm_fwd_bwd": fwd_bwd(lstm),
                    "fast_fwd_bwd_no_weight_norm": fwd_bwd(plain),
                    "fast_fwd_bwd_eager_weight_norm": _eager_weight_norm(fwd_bwd(fast)),
                    "fast_bwd_gemm_floor": _gemm_floor(T, B, H, I, (H, 4 * H), "all", dtype),
                    "lstm_bwd_gemm_floor": _gemm_floor(T, B, H, I, (4 * H,), "all", dtype),
                    "fast_bwd_recurrent_gemms": _gemm_floor(T, B, H, I, (H, 4 * H), "recurrent", dtype),
                    "lstm_bwd_recurrent_gemms": _gemm_floor(T, B, H, I, (4 * H,), "recurrent", dtype),
                    "fast_bwd_batched_gemms": _gemm_floor(T, B, H, I, (H, 4 * H), "batched", dtype),
                    "lstm_bwd_batched_gemms": _gemm_floor(T, B, H, I, (4 * H,), "batched", dtype)}, rounds)
    out = {"H": H, "B": B, "T": T, "I": I, "dtype": str(dtype).removeprefix("torch."),
           **{k: round(v, 2) for k, v in t.items()}}
    for who in ("fast", "lstm"):
        out[f"{who}_bwd"] = round(t[f"{who}_fwd_bwd"] - t[f"{who}_fwd_train"], 2)
        out[f"{who}_bwd_rest"] = round(out[f"{who}_bwd"] - t[f"{who}_bwd_gemm_floor"], 2)
    for k in ("fwd_train", "fwd_bwd", "bwd", "bwd_gemm_floor", "bwd_rest", "bwd_recurrent_gemms",
              "bwd_batched_gemms"):
        out[f"ratio_{k}"] = round(out[f"fast_{k}"] / out[f"lstm_{k}"], 3)
    if ops:
        out["fast_ops_ms"] = _ops_ms(fwd_bwd(fast), rounds, ops)
    return out


def _eager_weight_norm(fn):
    """``fn`` with fastmlstm's weight norm computed by the eager formula (no fused kernel)."""
    from fastmlstm.nn import modules

    def run():
        fused = modules._fused_weight_norm_applies
        modules._fused_weight_norm_applies = lambda *args: False
        try:
            return fn()
        finally:
            modules._fused_weight_norm_applies = fused
    return run


def _ops_ms(fn, rounds: int, top: int) -> dict:
    """Self CPU milliseconds per call of ``fn``'s largest ``top`` operators (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {e.key: round(e.self_cpu_time_total / 1e3 / rounds, 2) for e in events}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--H", default="512,1024")
    p.add_argument("--B", default="16,64")
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--I", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads (issue 24's targets use 2)")
    p.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16 (the GEMM floors in the same dtype)")
    p.add_argument("--ops", type=int, default=0, help="also profile fastmlstm's fwd+bwd: its N largest operators")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not fastmlstm.backend_status("cpu", "cpu")[0]:
        print("cpu_breakdown.py: the cpu backend is unavailable here", file=sys.stderr)
        return 1
    doc = measure.probe_doc("bench/kernels/cpu_breakdown.py", sys.argv[1:], torch_threads=torch.get_num_threads(),
                            cases=[])
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for d, H, B in itertools.product(args.dtypes.split(","), args.H.split(","), args.B.split(",")):
        doc["cases"].append(case(int(H), int(B), args.T, args.I, args.rounds, dtypes[d], args.ops))
        print(json.dumps(doc["cases"][-1]), flush=True)
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
