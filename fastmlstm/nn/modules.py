"""``FastMLSTM``: a weight-normalized multiplicative LSTM, drop-in for ``torch.nn.LSTM``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..errors import InputError, InputTypeError
from ..ops import prepare_step, resolve_backend, step_key
from ..ops.interface import GATES, accumulation_dtype
from ..ops.registry import BACKENDS
from ..options import check
from .functional import SUPPORTED_DTYPES, _prepared_step, autocast_dtype, multiplicative_lstm, multiplicative_lstm_step
from .packing import repack, run_reversed
from .weight_cache import ENV_WEIGHT_CACHE, cached_weights, forget  # noqa: F401  (ENV_WEIGHT_CACHE: documented here)

__all__ = ["FastMLSTM", "MLSTMWeights", "weight_norm"]

_MATRICES = ("weight_ih", "weight_hh", "weight_im", "weight_hm")


class MLSTMWeights(NamedTuple):
    """Effective weights of one layer and direction in torch's [out, in] layout, gate order i, f, o, u."""

    weight_ih: Tensor  # [4H, I]
    weight_hh: Tensor  # [4H, H], applied to m
    weight_im: Tensor  # [H, I]
    weight_hm: Tensor  # [H, H]
    bias: Tensor | None  # [4H]


# What ``effective_weights()`` returns and ``weights=`` takes: one MLSTMWeights for a one-layer,
# one-direction module, else one per layer and direction in nn.LSTM's order (l0, l0_reverse, l1, ...).
EffectiveWeights = Union[MLSTMWeights, tuple[MLSTMWeights, ...]]


def cast_weights(weights: MLSTMWeights, dtype: torch.dtype) -> MLSTMWeights:
    return MLSTMWeights(*(None if w is None else w.to(dtype) for w in weights))


def _as_returned(weights: tuple[MLSTMWeights, ...]) -> EffectiveWeights:
    """What ``effective_weights()`` returns: the one MLSTMWeights of a one-layer, one-direction module."""
    return weights[0] if len(weights) == 1 else weights


def _cast_all(weights: tuple[MLSTMWeights, ...], dtype: torch.dtype) -> tuple[MLSTMWeights, ...]:
    return tuple(cast_weights(w, dtype) for w in weights)


def weight_norm(direction: Tensor, gain: Tensor) -> Tensor:
    """``gain[r] * direction[r] / ||direction[r]||`` for every row r (norm over the input axis).

    Computed in float32 (float64 for float64 weights) and returned in ``direction``'s dtype; an
    all-zero row gives zeros, and zero gradients, not NaN.
    """
    _check_weight_norm_operands(direction, gain)
    if _fused_weight_norm_applies(direction, gain):
        # PyTorch's fused kernel (row norms accumulated in float32, one rounding of the result, and
        # a backward in one pass over the rows): a fraction of the eager formula's time and
        # temporaries on a CPU. It divides by zero on an all-zero row, which the eager formula
        # below maps to zeros: that rare row sends the call there.
        weight, norms = torch._weight_norm_interface(direction, gain.unsqueeze(1), 0)
        if not bool(norms.eq(0).any()):
            return weight
    acc = accumulation_dtype(direction.dtype)
    v = direction.to(acc)
    norm = v.norm(dim=1)
    nonzero = norm > 0
    # An all-zero row has no direction: its weights and gradients are zero (a division by a tiny
    # norm instead would send gradients of ~1e38 or inf into the optimizer).
    scale = torch.where(nonzero, gain.to(acc) / torch.where(nonzero, norm, 1), 0)
    return (v * scale.unsqueeze(1)).to(direction.dtype)


def _check_weight_norm_operands(direction, gain) -> None:
    for name, t in (("direction", direction), ("gain", gain)):
        if not isinstance(t, Tensor):
            raise InputTypeError(f"weight_norm: {name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise InputTypeError(f"weight_norm: {name} must be a floating-point tensor, got {t.dtype}")
    if direction.dim() != 2 or tuple(gain.shape) != (direction.shape[0],):
        raise InputError(f"weight_norm: direction must be [rows, cols] and gain [rows], got {list(direction.shape)} "
                         f"and {list(gain.shape)}")


def _fused_weight_norm_applies(direction: Tensor, gain: Tensor) -> bool:
    """On contiguous CPU tensors of a 16- or 32-bit float dtype, outside ``torch.compile`` (whose
    graph the zero-row check would break); float64 (the reference's gradcheck) keeps the eager
    formula. Contiguous only: PyTorch 2.13's CPU kernel reads a transposed view's storage as if it
    were contiguous (wrong weights, no error)."""
    return (direction.device.type == "cpu" and direction.dim() == 2 and gain.dim() == 1
            and direction.dtype in (torch.float32, torch.bfloat16, torch.float16) and gain.dtype == direction.dtype
            and direction.is_contiguous() and gain.is_contiguous() and not torch.compiler.is_compiling())


def _suffix(layer: int, reverse: bool) -> str:
    """Parameter-name suffix of a layer and direction. Layer 0's forward direction keeps the bare
    names (so a one-layer model's state dict is the same as it always was); the others follow
    nn.LSTM's ``_l<k>`` and ``_reverse``."""
    if layer == 0 and not reverse:
        return ""
    return f"_l{layer}" + ("_reverse" if reverse else "")


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, int)) or isinstance(value, int) and value not in (0, 1):
        raise InputTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class FastMLSTM(nn.Module):
    r"""Weight-normalized multiplicative LSTM (Krause et al. 2016; Radford et al. 2017), a drop-in for
    ``torch.nn.LSTM`` with the same constructor words in the same order::

        m_t = (x_t W_im^T) * (h_{t-1} W_hm^T)
        z_t = x_t W_ih^T + m_t W_hh^T + b          # gates i, f, o, u
        c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_u)
        h_t = sigmoid(z_o) * tanh(c_t)

    Args:
        input_size: I, features per step.
        hidden_size: H.
        num_layers: stacked layers; layer k > 0 reads layer k-1's output (both directions'
            outputs concatenated when bidirectional). Each layer runs through the fused recurrence.
        bias: learn the gate bias b [4H] of every layer and direction. ``rnn.bias`` is this bool,
            as with nn.LSTM; the bias parameters are ``bias_ih``, ``bias_ih_l1``, ... (below).
        batch_first: input and output are [B, T, ...] instead of [T, B, ...] (h and c are not).
        dropout: as nn.LSTM's: dropout with this probability on the outputs of every layer but
            the last, in training mode only.
        bidirectional: add a reverse-direction layer at every level; its run respects ``lengths``
            and PackedSequence lengths (each row is reversed within its own length).
        proj_size: must be 0 (nn.LSTM's LSTMP projection has no multiplicative-LSTM counterpart).
        device, dtype: of the parameters. float32, float16 and bfloat16 are supported; the cell
            state and all accumulation stay float32 whatever the dtype.
        weight_norm: (keyword) parametrize each of the four matrices as gain * direction /
            ||direction|| per output row (parameters ``<name>_g`` [out] and ``<name>_v`` [out, in]);
            applied once per forward. Without it the matrices are plain parameters.
        backend: (keyword) ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``
            (:mod:`fastmlstm.ops.registry`); float64 runs on ``"reference"``.

    Parameters are named like nn.LSTM's, with layer 0's forward direction unsuffixed:
    ``weight_ih``, ``weight_hh`` (applied to m), ``weight_im``, ``weight_hm`` (each as ``_v`` and
    ``_g`` with weight norm) and ``bias_ih`` (the gate bias, added with x W_ih^T; there is no
    ``bias_hh``) for layer 0; ``weight_ih_l1``, ``bias_ih_l1``, ``weight_ih_l0_reverse``, ... for
    the others. Reading any matrix name (``rnn.weight_hh``, ``rnn.weight_hh_l1``) gives the
    effective weight, [out, in]; nn.LSTM's layer-0 names (``rnn.weight_hh_l0``, ``rnn.bias_ih_l0``)
    read the same tensors as the unsuffixed ones. State dicts saved when the bias was called
    ``bias``, ``bias_l1``, ... still load (:meth:`_load_from_state_dict` renames the keys).

    Shapes of ``forward(input, hx=None)``: input [T, B, I] ([B, T, I] with ``batch_first``), [T, I]
    unbatched, or a ``PackedSequence``; hx = (h_0, c_0), each [L * D, B, H] ([L * D, H] unbatched)
    with L = num_layers, D = 2 if bidirectional else 1. Returns ``(output, (h_n, c_n))`` like
    nn.LSTM: output [T, B, D * H] in the input dtype, h_n and c_n [L * D, B, H] float32. B = 0
    gives empty outputs. Feeding (h_n, c_n) back as hx continues the sequences (docs/backends.md,
    "Dtypes and numerics", says how exactly).

    Example::

        >>> rnn = FastMLSTM(64, 256, 2, dropout=0.1)          # like nn.LSTM(64, 256, 2, dropout=0.1)
        >>> x = torch.randn(100, 8, 64)
        >>> out, (h, c) = rnn(x)
        >>> out2, _ = rnn(torch.randn(50, 8, 64), (h, c))   # carry the state on
        >>> out.shape, h.shape
        (torch.Size([100, 8, 256]), torch.Size([2, 8, 256]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, weight_norm: bool = True, backend: str = "auto"):
        super().__init__()
        self.input_size = check("input_size", input_size)
        self.hidden_size = check("hidden_size", hidden_size)
        self.num_layers = check("num_layers", num_layers)
        self.bias = _flag("bias", bias)  # nn.LSTM's attribute: the bool (the parameters are bias_ih...)
        self.batch_first = _flag("batch_first", batch_first)
        self.bidirectional = _flag("bidirectional", bidirectional)
        self.weight_norm = _flag("weight_norm", weight_norm)
        self.dropout = check("dropout", dropout)
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout={dropout} and num_layers=1: dropout is applied between stacked layers only, "
                          "so it has no effect here (as with nn.LSTM)", stacklevel=2)
        if proj_size != 0:
            raise InputError(f"proj_size={proj_size!r}: FastMLSTM has no output projection (nn.LSTM's LSTMP "
                             "variant); use proj_size=0 and a torch.nn.Linear on the output")
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise InputTypeError(f"unsupported dtype {dtype}; fastmlstm supports {[str(d) for d in SUPPORTED_DTYPES]}")
        self.proj_size = 0
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        for layer, reverse in self._layers():
            for name, shape in self._parameter_shapes(layer, reverse).items():
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)) if shape else None)
        self.reset_parameters()

    @property
    def bias_enabled(self) -> bool:
        """The same as :attr:`bias` (the constructor's bool), under its earlier name."""
        return self.bias

    def _parameter_shapes(self, layer: int, reverse: bool) -> dict[str, tuple[int, ...] | None]:
        """The parameters of one layer and direction, by name, in registration order (None: absent)."""
        H, suffix = self.hidden_size, _suffix(layer, reverse)
        I = self.input_size if layer == 0 else self.num_directions * H
        shapes = {}
        for name, shape in zip(_MATRICES, ((4 * H, I), (4 * H, H), (H, I), (H, H))):
            if self.weight_norm:
                shapes |= {f"{name}{suffix}_v": shape, f"{name}{suffix}_g": shape[:1]}
            else:
                shapes[f"{name}{suffix}"] = shape
        shapes[f"bias_ih{suffix}"] = (4 * H,) if self.bias else None
        return shapes

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters of every layer and direction in nn.LSTM's order (l0, l0_reverse, l1, ...),
        each as a list in registration order, like nn.LSTM's ``all_weights``."""
        return [[getattr(self, name) for name, shape in self._parameter_shapes(layer, reverse).items() if shape]
                for layer, reverse in self._layers()]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The bias parameters were called bias, bias_l1, bias_l0_reverse, ... until ``bias`` became
        # nn.LSTM's bool; files written then load with their tensors unchanged under the new names.
        if self.bias:
            for layer, reverse in self._layers():
                old, new = (f"{prefix}{name}{_suffix(layer, reverse)}" for name in ("bias", "bias_ih"))
                if old in state_dict and new not in state_dict:
                    state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layers(self) -> list[tuple[int, bool]]:
        """(layer, reverse) of every layer and direction, in nn.LSTM's order."""
        return [(layer, reverse) for layer in range(self.num_layers)
                for reverse in ((False, True) if self.bidirectional else (False,))]

    def reset_parameters(self) -> None:
        """nn.LSTM's initialization, U(-1/sqrt(H), 1/sqrt(H)); gains start at the rows' norms."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                nn.init.uniform_(p, -bound, bound)
            if self.weight_norm:
                for layer, reverse in self._layers():
                    for name in _MATRICES:
                        full = name + _suffix(layer, reverse)
                        getattr(self, f"{full}_g").copy_(getattr(self, f"{full}_v").float().norm(dim=1))

    def __getattr__(self, name: str):
        params = self.__dict__.get("_parameters", {})
        if name.startswith(_MATRICES) and not name.endswith(("_v", "_g")):
            v, g = params.get(f"{name}_v"), params.get(f"{name}_g")
            if v is None or g is None:  # pruned or parametrized (torch.nn.utils.prune, .parametrize)
                v, g = (getattr(self, f"{name}{part}", None) for part in ("_v", "_g"))
            if v is not None and g is not None:
                return weight_norm(v, g)
        if "_l0" in name and "_l0_reverse" not in name and name.startswith((*_MATRICES, "bias_ih")):
            return getattr(self, name.replace("_l0", "", 1))  # nn.LSTM's name for layer 0
        return super().__getattr__(name)

    def train(self, mode: bool = True) -> FastMLSTM:
        forget(self)  # switching modes brackets training: never carry cached weights across it
        return super().train(mode)

    def flatten_parameters(self) -> None:
        """A no-op, for code written for nn.LSTM: the fused kernels read the weights where they are."""

    def _layer_weights(self, layer: int, reverse: bool) -> MLSTMWeights:
        suffix = _suffix(layer, reverse)
        return MLSTMWeights(*(getattr(self, name + suffix) for name in _MATRICES), getattr(self, f"bias_ih{suffix}"))

    def effective_weights(self) -> EffectiveWeights:
        """All effective weights (weight norm applied); pass them to ``forward`` or ``step`` as
        ``weights=`` to reuse them across calls.

        Where no autograd graph through the weights is needed (no grad mode, or parameters that do
        not require grad) and the parameters are on the CPU, the result is cached and reused while
        the parameters are unchanged, and recomputed as soon as any of them changes (every change
        PyTorch tracks; ``FASTMLSTM_WEIGHT_CACHE=strict`` also catches writes through ``.data``, see
        :mod:`fastmlstm.nn.weight_cache`). The returned tensors must not be modified in place (if they
        are, the next call recomputes them). Under autograd the weight norm is computed afresh, so
        that it is differentiated.

        Returns:
            One :class:`MLSTMWeights` for a one-layer, one-direction module, else a tuple of them
            in nn.LSTM's order (layer 0, layer 0 reverse, layer 1, ...).
        """
        entry = self._weight_cache_entry()
        return _as_returned(self._all_weights() if entry is None else entry.weights)

    def _compute_effective_weights(self) -> EffectiveWeights:
        """The effective weights computed afresh, never from the cache."""
        return _as_returned(self._all_weights())

    def _all_weights(self) -> tuple[MLSTMWeights, ...]:
        return tuple(self._layer_weights(layer, reverse) for layer, reverse in self._layers())

    def _weight_cache_entry(self):
        if not self.weight_norm:
            return None  # the parameters are the effective weights: nothing to compute
        names = self.__dict__.get("_weight_names")  # (fixed by the constructor's arguments)
        if names is None:
            names = frozenset(name for layer in self._layers() for name in self._parameter_shapes(*layer))
            self.__dict__["_weight_names"] = names
        if not self._parameters.keys() >= names:
            return None  # one pruned or parametrized: computed from more than the cache's key sees
        return cached_weights(self, self._all_weights)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if not self.weight_norm:
            s += ", weight_norm=False"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def _initial_state(self, hx, batched: bool, B: int) -> list[tuple[Tensor, Tensor] | None]:
        """hx -> one (h_0, c_0) pair of [B, H] per layer and direction (None: zeros)."""
        count = self.num_layers * self.num_directions
        if hx is None:
            return [None] * count
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise InputTypeError("hx must be a pair (h_0, c_0)")
        want = (count, B, self.hidden_size) if batched else (count, self.hidden_size)
        for name, s in zip(("h_0", "c_0"), hx):
            if not isinstance(s, Tensor):
                raise InputTypeError(f"hx {name} must be a tensor, got {type(s).__name__}")
            if tuple(s.shape) != want:
                layout = "[num_layers * num_directions, B, H]" if batched else "[num_layers * num_directions, H]"
                raise InputError(f"hx {name} must have shape {layout} = {list(want)}, got {list(s.shape)}")
        h, c = hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        return [(h[k], c[k]) for k in range(count)]

    def _weights_for(self, weights):
        """(the cache entry or None, the effective weights of every layer and direction) for a call
        with ``weights=``: the cached ones where the cache applies."""
        entry = self._weight_cache_entry() if weights is None else None
        return entry, (self._check_weights(weights) if entry is None else entry.weights)

    def _check_weights(self, weights) -> tuple[MLSTMWeights, ...]:
        if weights is None:
            return self._all_weights()
        if isinstance(weights, MLSTMWeights):
            weights = (weights,)
        count = self.num_layers * self.num_directions
        if not isinstance(weights, Sequence) or len(weights) != count or \
                not all(isinstance(w, MLSTMWeights) for w in weights):
            raise InputTypeError(f"weights must be what effective_weights() returns: {count} MLSTMWeights "
                                 f"(one per layer and direction), got {type(weights).__name__}")
        for (layer, reverse), w in zip(self._layers(), weights):
            self._check_layer_weights(w, layer, reverse)
        return tuple(weights)

    def _check_layer_weights(self, w: MLSTMWeights, layer: int, reverse: bool) -> None:
        """``w`` has the shapes of this module's layer ``layer`` (another module's weights are refused)."""
        H, I = self.hidden_size, self.input_size if layer == 0 else self.num_directions * self.hidden_size
        want = {"weight_ih": (GATES * H, I), "weight_hh": (GATES * H, H), "weight_im": (H, I), "weight_hm": (H, H),
                "bias": (GATES * H,) if self.bias else None}
        for name, shape in want.items():
            value = getattr(w, name)
            got = None if value is None else tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            if got != shape:
                want_text = "absent (bias=False)" if shape is None else list(shape)
                got_text = "none" if got is None else got if isinstance(got, str) else list(got)
                raise InputError(f"weights: {name}{_suffix(layer, reverse)} must be {want_text} for this module "
                                 f"({self.extra_repr()}), got {got_text}")

    def _as_time_major(self, input, lengths):
        """(x [T, B, I], lengths or None, packed, batched) from any accepted input form."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise InputError("lengths cannot be given with a PackedSequence (it carries its own)")
            x, lengths = pad_packed_sequence(input, batch_first=False)
            return x, lengths, True, True
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise InputError(f"input must be 3-D (batched) or 2-D (unbatched), got shape {list(input.shape)}")
        if input.dim() == 2:
            return input.unsqueeze(1), lengths, False, False
        return (input.transpose(0, 1) if self.batch_first else input), lengths, False, True

    def forward(self, input, hx=None, *, lengths=None, return_cell_states: bool = False,
                weights: EffectiveWeights | None = None):
        """Run the layers over a sequence.

        Args:
            input: [T, B, I] ([B, T, I] with ``batch_first``), [T, I] unbatched, or a PackedSequence.
            hx: optional (h_0, c_0), each [L * D, B, H] ([L * D, H] unbatched), float32 or the
                input dtype.
            lengths: optional [B] valid lengths of a padded batch (CPU tensor or list); rows stop
                updating after their length, so h_n, c_n are each row's state after its last step
                (the reverse direction starts at each row's last valid step). Past a row's length
                the output repeats each direction's final h.
            return_cell_states: also return every step's cell state c_t (float32) of the last
                layer, shaped like the output (a PackedSequence for packed input).
            weights: what :meth:`effective_weights` returns, to skip recomputing them.

        Returns:
            ``(output, (h_n, c_n))`` or ``(output, (h_n, c_n), cell_states)``.
        """
        entry, weights = self._weights_for(weights)
        x, lengths, packed, batched = self._as_time_major(input, lengths)
        if x.shape[-1] != self.input_size:
            raise InputError(f"input has {x.shape[-1]} features per step but input_size is {self.input_size}")
        states = self._initial_state(hx, batched, x.shape[1])
        dtype = autocast_dtype(x.device.type, x.dtype)
        if dtype is not None:
            x = x.to(dtype)
            weights = _cast_all(weights, dtype) if entry is None else entry.cast(dtype, _cast_all)
        output, h_n, c_n, cells = self._run_layers(x, weights, states, lengths, return_cell_states)

        if packed:
            output = repack(output, lengths, input)
            cells = repack(cells, lengths, input) if return_cell_states else None
            # h_n, c_n rows follow the padded tensor's batch order, the original one, as nn.LSTM's do.
        elif not batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
            cells = cells.squeeze(1) if return_cell_states else None
        elif self.batch_first:
            output = output.transpose(0, 1)
            cells = cells.transpose(0, 1) if return_cell_states else None
        if return_cell_states:
            return output, (h_n, c_n), cells
        return output, (h_n, c_n)

    def _run_layers(self, x: Tensor, weights, states, lengths, return_cell_states: bool):
        """Every layer and direction over time-major x [T, B, I]: (output [T, B, D H], h_n, c_n
        [L D, B, H], the last layer's cell states [T, B, D H] or None)."""
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            outputs, cells = [], []
            for reverse in ((False, True) if self.bidirectional else (False,)):
                k = layer * self.num_directions + reverse
                keep_cells = return_cell_states and layer == self.num_layers - 1
                if reverse:
                    out, state, *cell = run_reversed(layer_input, weights[k], states[k], lengths, self.backend,
                                                     keep_cells)
                else:
                    out, state, *cell = multiplicative_lstm(layer_input, *weights[k], initial_state=states[k],
                                                            lengths=lengths, return_cell_states=keep_cells,
                                                            backend=self.backend)
                outputs.append(out)
                cells.append(cell[0] if cell else None)
                finals.append(state)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        h_n = torch.stack([h for h, _ in finals])
        c_n = torch.stack([c for _, c in finals])
        cell_states = None
        if return_cell_states:
            cell_states = cells[0] if len(cells) == 1 else torch.cat(cells, dim=-1)
        return layer_input, h_n, c_n, cell_states

    def step(self, input: Tensor, hx=None, *, weights: EffectiveWeights | None = None):
        """One time step (for generation); the same fused kernels as :meth:`forward` with T = 1.

        Args:
            input: [B, I] (or [I] unbatched), whatever ``batch_first`` says.
            hx: optional (h, c), each [L * D, B, H] ([L * D, H] unbatched).
            weights: what :meth:`effective_weights` returns, to compute it once per generation loop
                instead of once per step.

        Returns:
            ``(output [B, D * H], (h [L * D, B, H], c [L * D, B, H]))``; pass (h, c) to the next step.

        Example::

            >>> rnn = FastMLSTM(16, 32)
            >>> w = rnn.effective_weights()
            >>> out, state = rnn.step(torch.randn(4, 16), weights=w)
            >>> out, state = rnn.step(torch.randn(4, 16), state, weights=w)
        """
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise InputError(f"step input must be [B, I] or [I], got shape {list(input.shape)}")
        if input.dim() == 1:
            output, state = self.forward(input.view(1, -1), hx, weights=weights)
            return output[0], state
        if not self.bidirectional and not (self.dropout and self.training) and \
                autocast_dtype(input.device.type, input.dtype) is None:
            # One direction needs none of the sequence machinery: the functional step, layer by
            # layer. In a generation loop the Python around the kernels is a good part of a step.
            if input.shape[-1] != self.input_size:
                raise InputError(f"input has {input.shape[-1]} features per step but input_size is "
                                 f"{self.input_size}")
            states = self._initial_state(hx, True, input.shape[0])
            entry, all_weights = self._weights_for(weights)
            steps = self._prepared_steps(entry, input, states)
            output, finals = input, []
            for k, (layer_weights, state) in enumerate(zip(all_weights, states)):
                if steps is not None:
                    output, final = _prepared_step(steps[k], output, state, self.hidden_size)
                else:
                    output, final = multiplicative_lstm_step(output, *layer_weights, initial_state=state,
                                                             backend=self.backend)
                finals.append(final)
            if len(finals) == 1:  # (cheaper than stacking one)
                return output, (finals[0][0].unsqueeze(0), finals[0][1].unsqueeze(0))
            return output, (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))
        seq = input.unsqueeze(1) if self.batch_first else input.unsqueeze(0)
        output, state = self.forward(seq, hx, weights=weights)
        return (output[:, 0] if self.batch_first else output[0]), state

    def _prepared_steps(self, entry, input: Tensor, states) -> tuple | None:
        """Every layer's prepared step (:func:`fastmlstm.ops.prepare_step`), kept with the cached
        weights, for a one-direction step on [B, I] input; None where the step takes the functional
        path: no cache entry, something to differentiate or not a plain tensor, an input the weights
        do not match (the functional path names the mismatch), or a backend without prepared steps.
        The cached weights were checked when the module built them, so a step through here skips
        those checks and the per-call weight lookups of the functional path."""
        tensors = (input, *(s for state in states if state is not None for s in state))
        if entry is None or any(type(t) is not Tensor for t in tensors) or \
                (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return None
        like = entry.weights[0].weight_hm
        if input.dtype != like.dtype or input.device != like.device:
            return None
        backend = resolve_backend(self.backend, input.device, input.dtype)
        B, H = input.shape[0], self.hidden_size
        # Layer 0 reads the input, the others the layer below: their keys may differ (e.g. an odd I).
        inputs = (self.input_size,) if self.num_layers == 1 or self.input_size == H else (self.input_size, H)
        keys = tuple(step_key(backend, input.dtype, B, H, I) for I in inputs)
        if None in keys:
            return None
        return entry.memo(keys, lambda: tuple(prepare_step(backend, *w, B) for w in entry.weights))
