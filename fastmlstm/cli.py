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

from ._atomic import atomic_write
from .diagnostics import backend_report, environment, parity_tolerance
from .errors import InputError, MissingInputError, out_of_memory
from .ops.registry import BACKENDS, BackendUnavailableError, resolve_backend
from .options import ArgumentParser, argument, check


def cmd_info(args) -> int:
    info = environment()
    info["backends"] = backend_report(check=not args.no_check)
    info["self_check_tolerance"] = parity_tolerance(torch.float32)
    ok_all = all(entry.get("check", "pass") == "pass" for entry in info["backends"].values())
    if args.json:
        print(json.dumps(info, indent=2))
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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, *, device: str | None = None, dtype: str | None = None, backend: str = "auto"):
    """A ByteLM from what --model names (see :func:`fastmlstm.models.serialization.load_model`).

    --device is checked first (a device this machine lacks is the flag's fault, not the file's),
    and --backend against the model's device before any work is done with it."""
    from .models._checks import check_device
    from .models.serialization import load_model as load

    check_device(device, "--device")
    model = load(path, device=device, dtype=_DTYPES[dtype] if dtype else None, backend=backend)
    if backend != "auto":  # auto always runs (FASTMLSTM_BACKEND naming one that cannot: main says so)
        try:
            resolve_backend(backend, next(model.parameters()).device)
        except BackendUnavailableError as exc:
            raise InputError(f"--backend {backend}: {exc}") from None
    return model


def _write(path: str, write, mode: str = "wb") -> None:
    """Write ``path`` atomically with ``write(file)`` (a reader, or a crash, sees the old file or the
    whole new one); an unwritable destination is the user's input, reported in one line."""
    if Path(path).is_dir():
        raise InputError(f"cannot write {path}: it is a directory (give a file name)")
    try:
        with atomic_write(path, mode) as f:
            write(f)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _read_file(flag: str, path: str) -> bytes:
    """The bytes of the file a flag names; a missing file, a directory or an unreadable file is one line."""
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file")
    if not file.exists():
        raise MissingInputError(f"{flag} {path}: no such file")
    try:
        return file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


# How --input lines become the model's bytes. "bytes" is what the Python API does with bytes: the
# line exactly as stored, invalid UTF-8 included (a byte model reads any byte).
INPUT_ENCODINGS = ("bytes", "utf-8", "utf-8-or-cp1252")


def _decode_line(line: bytes, number: int, encoding: str, source: str) -> bytes | str:
    if encoding == "bytes":
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        if encoding == "utf-8":
            raise InputError(f"{source}, line {number}: not valid UTF-8 (byte {exc.start}); use "
                             "--input-encoding bytes to featurize the bytes as they are") from None
    from .data.datasets import decode  # the evaluation sets' rule: such a line is Windows-1252

    return decode(line)


def _argument_bytes(text: str) -> bytes:
    """A command-line text as the bytes the shell passed (Python decoded them with surrogateescape)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError as exc:
        raise InputError(f"--text holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
                         "which no bytes encode") from None


def _read_texts(args) -> list:
    """Texts from --text (repeatable) and --input (one text per line, '-' for stdin).

    Both give the model the bytes the user gave: --text values as the command line's bytes
    (``os.fsencode``), --input lines per ``--input-encoding`` (default: their bytes as stored).
    """
    texts = [_argument_bytes(t) for t in args.text or []]
    if args.input is not None:
        data = sys.stdin.buffer.read() if args.input == "-" else _read_file("--input", args.input)
        if not data:
            raise InputError(f"--input {'(stdin)' if args.input == '-' else args.input} is empty: it holds "
                             "no texts (one text per line)")
        if args.input_encoding != "bytes":
            data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is the file's, not the text's
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the final line ending
        source = "stdin" if args.input == "-" else args.input
        texts += [_decode_line(line.removesuffix(b"\r"), n, args.input_encoding, source)
                  for n, line in enumerate(lines, 1)]
    return texts


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model file/checkpoint, model folder (config.json + model.safetensors, or the released "
                   "layout), registered name (openai-sentiment) or Hugging Face Hub id (user/repo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the model (default: as stored)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="recurrence backend")


def cmd_featurize(args) -> int:
    import time

    import numpy as np

    from .probe import featurize

    if args.dataset:
        from .data import datasets

        name, _, split = args.dataset.partition(":")
        splits = datasets.load(name, args.data_dir)
        split = split or next(iter(splits))
        if split not in splits:
            raise InputError(f"{name} has splits {', '.join(splits)}, not {split!r}")
        if not hasattr(splits[split], "texts"):
            raise InputError(f"{name} is a dataset of text pairs; featurize its sentences with --input")
        texts = splits[split].texts
    else:
        texts = _read_texts(args)
    _check_file("--output", args.output)
    if not texts:
        raise InputError("no texts: give --text, --input FILE (one text per line) or --dataset NAME[:SPLIT]")
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    start = time.perf_counter()
    features = featurize(model, texts, batch_size=args.batch_size, activation=None if args.raw else "tanh",
                         progress=False if args.no_progress else None)
    seconds = time.perf_counter() - start
    _write(args.output, lambda f: np.save(f, features))
    chars = sum(len(t.encode("utf-8", errors="surrogateescape")) if isinstance(t, str) else len(t) for t in texts)
    print(json.dumps({"output": args.output, "shape": list(features.shape), "dtype": str(features.dtype),
                      "texts": len(texts), "chars": chars, "seconds": round(seconds, 3),
                      "chars_per_s": round(chars / seconds, 1) if seconds > 0 else None}))
    return 0


def _blocking_file(path: Path) -> Path | None:
    """The file that stands where ``path`` or one of its folders should be, if any."""
    for folder in (path, *path.parents):
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def _check_folder(flag: str, path: str | None) -> None:
    """Refuse, before any work, a folder flag that names a file (or lies under one)."""
    if path is not None and (blocking := _blocking_file(Path(path))) is not None:
        raise InputError(f"{flag} {path}: {blocking} is a file, not a folder")


def _check_file(flag: str, path: str | None) -> None:
    """Refuse, before any work, a file flag that names a directory, lies under a file or in a
    folder that does not exist."""
    if path is None:
        return
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    if (blocking := _blocking_file(Path(path).parent)) is not None:
        raise InputError(f"{flag} {path}: {blocking} is a file, not a folder")
    if not Path(path).parent.is_dir():  # found before the work, not when its result is to be written
        raise MissingInputError(f"cannot write {flag} {path}: its folder {Path(path).parent} does not exist")


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


def cmd_probe(args) -> int:
    from .probe import evaluate

    _check_folder("--plots", args.plots)
    _check_file("--output", args.output)
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    result = evaluate(model, args.task, root=args.data_dir, limit=args.limit, seed=args.seed, curve=args.curve,
                      curve_draws=args.draws, batch_size=args.batch_size,
                      progress=False if args.no_progress else None)
    metrics = dict(result.metrics)
    if args.plots:
        try:
            metrics["plots"] = _probe_plots(args, result, metrics)
        except OSError as exc:
            raise InputError(f"cannot write the plots into {args.plots}: {exc.strerror or exc}") from None
    text = json.dumps(metrics)
    if args.output:
        _write(args.output, lambda f: f.write(text + "\n"), mode="w")
    print(text)
    return 0


def _unit_from_probe(path: str) -> tuple[int, int]:
    """(sentiment unit, its sign) from the JSON that ``fastmlstm probe`` printed."""
    data = _read_file("--probe", path)
    try:
        record = json.loads(data)
        unit, sign = record["sentiment_unit"], record.get("unit_sign") or 1
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"--probe {path}: expected the JSON that `fastmlstm probe` prints, with a "
                         f"sentiment_unit ({type(exc).__name__}: {exc})") from None
    if unit is None:
        raise InputError(f"--probe {path}: that probe found no sentiment unit (it used no feature); give --unit")
    if sign not in (1, -1) or isinstance(sign, bool):
        raise InputError(f"--probe {path}: unit_sign must be 1 or -1, got {sign!r}")
    return check("unit", unit, f"--probe {path}: sentiment_unit"), int(sign)


def cmd_visualize(args) -> int:
    from .probe import visualize_text

    if args.unit is None and args.probe is None:
        raise InputError("say which unit: --unit U, or --probe RESULTS.json from `fastmlstm probe`")
    unit = args.unit if args.unit is not None else _unit_from_probe(args.probe)[0]
    if not (args.html or args.png):
        raise InputError("say where to write: --html FILE and/or --png FILE")
    _check_file("--html", args.html)
    _check_file("--png", args.png)
    texts = _read_texts(args)
    if len(texts) != 1:
        raise InputError(f"visualize takes one text (--text or a one-line --input), got {len(texts)}")
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    if not 0 <= unit < model.hidden_size:
        raise InputError(f"unit {unit} is outside [0, {model.hidden_size})")
    try:
        chars = visualize_text(model, texts[0], unit, html_path=args.html, png_path=args.png, scale=args.scale,
                               width=args.width)
    except OSError as exc:  # an --html/--png destination that cannot be written
        raise InputError(f"cannot write {exc.filename or 'the picture'}: {exc.strerror or exc}") from None
    values = [v for _, v in chars]
    print(json.dumps({"unit": unit, "chars": len(chars), "html": args.html, "png": args.png,
                      "min": min(values, default=None), "max": max(values, default=None),
                      "final": values[-1] if values else None}))
    return 0


def _fixed_unit(text: str) -> tuple[int, float]:
    """argparse's ``type=`` for ``--fix UNIT=VALUE``: a unit >= 0 and a finite cell value."""
    unit, sep, value = text.partition("=")
    form = f"takes UNIT=VALUE (e.g. 2388=1.0), got {text!r}"
    if not sep:
        raise argparse.ArgumentTypeError(form)
    try:
        return argument("unit")(unit.strip()), argument("cell_value")(value.strip())
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{form}: {'UNIT' if not _is_unit(unit) else 'VALUE'} {exc}") from None


def _is_unit(text: str) -> bool:
    try:
        argument("unit")(text.strip())
    except argparse.ArgumentTypeError:
        return False
    return True


def _parse_fixed(items: list[tuple[int, float]] | None) -> dict[int, float]:
    fixed = {}
    for unit, value in items or []:
        if unit in fixed:
            raise InputError(f"--fix names unit {unit} twice")
        fixed[unit] = value
    return fixed


def cmd_generate(args) -> int:
    from .probe import steer

    fixed = _parse_fixed(args.fix)
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    steer_unit, sign = args.steer, args.unit_sign
    if args.probe is not None:
        steer_unit, sign = _unit_from_probe(args.probe)
    common = {"num_samples": args.num_samples, "top_k": args.top_k, "seed": args.seed}
    if steer_unit is not None:
        if fixed:
            raise InputError("use either --fix or --steer/--probe, not both")
        samples = steer(model, steer_unit, unit_sign=sign, prefix=args.prefix, n_bytes=args.n_bytes,
                        temperature=args.temperature, **common)
    else:
        raw = model.generate(args.prefix, args.n_bytes, args.temperature, fixed_units=fixed or None, **common)
        samples = {"samples": [s.decode("utf-8", errors="replace") for s in raw]}
    if args.json:
        print(json.dumps({"prefix": args.prefix, "fixed_units": {str(k): v for k, v in fixed.items()},
                          "steer_unit": steer_unit, **samples}))
    else:
        for name, group in samples.items():
            for i, text in enumerate(group):
                print(f"--- {name} {i + 1}")
                print(args.prefix + text)
    return 0


def cmd_download(args) -> int:
    from .data.download import download
    from .models.pretrained import MODELS, download_model, model_files

    common = {"root": args.root, "mirror": args.mirror, "force": args.force, "progress": not args.no_progress,
              "timeout": args.timeout}
    try:
        if args.name in MODELS:
            folder = download_model(args.name, **common)
            files = [{"file": f.filename, "url": MODELS[args.name].url(f.filename, args.mirror), "size": f.size,
                      "blob_id": f.blob_id} for f in model_files(args.name)]
            print(json.dumps({"model": args.name, "folder": str(folder), "files": files}))
            return 0
        folder = download(args.name, **common)
    except OSError as exc:  # e.g. a --root that is a file or unwritable, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        raise InputError(f"cannot download {args.name} (--root {args.root or 'default'}): {where}"
                         f"{exc.strerror or exc}") from None
    print(json.dumps({"dataset": args.name, "folder": str(folder)}))
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


def _encoding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-encoding", choices=INPUT_ENCODINGS, default="bytes",
                   help="bytes (default): each line's bytes as stored, as the Python API treats bytes; utf-8: "
                        "an invalid line is an error; utf-8-or-cp1252: such a line is read as Windows-1252 "
                        "(the evaluation sets' rule)")


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
    _model_args(p)
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--input", help="file with one text per line (every line is a row), '-' for stdin")
    _encoding_arg(p)
    p.add_argument("--dataset", help="NAME[:SPLIT] of an evaluation set, e.g. sst2:dev")
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
    _model_args(p)
    p.add_argument("--task", required=True, choices=list(DATASETS))
    p.add_argument("--data-dir", help="the dataset's folder (default $FASTMLSTM_DATA/<folder>)")
    p.add_argument("--limit", type=argument("limit"), default=None,
                   help="at most this many examples per split (quick runs)")
    p.add_argument("--seed", type=argument("seed"), default=0)
    p.add_argument("--curve", action="store_true", help="also the data-efficiency curve (splits tasks)")
    p.add_argument("--draws", type=argument("draws"), default=10, help="random draws per size for --curve")
    p.add_argument("--plots", help="folder for the PNGs (unit histogram; data efficiency with --curve)")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--batch-size", type=argument("batch_size"), default=None, help="texts per fused pass")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="colour a text by a unit's cell value (HTML/PNG)")
    _model_args(p)
    p.add_argument("--unit", type=argument("unit"), help="the unit (e.g. 2388 for the released model)")
    p.add_argument("--probe", help="JSON from `fastmlstm probe`: use its sentiment unit")
    p.add_argument("--text", action="append", help="the text")
    p.add_argument("--input", help="a file holding the text on one line, '-' for stdin")
    _encoding_arg(p)
    p.add_argument("--html", help="write the self-contained HTML page here")
    p.add_argument("--png", help="write the PNG here")
    p.add_argument("--scale", type=argument("scale"), default=None,
                   help="value at full colour, > 0 (default: largest |value|)")
    p.add_argument("--width", type=argument("width"), default=80, help="characters per line in the PNG")
    p.set_defaults(func=cmd_visualize)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text; --fix / --steer hold units (steered generation)")
    _model_args(p)
    p.add_argument("--prefix", default="\n ", help="text to continue (default: the paper's start token)")
    p.add_argument("--n-bytes", type=argument("n_bytes"), default=200, help="bytes to sample (default 200)")
    p.add_argument("--num-samples", type=argument("num_samples"), default=1)
    p.add_argument("--temperature", type=argument("temperature"), default=1.0,
                   help="softmax temperature, >= 0 (0: the most likely byte)")
    p.add_argument("--top-k", type=argument("top_k"), default=None, help="sample among the k most likely bytes")
    p.add_argument("--seed", type=argument("seed"), default=None)
    p.add_argument("--fix", action="append", type=_fixed_unit, metavar="UNIT=VALUE",
                   help="hold a unit's cell value (repeatable)")
    p.add_argument("--steer", type=argument("unit"), metavar="UNIT", help="samples with UNIT held at +1 and at -1")
    p.add_argument("--unit-sign", type=int, choices=(1, -1), default=1, help="flip --steer's values")
    p.add_argument("--probe", help="JSON from `fastmlstm probe`: steer its sentiment unit (and sign)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)


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
    parser = ArgumentParser(prog="fastmlstm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status. Bad input (a malformed command line, a number
    out of range or not finite, and the :class:`~fastmlstm.errors.InputError` family: a missing or
    foreign file, an unknown split, texts that cannot be encoded, one-class labels...) is reported
    as one ``fastmlstm <command>: error: ...`` line with exit status 2, and so are a backend that
    cannot run here (:class:`~fastmlstm.ops.BackendUnavailableError`) and an allocation that fails
    (out of memory); anything else is a bug and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a malformed command line already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
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
