"""``fastmlstm generate``: sample text, optionally with units held fixed (steered generation).

:mod:`fastmlstm.cli` adds this parser to its own (its ``main`` is the entry point, and its
``cmd_generate`` the function the command runs).
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import argument_bytes, load_model, to_json, unit_from_probe
from .errors import InputError
from .options import argument


def fixed_unit(text: str) -> tuple[int, float]:
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


def _check_choices(args) -> None:
    """Refuse, before the model is loaded, flags that contradict each other or would be ignored."""
    if args.fix and (args.steer is not None or args.probe is not None):
        raise InputError("use either --fix or --steer/--probe, not both")
    if args.steer is not None and args.probe is not None:
        raise InputError("use either --steer UNIT or --probe RESULTS.json (which names the unit), not both")
    if args.unit_sign is not None and args.probe is not None:
        raise InputError("--unit-sign does not go with --probe: the probe's results give the unit's sign")
    if args.unit_sign is not None and args.steer is None:
        raise InputError("--unit-sign flips --steer's values; give --steer UNIT too")


def _write_line(data: bytes) -> None:
    """One line of generated text, as bytes: the prefix's bytes as the user gave them and the sample
    in UTF-8 reach stdout whatever its encoding (an ASCII terminal would refuse U+FFFD in a str)."""
    stream = sys.stdout
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a text-only stream put in place of stdout
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(data.decode(encoding, errors="replace") + "\n")
        return
    buffer.write(data + b"\n")
    buffer.flush()


def cmd_generate(args) -> int:
    from .probe import steer

    fixed = _parse_fixed(args.fix)
    _check_choices(args)
    prefix = argument_bytes(args.prefix, "--prefix")  # the shell's bytes, invalid UTF-8 included
    steer_unit, sign = args.steer, args.unit_sign or 1
    if args.probe is not None:
        steer_unit, sign = unit_from_probe(args.probe)
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    common = {"num_samples": args.num_samples, "top_k": args.top_k, "seed": args.seed}
    if steer_unit is not None:
        samples = steer(model, steer_unit, unit_sign=sign, prefix=prefix, n_bytes=args.n_bytes,
                        temperature=args.temperature, **common)
    else:
        raw = model.generate(prefix, args.n_bytes, args.temperature, fixed_units=fixed or None, **common)
        samples = {"samples": [s.decode("utf-8", errors="replace") for s in raw]}
    if args.json:
        print(to_json({"prefix": prefix.decode("utf-8", errors="replace"),
                     "fixed_units": {str(k): v for k, v in fixed.items()}, "steer_unit": steer_unit, **samples}))
    else:
        for name, group in samples.items():
            for i, text in enumerate(group):
                print(f"--- {name} {i + 1}")
                _write_line(prefix + text.encode("utf-8"))
    return 0


def add_parser(sub, model_args) -> argparse.ArgumentParser:
    """The ``generate`` subparser (its ``func`` is set by the caller)."""
    p = sub.add_parser("generate", help="sample text; --fix / --steer hold units (steered generation)",
                       description="Sample bytes from the model after --prefix. Without --json each sample is "
                       "printed as '--- NAME I' and then the prefix (its bytes as given) and the sample, in UTF-8 "
                       "(sampled bytes that are not UTF-8 shown as U+FFFD); --json prints one JSON object.")
    model_args(p)
    p.add_argument("--prefix", default="\n ", help="text to continue (default: the paper's start token)")
    p.add_argument("--n-bytes", type=argument("n_bytes"), default=200, help="bytes to sample (default 200)")
    p.add_argument("--num-samples", type=argument("num_samples"), default=1)
    p.add_argument("--temperature", type=argument("temperature"), default=1.0,
                   help="softmax temperature, >= 0 (0: the most likely byte)")
    p.add_argument("--top-k", type=argument("top_k"), default=None, help="sample among the k most likely bytes")
    p.add_argument("--seed", type=argument("seed"), default=None)
    p.add_argument("--fix", action="append", type=fixed_unit, metavar="UNIT=VALUE",
                   help="hold a unit's cell value (repeatable)")
    p.add_argument("--steer", type=argument("unit"), metavar="UNIT", help="samples with UNIT held at +1 and at -1")
    p.add_argument("--unit-sign", type=int, choices=(1, -1), default=None,
                   help="with --steer: -1 flips its values (default 1)")
    p.add_argument("--probe", help="JSON from `fastmlstm probe`: steer its sentiment unit (and sign)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p
