"""Stage 3, one update: the learning-rate schedule, forward over this rank's rows from their
carried state, the byte cross entropy, backward, clipping and the Adam step; and what is said when
the updates diverge (a loss or weights that are no longer finite)."""

from __future__ import annotations

import argparse
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..options import check
from .state import TrainState

__all__ = ["LN2", "TrainingDiverged", "autocast_for", "cross_entropy_sum", "diverged", "learning_rate", "train_step",
           "weights_finite"]

LN2 = math.log(2.0)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-byte cross entropy (nats) of logits [B, T, 256] against targets [B, T]."""
    return F.cross_entropy(logits.reshape(-1, 256).float(), targets.reshape(-1).long(), reduction="sum")


def autocast_for(args: argparse.Namespace, device: torch.device):
    """A context factory: bf16 autocast when asked (``--precision bf16``, or ``auto`` on a GPU), else nothing."""
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """The paper's schedule: ``--lr`` decayed linearly to zero over ``--steps``."""
    return args.lr * (1.0 - step / args.steps)


def train_step(state: TrainState, forward, x: torch.Tensor, y: torch.Tensor, new_epoch: bool, lr: float,
               amp, clip: float) -> torch.Tensor:
    """One optimizer update on inputs/targets [rows, seq]; returns the mean loss (nats, detached).

    ``forward`` is the model or its DistributedDataParallel wrapper. The carried (h, c) restarts
    from zero where the rows' regions start over (``new_epoch``) and is detached afterwards.
    ``clip`` > 0 clips the gradient norm, 0 does not; anything else (NaN, inf, < 0) is an InputError,
    so that no value turns clipping off by accident.
    """
    clip = check("clip", clip)
    if new_epoch:
        state.h.zero_()
        state.c.zero_()
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    device = state.h.device
    with amp():
        logits, (h_n, c_n) = forward(x.to(device, non_blocking=True), (state.h, state.c))
    loss = cross_entropy_sum(logits, y.to(device, non_blocking=True)) / y.numel()
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.h, state.c = h_n.detach(), c_n.detach()
    state.step += 1
    return loss.detach()


class TrainingDiverged(InputError):
    """The loss or the weights stopped being finite: the run cannot go on, and nothing is written
    from that state. An InputError: the cure is in the settings (most often a lower ``--lr``)."""


def diverged(what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what}. Nothing was written from that state (the checkpoints and "
                            "model.pt are as they were); train again with a lower --lr, in a new --out")


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (no NaN, no inf): one host sync, for the points that
    write the model or the checkpoints, not for every update."""
    with torch.no_grad():
        flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
