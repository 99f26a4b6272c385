"""The benchmark suite (bench/) cannot rot: the runner works end to end on CPU at a tiny shape and
writes the documented schema, its correctness gate refuses a wrong implementation, its baselines
compute the same cell as fastmlstm, and the benchmark section of docs/benchmarks.md is what
bench/report.py generates from the committed results file it names."""

import errno
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmlstm

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import gate  # noqa: E402
import impls  # noqa: E402
import measure  # noqa: E402
import mlstm_eager  # noqa: E402
import plots  # noqa: E402
import registry  # noqa: E402
import report  # noqa: E402
import run as bench_run  # noqa: E402
import workload  # noqa: E402

TOP_LEVEL = {"device": str, "device_type": str, "torch": str, "triton": str, "date": str, "command": str,
             "results": list, "checks": list, "refused": list, "skipped": list, "ceilings": dict, "tf32": dict}
RECORD = {"impl": str, "mode": str, "dtype": str, "H": int, "B": int, "T": int, "I": int, "median_ms": float,
          "chars_per_s": float, "p10_ms": float, "p90_ms": float, "n_runs": int, "hidden_size": int,
          "params": int, "static_mem_mb": float, "roofline": dict}
# fastmlstm-cpu is timed where the CPU extension builds (everywhere with a C++ compiler).
CPU_IMPLS = ["fastmlstm-cpu", "fastmlstm-cpu-forward"] if fastmlstm.backend_status("cpu", "cpu")[0] else []
TINY_IMPLS = [*CPU_IMPLS, "fastmlstm-reference", "mlstm-eager", "mlstm-compile", "nn-lstm", "nn-lstm-matched"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One subprocess run of the runner at the tiny preset, as a user would type it."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--preset", "tiny", "--out", str(out),
                           "--name", "tiny"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "tiny.json").read_text())


def test_runner_writes_the_documented_schema(tiny_run):
    out, doc = tiny_run
    for key, kind in TOP_LEVEL.items():
        assert isinstance(doc[key], kind), key
    assert "commit" in doc and "cuda" in doc
    assert doc["device_type"] == "cpu" and doc["device"] == measure.cpu_name()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["date"])
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"]["float32"] > 0
    assert all(c["passed"] for c in doc["checks"]) and not doc["refused"] and not doc["errors"]
    assert {c["impl"] for c in doc["checks"]} == {*CPU_IMPLS, "fastmlstm-reference", "mlstm-eager", "mlstm-compile"}
    assert any(s["impl"] == "fastmlstm-triton" for s in doc["skipped"])  # never timed on CPU

    seen = set()
    for r in doc["results"]:
        for key, kind in RECORD.items():
            assert isinstance(r[key], kind) and not isinstance(r[key], bool), (key, r)
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= r["static_mem_mb"] > 0
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert math.isclose(r["chars_per_s"], r["chars"] / (r["median_ms"] * 1e-3), rel_tol=1e-9)
        assert r["roofline"]["flops"] > 0 and r["roofline"]["bytes"] > 0 and r["roofline"]["frac_roofline"] > 0
        seen.add((r["impl"], r["mode"]))
    assert seen == {(i, m) for i in TINY_IMPLS for m in impls.IMPLS[impls.ALIASES.get(i, i)].modes}
    by = {(r["impl"], r["mode"]): r for r in doc["results"]}
    assert by[("mlstm-eager", "fwd")]["chars"] == 2 * 8  # B x T
    assert by[("mlstm-eager", "step")]["chars"] == 2 and by[("mlstm-eager", "step")]["T"] == 1
    feat = by[("fastmlstm-reference", "featurize")]
    assert feat["texts"] == doc["featurize_data"]["n_texts"] == 6 and feat["chars"] == doc["featurize_data"]["bytes"]
    assert by[("nn-lstm-matched", "fwd")]["hidden_size"] == mlstm_eager.matched_lstm_hidden_size(16, 8)

    md = (out / "tiny.md").read_text()
    assert all(i in md for i in TINY_IMPLS) and doc["device"] in md
    assert (out / "tiny-speedup.png").stat().st_size > 1000
    # Every derived file carries where it was measured (Markdown comment, PNG text chunk).
    provenance = json.dumps(report.provenance(doc, "tiny.json"))
    assert md.startswith(f"<!-- provenance: {provenance} -->")
    for png in out.glob("tiny-*.png"):
        assert provenance.encode() in png.read_bytes(), png.name


def _section(text):
    begin = text.index(report.BEGIN)
    return text[text.index("\n", begin) + 1 : text.index(report.END)]


DOC = REPO / "docs" / "benchmarks.md"


def test_report_rewrites_only_the_docs_section(tiny_run, tmp_path):
    out, doc = tiny_run
    target = tmp_path / "benchmarks.md"
    shutil.copy(DOC, target)
    original = target.read_text()
    cmd = [sys.executable, str(BENCH / "report.py"), str(out / "tiny.json"), "--doc", str(target)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    new = target.read_text()
    assert new.count(report.BEGIN) == 1 and new.count(report.END) == 1
    before, after = original.split(report.BEGIN), new.split(report.BEGIN)
    assert before[0] == after[0]  # everything above the section, and the marker itself
    assert original.split(report.END)[1] == new.split(report.END)[1]  # everything below
    assert original.splitlines()[len(before[0].splitlines())] == new.splitlines()[len(after[0].splitlines())]
    section = _section(new)
    assert doc["command"] in section and doc["device"] in section and "tiny.json" in section
    for impl in TINY_IMPLS:
        assert impl in section
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert target.read_text() == new  # a pure function of the results file


def test_report_refuses_a_file_without_the_markers(tmp_path):
    target = tmp_path / "README.md"
    target.write_text("# no benchmark section here\n")
    results = "bench/results/cpu-amd-epyc-family-25-model-1-2-cores-virtualized-2026-11-30.json"
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(REPO / results), "--doc", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "docs/benchmarks.md" in proc.stderr
    assert target.read_text() == "# no benchmark section here\n"


def test_section_links_are_relative_to_the_document():
    doc = json.loads((REPO / "bench/results/cpu-amd-epyc-family-25-model-1-2-cores-virtualized-2026-11-30.json")
                     .read_text())
    json_path = "bench/results/x.json"
    assert "](../bench/results/x.md)" in report.doc_section(doc, json_path, "docs/benchmarks.md")
    assert "](bench/results/x.md)" in report.doc_section(doc, json_path, "README.md")
    assert "--doc docs/benchmarks.md`" in report.doc_section(doc, json_path)


def test_committed_docs_section_is_generated_from_the_committed_results(tmp_path):
    text = DOC.read_text()
    named = re.findall(r"bench/results/[\w.+-]+\.json", _section(text))
    assert named, "docs/benchmarks.md's benchmark section must be generated by bench/report.py from a results file"
    results = REPO / named[0]
    assert results.is_file(), f"{named[0]} is named by docs/benchmarks.md but missing"
    copy = tmp_path / "benchmarks.md"
    copy.write_text(text)
    report.update_doc(copy, json.loads(results.read_text()), named[0], "docs/benchmarks.md")
    assert copy.read_text() == text, "docs/benchmarks.md's benchmark section is stale: run python bench/report.py " \
        + named[0] + " --doc docs/benchmarks.md"


def test_cpu_targets_are_judged_from_the_right_records():
    """The CPU targets on a synthetic document (test inputs, never results)."""
    rs = []
    for H in (256, 512, 1024):
        for B in (16, 64):
            for mode in ("fwd", "fwd+bwd", "featurize", "train"):
                rs += [_record("fastmlstm-cpu", mode, "float32", H, B, 12.0),
                       _record("nn-lstm", mode, "float32", H, B, 10.0),  # 1.2x: within 1.25x
                       _record("nn-lstm-matched", mode, "float32", H, B, 13.0),
                       _record("fastmlstm-cpu", mode, "bfloat16", H, B, 14.0),  # 1.17x its fp32: over 1.1x
                       _record("nn-lstm", mode, "bfloat16", H, B, 20.0)]
            rs.append(_record("fastmlstm-cpu-forward", "featurize", "float32", H, B, 11.5))  # 12 / 11.5: within
    rs += [_record("fastmlstm-cpu", "step", "float32", 512, 1, 0.2), _record("nn-lstm", "step", "float32", 512, 1, 0.1),
           _record("fastmlstm-cpu", "fwd", "float32", 128, 8, 50.0), _record("nn-lstm", "fwd", "float32", 128, 8, 1.0)]
    doc = {"device": "a CPU", "device_type": "cpu", "results": rs,
           "cpu_features": {"vector_extensions": ["avx2"], "onednn_native_bf16": False}}
    judged = {t: (m, s) for t, m, s in report.targets(doc)}
    assert judged[report.CPU_TARGETS[0]][1] == "met"  # 1.2x everywhere on the grid; H=128 is off the grid
    assert "in 24 of 24 cases" in judged[report.CPU_TARGETS[0]][0]
    assert judged[report.CPU_TARGETS[1]][1] == "not applicable"  # no native bf16 nn.LSTM: shown, not judged
    assert judged[report.CPU_TARGETS[2]][1] == "missed"  # 2x nn.LSTM's step
    assert judged[report.CPU_TARGETS[3]][1] == "missed"
    assert judged[report.CPU_TARGETS[4]][1] == "met"
    assert judged[report.CPU_TARGETS[5]][1] == "met"  # 12 <= 13
    assert all(s == "not measured" for t, (_, s) in judged.items() if t in report.GPU_TARGETS)
    doc["cpu_features"]["onednn_native_bf16"] = True
    assert dict((t, s) for t, _, s in report.targets(doc))[report.CPU_TARGETS[1]] == "met"  # 14 <= 1.25 * 20


class _SwappedGates(impls.EagerImpl):
    """A plausible bug: forget and input gates swapped."""

    name = "mlstm-swapped"

    def __init__(self):
        super().__init__(None)
        self.name = "mlstm-swapped"

    def gate_runner(self, ctx):
        def cell(xz, xm, h, c, w_hh, w_hm):
            i, f, o, u = xz.chunk(4, 1)
            return mlstm_eager.mlstm_cell(torch.cat([f, i, o, u], 1), xm, h, c, w_hh, w_hm)
        return lambda x, h0, c0, w: impls.flat(mlstm_eager.mlstm_sequence(x, h0, c0, *w, cell=cell))


def test_the_gate_refuses_a_wrong_implementation(monkeypatch, tmp_path):
    result = gate.check(_SwappedGates(), torch.float32, torch.device("cpu"), {"compile_backend": "eager"})
    assert not result["passed"] and result["max_rel_err"] > 1e-2
    monkeypatch.setitem(impls.IMPLS, "mlstm-swapped", _SwappedGates())
    threads = torch.get_num_threads()
    try:
        code = bench_run.main(["--preset", "tiny", "--impls", "mlstm-swapped,nn-lstm", "--modes", "fwd",
                               "--out", str(tmp_path), "--name", "refused", "--no-plots"])
    finally:
        torch.set_num_threads(threads)  # the tiny preset runs on one thread
    doc = json.loads((tmp_path / "refused.json").read_text())
    assert code == 2
    assert [r["impl"] for r in doc["refused"]] == ["mlstm-swapped"]
    assert {r["impl"] for r in doc["results"]} == {"nn-lstm"}  # timed nothing of the refused one


def test_the_eager_baseline_is_fastmlstms_cell():
    torch.manual_seed(0)
    T, B, I, H = 6, 4, 5, 12
    fast = fastmlstm.FastMLSTM(I, H, weight_norm=True, backend="reference")
    eager = mlstm_eager.EagerMLSTM(I, H)
    eager.load_state_dict(fast.state_dict())  # same parameter names and meaning
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    out_f, (h_f, c_f) = fast(x, (h0[None], c0[None]))
    out_e, (h_e, c_e) = eager(x, (h0, c0))
    torch.testing.assert_close(out_e, out_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_e, c_f[0], rtol=1e-5, atol=1e-6)
    # the masked loop (featurize) stops each row after its length, like fastmlstm's lengths=
    lengths = [6, 1, 3, 0]
    _, (h_f, c_f) = fast(x, (h0[None], c0[None]), lengths=lengths)
    _, (h_e, c_e) = eager(x, (h0, c0), lengths=torch.tensor(lengths))
    torch.testing.assert_close(c_e, c_f[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_e, h_f[0], rtol=1e-5, atol=1e-6)


def test_matched_lstm_has_the_multiplicative_lstms_parameter_count():
    for H, I in ((1024, 64), (4096, 64), (256, 64)):
        Hm = impls.IMPLS["cudnn-lstm-matched"].hidden_size(H, I)
        lstm = torch.nn.LSTM(I, Hm, device="meta")
        n = sum(p.numel() for p in lstm.parameters())
        assert Hm % 8 == 0 and abs(n / mlstm_eager.mlstm_weight_count(H, I) - 1) < 0.01


def test_cost_arithmetic_matches_model_md():
    # MODEL.md: H = 4096, bf16: a step reads 5 H^2 = 83.9 M values = 168 MB; 21.5 GFLOP per step at B = 128.
    # (plus the small input projection: 5 H I weights)
    _, nbytes = workload.cost("mlstm", "step", 4096, 1, 1, 64, 2)
    flops, _ = workload.cost("mlstm", "step", 4096, 128, 1, 64, 2)
    assert 167.7e6 < nbytes < 171e6 and 21.4e9 < flops < 21.9e9
    _, lstm_bytes = workload.cost("lstm", "fwd", 4096, 128, 256, 64, 2)
    _, mlstm_bytes = workload.cost("mlstm", "fwd", 4096, 128, 256, 64, 2)
    assert 1.24 < mlstm_bytes / lstm_bytes < 1.26  # "1.25x the recurrent work"


def test_cost_bytes_count_every_input_and_output_once():
    """workload.cost's rule, its docstring and README's: inputs and outputs once, weights per step."""
    H, I, s = 32, 8, 2
    w_rec, w_in = 5 * H * H, 5 * H * I
    per_row = workload.cost("mlstm", "step", H, 2, 1, I, s)[1] - workload.cost("mlstm", "step", H, 1, 1, I, s)[1]
    assert per_row == s * (I + 2 * H + 2 * H)  # x, h, c read; h, c written (the outputs were not counted)
    weights = workload.cost("mlstm", "fwd+bwd", H, 0, 1, I, s)[1]  # B = 0: the weights' traffic alone
    assert weights == s * (2 * w_rec + 2 * w_in + w_rec + w_in)  # read forward and backward, gradients written


def test_cpu_peak_memory_sees_an_allocation():
    if not measure.cpu_peak_memory_supported():
        pytest.skip("/proc/self/clear_refs is not writable here: the CPU peak is reported as null")
    for _ in range(2):  # the same twice: freed heap memory from the first call must not hide the second
        mb = measure.activation_memory_mb(lambda: torch.ones(64 * measure.MiB // 4), torch.device("cpu"))
        assert 60 < mb < 80


def test_featurize_baselines_compute_the_probe_toolkits_features():
    texts, info = workload.load_texts(20)
    assert len(texts) == info["n_texts"] == 20 and info["bytes"] == sum(len(workload.preprocess(t)) for t in texts)
    assert [b for b, _ in workload.batch_shapes(texts, 8)] == [8, 8, 4]
    torch.manual_seed(0)
    model = fastmlstm.ByteLM(hidden_size=12, embed_size=6, backend="reference")
    eager = mlstm_eager.EagerByteLM(12, 6)
    eager.load_state_dict(model.state_dict())  # same names: embedding, rnn.<weight>_v/_g, bias, readout
    texts = texts[:5] + ["A &amp; B\nline "]
    ours = impls.IMPLS["mlstm-eager"].featurize(eager, texts, 4)
    theirs = torch.as_tensor(impls.IMPLS["fastmlstm-reference"].featurize(model, texts, 4))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _record(impl, mode, dtype, H, B, ms, act=100.0, T=256):
    chars = B * (1 if mode == "step" else T)
    return {"impl": impl, "mode": mode, "dtype": dtype, "H": H, "B": B, "T": T, "I": 64, "median_ms": ms,
            "p10_ms": ms, "p90_ms": ms, "min_ms": ms, "n_runs": 10, "chars": chars, "chars_per_s": chars / ms * 1e3,
            "peak_mem_mb": act + 1, "activation_mem_mb": act, "static_mem_mb": 1.0, "hidden_size": H,
            "params": 1, "roofline": {"frac_roofline": 0.5, "frac_bandwidth": 0.5, "frac_compute": 0.1}}


def test_gpu_targets_are_judged_from_the_right_records(tmp_path):
    """The report's GPU paths (targets, tables, plots) on a synthetic document: no GPU here, and
    the logic must be right before one is lent. These numbers are test inputs, never results."""
    rs = [_record("fastmlstm-triton", "fwd+bwd", "bfloat16", 4096, 128, 100.0, act=140.0),
          _record("cudnn-lstm", "fwd+bwd", "bfloat16", 4096, 128, 110.0, act=100.0),
          _record("mlstm-eager", "fwd+bwd", "bfloat16", 4096, 128, 400.0),
          _record("mlstm-compile", "fwd+bwd", "bfloat16", 4096, 128, 250.0),
          _record("fastmlstm-triton", "fwd+bwd", "bfloat16", 1024, 64, 10.0),
          _record("cudnn-lstm", "fwd+bwd", "float16", 1024, 64, 9.0),
          _record("fastmlstm-triton", "fwd+bwd", "bfloat16", 2048, 128, 40.0),
          _record("cudnn-lstm", "fwd+bwd", "bfloat16", 2048, 128, 45.0),
          _record("fastmlstm-triton", "step", "bfloat16", 4096, 1, 0.060),
          _record("fastmlstm-triton", "train", "bfloat16", 4096, 128, 70.0),
          _record("fastmlstm-cuda", "train", "bfloat16", 4096, 128, 60.0)]
    doc = {"device": "a GPU", "device_type": "cuda", "date": "2000-01-01", "commit": "0" * 40, "dirty": False,
           "torch": "t", "triton": "t", "cuda": "c", "command": "python bench/run.py", "torch_threads": 1,
           "tf32": {"matmul_allow_tf32": False, "cudnn_allow_tf32": True, "applies": True},
           "ceilings": {"copy_GBps": 1.0, "matmul_TFLOPs": {"bfloat16": 1.0}}, "timing_method": "-",
           "memory_method": "-", "checks": [], "refused": [], "skipped": [], "errors": [], "results": rs}
    status = {t: s for t, _, s in report.targets(doc)}
    assert status[report.GPU_TARGETS[0]] == "met"  # 100 <= 110
    assert status[report.GPU_TARGETS[1]] == "missed"  # 4x < 5x
    assert status[report.GPU_TARGETS[2]] == "met"  # 2.5x
    assert status[report.GPU_TARGETS[3]] == "missed"  # 10 > 9 (fp16 cuDNN)
    assert status[report.GPU_TARGETS[4]] == "not measured"
    assert status[report.GPU_TARGETS[5]] == "met"  # 60 us
    assert status[report.GPU_TARGETS[6]] == "met"  # the faster backend: 32768 chars / 60 ms = 546k (70 ms: 468k)
    assert status[report.GPU_TARGETS[7]] == "met"  # 1.4x
    assert all(status[t] == "not measured" for t in report.CPU_TARGETS)
    section = report.doc_section(doc, "bench/results/x.json")
    assert "cudnn-lstm ms" in section and "1.10x" in section and "GPU" in section
    assert "fwd+bwd" in report.markdown(doc, "x.json")
    names = [p.name for p in plots.plots(doc, tmp_path / "x")]
    assert names == ["x-time-vs-H.png", "x-speedup.png"]



# ------------------------------------------------------------------ the harness's own failure modes

COMMITTED = "bench/results/cpu-amd-epyc-family-25-model-1-2-cores-virtualized-2026-11-30.json"


def _main(argv, capsys, monkeypatch):
    """(exit status, stderr) of run.py's main; nothing may be timed (the ceilings come first)."""
    def timed(*args, **kwargs):
        raise AssertionError(f"run.py went on to time {argv}")

    monkeypatch.setattr(bench_run.measure, "measure_ceilings", timed)
    try:
        code = bench_run.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--H", "0"], "'0' is not a positive integer"),  # ran, and recorded a ValueError deep in nn.LSTM
    (["--B", "-1"], "'-1' is not a positive integer"),  # a negative-dimension RuntimeError
    (["--T", "0"], "'0' is not a positive integer"),  # silently ran the preset's T instead
    (["--H", ","], "lists no value"),  # silently ran the preset's grid
    (["--modes", ","], "lists no value"),
    (["--min-runs", "0"], "'0' is not a positive integer"),  # StatisticsError: no median for empty data
    (["--rep-ms", "nan"], "milliseconds >= 0"),
    (["--device", "foo"], "unknown device 'foo'"),  # a RuntimeError traceback from torch.device
    (["--name", "sub/dir"], "must be a file stem without a folder"),  # a traceback after the whole run
    (["--impls", "fastmlstm-cpu-forward"], "fastmlstm-cpu-forward times featurize only"),  # an empty results file
])
def test_bad_arguments_are_one_line_errors_before_anything_is_timed(argv, says, capsys, monkeypatch, tmp_path):
    base = ["--preset", "tiny", "--modes", "fwd", "--out", str(tmp_path), "--no-plots"]
    code, err = _main(base + argv, capsys, monkeypatch)
    assert code in (1, 2) and "Traceback" not in err
    assert says in err.strip().splitlines()[-1], err


def test_an_unwritable_output_folder_is_refused_before_the_run(capsys, monkeypatch, tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("")
    code, err = _main(["--preset", "tiny", "--out", str(a_file / "sub")], capsys, monkeypatch)
    assert code == 1 and err.startswith(f"run.py: --out {a_file / 'sub'}: cannot create the folder"), err


def test_an_implementation_named_twice_is_timed_once(tmp_path):
    """nn-lstm is cudnn-lstm's name on a CPU: both on the command line gave one case two records."""
    argv = ["--preset", "tiny", "--impls", "nn-lstm,cudnn-lstm", "--modes", "fwd", "--out", str(tmp_path),
            "--name", "twice over", "--no-plots", "--min-runs", "1"]
    threads = torch.get_num_threads()
    try:
        assert bench_run.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "twice over.json").read_text())
    assert [(r["impl"], r["mode"]) for r in doc["results"]] == [("nn-lstm", "fwd")]
    assert shlex.split(doc["command"])[2:] == argv  # the recorded command runs again as it was typed


def _full_disk(monkeypatch):
    """Path.write_text writes half of its text, then fails as a full disk does."""
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_failed_write_leaves_the_results_and_the_doc_whole(monkeypatch, tmp_path):
    doc = json.loads((REPO / COMMITTED).read_text())
    markdown = tmp_path / "benchmarks.md"
    shutil.copy(DOC, markdown)
    results = tmp_path / "run.json"
    results.write_text("{}\n")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    args = bench_run.build_parser().parse_args(["--out", str(tmp_path), "--name", "run", "--no-plots"])
    _full_disk(monkeypatch)
    with pytest.raises(OSError):
        report.update_doc(markdown, doc, "bench/results/another.json", "docs/benchmarks.md")
    with pytest.raises(OSError):
        bench_run.write_results(doc, args, torch.device("cpu"))
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before  # old files whole, no temporary left


def test_the_doc_section_cannot_hold_a_marker(tmp_path):
    doc = json.loads((REPO / COMMITTED).read_text())
    doc["command"] += f" {report.END}"  # the next regeneration could not find the section
    copy = tmp_path / "benchmarks.md"
    shutil.copy(DOC, copy)
    with pytest.raises(SystemExit, match="holds a bench marker"):
        report.update_doc(copy, doc, COMMITTED, "docs/benchmarks.md")
    assert copy.read_text() == DOC.read_text()


@pytest.mark.parametrize("content, says", [
    (None, "cannot read a results file"), ('{"results": [', "cannot read a results file"),
    ('{"results": []}', "not a results file of bench/run.py (no device"),
    ("[1, 2]", "not a results file of bench/run.py (no results list)"),
])
def test_report_says_what_is_wrong_with_its_input(content, says, tmp_path):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        report.main([str(path)])
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_report_refuses_a_missing_doc_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--doc .*missing.md: no such file"):
        report.main([str(REPO / COMMITTED), "--doc", str(tmp_path / "missing.md")])


def test_regenerating_the_full_table_keeps_the_presets_judged_targets():
    """``report.py --md`` rewrote a cpu-targets run's .md without the table docs/benchmarks.md copies."""
    stem = "bench/results/cpu-amd-epyc-family-25-model-17-2-cores-virtualized-2026-12-07-fifth"
    doc = json.loads((REPO / f"{stem}.json").read_text())
    assert "## This preset's targets" in report.markdown(doc, Path(stem).name + ".json")
    assert report.markdown(doc, Path(stem).name + ".json") == (REPO / f"{stem}.md").read_text()


def test_the_featurize_heading_says_when_the_texts_were_synthetic():
    doc = json.loads((REPO / COMMITTED).read_text())
    assert "128 preprocessed SST-2 sentences" in report.doc_section(doc, COMMITTED)
    doc["featurize_data"]["source"] = "synthetic (SST-2 data absent): lognormal lengths"
    section = report.doc_section(doc, COMMITTED)
    assert "SST-2 sentences" not in section and "128 synthetic texts with SST-2's lengths" in section


def test_min_runs_wins_over_the_cap_on_calls():
    t = measure.time_calls(lambda: None, torch.device("cpu"), warmup_ms=0, rep_ms=0, min_runs=5, max_runs=3)
    assert t.n_runs == 5


def _ratio_doc(errors):
    """A cpu-targets document: fastmlstm-cpu fwd float32 at 1.0x nn.LSTM, except H=512 B=64 (1.1004x)
    and H=1024 B=64 (no nn.LSTM record); and off the grid, at H=16 (the tiny shape of a quick run)."""
    rs = [_record("fastmlstm-cpu", "fwd", "float32", 16, 2, 30.0), _record("nn-lstm", "fwd", "float32", 16, 2, 10.0)]
    for H, B in ((512, 16), (512, 64), (1024, 16), (1024, 64)):
        rs.append(_record("fastmlstm-cpu", "fwd", "float32", H, B, 11.004 if (H, B) == (512, 64) else 10.0))
        if (H, B) != (1024, 64):
            rs.append(_record("nn-lstm", "fwd", "float32", H, B, 10.0))
    return {"results": rs, "errors": errors}


def test_a_preset_target_with_a_case_that_raised_is_not_met():
    preset = {"grid": {"fwd": [(H, B) for H in (512, 1024) for B in (16, 64)]},
              "ratio_targets": [("fwd <= 1.1x", "fwd", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"), 1.1),
                                ("fwd <= 1.2x", "fwd", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"), 1.2)]}
    error = {"impl": "nn-lstm", "mode": "fwd", "dtype": "float32", "H": 1024, "B": 64, "T": 64, "I": 64,
             "error": "RuntimeError: out of memory"}
    tight, loose = bench_run.judge_targets(_ratio_doc([error]), preset)
    assert tight["met"] is False  # 1.1004x > 1.1 whatever the missing case says
    assert loose["met"] is None and loose["missing"] == [{"H": 1024, "B": 64}]  # was "met" on 3 of 4 cases
    table = "\n".join(report.judged_table([tight, loose]))
    assert "H=512 B=64: 1.1004x" in table  # not "1.10x" beside "missed"
    assert "H=1024 B=64: raised (see Errors) | incomplete: a case raised |" in table
    # without the error the H=1024 B=64 case was deliberately not timed (no nn.LSTM path): judged on the rest;
    # H=16 (3x) is not a case of the preset's grid, which the targets are about
    assert bench_run.judge_targets(_ratio_doc([]), preset)[1]["met"] is True


def test_a_cpu_target_with_a_case_that_raised_is_not_met():
    rs, errors = [], []
    for H in (256, 512, 1024):
        for B in (16, 64):
            for mode in ("fwd", "fwd+bwd", "featurize", "train"):
                rs.append(_record("fastmlstm-cpu", mode, "float32", H, B, 12.0))
                if (mode, H, B) == ("train", 1024, 64):
                    errors.append({"impl": "nn-lstm", "mode": mode, "dtype": "float32", "H": H, "B": B,
                                   "error": "RuntimeError: out of memory"})
                else:
                    rs.append(_record("nn-lstm", mode, "float32", H, B, 9.6 if mode == "fwd+bwd" else 10.0))
    doc = {"device": "a CPU", "device_type": "cpu", "results": rs, "errors": errors}
    measured, status = {t: (m, s) for t, m, s in report.targets(doc)}[report.CPU_TARGETS[0]]
    assert status == "incomplete" and "in 23 of 23 cases; 1 case(s) raised" in measured  # was "met"
    assert "to 1.25x (fwd+bwd" in measured  # exactly at the limit: met, shown as it is
    rs[1]["median_ms"] = 12.0 / 1.2504
    measured, status = {t: (m, s) for t, m, s in report.targets(doc)}[report.CPU_TARGETS[0]]
    assert status == "missed" and "to 1.2504x (fwd float32 H=256 B=16)" in measured  # not "1.25x"


class _BrokenLSTM(impls.LSTMImpl):
    """An implementation that cannot build its case (out of memory, say)."""

    def __init__(self):
        super().__init__(False)
        self.name = "broken-lstm"

    def label(self, device):
        return self.name

    def build(self, case, device, ctx):
        raise RuntimeError("out of memory")


def test_interleaving_goes_on_without_an_implementation_that_raised(monkeypatch):
    case = registry.Case("fwd", "float32", 16, 2, 4, 8)
    ctx = {"compile_backend": "eager", "impl_dtypes": {}, "impl_max_H": {}}
    ceilings = {"copy_GBps": 10.0, "matmul_TFLOPs": {"float32": 0.1}}
    timing = {"warmup_ms": 0, "rep_ms": 0, "min_runs": 3}
    active = [_BrokenLSTM(), impls.IMPLS["cudnn-lstm"], impls.IMPLS["mlstm-eager"]]
    interleaved, real = [], measure.time_interleaved

    def spy(fns, **kwargs):
        interleaved.append(sorted(fns))
        return real(fns, **kwargs)

    monkeypatch.setattr(bench_run.measure, "time_interleaved", spy)
    results, errors, _ = bench_run.time_cases(active, [case], torch.device("cpu"), ctx, ceilings, timing, "a CPU",
                                              interleave=True)
    assert [e["impl"] for e in errors] == ["broken-lstm"]
    assert interleaved == [["cudnn-lstm", "mlstm-eager"]]  # the other two still called in turn
    assert {r["impl"] for r in results} == {"nn-lstm", "mlstm-eager"}
    assert all("interleaved" not in r for r in results)

    def fails(fns, **kwargs):
        raise RuntimeError("a call raised")

    monkeypatch.setattr(bench_run.measure, "time_interleaved", fails)
    results, _, _ = bench_run.time_cases(active[1:], [case], torch.device("cpu"), ctx, ceilings, timing, "a CPU",
                                         interleave=True)
    assert [r["interleaved"] for r in results] == [False, False]  # timed one after another, and saying so
    doc = json.loads((REPO / COMMITTED).read_text())
    doc.update(results=results, errors=[], skipped_cases=[])
    assert "| nn-lstm (not interleaved) |" in report.markdown(doc, "x.json")
