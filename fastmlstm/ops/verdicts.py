"""Verdicts on kernels that no CPU can check, reached once per device and software and kept on disk.

A kernel that only a GPU runs (a persistent recurrence, a CUDA-graphed loop) is never trusted
blindly: on first use for a key (device name, driver, CUDA runtime, torch, Triton and fastmlstm
versions, the kernel's own source, dtype, shape class) it is checked against the tested path and
timed, and the outcome, a :class:`Verdict`, is written as one JSON file per key in
:func:`cache_dir`. A changed key part names another file, so the check runs again; a corrupt file
is ignored (one log line) and rewritten. A verdict under another key for the same candidate,
device and case (an older driver; or another environment sharing the folder: another torch,
another source tree) is removed only once it is :data:`STALE_S` old, so that two environments
taking turns do not delete each other's verdicts.

What "checked" means is the library's accuracy rule (:func:`parity`): against a float64 run, the
candidate's error may be at most ``FACTOR`` times the tested path's error in the same dtype plus
``ABS[dtype]``, for every output, final state and gradient.

Three protections against a kernel that misbehaves while it is checked:

- the check runs under a time bound (:func:`bounded`): past it the verdict is "failed", and while
  that check's thread still runs (it cannot be stopped) no other check starts in this process: it
  would share the GPU with it, and be timed or bounded wrongly;
- a "running" marker is written before the check starts: a process that dies or is killed while
  checking leaves it behind, and the next process records "failed" instead of trying again;
- the verdict is written atomically (:func:`fastmlstm._atomic.atomic_write`); a check interrupted
  in this process (Ctrl-C in a notebook) removes its marker and records nothing.

``FASTMLSTM_KERNEL`` (:func:`kernel_choice`) forces a choice: ``auto`` (default), ``persistent``,
``graph`` or ``step`` (the tested path, nothing checked).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .._atomic import atomic_write
from ..errors import InputError

__all__ = ["ABS", "ENV_KERNEL", "FACTOR", "KERNEL_CHOICES", "Verdict", "bounded", "cache_dir", "compare_ms", "decide",
           "kernel_choice", "parity", "rel_err", "site_of", "source_hash", "tested_only", "tested_path", "time_ms"]

logger = logging.getLogger("fastmlstm")

ENV_KERNEL = "FASTMLSTM_KERNEL"
KERNEL_CHOICES = ("auto", "persistent", "graph", "step")
FORMAT = 1
# The accuracy rule (the same numbers as the test suite's tests/tolerances.py; a test keeps them equal).
FACTOR = 2.0
ABS = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
# A candidate replaces the tested path only when it is at least this much faster: timing noise of a
# short measurement must not flip the choice.
MIN_SPEEDUP = 1.03
# A check that takes longer than this (seconds) fails: a hung kernel, or one far too slow to use.
BOUND_S = 120.0
# A verdict under another key for the same candidate, device and case is removed once it is this
# old (seconds): soon enough to keep the folder small, late enough that environments sharing the
# folder do not delete each other's verdicts at every start.
STALE_S = 30 * 86400.0


class BoundExceeded(RuntimeError):
    """A checked run did not finish within its time bound."""


def kernel_choice() -> str:
    """The value of ``FASTMLSTM_KERNEL`` ("auto" when unset); a value outside
    :data:`KERNEL_CHOICES` is an :class:`~fastmlstm.InputError`."""
    value = os.environ.get(ENV_KERNEL, "").strip().lower() or "auto"
    if value not in KERNEL_CHOICES:
        raise InputError(f"the environment variable {ENV_KERNEL} must be one of {KERNEL_CHOICES}, "
                         f"got {os.environ[ENV_KERNEL]!r}")
    return value


_LOCAL = threading.local()


@contextlib.contextmanager
def tested_path():
    """Inside this block (this thread), backends run their tested path, not a candidate: what a
    check compares against when a candidate may not run (a graph's capture takes the tested path)."""
    before = getattr(_LOCAL, "tested_only", False)
    _LOCAL.tested_only = True
    try:
        yield
    finally:
        _LOCAL.tested_only = before


def tested_only() -> bool:
    """Whether this thread is inside :func:`tested_path`."""
    return getattr(_LOCAL, "tested_only", False)


@functools.lru_cache(maxsize=None)
def log_once(message: str, level: int = logging.INFO) -> None:
    logger.log(level, message)


def cache_dir() -> Path:
    """Where verdicts live: ``$XDG_CACHE_HOME/fastmlstm/kernels``, else ``~/.cache/fastmlstm/kernels``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmlstm" / "kernels"


# ------------------------------------------------------------------------------------ the key

@dataclasses.dataclass(frozen=True)
class Site:
    """The device a verdict is about: where checks run (``device``) and what identifies it."""

    device: torch.device
    name: str
    capability: tuple[int, int]
    sms: int
    driver: str
    runtime: str

    def identity(self) -> dict:
        return {"device": self.name, "capability": f"{self.capability[0]}.{self.capability[1]}",
                "sms": self.sms, "driver": self.driver, "runtime": self.runtime}


@functools.lru_cache(maxsize=None)
def driver_version() -> str:
    """The NVIDIA driver's version ("580.159.04") from NVML, else the CUDA driver API's version
    number, else "unknown": the key part that changes when the driver is updated."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buffer = ctypes.create_string_buffer(96)
            ok = nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(96)) == 0
            nvml.nvmlShutdown()
            if ok and buffer.value:
                return buffer.value.decode()
    except (OSError, AttributeError):
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-driver-{version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


@functools.lru_cache(maxsize=None)
def _cuda_site(index: int) -> Site:
    props = torch.cuda.get_device_properties(index)
    return Site(torch.device("cuda", index), props.name, (props.major, props.minor), props.multi_processor_count,
                driver_version(), str(torch.version.cuda))


def site_of(device: torch.device) -> Site | None:
    """The :class:`Site` of a CUDA device; None for any other device (nothing to check there)."""
    if device.type != "cuda":
        return None
    return _cuda_site(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def software() -> dict:
    from .._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "fastmlstm": __version__}


@functools.lru_cache(maxsize=None)
def source_hash(*directories: str) -> str:
    """A digest of the Python sources directly in ``directories``: a kernel edited in place (an
    editable install, a patched release) is checked again."""
    digest = hashlib.sha256()
    for directory in directories:
        for path in sorted(Path(directory).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)[:60]


def verdict_path(key: dict) -> Path:
    """One file per key: readable parts for people, a digest of the whole key for uniqueness."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{_slug(key['candidate'])}-{_slug(key['device'])}-{_slug(key['case'])}-{digest}.json"


# ------------------------------------------------------------------------------- the verdict

@dataclasses.dataclass
class Verdict:
    """The outcome of checking one candidate for one key.

    ``status``: "passed" (accurate), "failed" (inaccurate, raised, or past its bound; ``reason``
    says which) or "running" (a check in progress, or one that never finished). ``step_ms`` and
    ``candidate_ms``: milliseconds per timed call ("forward", "backward", or "step"), as
    :func:`compare_ms` measures them (the candidate's on the tested path's scale).
    """

    status: str
    reason: str = ""
    errors: dict = dataclasses.field(default_factory=dict)
    step_ms: dict = dataclasses.field(default_factory=dict)
    candidate_ms: dict = dataclasses.field(default_factory=dict)
    checked: dict = dataclasses.field(default_factory=dict)
    pid: int = 0
    host: str = ""
    started: float = 0.0
    finished: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def speedup(self, direction: str) -> float:
        step, candidate = self.step_ms.get(direction), self.candidate_ms.get(direction)
        if not step or not candidate:
            return 0.0
        return step / candidate

    def faster(self, direction: str) -> bool:
        return self.passed and self.speedup(direction) >= MIN_SPEEDUP


def _read(path: Path, key: dict) -> Verdict | None:
    """The verdict stored for ``key``, or None (none yet, or a corrupt file: logged, then rewritten)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log_once(f"fastmlstm: cannot read the kernel verdict {path} ({exc}); checking again", logging.WARNING)
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
        if data.get("format") != FORMAT or data.get("key") != key:
            raise ValueError("written for another key or format")
        fields = {f.name for f in dataclasses.fields(Verdict)}
        verdict = Verdict(**{k: v for k, v in data["verdict"].items() if k in fields})
        _validate(verdict)
        return verdict
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError) as exc:
        log_once(f"fastmlstm: ignoring the corrupt kernel verdict {path} ({type(exc).__name__}: "
                 f"{_first_line(exc)}); checking again", logging.WARNING)
        return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(verdict: Verdict) -> None:
    """Raise TypeError or ValueError unless every field has the type (and range) this module writes:
    a field of another type would raise later, in the caller's forward."""
    if verdict.status not in ("passed", "failed", "running"):
        raise ValueError(f"unknown status {verdict.status!r}")
    for name, kind in (("reason", str), ("host", str), ("errors", dict), ("checked", dict)):
        if not isinstance(getattr(verdict, name), kind):
            raise TypeError(f"{name} is a {type(getattr(verdict, name)).__name__}, not a {kind.__name__}")
    if not isinstance(verdict.pid, int) or isinstance(verdict.pid, bool) or not 0 <= verdict.pid < 2**31:
        raise ValueError(f"pid {verdict.pid!r} is not a process id")
    for name in ("started", "finished"):
        if not _number(getattr(verdict, name)):
            raise ValueError(f"{name} {getattr(verdict, name)!r} is not a time")
    for name in ("step_ms", "candidate_ms"):
        times = getattr(verdict, name)
        if not isinstance(times, dict) or not all(_number(t) and t >= 0 for t in times.values()):
            raise ValueError(f"{name} {times!r} is not a map of milliseconds")


def _write(path: Path, key: dict, verdict: Verdict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"format": FORMAT, "key": key, "verdict": dataclasses.asdict(verdict)}, f, indent=1)
            f.write("\n")
    except OSError as exc:  # a read-only home: the verdict still holds for this process
        log_once(f"fastmlstm: cannot write the kernel verdict {path} ({exc}); it will be checked again "
                 "in the next process", logging.WARNING)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unfinished(verdict: Verdict, bound_s: float) -> bool:
    """Whether a "running" marker was left by a check that can no longer finish."""
    if verdict.host != socket.gethostname():
        return time.time() - verdict.started > bound_s + 600
    return verdict.pid == os.getpid() or not _pid_alive(verdict.pid) or time.time() - verdict.started > bound_s + 60


# The verdicts this process has reached or read, by file: each key is read from disk once; and the
# keys a thread of this process is checking now (another thread asking meanwhile takes the tested
# path instead of waiting: a check may itself run code that asks).
_SEEN: dict[Path, Verdict] = {}
_CHECKING: set[Path] = set()
_LOCK = threading.Lock()
# The checks given up on (past their bound, or interrupted), by the event their thread sets when it
# ends: no check starts while one runs (it would share the GPU with a kernel that may be spinning
# on all of it). An event, not Thread.is_alive(): after an interrupted join() Python 3.11 reports
# a running thread as stopped.
_ABANDONED: list[threading.Event] = []


def _abandon(done: threading.Event) -> None:
    if not done.is_set():
        with _LOCK:
            _ABANDONED.append(done)


def _abandoned_check_running() -> bool:
    with _LOCK:
        _ABANDONED[:] = [done for done in _ABANDONED if not done.is_set()]
        return bool(_ABANDONED)


def decide(key: dict, check: Callable[[], Verdict], bound_s: float = BOUND_S) -> Verdict | None:
    """The verdict for ``key``: from this process's memory, else the cache file, else by running
    ``check()`` under ``bound_s`` seconds (an exception or the bound is a "failed" verdict) and
    writing what it found. None while the key is being checked (by another process, or another
    thread of this one), or a check given up on still runs (:func:`bounded`): the caller takes the
    tested path meanwhile and asks again later."""
    path = verdict_path(key)
    with _LOCK:
        verdict = _SEEN.get(path)
        if verdict is not None:
            return verdict
        if path in _CHECKING:
            return None
        _CHECKING.add(path)
    try:
        verdict = _read(path, key)
        if verdict is not None and verdict.status == "running":
            if not _unfinished(verdict, bound_s):
                return None
            verdict = Verdict("failed", f"an earlier check did not finish (process {verdict.pid} on {verdict.host} "
                                        "died or hung while checking)", finished=time.time())
            _write(path, key, verdict)
        if verdict is None:
            if _abandoned_check_running():
                log_once("fastmlstm: a kernel check that ran past its time bound (or was interrupted) is still "
                         "running; no other kernel is checked until it ends, the per-step path runs meanwhile",
                         logging.WARNING)
                return None
            verdict = _check(path, key, check, bound_s)
        _SEEN[path] = verdict
        return verdict
    finally:
        with _LOCK:
            _CHECKING.discard(path)


def _check(path: Path, key: dict, check: Callable[[], Verdict], bound_s: float) -> Verdict:
    _forget_stale(path)
    marker = Verdict("running", pid=os.getpid(), host=socket.gethostname(), started=time.time())
    _write(path, key, marker)
    keep = True
    try:
        verdict = bounded(check, bound_s)
    except BoundExceeded as exc:
        verdict = Verdict("failed", str(exc))
    except torch.cuda.OutOfMemoryError:
        # Says nothing about the kernel: refused for this process only, checked again in the next.
        verdict, keep = Verdict("failed", "out of memory while checking (not kept: checked again next time)"), False
    except Exception as exc:  # a candidate that raises is refused, whatever it raised
        verdict = Verdict("failed", f"raised {type(exc).__name__}: {_first_line(exc)}")
    except BaseException:  # interrupted here (Ctrl-C): nothing was found out; checked again later
        _remove_marker(path, key, marker)
        raise
    verdict.pid, verdict.host, verdict.started = marker.pid, marker.host, marker.started
    verdict.finished = time.time()
    if keep:
        _write(path, key, verdict)
    else:
        _remove_marker(path, key, marker)
    return verdict


def _remove_marker(path: Path, key: dict, marker: Verdict) -> None:
    """Remove this check's "running" marker, unless another process has written over it since (its
    verdict, or its own marker)."""
    found = _read(path, key)
    if found is None or (found.status, found.pid, found.host, found.started) != (
            "running", marker.pid, marker.host, marker.started):
        return
    try:
        path.unlink()
    except OSError:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _forget_stale(path: Path) -> None:
    """Remove verdicts for the same candidate, device and case under another key that were written
    :data:`STALE_S` ago or earlier (an older driver or version). Younger ones stay: another
    environment sharing this folder (another torch, Triton or source tree, TF32 on) reads them."""
    stem = path.name.rsplit("-", 1)[0]
    for other in path.parent.glob(f"{stem}-*.json") if path.parent.is_dir() else ():
        if other != path and other.name.rsplit("-", 1)[0] == stem:
            try:
                if time.time() - other.stat().st_mtime >= STALE_S:
                    other.unlink()
            except OSError:
                pass


def forget_process_memory() -> None:
    """Drop the verdicts this process holds (tests; a cache directory changed at run time)."""
    _SEEN.clear()
    log_once.cache_clear()


# -------------------------------------------------------------------------------- the checks

def bounded(fn: Callable[[], Verdict], seconds: float):
    """``fn()`` in a worker thread, waited for at most ``seconds``: its result, its exception, or
    :class:`BoundExceeded` (the thread is abandoned, it cannot be stopped from outside; until it
    ends :func:`decide` starts no other check)."""
    result: dict = {}
    done = threading.Event()

    def run():
        try:
            with torch.no_grad():
                result["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=run, name="fastmlstm-kernel-check", daemon=True)
    try:
        worker.start()
        finished = done.wait(seconds)
    except BaseException:  # the wait interrupted (Ctrl-C): the thread runs on, as past the bound
        _abandon(done)
        raise
    if not finished:
        _abandon(done)
        raise BoundExceeded(f"did not finish within {seconds:g} s (a hang, or far too slow)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def rel_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| / max(max |truth|, 1), in float64; inf for a wrong shape or a
    non-finite value."""
    if actual.shape != truth.shape:
        return float("inf")
    if truth.numel() == 0:
        return 0.0
    actual, truth = actual.double(), truth.double()
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    return ((actual - truth).abs().max() / truth.abs().max().clamp_min(1.0)).item()


def parity(candidate: dict, tested: dict, truth: dict, dtype: torch.dtype) -> tuple[bool, str, dict]:
    """The accuracy rule over named tensors: ``(passed, reason, errors)`` with, per name, the
    tested path's and the candidate's error against the float64 ``truth``."""
    errors, failures = {}, []
    for name, want in truth.items():
        e_tested, e_candidate = rel_err(tested[name], want), rel_err(candidate[name], want)
        errors[name] = {"tested": e_tested, "candidate": e_candidate}
        if not e_candidate <= FACTOR * e_tested + ABS[dtype]:
            failures.append(f"{name} error {e_candidate:.2e} > {FACTOR:g} x {e_tested:.2e} + {ABS[dtype]:g}")
    return not failures, "; ".join(failures[:3]), errors


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare_ms(tested: Callable[[], object], candidate: Callable[[], object], device: torch.device,
               rounds: int = 5) -> tuple[float, float]:
    """Milliseconds of ``tested()`` and of ``candidate()`` on one scale: after one warm-up call of
    each, ``rounds`` rounds of one call of each, the order swapped every round, so that a change of
    the machine's speed while measuring (clocks ramping up, another process's load coming or
    going) weighs on both alike. Returns the median time of ``tested`` and that time over the median
    of the rounds' ratios (so ``tested_ms / candidate_ms`` is the median speedup); the candidate's
    is 0.0 (no speedup known) where no round timed both above zero."""
    tested()
    candidate()
    tested_ms, ratios = [], []
    for r in range(rounds):
        if r % 2 == 0:
            a, b = time_ms(tested, device, reps=1, warmup=0), time_ms(candidate, device, reps=1, warmup=0)
        else:
            b, a = time_ms(candidate, device, reps=1, warmup=0), time_ms(tested, device, reps=1, warmup=0)
        tested_ms.append(a)
        if a > 0 and b > 0:
            ratios.append(a / b)
    median = statistics.median(tested_ms)
    if not ratios or median <= 0:
        return median, 0.0
    return median, median / statistics.median(ratios)
