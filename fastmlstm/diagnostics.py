"""Self-checks and environment facts: what ``fastmlstm info``, the benchmark's correctness gate and
the tests use to ask "does this backend compute the same function as the reference here?".

The parity bound is stated once, here (:func:`parity_tolerance`); the CLI, ``bench/`` and the tests
import it.
"""

from __future__ import annotations

import math
import platform

import torch

from .nn.modules import FastMLSTM
from .ops import registry
from .ops.registry import BACKENDS, backend_status

__all__ = ["environment", "cpu_kernels", "parity_tolerance", "self_check", "backend_report"]


def parity_tolerance(dtype: torch.dtype, *, tf32: bool = False) -> float:
    """Largest relative error a backend may show against a reference computation of the same cell.

    The question it answers is "is this the same function?", not "is it as accurate as it can be"
    (the test suite's per-dtype criteria in ``tests/tolerances.py`` ask that): a wrong gate order or
    a missed step gives errors of order 1. Measured on the self-check's problem (CPU): bfloat16
    1.8e-2, float16 1.7e-3, float32 under 1e-6; TF32 products (10-bit mantissas) on a GPU need 5e-3.

    Args:
        dtype: the weights' and activations' dtype.
        tf32: float32 matmuls may run in TF32 (``torch.backends.cuda.matmul.allow_tf32`` on a GPU).
    """
    if dtype == torch.float32:
        return 5e-3 if tf32 else 1e-4
    try:
        return {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    except KeyError:
        raise ValueError(f"no parity tolerance for {dtype}") from None


def self_check(device: torch.device | str, backend: str, dtype: torch.dtype = torch.float32) -> float:
    """Largest relative difference between ``backend`` and the reference on a small problem.

    The problem has weight norm, ragged lengths and a loss touching the output and both final
    states; the difference is max |a - b| / max(max |b|, 1) over the output, h_n, c_n and the
    gradients of the input and every parameter. Compare it with :func:`parity_tolerance`.

    Example::

        >>> err = fastmlstm.self_check("cpu", "reference")
        >>> err <= fastmlstm.diagnostics.parity_tolerance(torch.float32)
        True
    """
    device = torch.device(device)
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
        difference = ((a.float() - b.float()).abs().max() / scale).item()
        if not math.isfinite(difference):  # a NaN or inf on either side: max() would drop a NaN
            return math.inf
        worst = max(worst, difference)
    return worst


def environment() -> dict:
    """Versions of what fastmlstm runs on, the device it would use, and the CPU backend's kernels
    (:func:`cpu_kernels`)."""
    from ._version import __version__

    info = {"fastmlstm": __version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # not installed, or broken
        info["triton"] = f"unavailable ({type(exc).__name__})"
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info["cpu_kernels"] = cpu_kernels()
    return info


def cpu_kernels() -> dict:
    """What the ``cpu`` backend runs on this machine: the instruction set of its fused epilogues
    (``"avx512"``, ``"avx2"`` or the portable ``"default"``, chosen from what the CPU reports and
    ``ATEN_CPU_CAPABILITY``), the micro-kernels of its float32 and bfloat16 GEMMs (oneDNN's, with
    AVX-512-BF16 dot products or AMX tiles where the CPU has them; ``$FASTMLSTM_CPU_BF16`` chooses
    another), or why the backend is unavailable."""
    ok, why = backend_status("cpu", "cpu")
    if not ok:
        return {"available": False, "reason": why}
    return {"available": True, **registry.module("cpu").kernel_report()}


def backend_report(*, check: bool = True) -> dict[str, dict]:
    """For every device here and every backend: available or why not, and (``check``) the
    float32 self-check against the reference with its verdict."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report = {}
    for device in devices:
        for name in BACKENDS[1:]:
            ok, why = backend_status(name, device)
            entry: dict = {"available": ok}
            if not ok:
                entry["reason"] = why
            elif name != "reference" and check:
                err = self_check(device, name)
                entry["max_rel_diff_vs_reference"] = err
                entry["check"] = "pass" if err <= parity_tolerance(torch.float32) else "FAIL"
            report[f"{name}@{device.type}"] = entry
    return report
