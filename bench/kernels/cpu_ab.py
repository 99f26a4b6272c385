"""Interleaved A/B of one of the CPU backend's internal switches, at the layer operators.

    python bench/kernels/cpu_ab.py --switch k-split|buffer-cache|bf16-xm|weight-grad [--H 512,1024] [--B 16,64]
                                   [--dtypes float32,bfloat16] [--T 64] [--threads 2] [--rounds 7]
                                   [--out FILE.json]

Switches (the "off" side is the behaviour before the change):

- ``k-split``: the tile GEMMs' long K ranges in pieces (``csrc/cpu/driver.h``, ``k_piece``), off:
  every K range whole.
- ``buffer-cache``: the saved activations from the buffer cache (``csrc/cpu/buffer_cache.cpp``),
  off: ``FASTMLSTM_CPU_CACHE_MB=0``, fresh memory each call.
- ``bf16-xm``: with VNNI weights, the inputs' xm = x Wmx^T as a bfloat16 GEMM (``csrc/cpu/forward.cpp``),
  off: a float32 GEMM of float32 copies (bfloat16 cases only).
- ``weight-grad``: the backward's float32 GEMMs beside the time loop as oneDNN micro-kernel tiles
  (``csrc/cpu/gemm.cpp``): the weight gradients (the input weights' and the bias's from the same
  transposed slices as the recurrent one's) and x's gradient (the forward's xm is tiles either way
  since 2026-12-07; it was switched too before); off: MKL's
  GEMMs on the operands as they are (float32 cases: bfloat16 with VNNI weights takes bfloat16 GEMMs
  either way).

Per case, the operators ``layer_forward`` (inference, and training: saving for backward) and
``layer_backward`` are timed with the switch on and off in turn, round by round, in one process;
each call runs twice in a row and the second is timed (the steady state of each side: a warm buffer
cache on one, fresh memory on the other); each figure is the median over rounds, and ``on / off``
is the ratio of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

from fastmlstm.ops.cpu import buffer_cache, layer, recurrence  # noqa: E402

I = 64


@contextlib.contextmanager
def _switch(name: str, on: bool):
    if name == "bf16-xm":
        real = layer._packed
        if not on:  # Wmx^T packed as for float32 GEMMs, which forward_input then multiplies in float32
            layer._packed = lambda w, kind, lay=recurrence.FLOAT32, *rest: real(
                w, kind, recurrence.FLOAT32 if kind == "xm" else lay, *rest)
        try:
            yield
        finally:
            layer._packed = real
        return
    if name == "weight-grad":
        with recurrence.forced_weight_grad_gemm("tiles" if on else "mkl"):
            yield
        return
    if name == "k-split":
        with contextlib.nullcontext() if on else recurrence.forced_k_split(1 << 40, 4096):
            yield
        return
    saved = os.environ.get(buffer_cache.ENV_CACHE_MB)
    if not on:
        os.environ[buffer_cache.ENV_CACHE_MB] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(buffer_cache.ENV_CACHE_MB, None)
        else:
            os.environ[buffer_cache.ENV_CACHE_MB] = saved
        buffer_cache.empty_cache()


def _inputs(T: int, B: int, H: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    zeros = torch.zeros(B, H)
    return dict(x=w(T, B, I) * I ** 0.5, weight_ih=w(4 * H, I), weight_im=w(H, I), bias=w(4 * H),
                weight_hh=w(4 * H, H), weight_hm=w(H, H), h0=zeros, c0=zeros, grad=w(T, B, H) * H ** 0.5)


def case(switch: str, T: int, B: int, H: int, dtype: torch.dtype, rounds: int) -> dict:
    a = _inputs(T, B, H, dtype)
    args = (a["x"], a["weight_ih"], a["weight_im"], a["bias"], a["weight_hh"], a["weight_hm"], a["h0"], a["c0"], None)
    saved = layer.layer_forward(*args, True, False)

    calls = {
        "fwd": lambda: layer.layer_forward(*args, False, False),
        "fwd-train": lambda: layer.layer_forward(*args, True, False),
        "bwd": lambda: layer.layer_backward(a["grad"], None, None, a["x"], a["weight_ih"], a["weight_im"],
                                            a["weight_hh"], a["weight_hm"], a["h0"], a["c0"], None, saved[0],
                                            saved[2], saved[3]),
    }
    times: dict[str, list[float]] = {}
    for r in range(rounds + 1):  # round 0 warms up both sides
        for on in (False, True):
            with _switch(switch, on):
                for name, call in calls.items():
                    call()  # steady state on each side: a warm cache, blocks sized, kernels created
                    t0 = time.perf_counter()
                    call()
                    if r:
                        times.setdefault(f"{name} {'on' if on else 'off'}", []).append(
                            (time.perf_counter() - t0) * 1e3)
    ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
    ratios = {name: round(ms[f"{name} on"] / ms[f"{name} off"], 3) for name in calls}
    return {"H": H, "B": B, "T": T, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "on_over_off": ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--switch", choices=("k-split", "buffer-cache", "bf16-xm", "weight-grad"), required=True)
    p.add_argument("--H", default="512,1024")
    p.add_argument("--B", default="16,64")
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if min(args.T, args.threads, args.rounds) < 1:
        p.error("--T, --threads and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    doc = measure.probe_doc("bench/kernels/cpu_ab.py", sys.argv[1:], switch=args.switch,
                            torch_threads=args.threads, cases=[])
    for dtype, H, B in itertools.product(args.dtypes.split(","), _ints(args.H), _ints(args.B)):
        doc["cases"].append(case(args.switch, args.T, B, H, getattr(torch, dtype), args.rounds))
        print(json.dumps(doc["cases"][-1]), flush=True)
    measure.finish_probe_doc(doc, args.out)
    return 0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


if __name__ == "__main__":
    sys.exit(main())
