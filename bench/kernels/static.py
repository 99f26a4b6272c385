"""Static kernel report: every kernel the dispatcher can launch, compiled ahead of time without a
GPU, beside cost model v2's rows and issue 22's done criteria.

    python bench/kernels/static.py                # bench/results/static.json and static.md
    python bench/kernels/static.py --json PATH [--md PATH] [--jobs N] [--no-cache] [--require-targets]

- The per-step Triton kernels (``fused_step.py``): each kernel x configuration of the dispatch
  space (``sweep.dispatch_space``) x dtype (bf16, fp16, fp32 with IEEE and TF32 dots) x
  architecture (sm_90a, sm_80), in its heaviest variant (every optional input and save on), with
  16-byte-aligned pointers and B, H multiples of 16, which is what Triton specializes on at the
  real sizes. ``mma``: the matrix instruction in the PTX (wgmma, mma.sync, or fma).
- The persistent Gluon kernels (``fastmlstm.ops.triton.persistent.targets.compile_targets``, GPU-B1's
  list of every configuration the dispatcher can pick for the model shapes) for sm_90a, in bf16 and
  fp16, with ``GluonASTSource``; each must hold the PTX its design names (``expected_ptx``:
  ``wgmma``, ``cp.async.bulk.tensor``, ``multicast::cluster``, ``barrier.cluster``).

Registers, spills and shared memory come from Triton's bundled ``ptxas -v``. Violations (the
command exits 1, ``tests/bench/test_static.py`` fails): a compile error, a spill in a 16-bit
dtype, shared memory over the architecture's limit, a missing PTX marker, an epilogue operand not
loaded before the K loop where the cost model counts on it, and a model row with B >= 64 whose
design leaves an SM idle. The model's ratio targets are reported (met or not, and why); with
``--require-targets`` a miss is a violation too.

JSON: {"kernels": [...], "gluon": [...], "model": [costmodel rows], "targets": [...], "limits", "triton", ...}.

Results are cached on disk (``--cache-dir``, default ``~/.cache/fastmlstm/static``), keyed by the
kernels' sources, Triton's version and the job, so an unchanged kernel is not recompiled.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Compiling needs Triton's real JIT functions. Under TRITON_INTERPRET (which the test suite sets
    # on machines without a GPU, and subprocesses inherit) Triton builds interpreter stand-ins for
    # its own library functions the moment it is imported, and torch imports it: so the variable
    # goes before any import below, in the command's own process only, never as a side effect of
    # importing this module.
    os.environ.pop("TRITON_INTERPRET", None)

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # measure.py, the benchmark's host facts
sys.path.insert(0, str(Path(__file__).resolve().parent))

import costmodel  # noqa: E402
import static_gluon  # noqa: E402
import sweep  # noqa: E402

from fastmlstm.ops.triton import configs as _configs  # noqa: E402

KERNEL_FILE = REPO / "fastmlstm" / "ops" / "triton" / "fused_step.py"
ARCHS = {"sm_90a": 90, "sm_80": 80}
# Shared memory one block may use (CUDA programming guide, compute capabilities 9.0 and 8.0).
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
# (label, torch dtype name, Triton pointer type, dot precision)
DTYPES = (("bf16", "bfloat16", "bf16", "ieee"), ("fp16", "float16", "fp16", "ieee"),
          ("fp32", "float32", "fp32", "ieee"), ("fp32", "float32", "fp32", "tf32"))
# The heaviest variant of each kernel: every optional input and every save on.
FLAGS = {
    "fwd_m": {"SAVE": True},
    "fwd_z": {"SAVE": True, "HAS_LEN": True},
    "bwd_h": {"HAS_REC": True, "DO_CELL": True, "HAS_DOUT": True, "HAS_DCELLS": True, "HAS_LEN": True},
    "bwd_m": {},
}
# Pointer arguments that are float32 whatever the activation dtype, and the integer ones.
FLOAT32_POINTERS = {"p_c", "p_c_prev", "p_dh", "p_dc", "p_dcells", "p_ws"}
INT_POINTERS = {"p_len": "*i64", "p_ticket": "*i32"}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastmlstm" / "static"


def _kernel_fn(name: str):
    from fastmlstm.ops.triton import fused_step

    return getattr(fused_step, f"{name}_kernel")


def jobs() -> list[dict]:
    """Every (kernel, dtype, precision, arch, config) to compile, each once."""
    out, seen = [], set()
    for label, torch_name, ptr, precision in DTYPES:
        dtype_bytes = 2 if ptr != "fp32" else 4
        space = sweep.dispatch_space(dtype_bytes)
        for kernel, configs in space.items():
            for config in configs:
                for arch, cap in ARCHS.items():
                    # sm_80 has no grid dependency control: the dispatcher never asks for PDL there.
                    c = config if cap >= 90 else dataclasses.replace(config, pdl=False)
                    key = (kernel, label, precision, arch, c)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append({"kernel": kernel, "dtype": label, "torch_dtype": torch_name, "ptr": ptr,
                                "precision": precision, "arch": arch, "config": c.as_dict()})
    return out


def _constexprs(kernel: str, config: _configs.KernelConfig, precision: str) -> dict:
    const = dict(FLAGS[kernel], BB=config.BB, BN=config.BN, BK=config.BK, PRECISION=precision,
                 INTERPRET_BF16=False, USE_PDL=config.pdl)
    const["SPLIT"] = _configs.uses_workspace(kernel, config)
    const["GATHER"] = _configs.gather_unroll(kernel, config)
    if kernel == "bwd_h":
        const["EPI_BN"] = _configs.epilogue_width(kernel, config)
    return const


def _signature(fn, const: dict, ptr: str) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in INT_POINTERS:
            sig[name] = INT_POINTERS[name]
        elif name.startswith("p_"):
            sig[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{ptr}"
        else:
            sig[name] = "i32"
        # What Triton's JIT specializes at real sizes: aligned tensors, and B, H multiples of 16
        # (t and n_split are never specialized: do_not_specialize in fused_step).
        if sig[name].startswith("*") or name in ("B", "H"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_parse_ptxas = static_gluon.parse_ptxas
_mma = static_gluon.mma_kind


def _loads_before_loop(ptx: str) -> int:
    """Plain global loads issued before the first loop of the kernel (the K loop): the epilogue's
    operands that fwd_m, fwd_z and bwd_m prefetch when they run without a workspace. The K loop's
    own operands go through cp.async, so they are not counted."""
    count = 0
    for line in ptx.splitlines():
        if "Loop Header" in line:
            return count
        if "ld.global" in line:
            count += 1
    return count


def compile_one(job: dict) -> dict:
    """Compile one job in this process (a worker); returns the report entry."""
    if job.get("kind") == "gluon":
        return static_gluon.compile_job(job)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # ptxas runs (and prints its -v report) only when Triton compiles: never take its cache.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    config = _configs.KernelConfig(**job["config"])
    fn = _kernel_fn(job["kernel"])
    const = _constexprs(job["kernel"], config, job["precision"])
    sig, attrs = _signature(fn, const, job["ptr"])
    entry = {k: job[k] for k in ("kernel", "dtype", "arch")}
    entry["config"] = {**job["config"], "precision": job["precision"]}
    if job["kernel"] == "bwd_h":
        entry["config"]["EPI_BN"] = const["EPI_BN"]
    entry["config"]["GATHER"] = const["GATHER"]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            target = GPUTarget("cuda", ARCHS[job["arch"]], 32)
            compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=target,
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                               "enable_fp_fusion": _configs.FP_FUSION})
        entry.update(ok=True, **_parse_ptxas(log.getvalue()), shared_bytes=int(compiled.metadata.shared),
                     mma=_mma(compiled.asm["ptx"]), loads_before_loop=_loads_before_loop(compiled.asm["ptx"]))
    except Exception as exc:  # a compile error is a result, reported (and failed by the test)
        message = str(exc).strip().splitlines()
        entry.update(ok=False, registers=None, spill_bytes=None, shared_bytes=None, mma=None,
                     error=f"{type(exc).__name__}: {' | '.join(message[-6:])[:2000]}")
    entry["compile_s"] = round(time.perf_counter() - start, 2)
    return entry


# Bumped when what a Triton compile job produces changes (its flags, signature or parsing above):
# a new cache key, without recompiling everything on any other edit of this file.
SCHEME = "triton-3"


def source_key() -> str:
    """What a cached per-step kernel result depends on besides its job: the kernels' source,
    Triton's version and SCHEME."""
    import triton

    h = hashlib.sha256(KERNEL_FILE.read_bytes())
    h.update(f"{triton.__version__} {SCHEME}".encode())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: Path, src: dict, job: dict) -> Path:
    if job.get("kind") == "gluon":
        key = [src["gluon"], job]
    else:
        # The constexprs too: some (EPI_BN, GATHER) are derived from the config by fastmlstm's
        # configs.py, which the source key does not cover.
        key = [src["triton"], job, _constexprs(job["kernel"], _configs.KernelConfig(**job["config"]), job["precision"])]
    return cache_dir / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"


def _init_worker():
    # Each worker compiles one kernel at a time: keep LLVM and ptxas to one thread each.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(jobs_: list[dict], n_jobs: int, cache_dir: Path | None, progress=None) -> tuple[list[dict], int]:
    """Results for every job (in order) and how many came from the cache."""
    src = {"triton": source_key(), "gluon": static_gluon.source_key()}
    results: list[dict | None] = [None] * len(jobs_)
    todo = []
    for i, job in enumerate(jobs_):
        path = _cache_path(cache_dir, src, job) if cache_dir else None
        if path and path.is_file():
            results[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    hits = len(jobs_) - len(todo)
    if todo:
        if n_jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(n_jobs, initializer=_init_worker) as pool:
                futures = {pool.submit(compile_one, jobs_[i]): i for i in todo}
                for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                    results[futures[future]] = future.result()
                    if progress:
                        progress(done, len(todo))
        else:
            for done, i in enumerate(todo, 1):
                results[i] = compile_one(jobs_[i])
                if progress:
                    progress(done, len(todo))
        if cache_dir:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for i in todo:
                if results[i]["ok"]:  # failures are recompiled next time, never cached
                    path = _cache_path(cache_dir, src, jobs_[i])
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(results[i]))
                    tmp.replace(path)
    return results, hits


# Kernels that load their epilogue's operands before the K loop when they run without a workspace
# (costmodel.py's epilogue_latency credits it).
PREFETCHING = ("fwd_m", "fwd_z", "bwd_m")


def violations(doc: dict) -> list[str]:
    """The bounds the static report must meet: compiles, no spill in 16-bit, shared memory within
    the architecture's limit, the epilogue's operands loaded before the K loop where the cost
    model assumes so, the Gluon kernels' own checks (``static_gluon.violations``), every SM busy in
    the model's rows with B >= 64, and, when the report was asked to require them, the ratio targets."""
    bad = []
    for e in doc["kernels"]:
        name = f"{e['kernel']} {e['dtype']} {e['arch']} {e['config']}"
        if not e["ok"]:
            bad.append(f"{name}: compile error: {e.get('error')}")
            continue
        if e["dtype"] in ("bf16", "fp16") and e["spill_bytes"]:
            bad.append(f"{name}: {e['spill_bytes']} bytes of spills")
        if e["shared_bytes"] > SMEM_LIMIT[e["arch"]]:
            bad.append(f"{name}: {e['shared_bytes']} bytes of shared memory > {SMEM_LIMIT[e['arch']]}")
        if e["kernel"] in PREFETCHING and e["config"]["split"] == 1 and not e.get("loads_before_loop"):
            bad.append(f"{name}: no load before the K loop (the cost model counts on the epilogue's "
                       "operands being prefetched)")
    bad += static_gluon.violations(doc.get("gluon", []))
    for t in doc.get("targets", []):
        if not t["met"] and (t["check"] == "every SM busy" or doc.get("require_targets")):
            bad.append(f"target {t['gpu']} H={t['H']} B={t['B']} {t['direction']} ({t['design']}): {t['check']} "
                       f"not met, {t['detail']}: {t['why_not']}")
    return bad


def _kernels_table(kernels: list[dict]) -> list[str]:
    lines = ["## Per-step Triton kernels", "",
             "| kernel | dtype | arch | BB | BN | BK | warps | stages | split | pdl | precision | registers | "
             "spill B | shared KB | mma |", "|" + "---|" * 15]
    for e in kernels:
        c = e["config"]
        shared = "" if e["shared_bytes"] is None else f"{e['shared_bytes'] / 1024:.0f}"
        lines.append(f"| {e['kernel']} | {e['dtype']} | {e['arch']} | {c['BB']} | {c['BN']} | {c['BK']} | "
                     f"{c['num_warps']} | {c['num_stages']} | {'>1' if c['split'] > 1 else 1} | {int(c['pdl'])} | "
                     f"{c['precision']} | {e['registers'] if e['ok'] else 'ERROR'} | {e['spill_bytes']} | {shared} | "
                     f"{e['mma']} |")
    return [*lines, ""]


def markdown(doc: dict) -> str:
    gluon = doc.get("gluon", [])
    lines = [f"# Static kernel report ({doc['date']}, triton {doc['triton']})", "",
             f"Device: {doc['device']}.", "",
             f"`{doc['command']}`: {len(doc['kernels']) + len(gluon)} compiles ({doc['cache_hits']} from the "
             f"cache), {doc['seconds']:.0f} s.", ""]
    bad = violations(doc)
    lines += [f"**Bounds**: {'all met' if not bad else f'{len(bad)} violations'} (compiles; no spill in 16-bit; "
              "shared memory within 227 KB on sm_90a, 163 KB on sm_80; the PTX each Gluon design names; every SM "
              "busy in the model's rows with B >= 64" + ("; the ratio targets" if doc.get("require_targets") else "")
              + ").", ""]
    lines += [f"- {b}" for b in bad[:50]]
    targets = doc.get("targets", [])
    missed = sorted({f"{t['gpu']} ({t['H']}, {t['B']}) {t['direction']}" for t in targets if not t["met"]})
    summary = f"{sum(t['met'] for t in targets)} of {len(targets)} checks met"
    lines += ["", "## Issue 22's done criteria (cost model v2, bf16)", "",
              summary + (f"; not met: {', '.join(missed)}" if missed else "") + ".", "",
              costmodel.targets_table(targets), ""]
    lines += static_gluon.markdown(gluon, doc.get("gluon_note", ""))
    lines += _kernels_table(doc["kernels"])
    lines += ["## Cost model v2 (one time step, `bench/kernels/costmodel.py`)", "", costmodel.table(doc["model"]), "",
              "Every design at each shape (predicted us; '-': does not apply):", "",
              costmodel.designs_table(doc["model"]), "", "### Its numbers", "", costmodel.sources_table(), "",
              "Assumptions `bench/kernels/gpu_check.sh` measures first: "
              + ", ".join(f"`{a}`" for a in costmodel.assumptions()) + ".", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/kernels/static.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "static.json", help="JSON report")
    p.add_argument("--md", type=Path, default=None, help="Markdown report (default: the JSON path with .md)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="results cache (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compile everything again")
    p.add_argument("--kernels", help="comma-separated subset of " + ",".join(_configs.KERNELS)
                   + " and the Gluon targets' names")
    p.add_argument("--dtypes", help="comma-separated subset of bf16,fp16,fp32")
    p.add_argument("--require-targets", action="store_true",
                   help="count a missed ratio target of issue 22 as a violation (exit 1)")
    p.add_argument("--quiet", action="store_true")
    return p


def _check_not_interpreted() -> None:
    """Refuse to run where Triton was imported under TRITON_INTERPRET (e.g. main() called from a
    process that imported torch with it set): every compile would fail on interpreter stand-ins."""
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    if not isinstance(standard.cdiv, JITFunction):
        raise SystemExit("bench/kernels/static.py: Triton was imported with TRITON_INTERPRET set, so it cannot "
                         "compile for a GPU target; run `python bench/kernels/static.py` as a command (it unsets "
                         "the variable first) or unset TRITON_INTERPRET before importing torch or triton")


def main(argv=None) -> int:
    _check_not_interpreted()
    args = build_parser().parse_args(argv)
    import triton

    gluon_jobs, gluon_note = static_gluon.jobs()
    all_jobs = jobs() + gluon_jobs
    if args.kernels:
        wanted = set(args.kernels.split(","))
        unknown = wanted - set(_configs.KERNELS) - {j["kernel"] for j in gluon_jobs}
        if unknown:
            print(f"static.py: unknown kernels {sorted(unknown)}", file=sys.stderr)
            return 1
        all_jobs = [j for j in all_jobs if j["kernel"] in wanted]
    if args.dtypes:
        wanted = set(args.dtypes.split(","))
        unknown = wanted - {label for label, *_ in DTYPES}
        if unknown:
            print(f"static.py: unknown dtypes {sorted(unknown)}", file=sys.stderr)
            return 1
        all_jobs = [j for j in all_jobs if j["dtype"] in wanted]
    start = time.perf_counter()

    def progress(done, total):
        if not args.quiet and (done == total or done % 20 == 0):
            print(f"   compiled {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    results, hits = run(all_jobs, max(1, args.jobs), None if args.no_cache else args.cache_dir, progress)
    model = costmodel.model_rows()
    import measure  # bench/measure.py: the host's name, as every results file gives it

    host = measure.cpu_name()
    doc = {
        "date": datetime.date.today().isoformat(), "triton": triton.__version__,
        # Nothing here ran on a GPU: the kernels were compiled ahead of time on this host, and the
        # model's rows are predictions for the GPUs it names.
        "device": f"none: compiled ahead of time for sm_90a and sm_80 on {host} (no GPU); the model "
                  f"predicts for {', '.join(costmodel.GPU_NAMES)}",
        "host": host,
        "command": "python bench/kernels/static.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "kernel_source": str(KERNEL_FILE.relative_to(REPO)), "source_key": source_key(),
        "gluon_source": str(static_gluon.PERSISTENT_DIR.relative_to(REPO)), "gluon_source_key": static_gluon.source_key(),
        "limits": {"shared_bytes": SMEM_LIMIT, "spill_bytes_16bit": 0},
        "cache_hits": hits, "seconds": round(time.perf_counter() - start, 1),
        "kernels": [r for r in results if r.get("kind") != "gluon"],
        "gluon": [r for r in results if r.get("kind") == "gluon"], "gluon_note": gluon_note,
        "model": model, "targets": costmodel.target_report(model), "require_targets": args.require_targets,
        "assumptions": costmodel.assumptions(),
        "model_gpus": {name: dataclasses.asdict(g) for name, g in costmodel.GPUS.items()},
    }
    from fastmlstm._atomic import atomic_write

    args.json.parent.mkdir(parents=True, exist_ok=True)
    md = args.md or args.json.with_suffix(".md")
    # Each file replaced whole: a report cut short leaves the previous one, never half of one.
    with atomic_write(args.json, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    with atomic_write(md, "w") as f:
        f.write(markdown(doc))
    bad = violations(doc)
    if not args.quiet:
        ok = sum(e["ok"] for e in results)
        print(f"== {len(results)} compiles ({hits} cached), {ok} ok, {len(bad)} bound violations, "
              f"{doc['seconds']:.0f} s; wrote {args.json} and {md}")
        for b in bad[:20]:
            print("   " + b)
        if gluon_note:
            print("   " + gluon_note)
        missed = [t for t in doc["targets"] if not t["met"]]
        print(f"== issue 22's targets: {len(doc['targets']) - len(missed)} of {len(doc['targets'])} checks met")
        for t in missed:
            print(f"   NOT met: {t['gpu']} H={t['H']} B={t['B']} {t['direction']} {t['design']}: {t['check']} "
                  f"{t['detail']} ({t['why_not']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
