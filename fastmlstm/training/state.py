"""Stage 2, model, optimizer and resume state: what an update needs, built fresh or restored from a
checkpoint so that the resumed run continues exactly where the interrupted one stopped."""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, out_of_memory
from ..models.lm import ByteLM
from ..ops.registry import ENV_BACKEND, BackendUnavailableError, resolve_backend
from .config import RUN_KEYS
from .data import Data
from .distributed import Context

__all__ = ["TrainState", "build_state", "check_backend", "check_same_run", "out_of_memory", "rng_state",
           "run_descriptor", "set_rng_state"]


@dataclass
class TrainState:
    model: ByteLM
    optimizer: torch.optim.Optimizer
    h: torch.Tensor  # [rows, H] carried hidden state of this rank's rows (truncated BPTT)
    c: torch.Tensor  # [rows, H] carried cell state
    step: int  # updates done


def run_descriptor(args: argparse.Namespace, data: Data) -> dict:
    """The settings that define the run (``RUN_KEYS``); a checkpoint must match them to be resumed."""
    return {"hidden": args.hidden, "embed": args.embed, "weight_norm": args.weight_norm, "batch": args.batch,
            "seq": args.seq, "lr": args.lr, "steps": args.steps, "clip": args.clip, "seed": args.seed,
            "precision": args.precision, "corpus": data.corpus, "eval": data.eval}


def check_same_run(saved: dict, current: dict, out: Path) -> None:
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
             for k in RUN_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise InputError(f"{out} holds checkpoints of a different run (" + "; ".join(diffs)
                         + "). Resume with the same settings, or use a new --out.")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.array(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py_state = random.getstate()
    random.setstate((py_state[0], tuple(state["python"]), py_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_backend(args: argparse.Namespace, ctx: Context) -> None:
    """An explicit ``--backend`` (or ``FASTMLSTM_BACKEND``) that cannot run on this rank's device
    is refused before anything is written, not at the first update. ``auto`` always runs: it is
    not resolved here (that could build the CPU extension before a quick rejection of the data)."""
    if args.backend == "auto" and not os.environ.get(ENV_BACKEND, "").strip():
        return
    origin = f"--backend {args.backend}" if args.backend != "auto" else f"{ENV_BACKEND}={os.environ[ENV_BACKEND]}"
    try:
        resolve_backend(args.backend, ctx.device)
    except BackendUnavailableError as exc:
        raise InputError(f"{origin}: {exc}") from None


def _new_model(args: argparse.Namespace, ctx: Context) -> ByteLM:
    """The model on this rank's device; too big for its memory, an InputError saying how big."""
    try:
        return ByteLM(args.hidden, args.embed, weight_norm=args.weight_norm, backend=args.backend).to(ctx.device)
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        reason = reason.partition("DefaultCPUAllocator: ")[2] or reason  # without the C++ assertion's text
    # Counted on the meta device, which allocates nothing.
    size = sum(p.numel() for p in ByteLM(args.hidden, args.embed, weight_norm=args.weight_norm,
                                         device="meta").parameters())
    raise InputError(f"out of memory building the model on {ctx.device} (--hidden {args.hidden}, --embed "
                     f"{args.embed}: {size:,} parameters, {size * 4 / 2**30:,.1f} GiB in float32 and about four "
                     f"times that with gradients and Adam's state): {reason}")


def build_state(args: argparse.Namespace, ctx: Context, data: Data, ckpt: dict | None) -> TrainState:
    """A fresh model and Adam with zero carried state, or all of it as ``ckpt`` left it. Every random
    generator a checkpoint records (torch's, NumPy's, Python's) starts from ``--seed``, so that two
    runs of one command write the same checkpoints."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    model = _new_model(args, ctx)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows = slice(data.row_start, data.row_start + data.rows)
    if ckpt is None:
        h = torch.zeros(data.rows, args.hidden, device=ctx.device)
        return TrainState(model, optimizer, h, torch.zeros_like(h), 0)
    model.load_state_dict(ckpt["model"]["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return TrainState(model, optimizer, ckpt["h"][rows].to(ctx.device), ckpt["c"][rows].to(ctx.device), ckpt["step"])
