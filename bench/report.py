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


def _mem(x) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def _key(r: dict) -> tuple:
    return (r["mode"], r["dtype"], r["H"], r["B"])


def index(doc: dict) -> dict:
    """(mode, dtype, H, B) -> {impl: record}."""
    table = defaultdict(dict)
    for r in doc["results"]:
        table[_key(r)][r["impl"]] = r
    return table


def _cases(doc: dict, mode: str):
    keys = {_key(r) for r in doc["results"] if r["mode"] == mode}
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
    kind = "GPU" if doc.get("device_type") == "cuda" else "CPU"
    return f"{doc['device']} ({kind})"


# ------------------------------------------------------------------------------------------ targets

def _find(doc, impl, mode, dtype, H, B):
    for r in doc["results"]:
        if (r["impl"], r["mode"], r["dtype"], r["H"], r["B"]) == (impl, mode, dtype, H, B):
            return r
    return None


def _fast(doc, mode, dtype, H, B):
    rows = [r for r in doc["results"] if r["impl"] in ("fastmlstm-triton", "fastmlstm-cuda")
            and (r["mode"], r["dtype"], r["H"], r["B"]) == (mode, dtype, H, B)]
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


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
        if fast is None or other is False:
            out.append((name, "not measured", "not measured"))
        else:
            out.append((name, text_fn(), "met" if ok_fn() else "missed"))

    f = _fast(doc, "fwd+bwd", "bfloat16", 4096, 128)
    for name, other, factor in zip(GPU_TARGETS[:3], ("cudnn-lstm", "mlstm-eager", "mlstm-compile"), (1.0, 5.0, 2.0)):
        o = _find(doc, other, "fwd+bwd", "bfloat16", 4096, 128)
        judge(name, f, o or False, lambda o=o, factor=factor: o["median_ms"] >= factor * f["median_ms"],
              lambda o=o: f"{f['impl']} {_ms(f['median_ms'])} ms vs {_ms(o['median_ms'])} ms "
                          f"({o['median_ms'] / f['median_ms']:.2f}x)")
    f = _fast(doc, "fwd+bwd", "bfloat16", 1024, 64)
    o = _find(doc, "cudnn-lstm", "fwd+bwd", "float16", 1024, 64)
    judge(GPU_TARGETS[3], f, o or False, lambda: f["median_ms"] <= o["median_ms"],
          lambda: f"{f['impl']} {_ms(f['median_ms'])} ms vs {_ms(o['median_ms'])} ms")
    feats = [r for r in doc["results"] if r["impl"] in ("fastmlstm-triton", "fastmlstm-cuda")
             and r["mode"] == "featurize" and r["H"] == 4096]
    f = max(feats, key=lambda r: r["chars_per_s"]) if feats else None
    judge(GPU_TARGETS[4], f, None, lambda: f["chars_per_s"] >= 2.5e6,
          lambda: f"{f['impl']} {f['dtype']} B={f['B']}: {f['chars_per_s']:,.0f} chars/s")
    f = _fast(doc, "step", "bfloat16", 4096, 1)
    judge(GPU_TARGETS[5], f, None, lambda: f["median_ms"] <= 0.061,
          lambda: f"{f['impl']} {f['median_ms'] * 1e3:.1f} us")
    f = _fast(doc, "train", "bfloat16", 4096, 128)
    judge(GPU_TARGETS[6], f, None, lambda: f["chars_per_s"] >= 5e5,
          lambda: f"{f['impl']} {f['chars_per_s']:,.0f} chars/s")
    f = _fast(doc, "fwd+bwd", "bfloat16", 4096, 128)
    o = _find(doc, "cudnn-lstm", "fwd+bwd", "bfloat16", 4096, 128)
    ok = f is not None and o is not None and f["activation_mem_mb"] is not None and bool(o["activation_mem_mb"])
    judge(GPU_TARGETS[7], f, o if ok else False, lambda: f["activation_mem_mb"] <= 1.5 * o["activation_mem_mb"],
          lambda: f"{f['impl']} {_mem(f['activation_mem_mb'])} MiB vs {_mem(o['activation_mem_mb'])} MiB "
                  f"({f['activation_mem_mb'] / o['activation_mem_mb']:.2f}x)")
    return out


def _cpu_fast(row: dict):
    """The CPU path's record in a row: fastmlstm-cpu, else the fastest other fastmlstm backend."""
    return row.get("fastmlstm-cpu") or _fastest_fastmlstm(row)


def _judge_ratios(name: str, pairs: list, limit: float, applies: bool = True, why_not: str = "") -> tuple:
    """(target, measured, status) for time ratios fast/other <= limit over (fast, other) pairs."""
    if not pairs:
        return (name, f"not measured: {why_not}", "not applicable") if not applies else \
            (name, "not measured", "not measured")
    ratios = sorted(((f["median_ms"] / o["median_ms"], f) for f, o in pairs), key=lambda t: t[0])
    met = sum(q <= limit for q, _ in ratios)

    def where(r):
        return f"{r['mode']} {r['dtype']} H={r['H']} B={r['B']}"

    (best_q, best), (worst_q, worst) = ratios[0], ratios[-1]
    text = (f"{ratios[0][1]['impl']} time / other: {best_q:.2f}x ({where(best)}) to {worst_q:.2f}x "
            f"({where(worst)}); within {limit:g}x in {met} of {len(ratios)} cases")
    if not applies:
        return name, f"{text}; {why_not}", "not applicable"
    return name, text, "met" if met == len(ratios) else "missed"


def _cpu_targets(doc: dict) -> list[tuple[str, str, str]]:
    table = index(doc)
    seq_modes = ("fwd", "fwd+bwd", "featurize", "train")
    grid = {(H, B) for H in (256, 512, 1024) for B in (16, 64)}

    def pairs(modes, dtype, other, on_grid=True):
        out = []
        for (mode, dt, H, B), row in table.items():
            if mode in modes and dt == dtype and (not on_grid or (H, B) in grid):
                f = _cpu_fast(row)
                if f is not None and other in row:
                    out.append((f, row[other]))
        return out

    native_bf16 = (doc.get("cpu_features") or {}).get("onednn_native_bf16")
    self_pairs = []
    for (mode, dt, H, B), row in table.items():
        fp32 = table.get((mode, "float32", H, B), {})
        if dt == "bfloat16" and _cpu_fast(row) and _cpu_fast(fp32):
            self_pairs.append((_cpu_fast(row), _cpu_fast(fp32)))
    return [
        _judge_ratios(CPU_TARGETS[0], pairs(seq_modes, "float32", "nn-lstm"), 1.25),
        _judge_ratios(CPU_TARGETS[1], pairs(seq_modes, "bfloat16", "nn-lstm"), 1.25, native_bf16 is not False,
                      "nn.LSTM has no native bfloat16 path on this CPU (oneDNN without AVX-512 BF16)"),
        _judge_ratios(CPU_TARGETS[2], [p for dt in DTYPE_ORDER for p in pairs(("step",), dt, "nn-lstm", False)
                                       if p[0]["B"] == 1], 1.0),
        _judge_ratios(CPU_TARGETS[3], self_pairs, 1.1),
        _judge_ratios(CPU_TARGETS[4], [p for dt in DTYPE_ORDER
                                       for p in pairs(("featurize",), dt, "fastmlstm-cpu-forward")], 1.1),
        _judge_ratios(CPU_TARGETS[5], [p for dt in DTYPE_ORDER for p in pairs(seq_modes, dt, "nn-lstm-matched")],
                      1.0),
    ]


def targets(doc: dict) -> list[tuple[str, str, str]]:
    """(target, measured, status) for every target; a CPU file cannot judge the GPU ones and a GPU
    file cannot judge the CPU ones."""
    if doc.get("device_type") == "cuda":
        return _gpu_targets(doc) + [(t, "not measured (GPU results)", "not measured") for t in CPU_TARGETS]
    return [(t, "not measured (CPU results)", "not measured") for t in GPU_TARGETS] + _cpu_targets(doc)


# ------------------------------------------------------------------------------------------ markdown

def _pivot(doc: dict, mode: str, impls: list[str], with_chars: bool = True) -> list[str]:
    base = baseline_name(doc)
    head = ["dtype", "H", "B"] + [f"{i} ms" for i in impls]
    if with_chars:
        head += ["fastmlstm chars/s", f"fastmlstm vs {base}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = index(doc)
    for key in _cases(doc, mode):
        row = table[key]
        cells = [key[1], str(key[2]), str(key[3])]
        cells += [_ms(row[i]["median_ms"]) if i in row else "-" for i in impls]
        if with_chars:
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
    if doc.get("featurize_data"):
        fd = doc["featurize_data"]
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
                name = impl if r["hidden_size"] == r["H"] else f"{impl} (H={r['hidden_size']})"
                lines.append(
                    f"| {r['dtype']} | {r['H']} | {r['B']} | {name} | {_ms(r['median_ms'])} "
                    f"({_ms(r['p10_ms'])}-{_ms(r['p90_ms'])}) | {_rate(r['chars_per_s'])} | {speed} | "
                    f"{_mem(r['peak_mem_mb'])} ({_mem(r['activation_mem_mb'])}) | {rf['frac_roofline']:.1%} "
                    f"({rf['frac_bandwidth']:.1%}, {rf['frac_compute']:.1%}) |")
    return "\n".join(lines) + "\n"


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
    gpu = doc.get("device_type") == "cuda"
    lines = [f"Measured on **{_device_line(doc)}** on {doc['date']} (commit {_commit(doc)}, torch {doc['torch']}) "
             f"with `{doc['command']}`; every cell below comes from `{json_path}`. Full table with spreads, "
             f"memory and roofline fractions: [`{stem}.md`]({_link(stem + '.md', doc_path)}). Regenerate this "
             f"section with `python bench/report.py {json_path} --doc {doc_path}`."]
    load = doc.get("load_average_start")
    lines += ["", f"{doc['torch_threads']} torch thread(s); 1-minute load average {load[0] if load else 'n/a'} at "
                  f"the start and {(doc.get('load_average_end') or ['n/a'])[0]} at the end of the run (the machine "
                  "may be shared: the full table gives each median's 10th-90th percentile spread)."]
    if not gpu:
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
        n_texts = doc.get("featurize_data", {}).get("n_texts", "?")
        what = {"fwd": f"inference forward, T = {Ts}, I = {Is}",
                "fwd+bwd": f"forward + input and weight gradients, T = {Ts}, I = {Is}",
                "step": f"one time step, I = {Is}",
                "featurize": f"{n_texts} preprocessed SST-2 sentences, B texts per batch, byte embedding E = {Is}",
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
    new = "\n".join(lines[: begins[0] + 1] + section.split("\n") + lines[ends[0]:])
    if new != text:
        path.write_text(new)
        return True
    return False


# ------------------------------------------------------------------------------------------ plots

def _color(impl: str) -> str:
    """One color per implementation in every plot (nn-lstm shares cudnn-lstm's)."""
    if impl.startswith("nn-lstm"):
        impl = "cudnn-" + impl.removeprefix("nn-")
    return f"C{IMPL_ORDER.index(impl) % 10}" if impl in IMPL_ORDER else "C9"


def plots(doc: dict, stem: Path) -> list[Path]:
    """PNG plots beside the results: time vs H, time vs B, speed-up over the nn.LSTM baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    results = doc["results"]
    panels = [(m, d) for m in _order({r["mode"] for r in results}, MODE_ORDER)
              for d in _order({r["dtype"] for r in results if r["mode"] == m}, DTYPE_ORDER)]
    title = f"{doc['device']} - {doc['date']}"
    metadata = {"Description": json.dumps(provenance(doc, stem.name + ".json"))}

    for axis, fixed, name in (("H", "B", "time-vs-H"), ("B", "H", "time-vs-B")):
        series = []  # (mode, dtype, fixed value, {impl: [(x, ms)]})
        for mode, dtype in panels:
            rs = [r for r in results if r["mode"] == mode and r["dtype"] == dtype]
            by_fixed = defaultdict(set)
            for r in rs:
                by_fixed[r[fixed]].add(r[axis])
            candidates = [v for v, xs in by_fixed.items() if len(xs) >= 2]
            if not candidates:
                continue
            value = max(candidates, key=lambda v: (len(by_fixed[v]), v))
            lines = defaultdict(list)
            for r in rs:
                if r[fixed] == value:
                    lines[r["impl"]].append((r[axis], r["median_ms"]))
            series.append((mode, dtype, value, lines))
        if not series:
            continue
        cols = min(3, len(series))
        rows = (len(series) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
        for ax, (mode, dtype, value, lines) in zip(axes.flat, series):
            for impl in _order(lines, IMPL_ORDER):
                pts = sorted(lines[impl])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, color=_color(impl))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("median ms")
            ax.set_title(f"{mode} {dtype}, {fixed}={value}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{name}.png")
        fig.savefig(path, dpi=90, metadata=metadata)
        plt.close(fig)
        written.append(path)

    base = baseline_name(doc)
    table = index(doc)
    rows = [(m, [k for k in _cases(doc, m) if base in table[k]]) for m in MODE_ORDER]
    rows = [(m, keys) for m, keys in rows if keys]
    impls = [i for i in _impls(doc) if i != base]
    if rows and impls:
        widest = max(len(keys) for _, keys in rows)
        fig, axes = plt.subplots(len(rows), 1, figsize=(max(7.0, 0.25 * widest * len(impls) + 2), 2.6 * len(rows)),
                                 squeeze=False)
        width = 0.8 / len(impls)
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
        for ax, (mode, keys) in zip(axes[:, 0], rows):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, k in enumerate(keys):
                    if impl in table[k]:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(table[k][base]["median_ms"] / table[k][impl]["median_ms"])
                ax.bar(xs, ys, width, label=impl, color=_color(impl))
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels([f"{short.get(d, d)} H={h} B={b}" for _, d, h, b in keys], fontsize=7)
            ax.set_ylabel(f"x {base}", fontsize=8)
            ax.set_title(mode, fontsize=9, loc="left")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        axes[0, 0].legend(fontsize=7, ncol=len(impls), loc="upper left", bbox_to_anchor=(0, 1.45))
        fig.suptitle(f"speed-up over {base} at the same case (> 1: faster) - {title}", fontsize=10, y=1.0)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-speedup.png")
        fig.savefig(path, dpi=90, bbox_inches="tight", metadata=metadata)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------ CLI

def _display_path(path: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results JSON written by bench/run.py")
    p.add_argument("--doc", type=Path, help=f"Markdown file to update between the bench markers ({DOC})")
    p.add_argument("--md", action="store_true", help="rewrite <results>.md")
    p.add_argument("--plots", action="store_true", help="rewrite the PNG plots beside the results")
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text())
    stem = args.results.with_suffix("")
    if args.md:
        stem.with_suffix(".md").write_text(markdown(doc, args.results.name))
        print(f"wrote {stem.with_suffix('.md')}")
    if args.plots:
        for path in plots(doc, stem):
            print(f"wrote {path}")
    if args.doc:
        changed = update_doc(args.doc, doc, _display_path(args.results))
        print(f"{args.doc}: benchmark section {'regenerated' if changed else 'already up to date'}")
    if not (args.md or args.plots or args.doc):
        print(doc_section(doc, _display_path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
