"""Byte generation on CPU, ByteLM.generate per sampled byte, with one switch on and off in turn:

- ``stream`` (default): the narrow layout for one streamed row (``fastmlstm/ops/cpu/recurrence.py``,
  ``STREAM_MIN_BYTES``: bfloat16 weights read as they are by the plain 16-bit kernel once they are far
  past the last-level cache); off, every layout VNNI where the CPU multiplies bfloat16 natively.
- ``prepared``: each byte through the backend's prepared step (``fastmlstm.ops.prepare_sequence_step``,
  bound once per ``generate`` call); off, through the functional recurrence, as before it.
- ``sampler``: bytes drawn by ``fastmlstm.models.generation.sample_bytes``; off, by ``torch.multinomial``
  on the softmax, as before it (the same bytes for the same seed).

    python bench/kernels/cpu_generate.py [--switch stream|prepared|sampler] [--H 2048,3072,4096]
                                         [--dtype bfloat16] [--bytes 20] [--threads 2] [--rounds 5]
                                         [--out FILE.json]

Per case and round, one ``generate`` of ``--bytes`` bytes after the prefix "\\n " (one sample) with the
switch on and one with it off, each side first in every other round; each figure is the median over
rounds of the time per byte, and ``on / off`` the ratio of medians. ``rule_applies`` (stream): whether
the rule changes the layout at that size; where it does not, both sides run the same code and their
ratio is the spread of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py

import measure  # noqa: E402

import fastmlstm  # noqa: E402
from fastmlstm.models import generation  # noqa: E402
from fastmlstm.models import lm as lm_module  # noqa: E402
from fastmlstm.ops.cpu import recurrence  # noqa: E402

OFF = 1 << 62  # no weights are that large: the rule never applies


def _multinomial(logits, temperature, top_k, generator):
    """How generate drew its bytes before ``sample_bytes``: ``torch.multinomial`` on the probabilities."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(generation.byte_probabilities(logits, temperature, top_k), 1,
                             generator=generator).squeeze(1)


@contextlib.contextmanager
def _swapped(owner, attr: str, value):
    """``owner.attr`` set to ``value`` inside the block, restored after it."""
    before = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, before)


def _switched(name: str, on: bool):
    """The switch ``name`` on (as it is) or off inside the block."""
    if on:
        return contextlib.nullcontext()
    if name == "stream":
        return _swapped(recurrence, "STREAM_MIN_BYTES", OFF)
    if name == "sampler":
        return _swapped(lm_module, "sample_bytes", _multinomial)
    return _swapped(fastmlstm.ops, "prepare_sequence_step", lambda *args: None)


def case(H: int, dtype: torch.dtype, n_bytes: int, rounds: int, switch: str = "stream") -> dict:
    lm = fastmlstm.ByteLM(H, 64, weight_norm=True, backend="cpu").to(dtype)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds + 1):  # round 0 warms up both sides (packs, caches)
        sides = ("on", "off") if r % 2 else ("off", "on")  # each side first in every other round
        for side in sides:
            with _switched(switch, side == "on"):
                t0 = time.perf_counter()
                lm.generate("\n ", n_bytes, seed=r)
                if r:
                    times[side].append((time.perf_counter() - t0) / n_bytes * 1e3)
    ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out = {"H": H, "dtype": str(dtype).replace("torch.", ""), "B": 1, "switch": switch, "ms_per_byte": ms,
           "on_over_off": round(ms["on"] / ms["off"], 3)}
    if switch == "stream":
        layouts = {}
        for side in ("on", "off"):
            with _switched("stream", side == "on"):
                layouts[side] = recurrence.layout(dtype, 1, H)
        out["rule_applies"] = layouts["on"] != layouts["off"]  # False: both sides run the same code
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--switch", choices=("stream", "prepared", "sampler"), default="stream")
    p.add_argument("--H", default="2048,3072,4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--bytes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = measure.probe_doc("bench/kernels/cpu_generate.py", sys.argv[1:] if argv is None else argv,
                            torch_threads=args.threads, stream_min_bytes=recurrence.STREAM_MIN_BYTES, cases=[])
    for H in (int(h) for h in args.H.split(",")):
        doc["cases"].append(case(H, getattr(torch, args.dtype), args.bytes, args.rounds, args.switch))
        print(json.dumps(doc["cases"][-1]), flush=True)
    measure.finish_probe_doc(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
