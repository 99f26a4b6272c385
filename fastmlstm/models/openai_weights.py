"""The released layout of Radford et al. (2017): conversion between its arrays and a ByteLM's
config and state dict. File-level loading and saving live in :mod:`fastmlstm.models.serialization`
(``fastmlstm.load_openai`` / ``fastmlstm.save_openai``).

The authors released their model as a directory of 15 float32 ``.npy`` files named ``0.npy`` ..
``14.npy``, in TensorFlow's row-major ``x @ W`` layout (see ``docs/MODEL.md``)::

     0 embedding [256, E]    1 wx [E, 4H]    2..5 wh, four [H, H] blocks (concatenated on axis 1 -> [H, 4H])
     6 wmx [E, H]            7 wmh [H, H]    8 b [4H]
     9 gx [4H]   10 gh [4H]  11 gmx [H]      12 gmh [H]        (weight-norm gains)
    13 readout w [H, 256]    14 readout b [256]                 (no weight norm on the readout)

Weight normalization there scales each *column* of a [in, out] matrix to unit norm (TensorFlow's
``l2_normalize(w, dim=0) * g``); a column of the released matrix is a row of torch's [out, in]
matrix, so the released direction ``V`` is stored transposed as ``<name>_v`` and the gains copy
over unchanged. Gate order is i, f, o, u in both.
"""

from __future__ import annotations

import os
import tokenize
from pathlib import Path

import numpy as np
import torch

from .._atomic import FileSet, committed_path
from ..errors import InputError, MissingInputError, ModelFileError

__all__ = ["NUM_FILES", "SENTIMENT_UNIT", "is_openai_dir", "read_released", "released_arrays", "write_released"]

NUM_FILES = 15
SENTIMENT_UNIT = 2388  # the released model's sentiment unit (paper, Fig. 3-4)
_NAMES = {0: "embedding", 1: "wx", 2: "wh block i", 3: "wh block f", 4: "wh block o", 5: "wh block u", 6: "wmx",
          7: "wmh", 8: "b", 9: "gx", 10: "gh", 11: "gmx", 12: "gmh", 13: "readout w", 14: "readout b"}


def _files(path: Path) -> list[Path | None]:
    """The 15 files, where an export that could not finish (nor undo itself) left the previous ones."""
    try:
        return [committed_path(path, f"{i}.npy") for i in range(NUM_FILES)]
    except InputError as exc:
        raise ModelFileError(str(exc)) from None


def is_openai_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding the released layout (``0.npy`` .. ``14.npy``)."""
    path = Path(path)
    return path.is_dir() and all(f is not None and f.is_file() for f in _files(path))


def _read_array(file: Path, shown: Path, name: str) -> np.ndarray:
    """One array of the layout (``shown`` is its name in the folder, ``file`` where it is read)."""
    try:
        with open(file, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # np.load would also take a pickle or an .npz archive
            raise ValueError("it does not begin like a .npy file")
        a = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError, TypeError, OverflowError, MemoryError,
            tokenize.TokenError) as exc:  # truncated, a header numpy cannot parse, an object array
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{shown} ({name}) is not a readable .npy array: {reason}") from None
    if not np.issubdtype(a.dtype, np.floating):
        raise ModelFileError(f"{shown} ({name}) holds {a.dtype}, expected floating point weights")
    return a


def _read_arrays(path: Path) -> list[np.ndarray]:
    if not path.exists():
        raise MissingInputError(f"no released-weights directory at {path}")
    if not path.is_dir():
        raise ModelFileError(f"{path} is a file; the released layout is a directory of 0.npy .. 14.npy "
                             "(for a fastmlstm model file use fastmlstm.load)")
    files = _files(path)
    missing = [f"{i}.npy" for i, f in enumerate(files) if f is None or not f.is_file()]
    if missing:
        raise MissingInputError(f"{path} is missing {', '.join(missing)} of the released layout (0.npy .. 14.npy)")
    arrays = []
    for i, file in enumerate(files):
        arrays.append(_read_array(file, path / f"{i}.npy", _NAMES[i]))
    return arrays


def _check_shapes(arrays: list[np.ndarray], path: Path) -> tuple[int, int]:
    if arrays[0].ndim != 2 or arrays[0].shape[0] != 256:
        raise ModelFileError(f"{path}/0.npy (embedding) must be [256, E], got {list(arrays[0].shape)}")
    E = arrays[0].shape[1]
    if arrays[7].ndim != 2 or arrays[7].shape[0] != arrays[7].shape[1]:
        raise ModelFileError(f"{path}/7.npy (wmh) must be [H, H], got {list(arrays[7].shape)}")
    H = arrays[7].shape[0]
    want = {1: (E, 4 * H), 2: (H, H), 3: (H, H), 4: (H, H), 5: (H, H), 6: (E, H), 7: (H, H), 8: (4 * H,),
            9: (4 * H,), 10: (4 * H,), 11: (H,), 12: (H,), 13: (H, 256), 14: (256,)}
    for i, shape in want.items():
        if tuple(arrays[i].shape) != shape:
            raise ModelFileError(f"{path}/{i}.npy ({_NAMES[i]}) must have shape {list(shape)} for E = {E}, "
                                 f"H = {H}; got {list(arrays[i].shape)}")
    return H, E


def read_released(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a released-layout directory: ``(config, state_dict)`` of the equivalent weight-normalized
    ByteLM, float32 CPU tensors. Raises :class:`~fastmlstm.errors.InputError` naming the file at fault."""
    path = Path(path)
    arrays = _read_arrays(path)
    H, E = _check_shapes(arrays, path)
    wh = np.concatenate(arrays[2:6], axis=1)  # [H, 4H]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    state = {
        "embedding.weight": t(arrays[0]),
        "rnn.weight_ih_v": t(arrays[1].T), "rnn.weight_ih_g": t(arrays[9]),
        "rnn.weight_hh_v": t(wh.T), "rnn.weight_hh_g": t(arrays[10]),
        "rnn.weight_im_v": t(arrays[6].T), "rnn.weight_im_g": t(arrays[11]),
        "rnn.weight_hm_v": t(arrays[7].T), "rnn.weight_hm_g": t(arrays[12]),
        "rnn.bias_ih": t(arrays[8]),
        "readout.weight": t(arrays[13].T), "readout.bias": t(arrays[14]),
    }
    return {"hidden_size": H, "embed_size": E, "weight_norm": True}, state


def released_arrays(model) -> list[np.ndarray]:
    """The 15 float32 arrays of the released layout for a ByteLM.

    A model without weight normalization gets gains equal to its rows' norms, so the released
    equations reproduce its effective weights.
    """
    rnn = model.rnn
    if not rnn.bias:
        raise InputError("the released layout has a gate bias; this model was built with bias=False")

    def as_np(x):
        return np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float32).numpy())

    def direction_and_gain(name: str) -> tuple[np.ndarray, np.ndarray]:
        if rnn.weight_norm:
            v, g = getattr(rnn, f"{name}_v"), getattr(rnn, f"{name}_g")
        else:
            v = getattr(rnn, name)
            g = v.float().norm(dim=1)
        return as_np(v).T, as_np(g)  # [in, out] and [out]

    wx, gx = direction_and_gain("weight_ih")
    wh, gh = direction_and_gain("weight_hh")
    wmx, gmx = direction_and_gain("weight_im")
    wmh, gmh = direction_and_gain("weight_hm")
    arrays = [as_np(model.embedding.weight), wx, *np.split(wh, 4, axis=1), wmx, wmh, as_np(rnn.bias_ih),
              gx, gh, gmx, gmh, as_np(model.readout.weight).T, as_np(model.readout.bias)]
    return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]


def write_released(arrays: list[np.ndarray], path: str | os.PathLike) -> None:
    """Write the 15 arrays as ``0.npy`` .. ``14.npy`` into directory ``path`` (created if needed).

    All 15 are written in full, then replace the folder's 15 as one step
    (:class:`fastmlstm._atomic.FileSet`): a failure at any point leaves the previous files
    byte-identical, and nothing else in the folder is touched."""
    if len(arrays) != NUM_FILES:
        raise InputError(f"the released layout has {NUM_FILES} arrays, got {len(arrays)}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"cannot export into {path}: it is a file, and the released layout is a folder")
    with FileSet(path, what="export folder") as files:
        for i, a in enumerate(arrays):
            with files.open(f"{i}.npy") as f:
                np.save(f, a)
