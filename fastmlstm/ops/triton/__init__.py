"""Triton backend: fused per-step kernels (:mod:`.fused_step`) driven over time by :mod:`.recurrence`,
launched with the configs :mod:`.configs` picks (its rule, or the GPU-measured table :mod:`.tuned`).

On a GPU each call asks :mod:`.dispatch` which kernel runs it: the per-step path, or a candidate
that was checked against it on this device (the persistent kernels of :mod:`.persistent`, the
CUDA-graphed step loop of :mod:`.graphs`). Under Triton's interpreter (CPU tensors) the per-step
path always runs.

Importing this package imports Triton (and compiles nothing); the registry imports it on first use
and reports the backend unusable when that fails.
"""

from __future__ import annotations

from . import dispatch, graphs
from . import recurrence as _step

__all__ = ["is_available", "forward", "backward"]


def is_available() -> tuple[bool, str]:
    return True, ""  # importing this package (and with it Triton) succeeded


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    """The contract of :mod:`fastmlstm.ops.interface`'s ``forward``."""
    if proj.device.type == "cuda" and proj.numel():  # nothing to run: no kernel to choose (or check)
        name = dispatch.choose(proj.shape[1], proj.shape[2] // 5, proj.dtype, proj.device, "forward")
        if name != "step" and dispatch.runs_here(name, proj.device):
            return dispatch.candidate(name).forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward,
                                                    return_cell_states)
    return _step.forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states)


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states,
             act):
    """The contract of :mod:`fastmlstm.ops.interface`'s ``backward``."""
    args = (grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states, act)
    if output.device.type == "cuda" and output.numel():
        name = dispatch.choose(output.shape[1], output.shape[2], output.dtype, output.device, "backward")
        if name != "step" and dispatch.runs_here(name, output.device):
            return dispatch.candidate(name).backward(*args)
    return _step.backward(*args)


def _persistent_candidates() -> list:
    from .persistent import candidates  # Gluon: imported only once a GPU asks

    return candidates()


dispatch.add_loader(graphs.candidates)
dispatch.add_loader(_persistent_candidates)
