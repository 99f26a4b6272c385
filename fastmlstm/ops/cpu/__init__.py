"""CPU backend: the C++ extension compiled from ``csrc/cpu/`` (:mod:`.build` finds, builds and loads
it; :mod:`.recurrence` calls it with the contract of :mod:`fastmlstm.ops.interface` on precomputed
projections; :mod:`.layer` runs whole layers, the input projections inside the time loop).

The time loops run in C++: per step two GEMMs on prepacked weights (oneDNN's micro-kernels through
ATen, bfloat16 natively where the CPU has it: AVX-512-BF16 dot products or AMX tiles) with the
pointwise work fused into each GEMM tile and vectorized (AVX-512 or AVX2 where the CPU has it,
chosen at run time; :func:`kernel_report` says what runs here).

Importing this package compiles nothing; :func:`is_available` builds the extension on first use
(ninja and a C++ compiler, cached) and reports ``(False, reason)`` when it cannot, so that
``backend="auto"`` falls back to the reference loop.
"""

from __future__ import annotations

from .buffer_cache import cached_bytes, empty_cache
from .build import status as is_available
from .layer import layer_backward, layer_forward, prepare_step, step_key
from .recurrence import backward, fingerprints, forward, kernel_report, prepare_sequence_step

__all__ = ["is_available", "forward", "backward", "layer_forward", "layer_backward", "step_key", "prepare_step", "prepare_sequence_step",
           "fingerprints", "kernel_report", "empty_cache", "cached_bytes"]
