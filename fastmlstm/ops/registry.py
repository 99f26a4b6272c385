"""The backends of the recurrence, listed once, and the choice among them.

Each backend is a package of :mod:`fastmlstm.ops` with the interface of
:class:`fastmlstm.ops.interface.BackendModule` (availability check, the sequence entry points
``forward``/``backward``, optionally the whole-layer entry points ``layer_forward``/
``layer_backward``). :data:`REGISTRY` maps each name to a :class:`Backend`: what it runs on, what
its first use needs, and an import function that loads its package on first use (so that the
package imports with no GPU, no compiler and no Triton).

``"auto"`` picks the fastest backend that works for the tensors at hand and logs once when it has
to fall back; the environment variable ``FASTMLSTM_BACKEND`` overrides every ``backend="auto"``,
and an explicit ``backend=`` argument always wins over it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from ..errors import InputError

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "REGISTRY",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "module",
    "resolve_backend",
]

logger = logging.getLogger("fastmlstm")

ENV_BACKEND = "FASTMLSTM_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says how to get it."""


def _load_triton() -> ModuleType:
    from . import triton

    return triton


def _load_cuda() -> ModuleType:
    from . import cuda

    return cuda


def _load_cpu() -> ModuleType:
    from . import cpu

    return cpu


def _load_reference() -> ModuleType:
    from . import reference

    return reference


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the device types it runs on (None: any), the activation dtypes it
    takes, what it needs to be usable (said when it is not), the function that imports its
    package, and whether, without a backward, it stops computing rows past their length inside a
    call (callers that sort rows longest first then lose nothing to padding)."""

    name: str
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    summary: str
    needs: str
    load: Callable[[], ModuleType]
    skips_finished_rows: bool = False


# Fastest first: "auto" tries them in this order for the device at hand.
REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("triton", ("cuda",), KERNEL_DTYPES, "fused Triton step kernels", "`pip install triton` (Linux)",
                _load_triton),
        Backend("cuda", ("cuda",), KERNEL_DTYPES, "C++/CUDA extension from csrc/",
                "nvcc, ninja and a CUDA build of PyTorch (see docs/backends.md, 'CUDA extension')", _load_cuda),
        Backend("cpu", ("cpu",), KERNEL_DTYPES, "C++ CPU extension from csrc/cpu/",
                "a C++ compiler and ninja (see docs/backends.md, 'CPU extension')", _load_cpu,
                skips_finished_rows=True),
        Backend("reference", None, (*KERNEL_DTYPES, torch.float64),
                "plain PyTorch loop: the specification and the fallback", "nothing", _load_reference),
    )
}
# The names every ``backend=`` accepts.
BACKENDS = ("auto", *REGISTRY)


def module(name: str) -> ModuleType:
    """The package of backend ``name`` (imported on first use)."""
    try:
        return REGISTRY[name].load()
    except KeyError:
        raise ValueError(f"unknown recurrence backend {name!r}; choose one of {tuple(REGISTRY)}") from None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_STATUS: dict[str, tuple[bool, str]] = {}


@torch.compiler.assume_constant_result  # torch.compile runs it eagerly and keeps its value: no import traced
def _package_status(name: str) -> tuple[bool, str]:
    """Whether backend ``name``'s package loads here, and why not; found once per process. (A dict,
    not functools.lru_cache: Dynamo looks through an lru_cache wrapper, warning, whatever its mark.)"""
    if name not in _STATUS:
        try:
            _STATUS[name] = REGISTRY[name].load().is_available()
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _STATUS[name] = False, f"{type(exc).__name__}: {exc}"
    return _STATUS[name]


_package_status.cache_clear = _STATUS.clear  # as an lru_cache's: tests start from a fresh process's state


def _pretty(device_type: str) -> str:
    return device_type.upper() if device_type in ("cuda", "cpu") else device_type


def backend_status(backend: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` (default: CUDA if present, else CPU), and why not.

    Returns ``(True, "")`` when it can, else ``(False, reason)`` where the reason ends with how to
    get the backend.
    """
    if backend not in REGISTRY:
        raise InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    entry = REGISTRY[backend]
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    runs_here = entry.devices is None or device.type in entry.devices
    if backend == "triton" and device.type == "cpu" and _interpret_mode():
        runs_here = True  # Triton's interpreter runs the kernels on CPU tensors
    if not runs_here:
        hint = ("; set TRITON_INTERPRET=1 before importing fastmlstm to run them through Triton's interpreter"
                if backend == "triton" else "")
        return False, (f"the {backend!r} backend runs on {'/'.join(_pretty(d) for d in entry.devices)} tensors, "
                       f"not {_pretty(device.type)} tensors{hint}")
    ok, why = _package_status(backend)
    if not ok:
        return False, f"the {backend!r} backend is not usable ({why}); it needs {entry.needs}"
    return True, ""


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device``, fastest first (``"reference"`` is always there)."""
    return [name for name in REGISTRY if backend_status(name, device)[0]]


@functools.lru_cache(maxsize=None)
def _log_once(message: str, level: int) -> None:
    logger.log(level, message)


def _check_name(backend: object, origin: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"{origin} must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``backend`` (one of :data:`BACKENDS`) into the concrete backend that runs on ``device``
    (with activations of ``dtype``, when given).

    ``"auto"`` (after applying ``FASTMLSTM_BACKEND``) gives the first usable backend of
    :data:`REGISTRY` made for the device and dtype (Triton > CUDA extension > reference for CUDA
    tensors, the CPU extension > reference for CPU tensors; float64 runs on the reference loop) and
    the reference loop for any other device. An explicit backend that cannot run raises
    :class:`BackendUnavailableError`.
    """
    backend = _check_name(backend, "backend")
    if backend == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip().lower()
        if forced:
            backend = _check_name(forced, f"the environment variable {ENV_BACKEND}")
    if backend != "auto":
        ok, why = backend_status(backend, device)
        if ok and dtype is not None and dtype not in REGISTRY[backend].dtypes:
            ok, why = False, (f"it takes {', '.join(str(d) for d in REGISTRY[backend].dtypes)} tensors, not {dtype} "
                              f"(backend='reference' takes {dtype})" if backend != "reference" else "")
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
        return backend
    candidates = [b.name for b in REGISTRY.values() if b.devices is not None and device.type in b.devices
                  and (dtype is None or dtype in b.dtypes)]
    if not candidates:
        what = device.type if dtype is None or dtype in KERNEL_DTYPES else f"{dtype} {device.type}"
        _log_once(f"fastmlstm: {what} tensors run on the reference PyTorch loop", logging.INFO)
        return "reference"
    reasons = []
    for candidate in candidates:
        ok, why = backend_status(candidate, device)
        if ok:
            if reasons:
                _log_once(f"fastmlstm: falling back to the {candidate!r} backend: {'; '.join(reasons)}",
                          logging.WARNING)
            return candidate
        reasons.append(f"{candidate}: {why}")
    _log_once(f"fastmlstm: falling back to the slow 'reference' backend: {'; '.join(reasons)}", logging.WARNING)
    return "reference"
