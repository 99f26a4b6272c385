"""Persistent Gluon kernels for Hopper (sm_90a): one launch runs every step of a call.

- :mod:`.schedule`: which CTA computes what, as data; the kernels, the CPU executor and the cost
  model read the same :class:`~.schedule.Schedule`.
- :mod:`.gluon_forward`, :mod:`.gluon_backward` (on :mod:`.gluon_common` and :mod:`.gluon_finish`):
  the kernels.
- :mod:`.launch`: the backend contract (buffers, one launch, the error word).
- :mod:`.executor`: runs a schedule on the CPU with torch, CTAs interleaved in random orders.
- :mod:`.targets`: every kernel configuration, for the static report.

Two designs, registered with the Triton backend's dispatcher (:mod:`..dispatch`) by
:func:`candidates`: "stationary" (weights kept in shared memory across steps and, where they do
not all fit, the rest in L2) and "cluster" (weights streamed every step). No CPU can run them: the dispatcher checks each against
the per-step path on the GPU at hand before it uses it.

Importing this package imports neither Triton's Gluon nor torch.cuda, and runs nothing.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["candidates", "is_available"]


@functools.lru_cache(maxsize=1)
def is_available() -> tuple[bool, str]:
    """(True, "") where this Triton has the Gluon pieces the kernels use, else (False, why)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401

        from . import gluon_backward, gluon_forward  # noqa: F401
    except Exception as exc:  # an older Triton, or no Triton: the per-step kernels stay
        return False, f"the persistent kernels need Triton's Gluon for Hopper ({type(exc).__name__}: {exc})"
    return True, ""


def _design(name: str):
    from . import launch
    from .schedule import plan

    def applies(B, H, dtype, device) -> bool:
        e = dtype.itemsize if hasattr(dtype, "itemsize") else 2
        return all(plan(name, d, B, H, e, device) is not None for d in ("forward", "backward"))

    def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
        return launch.forward(name, launch.device_info(proj.device), launch.gpu_forward, proj, weight_hh, weight_hm,
                              h0, c0, lengths, save_for_backward, return_cell_states)

    def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states,
                 act):
        return launch.backward(name, launch.device_info(output.device), launch.gpu_backward, grad_output, grad_c_n,
                               grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states, act)

    return applies, forward, backward


def candidates() -> list:
    """The two designs as :class:`..dispatch.Candidate` objects (none where Gluon is missing)."""
    ok, why = is_available()
    if not ok:
        logging.getLogger("fastmlstm").info("fastmlstm: %s; the per-step kernels run", why)
        return []
    from ..dispatch import Candidate

    return [Candidate(name, *_design(name)) for name in ("stationary", "cluster")]
