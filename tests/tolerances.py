"""Tolerances, stated once.

Errors are measured as max |actual - truth| / max(max |truth|, 1), against the float64 truth.
A backend passes when its error is at most ``FACTOR`` times the error of the reference backend in
the same dtype plus ``ABS[dtype]`` (the flash-attention criterion: a fused kernel may be no less
accurate than plain PyTorch in its own precision), and the reference itself must stay within
``REFERENCE[dtype]`` of the truth.
"""

import torch

FACTOR = 2.0
# Slack for summation-order noise when the reference happens to sit very close to the truth:
# about half a unit in the last place of the dtype at 1.0 (float32: a few units).
ABS = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
# How far the reference itself may sit from float64. Measured on the CPU test shapes (worst over
# all outputs and gradients): float32 5e-7, float16 1.3e-3, bfloat16 9e-3; the bounds leave room
# for the longer reductions of the GPU-sized cases.
REFERENCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rel_err(actual, truth):
    actual = actual.double()
    truth = truth.double()
    assert actual.shape == truth.shape, (actual.shape, truth.shape)
    if truth.numel() == 0:
        return 0.0
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((actual - truth).abs().max() / truth.abs().max().clamp_min(1.0)).item()
