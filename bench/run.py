"""Benchmark fastmlstm against torch.nn.LSTM (cuDNN) and plain / compiled PyTorch loops, in one run.

    python bench/run.py --preset cpu                      # what this CPU can measure, a few minutes
    python bench/run.py --preset gpu-targets              # the cases of issue 6's target table
    python bench/run.py --preset gpu --modes fwd+bwd --H 4096 --B 128 --dtypes bfloat16
    python bench/run.py --list                            # presets and implementations

Every measured mLSTM implementation first passes a correctness gate (bench/gate.py: ``check``);
one that fails is refused: listed under ``refused`` and never timed. Then for every case, every
implementation in turn: build, warm up, time (median of many calls, rotating input sets), one more
call for peak memory. Results go to ``bench/results/<device>-<date>.json`` with a Markdown table and
PNG plots beside it (bench/report.py); ``python bench/report.py <json> --doc docs/benchmarks.md``
regenerates the benchmark section of docs/benchmarks.md from it. Exit status 2 when an
implementation was refused.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import costmodel  # noqa: E402  (bench/kernels/costmodel.py: the prediction printed beside each GPU measurement)
import gate  # noqa: E402
import impls as implementations  # noqa: E402
import measure  # noqa: E402
import plots  # noqa: E402
import registry  # noqa: E402
import report  # noqa: E402
import workload  # noqa: E402

SCHEMA_VERSION = 1


def _number(kind, smallest, what):
    """An argparse type: ``kind`` of ``text``, at least ``smallest``, else a one-line usage error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= smallest:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


_POSITIVE = _number(int, 1, "a positive integer")
_NON_NEGATIVE_MS = _number(float, 0.0, "a number of milliseconds >= 0")


def _csv(kind):
    """An argparse type: a comma-separated list of ``kind``, not empty."""
    def parse(text):
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} lists no value")
        return values
    parse.__name__ = "comma-separated list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(registry.PRESETS),
                   help="shape grid, dtypes and implementations (default: gpu on CUDA machines, else cpu)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    p.add_argument("--impls", type=_csv(str), help=f"comma-separated subset of {', '.join(implementations.IMPLS)}")
    p.add_argument("--modes", type=_csv(str), help=f"comma-separated subset of {', '.join(registry.MODES)}")
    p.add_argument("--dtypes", type=_csv(str), help=f"comma-separated subset of {', '.join(registry.DTYPES)}")
    p.add_argument("--H", type=_csv(_POSITIVE), help="hidden sizes (replaces the preset grid, crossed with --B)")
    p.add_argument("--B", type=_csv(_POSITIVE), help="batch sizes (texts per batch for featurize)")
    p.add_argument("--T", type=_POSITIVE, help="time steps (fwd, fwd+bwd, train)")
    p.add_argument("--I", type=_POSITIVE, help="input size (byte-embedding size for featurize and train)")
    p.add_argument("--featurize-texts", type=_POSITIVE, help="number of SST-2 sentences featurized per call")
    p.add_argument("--tf32", choices=("default", "on", "off"), default=None,
                   help="TF32 for float32 matmuls and cuDNN on CUDA: 'default' leaves PyTorch's settings (matmul "
                        "off, cuDNN on); the GPU presets say 'off' so float32 rows compare IEEE float32 with itself")
    p.add_argument("--threads", type=_POSITIVE,
                   help="torch CPU threads (default: the preset's; cpu presets use 1 because the cores are shared)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--interleave", action="store_true",
                   help="CPU: time the implementations of each case call by call in turn (the cpu-targets preset "
                        "always does), so that their ratios see the same load")
    p.add_argument("--warmup-ms", type=_NON_NEGATIVE_MS)
    p.add_argument("--rep-ms", type=_NON_NEGATIVE_MS, help="time budget of the timed calls per case")
    p.add_argument("--min-runs", type=_POSITIVE, help="timed calls per case, at least")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for <device>-<date>.json, .md and plots")
    p.add_argument("--name", help="file stem instead of <device>-<date>")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="print the presets and implementations and exit")
    return p


def list_registry() -> None:
    print("implementations:")
    for name, impl in implementations.IMPLS.items():
        print(f"  {name:<24} modes {','.join(impl.modes)}")
    for name, preset in registry.PRESETS.items():
        cases = registry.expand(preset)
        print(f"preset {name}: device {preset['device']}, T={preset['T']}, I={preset['I']}, "
              f"dtypes {','.join(preset['dtypes'])}, {len(cases)} cases x {len(preset['impls'])} implementations")
        for mode, grid in preset["grid"].items():
            print(f"    {mode:<10} (H, B): {grid}")


def tf32_settings(choice: str, device: torch.device) -> dict:
    if choice != "default":
        torch.backends.cuda.matmul.allow_tf32 = choice == "on"
        torch.backends.cudnn.allow_tf32 = choice == "on"
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "applies": device.type == "cuda",
            "note": "fastmlstm's Triton kernels follow torch.backends.cuda.matmul.allow_tf32; cuDNN's LSTM "
                    "follows torch.backends.cudnn.allow_tf32 (PyTorch's default: on)"}


def roofline(record: dict, family: str, ceilings: dict, elem_bytes: int, batches, params: int) -> dict:
    flops, nbytes = workload.cost(family, record["mode"], record["hidden_size"], record["B"], record["T"],
                               record["I"], elem_bytes, batches, params)
    seconds = record["median_ms"] * 1e-3
    rate = ceilings["matmul_TFLOPs"].get(record["dtype"]) or ceilings["matmul_TFLOPs"].get("float32")
    t_bytes = nbytes / (ceilings["copy_GBps"] * 1e9)
    t_flops = flops / (rate * 1e12)
    return {"flops": flops, "bytes": nbytes, "floor_ms": max(t_bytes, t_flops) * 1e3,
            "bound": "memory" if t_bytes >= t_flops else "compute",
            "frac_bandwidth": t_bytes / seconds, "frac_compute": t_flops / seconds,
            "frac_roofline": max(t_bytes, t_flops) / seconds}


def build_case(impl: implementations.Impl, case: registry.Case, device: torch.device, ctx: dict):
    """(built case, first call's ms): the first call runs outside the timing (compilation,
    autotuning, lazy initialization)."""
    built = impl.build(case, device, ctx)
    t_first = time.perf_counter()
    built.call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return built, (time.perf_counter() - t_first) * 1e3


def case_record(impl: implementations.Impl, case: registry.Case, built, t: measure.Timing, first_call_ms: float,
                device: torch.device, ctx: dict, ceilings: dict) -> dict:
    """The result of one timed case: times, rates, memory (one more call), rooflines."""
    activation = measure.activation_memory_mb(built.call, device)
    static = measure.tensor_bytes(built.held()) / measure.MiB
    record = {
        "impl": impl.label(device), "mode": case.mode, "dtype": case.dtype, "H": case.H, "B": case.B, "T": case.T,
        "I": case.I, "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms,
        "n_runs": t.n_runs, "chars": built.chars, "chars_per_s": built.chars / (t.median_ms * 1e-3),
        "peak_mem_mb": None if activation is None else static + activation,
        "activation_mem_mb": activation, "static_mem_mb": static,
        "hidden_size": built.hidden_size, "params": built.params, "first_call_ms": first_call_ms,
        "kernel": implementations.kernel_description(impl, device),
    }
    if case.mode == "featurize":
        record["T"] = max(t for _, t in built.batches)
        record["texts"] = built.texts
        record["texts_per_s"] = built.texts / (t.median_ms * 1e-3)
        record["n_batches"] = len(built.batches)
    if case.mode == "step":
        record["T"] = 1
    record.update(built.notes)
    elem = registry.DTYPES[case.dtype].itemsize
    record["roofline"] = roofline(record, impl.family, ceilings, elem, built.batches, built.params)
    if case.mode == "featurize" and device.type == "cpu":
        record["step_gemm"] = step_gemm_roofline(record, impl.family, case, ctx)
    return record


def run_case(impl: implementations.Impl, case: registry.Case, device: torch.device, ctx: dict, ceilings: dict,
             timing: dict) -> dict:
    built, first_call_ms = build_case(impl, case, device, ctx)
    t = measure.time_calls(built.call, device, **timing)
    return case_record(impl, case, built, t, first_call_ms, device, ctx, ceilings)


def run_case_interleaved(impls: list, case: registry.Case, device: torch.device, ctx: dict, ceilings: dict,
                         timing: dict) -> tuple[list[dict], list[dict]]:
    """Every implementation of one case built first, then timed call by call in turn
    (measure.time_interleaved): the ratios between them see the same load. One that raises while
    being built (or in its first call) is an error; the others are still timed in turn.
    Returns (records, errors)."""
    built, errors = {}, []
    for impl in impls:
        try:
            built[impl.name] = (impl, *build_case(impl, case, device, ctx))
        except Exception as exc:
            errors.append(_error(impl, case, device, exc))
    if not built:
        return [], errors
    times = measure.time_interleaved({name: b[1].call for name, b in built.items()}, **timing)
    records = [case_record(impl, case, b, times[name], first, device, ctx, ceilings)
               for name, (impl, b, first) in built.items()]
    return records, errors


def step_gemm_roofline(record: dict, family: str, case: registry.Case, ctx: dict) -> dict:
    """Featurize against this machine's own GEMM at the step's shape, [B, H] x [H, gH] (g = 5 for
    the multiplicative LSTM, 4 for the LSTM), same dtype, same threads, measured now (once per
    shape in a run): the useful FLOPs (2 g H^2 per text byte: padding and finished rows count as
    waste) per second over that GEMM's FLOPs per second."""
    gates = 5 if family == "mlstm" else 4
    H = record["hidden_size"]
    key = (case.B, H, gates, case.dtype, torch.get_num_threads())
    cache = ctx.setdefault("step_gemm", {})
    if key not in cache:
        cache[key] = measure.step_gemm_rate(case.B, H, gates * H, registry.DTYPES[case.dtype])
    gemm = dict(cache[key])
    useful = 2.0 * gates * H * H * record["chars"]
    gemm["useful_GFLOPs"] = useful / (record["median_ms"] * 1e-3) / 1e9
    gemm["fraction"] = gemm["useful_GFLOPs"] / gemm["GFLOPs"]
    return gemm


def _verdict(passes: list[bool], missing: list) -> bool | None:
    """met (True) only when every case was measured and passes; missed (False) as soon as one
    measured case fails; otherwise not judged (None: nothing measured, or a case raised)."""
    if not all(passes):
        return False
    return True if passes and not missing else None


def judge_targets(doc: dict, preset: dict) -> list[dict]:
    """The preset's ratio and roofline targets over the run's results: for each, every case's
    ratio (time of the first (impl, dtype) over the second's at the same mode, H, B; only at the
    (H, B) of the preset's grid, which the targets are about) or fraction. A case either side of
    which raised (``doc["errors"]``) is listed as ``missing``: such a target is never "met"."""
    by_key = {(r["impl"], r["mode"], r["dtype"], r["H"], r["B"]): r for r in doc["results"]}
    failed = {(e["impl"], e["mode"], e["dtype"], e["H"], e["B"]) for e in doc.get("errors", ())}
    judged = []
    for name, mode, (impl, dtype), (other, other_dtype), limit in preset.get("ratio_targets", ()):
        sides = ((impl, dtype), (other, other_dtype))
        grid = set(preset["grid"].get(mode, ()))
        shapes = sorted({(H, B) for i, m, dt, H, B in [*by_key, *failed] if m == mode and (i, dt) in sides
                         and (H, B) in grid})
        cases, missing = [], []
        for H, B in shapes:
            r, o = (by_key.get((i, mode, dt, H, B)) for i, dt in sides)
            if r is not None and o is not None:
                cases.append({"H": H, "B": B, "ratio": r["median_ms"] / o["median_ms"]})
            elif any((i, mode, dt, H, B) in failed for i, dt in sides):
                missing.append({"H": H, "B": B})
        judged.append({"target": name, "limit": limit, "cases": cases, "missing": missing,
                       "met": _verdict([c["ratio"] <= limit for c in cases], missing)})
    for name, mode, H, limit in preset.get("roofline_targets", ()):
        cases = [{"impl": r["impl"], "dtype": r["dtype"], "H": r["H"], "B": r["B"],
                  "fraction": r["step_gemm"]["fraction"]}
                 for r in doc["results"] if r["mode"] == mode and r["H"] == H and "step_gemm" in r
                 and r["impl"].startswith("fastmlstm")]
        missing = [{"impl": i, "dtype": dt, "H": h, "B": b} for i, m, dt, h, b in sorted(failed)
                   if m == mode and h == H and i.startswith("fastmlstm")]
        judged.append({"target": name, "limit": limit, "cases": cases, "missing": missing,
                       "met": _verdict([c["fraction"] >= limit for c in cases], missing)})
    return judged


class UsageError(Exception):
    """A bad command line: printed as one ``run.py: ...`` line, exit status 1."""


def select(args: argparse.Namespace) -> tuple[str, dict, torch.device, list, list, dict]:
    """(preset name, preset, device, implementations, cases, timing) from the command line."""
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = registry.PRESETS[preset_name]
    try:
        device = torch.device(args.device or preset["device"])
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {args.device!r}; choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA is not available here; use --preset cpu (or --device cpu)")
    for kind, values, known in (("mode", args.modes, registry.MODES), ("dtype", args.dtypes, registry.DTYPES)):
        bad = [v for v in values or () if v not in known]
        if bad:
            raise UsageError(f"unknown {kind} {bad}; choose from {list(known)}")
    # Once each (nn-lstm is cudnn-lstm's name on a CPU): a second copy would give the same case two records.
    names = list(dict.fromkeys(implementations.ALIASES.get(n, n) for n in (args.impls or preset["impls"])))
    bad = [n for n in names if n not in implementations.IMPLS]
    if bad:
        raise UsageError(f"unknown implementation {bad}; choose from {list(implementations.IMPLS)}")
    cases = registry.expand(preset, args.modes, args.dtypes, args.H, args.B, args.T, args.I)
    if not cases:
        raise UsageError(f"nothing to time: preset {preset_name} has no {', '.join(args.modes or preset['grid'])} case "
                         "(give --H and --B, or see --list)")
    if not any(c.mode in implementations.IMPLS[n].modes for c in cases for n in names):
        raise UsageError("nothing to time: " + "; ".join(f"{n} times {', '.join(implementations.IMPLS[n].modes)} only"
                                                         for n in names))
    check_output(args)
    timing = dict(preset["timing"])
    for key, value in (("warmup_ms", args.warmup_ms), ("rep_ms", args.rep_ms), ("min_runs", args.min_runs)):
        if value is not None:
            timing[key] = value
    return preset_name, preset, device, [implementations.IMPLS[n] for n in names], cases, timing


def check_output(args: argparse.Namespace) -> None:
    """Before any timing: --name is a file stem and --out a folder this process can write, so a run
    of many minutes is not lost at its end."""
    if args.name is not None and (not args.name or args.name != Path(args.name).name or args.name in (".", "..")):
        raise UsageError(f"--name {args.name!r} must be a file stem without a folder (the folder is --out)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot create the folder ({exc.strerror})") from None
    if not args.out.is_dir() or not os.access(args.out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out}: not a writable folder")


def describe_run(args, argv, preset_name: str, preset: dict, device: torch.device, timing: dict) -> dict:
    """The results document's header: where, with what, and how it was measured."""
    threads = args.threads or preset.get("threads")
    if threads:
        torch.set_num_threads(threads)
    tf32 = tf32_settings(args.tf32 or preset.get("tf32", "default"), device)
    started = datetime.datetime.now(datetime.timezone.utc)
    return {
        "schema": SCHEMA_VERSION, "device": measure.device_name(device), "device_type": device.type,
        "cpu_features": measure.cpu_features() if device.type == "cpu" else None,
        **measure.versions(), **measure.git_commit(), "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "command": "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "preset": preset_name, "torch_threads": torch.get_num_threads(), "tf32": tf32,
        "load_average_start": measure.load_average(),
        "timing_method": ("CUDA events per call, L2 flushed between calls" if device.type == "cuda"
                          else "time.perf_counter per call") +
                         ("; the implementations of a case called in turn, call by call"
                          if device.type == "cpu" and (args.interleave or preset.get("interleave")) else "") +
                         f"; median of >= {timing['min_runs']} calls "
                          f"after warm-up, inputs rotated among several sets; {timing}",
        "memory_method": ("peak_mem_mb = static_mem_mb (parameters, optimizer state, one input set) + "
                          "activation_mem_mb (growth during one call: " +
                          ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                           "peak resident set after malloc_trim, via a /proc VmHWM reset; page-granular, includes "
                           "allocator fragmentation and library scratch")
                          + ")"),
    }


def gate_implementations(impls: list, cases: list, device: torch.device, ctx: dict, doc: dict) -> list:
    """Skip what cannot run here, refuse what fails the gate; the rest is timed. Fills ``doc``."""
    skipped, refused, checks, active = [], [], [], []
    for impl in impls:
        ok, why = impl.status(device)
        if not ok:
            skipped.append({"impl": impl.label(device), "reason": why})
            print(f"   skip {impl.label(device)}: {why}", flush=True)
            continue
        if impl.family == "mlstm":
            passed = True
            for dt in sorted({c.dtype for c in cases if c.mode in impl.modes}):
                result = gate.check(impl, registry.DTYPES[dt], device, ctx)
                checks.append(result)
                state = "pass" if result["passed"] else "FAIL"
                detail = result.get("error") or f"max rel err {result['max_rel_err']:.2e} ({result['worst']})"
                print(f"   check {impl.label(device)} {dt}: {state}, {detail}, tolerance {result['tolerance']:.0e}",
                      flush=True)
                passed &= result["passed"]
            if not passed:
                refused.append({"impl": impl.label(device), "reason": "failed the correctness gate (see checks)"})
                continue
        active.append(impl)
    doc.update(checks=checks, refused=refused, skipped=skipped)
    return active


def _report(record: dict, device: torch.device, device_name: str, ceilings: dict) -> None:
    label = f"{record['impl']:<22} {record['mode']:<9} {record['dtype']:<8} H={record['H']:<5} B={record['B']:<4}"
    mem = "n/a" if record["peak_mem_mb"] is None else f"{record['peak_mem_mb']:.1f} MiB"
    record["model"] = costmodel.annotate(record, device_name, ceilings) if device.type == "cuda" else None
    model = "" if not record["model"] else (f"  model {record['model']['predicted_ms']:.3f} ms"
                                            f" (floor {record['model']['floor_ms']:.3f})")
    print(f"   {label} {record['median_ms']:10.3f} ms  {record['chars_per_s']:12.0f} chars/s  "
          f"peak {mem}  roofline {record['roofline']['frac_roofline']:.1%}{model}", flush=True)


def _error(impl, case, device, exc: Exception) -> dict:
    message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"   {impl.label(device):<22} {case.mode:<9} {case.dtype:<8} H={case.H:<5} B={case.B:<4} ERROR {message}",
          flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()
    return {"impl": impl.label(device), **case.__dict__, "error": message}


def time_cases(active: list, cases: list, device: torch.device, ctx: dict, ceilings: dict,
               timing: dict, device_name: str, interleave: bool = False) -> tuple[list, list, list]:
    """Every case, every implementation in turn within it (same load, same minute; with
    ``interleave``, call by call): (results, errors, the cases an implementation does not time,
    with why). Where the interleaved timing itself raises, the case's implementations are timed
    one after another instead and their records say ``"interleaved": false``."""
    results, errors, skipped_cases = [], [], []
    for case in cases:
        impls = []
        for impl in active:
            if case.mode not in impl.modes:
                continue
            ok, why = impl.case_status(case, device, ctx)
            if ok:
                impls.append(impl)
            else:
                skipped_cases.append({"impl": impl.label(device), **case.__dict__, "reason": why})
        records, alone = [], {}
        if interleave and len(impls) > 1:
            try:
                records, failed = run_case_interleaved(impls, case, device, ctx, ceilings, timing)
                errors += failed
                impls = []
            except Exception as exc:  # time them one by one, which says which one failed
                print(f"   interleaved timing raised ({type(exc).__name__}): timing {case.mode} {case.dtype} "
                      f"H={case.H} B={case.B} one implementation after another", flush=True)
                alone = {"interleaved": False}
        for impl in impls:
            try:
                records.append({**run_case(impl, case, device, ctx, ceilings, timing), **alone})
            except Exception as exc:
                errors.append(_error(impl, case, device, exc))
            finally:
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
        for record in records:
            _report(record, device, device_name, ceilings)
        results += records
    return results, errors, skipped_cases


def write_results(doc: dict, args, device: torch.device) -> list[Path]:
    """The JSON, its Markdown table and (unless --no-plots) the PNG plots; returns the paths."""
    stem = args.name or f"{measure.slug(('cpu-' if device.type == 'cpu' else '') + doc['device'])}-{doc['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    report.write_atomic(path, json.dumps(doc, indent=1) + "\n")
    report.write_atomic(args.out / f"{stem}.md", report.markdown(doc, path.name))
    written = [path, args.out / f"{stem}.md"]
    if not args.no_plots:
        written += plots.plots(doc, args.out / stem)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        list_registry()
        return 0
    try:
        preset_name, preset, device, impls, cases, timing = select(args)
    except UsageError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 1
    doc = describe_run(args, argv, preset_name, preset, device, timing)
    ctx = {"compile_backend": args.compile_backend or preset.get("compile_backend", "inductor"),
           "impl_dtypes": preset.get("impl_dtypes", {}), "impl_max_H": preset.get("impl_max_H", {})}
    doc["compile_backend"] = ctx["compile_backend"]
    print(f"== {doc['device']} | torch {doc['torch']} | triton {doc['triton']} | cuda {doc['cuda']} | "
          f"commit {str(doc['commit'])[:10]}{' (dirty)' if doc['dirty'] else ''}", flush=True)

    dtypes_used = sorted({c.dtype for c in cases} | {"float32"}, key=list(registry.DTYPES).index)
    ceilings = measure.measure_ceilings(device, [registry.DTYPES[d] for d in dtypes_used], **preset["ceilings"])
    doc["ceilings"] = ceilings
    print(f"   copy {ceilings['copy_GBps']:.1f} GB/s; matmul " +
          ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in ceilings["matmul_TFLOPs"].items()), flush=True)
    if any(c.mode == "featurize" for c in cases):
        ctx["texts"], doc["featurize_data"] = workload.load_texts(args.featurize_texts or preset["featurize_texts"])

    active = gate_implementations(impls, cases, device, ctx, doc)
    interleave = device.type == "cpu" and (args.interleave or preset.get("interleave", False))
    doc["interleaved"] = interleave
    results, errors, skipped_cases = time_cases(active, cases, device, ctx, ceilings, timing, doc["device"],
                                                interleave)
    doc.update(errors=errors, results=results, skipped_cases=skipped_cases, load_average_end=measure.load_average(),
               finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if preset.get("ratio_targets") or preset.get("roofline_targets"):
        doc["targets_judged"] = judge_targets(doc, preset)
        print("\n".join(report.judged_table(doc["targets_judged"])), flush=True)
    written = write_results(doc, args, device)
    print("== wrote " + ", ".join(str(p) for p in written), flush=True)
    if doc["refused"]:
        print("== refused (not reported): " + ", ".join(r["impl"] for r in doc["refused"]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
