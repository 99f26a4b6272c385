"""The benchmark's registry: presets of shapes, the implementations, how each case is built, what
it costs (MODEL.md's arithmetic) and the correctness gate every measured implementation passes.

Dimension letters: T time steps, B batch (texts per batch for ``featurize``), I input size (the
byte-embedding size E for ``featurize`` and ``train``), H hidden size.

Modes (``chars`` is what ``chars_per_s`` counts):
    fwd        inference forward over [T, B, I] from a given (h0, c0), no autograd.   chars = B*T
    fwd+bwd    forward, then the gradients of the input and every parameter for a given
               output gradient (torch.autograd.grad, so nothing accumulates).         chars = B*T
    step       one time step [B, I] -> (h, c) from a given state, effective weights computed once
               (generation).                                                           chars = B
    featurize  the paper's features (tanh of each text's final cell state) of N SST-2 sentences,
               end to end from the raw strings: preprocessed as MODEL.md says, sorted by length,
               B at a time, right-padded and run with lengths, features copied to the host.
               fastmlstm: ``fastmlstm.probe.featurize(model, texts, batch_size=B)``; the baselines
               do the same steps themselves (``Impl.featurize``).
                                                        chars = the preprocessed texts' UTF-8 bytes
    train      one full byte-LM optimizer step: embedding -> recurrence -> readout [H, 256] -> cross
               entropy, backward, Adam (lr 5e-4) over B rows of T + 1 bytes. float32 parameters;
               bfloat16/float16 means autocast (mixed precision).                      chars = B*T
"""

from __future__ import annotations

import csv
import html
import itertools
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastmlstm
from fastmlstm.lm import pad_bytes
from mlstm_eager import (EagerByteLM, EagerMLSTM, LSTMByteLM, lstm_weight_count, matched_lstm_hidden_size,
                         mlstm_cell, mlstm_sequence, mlstm_step, mlstm_weight_count)

MODES = ("fwd", "fwd+bwd", "step", "featurize", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --------------------------------------------------------------------------------------- presets
# grid: mode -> [(H, B), ...]; extra: [(mode, dtype, H, B), ...] cases outside the dtype x grid product.

_GPU_H = (1024, 2048, 4096)
PRESETS = {
    "gpu": {
        "device": "cuda", "tf32": "off", "T": 256, "I": 64, "dtypes": ("float32", "bfloat16"),
        "impls": ("fastmlstm-triton", "fastmlstm-cuda", "mlstm-eager", "mlstm-compile", "cudnn-lstm",
                  "cudnn-lstm-matched"),
        "grid": {
            "fwd": [(H, B) for H in _GPU_H for B in (1, 32, 128, 512)],
            "fwd+bwd": [(H, B) for H in _GPU_H for B in (1, 32, 128, 512)],
            "step": [(H, B) for H in _GPU_H for B in (1, 32, 128)],
            "featurize": [(H, 128) for H in _GPU_H],
            "train": [(H, 128) for H in _GPU_H],
        },
        "extra": [("fwd+bwd", "bfloat16", 1024, 64), ("fwd+bwd", "float16", 1024, 64)],
        "featurize_texts": 2000,
        "timing": {"warmup_ms": 100, "rep_ms": 500, "min_runs": 10},
        "ceilings": {"copy_mib": 1024, "matmul_n": 8192, "rep_ms": 300},
    },
    # Exactly the cases of issue 6's target table (one H100, bf16, input 64, T = 256).
    "gpu-targets": {
        "device": "cuda", "tf32": "off", "T": 256, "I": 64, "dtypes": ("bfloat16",),
        "impls": ("fastmlstm-triton", "fastmlstm-cuda", "mlstm-eager", "mlstm-compile", "cudnn-lstm",
                  "cudnn-lstm-matched"),
        "grid": {"fwd+bwd": [(4096, 128), (1024, 64)], "step": [(4096, 1)], "featurize": [(4096, 128)],
                 "train": [(4096, 128)]},
        "extra": [("fwd+bwd", "float16", 1024, 64)],
        "featurize_texts": 2000,
        "timing": {"warmup_ms": 100, "rep_ms": 500, "min_runs": 10},
        "ceilings": {"copy_mib": 1024, "matmul_n": 8192, "rep_ms": 300},
    },
    # What a 2-core CPU measures in a few minutes: the same modes at CPU-sized shapes.
    "cpu": {
        "device": "cpu", "threads": 1, "T": 64, "I": 64, "dtypes": ("float32", "bfloat16"),
        "impls": ("fastmlstm-cpu", "fastmlstm-reference", "fastmlstm-triton", "fastmlstm-cuda", "mlstm-eager",
                  "mlstm-compile", "cudnn-lstm", "cudnn-lstm-matched"),
        "grid": {
            "fwd": [(256, 16), (512, 16), (1024, 16), (512, 1), (512, 64)],
            "fwd+bwd": [(256, 16), (512, 16), (512, 1), (512, 64)],
            "step": [(256, 1), (512, 1), (1024, 1)],
            "featurize": [(256, 64)],
            "train": [(256, 16)],
        },
        "extra": [],
        "featurize_texts": 128,
        "timing": {"warmup_ms": 100, "rep_ms": 400, "min_runs": 5},
        "ceilings": {"copy_mib": 256, "matmul_n": 1024, "rep_ms": 300},
    },
    # CI: every mode and every CPU implementation at one tiny shape, in seconds.
    "tiny": {
        "device": "cpu", "threads": 1, "T": 8, "I": 8, "dtypes": ("float32",),
        "impls": ("fastmlstm-cpu", "fastmlstm-reference", "fastmlstm-triton", "mlstm-eager", "mlstm-compile",
                  "cudnn-lstm", "cudnn-lstm-matched"),
        "grid": {m: [(16, 2)] for m in MODES},
        "extra": [],
        "featurize_texts": 6,
        "compile_backend": "aot_eager",
        "timing": {"warmup_ms": 0, "rep_ms": 0, "min_runs": 3},
        "ceilings": {"copy_mib": 8, "matmul_n": 128, "rep_ms": 5},
    },
}


@dataclass(frozen=True)
class Case:
    mode: str
    dtype: str
    H: int
    B: int
    T: int
    I: int


def expand(preset: dict, modes=None, dtypes=None, Hs=None, Bs=None, T=None, I=None) -> list[Case]:
    """The preset's cases, narrowed by the command-line choices (``Hs``/``Bs`` replace its grid)."""
    modes = modes or tuple(preset["grid"])
    chosen_dtypes = dtypes
    dtypes = dtypes or preset["dtypes"]
    T = T or preset["T"]
    I = I or preset["I"]
    cases = []
    for mode in modes:
        grid = preset["grid"].get(mode, [])
        if Hs or Bs:
            Hs_ = Hs or sorted({h for h, _ in grid}) or [256]
            Bs_ = Bs or sorted({b for _, b in grid}) or [1]
            grid = [(h, b) for h in Hs_ for b in Bs_]
        cases += [Case(mode, dt, H, B, T, I) for dt in dtypes for H, B in grid]
    if not (Hs or Bs):
        cases += [Case(m, dt, H, B, T, I) for m, dt, H, B in preset.get("extra", ())
                  if m in modes and (chosen_dtypes is None or dt in chosen_dtypes)]
    seen, unique = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


# ---------------------------------------------------------------------------------- featurize data

def data_root() -> Path:
    """``$FASTMLSTM_DATA`` or the shared data folder beside the checkout (as .ci/run sets it)."""
    return Path(os.environ.get("FASTMLSTM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


try:  # the probe toolkit: what users call to featurize
    from fastmlstm.probe import featurize as probe_featurize
    from fastmlstm.probe import preprocess
except ImportError:  # a checkout from before it landed: the same steps by hand
    probe_featurize = None

    def preprocess(text: str) -> bytes:
        """MODEL.md "Featurization": HTML-unescape, newlines to spaces, strip, "\\n " + text + " "."""
        return ("\n " + html.unescape(text).replace("\n", " ").strip() + " ").encode("utf-8")


# Fitted to SST-2 train after preprocessing (6,920 sentences): ln(bytes) has mean 4.50 and standard
# deviation 0.58; lengths span 6..258 bytes (median 100).
SYNTHETIC = {"mu": 4.50, "sigma": 0.58, "min": 6, "max": 258}


def load_texts(n: int, seed: int = 0) -> tuple[list[str], dict]:
    """``n`` raw texts: a seeded sample of SST-2 train sentences, or, when the data is absent,
    synthetic printable-ASCII texts whose preprocessed lengths follow SST-2's (``SYNTHETIC``)."""
    path = data_root() / "sst2" / "train_binary_sent.csv"
    rng = random.Random(seed)
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            sentences = [row["sentence"] for row in csv.DictReader(f)]
        texts = rng.sample(sentences, min(n, len(sentences)))
        source = f"SST-2 train ({path.name}), seeded sample of {len(texts)} of {len(sentences)} sentences"
    else:
        texts = []
        for _ in range(n):
            length = int(min(SYNTHETIC["max"], max(SYNTHETIC["min"],
                                                   round(rng.lognormvariate(SYNTHETIC["mu"], SYNTHETIC["sigma"])))))
            texts.append("x" + "".join(chr(rng.randrange(33, 127)) for _ in range(length - 4)))
        source = f"synthetic (SST-2 data absent): lognormal lengths {SYNTHETIC}, printable ASCII"
    lengths = sorted(len(preprocess(t)) for t in texts)
    info = {"source": source, "n_texts": len(texts), "bytes": sum(lengths),
            "median_bytes": lengths[len(lengths) // 2] if lengths else 0, "max_bytes": lengths[-1] if lengths else 0}
    return texts, info


def batch_shapes(texts: list[str], batch: int) -> list[tuple[int, int]]:
    """(rows, steps) of each batch when the preprocessed texts are sorted longest first and taken
    ``batch`` at a time (what featurize runs)."""
    lengths = sorted((len(preprocess(t)) for t in texts), reverse=True)
    return [(len(lengths[i : i + batch]), lengths[i]) for i in range(0, len(lengths), batch)]


# ---------------------------------------------------------------------------------- cost arithmetic

def cost(family: str, mode: str, H: int, B: int, T: int, I: int, elem_bytes: int,
         batches: list[tuple[int, int]] | None = None, params: int = 0) -> tuple[float, float]:
    """(FLOPs, bytes) floor of one call, MODEL.md's arithmetic.

    Recurrent weights per step: 5H^2 (multiplicative LSTM: W_hh 4H^2 + W_hm H^2) or 4H^2 (LSTM);
    they do not stay on chip at these sizes, so every step reads them once (forward) and once more
    in the backward. FLOPs: 2 per weight per batch row per step; the backward does the forward's
    work twice (input and weight gradients). Bytes otherwise count each input and output once;
    saved activations are not counted (they are the implementation's choice), so the byte floor is
    a lower bound. featurize: per batch of b rows and t steps. train: fwd+bwd, plus the readout
    (3 x 2*T*B*H*256 FLOPs) and Adam over float32 parameters (28 bytes per parameter).
    """
    w_rec = (5 if family == "mlstm" else 4) * H * H
    w_in = (5 if family == "mlstm" else 4) * H * I
    s = elem_bytes
    if mode == "fwd":
        return 2.0 * T * B * (w_rec + w_in), s * (T * w_rec + w_in + T * B * (I + H))
    if mode == "fwd+bwd":
        return 6.0 * T * B * (w_rec + w_in), s * (2 * T * w_rec + 2 * w_in + 2 * T * B * (I + H))
    if mode == "step":
        return 2.0 * B * (w_rec + w_in), s * (w_rec + w_in + B * (I + 2 * H))
    if mode == "featurize":
        flops = sum(2.0 * b * t * w_rec for b, t in batches)
        nbytes = sum(s * t * w_rec + b * t for b, t in batches)
        return flops, nbytes
    if mode == "train":
        flops, nbytes = cost(family, "fwd+bwd", H, B, T, I, elem_bytes)
        return flops + 6.0 * T * B * H * 256, nbytes + 28.0 * params
    raise ValueError(mode)


# ---------------------------------------------------------------------------------- implementations

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
        with torch.no_grad():
            weights = layer.effective_weights()
        return lambda x, h, c: layer.step(x, (h.unsqueeze(0), c.unsqueeze(0)), weights=weights)

    def byte_lm(self, E, H, device, dtype, ctx):
        return fastmlstm.ByteLM(H, E, weight_norm=True, backend=self.backend, device=device, dtype=dtype)

    def features(self, lm, batch, lengths):
        return lm.hidden(batch, lengths=lengths)[1][1]

    def featurize_entry_point(self):
        return "fastmlstm.probe.featurize" if probe_featurize else "ByteLM.hidden + pad_bytes (no probe toolkit)"

    def featurize(self, lm, texts, batch_size):
        if probe_featurize is None:
            return super().featurize(lm, texts, batch_size)
        return probe_featurize(lm, texts, batch_size=batch_size, progress=False)

    def logits(self, lm, seq):
        return lm(seq)[0]

    def gate_runner(self, ctx):
        """(x, h0, c0, weights) -> (output, h_n, c_n) through the functional API."""
        def run(x, h0, c0, w):
            out, (h, c) = fastmlstm.multiplicative_lstm(x, *w, initial_state=(h0, c0), backend=self.backend)
            return out, h, c
        return run


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
            return lambda x, h0, c0, w: _flat(mlstm_sequence(x, h0, c0, *w, cell=cell))
        if self.compile == "unrolled":
            seq = torch.compile(mlstm_sequence, **opts)
            return lambda x, h0, c0, w: _flat(seq(x, h0, c0, *w))
        return lambda x, h0, c0, w: _flat(mlstm_sequence(x, h0, c0, *w))


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
    FastImpl("triton"), FastImpl("cuda"), FastImpl("cpu"), FastImpl("reference"),
    EagerImpl(None), EagerImpl("step"), EagerImpl("unrolled"),
    LSTMImpl(False), LSTMImpl(True),
)}
ALIASES = {"nn-lstm": "cudnn-lstm", "nn-lstm-matched": "cudnn-lstm-matched"}
BASELINE = "cudnn-lstm"  # speed-ups are over this row at the same case


def kernel_description(impl: Impl, device: torch.device) -> str:
    return impl.kernel_for(device) if isinstance(impl, LSTMImpl) else impl.kernel


# ---------------------------------------------------------------------------------- correctness gate

def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Largest allowed ||actual - truth|| / ||truth|| against float64 (METHOD.md's measure), worst
    over the output, final (h, c) and every gradient; float32 allows TF32 matmuls where they are on.

    The gate asks "is this the same function?", not "is it as accurate as it can be" (the test
    suite asks that): a wrong gate order or a missed step gives errors of order 1. Measured on the
    gate's problem (CPU): bfloat16 1.8e-2 (fastmlstm reference) and 3.0e-2 (the eager loop, whose
    cell state is bfloat16 too); float16 1.7e-3 and 2.6e-3; float32 under 1e-6.
    ``fastmlstm.cli.self_check`` (max difference over max magnitude, against the reference backend
    in the same dtype) gets the same bound.
    """
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return 5e-3 if tf32 else 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


def _rel_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    if actual.shape != truth.shape or not torch.isfinite(actual).all():
        return math.inf
    return ((actual - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def _flat(result):
    out, (h, c) = result
    return out, h, c


def check(impl: Impl, dtype: torch.dtype, device: torch.device, ctx: dict) -> dict:
    """The gate: outputs, final states and the gradients of the input, the initial state and every
    weight on a small problem against the float64 loop, within ``tolerance``; for fastmlstm also
    ``fastmlstm.cli.self_check`` (weight norm and ragged lengths, against the reference backend)."""
    T, B, I, H = 7, 3, 5, 20
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    bound = 1 / math.sqrt(H)
    weights = [rand(4 * H, I, scale=bound * 2), rand(4 * H, H, scale=bound * 2), rand(H, I, scale=bound * 2),
               rand(H, H, scale=bound * 2), rand(4 * H, scale=bound)]
    x, h0, c0 = rand(T, B, I), rand(B, H, scale=0.5), rand(B, H, scale=0.5)
    g_out, g_h, g_c = rand(T, B, H), rand(B, H), rand(B, H)
    # The truth sees the same dtype-rounded inputs, so only the arithmetic is judged.
    inputs = [t.to(dtype).double() for t in (x, h0, c0, *weights)]
    x, h0, c0 = inputs[:3]
    weights = inputs[3:]

    def run(fn, dt, dev):
        leaves = [t.to(dev, dt).requires_grad_() for t in inputs]
        out, h, c = fn(leaves[0], leaves[1], leaves[2], leaves[3:])
        loss = ((out.double() * g_out.to(dev)).sum() + (h.double() * g_h.to(dev)).sum()
                + (c.double() * g_c.to(dev)).sum())
        grads = torch.autograd.grad(loss, leaves)
        return [out, h, c, *grads]

    names = ["output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0", "grad_weight_ih", "grad_weight_hh",
             "grad_weight_im", "grad_weight_hm", "grad_bias"]
    truth = run(lambda x, h0, c0, w: _flat(mlstm_sequence(x, h0, c0, *w)), torch.float64, torch.device("cpu"))
    result = {"impl": impl.name, "dtype": str(dtype).removeprefix("torch."), "tolerance": tolerance(dtype, device),
              "shape": {"T": T, "B": B, "I": I, "H": H}}
    try:
        actual = run(impl.gate_runner(ctx), dtype, device)
        errors = {n: _rel_err(a, t) for n, a, t in zip(names, actual, truth)}
        if isinstance(impl, EagerImpl) and impl.compile == "step":
            step = torch.compile(mlstm_step, fullgraph=True, backend=ctx["compile_backend"], dynamic=False)
            w = [t.to(device, dtype) for t in weights]
            with torch.no_grad():
                h1, c1 = step(x[0].to(device, dtype), h0.to(device, dtype), c0.to(device, dtype), *w)
                th, tc = mlstm_step(x[0], h0, c0, *weights)
            errors["step_h"], errors["step_c"] = _rel_err(h1, th), _rel_err(c1, tc)
        if isinstance(impl, FastImpl):
            from fastmlstm.cli import self_check

            errors["self_check_vs_reference"] = self_check(device, impl.backend, dtype)
    except Exception as exc:  # a crash fails the gate like a wrong number does
        result.update(passed=False, error=f"{type(exc).__name__}: {exc}")
        return result
    worst = max(errors, key=errors.get)
    result.update(passed=errors[worst] <= result["tolerance"], max_rel_err=errors[worst], worst=worst,
                  errors={k: float(f"{v:.3g}") for k, v in errors.items()})
    return result
