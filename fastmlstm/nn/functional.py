"""Functional form of the multiplicative LSTM (Krause et al. 2016) as used by Radford et al. (2017).

Per step, with x_t the input and (h, c) the carried state (gate order i, f, o, u)::

    m_t = (x_t W_im^T) * (h_{t-1} W_hm^T)
    z_t = x_t W_ih^T + m_t W_hh^T + b
    c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_u)
    h_t = sigmoid(z_o) * tanh(c_t)

Weights use torch's [out, in] layout: ``weight_ih`` [4H, I], ``weight_hh`` [4H, H] (applied to m),
``weight_im`` [H, I], ``weight_hm`` [H, H], ``bias`` [4H]. Weight normalization, if any, is the
caller's business (:class:`fastmlstm.FastMLSTM` applies it once per forward); these functions see
effective weights. Under ``torch.autocast`` they run in the autocast dtype, as the layer does: the
input (or projections) and weights are cast to it after the checks (float64 is left alone).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..errors import InputError, InputTypeError
from ..ops.interface import GATES, accumulation_dtype

__all__ = ["multiplicative_lstm", "multiplicative_lstm_recurrence", "multiplicative_lstm_step", "SUPPORTED_DTYPES"]

# float64 runs on the reference backend only (for torch.autograd.gradcheck and float64 models).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise InputTypeError(f"{name} has unsupported dtype {dtype}; fastmlstm supports "
                             f"{[str(d) for d in SUPPORTED_DTYPES]}")


def _tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_matrix(name: str, w, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    w = _tensor(name, w)
    if w.shape != shape:  # (torch.Size is a tuple)
        raise InputError(f"{name} must have shape {list(shape)}, got {list(w.shape)}")
    if w.dtype != dtype:
        raise InputTypeError(f"{name} has dtype {w.dtype} but the input has dtype {dtype}; they must match")
    if w.device != device:
        raise InputError(f"{name} is on {w.device} but the input is on {device}; move them to one device")
    return w


def _check_state(initial_state, B: int, H: int, dtype: torch.dtype, device: torch.device):
    acc = accumulation_dtype(dtype)
    if initial_state is None:
        zeros = torch.zeros(B, H, dtype=acc, device=device)
        return zeros, zeros
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise InputTypeError("initial_state must be a pair (h0, c0) of [B, H] tensors")
    state = []
    for name, s in zip(("h0", "c0"), initial_state):
        if not isinstance(s, Tensor):  # (as _tensor, without formatting the name on every call)
            raise InputTypeError(f"initial_state {name} must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != (B, H):
            raise InputError(f"initial_state {name} must have shape [B, H] = [{B}, {H}], got {list(s.shape)}")
        if s.dtype not in (acc, dtype):
            allowed = f"the input's {dtype}" if acc == dtype else f"{acc} or the input's {dtype}"
            raise InputTypeError(f"initial_state {name} has dtype {s.dtype}; it must be {allowed}")
        if s.device != device:
            raise InputError(f"initial_state {name} is on {s.device} but the input is on {device}")
        state.append(s if s.dtype == acc else s.to(acc))  # (a call saved per state: steps are short)
    return tuple(state)


def _length(value) -> int:
    """One entry of a lengths list: an int (numpy's and 0-d integer tensors too), never truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise InputTypeError(f"lengths must hold integers, got {value!r} ({type(value).__name__})") from None


# Integer dtypes whose min and max PyTorch does not compute: their lengths are read as Python ints.
_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def _lengths_tensor(values: list[int], T: int) -> Tensor:
    """Python ints as an int64 tensor; one beyond int64's range is out of [0, T] and said so."""
    try:
        return torch.tensor(values, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):
        raise InputError(f"lengths must lie in [0, T] = [0, {T}], got values in [{min(values)}, {max(values)}]") \
            from None


def _check_lengths(lengths, T: int, B: int, device: torch.device):
    if lengths is None:
        return None
    if isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        lengths = _lengths_tensor([_length(v) for v in lengths], T)
    lengths = _tensor("lengths", lengths)
    if lengths.device.type != "cpu":
        # Checking the values would need a device synchronization; torch's packing API asks the same.
        raise InputError(f"lengths must be a CPU tensor or a list of ints, got a tensor on {lengths.device}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise InputTypeError(f"lengths must hold integers, got {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise InputError(f"lengths must have shape [B] = [{B}], got {list(lengths.shape)}")
    if lengths.dtype in _WIDE_UNSIGNED:
        lengths = _lengths_tensor(lengths.tolist(), T)
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise InputError(f"lengths must lie in [0, T] = [0, {T}], got values in "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.to(device=device, dtype=torch.int64, non_blocking=True)


def multiplicative_lstm_recurrence(
    proj: Tensor,
    weight_hh: Tensor,
    weight_hm: Tensor,
    *,
    initial_state: tuple[Tensor, Tensor] | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    return_cell_states: bool = False,
    backend: str = "auto",
):
    """Run the recurrence on precomputed input projections (the fused part of the op).

    Use it when the input projections come from somewhere cheaper than a GEMM, e.g. a 256-row
    table gathered by byte (:class:`fastmlstm.ByteLM`).

    Args:
        proj: [T, B, 5H], float32/float16/bfloat16 (float64 on ``reference``). Columns [0, 4H) are
            ``x W_ih^T + bias`` (gates i, f, o, u), columns [4H, 5H) are ``x W_im^T``.
        weight_hh: [4H, H], same dtype and device as ``proj``.
        weight_hm: [H, H], same dtype and device.
        initial_state: optional ``(h0, c0)``, each [B, H], float32 or ``proj``'s dtype. Zeros if None.
        lengths: optional [B] integers in [0, T] (CPU tensor or list): row b stops updating after
            ``lengths[b]`` steps; its state is carried unchanged and ``output[t]`` repeats its last h.
        return_cell_states: also return every step's cell state from the same pass.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (see :mod:`fastmlstm.ops.registry`).

    Returns:
        ``(output, (h_n, c_n))``, or ``(output, (h_n, c_n), cell_states)`` with
        ``return_cell_states``: output [T, B, H] in ``proj``'s dtype; h_n, c_n [B, H] float32;
        cell_states [T, B, H] float32 (float64 for float64 ``proj``, here and below).

    Example::

        >>> T, B, H = 5, 2, 8
        >>> proj = torch.randn(T, B, 5 * H)
        >>> out, (h, c) = multiplicative_lstm_recurrence(proj, torch.randn(4 * H, H), torch.randn(H, H))
        >>> out.shape, h.shape
        (torch.Size([5, 2, 8]), torch.Size([2, 8]))
    """
    proj = _tensor("proj", proj)
    if proj.dim() != 3:
        raise InputError(f"proj must be 3-D [T, B, 5H], got {proj.dim()}-D with shape {list(proj.shape)}")
    _check_dtype("proj", proj.dtype)
    T, B, H5 = proj.shape
    if H5 % 5 or H5 == 0:
        raise InputError(f"proj's last dimension must be 5 * hidden_size, got {H5}")
    H = H5 // 5
    dtype, device = proj.dtype, proj.device
    _check_matrix("weight_hh", weight_hh, (GATES * H, H), dtype, device)
    _check_matrix("weight_hm", weight_hm, (H, H), dtype, device)
    h0, c0 = _check_state(initial_state, B, H, dtype, device)
    lengths = _check_lengths(lengths, T, B, device)
    autocast = _autocast_dtype(proj)
    if autocast is not None:
        proj, weight_hh, weight_hm = _cast(autocast, proj, weight_hh, weight_hm)
    name = ops.resolve_backend(backend, device, proj.dtype)  # (an empty batch: ops.sequence takes reference)
    output, c_n, cell_states = ops.sequence(proj, weight_hh, weight_hm, h0, c0, lengths, name, return_cell_states)
    return _returned(output, h0, c_n, cell_states, return_cell_states)


def autocast_dtype(device_type: str, dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype autocast would run matmuls on ``device_type`` in, or None when it is off, or when
    ``dtype`` (the input's) is float64, which autocast leaves alone (as nn.LSTM's inputs).

    Autocast does not reach inside the custom op, so the layer and the functional forms cast their
    inputs and (effective) weights to this dtype themselves, after their checks (whose errors then
    name the caller's dtypes); left alone, it rounded the input projections of some backends only
    (the GEMM before the op).
    """
    if not torch._C._is_any_autocast_enabled() or dtype == torch.float64:  # (as nn.LSTM asks; 0.1 us)
        return None
    available = getattr(torch.amp, "is_autocast_available", None)  # ("meta" has no autocast)
    if (available is not None and not available(device_type)) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    return autocast_dtype(x.device.type, x.dtype)


def _cast(dtype: torch.dtype, *tensors):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _returned(output: Tensor, h0: Tensor, c_n: Tensor, cell_states: Tensor, return_cell_states: bool):
    # h_n is the last output (rows past their length carry their final h there). Stored h is in the
    # activation dtype, so h_n is that value exactly: feeding (h_n, c_n) back continues bit-for-bit.
    h_n = output[-1].to(h0.dtype, copy=True) if output.shape[0] > 0 else h0.clone()
    if return_cell_states:
        return output, (h_n, c_n), cell_states
    return output, (h_n, c_n)


def multiplicative_lstm(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    weight_im: Tensor,
    weight_hm: Tensor,
    bias: Tensor | None = None,
    *,
    initial_state: tuple[Tensor, Tensor] | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    batch_first: bool = False,
    return_cell_states: bool = False,
    backend: str = "auto",
):
    """The multiplicative LSTM over a whole sequence: one input GEMM, then the fused recurrence.

    Args:
        input: [T, B, I] (or [B, T, I] with ``batch_first``), float32/float16/bfloat16 (float64 on
            ``reference``).
        weight_ih: [4H, I]; weight_hh: [4H, H]; weight_im: [H, I]; weight_hm: [H, H]; bias: [4H] or
            None. All in the input's dtype and on its device.
        initial_state, lengths, return_cell_states, backend: as in
            :func:`multiplicative_lstm_recurrence`.
        batch_first: input, output and cell states are [B, T, ...] instead of [T, B, ...].

    Returns:
        ``(output, (h_n, c_n))`` or ``(output, (h_n, c_n), cell_states)``: output [T, B, H] in the
        input dtype, h_n and c_n [B, H] float32, cell_states [T, B, H] float32 (batch-first when
        ``batch_first``).

    Example::

        >>> T, B, I, H = 7, 3, 4, 8
        >>> w = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(H, I), torch.randn(H, H)]
        >>> out, (h, c) = multiplicative_lstm(torch.randn(T, B, I), *w, torch.zeros(4 * H))
        >>> out.shape
        torch.Size([7, 3, 8])
    """
    input = _tensor("input", input)
    if input.dim() != 3:
        layout = "[B, T, I]" if batch_first else "[T, B, I]"
        raise InputError(f"input must be 3-D {layout}, got {input.dim()}-D with shape {list(input.shape)}")
    x = input.transpose(0, 1) if batch_first else input
    result = _layer(x, weight_ih, weight_hh, weight_im, weight_hm, bias, initial_state, lengths, backend,
                    return_cell_states)
    if batch_first:
        result = (result[0].transpose(0, 1), result[1], *(r.transpose(0, 1) for r in result[2:]))
    return result


def multiplicative_lstm_step(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    weight_im: Tensor,
    weight_hm: Tensor,
    bias: Tensor | None = None,
    *,
    initial_state: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
):
    """One time step of :func:`multiplicative_lstm`, for generation loops: the same checks and
    kernels with T = 1, without a time axis.

    Args:
        input: [B, I], float32/float16/bfloat16.
        weight_ih, weight_hh, weight_im, weight_hm, bias, initial_state, backend: as in
            :func:`multiplicative_lstm`.

    Returns:
        ``(h, (h, c))``: h [B, H] in the input dtype (the step's output), then the state to pass
        to the next step, h and c [B, H] float32.

    Example::

        >>> B, I, H = 3, 4, 8
        >>> w = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(H, I), torch.randn(H, H)]
        >>> out, state = multiplicative_lstm_step(torch.randn(B, I), *w)
        >>> out, state = multiplicative_lstm_step(torch.randn(B, I), *w, initial_state=state)
        >>> out.shape, state[1].shape
        (torch.Size([3, 8]), torch.Size([3, 8]))
    """
    input = _tensor("input", input)
    if input.dim() != 2:
        raise InputError(f"step input must be 2-D [B, I], got {input.dim()}-D with shape {list(input.shape)}")
    x = input.unsqueeze(0)
    h0, c0, _ = _checked(x, weight_ih, weight_hh, weight_im, weight_hm, bias, initial_state, None)
    autocast = _autocast_dtype(input)
    if autocast is not None:
        input, weight_ih, weight_hh, weight_im, weight_hm, bias = _cast(autocast, input, weight_ih, weight_hh,
                                                                        weight_im, weight_hm, bias)
    output, c_n = ops.layer_step(input, weight_ih, weight_hh, weight_im, weight_hm, bias, h0, c0,
                                 ops.resolve_backend(backend, input.device, input.dtype))
    return output, (output.to(h0.dtype, copy=True), c_n)  # (as _returned, without a time axis to index)


def _prepared_step(step, input: Tensor, initial_state, H: int):
    """:func:`multiplicative_lstm_step` through a step the backend prepared for these weights
    (:func:`fastmlstm.ops.prepare_step`), on an input the caller has checked against them (shape,
    dtype, device); the state is checked here, as there. For callers that keep prepared steps."""
    h0, c0 = _check_state(initial_state, input.shape[0], H, input.dtype, input.device)
    output, c_n = step(input.unsqueeze(0), h0, c0)
    return output[0], _returned(output, h0, c_n, None, False)[1]


def _layer(x, weight_ih, weight_hh, weight_im, weight_hm, bias, initial_state, lengths, backend,
           return_cell_states):
    """:func:`multiplicative_lstm` on time-major x [T, B, I]."""
    h0, c0, lengths = _checked(x, weight_ih, weight_hh, weight_im, weight_hm, bias, initial_state, lengths)
    autocast = _autocast_dtype(x)
    if autocast is not None:
        x, weight_ih, weight_hh, weight_im, weight_hm, bias = _cast(autocast, x, weight_ih, weight_hh, weight_im,
                                                                    weight_hm, bias)
    output, c_n, cell_states = ops.layer(x, weight_ih, weight_hh, weight_im, weight_hm, bias, h0, c0, lengths,
                                         ops.resolve_backend(backend, x.device, x.dtype), return_cell_states)
    return _returned(output, h0, c_n, cell_states, return_cell_states)


def _checked(x, weight_ih, weight_hh, weight_im, weight_hm, bias, initial_state, lengths):
    """The checks of :func:`multiplicative_lstm` on time-major x [T, B, I]: (h0, c0, lengths) as
    the backends take them."""
    _check_dtype("input", x.dtype)
    I = x.shape[2]
    weight_hm = _tensor("weight_hm", weight_hm)
    if weight_hm.dim() != 2:
        raise InputError(f"weight_hm must be 2-D [H, H], got shape {list(weight_hm.shape)}")
    H = weight_hm.shape[0]
    if H == 0:
        raise InputError(f"weight_hm must be [H, H] with H > 0, got shape {list(weight_hm.shape)}")
    dtype, device = x.dtype, x.device
    _check_matrix("weight_hm", weight_hm, (H, H), dtype, device)
    _check_matrix("weight_ih", weight_ih, (GATES * H, I), dtype, device)
    _check_matrix("weight_im", weight_im, (H, I), dtype, device)
    if bias is not None:
        _check_matrix("bias", bias, (GATES * H,), dtype, device)
    _check_matrix("weight_hh", weight_hh, (GATES * H, H), dtype, device)
    h0, c0 = _check_state(initial_state, x.shape[1], H, dtype, device)
    return h0, c0, _check_lengths(lengths, x.shape[0], x.shape[1], device)
