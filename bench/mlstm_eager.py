"""The baselines the benchmark compares fastmlstm with, written the way a PyTorch user would.

``mlstm_cell`` / ``mlstm_sequence`` are a plain autograd loop of the multiplicative LSTM of
docs/MODEL.md (gate order i, f, o, u; torch's [out, in] weight layout, the same as
``fastmlstm.FastMLSTM``): one GEMM for the input projections of the whole sequence, then two
dependent GEMMs and the pointwise update per step. Everything runs in the weights' dtype, cell
state included, as a plain loop would (fastmlstm keeps the cell state in float32).

``mlstm-eager`` runs this loop as is; ``mlstm-compile`` runs the same loop with the step function
(``mlstm_cell``) compiled by ``torch.compile``; ``mlstm-compile-unrolled`` compiles the whole
sequence function, which unrolls the T steps into one graph (minutes of compilation per shape, so
it is opt-in).

Dimension letters: T time, B batch, I input size, H hidden size, E byte-embedding size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mlstm_cell", "mlstm_step", "mlstm_sequence", "EagerMLSTM", "EagerByteLM", "LSTMByteLM",
           "matched_lstm_hidden_size", "mlstm_weight_count", "lstm_weight_count"]


def mlstm_cell(xz: Tensor, xm: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, weight_hm: Tensor):
    """One recurrent step on precomputed input projections.

    Args:
        xz: [B, 4H] = x W_ih^T + b; xm: [B, H] = x W_im^T; h, c: [B, H];
        weight_hh: [4H, H] (applied to m); weight_hm: [H, H].

    Returns:
        (h, c), each [B, H].
    """
    m = xm * F.linear(h, weight_hm)
    z = xz + F.linear(m, weight_hh)
    i, f, o, u = z.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def mlstm_masked_cell(xz: Tensor, xm: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, weight_hm: Tensor,
                      active: Tensor):
    """``mlstm_cell`` for padded batches: rows where ``active`` [B, 1] is False keep (h, c)."""
    h_new, c_new = mlstm_cell(xz, xm, h, c, weight_hh, weight_hm)
    return torch.where(active, h_new, h), torch.where(active, c_new, c)


def mlstm_step(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_im: Tensor,
               weight_hm: Tensor, bias: Tensor | None):
    """One full step from the raw input x [B, I] (generation): input projections plus the cell."""
    return mlstm_cell(F.linear(x, weight_ih, bias), F.linear(x, weight_im), h, c, weight_hh, weight_hm)


def mlstm_sequence(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_im: Tensor,
                   weight_hm: Tensor, bias: Tensor | None, cell=mlstm_cell, lengths: Tensor | None = None):
    """The multiplicative LSTM over x [T, B, I] from (h, c) [B, H].

    ``cell`` is the step function (``mlstm_cell`` or a compiled copy). With ``lengths`` ([B] int64 on
    x's device) row b stops updating after ``lengths[b]`` steps (right-padded batches).

    Returns:
        (output [T, B, H], (h, c)).
    """
    T = x.shape[0]
    xz = F.linear(x, weight_ih, bias)  # [T, B, 4H]: one GEMM for the whole sequence
    xm = F.linear(x, weight_im)  # [T, B, H]
    outputs = []
    for t in range(T):
        if lengths is None:
            h, c = cell(xz[t], xm[t], h, c, weight_hh, weight_hm)
        else:
            h, c = cell(xz[t], xm[t], h, c, weight_hh, weight_hm, (t < lengths).unsqueeze(1))
        outputs.append(h)
    output = torch.stack(outputs) if outputs else x.new_empty(0, x.shape[1], h.shape[1])
    return output, (h, c)


def _weight_norm(v: Tensor, g: Tensor) -> Tensor:
    return g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)


class EagerMLSTM(nn.Module):
    """Weight-normalized multiplicative LSTM layer as plain PyTorch: parameters ``<name>_v``,
    ``<name>_g`` and ``bias_ih`` like ``fastmlstm.FastMLSTM(weight_norm=True)``, weight norm applied once
    per forward (autograd through it), then ``mlstm_sequence`` with a pluggable step function.

    ``compile``: None (eager), ``"step"`` (torch.compile the step function; the loop stays in
    Python) or ``"unrolled"`` (torch.compile the whole sequence function).
    """

    def __init__(self, input_size: int, hidden_size: int, compile: str | None = None,
                 compile_backend: str = "inductor", device=None, dtype=None):
        super().__init__()
        H, I = hidden_size, input_size
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size = I, H
        shapes = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "weight_im": (H, I), "weight_hm": (H, H)}
        bound = 1.0 / math.sqrt(H)
        for name, shape in shapes.items():
            v = nn.Parameter(torch.empty(shape, **factory).uniform_(-bound, bound))
            self.register_parameter(f"{name}_v", v)
            self.register_parameter(f"{name}_g", nn.Parameter(v.detach().float().norm(dim=1).to(v.dtype)))
        self.bias_ih = nn.Parameter(torch.empty(4 * H, **factory).uniform_(-bound, bound))
        self.compile_mode = compile
        self._cell, self._masked_cell, self._step, self._sequence = mlstm_cell, mlstm_masked_cell, mlstm_step, None
        if compile == "step":
            opts = {"backend": compile_backend, "fullgraph": True, "dynamic": False}
            self._cell = torch.compile(mlstm_cell, **opts)
            self._masked_cell = torch.compile(mlstm_masked_cell, **opts)
            self._step = torch.compile(mlstm_step, **opts)
        elif compile == "unrolled":
            self._sequence = torch.compile(mlstm_sequence, backend=compile_backend, dynamic=False)
        elif compile is not None:
            raise ValueError(f"compile must be None, 'step' or 'unrolled', got {compile!r}")

    def effective_weights(self):
        """(weight_ih, weight_hh, weight_im, weight_hm, bias), weight norm applied."""
        return tuple(_weight_norm(getattr(self, f"{n}_v"), getattr(self, f"{n}_g"))
                     for n in ("weight_ih", "weight_hh", "weight_im", "weight_hm")) + (self.bias_ih,)

    def forward(self, x: Tensor, state=None, lengths: Tensor | None = None, weights=None):
        """x [T, B, I], state (h, c) [B, H] -> (output [T, B, H], (h, c))."""
        weights = self.effective_weights() if weights is None else weights
        if state is None:
            zeros = x.new_zeros(x.shape[1], self.hidden_size)
            state = (zeros, zeros)
        if self._sequence is not None and lengths is None:
            return self._sequence(x, *state, *weights)
        cell = self._cell if lengths is None else self._masked_cell
        return mlstm_sequence(x, *state, *weights, cell=cell, lengths=lengths)

    def step(self, x: Tensor, state, weights=None):
        """x [B, I] -> (h, c) after one step."""
        weights = self.effective_weights() if weights is None else weights
        return self._step(x, *state, *weights)


class EagerByteLM(nn.Module):
    """bytes -> embedding [256, E] -> EagerMLSTM -> linear [H, 256], the plain-PyTorch counterpart
    of ``fastmlstm.ByteLM`` (which gathers precomputed input projections instead of embedding)."""

    def __init__(self, hidden_size: int, embed_size: int = 64, compile: str | None = None,
                 compile_backend: str = "inductor", device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(256, embed_size, device=device, dtype=dtype)
        self.rnn = EagerMLSTM(embed_size, hidden_size, compile, compile_backend, device=device, dtype=dtype)
        self.readout = nn.Linear(hidden_size, 256, device=device, dtype=dtype)

    def hidden(self, input: Tensor, lengths: Tensor | None = None):
        """input [B, T] bytes -> (output [T, B, H], (h, c))."""
        return self.rnn(self.embedding(input.t().long()), lengths=lengths)

    def forward(self, input: Tensor):
        """Next-byte logits [B, T, 256]."""
        output, _ = self.hidden(input)
        return self.readout(output.transpose(0, 1))


class LSTMByteLM(nn.Module):
    """The same byte LM with ``torch.nn.LSTM`` (cuDNN on CUDA) as the recurrent layer."""

    def __init__(self, hidden_size: int, embed_size: int = 64, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(256, embed_size, device=device, dtype=dtype)
        self.rnn = nn.LSTM(embed_size, hidden_size, device=device, dtype=dtype)
        self.readout = nn.Linear(hidden_size, 256, device=device, dtype=dtype)

    def hidden(self, input: Tensor, lengths: list[int] | None = None):
        """input [B, T] bytes (rows sorted by decreasing length when ``lengths`` is given) ->
        (h, c) after each row's last byte, each [B, H]."""
        x = self.embedding(input.t().long())
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=True)
        _, (h, c) = self.rnn(x)
        return h[0], c[0]

    def forward(self, input: Tensor):
        output, _ = self.rnn(self.embedding(input.t().long()))
        return self.readout(output.transpose(0, 1))


def mlstm_weight_count(hidden_size: int, input_size: int) -> int:
    """Effective weights of the multiplicative LSTM: 5H^2 recurrent + 5HI input + 4H bias."""
    H, I = hidden_size, input_size
    return 5 * H * H + 5 * H * I + 4 * H


def lstm_weight_count(hidden_size: int, input_size: int) -> int:
    """torch.nn.LSTM's parameters: 4H^2 + 4HI + two 4H biases."""
    H, I = hidden_size, input_size
    return 4 * H * H + 4 * H * I + 8 * H


def matched_lstm_hidden_size(hidden_size: int, input_size: int, multiple: int = 8) -> int:
    """The nn.LSTM hidden size whose parameter count is nearest the multiplicative LSTM's
    (``mlstm_weight_count``), rounded to a multiple of ``multiple`` (tensor-core friendly)."""
    target = mlstm_weight_count(hidden_size, input_size)
    # 4 H'^2 + (4 I + 8) H' - target = 0
    a, b = 4.0, 4.0 * input_size + 8.0
    root = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    lo = max(multiple, int(root // multiple) * multiple)
    return min((lo, lo + multiple), key=lambda h: abs(lstm_weight_count(h, input_size) - target))
