"""The kernel lab's CPU breakdown probe (bench/kernels/cpu_breakdown.py) at a tiny shape: every part
it reports is measured, and its per-operator profile names the backend's own operators."""

import json
import sys
from pathlib import Path

import pytest

import fastmlstm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "kernels"))

import cpu_breakdown  # noqa: E402

pytestmark = pytest.mark.skipif(not fastmlstm.backend_status("cpu", "cpu")[0], reason="the cpu backend is unavailable")


def test_the_breakdown_reports_every_part_and_the_backends_operators(tmp_path):
    out = tmp_path / "breakdown.json"
    assert cpu_breakdown.main(["--H", "16", "--B", "2", "--T", "3", "--I", "4", "--rounds", "1", "--threads", "1",
                               "--ops", "40", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["cases"]
    for who in ("fast", "lstm"):
        for part in ("fwd_train", "fwd_bwd", "bwd_gemm_floor", "bwd_recurrent_gemms", "bwd_batched_gemms"):
            assert row[f"{who}_{part}"] > 0, (who, part)
    assert row["fast_fwd_bwd_no_weight_norm"] > 0 and row["fast_fwd_bwd_eager_weight_norm"] > 0
    ops = row["fast_ops_ms"]
    assert 0 < len(ops) <= 40 and all(ms >= 0 for ms in ops.values())
    assert {"fastmlstm_cpu::forward_input", "fastmlstm_cpu::backward_input"} <= set(ops)
