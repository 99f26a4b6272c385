"""The kernel lab's host-time probe (bench/kernels/launch_overhead.py) runs the Triton backend's step
loops with every kernel replaced by a stand-in, no GPU needed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "kernels"))

import launch_overhead  # noqa: E402


def test_the_triton_step_loops_launch_two_kernels_per_step_and_measure_their_host_time():
    row = launch_overhead.measure(B=3, H=32, T=6, rounds=1)
    assert row["launches"] == 2 * 6 + 1  # the backward's: two per step and the h0 gradient's
    for direction in ("fwd", "bwd"):
        assert 0 < row[f"{direction}_us_per_launch"] < 1e5
        assert row[f"{direction}_us_per_step"] == pytest.approx(2 * row[f"{direction}_us_per_launch"], abs=0.02)
