"""Featurization with the fused forward: the paper's text features and per-byte cell traces.

Dimension letters: N texts, B batch rows, T bytes (time steps), H hidden units, U chosen units.

The paper's feature of a text (``docs/MODEL.md``): HTML-unescape, replace newlines with spaces,
strip, prepend ``"\\n "`` and append ``" "``, encode as UTF-8, run the model from a zero state and take
the final cell state c_T, with tanh applied.

:func:`featurize` sorts the texts by length (longest first) and runs them in batches through
:meth:`ByteLM.hidden` with per-row ``lengths``, so rows of different lengths share one fused pass
and each row's final state is its own. Long batches are cut into time chunks that carry the state
from one call to the next; rows that have ended leave the batch (the sort makes the active rows a
prefix), so no step is spent on padding beyond a chunk's tail.
"""

from __future__ import annotations

import html
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError, InputTypeError
from ..models.lm import ByteLM, pad_bytes
from ..nn.modules import autocast_dtype
from ..ops.interface import accumulation_dtype
from ..ops.registry import REGISTRY, resolve_backend
from ..options import Number, check, check_each

__all__ = ["cell_trace", "check_model", "encode_texts", "featurize", "preprocess"]

START = "\n "  # the paper's start token ("\n") and a space
END = " "

# Show a progress bar by default once a job holds this many bytes.
PROGRESS_MIN_BYTES = 1_000_000


def preprocess(text: str | bytes) -> bytes:
    """The paper's preprocessing of one text, returning the bytes the model reads.

    ``html.unescape``, ``"\\n"`` -> ``" "``, strip surrounding whitespace, then ``"\\n " + text + " "``,
    encoded as UTF-8. ``bytes`` input is read as UTF-8 with invalid sequences kept as the original
    bytes (the model reads bytes, so nothing is lost or replaced); control characters pass through
    as their bytes. An empty text becomes ``b"\\n  "`` (start token, space, end space).

    Example::

        >>> preprocess("Great&amp;cheap\\nphone ")
        b'\\n Great&cheap phone '
    """
    if isinstance(text, (bytes, bytearray)):
        s = bytes(text).decode("utf-8", errors="surrogateescape")
    elif isinstance(text, str):
        s = text
    else:
        raise InputTypeError(f"a text must be str or bytes, got {type(text).__name__}")
    s = START + html.unescape(s).replace("\n", " ").strip() + END
    try:
        return s.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as exc:
        bad = s[exc.start]
        raise InputError(f"text holds a lone surrogate U+{ord(bad):04X} at character {exc.start - len(START)}, "
                         "which has no UTF-8 encoding; pass the raw bytes instead of a str to keep "
                         "undecodable input as bytes") from None


def encode_texts(texts: Sequence[str | bytes], *, preprocess_texts: bool = True) -> list[bytes]:
    """Check ``texts`` and turn each into the bytes the model reads (see :func:`preprocess`).

    Without ``preprocess_texts`` a ``str`` is encoded as UTF-8 as it is and ``bytes`` pass unchanged.
    """
    if isinstance(texts, (str, bytes, bytearray)):
        raise InputTypeError("texts must be a list of texts, not a single str or bytes; wrap it: [text]")
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    try:
        texts = list(texts)
    except TypeError:
        raise InputTypeError(f"texts must be a sequence of str or bytes, got {type(texts).__name__}") from None
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, (str, bytes, bytearray)):
            raise InputTypeError(f"texts[{i}] is {type(t).__name__}; every text must be str or bytes")
        try:
            if preprocess_texts:
                out.append(preprocess(t))
            else:
                out.append(bytes(t) if not isinstance(t, str) else t.encode("utf-8", errors="surrogateescape"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise InputError(f"texts[{i}]: {exc}") from None
    return out


def check_model(model, name: str = "model") -> ByteLM:
    """``model`` if it is a :class:`~fastmlstm.ByteLM`, else :class:`InputTypeError` saying what to pass."""
    if isinstance(model, ByteLM):
        return model
    hint = ""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        hint = f"; load the file first: fastmlstm.from_pretrained({str(model)!r})"
    raise InputTypeError(f"{name} must be a ByteLM, got {type(model).__name__}{hint}")


def _model_device(model) -> torch.device:
    return model.readout.weight.device


def _chunk_steps(model, rows: int, chunk_size: int | None) -> int:
    """Time steps per call.

    Rows that have ended leave the batch only between calls, so shorter calls waste fewer steps on
    padding; each call costs a little fixed work (the input table, Python, launches), so a call
    should hold enough work to hide it. On CPU that is about 2^28 multiply-adds and at least 16
    steps. On a GPU a step of the memory-bound recurrence costs nearly the same with fewer rows, so
    padding is cheap there and calls are long (256 steps). The call's [T, B, 5H] projections and
    [T, B, H] outputs must also fit a memory budget (512 MB on CPU, 2 GB on a GPU).
    """
    if chunk_size is not None:
        return chunk_size
    H = model.hidden_size
    device = _model_device(model)
    budget = (2 << 30) if device.type == "cuda" else (512 << 20)
    memory_steps = budget // max(rows * 6 * H * model.readout.weight.element_size(), 1)
    if device.type == "cuda":
        return int(max(1, min(memory_steps, 256)))
    if REGISTRY[resolve_backend(model.backend, device)].skips_finished_rows:
        # The backend stops multiplying rows past their length inside a call (they are sorted
        # longest first): padding costs nothing there, so calls are as long as keeps the call's
        # [T, B, 5H] projections under 16 MiB (reused by the allocator and cache-resident; a fresh
        # large tensor costs page faults), and at least 16 steps.
        steps = (16 << 20) // max(rows * 5 * H * model.readout.weight.element_size(), 1)
        return int(max(1, min(memory_steps, max(16, steps))))
    work_steps = (1 << 28) // max(rows * 5 * H * H, 1)
    return int(max(1, min(memory_steps, max(16, min(256, work_steps)))))


def _run_sorted(model, seqs: list[bytes], weights, chunk: int, units: torch.Tensor | None = None):
    """Final (h, c) [B, H] float32 of byte strings sorted longest first, and, with ``units``, the
    cell states of those units at every step of the first row (used by :func:`cell_trace`)."""
    device = _model_device(model)
    B, H = len(seqs), model.hidden_size
    lengths = [len(s) for s in seqs]
    batch, _ = pad_bytes(seqs, device)
    # the state is in the dtype the recurrence accumulates in: float64 for a float64 model, else float32
    state_dtype = accumulation_dtype(autocast_dtype(device.type, weights.weight_hh.dtype) or weights.weight_hh.dtype)
    h = torch.zeros(B, H, dtype=state_dtype, device=device)
    c = torch.zeros(B, H, dtype=state_dtype, device=device)
    trace = []
    T = lengths[0] if lengths else 0
    for start in range(0, T, chunk):
        active = sum(1 for n in lengths if n > start)  # a prefix: lengths are sorted longest first
        steps = min(chunk, lengths[0] - start)
        seg_lengths = [min(n - start, steps) for n in lengths[:active]]
        segment = batch[:active, start : start + steps]
        ragged = seg_lengths[-1] != steps
        _, (h_a, c_a), *cells = model.hidden(
            segment, (h[:active], c[:active]), lengths=seg_lengths if ragged else None,
            return_cell_states=units is not None, weights=weights)
        h[:active], c[:active] = h_a, c_a
        if units is not None:
            trace.append(cells[0][0, :, units])
    return h, c, trace


def _weights(model):
    return model.rnn.effective_weights()


def _check_finite(model, values: np.ndarray, what: str) -> np.ndarray:
    """``values`` if every one is finite; else an InputError blaming the model's non-finite
    parameters (the cell state of finite weights grows by at most 1 a byte, so cannot overflow)."""
    if np.isfinite(values).all():
        return values
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    why = (f"the model's parameters hold NaN or inf ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})"
           if broken else "the model's computation overflowed")
    raise InputError(f"{what} are not finite numbers: {why}")


def featurize(
    model,
    texts: Sequence[str | bytes],
    *,
    batch_size: int | None = None,
    preprocess: bool = True,
    activation: str | None = "tanh",
    progress: bool | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """The paper's features of each text: the final cell state after the text, tanh applied.

    Args:
        model: a :class:`~fastmlstm.ByteLM` (any device and dtype; runs where its parameters are).
        texts: N texts, ``str`` or ``bytes`` (see :func:`preprocess` for invalid UTF-8, control
            characters and empty texts; an empty list gives a [0, H] array).
        batch_size: texts per fused pass (default 512).
        preprocess: apply the paper's preprocessing (:func:`preprocess`); without it the bytes of
            each text are read as they are (an empty text then gives the zero state).
        activation: ``"tanh"`` (the paper's features, values in [-1, 1]) or ``None`` for the raw
            final cell state (what the released ``encoder.py`` returns).
        progress: show a tqdm bar with characters/s (default: when the job holds >= 1 MB of text).
        chunk_size: time steps per call (default: sized to a memory budget).

    Returns:
        ``np.ndarray`` [N, H] float32, row i for ``texts[i]``, whatever the model's dtype. A model
        whose parameters hold NaN or inf gets an InputError naming them, not NaN features.

    Example::

        >>> model = fastmlstm.ByteLM(hidden_size=64, embed_size=16)
        >>> featurize(model, ["great phone", "awful", ""]).shape
        (3, 64)
    """
    check_model(model)
    if activation not in ("tanh", None):
        raise InputError(f"activation must be 'tanh' or None, got {activation!r}")
    batch_size, chunk_size = check("batch_size", batch_size), check("chunk_size", chunk_size)
    seqs = encode_texts(texts, preprocess_texts=preprocess)
    H = model.hidden_size
    features = np.zeros((len(seqs), H), dtype=np.float32)
    if not seqs:
        return features
    if batch_size is None:
        batch_size = 512
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    total = sum(len(s) for s in seqs)
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    with torch.no_grad(), tqdm(total=total, unit="char", unit_scale=True, disable=not show,
                               desc="featurize", leave=False) as bar:
        weights = _weights(model)
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]
            batch = [seqs[i] for i in idx]
            if not batch[0]:  # only empty texts are left (possible without preprocessing)
                break
            _, c, _ = _run_sorted(model, batch, weights, _chunk_steps(model, len(batch), chunk_size))
            if activation == "tanh":
                c = torch.tanh(c)
            features[idx] = c.float().cpu().numpy()
            bar.update(sum(len(s) for s in batch))
    return _check_finite(model, features, "the features")


def _unit_index(units, H: int) -> list[int]:
    """``units`` (None, one index, or a sequence / 1-D integer array or tensor of them) as a list of
    ints in [0, H); bools, floats, strings and anything else raise naming ``units`` and the range."""
    if units is None:
        return list(range(H))
    rule = f"units must be unit indices, integers in [0, {H})"
    if isinstance(units, (torch.Tensor, np.ndarray)):
        if units.ndim > 1:
            raise InputTypeError(f"{rule}: one index or a 1-D integer array of them, got {units!r}")
        items = [units] if units.ndim == 0 else list(units)
    elif isinstance(units, (numbers.Number, str, bytes)):
        items = [units]
    else:
        try:
            items = list(units)
        except TypeError:
            raise InputTypeError(f"{rule}: one index or a sequence of them, got {type(units).__name__}") from None
    if not items:
        raise InputError(f"{rule}, got none ({units!r})")
    at = "" if len(items) == 1 and items[0] is units else " (units[{i}])"  # (one index: nothing to point at)
    return check_each(items, Number(int, 0, H - 1), rule, at)  # (bools, bool tensors included, are refused)


def cell_trace(
    model,
    text: str | bytes,
    units: int | Sequence[int] | None = None,
    *,
    preprocess: bool = True,
    chunk_size: int | None = None,
) -> np.ndarray:
    """The cell state after every byte of one text, for visualization.

    Args:
        model: a :class:`~fastmlstm.ByteLM`.
        text: one text (``str`` or ``bytes``).
        units: a unit index (an int), a list of them (or a 1-D integer array or tensor), or None for
            all H. Bools, floats and strings are refused.
        preprocess: apply the paper's preprocessing first, so row j is the state after byte j of
            ``preprocess(text)`` and ``tanh(trace[-1])`` equals ``featurize(model, [text])[0]``.
        chunk_size: time steps per call (default: sized to a memory budget).

    Returns:
        ``np.ndarray`` [len(bytes), U] float32 raw cell values (no tanh), U = H, ``len(units)``,
        or 1 for a single int.

    Example::

        >>> model = fastmlstm.ByteLM(hidden_size=64, embed_size=16)
        >>> cell_trace(model, "so good", units=[3, 5]).shape   # "\\n so good " is 10 bytes
        (10, 2)
    """
    check_model(model)
    chunk_size = check("chunk_size", chunk_size)
    seq = encode_texts([text], preprocess_texts=preprocess)[0]
    index = _unit_index(units, model.hidden_size)
    if not seq:
        return np.zeros((0, len(index)), dtype=np.float32)
    device = _model_device(model)
    with torch.no_grad():
        unit_index = torch.tensor(index, dtype=torch.long, device=device)
        _, _, trace = _run_sorted(model, [seq], _weights(model), _chunk_steps(model, 1, chunk_size), unit_index)
    return _check_finite(model, torch.cat(trace).cpu().numpy().astype(np.float32, copy=False), "the cell states")
