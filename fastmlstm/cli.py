"""The ``fastmlstm`` command line.

    fastmlstm info        versions, the backends usable here, and a quick parity self-check
    fastmlstm train       train the byte language model (the same job as train.py)
    fastmlstm featurize   the paper's features of texts -> a [N, H] float32 .npy file
    fastmlstm probe       one of the paper's evaluations; prints one JSON object, writes plots
    fastmlstm visualize   colour a text by a unit's cell value (HTML and/or PNG)
    fastmlstm generate    sample text, optionally with units held fixed (steered generation)
    fastmlstm download    fetch an evaluation set into $FASTMLSTM_DATA, or a pretrained model into $FASTMLSTM_MODELS

--model takes a fastmlstm model file or checkpoint, a model folder (config.json + model.safetensors, or the
released 15-.npy layout), a registered name (openai-sentiment, downloaded on first use) or a Hugging Face
Hub id (user/repo, with huggingface_hub installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .cli_common import (
    INPUT_ENCODINGS,
    check_file,
    check_folder,
    encoding_arg,
    finite,
    load_model,
    model_args,
    read_texts,
    to_json,
    unit_from_probe,
    write_file,
)
from .cli_generate import add_parser as add_generate_parser
from .cli_generate import cmd_generate
from .diagnostics import backend_report, environment, parity_tolerance
from .errors import InputError, out_of_memory
from .ops.registry import BackendUnavailableError
from .options import ArgumentParser, argument

__all__ = ["INPUT_ENCODINGS", "build_parser", "load_model", "main"]


def cmd_info(args) -> int:
    info = environment()
    info["backends"] = backend_report(check=not args.no_check)
    info["self_check_tolerance"] = parity_tolerance(torch.float32)
    ok_all = all(entry.get("check", "pass") == "pass" for entry in info["backends"].values())
    if args.json:
        print(json.dumps(finite(info), indent=2, allow_nan=False))
        return 0 if ok_all else 1
    for key in ("fastmlstm", "python", "torch", "triton", "cuda", "device"):
        print(f"{key:>10}: {info[key]}")
    kernels = info["cpu_kernels"]
    if kernels["available"]:
        grads = "oneDNN micro-kernel tiles" if kernels["weight_grad_gemm"] == "tiles" else "MKL"
        print(f"{'cpu':>10}: epilogues {kernels['epilogues']}; float32 GEMMs {kernels['float32_gemm']}; "
              f"bfloat16 GEMMs {kernels['bf16_gemm']}: {kernels['bf16_gemm_kernels']}; float32 gradients "
              f"beside the time loop by {grads}; narrow bfloat16 steps at "
              f"up to {kernels['streamed_rows']['max_rows']} rows from "
              f"{kernels['streamed_rows']['from_MiB']} MiB of weights; buffer cache "
              f"{kernels['buffer_cache_MiB']['held']} of {kernels['buffer_cache_MiB']['limit']} MiB held")
    print("  backends:")
    for key, entry in info["backends"].items():
        if not entry["available"]:
            print(f"    {key:<16} unavailable: {entry['reason']}")
        elif "check" in entry:
            print(f"    {key:<16} {entry['check']} (max rel. diff vs reference "
                  f"{entry['max_rel_diff_vs_reference']:.1e}, tolerance {info['self_check_tolerance']:.0e})")
        else:
            print(f"    {key:<16} available")
    return 0 if ok_all else 1


# ------------------------------------------------------------------------------------------------
# The probe toolkit's commands. Their imports stay inside the functions: `fastmlstm info` must not
# pay for scikit-learn and matplotlib.

def _dataset_texts(args) -> list:
    """The texts of --dataset NAME[:SPLIT] (default: the set's first split)."""
    from .data import datasets

    if args.text or args.input is not None:
        raise InputError("give the texts either with --dataset or with --text/--input, not both")
    if args.input_encoding is not None:
        raise InputError("--input-encoding says how to read --input's lines; --dataset files have their own rule")
    name, colon, split = args.dataset.partition(":")
    if not name or (colon and not split):
        raise InputError(f"--dataset takes NAME or NAME:SPLIT (e.g. sst2:dev), got {args.dataset!r}")
    splits = datasets.load(name, args.data_dir)
    split = split or next(iter(splits))
    if split not in splits:
        raise InputError(f"{name} has splits {', '.join(splits)}, not {split!r}")
    if not hasattr(splits[split], "texts"):
        raise InputError(f"{name} is a dataset of text pairs; featurize its sentences with --input")
    return splits[split].texts


def cmd_featurize(args) -> int:
    import time

    import numpy as np

    from .probe import featurize

    if args.data_dir is not None and args.dataset is None:
        raise InputError("--data-dir is the folder of --dataset's files; give --dataset NAME[:SPLIT] too")
    check_file("--output", args.output)
    texts = _dataset_texts(args) if args.dataset is not None else read_texts(args)
    if not texts:
        raise InputError("no texts: give --text, --input FILE (one text per line) or --dataset NAME[:SPLIT]")
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    start = time.perf_counter()
    features = featurize(model, texts, batch_size=args.batch_size, activation=None if args.raw else "tanh",
                         progress=False if args.no_progress else None)
    seconds = time.perf_counter() - start
    write_file(args.output, lambda f: np.save(f, features))
    chars = sum(len(t.encode("utf-8", errors="surrogateescape")) if isinstance(t, str) else len(t) for t in texts)
    print(to_json({"output": args.output, "shape": list(features.shape), "dtype": str(features.dtype),
                      "texts": len(texts), "chars": chars, "seconds": round(seconds, 3),
                      "chars_per_s": round(chars / seconds, 1) if seconds > 0 else None}))
    return 0


def _probe_plots(args, result, metrics: dict) -> dict:
    """Write the probe's PNGs into --plots; returns {name: path} of those written."""
    from .probe import plot_data_efficiency, plot_unit_histogram

    plots = Path(args.plots)
    written = {}
    if result.probe is not None and result.probe.sentiment_unit is not None:
        unit = result.probe.sentiment_unit
        written["unit_histogram"] = str(plot_unit_histogram(
            result.eval_features[:, unit], result.eval_labels, plots / f"{args.task}_unit_histogram.png",
            unit=unit, class_names=("objective", "subjective") if args.task == "subj" else None,
            title=f"{args.task}: unit {unit} on {metrics.get('evaluated_on', 'evaluation data')}"))
    if result.curve is not None:
        paper = metrics.get("paper", {}).get("accuracy")
        written["data_efficiency"] = str(plot_data_efficiency(
            result.curve, plots / f"{args.task}_data_efficiency.png", title=f"{args.task}: data efficiency",
            reference={"paper (full data)": paper} if paper else None))
    return written


def _check_curve(args) -> None:
    """--curve where the task's protocol draws no curve, and --draws without --curve, would be ignored."""
    from .data.datasets import DATASETS

    protocol = DATASETS[args.task].protocol
    if args.curve and protocol in ("cv10", "relatedness"):
        raise InputError(f"--curve: {args.task} is evaluated by {'cross-validation' if protocol == 'cv10' else 'regression'}"
                         f" ({protocol}), which draws no data-efficiency curve; the tasks with one: "
                         + ", ".join(k for k, v in DATASETS.items() if v.protocol not in ("cv10", "relatedness")))
    if args.draws is not None and not args.curve:
        raise InputError("--draws is the number of random draws per size of --curve's curve; give --curve too")


def cmd_probe(args) -> int:
    from .probe import evaluate

    _check_curve(args)
    check_folder("--plots", args.plots)
    check_file("--output", args.output)
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    result = evaluate(model, args.task, root=args.data_dir, limit=args.limit, seed=args.seed, curve=args.curve,
                      curve_draws=10 if args.draws is None else args.draws, batch_size=args.batch_size,
                      progress=False if args.no_progress else None)
    metrics = dict(result.metrics)
    if args.plots:
        try:
            metrics["plots"] = _probe_plots(args, result, metrics)
        except OSError as exc:
            raise InputError(f"cannot write the plots into {args.plots}: {exc.strerror or exc}") from None
    text = to_json(metrics)
    if args.output:
        write_file(args.output, lambda f: f.write(text + "\n"), mode="w")
    print(text)
    return 0


def _check_destinations(args) -> None:
    """--html / --png: at least one, not the same file, each writable; --width only with --png."""
    if not (args.html or args.png):
        raise InputError("say where to write: --html FILE and/or --png FILE")
    if args.html and args.png and os.path.realpath(args.html) == os.path.realpath(args.png):
        raise InputError(f"--html and --png name the same file {args.html}; the picture would replace the page")
    if args.width is not None and not args.png:
        raise InputError("--width sets the PNG's characters per line; give --png FILE too")
    check_file("--html", args.html)
    check_file("--png", args.png)


def _destination(args, filename) -> str:
    """The flag and path a failed write was for (the error names the temporary file beside it)."""
    for flag, path in (("--html", args.html), ("--png", args.png)):
        if path and filename:
            name, target = Path(filename), Path(path)
            if name == target or (name.parent == target.parent and name.name.startswith(f".{target.name}.")):
                return f"{flag} {path}"
    return str(filename) if filename else "the picture"


def cmd_visualize(args) -> int:
    from .probe import visualize_text

    if args.unit is None and args.probe is None:
        raise InputError("say which unit: --unit U, or --probe RESULTS.json from `fastmlstm probe`")
    if args.unit is not None and args.probe is not None:
        raise InputError("use either --unit U or --probe RESULTS.json (which names the unit), not both")
    unit = args.unit if args.unit is not None else unit_from_probe(args.probe)[0]
    _check_destinations(args)
    texts = read_texts(args)
    if len(texts) != 1:
        raise InputError(f"visualize takes one text (--text or a one-line --input), got {len(texts)}")
    if not texts[0]:
        raise InputError("the text is empty: there is nothing to colour")
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    if not 0 <= unit < model.hidden_size:
        raise InputError(f"unit {unit} is outside [0, {model.hidden_size})")
    try:
        chars = visualize_text(model, texts[0], unit, html_path=args.html, png_path=args.png, scale=args.scale,
                               width=80 if args.width is None else args.width)
    except OSError as exc:  # an --html/--png destination that cannot be written
        raise InputError(f"cannot write {_destination(args, exc.filename)}: {exc.strerror or exc}") from None
    values = [v for _, v in chars]
    print(to_json({"unit": unit, "chars": len(chars), "html": args.html, "png": args.png,
                 "min": min(values, default=None), "max": max(values, default=None),
                 "final": values[-1] if values else None}))
    return 0


def cmd_download(args) -> int:
    from .data.download import download
    from .models.pretrained import MODELS, download_model, model_files

    if args.mirror is not None and not args.mirror.strip():
        raise InputError("--mirror is empty: give the base URL to fetch <mirror>/<filename> from")
    common = {"root": args.root, "mirror": args.mirror, "force": args.force, "progress": not args.no_progress,
              "timeout": args.timeout}
    try:
        if args.name in MODELS:
            folder = download_model(args.name, **common)
            files = [{"file": f.filename, "url": MODELS[args.name].url(f.filename, args.mirror), "size": f.size,
                      "blob_id": f.blob_id} for f in model_files(args.name)]
            print(to_json({"model": args.name, "folder": str(folder), "files": files}))
            return 0
        folder = download(args.name, **common)
    except OSError as exc:  # e.g. a --root that is a file or unwritable, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        raise InputError(f"cannot download {args.name} (--root {args.root or 'default'}): {where}"
                         f"{exc.strerror or exc}") from None
    print(to_json({"dataset": args.name, "folder": str(folder)}))
    return 0


def cmd_train(args) -> int:
    from .training import train
    from .training.config import resolve
    from .training.distributed import init_context

    args = resolve(args)
    ctx = init_context()
    try:
        return train(args, ctx)
    finally:
        ctx.close()


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, usable backends and a parity self-check")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-check", action="store_true", help="skip the parity self-check")
    p.set_defaults(func=cmd_info)


def _add_train(sub) -> None:
    from .training.config import DESCRIPTION, add_arguments

    p = sub.add_parser("train", help="train the byte language model (one CPU, one GPU, or torchrun)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def _add_featurize(sub) -> None:
    p = sub.add_parser("featurize", help="the paper's features of texts -> .npy [N, H] float32",
                       description="Features: tanh of the final cell state after the paper's preprocessing. "
                       "Prints a JSON summary (shape, characters/s).")
    model_args(p)
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--input", help="file with one text per line (every line is a row), '-' for stdin")
    encoding_arg(p)
    p.add_argument("--dataset", help="NAME[:SPLIT] of an evaluation set, e.g. sst2:dev (default: its first split); "
                   "instead of --text/--input")
    p.add_argument("--data-dir", help="the dataset's folder (default $FASTMLSTM_DATA/<folder>)")
    p.add_argument("--output", "-o", required=True, help="where the .npy goes")
    p.add_argument("--batch-size", type=argument("batch_size"), default=None, help="texts per fused pass (default 512)")
    p.add_argument("--raw", action="store_true", help="the raw final cell state, without tanh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_featurize)


def _add_probe(sub) -> None:
    from .data.datasets import DATASETS  # light: the task names without importing scikit-learn

    p = sub.add_parser("probe", help="one of the paper's evaluations; prints one JSON object",
                       description="Featurize a task's data, fit the L1 linear probe (C on dev), and print "
                       "task, accuracy, C, features used, sentiment unit and its accuracy as one JSON object.")
    model_args(p)
    p.add_argument("--task", required=True, choices=list(DATASETS))
    p.add_argument("--data-dir", help="the dataset's folder (default $FASTMLSTM_DATA/<folder>)")
    p.add_argument("--limit", type=argument("limit"), default=None,
                   help="at most this many examples per split (quick runs)")
    p.add_argument("--seed", type=argument("seed"), default=0)
    p.add_argument("--curve", action="store_true",
                   help="also the data-efficiency curve (the tasks with train/dev/test splits and msrp)")
    p.add_argument("--draws", type=argument("draws"), default=None,
                   help="random draws per size for --curve (default 10)")
    p.add_argument("--plots", help="folder for the PNGs (unit histogram; data efficiency with --curve)")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--batch-size", type=argument("batch_size"), default=None, help="texts per fused pass")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="colour a text by a unit's cell value (HTML/PNG)")
    model_args(p)
    p.add_argument("--unit", type=argument("unit"), help="the unit (e.g. 2388 for the released model)")
    p.add_argument("--probe", help="JSON from `fastmlstm probe`: use its sentiment unit (instead of --unit)")
    p.add_argument("--text", action="append", help="the text")
    p.add_argument("--input", help="a file holding the text on one line, '-' for stdin")
    encoding_arg(p)
    p.add_argument("--html", help="write the self-contained HTML page here")
    p.add_argument("--png", help="write the PNG here (or the format the suffix names: .pdf, .svg, ...)")
    p.add_argument("--scale", type=argument("scale"), default=None,
                   help="value at full colour, > 0 (default: largest |value|)")
    p.add_argument("--width", type=argument("width"), default=None,
                   help="characters per line in the PNG (default 80)")
    p.set_defaults(func=cmd_visualize)


def _add_generate(sub) -> None:
    add_generate_parser(sub, model_args).set_defaults(func=cmd_generate)


def _add_download(sub) -> None:
    from .data.download import SOURCES
    from .models.pretrained import MODELS

    p = sub.add_parser("download", help="fetch an evaluation set or a pretrained model (with checksums)",
                       description="Datasets go to $FASTMLSTM_DATA (default ~/.cache/fastmlstm/data); models to "
                       "$FASTMLSTM_MODELS/<name> (default ~/.cache/fastmlstm/models), each file checked against "
                       "its published git blob id; a re-run re-checks the files present, offline. Models: "
                       + "; ".join(f"{m.name}: {m.description}" for m in MODELS.values()))
    p.add_argument("name", choices=sorted(SOURCES) + sorted(MODELS))
    p.add_argument("--root", help="data folder for a dataset (default $FASTMLSTM_DATA or ~/.cache/fastmlstm/data); "
                   "models folder for a model (default $FASTMLSTM_MODELS or ~/.cache/fastmlstm/models)")
    p.add_argument("--mirror", help="fetch <mirror>/<filename> instead of the canonical URLs")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.add_argument("--timeout", type=argument("timeout"), default=None, metavar="SECONDS",
                   help="deadline for the whole download, every file and retry included (default: one hour "
                   "per file); a transfer that stalls (under 16 KiB in 60 s) is retried from where it stopped")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)


COMMANDS = (_add_info, _add_train, _add_featurize, _add_probe, _add_visualize, _add_generate, _add_download)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fastmlstm", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _detach_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that the interpreter's final flush of
    what is still buffered does not fail again ("Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout with no file descriptor (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status. Bad input (a malformed command line, a number
    out of range or not finite, and the :class:`~fastmlstm.errors.InputError` family: a missing or
    foreign file, an unknown split, texts that cannot be encoded, one-class labels...) is reported
    as one ``fastmlstm <command>: error: ...`` line with exit status 2, and so are a backend that
    cannot run here (:class:`~fastmlstm.ops.BackendUnavailableError`) and an allocation that fails
    (out of memory); anything else is a bug and keeps its traceback. Ctrl-C is one line too, with
    exit status 130 (training checkpoints first), and a closed stdout (``| head``) ends the command
    quietly with 141, the shell's statuses for SIGINT and SIGPIPE."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a malformed command line already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away is found here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        print(f"fastmlstm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _detach_stdout()
        return 141
    except (InputError, BackendUnavailableError) as exc:  # the latter: an explicit backend that cannot run here
        print(f"fastmlstm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:  # an allocation that failed: one line too, not a traceback
        if not out_of_memory(exc):
            raise
        print(f"fastmlstm {args.command}: error: out of memory: {str(exc).strip().splitlines()[0][:300]}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
