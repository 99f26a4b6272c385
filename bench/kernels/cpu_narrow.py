"""The narrow layout's kernel (16-bit weights widened in registers, ``small_gemm`` in
csrc/cpu/mlstm_cpu_kernels.h) against the VNNI layout's oneDNN micro-kernels on the same bfloat16
step: the layer's prepared step (``fastmlstm.ops.cpu.layer.prepare_step``) of B rows with each
layout forced, called in turn.

    python bench/kernels/cpu_narrow.py [--H 256,512,1024] [--B 1,4] [--threads 2] [--rounds 9]
                                       [--out FILE.json]

The narrow layout is what float16 weights and, on CPUs without bfloat16 dot products, bfloat16
weights take at batches of at most 4 rows; VNNI (on CPUs with them) is the yardstick, unchanged by
work on the narrow kernel. Each round times a loop of calls per side; figures are medians over rounds.
Needs a CPU that multiplies bfloat16 natively (or ``FASTMLSTM_CPU_BF16=portable``, a slower yardstick).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

from fastmlstm.ops.cpu import layer, recurrence  # noqa: E402

I = 64


def case(H: int, B: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).bfloat16()

    weights = (w(4 * H, I), w(H, I), w(4 * H), w(4 * H, H), w(H, H))  # W_ih, W_im, bias, W_hh, W_hm
    x, h = torch.randn(1, B, I).bfloat16(), torch.zeros(B, H)
    real = layer.layout
    steps = {}
    try:
        for side, lay in (("vnni", recurrence.VNNI), ("narrow", recurrence.NARROW)):
            layer.layout = lambda *args, lay=lay, **kw: lay
            steps[side] = layer.prepare_step(*weights, B)
    finally:
        layer.layout = real
    calls = {side: (lambda step=step: step(x, h, h)) for side, step in steps.items()}
    ms = measure.loop_medians(calls, reps=max(1, 20000 // H), rounds=rounds)
    return {"H": H, "B": B, "dtype": "bfloat16", "ms_per_step": ms, "narrow_over_vnni": round(ms["narrow"] / ms["vnni"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--H", default="256,512,1024")
    p.add_argument("--B", default="1,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = measure.probe_doc("bench/kernels/cpu_narrow.py", sys.argv[1:] if argv is None else argv,
                            torch_threads=args.threads, bf16_gemm=recurrence.bf16_gemm(), cases=[])
    for H in (int(h) for h in args.H.split(",")):
        for B in (int(b) for b in args.B.split(",")):
            doc["cases"].append(case(H, B, args.rounds))
            print(json.dumps(doc["cases"][-1]), flush=True)
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
