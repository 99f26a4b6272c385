"""``FastMLSTM``: a weight-normalized multiplicative LSTM layer, drop-in for ``torch.nn.LSTM``."""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .backends import BACKENDS
from .functional import SUPPORTED_DTYPES, multiplicative_lstm

__all__ = ["FastMLSTM", "MLSTMWeights", "weight_norm"]

_MATRICES = ("weight_ih", "weight_hh", "weight_im", "weight_hm")


class MLSTMWeights(NamedTuple):
    """Effective weights in torch's [out, in] layout, gate order i, f, o, u."""

    weight_ih: Tensor  # [4H, I]
    weight_hh: Tensor  # [4H, H], applied to m
    weight_im: Tensor  # [H, I]
    weight_hm: Tensor  # [H, H]
    bias: Tensor | None  # [4H]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run matmuls in on ``device_type``, or None when it is off.

    Autocast does not reach inside the custom op, so layers cast their inputs and effective weights
    to this dtype themselves.
    """
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast_weights(weights: MLSTMWeights, dtype: torch.dtype) -> MLSTMWeights:
    return MLSTMWeights(*(None if w is None else w.to(dtype) for w in weights))


def weight_norm(direction: Tensor, gain: Tensor) -> Tensor:
    """``gain[r] * direction[r] / ||direction[r]||`` for every row r (norm over the input axis).

    Computed in float32 and returned in ``direction``'s dtype; an all-zero row gives zeros, not NaN.
    """
    v = direction.float()
    scale = gain.float() / v.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return (v * scale.unsqueeze(1)).to(direction.dtype)


# FASTMLSTM_WEIGHT_CACHE: "on" (default), "strict" or "off"; see _EffectiveWeightCache.
ENV_WEIGHT_CACHE = "FASTMLSTM_WEIGHT_CACHE"
WEIGHT_CACHE_MODES = ("on", "strict", "off")


class _EffectiveWeightCache:
    """One module's effective weights, kept while its parameters are unchanged.

    Used where no autograd graph through the weights is needed (inference, featurize, generation,
    step loops, frozen parameters) and the parameters live on the CPU; training recomputes the weight
    norm on every forward, under autograd, so that it is differentiated. Checked on every use:

    - every parameter's identity, version counter, storage pointer, dtype, device, shape and
      strides: this sees every change PyTorch tracks, i.e. in-place updates (optimizer steps,
      ``load_state_dict``, ``p.mul_()`` under ``no_grad``), ``.data`` assignment, ``.to()`` /
      ``.half()`` / ``swap_tensors``, replaced parameters (``load_state_dict(assign=True)``);
    - the version counters of the cached tensors themselves (a caller writing into them);
    - with ``FASTMLSTM_WEIGHT_CACHE=strict`` also a fingerprint of every parameter's bytes, which
      sees writes that bypass the version counter as well (``p.data.mul_()``, a NumPy view of a
      parameter, a ``vector_to_parameters`` buffer written later). Autograd itself does not track
      those writes (its saved-tensor checks use the same counters), so the default does not pay for
      them: the fingerprint reads every parameter on every call, which doubles the memory traffic of
      a batch-1 generation step. ``off`` computes the weight norm on every call, as before.
    """

    __slots__ = ("key", "fingerprints", "weights", "versions", "casts")

    def __init__(self, key, fingerprints, weights: MLSTMWeights):
        self.key = key
        self.fingerprints = fingerprints
        self.weights = weights
        self.versions = _versions(weights)
        self.casts: dict[torch.dtype, tuple[MLSTMWeights, tuple]] = {}

    def intact(self) -> bool:
        return _versions(self.weights) == self.versions

    def cast(self, dtype: torch.dtype) -> MLSTMWeights:
        hit = self.casts.get(dtype)
        if hit is None or _versions(hit[0]) != hit[1]:
            with torch.inference_mode(False), torch.no_grad():  # (inference_mode(False) turns grad mode on)
                weights = cast_weights(self.weights, dtype)
            hit = self.casts[dtype] = (weights, _versions(weights))
        return hit[0]


_WEIGHT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _versions(weights: MLSTMWeights) -> tuple:
    return tuple(None if w is None else w._version for w in weights)


def _weight_cache_mode() -> str:
    mode = os.environ.get(ENV_WEIGHT_CACHE, "on").strip().lower() or "on"
    if mode not in WEIGHT_CACHE_MODES:
        raise ValueError(f"the environment variable {ENV_WEIGHT_CACHE} must be one of {WEIGHT_CACHE_MODES}, "
                         f"got {mode!r}")
    return mode


def _fingerprints(params: list[Tensor]) -> tuple | None:
    """Fingerprints of the parameters' bytes (the CPU extension's), or None where it cannot be built."""
    from .backends import backend_status

    if not backend_status("cpu", "cpu")[0]:
        return None
    from .ops.cpu.recurrence import fingerprints

    with torch.no_grad():
        return fingerprints([p.detach().contiguous() for p in params])


class FastMLSTM(nn.Module):
    r"""Weight-normalized multiplicative LSTM layer (Krause et al. 2016; Radford et al. 2017).

    A drop-in for ``torch.nn.LSTM(input_size, hidden_size, num_layers=1, bias, batch_first)``::

        m_t = (x_t W_im^T) * (h_{t-1} W_hm^T)
        z_t = x_t W_ih^T + m_t W_hh^T + b          # gates i, f, o, u
        c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_u)
        h_t = sigmoid(z_o) * tanh(c_t)

    Args:
        input_size: I, features per step.
        hidden_size: H.
        bias: learn the gate bias b [4H].
        batch_first: input and output are [B, T, ...] instead of [T, B, ...].
        weight_norm: parametrize each of the four matrices as gain * direction / ||direction|| per
            output row (parameters ``<name>_g`` [out] and ``<name>_v`` [out, in]); applied once per
            forward. Without it the matrices are plain parameters named as below.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
        device, dtype: of the parameters. float32, float16 and bfloat16 are supported; the cell
            state and all accumulation stay float32 whatever the dtype.

    Attributes (effective weights, torch's [out, in] layout, readable with or without weight norm):
        weight_ih [4H, I], weight_hh [4H, H] (applied to m), weight_im [H, I], weight_hm [H, H],
        bias [4H].

    Shapes of ``forward(input, hx=None)``: input [T, B, I] ([B, T, I] with ``batch_first``), [T, I]
    unbatched, or a ``PackedSequence``; hx = (h_0, c_0), each [1, B, H] ([1, H] unbatched). Returns
    ``(output, (h_n, c_n))`` like ``nn.LSTM``: output [T, B, H] in the input dtype, h_n and c_n
    [1, B, H] float32. Feeding (h_n, c_n) back as hx continues the sequence exactly.

    Example::

        >>> rnn = FastMLSTM(64, 256)
        >>> x = torch.randn(100, 8, 64)
        >>> out, (h, c) = rnn(x)
        >>> out2, _ = rnn(torch.randn(50, 8, 64), (h, c))   # carry the state on
        >>> out.shape, h.shape
        (torch.Size([100, 8, 256]), torch.Size([1, 8, 256]))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, batch_first: bool = False,
                 weight_norm: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"unsupported dtype {dtype}; fastmlstm supports {[str(d) for d in SUPPORTED_DTYPES]}")
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.batch_first = batch_first
        self.weight_norm = weight_norm
        self.backend = backend
        H, I = hidden_size, input_size
        shapes = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "weight_im": (H, I), "weight_hm": (H, H)}
        for name, shape in shapes.items():
            if weight_norm:
                self.register_parameter(f"{name}_v", nn.Parameter(torch.empty(shape, **factory)))
                self.register_parameter(f"{name}_g", nn.Parameter(torch.empty(shape[0], **factory)))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.bias = nn.Parameter(torch.empty(4 * H, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's initialization, U(-1/sqrt(H), 1/sqrt(H)); gains start at the rows' norms."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                nn.init.uniform_(p, -bound, bound)
            if self.weight_norm:
                for name in _MATRICES:
                    v = getattr(self, f"{name}_v")
                    getattr(self, f"{name}_g").copy_(v.float().norm(dim=1))

    def __getattr__(self, name: str):
        if name in _MATRICES:
            params = self.__dict__.get("_parameters", {})
            if f"{name}_v" in params:
                return weight_norm(params[f"{name}_v"], params[f"{name}_g"])
        return super().__getattr__(name)

    def effective_weights(self) -> MLSTMWeights:
        """All effective weights (weight norm applied); pass them to ``forward`` or ``step`` as
        ``weights=`` to reuse them across calls, e.g. in a generation loop.

        Where no autograd graph through the weights is needed (no grad mode, or parameters that do
        not require grad) and the parameters are on the CPU, the result is cached and reused while
        the parameters are unchanged, and recomputed as soon as any of them changes (every change
        PyTorch tracks; ``FASTMLSTM_WEIGHT_CACHE=strict`` also catches writes through ``.data``, see
        ``_EffectiveWeightCache``). The returned tensors must not be modified in place (if they are,
        the next call recomputes them). Under autograd the weight norm is computed afresh, so that
        it is differentiated.
        """
        entry = self._weight_cache_entry()
        if entry is not None:
            return entry.weights
        return self._compute_effective_weights()

    def _compute_effective_weights(self) -> MLSTMWeights:
        return MLSTMWeights(*(getattr(self, name) for name in _MATRICES), self.bias)

    def _weight_cache_entry(self) -> _EffectiveWeightCache | None:
        """The valid cache entry (refreshed if a parameter changed), or None where caching does not apply."""
        if not self.weight_norm:
            return None  # the parameters are the effective weights: nothing to compute
        params = [p for p in self._parameters.values() if p is not None]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return None
        if any(p.device.type != "cpu" for p in params):
            return None
        mode = _weight_cache_mode()
        if mode == "off":
            return None
        try:
            key = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device, p.shape, p.stride()) for p in params)
        except RuntimeError:  # tensors without storage (functorch wrappers, fake tensors)
            return None
        prints = None
        if mode == "strict":
            prints = _fingerprints(params)
            if prints is None:
                return None
        entry = _WEIGHT_CACHES.get(self)
        if entry is not None and entry.key == key and entry.fingerprints == prints and entry.intact():
            return entry
        with torch.inference_mode(False), torch.no_grad():  # (inference_mode(False) turns grad mode on)
            weights = self._compute_effective_weights()
        entry = _WEIGHT_CACHES[self] = _EffectiveWeightCache(key, prints, weights)
        return entry

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is None:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if not self.weight_norm:
            s += ", weight_norm=False"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def _initial_state(self, hx, batched: bool):
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx must be a pair (h_0, c_0)")
        want = 3 if batched else 2
        state = []
        for name, s in zip(("h_0", "c_0"), hx):
            if not isinstance(s, Tensor):
                raise TypeError(f"hx {name} must be a tensor, got {type(s).__name__}")
            if s.dim() != want or s.shape[0] != 1:
                layout = "[1, B, H]" if batched else "[1, H]"
                raise ValueError(f"hx {name} must have shape {layout} (num_layers = 1), got {list(s.shape)}")
            state.append(s[0] if batched else s)
        return tuple(state)

    def forward(self, input, hx=None, *, lengths=None, return_cell_states: bool = False,
                weights: MLSTMWeights | None = None):
        """Run the layer over a sequence.

        Args:
            input: [T, B, I] ([B, T, I] with ``batch_first``), [T, I] unbatched, or a PackedSequence.
            hx: optional (h_0, c_0), each [1, B, H] ([1, H] unbatched), float32 or the input dtype.
            lengths: optional [B] valid lengths of a padded batch (CPU tensor or list); rows stop
                updating after their length, so h_n, c_n are each row's state after its last step.
            return_cell_states: also return every step's cell state c_t (float32), shaped like the
                output (a PackedSequence for packed input).
            weights: effective weights from :meth:`effective_weights` to skip recomputing them.

        Returns:
            ``(output, (h_n, c_n))`` or ``(output, (h_n, c_n), cell_states)``.
        """
        entry = None
        if weights is None:
            entry = self._weight_cache_entry()
            weights = self._compute_effective_weights() if entry is None else entry.weights
        packed = isinstance(input, PackedSequence)
        batch_first = self.batch_first
        if packed:
            if lengths is not None:
                raise ValueError("lengths cannot be given with a PackedSequence (it carries its own)")
            x, lengths = pad_packed_sequence(input, batch_first=False)
            batch_first = False
            batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"input must be 3-D (batched) or 2-D (unbatched), got shape {list(input.shape)}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if not batched:
                batch_first = False
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input has {x.shape[-1]} features per step but input_size is {self.input_size}")
        initial_state = self._initial_state(hx, batched)

        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            x = x.to(dtype)
            weights = cast_weights(weights, dtype) if entry is None else entry.cast(dtype)
        output, (h_n, c_n), *cells = multiplicative_lstm(
            x, *weights, initial_state=initial_state, lengths=lengths, batch_first=batch_first,
            return_cell_states=return_cell_states, backend=self.backend)

        if packed:
            output = _repack(output, lengths, input)
            cells = [_repack(c, lengths, input) for c in cells]
            # h_n, c_n rows follow the padded tensor's batch order, the original one, as nn.LSTM's do.
        elif not batched:
            output = output.squeeze(1)
            cells = [c.squeeze(1) for c in cells]
        if batched:
            h_n, c_n = h_n.unsqueeze(0), c_n.unsqueeze(0)
        if return_cell_states:
            return output, (h_n, c_n), cells[0]
        return output, (h_n, c_n)

    def step(self, input: Tensor, hx=None, *, weights: MLSTMWeights | None = None):
        """One time step (for generation); the same fused kernels as :meth:`forward` with T = 1.

        Args:
            input: [B, I] (or [I] unbatched), whatever ``batch_first`` says.
            hx: optional (h, c), each [1, B, H] ([1, H] unbatched).
            weights: effective weights from :meth:`effective_weights`, to compute them once per
                generation loop instead of once per step.

        Returns:
            ``(output [B, H], (h [1, B, H], c [1, B, H]))``; pass (h, c) to the next step.

        Example::

            >>> rnn = FastMLSTM(16, 32)
            >>> w = rnn.effective_weights()
            >>> out, state = rnn.step(torch.randn(4, 16), weights=w)
            >>> out, state = rnn.step(torch.randn(4, 16), state, weights=w)
        """
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"step input must be [B, I] or [I], got shape {list(input.shape)}")
        if input.dim() == 1:
            output, state = self.forward(input.view(1, -1), hx, weights=weights)
            return output[0], state
        seq = input.unsqueeze(1) if self.batch_first else input.unsqueeze(0)
        output, state = self.forward(seq, hx, weights=weights)
        return (output[:, 0] if self.batch_first else output[0]), state

def _repack(padded: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a time-major padded tensor (rows in the original order) with ``like``'s layout."""
    if like.sorted_indices is not None:
        padded = padded.index_select(1, like.sorted_indices)
        lengths = lengths.index_select(0, like.sorted_indices.cpu())
    data = pack_padded_sequence(padded, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
