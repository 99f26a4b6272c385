"""Test settings shared by the whole suite.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, so
TRITON_INTERPRET=1 is set here, before anything imports triton. With a GPU the same tests run on
CUDA at real sizes as well (the ``real_size`` shapes).
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastmlstm  # noqa: E402
from fastmlstm.ops import interface as common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Backends that can run on this machine's test device ("reference" always; "triton" through the
# interpreter on CPU; "cuda" once the extension builds).
BACKENDS = fastmlstm.available_backends(DEVICE)
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REPO = Path(__file__).resolve().parent.parent
# The shared corpora: FASTMLSTM_DATA, else ../shared/data beside this checkout (as in CI), so that
# the package's loaders (which read FASTMLSTM_DATA) and the tests agree on one folder.
os.environ.setdefault("FASTMLSTM_DATA", str(REPO.parent / "shared" / "data"))
DATA_DIR = Path(os.environ["FASTMLSTM_DATA"])


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails a test."""
    monkeypatch.setattr(common, "POISON_BUFFERS", True)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def word_corpus(path: Path, *, seed: int, lines: int) -> Path:
    """A synthetic review-like corpus of ``lines`` lines of 8 words at ``path``, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    words = b"the a movie film great bad plot acting loved hated it was and but not very".split()
    text = [b" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(lines)]
    path.write_bytes(b"\n".join(text) + b"\n")
    return path
