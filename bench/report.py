"""Tables, plots and the benchmark section of docs/benchmarks.md from a results file of bench/run.py.

    python bench/report.py bench/results/<file>.json --doc docs/benchmarks.md   # regenerate the docs section
    python bench/report.py bench/results/<file>.json --md --plots               # rewrite the .md and PNGs beside it

The section is the text between the line holding ``<!-- bench:begin`` and the line holding
``<!-- bench:end -->`` of the Markdown file given with ``--doc``; both marker lines are kept and
nothing outside them changes. The section is a pure function of the results file and of where the
document lives (its links are relative to the document's folder), so regenerating it twice gives
the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench:begin"
END = "<!-- bench:end -->"
MODE_ORDER = ("fwd", "fwd+bwd", "step", "featurize", "train")
IMPL_ORDER = ("fastmlstm-triton", "fastmlstm-cuda", "fastmlstm-cpu", "fastmlstm-cpu-forward", "fastmlstm-reference",
              "mlstm-eager", "mlstm-compile", "mlstm-compile-unrolled", "cudnn-lstm", "cudnn-lstm-matched", "nn-lstm", "nn-lstm-matched")
DTYPE_ORDER = ("float32", "bfloat16", "float16")
MODE_UNITS = {"fwd": "B x T", "fwd+bwd": "B x T", "step": "B", "featurize": "text bytes", "train": "B x T"}


# ------------------------------------------------------------------------------------------ helpers

def write_atomic(path: Path, content) -> None:
    """``content`` (text, or a function writing the file it is given) into a file beside ``path``, then
    renamed over it: a crash or a full disk leaves the old file whole, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        tmp.write_text(content) if isinstance(content, str) else content(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def baseline_name(doc: dict) -> str:
    return "cudnn-lstm" if doc.get("device_type") == "cuda" else "nn-lstm"


def _order(values, order):
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def _ms(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def beside_limit(value: float, limit: float, *, at_most=True, digits=2, unit="x", scale=1) -> str:
    """``value * scale`` with ``digits`` decimals, or more, so that it passes or fails ``limit`` (a lower
    bound unless ``at_most``) as the value does: 1.2503 against <= 1.25 reads 1.2503x, not 1.25x."""
    shown_limit, side = round(limit * scale, 9), value <= limit if at_most else value >= limit
    for d in range(digits, digits + 8):
        text = f"{value * scale:.{d}f}"
        if (float(text) <= shown_limit if at_most else float(text) >= shown_limit) == side:
            break
    return text + unit


def _mem(x) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def index(doc: dict) -> dict:
    """(mode, dtype, H, B) -> {impl: record}."""
    table = defaultdict(dict)
    for r in doc["results"]:
        table[(r["mode"], r["dtype"], r["H"], r["B"])][r["impl"]] = r
    return table


def _cases(doc: dict, mode: str):
    keys = {(r["mode"], r["dtype"], r["H"], r["B"]) for r in doc["results"] if r["mode"] == mode}
    return sorted(keys, key=lambda k: (DTYPE_ORDER.index(k[1]) if k[1] in DTYPE_ORDER else 9, k[2], k[3]))


def _impls(doc: dict, mode: str | None = None):
    return _order({r["impl"] for r in doc["results"] if mode is None or r["mode"] == mode}, IMPL_ORDER)


def _fastest_fastmlstm(row: dict):
    """The fastest fastmlstm record of a row (not the bare-forward floor, which is not featurize)."""
    cands = [r for name, r in row.items() if name.startswith("fastmlstm-") and not name.endswith("-forward")]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def _commit(doc: dict) -> str:
    c = (doc.get("commit") or "unknown")[:10]
    if not doc.get("dirty"):
        return c
    modified = doc.get("modified") or []
    shown = ", ".join(modified[:3]) + (f" and {len(modified) - 3} more" if len(modified) > 3 else "")
    return f"{c} + uncommitted changes" + (f" to {shown}" if shown else "")


def _device_line(doc: dict) -> str:
    return f"{doc['device']} ({'GPU' if doc.get('device_type') == 'cuda' else 'CPU'})"


# ------------------------------------------------------------------------------------------ targets

def _fast(doc, mode, dtype, H, B):
    gpu = ("fastmlstm-triton", "fastmlstm-cuda")
    return _fastest_fastmlstm({i: r for i, r in index(doc).get((mode, dtype, H, B), {}).items() if i in gpu})


GPU_TARGETS = (
    "fwd+bwd bf16 H=4096 B=128: time <= cudnn-lstm",
    "fwd+bwd bf16 H=4096 B=128: >= 5x faster than mlstm-eager",
    "fwd+bwd bf16 H=4096 B=128: >= 2x faster than mlstm-compile",
    "fwd+bwd H=1024 B=64: bf16 time <= cudnn-lstm fp16 time",
    "featurize H=4096: >= 2,500,000 chars/s",
    "step bf16 H=4096 B=1: <= 61 us",
    "train bf16 H=4096 B=128: >= 500,000 chars/s",
    "memory fwd+bwd bf16 H=4096 B=128: activation memory <= 1.5x cudnn-lstm's",
)
CPU_TARGETS = (
    "CPU fp32 fwd, fwd+bwd, featurize, train, H 256-1024, B 16/64: time <= 1.25x nn-lstm",
    "CPU bf16, the same cases: time <= 1.25x nn-lstm (where nn.LSTM has a native bf16 path)",
    "CPU step B=1 through the module (no weights=): time <= nn-lstm's single-step call",
    "CPU bf16 time <= 1.1x fastmlstm's own fp32 time, every case",
    "CPU featurize: time <= 1.1x the bare forward over the same batches (fastmlstm-cpu-forward)",
    "CPU moonshot: time <= nn-lstm-matched (the same parameter count), every case",
)


def _gpu_targets(doc: dict) -> list[tuple[str, str, str]]:
    out = []

    def judge(name, fast, other, ok_fn, text_fn):
        unmeasured = (name, "not measured", "not measured")
        out.append(unmeasured if fast is None or other is False else (name, text_fn(), "met" if ok_fn() else "missed"))

    f = _fast(doc, "fwd+bwd", "bfloat16", 4096, 128)
    for name, other, factor in zip(GPU_TARGETS[:3], ("cudnn-lstm", "mlstm-eager", "mlstm-compile"), (1.0, 5.0, 2.0)):
        o = index(doc).get(("fwd+bwd", "bfloat16", 4096, 128), {}).get(other)
        judge(name, f, o or False, lambda o=o, factor=factor: o["median_ms"] >= factor * f["median_ms"],
              lambda o=o, factor=factor: f"{f['impl']} {_ms(f['median_ms'])} ms vs {_ms(o['median_ms'])} ms "
                          f"({beside_limit(o['median_ms'] / f['median_ms'], factor, at_most=False)})")
    f = _fast(doc, "fwd+bwd", "bfloat16", 1024, 64)
    o = index(doc).get(("fwd+bwd", "float16", 1024, 64), {}).get("cudnn-lstm")
    judge(GPU_TARGETS[3], f, o or False, lambda: f["median_ms"] <= o["median_ms"],
          lambda: f"{f['impl']} {_ms(f['median_ms'])} ms vs {_ms(o['median_ms'])} ms")
    feats = [r for r in doc["results"] if r["impl"] in ("fastmlstm-triton", "fastmlstm-cuda")
             and r["mode"] == "featurize" and r["H"] == 4096]
    f = max(feats, key=lambda r: r["chars_per_s"]) if feats else None
    judge(GPU_TARGETS[4], f, None, lambda: f["chars_per_s"] >= 2.5e6,
          lambda: f"{f['impl']} {f['dtype']} B={f['B']}: {f['chars_per_s']:,.0f} chars/s")
    f = _fast(doc, "step", "bfloat16", 4096, 1)
    judge(GPU_TARGETS[5], f, None, lambda: f["median_ms"] <= 0.061,
          lambda: f"{f['impl']} {beside_limit(f['median_ms'], 0.061, digits=1, unit=' us', scale=1e3)}")
    f = _fast(doc, "train", "bfloat16", 4096, 128)
    judge(GPU_TARGETS[6], f, None, lambda: f["chars_per_s"] >= 5e5,
          lambda: f"{f['impl']} {f['chars_per_s']:,.0f} chars/s")
    f = _fast(doc, "fwd+bwd", "bfloat16", 4096, 128)
    o = index(doc).get(("fwd+bwd", "bfloat16", 4096, 128), {}).get("cudnn-lstm")
    ok = f is not None and o is not None and f["activation_mem_mb"] is not None and bool(o["activation_mem_mb"])
    judge(GPU_TARGETS[7], f, o if ok else False, lambda: f["activation_mem_mb"] <= 1.5 * o["activation_mem_mb"],
          lambda: f"{f['impl']} {_mem(f['activation_mem_mb'])} MiB vs {_mem(o['activation_mem_mb'])} MiB "
                  f"({beside_limit(f['activation_mem_mb'] / o['activation_mem_mb'], 1.5)})")
    return out


def _judge_ratios(name: str, pairs: list, limit: float, applies: bool = True, why_not: str = "",
                  raised: int = 0) -> tuple:
    """(target, measured, status) for time ratios fast/other <= limit over (fast, other) pairs;
    ``raised`` cases of the target raised instead of being timed, so it cannot be met."""
    lost = f"; {raised} case(s) raised (see the Errors of the full table)" if raised else ""
    if not pairs:
        return (name, f"not measured: {why_not}", "not applicable") if not applies else \
            (name, "not measured" + lost, "incomplete" if raised else "not measured")
    ratios = sorted(((f["median_ms"] / o["median_ms"], f) for f, o in pairs), key=lambda t: t[0])
    met = sum(q <= limit for q, _ in ratios)
    where = "{mode} {dtype} H={H} B={B}".format_map
    (best_q, best), (worst_q, worst) = ratios[0], ratios[-1]
    timed = "/".join(_order({f["impl"] for _, f in ratios}, IMPL_ORDER))
    text = (f"{timed} time / other: {beside_limit(best_q, limit)} ({where(best)}) to "
            f"{beside_limit(worst_q, limit)} ({where(worst)}); within {limit:g}x in {met} of {len(ratios)} cases"
            + lost)
    if not applies:
        return name, f"{text}; {why_not}", "not applicable"
    return name, text, "missed" if met < len(ratios) else "incomplete" if raised else "met"


def _cpu_targets(doc: dict) -> list[tuple[str, str, str]]:
    table = index(doc)
    seq_modes = ("fwd", "fwd+bwd", "featurize", "train")
    grid = {(H, B) for H in (256, 512, 1024) for B in (16, 64)}

    def cpu_fast(row):  # the CPU path's record in a row: fastmlstm-cpu, else the fastest other fastmlstm backend
        return row.get("fastmlstm-cpu") or _fastest_fastmlstm(row)

    def pairs(modes, dtype, other, on_grid=True):
        out = []
        for (mode, dt, H, B), row in table.items():
            if mode in modes and dt == dtype and (not on_grid or (H, B) in grid):
                f = cpu_fast(row)
                if f is not None and other in row:
                    out.append((f, row[other]))
        return out

    def raised(modes, dtypes, other, shapes=None, B=None):  # cases that raised for fastmlstm-cpu or other
        return len({(e["mode"], e["dtype"], e["H"], e["B"]) for e in doc.get("errors") or ()
                    if e["mode"] in modes and e["dtype"] in dtypes and e["impl"] in ("fastmlstm-cpu", other)
                    and (shapes is None or (e["H"], e["B"]) in shapes) and (B is None or e["B"] == B)})

    native_bf16 = (doc.get("cpu_features") or {}).get("onednn_native_bf16")
    self_pairs = []
    for (mode, dt, H, B), row in table.items():
        fp32 = table.get((mode, "float32", H, B), {})
        if dt == "bfloat16" and cpu_fast(row) and cpu_fast(fp32):
            self_pairs.append((cpu_fast(row), cpu_fast(fp32)))
    return [
        _judge_ratios(CPU_TARGETS[0], pairs(seq_modes, "float32", "nn-lstm"), 1.25,
                      raised=raised(seq_modes, ("float32",), "nn-lstm", shapes=grid)),
        _judge_ratios(CPU_TARGETS[1], pairs(seq_modes, "bfloat16", "nn-lstm"), 1.25, native_bf16 is not False,
                      "nn.LSTM has no native bfloat16 path on this CPU (oneDNN without AVX-512 BF16)",
                      raised=raised(seq_modes, ("bfloat16",), "nn-lstm", shapes=grid)),
        _judge_ratios(CPU_TARGETS[2], [p for dt in DTYPE_ORDER for p in pairs(("step",), dt, "nn-lstm", False)
                                       if p[0]["B"] == 1], 1.0, raised=raised(("step",), DTYPE_ORDER, "nn-lstm", B=1)),
        _judge_ratios(CPU_TARGETS[3], self_pairs, 1.1, raised=raised(MODE_ORDER, ("float32", "bfloat16"), None)),
        _judge_ratios(CPU_TARGETS[4], [p for dt in DTYPE_ORDER
                                       for p in pairs(("featurize",), dt, "fastmlstm-cpu-forward")], 1.1,
                      raised=raised(("featurize",), DTYPE_ORDER, "fastmlstm-cpu-forward", shapes=grid)),
        _judge_ratios(CPU_TARGETS[5], [p for dt in DTYPE_ORDER for p in pairs(seq_modes, dt, "nn-lstm-matched")],
                      1.0, raised=raised(seq_modes, DTYPE_ORDER, "nn-lstm-matched", shapes=grid)),
    ]


def targets(doc: dict) -> list[tuple[str, str, str]]:
    """(target, measured, status) for every target; a CPU file cannot judge the GPU ones and a GPU
    file cannot judge the CPU ones."""
    if doc.get("device_type") == "cuda":
        return _gpu_targets(doc) + [(t, "not measured (GPU results)", "not measured") for t in CPU_TARGETS]
    return [(t, "not measured (CPU results)", "not measured") for t in GPU_TARGETS] + _cpu_targets(doc)


# ------------------------------------------------------------------------------------------ markdown

def _pivot(doc: dict, mode: str, impls: list[str]) -> list[str]:
    base = baseline_name(doc)
    head = ["dtype", "H", "B"] + [f"{i} ms" for i in impls] + ["fastmlstm chars/s", f"fastmlstm vs {base}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = index(doc)
    for key in _cases(doc, mode):
        row = table[key]
        cells = [key[1], str(key[2]), str(key[3])]
        cells += [_ms(row[i]["median_ms"]) if i in row else "-" for i in impls]
        f = _fastest_fastmlstm(row)
        cells.append(_rate(f["chars_per_s"]) if f else "-")
        cells.append(f"{row[base]['median_ms'] / f['median_ms']:.2f}x" if f and base in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets_table(doc: dict, measurable_only: bool = False) -> list[str]:
    """The targets table; ``measurable_only`` leaves out those this kind of device cannot judge."""
    lines = ["| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {s} |" for t, m, s in targets(doc)
              if not (measurable_only and m.startswith("not measured ("))]
    return lines


def judged_table(judged: list[dict]) -> list[str]:
    """The preset's targets as bench/run.py judged them (``targets_judged``), each case's ratio or
    fraction shown on the side of the limit it was judged on."""
    lines = ["", "## This preset's targets (judged by bench/run.py)", "",
             "| target | cases (H, B: ratio or fraction) | status |", "|---|---|---|"]
    for t in judged:
        cells = [(f"{c['dtype']} " if "dtype" in c else "") + f"H={c['H']} B={c['B']}: "
                 + (beside_limit(c["ratio"], t["limit"]) if "ratio" in c else
                    beside_limit(c["fraction"], t["limit"], at_most=False, digits=0, unit="%", scale=100)
                    if "fraction" in c else "raised (see Errors)") for c in t["cases"] + t.get("missing", [])]
        status = "incomplete: a case raised" if t["met"] is None and t.get("missing") else \
            {True: "met", False: "missed", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {', '.join(cells) or 'not measured'} | {status} |")
    return lines


def provenance(doc: dict, json_name: str) -> dict:
    """Where and when the numbers were measured, carried by every file derived from a results JSON
    (a comment in the Markdown, a text chunk in the PNGs) so that none of them travels without it."""
    return {"device": doc["device"], "date": doc["date"], "commit": doc.get("commit"), "source": json_name}


def markdown(doc: dict, json_name: str) -> str:
    """The full results table (every record) with the run's metadata."""
    base = baseline_name(doc)
    ceil = doc["ceilings"]
    lines = [f"<!-- provenance: {json.dumps(provenance(doc, json_name))} -->",
             f"# Benchmark results: {_device_line(doc)}, {doc['date']}", "",
             f"Generated by bench/report.py from `{json_name}`.", "",
             f"- command: `{doc['command']}`",
             f"- commit {_commit(doc)}; torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, "
             f"{doc['torch_threads']} torch threads",
             f"- TF32: matmul {doc['tf32']['matmul_allow_tf32']}, cuDNN {doc['tf32']['cudnn_allow_tf32']}"
             + ("" if doc["tf32"]["applies"] else " (no effect on CPU)"),
             f"- measured ceilings: copy {ceil['copy_GBps']:.1f} GB/s (read + write), matmul "
             + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceil["matmul_TFLOPs"].items()),
             f"- load average (1, 5, 15 min) at start {doc.get('load_average_start')}, "
             f"end {doc.get('load_average_end')}",
             f"- timing: {doc['timing_method']}",
             f"- memory: {doc['memory_method']}"]
    if fd := doc.get("featurize_data"):
        lines.append(f"- featurize texts: {fd['source']}; {fd['bytes']:,} bytes, median {fd['median_bytes']}, "
                     f"max {fd['max_bytes']}")
    lines += ["", "## Correctness gate", "",
              "| impl | dtype | max rel. error vs float64 | worst | tolerance | result |", "|---|---|---|---|---|---|"]
    for c in doc["checks"]:
        err = c.get("error") or f"{c['max_rel_err']:.2e}"
        lines.append(f"| {c['impl']} | {c['dtype']} | {err} | {c.get('worst', '-')} | {c['tolerance']:.0e} | "
                     f"{'pass' if c['passed'] else 'FAIL'} |")
    for title, key in (("Refused (failed the gate, not timed)", "refused"), ("Skipped", "skipped")):
        if doc.get(key):
            lines += ["", f"## {title}", ""] + [f"- {r['impl']}: {r['reason']}" for r in doc[key]]
    if doc.get("skipped_cases"):
        groups = defaultdict(list)
        for c in doc["skipped_cases"]:
            groups[(c["impl"], c["reason"])].append(f"{c['mode']} H={c['H']} B={c['B']}")
        lines += ["", "## Cases not timed", ""] + [f"- {impl}: {reason} ({len(where)} cases)"
                                                   for (impl, reason), where in groups.items()]
    if doc.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['impl']} {e['mode']} {e['dtype']} H={e['H']} B={e['B']}: "
                                          f"{e['error']}" for e in doc["errors"]]
    lines += ["", "## Targets", ""] + _targets_table(doc)
    table = index(doc)
    for mode in _order({r["mode"] for r in doc["results"]}, MODE_ORDER):
        lines += ["", f"## {mode}", "", f"chars counted: {MODE_UNITS[mode]}; T = "
                  + ", ".join(sorted({str(r['T']) for r in doc['results'] if r['mode'] == mode}))
                  + f"; speed-up = {base} time / time at the same case; roofline = floor time "
                    "(MODEL.md's bytes and FLOPs over the measured ceilings) / time", "",
                  "| dtype | H | B | impl | median ms (p10-p90) | chars/s | vs " + base +
                  " | peak MiB (activations) | roofline (bw, compute) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key in _cases(doc, mode):
            row = table[key]
            for impl in _order(row, IMPL_ORDER):
                r = row[impl]
                speed = f"{row[base]['median_ms'] / r['median_ms']:.2f}x" if base in row else "-"
                rf = r["roofline"]
                name = (impl if r["hidden_size"] == r["H"] else f"{impl} (H={r['hidden_size']})") + \
                    (" (not interleaved)" if r.get("interleaved") is False else "")
                lines.append(
                    f"| {r['dtype']} | {r['H']} | {r['B']} | {name} | {_ms(r['median_ms'])} "
                    f"({_ms(r['p10_ms'])}-{_ms(r['p90_ms'])}) | {_rate(r['chars_per_s'])} | {speed} | "
                    f"{_mem(r['peak_mem_mb'])} ({_mem(r['activation_mem_mb'])}) | {rf['frac_roofline']:.1%} "
                    f"({rf['frac_bandwidth']:.1%}, {rf['frac_compute']:.1%}) |")
    return "\n".join(lines + (judged_table(doc["targets_judged"]) if doc.get("targets_judged") else [])) + "\n"


DOC = "docs/benchmarks.md"


def _link(path: str, doc_path: str) -> str:
    """``path`` (relative to the repository, or absolute) as a link from the document ``doc_path``."""
    if posixpath.isabs(path) or posixpath.isabs(doc_path):
        return path
    return posixpath.relpath(path, posixpath.dirname(doc_path) or ".")


def doc_section(doc: dict, json_path: str, doc_path: str = DOC) -> str:
    """The benchmark section (between the markers) for the results file ``json_path``, to stand in
    the document ``doc_path`` (both relative to the repository, or absolute)."""
    stem = json_path.removesuffix(".json")
    lines = [f"Measured on **{_device_line(doc)}** on {doc['date']} (commit {_commit(doc)}, torch {doc['torch']}) "
             f"with `{doc['command']}`; every cell below comes from `{json_path}`. Full table with spreads, "
             f"memory and roofline fractions: [`{stem}.md`]({_link(stem + '.md', doc_path)}). Regenerate this "
             f"section with `python bench/report.py {json_path} --doc {doc_path}`."]
    load = doc.get("load_average_start")
    lines += ["", f"{doc['torch_threads']} torch thread(s); 1-minute load average {load[0] if load else 'n/a'} at "
                  f"the start and {(doc.get('load_average_end') or ['n/a'])[0]} at the end of the run (the machine "
                  "may be shared: the full table gives each median's 10th-90th percentile spread)."]
    if doc.get("device_type") != "cuda":
        cpu = doc.get("cpu_features") or {}
        isa = ", ".join(cpu.get("vector_extensions", [])) or "not recorded"
        lines += ["", f"These are CPU numbers (vector extensions: {isa}; PyTorch kernels: "
                      f"{cpu.get('torch_cpu_capability', 'not recorded')}; oneDNN native bf16: "
                      f"{cpu.get('onednn_native_bf16', 'not recorded')}). fastmlstm runs its `cpu` backend (the C++ "
                      "extension), `fastmlstm-cpu-forward` is the bare forward featurize is held to, "
                      "`fastmlstm-reference` the PyTorch loop it replaced; `nn-lstm` is `torch.nn.LSTM` on "
                      "PyTorch's CPU kernel (no cuDNN), `nn-lstm-matched` the same with the multiplicative LSTM's "
                      "parameter count."]
    lines += ["", "Median milliseconds per call (lower is better); `chars/s` and the speed-up over "
                  f"`{baseline_name(doc)}` are for the fastest fastmlstm backend."]
    for mode in _order({r["mode"] for r in doc["results"]}, MODE_ORDER):
        rs = [r for r in doc["results"] if r["mode"] == mode]
        Ts = ", ".join(str(t) for t in sorted({r["T"] for r in rs}))
        Is = ", ".join(str(i) for i in sorted({r["I"] for r in rs}))
        data = doc.get("featurize_data") or {}
        texts = ("synthetic texts with SST-2's lengths (the SST-2 file was absent)"
                 if data.get("source", "").startswith("synthetic") else "preprocessed SST-2 sentences")
        what = {"fwd": f"inference forward, T = {Ts}, I = {Is}",
                "fwd+bwd": f"forward + input and weight gradients, T = {Ts}, I = {Is}",
                "step": f"one time step, I = {Is}",
                "featurize": f"{data.get('n_texts', '?')} {texts}, B texts per batch, byte embedding E = {Is}",
                "train": f"one Adam step of the byte LM, T = {Ts}, E = {Is}"}[mode]
        lines += ["", f"**{mode}** ({what})", ""]
        lines += _pivot(doc, mode, _impls(doc, mode))
    lines += ["", "Targets:", ""] + _targets_table(doc, measurable_only=True)
    return "\n".join(lines)


def update_doc(path: Path, doc: dict, json_path: str, doc_path: str | None = None) -> bool:
    """Rewrite only the text between the bench markers of the Markdown file ``path``; returns whether
    it changed. ``doc_path`` is where the document lives, for its links (default: ``path``)."""
    text = path.read_text()
    lines = text.split("\n")
    begins = [i for i, line in enumerate(lines) if BEGIN in line]
    ends = [i for i, line in enumerate(lines) if END in line]
    if len(begins) != 1 or len(ends) != 1 or ends[0] <= begins[0]:
        raise SystemExit(f"{path}: expected one '{BEGIN} ...' line followed by one '{END}' line "
                         f"(the benchmark section lives in {DOC})")
    section = doc_section(doc, json_path, doc_path or _display_path(path))
    if BEGIN in section or END in section:  # the next regeneration could not find the section again
        raise SystemExit(f"report.py: the results file's text holds a bench marker; {path} left as it was")
    new = "\n".join(lines[: begins[0] + 1] + section.split("\n") + lines[ends[0]:])
    if new != text:
        write_atomic(path, new)
        return True
    return False


# ------------------------------------------------------------------------------------------ CLI

def _display_path(path: Path) -> str:
    path = path.resolve()
    return (path.relative_to(REPO) if path.is_relative_to(REPO) else path).as_posix()


HEADER_KEYS = ("device", "date", "command", "torch", "triton", "cuda", "torch_threads", "tf32", "ceilings",
               "timing_method", "memory_method", "checks", "results")
RECORD_KEYS = ("impl", "mode", "dtype", "H", "B", "T", "I", "median_ms", "p10_ms", "p90_ms", "chars_per_s",
               "peak_mem_mb", "activation_mem_mb", "hidden_size", "roofline")


def load(path: Path) -> dict:
    """The results file ``path`` of bench/run.py; a one-line error (SystemExit) for anything else."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"report.py: {path}: cannot read a results file: {exc}") from None
    records = doc.get("results") if isinstance(doc, dict) else None
    missing = [k for k in HEADER_KEYS if k not in doc] if isinstance(records, list) else ["results list"]
    missing += [f"{k} in record {i}" for i, r in enumerate(records or ()) for k in RECORD_KEYS
                if not isinstance(r, dict) or k not in r][:1]
    if missing:
        raise SystemExit(f"report.py: {path}: not a results file of bench/run.py (no {', '.join(missing)})")
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results JSON written by bench/run.py")
    p.add_argument("--doc", type=Path, help=f"Markdown file to update between the bench markers ({DOC})")
    p.add_argument("--md", action="store_true", help="rewrite <results>.md")
    p.add_argument("--plots", action="store_true", help="rewrite the PNG plots beside the results")
    args = p.parse_args(argv)
    doc = load(args.results)
    stem = args.results.with_suffix("")
    if args.md:
        write_atomic(stem.with_suffix(".md"), markdown(doc, args.results.name))
        print(f"wrote {stem.with_suffix('.md')}")
    if args.plots:
        from plots import plots  # matplotlib only when asked

        for path in plots(doc, stem):
            print(f"wrote {path}")
    if args.doc and not args.doc.is_file():
        raise SystemExit(f"report.py: --doc {args.doc}: no such file")
    if args.doc:
        changed = update_doc(args.doc, doc, _display_path(args.results))
        print(f"{args.doc}: benchmark section {'regenerated' if changed else 'already up to date'}")
    if not (args.md or args.plots or args.doc):
        print(doc_section(doc, _display_path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
