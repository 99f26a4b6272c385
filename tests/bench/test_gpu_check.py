"""bench/kernels/gpu_check.sh, the one command for the first GPU, works before any GPU has run it: its dry
run prints the plan, the validation order of the kernels no CPU can run (first, before any timing),
the configurations and the predictions (CI runs it here), it refuses to run without a GPU, and its
Python stages' code paths (the parity of the candidates, the gated sweep writing the tuned table)
run under Triton's interpreter at a tiny shape."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ON_GPU

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "kernels" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "bench" / "kernels"))

import gpu_check  # noqa: E402
import sweep  # noqa: E402

from fastmlstm.ops.triton import configs  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_dry_run_prints_the_plan_configurations_and_predictions(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    positions = [text.index(f"{i}. {stage}:") for i, stage in enumerate(("parity", "tests", "ceilings", "sweep",
                                                                        "bench"), 1)]
    assert positions == sorted(positions)
    assert "stages to run, in this order: parity tests ceilings sweep bench" in text
    # The validation order: every candidate the rule allows at each target, then the generation graph.
    order = text[text.index("== validation order"):text.index("== sweep candidates")]
    assert "1. bfloat16 H=4096 B=128: cluster --" in order
    assert "3. bfloat16 H=1024 B=64: stationary, cluster, graph --" in order
    assert "6. generate-graph bfloat16 H=1024 B=64" in order
    assert "tests/ops/test_dispatch.py tests/ops/test_graphs.py" in text
    assert "tests/ops/test_cuda.py" in text and "--preset gpu-targets" in text
    assert "-- bfloat16 H=4096 B=128" in text and "fwd_m  rule 128/128/64/8/4/" in text
    assert "| H100-SXM | bf16 | 4096 | 128 | fwd |" in text and "| H200 | bf16 | 4096 | 1 | bwd |" in text
    assert (tmp_path / "out" / "plan.txt").read_text() == text


@needs_bash
def test_usage_errors(tmp_path):
    for args in ([], ["--bogus", str(tmp_path)], [str(tmp_path), str(tmp_path / "b")], ["--only", "parity,nope", "x"],
                 [str(tmp_path), "--only"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 2 and "usage" in proc.stderr


@needs_bash
@pytest.mark.skipif(ON_GPU, reason="checks the refusal on a machine without a GPU")
def test_refuses_to_run_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "no CUDA GPU here" in proc.stderr


@pytest.mark.skipif(ON_GPU, reason="the interpreter run; a GPU runs the real sweep in gpu_check.sh")
def test_sweep_writes_a_tuned_table_the_dispatcher_accepts(tmp_path):
    table = tmp_path / "tuned.py"
    shutil.copy(REPO / "fastmlstm" / "ops" / "triton" / "tuned.py", table)
    entries = gpu_check.sweep(tmp_path / "out", targets=(("bfloat16", 24, 3),), T=2, reps=1, max_candidates=2,
                              table_path=table)
    assert len(entries) == 1 and entries[0]["H"] == 24 and entries[0]["B"] == 3
    scope = {}
    exec(table.read_text(), scope)
    assert scope["ENTRIES"] == entries and (tmp_path / "out" / "tuned.py").read_text() == table.read_text()
    assert scope["__doc__"].startswith("Launch configurations measured on GPUs")
    sweep.check_entry(scope["ENTRIES"][0])
    # A second sweep of the same shape replaces its entry; others stay.
    other = dict(entries[0], H=48)
    merged = gpu_check.merge([other, entries[0]], [dict(entries[0], step_us={"fwd": 1.0, "bwd": 2.0})])
    assert [e["H"] for e in merged] == [48, 24] and merged[1]["step_us"] == {"fwd": 1.0, "bwd": 2.0}


def test_a_refused_candidate_is_never_chosen(monkeypatch):
    """The gate compares with the reference backend; a wrong kernel fails it."""
    job = (("float32", 20, 3), 2, "fwd_m", configs.INTERPRETER_CONFIG.as_dict())
    assert gpu_check.gate(job)["passed"]
    monkeypatch.setattr(gpu_check, "_rel_diff", lambda values, reference: 1.0)
    assert not gpu_check.gate(job)["passed"]
    assert torch.isfinite(torch.tensor(gpu_check.GATE["bfloat16"]))


@pytest.mark.skipif(ON_GPU, reason="the interpreter run; a GPU runs the real parity stage in gpu_check.sh")
def test_the_parity_stage_checks_each_candidate_and_records_where_and_when(tmp_path, monkeypatch):
    """The parity stage on a stand-in device: the graphed step loop (the capture's CPU stand-in)
    against the interpreter's per-step path and float64, a candidate that is not registered named
    as such, and the results file with the device, versions, commit and date."""
    from fastmlstm.ops import verdicts
    from fastmlstm.ops.triton import dispatch, graphs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(graphs, "MIN_T", 1)  # graphs at the interpreter's few steps
    monkeypatch.setattr(verdicts, "BOUND_S", verdicts.BOUND_S)  # the stage sets its own bound
    monkeypatch.setattr(dispatch, "CASES", ((2, True, True),))
    monkeypatch.setattr(dispatch, "TIMING_T", 1)
    monkeypatch.setattr(dispatch, "_CANDIDATES", {})
    monkeypatch.setattr(dispatch, "_LOADED", [False])
    dispatch.reset()
    site = verdicts.Site(torch.device("cpu"), "Test GPU", (8, 0), 8, "driver-t", "runtime-t")
    report = gpu_check.parity(tmp_path / "out", targets=[("float32", 16, 2, ("graph", "nonexistent"))], site=site,
                              generation=False)
    stored = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert stored == json.loads(json.dumps(report))
    graph, missing = stored["checks"]
    assert graph["candidate"] == "graph" and graph["status"] == "passed", graph.get("reason")
    assert 0 <= graph["margin"] <= 1 and set(graph["step_ms"]) == {"forward", "backward"}
    assert missing["status"] == "not registered" and graphs._CACHE.captures > 0  # the graphs did run
    graphs.clear()
    where = stored["provenance"]
    assert where["device"] == "Test GPU" and where["driver"] == "driver-t"
    assert {"date", "commit", "torch", "triton", "fastmlstm"} <= set(where) and where["commit"]
    # The verdict went to the cache the later stages read.
    assert len(list((tmp_path / "cache" / "fastmlstm" / "kernels").glob("graph-*.json"))) == 1
    dispatch.reset()
