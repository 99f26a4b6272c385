"""The CPU backend's weight packs (``pack_weight`` in csrc/cpu/pack.cpp): the time of each pack a
training step makes, since every step changes the weights: the forward's gate weight [Wh | Wx]
and Wmh, the backward's transposed Wh and Wmh.

    python bench/kernels/cpu_pack.py [--H 512,1024] [--dtypes float32,bfloat16] [--threads 2]
                                     [--rounds 7] [--out FILE.json]

Each dtype is packed in the layout a training step gives it here (``recurrence.layout``: for
bfloat16, VNNI on CPUs that multiply bfloat16 natively, else float32). Each round times a loop of calls per pack
(`measure.loop_medians`); figures are medians over rounds, in ms. The JSON names the package it timed (``package``), so runs of
two trees side by side can be told apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

from fastmlstm.ops.cpu import recurrence  # noqa: E402

I = 64


def case(H: int, dtype: torch.dtype, rounds: int) -> dict:
    ops = recurrence._ops()
    layout = recurrence.layout(dtype, 64, H, I, backward=True)  # as a training step packs them
    g = torch.Generator().manual_seed(0)
    w_hh, w_ih, w_hm = (torch.randn(*s, generator=g).to(dtype) for s in ((4 * H, H), (4 * H, I), (H, H)))
    packs = {
        "gates": lambda: ops.pack_weight(w_hh, True, layout, w_ih, False, recurrence.column_block("hh")),
        "hm": lambda: ops.pack_weight(w_hm, False, layout, None, False, recurrence.column_block("hm")),
        "hh_t": lambda: ops.pack_weight(w_hh, False, layout, None, True, recurrence.column_block("hh_t")),
        "hm_t": lambda: ops.pack_weight(w_hm, False, layout, None, True, recurrence.column_block("hm_t")),
    }
    ms = measure.loop_medians(packs, reps=max(2, 4096 // H), rounds=rounds)
    return {"H": H, "I": I, "dtype": str(dtype).removeprefix("torch."), "layout": layout, "ms": ms,
            "total_ms": round(sum(ms.values()), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--H", default="512,1024")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = measure.probe_doc("bench/kernels/cpu_pack.py", sys.argv[1:] if argv is None else argv,
                            torch_threads=args.threads, kernel_isa=recurrence.kernel_isa(), cases=[])
    for H in (int(h) for h in args.H.split(",")):
        for name in args.dtypes.split(","):
            doc["cases"].append(case(H, getattr(torch, name), args.rounds))
            print(json.dumps(doc["cases"][-1]), flush=True)
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
