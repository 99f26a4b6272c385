"""Which recurrence kernel runs a call of the Triton backend: the tested per-step path ("step") or
a candidate that no CPU can check (a persistent kernel, the CUDA-graphed step loop).

Interface (fixed for the kernels' and the cost model's authors):

- :class:`Candidate`: a name, ``applies(B, H, dtype, device) -> bool`` (``device`` a
  :class:`~fastmlstm.ops.triton.configs.Device`), and ``forward``/``backward`` with the contract of
  :mod:`fastmlstm.ops.interface`.
- :func:`register`: add a candidate (the persistent package registers its kernels lazily).
- :func:`design_for`: the pure rule, which design the dispatcher prefers for a shape on a device
  once validated (the cost model prices that design).
- :func:`choose`: the name that runs a call ("step" or a validated candidate's name).

This first version fixes the names; validation lands next (until then only "step" runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .configs import Device

__all__ = ["Candidate", "DESIGNS", "KERNEL_CHOICES", "choose", "design_for", "register"]

# The designs a candidate can implement, in the order the rule prefers them where they apply.
PERSISTENT_DESIGNS = ("stationary", "cluster")
DESIGNS = (*PERSISTENT_DESIGNS, "graph", "step")
KERNEL_CHOICES = ("auto", "persistent", "step", "graph")


@dataclass(frozen=True)
class Candidate:
    """A kernel that may replace the per-step path once validated on the device at hand.

    ``name`` is the design it implements (one of :data:`DESIGNS` but "step"); ``applies`` says
    whether it can run a shape at all; ``forward``/``backward`` take and return what
    :mod:`fastmlstm.ops.interface` says.
    """

    name: str
    applies: Callable[[int, int, torch.dtype, Device], bool]
    forward: Callable
    backward: Callable


_CANDIDATES: dict[str, Candidate] = {}


def register(candidate: Candidate) -> None:
    """Make ``candidate`` available to :func:`choose` (a second registration of a name replaces it)."""
    if candidate.name not in DESIGNS or candidate.name == "step":
        raise ValueError(f"a candidate implements one of {DESIGNS[:-1]}, got {candidate.name!r}")
    _CANDIDATES[candidate.name] = candidate


def _dtype_bytes(dtype) -> int:
    return 4 if dtype in (torch.float32, "float32", "fp32") else 2


def design_for(B: int, H: int, dtype, device: Device | None, direction: str = "forward") -> str:
    """The design the dispatcher runs for ``(B, H, dtype)`` on ``device`` once validated: the first
    persistent design whose schedule applies, else "graph" on a GPU, else "step". Pure: it reads
    only its arguments and the schedules (``dtype`` a torch dtype or "bfloat16"/"float16"/"float32").
    """
    if device is None:
        return "step"
    try:
        from .persistent import schedule
    except ImportError:  # the persistent kernels are not in this build
        schedule = None
    if schedule is not None:
        for design in PERSISTENT_DESIGNS:
            if schedule.plan(design, direction, B, H, _dtype_bytes(dtype), device) is not None:
                return design
    return "graph"


def choose(B: int, H: int, dtype: torch.dtype, device: torch.device, direction: str = "forward") -> str:
    """The kernel that runs a call on ``device`` (a torch device): "step" or a candidate's name."""
    return "step"
