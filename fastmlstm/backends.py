"""Backend choice for the multiplicative-LSTM recurrence.

Backends, fastest first: ``"triton"`` (fused Triton kernels, CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``), ``"cuda"`` (the C++/CUDA extension built from ``csrc/``), ``"cpu"`` (the
C++ CPU extension built from ``csrc/cpu/``, CPU tensors) and ``"reference"`` (a plain PyTorch loop,
any device). ``"auto"`` picks the fastest one that works for the tensors at hand and logs once when
it has to fall back.

The environment variable ``FASTMLSTM_BACKEND`` overrides every ``backend="auto"`` (the default of
the module and the functional op); an explicit ``backend=`` argument always wins over it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from .errors import InputError

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "resolve_backend",
]

logger = logging.getLogger("fastmlstm")

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_BACKEND = "FASTMLSTM_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says how to get it."""


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # torch.compile runs it eagerly and keeps its value: no import traced
def _import_status(module: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"{type(exc).__name__}: {exc}"
    ok, why = mod.is_available()
    return ok, why


# The C++ extensions: backend name (= the device type it runs on) -> (what the messages call it, what
# its first-use build needs, the README section about it).
_EXTENSIONS = {
    "cuda": ("CUDA", "nvcc, ninja and a CUDA build of PyTorch", "CUDA extension"),
    "cpu": ("CPU", "a C++ compiler and ninja", "CPU extension"),
}


def backend_status(backend: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` (default: CUDA if present, else CPU), and why not.

    Returns ``(True, "")`` when it can, else ``(False, reason)`` where the reason ends with how to
    get the backend.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if backend == "reference":
        return True, ""
    if backend == "triton":
        ok, why = _import_status("fastmlstm.ops.triton")
        if not ok:
            return False, f"Triton is not usable ({why}); install it with `pip install triton` (Linux)"
        if device.type == "cuda" or _interpret_mode():
            return True, ""
        return False, (
            f"the Triton kernels run on CUDA tensors, not {device.type}; "
            "set TRITON_INTERPRET=1 before importing fastmlstm to run them through Triton's interpreter"
        )
    if backend in _EXTENSIONS:
        kind, needs, section = _EXTENSIONS[backend]
        if device.type != backend:
            return False, f"the {kind} extension runs on {kind} tensors, not {device.type}"
        ok, why = _import_status(f"fastmlstm.ops.{backend}")
        if not ok:
            return False, (f"the {kind} extension is not usable ({why}); it builds on first use and needs {needs} "
                           f"(see README, '{section}')")
        return True, ""
    raise InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device``, fastest first (``"reference"`` is always there)."""
    return [b for b in BACKENDS[1:] if backend_status(b, device)[0]]


@functools.lru_cache(maxsize=None)
def _log_once(message: str, level: int) -> None:
    logger.log(level, message)


def _check_name(backend: object, origin: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"{origin} must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` (one of :data:`BACKENDS`) into the concrete backend that runs on ``device``.

    ``"auto"`` (after applying ``FASTMLSTM_BACKEND``) gives the CPU extension > reference for CPU
    tensors, Triton > CUDA extension > reference for CUDA tensors and the reference loop for any
    other device. An explicit backend that cannot run raises :class:`BackendUnavailableError`.
    """
    backend = _check_name(backend, "backend")
    if backend == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip().lower()
        if forced:
            backend = _check_name(forced, f"the environment variable {ENV_BACKEND}")
    if backend != "auto":
        ok, why = backend_status(backend, device)
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
        return backend
    if device.type not in ("cuda", "cpu"):
        _log_once(f"fastmlstm: {device.type} tensors run on the reference PyTorch loop", logging.INFO)
        return "reference"
    reasons = []
    for candidate in ("triton", "cuda") if device.type == "cuda" else ("cpu",):
        ok, why = backend_status(candidate, device)
        if ok:
            if reasons:
                _log_once(f"fastmlstm: falling back to the {candidate!r} backend: {'; '.join(reasons)}",
                          logging.WARNING)
            return candidate
        reasons.append(f"{candidate}: {why}")
    _log_once(f"fastmlstm: falling back to the slow 'reference' backend: {'; '.join(reasons)}", logging.WARNING)
    return "reference"
