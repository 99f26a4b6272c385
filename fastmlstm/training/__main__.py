"""``python -m fastmlstm.training ...`` (and ``torchrun -m fastmlstm.training ...``): the training job."""

import sys

from .loop import main

sys.exit(main(prog="python -m fastmlstm.training"))
