"""The implementations the benchmark compares, and how each builds a timed case.

    fastmlstm-<backend>   fastmlstm's public API (FastMLSTM with weight norm, ByteLM, probe.featurize)
    fastmlstm-cpu-forward featurize only: the bare ByteLM forward over the same padded batches
    mlstm-eager           the same cell as a plain PyTorch loop (bench/mlstm_eager.py)
    mlstm-compile         torch.compile of that loop's step function (and -unrolled: the whole sequence)
    cudnn-lstm            torch.nn.LSTM of the same H (cuDNN on a GPU; called nn-lstm on a CPU)
    cudnn-lstm-matched    torch.nn.LSTM with the multiplicative LSTM's parameter count
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import fastmlstm
from fastmlstm.models.lm import pad_bytes
from fastmlstm.nn.precision import native_16bit_gemm
from fastmlstm.probe import featurize as probe_featurize
from mlstm_eager import (EagerByteLM, EagerMLSTM, LSTMByteLM, lstm_weight_count, matched_lstm_hidden_size,
                         mlstm_cell, mlstm_sequence, mlstm_weight_count)
from registry import DTYPES, MODES, Case
from workload import batch_shapes, preprocess

@dataclass
class Built:
    """One case ready to time: ``call()`` runs it once on the next input set."""

    call: Callable[[], object]
    held: Callable[[], list]  # the tensors the case holds between calls (for static memory)
    hidden_size: int
    params: int
    chars: int
    texts: int | None = None
    batches: list[tuple[int, int]] | None = None
    notes: dict = field(default_factory=dict)


def _rotating(sets: list):
    it = itertools.cycle(sets)
    return lambda: next(it)


def n_input_sets(bytes_per_set: int, device: torch.device) -> int:
    """Enough input sets that cycling through them does not hit a cache (about 128 MiB of them on
    a GPU, whose L2 is flushed between calls anyway; 3 on a CPU), at least 2 and at most 8."""
    if device.type == "cuda":
        return max(2, min(8, math.ceil(128 * 2**20 / max(bytes_per_set, 1))))
    return 3


def _randn(shape, device, dtype, scale=1.0, requires_grad=False):
    t = torch.randn(shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


class Impl:
    name = ""
    family = "mlstm"  # cost arithmetic: "mlstm" (5H^2 per step) or "lstm" (4H^2)
    modes = MODES
    kernel = ""

    def status(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def hidden_size(self, H: int, I: int) -> int:
        return H

    def label(self, device: torch.device) -> str:
        return self.name

    def case_status(self, case: Case, device: torch.device, ctx: dict) -> tuple[bool, str]:
        """Whether this case is timed for this implementation (a preset may limit an
        implementation's dtypes with ``impl_dtypes`` and a mode's hidden sizes with ``impl_max_H``),
        and why not."""
        allowed = ctx.get("impl_dtypes", {}).get(self.name)
        if allowed is not None and case.dtype not in allowed:
            return False, f"the preset times {self.name} in {', '.join(allowed)} only"
        largest = ctx.get("impl_max_H", {}).get(self.name, {}).get(case.mode)
        if largest is not None and case.H > largest:
            return False, f"the preset times {self.name} {case.mode} up to H = {largest} only"
        return True, ""

    # Subclasses provide: weight_count(H, I); layer(I, H, device, dtype, ctx) -> nn.Module;
    # seq(layer, x, h0, c0) -> output [T, B, H]; step_fn(layer) -> callable(x, h, c);
    # byte_lm(E, H, device, dtype, ctx) -> nn.Module; features(lm, batch, lengths) -> c [B, H];
    # logits(lm, bytes [B, T]) -> [B, T, 256]; and, for the multiplicative LSTMs, gate_runner(ctx).

    def featurize(self, lm, texts: list[str], batch_size: int) -> torch.Tensor:
        """[N, H] float32 features on the host: the paper's steps, done by hand (fastmlstm calls
        its probe toolkit instead)."""
        device = next(lm.parameters()).device
        seqs = [preprocess(t) for t in texts]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = torch.empty(len(seqs), lm.rnn.hidden_size)
        with torch.no_grad():
            for first in range(0, len(order), batch_size):
                idx = order[first : first + batch_size]
                batch, lengths = pad_bytes([seqs[i] for i in idx], device)
                out[idx] = torch.tanh(self.features(lm, batch, lengths).float()).cpu()
        return out

    def featurize_entry_point(self) -> str:
        return "bench: preprocess, sort, pad_bytes, hidden state per batch"

    def build(self, case: Case, device: torch.device, ctx: dict) -> Built:
        dtype = DTYPES[case.dtype]
        H, B, T, I = case.H, case.B, case.T, case.I
        Hh = self.hidden_size(H, I)
        if case.mode in ("fwd", "fwd+bwd", "step"):
            layer = self.layer(I, Hh, device, dtype, ctx)
            params = [p for p in layer.parameters()]
            n_params = self.weight_count(H, I)
            if case.mode == "step":
                per_set = B * (I + 2 * Hh) * dtype.itemsize
                sets = [(_randn((B, I), device, dtype), _randn((B, Hh), device, dtype, 0.5),
                         _randn((B, Hh), device, dtype, 0.5)) for _ in range(n_input_sets(per_set, device))]
                step = self.step_fn(layer)
                nxt = _rotating(sets)

                def call():
                    with torch.no_grad():
                        return step(*nxt())

                return Built(call, lambda: params + [t for s in sets[:1] for t in s], Hh, n_params, chars=B)
            grad = case.mode == "fwd+bwd"
            per_set = T * B * (I + (2 * Hh if grad else 0)) * dtype.itemsize
            sets = []
            for _ in range(n_input_sets(per_set, device)):
                x = _randn((T, B, I), device, dtype, requires_grad=grad)
                h0, c0 = _randn((B, Hh), device, dtype, 0.5), _randn((B, Hh), device, dtype, 0.5)
                gy = _randn((T, B, Hh), device, dtype) if grad else None
                sets.append((x, h0, c0, gy))
            nxt = _rotating(sets)
            if grad:
                def call():
                    x, h0, c0, gy = nxt()
                    out = self.seq(layer, x, h0, c0)
                    return torch.autograd.grad(out, [x, *params], gy)
            else:
                def call():
                    x, h0, c0, _ = nxt()
                    with torch.no_grad():
                        return self.seq(layer, x, h0, c0)
            return Built(call, lambda: params + [t for t in sets[0] if t is not None], Hh, n_params, chars=B * T)

        if case.mode == "featurize":
            lm = self.byte_lm(I, Hh, device, dtype, ctx)
            texts = ctx["texts"]
            shapes = batch_shapes(texts, B)
            chars = sum(len(preprocess(t)) for t in texts)
            return Built(lambda: self.featurize(lm, texts, B), lambda: list(lm.parameters()), Hh,
                         self.weight_count(H, I), chars=chars, texts=len(texts), batches=shapes,
                         notes={"featurize_entry_point": self.featurize_entry_point()})

        if case.mode == "train":
            lm = self.byte_lm(I, Hh, device, torch.float32, ctx)
            opt = torch.optim.Adam(lm.parameters(), lr=5e-4)
            per_set = B * (T + 1)
            sets = [torch.randint(0, 256, (B, T + 1), dtype=torch.uint8, device=device)
                    for _ in range(n_input_sets(per_set, device))]
            nxt = _rotating(sets)
            autocast = dtype != torch.float32

            def call():
                seq = nxt()
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    logits = self.logits(lm, seq[:, :-1])
                    loss = F.cross_entropy(logits.reshape(-1, 256).float(), seq[:, 1:].reshape(-1).long())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            def held():
                state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
                return list(lm.parameters()) + state + sets[:1]

            n_params = sum(p.numel() for p in lm.parameters())
            return Built(call, held, Hh, n_params, chars=B * T,
                         notes={"precision": f"autocast {case.dtype}, float32 parameters" if autocast else "float32"})
        raise ValueError(case.mode)


class FastImpl(Impl):
    """fastmlstm through its public API: FastMLSTM (weight norm on) and ByteLM."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastmlstm-{backend}"
        self.kernel = f"fastmlstm backend={backend!r}"

    def status(self, device):
        ok, why = fastmlstm.backend_status(self.backend, device)
        if ok and self.backend == "triton" and device.type != "cuda":
            return False, "Triton on CPU runs only through its interpreter (TRITON_INTERPRET=1): not timed"
        return ok, why

    def weight_count(self, H, I):
        return mlstm_weight_count(H, I)

    def layer(self, I, H, device, dtype, ctx):
        return fastmlstm.FastMLSTM(I, H, weight_norm=True, backend=self.backend, device=device, dtype=dtype)

    def seq(self, layer, x, h0, c0):
        return layer(x, (h0.unsqueeze(0), c0.unsqueeze(0)))[0]

    def step_fn(self, layer):
        weights = None
        if next(layer.parameters()).device.type != "cpu":
            # On a GPU a generation loop computes the effective weights once (ByteLM.generate does);
            # on a CPU the module's weight cache does it, so the step goes through the module bare.
            with torch.no_grad():
                weights = layer.effective_weights()
        return lambda x, h, c: layer.step(x, (h.unsqueeze(0), c.unsqueeze(0)), weights=weights)

    def byte_lm(self, E, H, device, dtype, ctx):
        return fastmlstm.ByteLM(H, E, weight_norm=True, backend=self.backend, device=device, dtype=dtype)

    def features(self, lm, batch, lengths):
        return lm.hidden(batch, lengths=lengths)[1][1]

    def featurize_entry_point(self):
        return "fastmlstm.probe.featurize"

    def featurize(self, lm, texts, batch_size):
        return probe_featurize(lm, texts, batch_size=batch_size, progress=False)

    def logits(self, lm, seq):
        return lm(seq)[0]

    def gate_runner(self, ctx):
        """(x, h0, c0, weights) -> (output, h_n, c_n) through the functional API."""
        def run(x, h0, c0, w):
            out, (h, c) = fastmlstm.multiplicative_lstm(x, *w, initial_state=(h0, c0), backend=self.backend)
            return out, h, c
        return run


class BareForwardImpl(FastImpl):
    """featurize's floor: only the forward over the batches featurize runs (sorted longest first,
    right-padded, with lengths), prepared once outside the timing; no preprocessing, no host copy."""

    modes = ("featurize",)

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name = f"fastmlstm-{backend}-forward"
        self.kernel = f"fastmlstm backend={backend!r}, ByteLM.hidden per padded batch"

    def featurize_entry_point(self):
        return "bench: ByteLM.hidden over pre-padded sorted batches (the bare forward)"

    def build(self, case, device, ctx):
        if case.mode != "featurize":
            raise ValueError(f"{self.name} times featurize only, not {case.mode}")
        H = self.hidden_size(case.H, case.I)
        lm = self.byte_lm(case.I, H, device, DTYPES[case.dtype], ctx)
        texts = ctx["texts"]
        seqs = sorted((preprocess(t) for t in texts), key=len, reverse=True)
        batches = [pad_bytes(seqs[i : i + case.B], device) for i in range(0, len(seqs), case.B)]

        def call():
            with torch.no_grad():
                return [lm.hidden(batch, lengths=lengths)[1][1] for batch, lengths in batches]

        return Built(call, lambda: list(lm.parameters()), H, self.weight_count(case.H, case.I),
                     chars=sum(len(s) for s in seqs), texts=len(texts), batches=batch_shapes(texts, case.B),
                     notes={"featurize_entry_point": self.featurize_entry_point()})


class EagerImpl(Impl):
    """The plain PyTorch loop of bench/mlstm_eager.py, eager or under torch.compile."""

    def __init__(self, compile: str | None):
        self.compile = compile
        self.name = {None: "mlstm-eager", "step": "mlstm-compile", "unrolled": "mlstm-compile-unrolled"}[compile]
        self.kernel = {None: "PyTorch eager loop", "step": "torch.compile of the step function, Python loop",
                       "unrolled": "torch.compile of the whole sequence (T steps unrolled)"}[compile]
        if compile == "unrolled":
            self.modes = ("fwd", "fwd+bwd")

    def _fresh(self, ctx):
        if self.compile:
            torch._dynamo.reset()  # one compiled graph per case: never hit the recompile limit

    def weight_count(self, H, I):
        return mlstm_weight_count(H, I)

    def layer(self, I, H, device, dtype, ctx):
        self._fresh(ctx)
        return EagerMLSTM(I, H, self.compile, ctx["compile_backend"], device=device, dtype=dtype)

    def seq(self, layer, x, h0, c0):
        return layer(x, (h0, c0))[0]

    def step_fn(self, layer):
        with torch.no_grad():
            weights = layer.effective_weights()
        return lambda x, h, c: layer.step(x, (h, c), weights=weights)

    def byte_lm(self, E, H, device, dtype, ctx):
        self._fresh(ctx)
        return EagerByteLM(H, E, self.compile, ctx["compile_backend"], device=device, dtype=dtype)

    def features(self, lm, batch, lengths):
        return lm.hidden(batch, torch.as_tensor(lengths, device=batch.device))[1][1]

    def logits(self, lm, seq):
        return lm(seq)

    def gate_runner(self, ctx):
        """(x, h0, c0, weights) -> (output, h_n, c_n) through the same loop and step function."""
        opts = {"backend": ctx["compile_backend"], "dynamic": False}
        if self.compile == "step":
            cell = torch.compile(mlstm_cell, fullgraph=True, **opts)
            return lambda x, h0, c0, w: flat(mlstm_sequence(x, h0, c0, *w, cell=cell))
        if self.compile == "unrolled":
            seq = torch.compile(mlstm_sequence, **opts)
            return lambda x, h0, c0, w: flat(seq(x, h0, c0, *w))
        return lambda x, h0, c0, w: flat(mlstm_sequence(x, h0, c0, *w))


class LSTMImpl(Impl):
    """torch.nn.LSTM: cuDNN on CUDA, PyTorch's CPU kernel on CPU (named nn-lstm there)."""

    family = "lstm"

    def __init__(self, matched: bool):
        self.matched = matched
        self.name = "cudnn-lstm-matched" if matched else "cudnn-lstm"

    def label(self, device):
        return self.name if device.type == "cuda" else self.name.replace("cudnn-lstm", "nn-lstm")

    def kernel_for(self, device):
        if device.type == "cuda":
            return "torch.nn.LSTM, cuDNN" if torch.backends.cudnn.is_available() else "torch.nn.LSTM (no cuDNN)"
        return "torch.nn.LSTM, PyTorch CPU kernel (no cuDNN on CPU)"

    def case_status(self, case, device, ctx):
        if device.type == "cpu" and case.dtype != "float32" and not native_16bit_gemm(DTYPES[case.dtype]):
            # PyTorch then runs nn.LSTM in a portable scalar loop (several times its float32 time):
            # not the baseline a 16-bit comparison means.
            return False, (f"torch.nn.LSTM has no native {case.dtype} path on this CPU (oneDNN without AVX-512 "
                           f"{'BF16' if case.dtype == 'bfloat16' else 'FP16'})")
        return super().case_status(case, device, ctx)

    def hidden_size(self, H, I):
        return matched_lstm_hidden_size(H, I) if self.matched else H

    def weight_count(self, H, I):
        return lstm_weight_count(self.hidden_size(H, I), I)

    def layer(self, I, H, device, dtype, ctx):
        return nn.LSTM(I, H, device=device, dtype=dtype)

    def seq(self, layer, x, h0, c0):
        return layer(x, (h0.unsqueeze(0), c0.unsqueeze(0)))[0]

    def step_fn(self, layer):
        return lambda x, h, c: layer(x.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))[1]

    def byte_lm(self, E, H, device, dtype, ctx):
        return LSTMByteLM(H, E, device=device, dtype=dtype)

    def features(self, lm, batch, lengths):
        return lm.hidden(batch, lengths)[1]

    def logits(self, lm, seq):
        return lm(seq)


IMPLS: dict[str, Impl] = {impl.name: impl for impl in (
    FastImpl("triton"), FastImpl("cuda"), FastImpl("cpu"), FastImpl("reference"), BareForwardImpl("cpu"),
    EagerImpl(None), EagerImpl("step"), EagerImpl("unrolled"),
    LSTMImpl(False), LSTMImpl(True),
)}
ALIASES = {"nn-lstm": "cudnn-lstm", "nn-lstm-matched": "cudnn-lstm-matched"}
BASELINE = "cudnn-lstm"  # speed-ups are over this row at the same case


def kernel_description(impl: Impl, device: torch.device) -> str:
    return impl.kernel_for(device) if isinstance(impl, LSTMImpl) else impl.kernel


def flat(result):
    """``(output, (h, c))`` -> ``(output, h, c)``."""
    out, (h, c) = result
    return out, h, c
