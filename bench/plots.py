"""PNG plots of a results file of bench/run.py: time against H, time against B, and the speed-up
over the nn.LSTM baseline at each case, every figure carrying the results' provenance."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from report import (
    DTYPE_ORDER,
    IMPL_ORDER,
    MODE_ORDER,
    _cases,
    _impls,
    _order,
    baseline_name,
    index,
    provenance,
    write_atomic,
)


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

    written, results = [], doc["results"]
    panels = [(m, d) for m in _order({r["mode"] for r in results}, MODE_ORDER)
              for d in _order({r["dtype"] for r in results if r["mode"] == m}, DTYPE_ORDER)]
    title = f"{doc['device']} - {doc['date']}"
    metadata = {"Description": json.dumps(provenance(doc, stem.name + ".json"))}

    def save(fig, name, **options):
        written.append(stem.with_name(f"{stem.name}-{name}.png"))
        write_atomic(written[-1], lambda tmp: fig.savefig(tmp, dpi=90, metadata=metadata, **options))
        plt.close(fig)

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
        save(fig, name)

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
        save(fig, "speedup", bbox_inches="tight")
    return written
