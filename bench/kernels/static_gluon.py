"""The persistent Gluon kernels in the static report (``static.py``): GPU-B1's compile targets
(``fastmlstm.ops.triton.persistent.targets.compile_targets``), compiled for sm_90a with Triton's
``GluonASTSource`` and no GPU, and the PTX each design must hold.

Also the ptxas-log parsing both halves of the report share.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PERSISTENT_DIR = REPO / "fastmlstm" / "ops" / "triton" / "persistent"
DTYPES = ("bf16", "fp16")
SMEM_LIMIT = 227 * 1024  # one block on sm_90 (CUDA programming guide, compute capability 9.0)
# Bumped when what a compile job produces changes (its options, what is parsed): a new cache key.
SCHEME = "gluon-3"


def parse_ptxas(log: str) -> dict:
    """Registers, spills and stack frame from ``ptxas -v``'s report (Triton prints it when asked)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log:\n{log[-2000:]}")
    return {"registers": int(regs.group(1)),
            "spill_bytes": int(spill_st.group(1)) + int(spill_ld.group(1)) if spill_st and spill_ld else 0,
            "spill_store_bytes": int(spill_st.group(1)) if spill_st else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0}


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def targets(dtype: str) -> list | None:
    """GPU-B1's compile targets for ``dtype`` ("bf16" or "fp16"); None where this checkout has none."""
    try:
        from fastmlstm.ops.triton.persistent.targets import compile_targets
    except ImportError:
        return None
    return list(compile_targets(dtype))


def _schedule_summary(sched) -> dict | None:
    if sched is None:
        return None
    return {k: getattr(sched, k, None) for k in ("design", "direction", "B", "H", "ctas", "cluster", "active_sms",
                                                  "split_k", "reduction", "block_m", "stages", "res_blocks")}


def jobs() -> tuple[list[dict], str]:
    """One job per (dtype, target), and a note: "" or why there are none."""
    out = []
    for dtype in DTYPES:
        found = targets(dtype)
        if found is None:
            return [], "no fastmlstm.ops.triton.persistent.targets in this checkout: no Gluon kernel compiled"
        for t in found:
            out.append({"kind": "gluon", "kernel": t.name, "dtype": dtype, "arch": f"sm_{t.arch}a",
                        "config": {"num_warps": t.num_warps, "num_ctas": t.num_ctas,
                                   "cluster_dims": list(t.cluster_dims),
                                   "constexprs": {k: repr(v) for k, v in sorted(t.constexprs.items())}},
                        "signature": {k: str(v) for k, v in t.signature.items()},
                        "expected_ptx": list(t.expected_ptx), "schedule": _schedule_summary(t.schedule)})
    return out, ""


def source_key() -> str:
    """What a cached Gluon result depends on besides its job: the persistent package's sources
    (kernels, schedules and targets), Triton's version and this scheme."""
    import triton

    h = hashlib.sha256(f"{triton.__version__} {SCHEME}".encode())
    for path in sorted(PERSISTENT_DIR.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def compile_job(job: dict) -> dict:
    """Compile one target in this process (a worker) and return its report entry."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from fastmlstm.ops.triton.configs import FP_FUSION

    knobs.compilation.always_compile = True  # ptxas must run (and report) every time
    knobs.nvidia.dump_ptxas_log = True
    entry = {k: job[k] for k in ("kind", "kernel", "dtype", "arch", "config", "expected_ptx", "schedule")}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        target = next(t for t in targets(job["dtype"]) if t.name == job["kernel"])
        options = {"num_warps": target.num_warps, "num_ctas": target.num_ctas, "enable_fp_fusion": FP_FUSION,
                   **getattr(target, "options", {})}
        source = GluonASTSource(target.fn, target.signature, target.constexprs, getattr(target, "attrs", None))
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", target.arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        entry.update(ok=True, **parse_ptxas(log.getvalue()), shared_bytes=int(compiled.metadata.shared),
                     mma=mma_kind(ptx), missing_ptx=[m for m in target.expected_ptx if m not in ptx],
                     ptx_markers={m: ptx.count(m) for m in target.expected_ptx})
    except Exception as exc:  # a compile error is a result: reported, and a violation
        message = str(exc).strip().splitlines()
        entry.update(ok=False, registers=None, spill_bytes=None, shared_bytes=None, mma=None, missing_ptx=None,
                     error=f"{type(exc).__name__}: {' | '.join(message[-6:])[:2000]}")
    entry["compile_s"] = round(time.perf_counter() - start, 2)
    return entry


def violations(entries: list[dict]) -> list[str]:
    """Compile errors, any spill (every Gluon kernel is 16-bit), shared memory over one block's
    limit, and PTX that lacks an instruction its design names."""
    bad = []
    for e in entries:
        name = f"gluon {e['kernel']} {e['dtype']} {e['arch']}"
        if not e["ok"]:
            bad.append(f"{name}: compile error: {e.get('error')}")
            continue
        if e["spill_bytes"]:
            bad.append(f"{name}: {e['spill_bytes']} bytes of spills")
        if e["shared_bytes"] > SMEM_LIMIT:
            bad.append(f"{name}: {e['shared_bytes']} bytes of shared memory > {SMEM_LIMIT}")
        if e["missing_ptx"]:
            bad.append(f"{name}: the PTX lacks {e['missing_ptx']} (expected {e['expected_ptx']})")
    return bad


def markdown(entries: list[dict], note: str) -> list[str]:
    lines = ["## Persistent Gluon kernels (sm_90a)", ""]
    if note:
        return [*lines, note, ""]
    lines += ["| kernel | dtype | warps | CTAs per cluster | design, direction, B, H | CTAs (active) | tile rows, "
              "resident tiles, stages | registers | spill B | shared KB | mma | PTX markers (count) |",
              "|" + "---|" * 12]
    for e in entries:
        c, s = e["config"], e["schedule"] or {}
        plan = f"{s.get('design')}, {s.get('direction')}, {s.get('B')}, {s.get('H')}" if s else "-"
        ctas = f"{s.get('ctas')} ({s.get('active_sms')})" if s else "-"
        tiles = f"{s.get('block_m')}, {s.get('res_blocks')}, {s.get('stages')}" if s else "-"
        if not e["ok"]:
            lines.append(f"| {e['kernel']} | {e['dtype']} | {c['num_warps']} | {c['num_ctas']} | {plan} | {ctas} | "
                         f"{tiles} | ERROR | | | | {e.get('error', '')[:200]} |")
            continue
        markers = ", ".join(f"{m} ({n})" for m, n in e["ptx_markers"].items())
        lines.append(f"| {e['kernel']} | {e['dtype']} | {c['num_warps']} | {c['num_ctas']} | {plan} | {ctas} | "
                     f"{tiles} | {e['registers']} | {e['spill_bytes']} | {e['shared_bytes'] / 1024:.0f} | {e['mma']} | "
                     f"{markers} |")
    return [*lines, ""]
