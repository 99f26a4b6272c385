"""The training job's settings: presets, command-line flags and their validation."""

from __future__ import annotations

import argparse

import torch

from ..errors import InputError
from ..ops.registry import BACKENDS
from ..options import ArgumentParser, argument, check_all

__all__ = ["DESCRIPTION", "MAX_LR", "NUMERIC", "PRESETS", "RUN_KEYS", "add_arguments", "build_parser", "check",
           "parse_args", "resolve"]

DESCRIPTION = """\
Train the byte-level multiplicative-LSTM language model of Radford et al. (2017).

    # a few minutes on a laptop CPU
    fastmlstm train --preset tiny --data reviews.txt.gz --out runs/tiny
    # the paper's recipe (H = 4096, batch 128 x 256 bytes, Adam 5e-4 decayed linearly to zero), 4 GPUs
    torchrun --nproc_per_node=4 -m fastmlstm.training --data reviews.txt.gz --out runs/paper

Truncated backpropagation through time with persistent state: each row of the global batch
(--batch, split across ranks) reads its own contiguous region of the byte stream and carries its
(h, c) from one update to the next. --out gets metrics.jsonl, checkpoints ckpt-<step>.pt (the last
--keep), the final model.pt and corpus.bin. Re-running the same command resumes from the last
checkpoint and gives the same result as an uninterrupted run (bit-exact on CPU); Ctrl-C or SIGTERM
writes a checkpoint first (exit status 130 / 143).
"""

PRESETS = {
    # The paper: one layer, H = 4096, E = 64, 128 x 256 bytes, Adam 5e-4 decayed to zero over one epoch.
    "paper": {"hidden": 4096, "embed": 64, "batch": 128, "seq": 256, "lr": 5e-4, "steps": None, "clip": 1.0,
              "eval_every": 1000, "ckpt_every": 1000, "log_every": 10, "eval_bytes": None},
    # Minutes on a laptop CPU: small enough to see bits/byte fall well below 3 on review text.
    "tiny": {"hidden": 256, "embed": 64, "batch": 32, "seq": 64, "lr": 2e-3, "steps": 2000, "clip": 1.0,
             "eval_every": 250, "ckpt_every": 250, "log_every": 10, "eval_bytes": 200_000},
}

# Settings that define the run: a checkpoint made with other values belongs to another run.
RUN_KEYS = ("hidden", "embed", "weight_norm", "batch", "seq", "lr", "steps", "clip", "seed", "precision",
            "corpus", "eval")

# The largest --lr Adam can take: its first step, lr / (1 - beta1) = 10 lr, is applied to the
# float32 weights as a float32 number; above this torch fails inside the optimizer.
MAX_LR = float(torch.finfo(torch.float32).max) * (1 - 0.9)

# The job's numeric settings; their ranges are fastmlstm.options.OPTIONS's.
NUMERIC = ("steps", "hidden", "embed", "batch", "seq", "lr", "clip", "eval_every", "ckpt_every", "log_every",
           "keep", "eval_bytes", "seed")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training flags, on ``p`` (``train.py``'s parser and ``fastmlstm train``'s subparser)."""
    p.add_argument("--data", action="append", required=True, metavar="FILE[#COLUMN]",
                   help="corpus file (text, .gz, .csv/.tsv[.gz] with #column, default column 'text'); repeatable")
    p.add_argument("--eval-data", action="append", metavar="FILE[#COLUMN]",
                   help="held-out corpus (repeatable); default: the last --eval-bytes of --data")
    p.add_argument("--eval-bytes", type=argument("eval_bytes"), default=None,
                   help="bytes held out from the end of --data for evaluation (paper preset: 1%%, at most "
                        "10 MB; tiny preset: 200 kB)")
    p.add_argument("--out", required=True, help="run directory: metrics, checkpoints, final model")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="defaults for the flags below (default: paper)")
    p.add_argument("--steps", type=argument("steps"), help="optimizer updates (paper preset: one epoch)")
    p.add_argument("--hidden", type=argument("hidden"), help="hidden size H")
    p.add_argument("--embed", type=argument("embed"), help="byte embedding size E")
    p.add_argument("--no-weight-norm", dest="weight_norm", action="store_false", help="plain recurrent matrices")
    p.add_argument("--batch", type=argument("batch"),
                   help="global batch: rows of the byte stream per update, split across ranks")
    p.add_argument("--seq", type=argument("seq"), help="bytes per row per update (truncated BPTT length)")
    p.add_argument("--lr", type=argument("lr"), help="Adam learning rate, decayed linearly to zero over --steps")
    p.add_argument("--clip", type=argument("clip"), help="clip the gradient norm to this (0: off)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="recurrence backend")
    p.add_argument("--eval-every", type=argument("eval_every"),
                   help="evaluate every N updates (0: only at the end)")
    p.add_argument("--ckpt-every", type=argument("ckpt_every"),
                   help="checkpoint every N updates (0: only at the end)")
    p.add_argument("--log-every", type=argument("log_every"), help="write a metrics record every N updates")
    p.add_argument("--keep", type=argument("keep"), default=3, help="checkpoints kept (default 3)")
    p.add_argument("--seed", type=argument("seed"), default=0, help="initialization seed")
    p.add_argument("--start-over", action="store_true",
                   help="when --out holds checkpoints and none can be read, train from step 0 anyway (they are "
                        "kept aside as <name>.unreadable); without it such a run stops with an error")
    p.set_defaults(weight_norm=True)
    return p


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the preset, then check every value; raises InputError."""
    if args.preset not in PRESETS:
        raise InputError(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    if getattr(args, "eval_data", None) and getattr(args, "eval_bytes", None) is not None:
        raise InputError("--eval-bytes and --eval-data exclude each other: --eval-bytes holds out the end of "
                         "--data, --eval-data evaluates on other files instead")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return check(args)


def check(args: argparse.Namespace) -> argparse.Namespace:
    """Check the numeric settings of resolved ``args`` (every one finite and in its range, see
    :data:`fastmlstm.options.OPTIONS`) and store them converted; raises InputError naming the flag.
    ``train()`` calls it too, so a Namespace built in Python gets the command line's checks."""
    missing = [key for key in NUMERIC if not hasattr(args, key)]
    if missing:
        raise InputError(f"the training settings lack {', '.join(missing)}: build them with "
                         "fastmlstm.training.parse_args([...])")
    for key, value in check_all({key: getattr(args, key) for key in NUMERIC}, flags=True).items():
        setattr(args, key, value)
    if args.lr > MAX_LR:
        raise InputError(f"--lr must be at most {MAX_LR:.3g}, got {args.lr!r}: Adam's first update moves each "
                         "weight by up to 10 x --lr, and that step must fit in float32 (the weights' type)")
    return args


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """Parse and resolve the flags (argparse exits on a malformed command line; values raise InputError)."""
    return resolve(build_parser(prog).parse_args(argv))
