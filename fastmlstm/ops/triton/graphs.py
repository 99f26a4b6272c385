"""The per-step path as CUDA graphs: the "graph" candidate of :mod:`.dispatch`.

Each step of :mod:`.recurrence` is two kernel launches; at H <= 2048 the host takes longer to
launch them than the GPU to run them. Here a whole call's step loop (forward, or backward; at least
:data:`MIN_T` steps) is captured once per (direction, shapes and dtypes of every input, launch
plan) and replayed with the call's inputs copied into the graph's static buffers (weights that did
not change since the last call are not copied again) and its outputs cloned out. Captured graphs are kept in a
:class:`fastmlstm.ops.capture.GraphCache` bounded by :data:`MAX_GRAPHS` and :data:`MAX_BYTES`; a
call too big to keep, or one made while someone else is capturing a graph, runs the per-step path
directly. Like every candidate, the graphs run only after :mod:`.dispatch` checked them on the
device at hand; on a CPU the capture's stand-in runs the same host logic (tests).

Dimension letters: T time, B batch, H hidden.
"""

from __future__ import annotations

import logging

import torch

from .. import capture, verdicts
from . import configs as _configs
from . import recurrence
from .dispatch import GRAPH_MAX_H, Candidate

__all__ = ["MAX_BYTES", "MAX_GRAPHS", "MIN_T", "backward", "candidates", "clear", "forward"]

# Shorter calls run the per-step path directly: a replay's copies in and out are about as many
# host-side launches as the 2 T step launches they would replace (a generation step is T = 1; its
# whole step is graphed by fastmlstm.models.generation instead).
MIN_T = 8
MAX_GRAPHS = 8
# Static buffers of all kept graphs together: a graph holds a whole call's inputs and outputs.
MAX_BYTES = 2 * 2**30

_CACHE = capture.GraphCache(MAX_GRAPHS, MAX_BYTES)
_FAILED: set = set()


class _Entry:
    def __init__(self, inputs: dict, run, device: torch.device):
        self.inputs = capture.StaticInputs(inputs)
        self.inputs.load(inputs)
        self.replay, self.outputs = capture.capture(lambda: run(self.inputs.buffers), device)


def _shape_key(direction: str, inputs: dict, flags: tuple) -> tuple:
    shapes = tuple(None if v is None else (tuple(v.shape), v.dtype) for v in inputs.values())
    device = next(v.device for v in inputs.values() if v is not None)
    # The plan the capture bakes in: an override (tests, the sweep) makes another graph.
    override = id(_configs._OVERRIDE[-1]) if _configs._OVERRIDE else None
    # And the float32 dot precision the kernels were launched with (TF32 switched on: another graph).
    dtype = next(v.dtype for v in inputs.values() if v is not None and v.is_floating_point())
    return direction, device, shapes, flags, override, recurrence._dot_precision(dtype)


def _run_graphed(direction: str, inputs: dict, flags: tuple, run, direct):
    """``run(static_buffers)`` as a graph: captured on first use of its key, then replayed."""
    device = next(v.device for v in inputs.values() if v is not None)
    steps = (inputs.get("proj") if inputs.get("proj") is not None else inputs["output"]).shape[0]
    if steps < MIN_T or capture.capturing(device):  # inside someone else's capture: be part of theirs
        return direct()
    key = _shape_key(direction, inputs, flags)
    if key in _FAILED:
        return direct()
    with _CACHE.lock:
        entry = _CACHE.get(key)
        if entry is None:
            size = 2 * capture.nbytes(inputs)  # the inputs' buffers and about as much of outputs
            if size > _CACHE.max_bytes:
                return direct()
            try:
                entry = _Entry(inputs, run, device)
            except Exception as exc:  # a capture that fails: the per-step path for this key from now on
                _FAILED.add(key)
                verdicts.log_once(f"fastmlstm: capturing the {direction} step loop as a CUDA graph failed "
                                  f"({type(exc).__name__}: {verdicts._first_line(exc)}); the per-step path runs",
                                  logging.WARNING)
                return direct()
            _CACHE.put(key, entry, capture.nbytes(entry.inputs.buffers, entry.outputs))
        entry.inputs.load(inputs)
        entry.replay()
        return tuple(t.clone() for t in entry.outputs)


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    """:func:`.recurrence.forward` replayed from a graph (same contract, same results)."""
    inputs = {"proj": proj, "weight_hh": weight_hh, "weight_hm": weight_hm, "h0": h0, "c0": c0, "lengths": lengths}
    flags = (bool(save_for_backward), bool(return_cell_states))

    def run(s):
        return recurrence.forward(s["proj"], s["weight_hh"], s["weight_hm"], s["h0"], s["c0"], s["lengths"], *flags)

    return _run_graphed("forward", inputs, flags, run, lambda: recurrence.forward(
        proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states))


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states,
             act):
    """:func:`.recurrence.backward` replayed from a graph (same contract, same results)."""
    names = ("grad_output", "grad_c_n", "grad_cell_states", "weight_hh", "weight_hm", "h0", "c0", "lengths",
             "output", "cell_states", "act")
    args = (grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states, act)
    inputs = dict(zip(names, args))

    def run(s):
        return recurrence.backward(*(s[n] for n in names))

    return _run_graphed("backward", inputs, (), run, lambda: recurrence.backward(*args))


def clear() -> None:
    """Drop every kept graph (and the memory its buffers hold)."""
    _CACHE.clear()
    _FAILED.clear()


def _applies(B: int, H: int, dtype: torch.dtype, device) -> bool:
    return device is not None and H <= GRAPH_MAX_H


def candidates() -> list[Candidate]:
    """The graphed step loop as a :class:`.dispatch.Candidate`."""
    return [Candidate("graph", _applies, forward, backward)]
