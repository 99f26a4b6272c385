"""``ByteLM``: the byte-level language model of Radford et al. (2017).

bytes 0..255 -> embedding [256, E] -> multiplicative LSTM (H) -> linear [H, 256] -> next byte.

Because the input is one of 256 bytes, the input projections ``x W_ih^T + b`` and ``x W_im^T`` are
read from one [256, 5H] table computed once per forward (:meth:`ByteLM.input_tables`) and gathered
by byte: no per-step input GEMM at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, InputTypeError
from ..nn.functional import multiplicative_lstm_recurrence
from ..nn.modules import FastMLSTM, MLSTMWeights, autocast_dtype, cast_weights
from ..nn.precision import linear
from ..ops.interface import accumulation_dtype
from ..options import check
from .generation import ByteStepper, byte_advance, sample_bytes
from .serialization import FORMAT, ModelFileMixin

__all__ = ["ByteLM", "pad_bytes", "to_bytes"]


def to_bytes(text: str | bytes | bytearray) -> bytes:
    """UTF-8 bytes of ``text`` (bytes pass through unchanged)."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"text holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
                             "which has no UTF-8 encoding; pass bytes instead") from None
    raise InputTypeError(f"expected str or bytes, got {type(text).__name__}")


class ByteLM(ModelFileMixin, nn.Module):
    """Byte-level multiplicative-LSTM language model.

    Args:
        hidden_size: H (4096 in the paper).
        embed_size: E (64 in the paper).
        weight_norm: weight-normalize the recurrent layer's four matrices (the paper does).
        backend: recurrence backend, as for :class:`~fastmlstm.FastMLSTM`.
        device, dtype: of the parameters.

    Shapes: ``forward(input [B, T] bytes, initial_state=None)`` returns logits [B, T, 256] and the
    final state ``(h, c)``, each [B, H] float32.

    Example::

        >>> model = ByteLM(hidden_size=64, embed_size=16)
        >>> x = torch.tensor([list(b"hello world")], dtype=torch.uint8)
        >>> logits, (h, c) = model(x)
        >>> logits.shape, c.shape
        (torch.Size([1, 11, 256]), torch.Size([1, 64]))
    """

    FILE_FORMAT = FORMAT

    def __init__(self, hidden_size: int = 4096, embed_size: int = 64, weight_norm: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(256, embed_size, **factory)
        self.rnn = FastMLSTM(embed_size, hidden_size, weight_norm=weight_norm, backend=backend, **factory)
        self.readout = nn.Linear(hidden_size, 256, **factory)

    @property
    def hidden_size(self) -> int:
        return self.rnn.hidden_size

    @property
    def config(self) -> dict:
        return {"hidden_size": self.rnn.hidden_size, "embed_size": self.rnn.input_size,
                "weight_norm": self.rnn.weight_norm}

    @property
    def backend(self) -> str:
        return self.rnn.backend

    def _weights(self, weights: MLSTMWeights | None, device_type: str) -> MLSTMWeights:
        weights = self.rnn.effective_weights() if weights is None else weights
        dtype = autocast_dtype(device_type, weights.weight_hh.dtype)
        return weights if dtype is None else cast_weights(weights, dtype)

    def input_tables(self, weights: MLSTMWeights | None = None) -> Tensor:
        """[256, 5H]: row b is ``[emb_b W_ih^T + bias, emb_b W_im^T]`` for byte b."""
        weights = self.rnn.effective_weights() if weights is None else weights
        H = self.rnn.hidden_size
        matrix = torch.cat([weights.weight_ih, weights.weight_im], dim=0)
        bias = None if weights.bias is None else torch.cat([weights.bias, weights.bias.new_zeros(H)])
        return linear(self.embedding.weight.to(matrix.dtype), matrix, bias)

    def _check_fixed_units(self, fixed_units, state_dtype: torch.dtype = torch.float32) -> dict[int, float]:
        """``{unit: value}`` with every unit an int in [0, H), named once, and every value finite in
        ``state_dtype`` (the cell state's: a value beyond float32's range would be held at inf)."""
        if not isinstance(fixed_units, Mapping):
            raise InputTypeError(f"fixed_units must be a mapping {{unit: value}}, got {type(fixed_units).__name__}")
        H, largest = self.rnn.hidden_size, torch.finfo(state_dtype).max
        fixed = {}
        for u, v in fixed_units.items():
            unit, value = check("unit", u, "a unit of fixed_units"), check("cell_value", v, f"fixed_units[{u!r}]")
            if unit in fixed:  # (keys that differ but name one unit: 1 and torch.tensor(1))
                raise InputError(f"fixed_units names unit {unit} twice")
            if abs(value) > largest:
                raise InputError(f"fixed_units[{u!r}] = {value!r} does not fit the {str(state_dtype)[6:]} cell state "
                                 f"(|value| <= {largest:.4g})")
            fixed[unit] = value
        if fixed and max(fixed) >= H:
            raise InputError(f"fixed_units must name units in [0, {H}), got {sorted(fixed)}")
        return fixed

    def _check_input(self, input) -> Tensor:
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a tensor of bytes [B, T], got {type(input).__name__}")
        if input.dim() != 2:
            raise InputError(f"input must be 2-D [B, T] (bytes), got shape {list(input.shape)}")
        if input.dtype == torch.uint8:
            return input
        if input.dtype.is_floating_point or input.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise InputTypeError(f"input must hold byte values (uint8 or an integer dtype), got {input.dtype}")
        if input.numel() and (int(input.min()) < 0 or int(input.max()) > 255):
            raise InputError("input byte values must lie in [0, 255]")
        return input

    def hidden(self, input: Tensor, initial_state=None, *, lengths=None, return_cell_states: bool = False,
               weights: MLSTMWeights | None = None):
        """Run the recurrence over bytes without the readout.

        Args:
            input: [B, T] byte values (uint8 preferred).
            initial_state: optional (h, c), each [B, H].
            lengths: optional [B] valid lengths (CPU tensor or list); rows stop after them.
            return_cell_states: also return every step's cell state.
            weights: precomputed ``self.rnn.effective_weights()``.

        Returns:
            ``(output [B, T, H], (h [B, H], c [B, H]))`` and, if asked, cell states [B, T, H] float32.
        """
        input = self._check_input(input)
        weights = self._weights(weights, input.device.type)
        proj = F.embedding(input.t().long(), self.input_tables(weights))  # [T, B, 5H]
        output, state, *cells = multiplicative_lstm_recurrence(
            proj, weights.weight_hh, weights.weight_hm, initial_state=initial_state, lengths=lengths,
            return_cell_states=return_cell_states, backend=self.rnn.backend)
        return (output.transpose(0, 1), state, *(c.transpose(0, 1) for c in cells))

    def forward(self, input: Tensor, initial_state=None, *, lengths=None, return_cell_states: bool = False):
        """Next-byte logits [B, T, 256] for input bytes [B, T], and the final state (h, c) [B, H]."""
        output, state, *cells = self.hidden(input, initial_state, lengths=lengths,
                                            return_cell_states=return_cell_states)
        return (linear(output, self.readout.weight, self.readout.bias), state, *cells)

    @torch.no_grad()
    def generate(
        self,
        prefix: str | bytes = "\n ",
        n_bytes: int = 200,
        temperature: float = 1.0,
        *,
        num_samples: int = 1,
        fixed_units: Mapping[int, float] | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[bytes]:
        """Sample continuations of ``prefix``, batched, with the single-step kernels.

        Args:
            prefix: text or bytes to condition on (at least one byte; the paper's start token is "\\n").
            n_bytes: bytes to sample after the prefix (an int >= 0).
            temperature: softmax temperature, a finite number >= 0; 0 picks the most likely byte.
            num_samples: independent samples, run as one batch (an int >= 1).
            fixed_units: ``{unit: value}`` cell-state units held at a finite value at every step,
                prefix included (the paper's steered generation, e.g. ``{sentiment_unit: 1.0}``);
                each unit named once, each value within the cell state's range (float32's; float64's
                for a float64 model). ``{}`` or None holds nothing.
            top_k: sample only among the k most likely bytes (1 <= k <= 256; bytes tied with the
                k-th are kept).
            seed / generator: make sampling reproducible (a seed, an int >= 0, builds a generator on
                the model's device).

        Bad arguments (NaN or inf, a number out of range, a fractional count) raise
        :class:`~fastmlstm.errors.InputError` (see :mod:`fastmlstm.options`); logits that are not
        finite (overflowed weights or state) raise ``FloatingPointError``.

        Returns:
            ``num_samples`` byte strings, each the sampled continuation (prefix not included). Decode
            with ``.decode("utf-8", errors="replace")``: a byte model may emit invalid UTF-8.
        """
        prefix = to_bytes(prefix)
        if not prefix:
            raise InputError("prefix must hold at least one byte (the paper starts from '\\n')")
        n_bytes, num_samples = check("n_bytes", n_bytes), check("num_samples", num_samples)
        temperature, top_k = check("temperature", temperature), check("top_k", top_k)
        seed = None if seed is None else check("seed", seed)
        device = self.readout.weight.device
        weights = self._weights(None, device.type)
        state_dtype = accumulation_dtype(weights.weight_hh.dtype)  # the held values are written into the state
        units, values = None, None
        fixed = {} if fixed_units is None else self._check_fixed_units(fixed_units, state_dtype)
        if fixed:
            units = torch.tensor(list(fixed), dtype=torch.long, device=device)
            values = torch.tensor(list(fixed.values()), dtype=state_dtype, device=device)
        if generator is not None:
            if seed is not None:
                raise InputError("give seed or generator, not both (a seed builds the generator)")
            if not isinstance(generator, torch.Generator):
                raise InputTypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise InputError(f"generator is on {generator.device} but the model is on {device}")
        elif seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        table = self.input_tables(weights)

        advance = byte_advance(table, weights.weight_hh, weights.weight_hm, self.rnn.backend, num_samples,
                               None if units is None else (units, values))

        start = torch.tensor(list(prefix), dtype=torch.long, device=device).unsqueeze(1).expand(-1, num_samples)
        state = None
        if units is None:
            last, state = advance(start, state)  # the whole prefix in one fused pass
        else:
            for t in range(start.shape[0]):  # hold the units at every prefix step too
                last, state = advance(start[t : t + 1], state)
        logits, step = self._generation_steps(advance, last, state, num_samples, units is not None)
        samples = []
        for i in range(n_bytes):
            byte = sample_bytes(logits, temperature, top_k, generator)
            samples.append(byte)
            if i + 1 < n_bytes:
                logits = step(byte)
        if not samples:
            return [b""] * num_samples
        return [bytes(row) for row in torch.stack(samples, dim=1).cpu().tolist()]

    def _generation_steps(self, advance, last: Tensor, state, batch: int, steered: bool):
        """The first logits [B, 256] (from the prefix's last output) and the per-byte step
        ``step(byte [B]) -> logits``: eager, or one CUDA graph per step once checked on this GPU
        (:mod:`.generation`)."""
        weight, bias = self.readout.weight, self.readout.bias

        def readout(out: Tensor) -> Tensor:
            return linear(out.to(weight.dtype), weight, bias).float()

        describe = {"dtype": weight.dtype, "H": self.rnn.hidden_size, "B": batch, "backend": self.rnn.backend,
                    "steered": steered}
        return readout(last), ByteStepper(advance, readout, state, describe)


def pad_bytes(texts: Sequence[bytes], device=None) -> tuple[Tensor, list[int]]:
    """Right-padded [B, T] uint8 batch and the lengths."""
    lengths = [len(t) for t in texts]
    batch = torch.zeros(len(texts), max(lengths, default=0), dtype=torch.uint8)
    for i, t in enumerate(texts):
        if t:
            batch[i, : len(t)] = torch.frombuffer(bytearray(t), dtype=torch.uint8)
    return batch.to(device), lengths
