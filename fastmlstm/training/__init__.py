"""Training the byte-level multiplicative-LSTM language model of Radford et al. (2017).

    fastmlstm train --preset tiny --data reviews.txt.gz --out runs/tiny     # minutes on a CPU
    torchrun --nproc_per_node=4 -m fastmlstm.training --data reviews.txt.gz --out runs/paper

(``python train.py ...`` in a checkout is the same job.) Truncated backpropagation through time with
persistent state: the final (h, c) of one update, detached, is the initial state of the next for
the same batch row, reset when the rows' regions of the byte stream start over. ``--batch`` is the
global batch, split across ranks; each row (and so each rank) reads its own contiguous region.

The job in stages, one module each:
    config       presets and flags                    data         byte streams and row batchers
    state        model, optimizer, resume state       update       one optimizer update
    metrics      logging and held-out evaluation      checkpoints  atomic checkpoints, exact resume
    distributed  ranks and collectives                loop         the stages put together

Outputs in ``--out``: ``metrics.jsonl`` (one JSON object per logged step), ``ckpt-<step>.pt``
checkpoints (the last ``--keep``), ``model.pt`` (the final model, for ``fastmlstm.load``), and
``corpus.bin`` (the joined byte stream). Re-running the same command with the same ``--out`` resumes
from the last checkpoint and gives the same result as an uninterrupted run (bit-exact on CPU).
Ctrl-C (SIGINT) or SIGTERM writes a checkpoint, then exits with 130 or 143.
"""

from .config import PRESETS, build_parser, parse_args
from .loop import main, train

__all__ = ["PRESETS", "build_parser", "main", "parse_args", "train"]
