"""Which recurrence kernel runs a call of the Triton backend on a GPU: the tested per-step path
("step") or a candidate that no CPU can check: a persistent kernel ("stationary", "cluster"; the
:mod:`.persistent` package) or the CUDA-graphed step loop ("graph"; :mod:`.graphs`).

A candidate is never trusted blindly. On first use for a key (device, driver, versions, the
kernels' and the check's sources, dtype, float32 dot precision, shape class: H exact, B rounded up
to a power of two) it is checked against the per-step path and a float64 run (outputs, final
states, saved activations, every gradient; :func:`fastmlstm.ops.verdicts.parity`) and both are
timed in alternating rounds (the forward both saving for backward and not: it must be faster at
both); the verdict is kept on disk (:mod:`fastmlstm.ops.verdicts`). Every candidate that applies
is checked; per direction the fastest of those that passed and beat the per-step path runs
(:func:`design_for` on the checks' timings), otherwise the per-step path; one log line per
candidate says what it does and why. Once decided, a call costs one dict lookup.

``FASTMLSTM_KERNEL`` forces a choice: ``step`` (nothing checked), ``persistent`` or ``graph`` (the
candidate runs even if it failed its check, with a warning; one that does not apply to the shape
is an :class:`~fastmlstm.InputError`), ``auto`` (default).

Interface (fixed for the kernels' and the cost model's authors): :class:`Candidate`,
:func:`register`, :func:`design_for` (the pure rule: the fastest design that applies, by the
checks' timings here and by the cost model's predictions in ``bench/kernels/costmodel.py``),
:func:`choose`.

Example::

    >>> import torch
    >>> from fastmlstm.ops.triton import dispatch
    >>> dispatch.choose(4, 64, torch.float32, torch.device("cpu"))   # the interpreter: always the tested path
    'step'
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .. import reference, verdicts
from ...errors import InputError
from . import recurrence
from .configs import Device

__all__ = ["Candidate", "DESIGNS", "GRAPH_MAX_H", "KERNEL_CHOICES", "add_loader", "candidate", "check", "choose",
           "design_for", "designs", "register", "runs_here"]

# The designs a candidate can implement, in the order the rule prefers them where they apply.
PERSISTENT_DESIGNS = ("stationary", "cluster")
DESIGNS = (*PERSISTENT_DESIGNS, "graph", "step")
KERNEL_CHOICES = verdicts.KERNEL_CHOICES
# Above this H a step's GPU time exceeds the host's time to launch it (bench/kernels/costmodel.py:
# the step's weight bytes against cpu_launch_us), so the host runs ahead and a graph saves nothing
# while its static buffers hold memory.
GRAPH_MAX_H = 2048
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A kernel that may replace the per-step path once checked on the device at hand.

    ``name``: the design it implements (one of :data:`DESIGNS` but "step"). ``applies(B, H, dtype,
    device)``: whether it can run that shape at all (``device`` a :class:`.configs.Device`).
    ``forward``/``backward``: the contract of :mod:`fastmlstm.ops.interface`. ``sources``:
    directories whose Python sources define it (default: its forward's); an edit there checks it
    again.
    """

    name: str
    applies: Callable[[int, int, torch.dtype, Device], bool]
    forward: Callable
    backward: Callable
    sources: tuple[str, ...] = ()


# The tested path every candidate is checked against (tests put a stand-in here).
STEP = Candidate("step", lambda B, H, dtype, device: True, recurrence.forward, recurrence.backward)

_CANDIDATES: dict[str, Candidate] = {}
_LOADERS: list[Callable[[], list[Candidate]]] = []
_LOADED: list[bool] = [False]
# (FASTMLSTM_KERNEL's raw value, B, H, dtype, device, direction, float32 dot precision) -> the name
# that runs (the precision is part of the verdict's key: TF32 switched on checks again).
_MEMO: dict[tuple, str] = {}


def register(candidate: Candidate) -> None:
    """Make ``candidate`` available to :func:`choose` (a second registration of a name replaces it)."""
    if candidate.name not in DESIGNS or candidate.name == "step":
        raise ValueError(f"a candidate implements one of {DESIGNS[:-1]}, got {candidate.name!r}")
    _CANDIDATES[candidate.name] = candidate
    _MEMO.clear()


def add_loader(loader: Callable[[], list[Candidate]]) -> None:
    """``loader()`` registers its candidates on the first :func:`choose` for a GPU (the persistent
    kernels import Gluon, which a CPU run never needs)."""
    _LOADERS.append(loader)
    _LOADED[0] = False


def _load_candidates() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    for loader in _LOADERS:
        try:
            for candidate in loader():
                register(candidate)
        except Exception as exc:  # a missing or broken optional kernel package: the tested path stays
            verdicts.log_once(f"fastmlstm: some Triton kernels are unavailable ({type(exc).__name__}: "
                              f"{verdicts._first_line(exc)}); the per-step path runs instead", logging.WARNING)


def candidate(name: str) -> Candidate:
    """The registered candidate called ``name`` (what :func:`choose` returned), or :data:`STEP`."""
    return STEP if name == "step" else _CANDIDATES[name]


def runs_here(name: str, device: torch.device) -> bool:
    """Whether candidate ``name`` (not "step"), chosen for this shape, may run this call: not inside
    :func:`fastmlstm.ops.verdicts.tested_path`, and, for the kernels that wait on the host (the
    persistent ones read their error word), not while the stream is being captured into a graph."""
    if verdicts.tested_only():
        return False
    return name == "graph" or not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def reset() -> None:
    """Forget every decision of this process (tests; a cache directory changed at run time)."""
    _MEMO.clear()
    verdicts.forget_process_memory()


# ---------------------------------------------------------------------------------- the rule

def _dtype_bytes(dtype) -> int:
    return 4 if dtype in (torch.float32, "float32", "fp32") else 2


def designs(B: int, H: int, dtype, device: Device | None, direction: str = "forward") -> tuple[str, ...]:
    """Every design that applies to ``(B, H, dtype)`` on ``device``, preferred first: the
    persistent designs whose schedule exists there, then "graph" where the step loop is bound by
    the host's launches (H <= :data:`GRAPH_MAX_H`). Empty for no GPU."""
    if device is None:
        return ()
    found = []
    try:
        from .persistent import schedule
    except ImportError:  # a build without the persistent kernels
        schedule = None
    if schedule is not None:
        found += [d for d in PERSISTENT_DESIGNS
                  if schedule.plan(d, direction, B, H, _dtype_bytes(dtype), device) is not None]
    if H <= GRAPH_MAX_H:
        found.append("graph")
    return tuple(found)


def design_for(B: int, H: int, dtype, device: Device | None, direction: str = "forward",
               times: dict[str, float] | None = None) -> str:
    """The design the dispatcher runs for ``(B, H, dtype)`` on ``device``: of the designs that apply
    (:func:`designs`) and "step", the fastest by ``times`` (design -> time of ``direction``, any
    unit; a design without a time is out: not checked, failed, or not faster). :func:`choose`
    passes the times its checks measured, each relative to the per-step path timed in the same
    check; the cost model passes its predictions. Ties go to the earlier of :data:`DESIGNS`.
    Without ``times``: the first of :func:`designs`, else "step" (the preference when nothing is
    known about speed). Pure: it reads only its arguments and the schedules. ``dtype``: a torch
    dtype or "bfloat16"/"float16"/"float32"; ``direction``: "forward" or "backward".

    Example::

        >>> from fastmlstm.ops.triton.configs import Device
        >>> h100 = Device(132, (9, 0), "NVIDIA H100 80GB HBM3")
        >>> design_for(64, 1024, "bfloat16", h100, times={"step": 1.0, "graph": 0.5, "stationary": 0.3})
        'stationary'
        >>> design_for(64, 1024, "bfloat16", h100, times={"step": 1.0, "graph": 0.5})
        'graph'
    """
    found = designs(B, H, dtype, device, direction)
    if times is None:
        return found[0] if found else "step"
    timed = [d for d in (*found, "step") if times.get(d) is not None]
    if not timed:
        return "step"
    return min(timed, key=lambda d: (times[d], DESIGNS.index(d)))


# ----------------------------------------------------------------------------- the choice

def _site(device: torch.device) -> verdicts.Site | None:
    return verdicts.site_of(device)


def choose(B: int, H: int, dtype: torch.dtype, device: torch.device, direction: str = "forward") -> str:
    """The kernel that runs a call of ``direction`` ("forward"/"backward") on ``device`` (the
    tensors' torch device): "step" or the name of a checked candidate. Non-CUDA devices (Triton's
    interpreter) always get "step". The first call for a key may run the candidate's check."""
    raw = os.environ.get(verdicts.ENV_KERNEL)
    memo_key = (raw, B, H, dtype, device, direction, recurrence._dot_precision(dtype))
    name = _MEMO.get(memo_key)
    if name is not None:
        return name
    mode = verdicts.kernel_choice()
    site = _site(device)
    if site is None or mode == "step" or B < 1 or H < 1:
        name, final = "step", True
    else:
        _load_candidates()
        name, final = _decide(mode, B, H, dtype, site, direction)
    if final:
        _MEMO[memo_key] = name
    return name


def _device(site: verdicts.Site) -> Device:
    return Device(site.sms, site.capability, site.name)


def _case(B: int, H: int, dtype: torch.dtype) -> str:
    return f"{_DTYPE_NAMES.get(dtype, str(dtype))} H={H} B<={_b_class(B)}"


def _b_class(B: int) -> int:
    return 1 << max(0, (B - 1).bit_length())


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _decide(mode: str, B: int, H: int, dtype: torch.dtype, site: verdicts.Site, direction: str) -> tuple[str, bool]:
    """(name, whether that choice is final for this process)."""
    device = _device(site)
    wanted = designs(B, H, dtype, device, direction)
    if mode != "auto":
        return _forced(mode, wanted, B, H, dtype, site, direction)
    checked = _checked(wanted, B, H, dtype, site, device)
    if checked is None:  # a check cannot run now (a graph capture, or it runs elsewhere): decide later
        return "step", False
    winners = {d: design_for(B, H, dtype, device, d, times=_times(checked, d)) for d in ("forward", "backward")}
    for candidate, verdict in checked:
        _report(candidate, verdict, winners, checked, B, H, dtype, site)
    return winners[direction], True


def _checked(wanted, B, H, dtype, site, device) -> list | None:
    """(candidate, verdict) for every registered candidate of ``wanted`` that applies, checking
    those not yet checked; None where a check cannot run now."""
    found = []
    for name in wanted:
        candidate = _CANDIDATES.get(name)
        if candidate is None or not candidate.applies(B, H, dtype, device):
            continue
        if _capturing():  # a check cannot run inside someone's graph capture
            return None
        verdict = _verdict(candidate, B, H, dtype, site)
        if verdict is None:  # being checked elsewhere right now
            return None
        found.append((candidate, verdict))
    return found


def _times(checked: list, direction: str) -> dict[str, float]:
    """Each candidate that passed and beat the per-step path in ``direction``: its time relative to
    that path timed in its own check (the per-step path is 1), so that candidates checked apart
    compare on one scale."""
    times = {"step": 1.0}
    times.update({c.name: 1.0 / v.speedup(direction) for c, v in checked if v.faster(direction)})
    return times


def _forced(mode, wanted, B, H, dtype, site, direction) -> tuple[str, bool]:
    """FASTMLSTM_KERNEL=persistent|graph: the fastest of the group's candidates that passed its
    check, else the first that applies (with a warning if it failed)."""
    group = PERSISTENT_DESIGNS if mode == "persistent" else ("graph",)
    device = _device(site)
    applying = [_CANDIDATES[n] for n in wanted if n in group and n in _CANDIDATES
                and _CANDIDATES[n].applies(B, H, dtype, device)]
    if not applying:
        available = sorted(n for n in _CANDIDATES if n in group)
        raise InputError(f"{verdicts.ENV_KERNEL}={mode}: no {mode} kernel applies to {_case(B, H, dtype)} "
                         f"({direction}) on {site.name} (available: {', '.join(available) or 'none'}); "
                         f"set it to auto or step")
    if _capturing():
        return applying[0].name, False
    checked = [(c, _verdict(c, B, H, dtype, site)) for c in applying]
    passed = {c.name: 1.0 / max(v.speedup(direction), 1e-9) for c, v in checked if v is not None and v.passed}
    # Final only once every candidate of the group has its verdict: one being checked elsewhere may pass.
    final = all(v is not None for _, v in checked)
    if passed:
        return min(passed, key=lambda n: (passed[n], DESIGNS.index(n))), final
    candidate, verdict = checked[0]
    if verdict is not None:
        verdicts.log_once(f"fastmlstm: {verdicts.ENV_KERNEL}={mode} runs the {candidate.name!r} kernel for "
                          f"{_case(B, H, dtype)} on {site.name} although it failed its check: {verdict.reason}",
                          logging.WARNING)
    return candidate.name, final


def _verdict(candidate: Candidate, B: int, H: int, dtype: torch.dtype, site: verdicts.Site):
    key = {**site.identity(), **verdicts.software(), "candidate": candidate.name,
           "source": verdicts.source_hash(*_sources(candidate)), "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
           "precision": recurrence._dot_precision(dtype), "H": H, "B_class": _b_class(B),
           "case": f"{_DTYPE_NAMES.get(dtype, str(dtype))}-H{H}-B{_b_class(B)}"}
    return verdicts.decide(key, lambda: check(candidate, B, H, dtype, site.device, announce=site.name),
                           bound_s=verdicts.BOUND_S)


def _sources(candidate: Candidate) -> tuple[str, ...]:
    found = set(candidate.sources)
    for fn in (candidate.forward, candidate.backward):
        try:
            found.add(str(Path(inspect.getsourcefile(inspect.unwrap(fn))).parent))
        except (TypeError, OSError):  # a builtin or generated function: its name stands for it
            pass
    found.add(str(Path(__file__).parent))  # the per-step path it is measured against
    # The modules every candidate and the check run on: fastmlstm/ops (capture.py, the graphs' capture
    # and static inputs; interface.py, the buffers and the weight gradients; verdicts.py, the
    # accuracy rule and the timing) and the reference backend (the float64 truth).
    found.add(str(Path(verdicts.__file__).parent))
    found.add(str(Path(inspect.getsourcefile(reference.forward)).parent))
    return tuple(sorted(found))


def _report(candidate: Candidate, verdict: verdicts.Verdict, winners: dict, checked: list, B, H, dtype,
            site) -> None:
    """One log line per candidate and case: what runs, and why."""
    where = f"{_case(B, H, dtype)} on {site.name}"
    name = candidate.name
    if not verdict.passed:
        verdicts.log_once(f"fastmlstm: the {name!r} kernel failed its check for {where}: {verdict.reason}; the "
                          f"per-step path runs instead (verdict in {verdicts.cache_dir()}; delete it to check again)",
                          logging.WARNING)
        return
    speed = ", ".join(f"{d} {verdict.speedup(d):.2f}x" for d in ("forward", "backward"))
    used = [d for d in ("forward", "backward") if winners[d] == name]
    beaten = sorted({winners[d] for d in ("forward", "backward") if verdict.faster(d) and winners[d] != name})
    if used:
        others = "" if len(checked) == 1 else "; the fastest of the checked kernels"
        verdicts.log_once(f"fastmlstm: the {name!r} kernel runs the {' and '.join(used)} for {where} (checked "
                          f"against the per-step path; speed {speed} of it{others})", logging.INFO)
    elif beaten:
        verdicts.log_once(f"fastmlstm: the {name!r} kernel passed its check for {where} (speed {speed} of the "
                          f"per-step path) but the {' and '.join(map(repr, beaten))} kernel is faster and runs",
                          logging.INFO)
    else:
        verdicts.log_once(f"fastmlstm: the {name!r} kernel passed its check for {where} but is not faster "
                          f"({speed} the per-step path's speed); the per-step path runs", logging.INFO)


# ------------------------------------------------------------------------------ the check

# The parity cases: (steps, with lengths, cell states returned). Odd T; the second case ends rows
# early and sends a gradient into every step's cell state.
CASES = ((9, False, False), (9, True, True))
TIMING_T = 64


def _inputs(T: int, B: int, H: int, dtype: torch.dtype, device: torch.device, lengths: bool, cells: bool,
            seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, to=torch.float32):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=to)

    return {"proj": randn(T, B, 5 * H, to=dtype), "weight_hh": randn(4 * H, H, scale=H ** -0.5, to=dtype),
            "weight_hm": randn(H, H, scale=H ** -0.5, to=dtype), "h0": randn(B, H, scale=0.5), "c0": randn(B, H),
            "lengths": (torch.tensor([T - (2 * b) % T for b in range(B)], device=device) if lengths else None),
            "grad_output": randn(T, B, H, to=dtype), "grad_c_n": randn(B, H),
            "grad_cell_states": randn(T, B, H) if cells else None, "cells": cells}


def _as_float64(inputs: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _run(impl, x: dict) -> dict:
    """Every value a caller can see: outputs, final and saved states, all gradients (and the
    forward that saves nothing, which kernels may run differently)."""
    state = (x["proj"], x["weight_hh"], x["weight_hm"], x["h0"], x["c0"], x["lengths"])
    output, c_n, cell_states, act = impl.forward(*state, True, x["cells"])
    grads = impl.backward(x["grad_output"], x["grad_c_n"], x["grad_cell_states"], x["weight_hh"], x["weight_hm"],
                          x["h0"], x["c0"], x["lengths"], output, cell_states, act)
    plain_output, plain_c_n, _, _ = impl.forward(*state, False, False)
    values = {"output": output, "c_n": c_n, "cell_states": cell_states, "act": act,
              "output (no saves)": plain_output, "c_n (no saves)": plain_c_n}
    values.update(zip(("grad_proj", "grad_weight_hh", "grad_weight_hm", "grad_h0", "grad_c0"), grads))
    return values


def check(candidate: Candidate, B: int, H: int, dtype: torch.dtype, device: torch.device,
          announce: str | None = None) -> verdicts.Verdict:
    """Check ``candidate`` at ``(B, H, dtype)`` on ``device``: parity with :data:`STEP` against a
    float64 run of the reference backend at each of :data:`CASES`, then the time of each direction
    of both at T = :data:`TIMING_T` (:func:`_timings`). A failed parity case stops the check (no
    timing)."""
    if announce:
        verdicts.log_once(f"fastmlstm: checking the {candidate.name!r} kernel for {_case(B, H, dtype)} on {announce} "
                          f"against the per-step path (first use; the verdict is kept in {verdicts.cache_dir()})",
                          logging.INFO)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard, torch.no_grad():
        errors = {}
        for T, lengths, cells in CASES:
            inputs = _inputs(T, B, H, dtype, device, lengths, cells)
            truth = _run(reference, _as_float64(inputs))
            ok, reason, found = verdicts.parity(_run(candidate, inputs), _run(STEP, inputs), truth, dtype)
            label = f"T={T}" + (" with lengths" if lengths else "") + (" and cell states" if cells else "")
            errors[label] = found
            if not ok:
                return verdicts.Verdict("failed", f"{label}: {reason}", errors=errors,
                                        checked={"B": B, "H": H, "dtype": str(dtype)})
        step_ms, candidate_ms = _timings(candidate, B, H, dtype, device)
    return verdicts.Verdict("passed", errors=errors, step_ms=step_ms, candidate_ms=candidate_ms,
                            checked={"B": B, "H": H, "dtype": str(dtype), "timing_T": TIMING_T})


def _timings(candidate: Candidate, B: int, H: int, dtype: torch.dtype, device: torch.device):
    """(per-step path's ms, candidate's ms) by direction, each pair measured in alternating rounds
    (:func:`fastmlstm.ops.verdicts.compare_ms`): timing one after the other would credit a
    candidate with whatever slowed the machine down while the other ran. The forward is timed
    saving nothing (as inference runs it) and saving for backward (as training does); the one the
    candidate gains less at stands for it: it must be faster at both."""
    x = _inputs(TIMING_T, B, H, dtype, device, False, False, seed=1)
    state = (x["proj"], x["weight_hh"], x["weight_hm"], x["h0"], x["c0"], None)

    def calls(impl):
        saved = impl.forward(*state, True, False)
        return {"forward": lambda: impl.forward(*state, False, False),
                "forward (saves)": lambda: impl.forward(*state, True, False),
                "backward": lambda: impl.backward(x["grad_output"], x["grad_c_n"], None, x["weight_hh"],
                                                  x["weight_hm"], x["h0"], x["c0"], None, saved[0], saved[2],
                                                  saved[3])}

    step_calls, candidate_calls = calls(STEP), calls(candidate)
    pairs = {name: verdicts.compare_ms(step_calls[name], candidate_calls[name], device) for name in step_calls}
    pairs["forward"] = min(pairs.pop("forward"), pairs.pop("forward (saves)"), key=_gain)
    return {d: ms[0] for d, ms in pairs.items()}, {d: ms[1] for d, ms in pairs.items()}


def _gain(pair: tuple[float, float]) -> float:
    step_ms, candidate_ms = pair
    return step_ms / candidate_ms if step_ms > 0 and candidate_ms > 0 else 0.0
