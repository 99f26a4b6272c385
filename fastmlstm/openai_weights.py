"""The released weights of Radford et al. (2017): load them into a ByteLM, export a ByteLM to them.

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
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_write

__all__ = ["NUM_FILES", "SENTIMENT_UNIT", "is_openai_dir", "load_openai", "save_openai"]

NUM_FILES = 15
SENTIMENT_UNIT = 2388  # the released model's sentiment unit (paper, Fig. 3-4)


def is_openai_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding the released layout (``0.npy`` .. ``14.npy``)."""
    path = Path(path)
    return path.is_dir() and all((path / f"{i}.npy").is_file() for i in range(NUM_FILES))


def _read_arrays(path: Path) -> list[np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"no released-weights directory at {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; the released layout is a directory of 0.npy .. 14.npy "
                                 "(for a fastmlstm model file use fastmlstm.load)")
    missing = [f"{i}.npy" for i in range(NUM_FILES) if not (path / f"{i}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is missing {', '.join(missing)} of the released layout (0.npy .. 14.npy)")
    arrays = []
    for i in range(NUM_FILES):
        a = np.load(path / f"{i}.npy", allow_pickle=False)
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{path / f'{i}.npy'} holds {a.dtype}, expected floating point weights")
        arrays.append(a)
    return arrays


def _check_shapes(arrays: list[np.ndarray], path: Path) -> tuple[int, int]:
    if arrays[0].ndim != 2 or arrays[0].shape[0] != 256:
        raise ValueError(f"{path}/0.npy (embedding) must be [256, E], got {list(arrays[0].shape)}")
    E = arrays[0].shape[1]
    if arrays[7].ndim != 2 or arrays[7].shape[0] != arrays[7].shape[1]:
        raise ValueError(f"{path}/7.npy (wmh) must be [H, H], got {list(arrays[7].shape)}")
    H = arrays[7].shape[0]
    want = {1: (E, 4 * H), 2: (H, H), 3: (H, H), 4: (H, H), 5: (H, H), 6: (E, H), 7: (H, H), 8: (4 * H,),
            9: (4 * H,), 10: (4 * H,), 11: (H,), 12: (H,), 13: (H, 256), 14: (256,)}
    names = {1: "wx", 2: "wh block i", 3: "wh block f", 4: "wh block o", 5: "wh block u", 6: "wmx", 7: "wmh",
             8: "b", 9: "gx", 10: "gh", 11: "gmx", 12: "gmh", 13: "readout w", 14: "readout b"}
    for i, shape in want.items():
        if tuple(arrays[i].shape) != shape:
            raise ValueError(f"{path}/{i}.npy ({names[i]}) must have shape {list(shape)} for E = {E}, H = {H}; "
                             f"got {list(arrays[i].shape)}")
    return H, E


def load_openai(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                backend: str = "auto"):
    """Load the released weights (a directory of ``0.npy`` .. ``14.npy``) into a :class:`~fastmlstm.ByteLM`.

    Args:
        path: the directory (``model/`` in the authors' repository).
        device, dtype: of the returned model's parameters (default: CPU, float32, the files' precision).
        backend: recurrence backend of the returned model.

    Returns:
        A weight-normalized ``ByteLM(hidden_size=H, embed_size=E)`` whose forward pass computes the
        released model's equations (H = 4096, E = 64 for the released files).

    Example::

        >>> model = fastmlstm.load_openai("generating-reviews-discovering-sentiment/model")  # doctest: +SKIP
        >>> feats = fastmlstm.probe.featurize(model, ["demo!"])                               # doctest: +SKIP
        >>> feats.shape                                                                       # doctest: +SKIP
        (1, 4096)
    """
    from .lm import ByteLM

    path = Path(path)
    arrays = _read_arrays(path)
    H, E = _check_shapes(arrays, path)
    wh = np.concatenate(arrays[2:6], axis=1)  # [H, 4H]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    state = {
        "embedding.weight": t(arrays[0]),
        "rnn.weight_ih_v": t(arrays[1].T), "rnn.weight_ih_g": t(arrays[9]),
        "rnn.weight_hh_v": t(wh.T), "rnn.weight_hh_g": t(arrays[10]),
        "rnn.weight_im_v": t(arrays[6].T), "rnn.weight_im_g": t(arrays[11]),
        "rnn.weight_hm_v": t(arrays[7].T), "rnn.weight_hm_g": t(arrays[12]),
        "rnn.bias": t(arrays[8]),
        "readout.weight": t(arrays[13].T), "readout.bias": t(arrays[14]),
    }
    model = ByteLM(hidden_size=H, embed_size=E, weight_norm=True, backend=backend, device="meta")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype if dtype is not None else torch.float32)


def save_openai(model, path: str | os.PathLike) -> None:
    """Write a :class:`~fastmlstm.ByteLM` in the released layout (15 float32 ``.npy`` files) to directory ``path``.

    A model without weight normalization is written with gains equal to its rows' norms, so the
    released equations reproduce its effective weights. The directory is created if needed; the
    files are written under temporary names first and renamed into place.

    Example::

        >>> fastmlstm.save_openai(model, "exported/")                          # doctest: +SKIP
        >>> fastmlstm.load_openai("exported/")                                 # doctest: +SKIP
    """
    rnn = model.rnn
    if rnn.bias is None:
        raise ValueError("the released layout has a gate bias; this model was built with bias=False")
    H = rnn.hidden_size

    def direction_and_gain(name: str) -> tuple[np.ndarray, np.ndarray]:
        if rnn.weight_norm:
            v, g = getattr(rnn, f"{name}_v"), getattr(rnn, f"{name}_g")
        else:
            v = getattr(rnn, name)
            g = v.float().norm(dim=1)
        as_np = lambda x: x.detach().to(device="cpu", dtype=torch.float32).numpy()
        return as_np(v).T, as_np(g)  # [in, out] and [out]

    wx, gx = direction_and_gain("weight_ih")
    wh, gh = direction_and_gain("weight_hh")
    wmx, gmx = direction_and_gain("weight_im")
    wmh, gmh = direction_and_gain("weight_hm")
    f32 = lambda x: np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float32).numpy())
    arrays = [f32(model.embedding.weight), wx, *np.split(wh, 4, axis=1), wmx, wmh, f32(rnn.bias),
              gx, gh, gmx, gmh, f32(model.readout.weight).T, f32(model.readout.bias)]
    assert len(arrays) == NUM_FILES and arrays[2].shape == (H, H)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        with atomic_write(path / f"{i}.npy") as f:
            np.save(f, np.ascontiguousarray(a, dtype=np.float32))
