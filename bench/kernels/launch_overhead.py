"""Host time of the Triton backend's step loops, fastmlstm's side only: the forward and backward
drivers of ``fastmlstm.ops.triton.recurrence`` run with every kernel replaced by a stand-in that
takes the launch and does nothing, so what is timed is the Python between launches (indexing the
per-step tensors, choosing and binding the launch parameters). Triton's own launch path comes on
top of it; the cost model's ``cpu_launch_us`` covers both together (its value and sources are in
``costmodel.TABLE``), and ``bench/kernels/gpu_check.sh`` measures the whole on a GPU's host.

    python bench/kernels/launch_overhead.py [--shapes 1024x64,4096x128] [--T 200] [--out FILE.json]

No GPU needed: tensors stay on the CPU, and the launch plan is the rule's for an H100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: measure.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure as measure_mod  # noqa: E402
import sweep  # noqa: E402

from fastmlstm.ops.triton import recurrence  # noqa: E402

KERNELS = ("fwd_m_kernel", "fwd_z_kernel", "bwd_h_kernel", "bwd_m_kernel")


class _StandIn:
    """What ``kernel[grid](...)`` needs: accepts any launch and notes when it came."""

    def __init__(self, clock: list):
        self.clock = clock

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.clock.append(time.perf_counter())
        return launch


def _per_launch_us(clock: list) -> float:
    """Median gap between consecutive launches: the host's time per launch in the steady state
    (the buffers each call allocates before its loop are not in it)."""
    return statistics.median(b - a for a, b in zip(clock, clock[1:])) * 1e6


def measure(B: int, H: int, T: int, rounds: int = 5) -> dict:
    """Host microseconds per launch and per step (two launches) of the forward and backward loops,
    the median over ``rounds`` calls of each."""
    bf16 = torch.bfloat16
    proj = torch.zeros(T, B, 5 * H, dtype=bf16)
    w_hh, w_hm = torch.zeros(4 * H, H, dtype=bf16), torch.zeros(H, H, dtype=bf16)
    h0, c0 = torch.zeros(B, H, dtype=bf16), torch.zeros(B, H)
    clock: list = []
    stand_ins = {name: _StandIn(clock) for name in KERNELS}
    per_launch = {"fwd": [], "bwd": []}
    with mock.patch.object(recurrence, "_device_info", lambda device: sweep.REFERENCE_DEVICE), \
            mock.patch.multiple(recurrence, **stand_ins), \
            mock.patch.object(recurrence, "recurrent_weight_grads", lambda *a: (None, None)):
        for _ in range(rounds):
            clock.clear()
            output, _, cells, act = recurrence.forward(proj, w_hh, w_hm, h0, c0, None, True, False)
            per_launch["fwd"].append(_per_launch_us(clock))
            clock.clear()
            recurrence.backward(torch.zeros_like(output), None, None, w_hh, w_hm, h0, c0, None, output, cells, act)
            per_launch["bwd"].append(_per_launch_us(clock))
    row = {"B": B, "H": H, "T": T, "launches": len(clock)}
    for d, values in per_launch.items():
        row[f"{d}_us_per_launch"] = round(statistics.median(values), 2)
        row[f"{d}_us_per_step"] = round(2 * statistics.median(values), 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/kernels/launch_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x64,4096x128", help="comma-separated HxB")
    p.add_argument("--T", type=int, default=200)
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    a = p.parse_args(argv)
    rows = []
    for shape in a.shapes.split(","):
        H, B = (int(v) for v in shape.split("x"))
        rows.append(measure(B, H, a.T))
        print(f"H={H} B={B}: forward {rows[-1]['fwd_us_per_launch']} us per launch, backward "
              f"{rows[-1]['bwd_us_per_launch']} us per launch (two launches per step)")
    if a.out:
        command = "python bench/kernels/launch_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
        doc = {"machine": measure_mod.cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
               "commit": measure_mod.git_commit(), "date": datetime.date.today().isoformat(), "command": command,
               "rows": rows}
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
