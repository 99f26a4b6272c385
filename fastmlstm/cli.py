"""The ``fastmlstm`` command line.

    fastmlstm info        versions, the backends usable here, and a quick parity self-check
    fastmlstm featurize   the paper's features of texts -> a [N, H] float32 .npy file
    fastmlstm probe       one of the paper's evaluations; prints one JSON object, writes plots
    fastmlstm visualize   colour a text by a unit's cell value (HTML and/or PNG)
    fastmlstm generate    sample text, optionally with units held fixed (steered generation)
    fastmlstm download    fetch an evaluation set into $FASTMLSTM_DATA

--model takes a fastmlstm model file or checkpoint, or a directory in the released 15-.npy layout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from . import __version__
from .backends import BACKENDS, backend_status
from .modules import FastMLSTM


def _versions() -> dict:
    info = {"fastmlstm": __version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # not installed, or broken
        info["triton"] = f"unavailable ({type(exc).__name__})"
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def self_check(device: torch.device, backend: str, dtype: torch.dtype = torch.float32) -> float:
    """Largest relative difference between ``backend`` and the reference on a small problem
    (output, final states and every gradient)."""
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 5, 24
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    results = []
    for name in ("reference", backend):
        torch.manual_seed(1)
        rnn = FastMLSTM(I, H, backend=name, device=device, dtype=dtype)
        xi = x.clone().requires_grad_()
        out, (h, c) = rnn(xi, lengths=[T, T - 2, 1])
        loss = out.float().pow(2).sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [xi, *rnn.parameters()])
        results.append([out, h, c, *grads])
    worst = 0.0
    for a, b in zip(*results):
        scale = b.float().abs().max().clamp_min(1.0)
        worst = max(worst, ((a.float() - b.float()).abs().max() / scale).item())
    return worst


def cmd_info(args) -> int:
    info = _versions()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok_all = True
    info["backends"] = {}
    for device in devices:
        for name in BACKENDS[1:]:
            ok, why = backend_status(name, device)
            entry = {"available": ok}
            if not ok:
                entry["reason"] = why
            elif name != "reference" and not args.no_check:
                err = self_check(device, name)
                entry["max_rel_diff_vs_reference"] = err
                entry["check"] = "pass" if err < 1e-4 else "FAIL"
                ok_all &= err < 1e-4
            info["backends"][f"{name}@{device.type}"] = entry
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key in ("fastmlstm", "python", "torch", "triton", "cuda", "device"):
            print(f"{key:>10}: {info[key]}")
        print("  backends:")
        for key, entry in info["backends"].items():
            if not entry["available"]:
                print(f"    {key:<16} unavailable: {entry['reason']}")
            elif "check" in entry:
                print(f"    {key:<16} {entry['check']} (max rel. diff vs reference {entry['max_rel_diff_vs_reference']:.1e})")
            else:
                print(f"    {key:<16} available")
    return 0 if ok_all else 1


# ------------------------------------------------------------------------------------------------
# The probe toolkit's commands. Their imports stay inside the functions: `fastmlstm info` must not
# pay for scikit-learn and matplotlib.

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """A problem with the command's input, reported as one line without a traceback."""


def load_model(path: str, *, device: str | None = None, dtype: str | None = None, backend: str = "auto"):
    """A ByteLM from a fastmlstm model file / checkpoint, or a released-layout directory."""
    from pathlib import Path

    from .checkpoint import load
    from .openai_weights import load_openai

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _DTYPES[dtype] if dtype else None
    if Path(path).is_dir():
        model = load_openai(path, device=device, dtype=torch_dtype, backend=backend)
    else:
        model = load(path, map_location=device, backend=backend)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    return model.eval()


def _read_texts(args) -> list:
    """Texts from --text (repeatable) or --input (one text per line, '-' for stdin)."""
    from pathlib import Path

    texts = list(args.text or [])
    if args.input is not None:
        from .datasets import decode

        data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
        lines = decode(data).split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final line ending
        texts += [line.rstrip("\r") for line in lines]
    return texts


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="fastmlstm model file/checkpoint, or a released-layout directory")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the model (default: as stored)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="recurrence backend")


def cmd_featurize(args) -> int:
    import time

    import numpy as np

    from .probe import featurize

    if args.dataset:
        from . import datasets

        name, _, split = args.dataset.partition(":")
        splits = datasets.load(name, args.data_dir)
        split = split or next(iter(splits))
        if split not in splits:
            raise CommandError(f"{name} has splits {', '.join(splits)}, not {split!r}")
        if not hasattr(splits[split], "texts"):
            raise CommandError(f"{name} is a dataset of text pairs; featurize its sentences with --input")
        texts = splits[split].texts
    else:
        texts = _read_texts(args)
    if not texts:
        raise CommandError("no texts: give --text, --input FILE (one text per line) or --dataset NAME[:SPLIT]")
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    start = time.perf_counter()
    features = featurize(model, texts, batch_size=args.batch_size, activation=None if args.raw else "tanh",
                         progress=False if args.no_progress else None)
    seconds = time.perf_counter() - start
    np.save(args.output, features)
    chars = sum(len(t.encode("utf-8", errors="surrogateescape")) if isinstance(t, str) else len(t) for t in texts)
    print(json.dumps({"output": args.output, "shape": list(features.shape), "dtype": str(features.dtype),
                      "texts": len(texts), "chars": chars, "seconds": round(seconds, 3),
                      "chars_per_s": round(chars / seconds, 1) if seconds > 0 else None}))
    return 0


def cmd_probe(args) -> int:
    from pathlib import Path

    from .probe import evaluate, plot_data_efficiency, plot_unit_histogram

    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    result = evaluate(model, args.task, root=args.data_dir, limit=args.limit, seed=args.seed, curve=args.curve,
                      curve_draws=args.draws, batch_size=args.batch_size,
                      progress=False if args.no_progress else None)
    metrics = dict(result.metrics)
    if args.plots:
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
        metrics["plots"] = written
    text = json.dumps(metrics)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def _unit_from_probe(path: str) -> tuple[int, int]:
    from pathlib import Path

    try:
        record = json.loads(Path(path).read_text())
        unit, sign = record["sentiment_unit"], record.get("unit_sign") or 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"--probe {path}: expected the JSON that `fastmlstm probe` prints, with a "
                           f"sentiment_unit ({type(exc).__name__}: {exc})") from None
    if unit is None:
        raise CommandError(f"--probe {path}: that probe found no sentiment unit (it used no feature); give --unit")
    return int(unit), int(sign)


def cmd_visualize(args) -> int:
    from .probe import visualize_text

    if args.unit is None and args.probe is None:
        raise CommandError("say which unit: --unit U, or --probe RESULTS.json from `fastmlstm probe`")
    unit = args.unit if args.unit is not None else _unit_from_probe(args.probe)[0]
    if not (args.html or args.png):
        raise CommandError("say where to write: --html FILE and/or --png FILE")
    texts = _read_texts(args)
    if len(texts) != 1:
        raise CommandError(f"visualize takes one text (--text or a one-line --input), got {len(texts)}")
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    if not 0 <= unit < model.hidden_size:
        raise CommandError(f"unit {unit} is outside [0, {model.hidden_size})")
    chars = visualize_text(model, texts[0], unit, html_path=args.html, png_path=args.png, scale=args.scale,
                           width=args.width)
    values = [v for _, v in chars]
    print(json.dumps({"unit": unit, "chars": len(chars), "html": args.html, "png": args.png,
                      "min": min(values, default=None), "max": max(values, default=None),
                      "final": values[-1] if values else None}))
    return 0


def _parse_fixed(items: list[str]) -> dict[int, float]:
    fixed = {}
    for item in items or []:
        unit, sep, value = item.partition("=")
        try:
            fixed[int(unit)] = float(value)
        except ValueError:
            raise CommandError(f"--fix takes UNIT=VALUE (e.g. 2388=1.0), got {item!r}") from None
        if not sep:
            raise CommandError(f"--fix takes UNIT=VALUE (e.g. 2388=1.0), got {item!r}")
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
            raise CommandError("use either --fix or --steer/--probe, not both")
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
    from .download import download

    folder = download(args.name, root=args.root, mirror=args.mirror, force=args.force,
                      progress=not args.no_progress)
    print(json.dumps({"dataset": args.name, "folder": str(folder)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmlstm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, usable backends and a parity self-check")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-check", action="store_true", help="skip the parity self-check")
    p.set_defaults(func=cmd_info)

    from .datasets import DATASETS  # light: the task names without importing scikit-learn

    p = sub.add_parser("featurize", help="the paper's features of texts -> .npy [N, H] float32",
                       description="Features: tanh of the final cell state after the paper's preprocessing. "
                       "Prints a JSON summary (shape, characters/s).")
    _model_args(p)
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--input", help="file with one text per line (every line is a row), '-' for stdin")
    p.add_argument("--dataset", help="NAME[:SPLIT] of an evaluation set, e.g. sst2:dev")
    p.add_argument("--data-dir", help="the dataset's folder (default $FASTMLSTM_DATA/<folder>)")
    p.add_argument("--output", "-o", required=True, help="where the .npy goes")
    p.add_argument("--batch-size", type=int, default=None, help="texts per fused pass (default 512)")
    p.add_argument("--raw", action="store_true", help="the raw final cell state, without tanh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("probe", help="one of the paper's evaluations; prints one JSON object",
                       description="Featurize a task's data, fit the L1 linear probe (C on dev), and print "
                       "task, accuracy, C, features used, sentiment unit and its accuracy as one JSON object.")
    _model_args(p)
    p.add_argument("--task", required=True, choices=list(DATASETS))
    p.add_argument("--data-dir", help="the dataset's folder (default $FASTMLSTM_DATA/<folder>)")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per split (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", action="store_true", help="also the data-efficiency curve (splits tasks)")
    p.add_argument("--draws", type=int, default=10, help="random draws per size for --curve")
    p.add_argument("--plots", help="folder for the PNGs (unit histogram; data efficiency with --curve)")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("visualize", help="colour a text by a unit's cell value (HTML/PNG)")
    _model_args(p)
    p.add_argument("--unit", type=int, help="the unit (e.g. 2388 for the released model)")
    p.add_argument("--probe", help="JSON from `fastmlstm probe`: use its sentiment unit")
    p.add_argument("--text", action="append", help="the text")
    p.add_argument("--input", help="a file holding the text on one line, '-' for stdin")
    p.add_argument("--html", help="write the self-contained HTML page here")
    p.add_argument("--png", help="write the PNG here")
    p.add_argument("--scale", type=float, default=None, help="value at full colour (default: largest |value|)")
    p.add_argument("--width", type=int, default=80, help="characters per line in the PNG")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("generate", help="sample text; --fix / --steer hold units (steered generation)")
    _model_args(p)
    p.add_argument("--prefix", default="\n ", help="text to continue (default: the paper's start token)")
    p.add_argument("--n-bytes", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fix", action="append", metavar="UNIT=VALUE", help="hold a unit's cell value (repeatable)")
    p.add_argument("--steer", type=int, metavar="UNIT", help="samples with UNIT held at +1 and at -1")
    p.add_argument("--unit-sign", type=int, choices=(1, -1), default=1, help="flip --steer's values")
    p.add_argument("--probe", help="JSON from `fastmlstm probe`: steer its sentiment unit (and sign)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("download", help="fetch an evaluation set into $FASTMLSTM_DATA (with checksums)")
    from .download import SOURCES

    p.add_argument("name", choices=sorted(SOURCES))
    p.add_argument("--root", help="data folder (default $FASTMLSTM_DATA or ~/.cache/fastmlstm/data)")
    p.add_argument("--mirror", help="fetch <mirror>/<filename> instead of the canonical URLs")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return args.func(args)
    from urllib.error import URLError

    try:
        return args.func(args)
    except (CommandError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, URLError) as exc:
        # Bad input (a missing file, an unknown split, texts that cannot be encoded, one-class
        # labels...) is reported in one line; anything else keeps its traceback.
        print(f"fastmlstm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
