"""Reference backend: the recurrence as a plain PyTorch loop (:mod:`.recurrence`), the
specification every other backend is tested against and the fallback that runs anywhere.

It takes any device and every dtype PyTorch multiplies, float64 included (``torch.autograd.gradcheck``
runs through it); it needs nothing but PyTorch.
"""

from __future__ import annotations

from .recurrence import backward, forward

__all__ = ["is_available", "forward", "backward"]


def is_available() -> tuple[bool, str]:
    return True, ""
