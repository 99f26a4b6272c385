"""The ``fastmlstm`` command line.

    fastmlstm info     versions, the backends usable here, and a quick parity self-check
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmlstm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, usable backends and a parity self-check")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-check", action="store_true", help="skip the parity self-check")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
