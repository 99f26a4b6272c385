"""The batch-1 generation step on CPU: FastMLSTM.step through the module (no ``weights=``) in each
weight-cache mode and dtype, beside the module's forward with T = 1 (how the step ran before it had
its own path: ``step / forward T=1``), beside the step through the functional step layer by layer
(how it ran before the module kept prepared steps with its cached weights, ``FastMLSTM._prepared_steps``:
``prepared / functional``), and torch.nn.LSTM's single-step call. Backs the figures the README,
docs/backends.md and fastmlstm/weight_cache.py quote for ``FASTMLSTM_WEIGHT_CACHE=strict``.

    python bench/kernels/cpu_step.py [--H 256,512,1024] [--threads 1] [--steps 300] [--out FILE.json]

Calls are interleaved round by round; each figure is the median over rounds of the mean time per
step of a ``--steps``-step loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

import fastmlstm  # noqa: E402
from fastmlstm.nn.modules import FastMLSTM  # noqa: E402
from fastmlstm.nn.weight_cache import ENV_WEIGHT_CACHE  # noqa: E402

I = 64


_PREPARED = FastMLSTM._prepared_steps


def _fast_loop(H: int, dtype: torch.dtype, mode: str, steps: int, prepared: bool = True):
    rnn = fastmlstm.FastMLSTM(I, H, dtype=dtype)
    x = torch.randn(1, I).to(dtype)

    def run():
        os.environ[ENV_WEIGHT_CACHE] = mode
        FastMLSTM._prepared_steps = _PREPARED if prepared else (lambda *args: None)
        state = None
        try:
            with torch.no_grad():
                for _ in range(steps):
                    _, state = rnn.step(x, state)
        finally:
            FastMLSTM._prepared_steps = _PREPARED
    return run


def _forward_loop(H: int, dtype: torch.dtype, steps: int):
    """The step as ``FastMLSTM.step`` ran it before it had its own path: forward with T = 1 (the
    sequence machinery, the same kernel and results)."""
    rnn = fastmlstm.FastMLSTM(I, H, dtype=dtype)
    x = torch.randn(1, 1, I).to(dtype)

    def run():
        os.environ[ENV_WEIGHT_CACHE] = "on"
        state = None
        with torch.no_grad():
            for _ in range(steps):
                _, state = rnn(x, state)
    return run


def _lstm_loop(H: int, steps: int):
    lstm = torch.nn.LSTM(I, H)
    x = torch.randn(1, 1, I)

    def run():
        state = None
        with torch.no_grad():
            for _ in range(steps):
                _, state = lstm(x, state)
    return run


def case(H: int, steps: int, rounds: int) -> dict:
    loops = {f"fastmlstm {dt} cache={mode}": _fast_loop(H, getattr(torch, dt), mode, steps)
             for dt in ("float32", "bfloat16") for mode in ("on", "strict", "off")}
    loops.update({f"fastmlstm {dt} forward T=1": _forward_loop(H, getattr(torch, dt), steps)
                  for dt in ("float32", "bfloat16")})
    loops.update({f"fastmlstm {dt} functional step": _fast_loop(H, getattr(torch, dt), "on", steps, prepared=False)
                  for dt in ("float32", "bfloat16")})
    loops["nn-lstm float32"] = _lstm_loop(H, steps)
    times = {k: [] for k in loops}
    for fn in loops.values():
        fn()  # warm-up: builds, caches, packs
    for _ in range(rounds):
        for name, fn in loops.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    ms = {k: round(statistics.median(v), 4) for k, v in times.items()}
    ratios = {
        "strict / on, float32": round(ms["fastmlstm float32 cache=strict"] / ms["fastmlstm float32 cache=on"], 2),
        "on / nn-lstm, float32": round(ms["fastmlstm float32 cache=on"] / ms["nn-lstm float32"], 2),
        "bfloat16 / float32, cache=on": round(ms["fastmlstm bfloat16 cache=on"] / ms["fastmlstm float32 cache=on"], 2),
        **{f"step / forward T=1, {dt}": round(ms[f"fastmlstm {dt} cache=on"] / ms[f"fastmlstm {dt} forward T=1"], 2)
           for dt in ("float32", "bfloat16")},
        **{f"prepared / functional, {dt}": round(ms[f"fastmlstm {dt} cache=on"] / ms[f"fastmlstm {dt} functional step"],
                                                 2) for dt in ("float32", "bfloat16")},
    }
    return {"H": H, "B": 1, "ms_per_step": ms, "ratios": ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--H", default="256,512,1024")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    saved = os.environ.get(ENV_WEIGHT_CACHE)
    doc = measure.probe_doc("bench/kernels/cpu_step.py", sys.argv[1:], torch_threads=args.threads, cases=[])
    try:
        for H in (int(h) for h in args.H.split(",")):
            doc["cases"].append(case(H, args.steps, args.rounds))
            print(json.dumps(doc["cases"][-1]), flush=True)
    finally:
        if saved is None:
            os.environ.pop(ENV_WEIGHT_CACHE, None)
        else:
            os.environ[ENV_WEIGHT_CACHE] = saved
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
