"""16-bit products on CPUs without native 16-bit GEMMs.

On a CPU without AVX-512 BF16/FP16 (or AMX), PyTorch multiplies bfloat16 and float16 matrices in a
portable loop: 0.9 GFLOP/s against 68 GFLOP/s in float32 on a Zen 3 core (the committed CPU results'
ceilings). A native 16-bit GEMM reads 16-bit operands, accumulates in float32 and rounds the result
once; :func:`linear` does exactly that through float32 GEMMs there (16-bit values are exact in
float32), so a bfloat16 model or autocast gives the same numbers at float32 speed instead of 75
times slower. Everywhere else it is ``F.linear`` (under autocast, autocast's).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear", "native_16bit_gemm"]


@functools.cache
def native_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether PyTorch multiplies ``dtype`` matrices natively (oneDNN) on this CPU."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with autocast's dtype rules; a 16-bit product on a CPU without
    native 16-bit GEMMs runs as a float32 GEMM of the 16-bit values, rounded once to 16 bits."""
    autocast = torch.is_autocast_enabled("cpu") and x.dtype != torch.float64  # (autocast keeps float64)
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if x.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or native_16bit_gemm(dtype):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        args = [t if t is None else t.to(dtype).float() for t in (x, weight, bias)]
        return F.linear(*args).to(dtype)
