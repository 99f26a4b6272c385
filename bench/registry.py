"""The benchmark's registry: modes, dtypes, presets of shapes and the cases they expand to.

Dimension letters: T time steps, B batch (texts per batch for ``featurize``), I input size (the
byte-embedding size E for ``featurize`` and ``train``), H hidden size.

Modes (``chars`` is what ``chars_per_s`` counts):
    fwd        inference forward over [T, B, I] from a given (h0, c0), no autograd.   chars = B*T
    fwd+bwd    forward, then the gradients of the input and every parameter for a given
               output gradient (torch.autograd.grad, so nothing accumulates).         chars = B*T
    step       one time step [B, I] -> (h, c) from a given state, through the module as a
               generation loop calls it (fastmlstm on a GPU: effective weights computed once and
               passed as ``weights=``; on a CPU: no ``weights=``, the module's weight cache).  chars = B
    featurize  the paper's features (tanh of each text's final cell state) of N SST-2 sentences,
               end to end from the raw strings: preprocessed as MODEL.md says, sorted by length,
               B at a time, right-padded and run with lengths, features copied to the host.
               fastmlstm: ``fastmlstm.probe.featurize(model, texts, batch_size=B)``; the baselines
               do the same steps themselves (``impls.Impl.featurize``). ``fastmlstm-cpu-forward``
               is the bare forward over the same padded batches (prepared once, untimed), the
               floor featurize is held to.
                                                        chars = the preprocessed texts' UTF-8 bytes
    train      one full byte-LM optimizer step: embedding -> recurrence -> readout [H, 256] -> cross
               entropy, backward, Adam (lr 5e-4) over B rows of T + 1 bytes. float32 parameters;
               bfloat16/float16 means autocast (mixed precision).                      chars = B*T

The other roles: ``impls`` (the implementations and how each case is built), ``gate`` (the
correctness gate), ``workload`` (featurize texts and the cost arithmetic), ``measure`` (timing,
memory, ceilings), ``report`` (Markdown, plots, the section of docs/benchmarks.md), ``run`` (the
command line).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("fwd", "fwd+bwd", "step", "featurize", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# grid: mode -> [(H, B), ...]; extra: [(mode, dtype, H, B), ...] cases outside the dtype x grid product.

_GPU_H = (1024, 2048, 4096)
_CPU_H = (256, 512, 1024)
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
    # The CPU targets' grid: H in {256, 512, 1024}, B in {16, 64} for every sequence mode, the B = 1
    # step, float32 and bfloat16, one thread. Only the implementations the targets compare (the
    # reference loop as the "before"); mlstm-eager/-compile are one --impls away.
    "cpu": {
        "device": "cpu", "threads": 1, "T": 64, "I": 64, "dtypes": ("float32", "bfloat16"),
        "impls": ("fastmlstm-cpu", "fastmlstm-cpu-forward", "fastmlstm-reference", "cudnn-lstm",
                  "cudnn-lstm-matched"),
        "grid": {
            "fwd": [(H, B) for H in _CPU_H for B in (16, 64)],
            "fwd+bwd": [(H, B) for H in _CPU_H for B in (16, 64)],
            "step": [(H, 1) for H in _CPU_H],
            "featurize": [(H, B) for H in _CPU_H for B in (16, 64)],
            "train": [(H, B) for H in _CPU_H for B in (16, 64)],
        },
        "extra": [],
        # The reference loop is the "before" in float32; a 16-bit nn-lstm is timed only where the CPU
        # has a native path (impls.LSTMImpl.case_status).
        "impl_dtypes": {"fastmlstm-reference": ("float32",)},
        "featurize_texts": 128,
        "timing": {"warmup_ms": 100, "rep_ms": 400, "min_runs": 3},
        "ceilings": {"copy_mib": 256, "matmul_n": 1024, "rep_ms": 300},
    },
    # Issue 24's "done when" grid: H in {512, 1024}, B in {16, 64} for every sequence mode, the B = 1
    # step, float32 and bfloat16, two threads; and the released model's size (H = 4096) in featurize,
    # whose fraction of the machine's own GEMM rate at the step's shape is the roofline target
    # (run.py's step_gemm). `ratio_targets` are judged by run.py at the end of the run.
    "cpu-targets": {
        "device": "cpu", "threads": 2, "interleave": True, "T": 64, "I": 64, "dtypes": ("float32", "bfloat16"),
        "impls": ("fastmlstm-cpu", "cudnn-lstm"),
        "grid": {
            "fwd": [(H, B) for H in (512, 1024) for B in (16, 64)],
            "fwd+bwd": [(H, B) for H in (512, 1024) for B in (16, 64)],
            "step": [(H, 1) for H in (512, 1024)],
            "featurize": [(H, B) for H in (512, 1024) for B in (16, 64)],
            "train": [(H, B) for H in (512, 1024) for B in (16, 64)],
        },
        "extra": [("featurize", dt, 4096, 64) for dt in ("float32", "bfloat16")],
        # The H = 4096 featurize is held to the GEMM roofline, not to nn.LSTM (minutes per call there).
        "impl_max_H": {"cudnn-lstm": {"featurize": 1024}},
        "featurize_texts": 128,
        "timing": {"warmup_ms": 100, "rep_ms": 400, "min_runs": 3},
        "ceilings": {"copy_mib": 256, "matmul_n": 1024, "rep_ms": 300},
        "ratio_targets": [
            # (name, mode, (impl, dtype) timed, (impl, dtype) compared with, limit on the time ratio)
            ("fwd fp32 <= 1.1x nn.LSTM", "fwd", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"), 1.1),
            ("fwd+bwd fp32 <= 1.25x nn.LSTM", "fwd+bwd", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"),
             1.25),
            ("train step fp32 <= 1.25x nn.LSTM", "train", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"),
             1.25),
            ("featurize fp32 <= 1.0x nn.LSTM", "featurize", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"),
             1.0),
            ("step B=1 fp32 <= 0.5x nn.LSTM", "step", ("fastmlstm-cpu", "float32"), ("nn-lstm", "float32"), 0.5),
            ("own bf16 fwd <= 0.75x own fp32 (bf16 dot products)", "fwd", ("fastmlstm-cpu", "bfloat16"),
             ("fastmlstm-cpu", "float32"), 0.75),
            ("fwd bf16 <= 1.25x nn.LSTM bf16 (native oneDNN)", "fwd", ("fastmlstm-cpu", "bfloat16"),
             ("nn-lstm", "bfloat16"), 1.25),
        ],
        "roofline_targets": [("featurize H=4096 >= 50% of the step GEMM's rate", "featurize", 4096, 0.5)],
    },
    # CI: every mode and every CPU implementation at one tiny shape, in seconds.
    "tiny": {
        "device": "cpu", "threads": 1, "T": 8, "I": 8, "dtypes": ("float32",),
        "impls": ("fastmlstm-cpu", "fastmlstm-cpu-forward", "fastmlstm-reference", "fastmlstm-triton",
                  "mlstm-eager", "mlstm-compile", "cudnn-lstm", "cudnn-lstm-matched"),
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


