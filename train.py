#!/usr/bin/env python
"""Train the byte-level multiplicative-LSTM language model: the checkout's entry to the training job.

    python train.py --preset tiny --data ../shared/data/imdb/unsup.txt.gz --out runs/tiny
    torchrun --nproc_per_node=4 train.py --data reviews.txt.gz --out runs/paper

The job lives in the package (:mod:`fastmlstm.training`); an installed fastmlstm runs the same job
as ``fastmlstm train ...`` or ``torchrun -m fastmlstm.training ...``. ``python train.py --help``
lists the flags.
"""

import sys

from fastmlstm.training import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
