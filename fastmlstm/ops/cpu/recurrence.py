"""The CPU backend's forward and backward: the contract of :mod:`fastmlstm.ops.interface` on top of the
extension's operators ``torch.ops.fastmlstm_cpu.*`` (``csrc/cpu/mlstm_cpu.cpp``).

The C++ side checks every input strictly and runs the time loops; this layer packs the recurrent
weights into the blocked layouts the loops read (once per weight: the packed copies are kept in the
backends' weight cache, :mod:`fastmlstm.ops.weight_cache`, while the weight tensor lives unchanged,
so a generation loop or a featurize pass that reuses one set of effective weights packs them once)
and chooses the GEMM operand dtype.

GEMM operands: float32 in general (16-bit weights are widened once, when packed; 16-bit
activations are exact in float32); bfloat16 itself where the CPU multiplies bfloat16 natively
(AVX-512-BF16 or AMX, checked numerically once by :func:`native_bf16`), on VNNI-packed weights,
which the portable twin of those micro-kernels also reads on any CPU (:func:`bf16_gemm`); and, for
16-bit weights and
batches of at most ``NARROW_MAX_ROWS`` rows (generation), the weights kept in their 16-bit dtype and
widened in registers, since reading them is then the whole cost. Every product accumulates in
float32: the same numbers, only the summation order differs.

Dimension letters: T time, B batch, H hidden.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os

import torch

from ...errors import InputError
from .. import interface
from ..weight_cache import derived, forget_trainable
from .buffer_cache import apply_limit, limit_bytes
from .build import load_library

__all__ = ["forward", "backward", "layout", "native_bf16", "bf16_gemm", "forced_bf16_gemm", "BF16_GEMMS",
           "float32_micro_kernels", "kernel_isa", "kernel_isas", "forced_kernel_isa", "forced_k_split", "forced_weight_grad_gemm", "WEIGHT_GRAD_GEMMS", "column_block", "kernel_report", "fingerprint",
           "fingerprints", "prepare_sequence_step"]

logger = logging.getLogger("fastmlstm")


def _ops():
    load_library()
    apply_limit()
    if not _fork_guard:
        _guard_forks()
    return torch.ops.fastmlstm_cpu


# Whether _one_thread_after_fork is registered (once, on the backend's first use in this process).
_fork_guard = False


def _guard_forks() -> None:
    """Have every child this process forks from now on run torch's loops on one thread (see
    :func:`_one_thread_after_fork`), where torch's parallel backend is OpenMP."""
    global _fork_guard
    _fork_guard = True
    if hasattr(os, "register_at_fork") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        os.register_at_fork(after_in_child=_one_thread_after_fork)


def _one_thread_after_fork() -> None:
    """In a child forked after this backend ran (``multiprocessing``'s 'fork' start method, a
    DataLoader worker): one thread for torch's parallel loops, as the DataLoader sets in its workers.
    GNU OpenMP's threads do not survive a fork, and it does not notice: the child's first parallel
    loop (this backend's, or any torch operator's) waited forever for the parent's threads. The
    results are the same on one thread, bit for bit (driver.h, "RowGroup")."""
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        logger.info("fastmlstm: a process forked after the cpu backend ran uses one thread (torch.set_num_threads"
                    "(1)): OpenMP's threads do not survive a fork; the 'spawn' start method keeps them all")


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether bfloat16 recurrences multiply bfloat16 weights natively (AVX-512-BF16 or AMX, with
    oneDNN's micro-kernels, checked on a small problem), rather than float32 copies of them."""
    cpu = torch.cpu
    has_isa = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        cpu, "_is_amx_tile_supported", lambda: False)()
    if not (has_isa and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    ok = bool(_ops().bf16_gemm_works(False))
    if not ok:
        logger.info("fastmlstm: this CPU has bfloat16 instructions but the native bfloat16 GEMM check failed; "
                    "bfloat16 recurrences multiply float32 copies of the weights")
    return ok


# How bfloat16 recurrences multiply: "native" (VNNI-packed bfloat16 weights, the CPU's bfloat16 dot
# products through oneDNN), "portable" (the same VNNI-packed weights through the portable twin of
# those micro-kernels, csrc/cpu/mlstm_cpu.h: same layout, same products, float32 sums; runs on every
# CPU, so the tests check the VNNI path everywhere) or "float32" (float32 copies of the weights).
BF16_GEMMS = ("native", "portable", "float32")
_forced_bf16_gemm: str | None = None


ENV_BF16_GEMM = "FASTMLSTM_CPU_BF16"


@functools.lru_cache(maxsize=None)
def _env_bf16_gemm(value: str) -> str | None:
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BF16_GEMMS:
        raise InputError(f"{ENV_BF16_GEMM} must be one of auto, {', '.join(BF16_GEMMS)}; got {value!r}")
    if value == "native" and not native_bf16():
        logger.warning("fastmlstm: %s=native, but this CPU has no native bfloat16 GEMM; using float32 copies",
                       ENV_BF16_GEMM)
        return "float32"
    return value


def bf16_gemm() -> str:
    """The bfloat16 GEMM in use: :func:`forced_bf16_gemm`'s, else ``$FASTMLSTM_CPU_BF16``'s, else
    ``"native"`` where :func:`native_bf16` and ``"float32"`` elsewhere."""
    if _forced_bf16_gemm is not None:
        return _forced_bf16_gemm
    forced = _env_bf16_gemm(os.environ.get(ENV_BF16_GEMM, ""))
    if forced is not None:
        return forced
    return "native" if native_bf16() else "float32"


@contextlib.contextmanager
def forced_bf16_gemm(mode: str):
    """Run bfloat16 recurrences with ``mode`` (one of :data:`BF16_GEMMS`) inside the block; for tests
    and benchmarks. ``"native"`` is refused where the CPU cannot run it."""
    global _forced_bf16_gemm
    if mode not in BF16_GEMMS:
        raise ValueError(f"bf16 GEMM must be one of {BF16_GEMMS}, got {mode!r}")
    if mode == "native" and not native_bf16():
        raise RuntimeError("this CPU has no native bfloat16 GEMM (AVX-512-BF16 or AMX with oneDNN)")
    previous, _forced_bf16_gemm = _forced_bf16_gemm, mode
    try:
        yield
    finally:
        _forced_bf16_gemm = previous


def portable_bf16() -> bool:
    """Whether VNNI-packed weights go through the portable twin (the ops' ``portable_bf16``)."""
    return bf16_gemm() == "portable"


# The extension's setting as last read (an operator call costs about 2 us, and every forward asks
# for it per packed weight): only forced_kernel_isa changes it, and it forgets this copy when it does.
_kernel_isa: str | None = None


def kernel_isa() -> str:
    """The instruction set of the fused epilogues in use: ``"avx512"``, ``"avx2"`` or ``"default"``
    (the portable copy): the best one this CPU runs, as far as ATen runs it too
    (``ATEN_CPU_CAPABILITY`` lowers it), unless :func:`forced_kernel_isa` chose another."""
    global _kernel_isa
    if _kernel_isa is None:
        _kernel_isa = str(_ops().kernel_isa())
    return _kernel_isa


def kernel_isas() -> tuple[str, ...]:
    """The instruction sets of the epilogues this CPU can run, best first (``"default"`` last)."""
    return tuple(_ops().kernel_isas())


@contextlib.contextmanager
def forced_kernel_isa(isa: str):
    """Run the epilogues with ``isa`` (one of :func:`kernel_isas`) inside the block; for tests and
    benchmarks that compare the copies in one process."""
    global _kernel_isa
    ops = _ops()
    if isa not in kernel_isas():
        raise ValueError(f"kernel instruction set must be one of {kernel_isas()} on this CPU, got {isa!r}")
    previous = kernel_isa()
    try:
        _kernel_isa = None
        ops.set_kernel_isa(isa)
        yield
    finally:
        _kernel_isa = None
        ops.set_kernel_isa(previous)


@contextlib.contextmanager
def forced_k_split(whole_bytes: int, piece_bytes: int):
    """Split the tile GEMMs' K ranges as ``csrc/cpu/driver.h`` (``k_piece``) does, but with these
    limits (bytes of a row of A: kept whole up to ``whole_bytes``, else pieces of at most
    ``piece_bytes``) inside the block; for tests that reach the split at small shapes and
    benchmarks that compare splits in one process."""
    if whole_bytes < 1 or piece_bytes < 1:
        raise ValueError(f"K split limits must be >= 1 byte, got {whole_bytes}, {piece_bytes}")
    ops = _ops()
    previous = ops.set_k_split(whole_bytes, piece_bytes)
    try:
        yield
    finally:
        ops.set_k_split(*previous)


WEIGHT_GRAD_GEMMS = ("auto", "mkl", "tiles")


@contextlib.contextmanager
def forced_weight_grad_gemm(mode: str):
    """Run the backward's float32 GEMMs beside the time loop (the weight gradients and x's gradient;
    the forward's xm is always tiles, so that a row never depends on the rows beside it) with
    ``mode`` inside the block: ``"mkl"`` (MKL's GEMM on the
    operands as they are), ``"tiles"`` (oneDNN's micro-kernels, the weight gradients' operands laid
    out for them, ``csrc/cpu/gemm.cpp``) or ``"auto"`` (tiles where the AVX-512 epilogues run); for
    tests and benchmarks that compare them in one process."""
    if mode not in WEIGHT_GRAD_GEMMS:
        raise ValueError(f"the weight-gradient GEMM must be one of {WEIGHT_GRAD_GEMMS}, got {mode!r}")
    ops = _ops()
    previous = ops.set_weight_grad_gemm(WEIGHT_GRAD_GEMMS.index(mode))
    try:
        yield
    finally:
        ops.set_weight_grad_gemm(previous)


# oneDNN's instruction sets, lowest first, as far as the micro-kernels here tell them apart, and
# how its ONEDNN_MAX_CPU_ISA (formerly DNNL_MAX_CPU_ISA) names cap them.
_ONEDNN_ISAS = ("none", "avx2", "avx512_core", "avx512_core_bf16", "avx512_core_amx")
_ONEDNN_CAPS = {"SSE41": "none", "AVX": "none", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
                "AVX512_CORE": "avx512_core", "AVX512_CORE_VNNI": "avx512_core",
                "AVX512_CORE_BF16": "avx512_core_bf16", "AVX512_CORE_FP16": "avx512_core_bf16"}


def _onednn_cpu_isa() -> str:
    """The instruction set oneDNN's micro-kernels use here (the one oneDNN itself picks: AMX tiles,
    then AVX-512 with bfloat16 dot products, then AVX-512, AVX2; capped by ONEDNN_MAX_CPU_ISA), or
    ``"none"`` where ATen's ``cpublas::brgemm`` does not call them: no x86-64 CPU with AVX2, or
    oneDNN not built in or disabled (``torch.backends.mkldnn``). Then its float32 tile GEMMs fall
    back to ATen's gemm (BLAS)."""
    cpu = torch.cpu
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and getattr(cpu, "_is_avx2_supported", lambda: False)()):
        return "none"
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        found = "avx512_core_amx"
    elif getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        found = "avx512_core_bf16"
    else:
        found = "avx512_core" if getattr(cpu, "_is_avx512_supported", lambda: False)() else "avx2"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    cap = _ONEDNN_CAPS.get(cap, found) if not cap.startswith("AVX512_CORE_AMX") else found
    return min(found, cap, key=_ONEDNN_ISAS.index)


def float32_micro_kernels() -> bool:
    """Whether the loops' float32 tile GEMMs run on oneDNN's micro-kernels (:func:`_onednn_cpu_isa`).
    Their sums run over k in an order that does not depend on the rows of a tile, so results do not
    change with the thread count or with how a sequence is cut into calls, bit for bit; ATen's gemm
    fallback (BLAS: other CPUs, or oneDNN disabled) may choose its kernels by the rows, and then such
    results agree to float32 rounding only."""
    return _onednn_cpu_isa() != "none"


def kernel_report() -> dict:
    """What the CPU backend runs on this machine, for ``fastmlstm.diagnostics.environment()`` (and so
    ``fastmlstm info``): the epilogues' instruction set (:func:`kernel_isa`) and the others this CPU
    can run, the packed weights' column blocks, which micro-kernels multiply float32 and bfloat16
    operands, how the backward's float32 GEMMs beside the time loop run (the weight gradients and x's
    gradient: ``"tiles"`` or ``"mkl"``, :func:`forced_weight_grad_gemm`), the tile GEMMs' K split in bytes
    of a row of A (``[whole, piece]``, :func:`forced_k_split`), and the buffer cache's limit and what
    it holds (:mod:`.buffer_cache`).

    Example::

        >>> kernel_report()["epilogues"] in ("avx512", "avx2", "default")
        True
    """
    isa = _onednn_cpu_isa()
    mode = bf16_gemm()
    bf16_kernels = {
        "native": f"oneDNN brgemm ({'AMX tiles' if isa == 'avx512_core_amx' else 'AVX-512-BF16 dot products'})",
        "portable": "portable twin of the native micro-kernels (scalar, same VNNI layout)",
        "float32": "float32 GEMMs on float32 copies of the weights",
    }[mode]
    return {
        "epilogues": kernel_isa(),
        "epilogues_available": list(kernel_isas()),
        "column_block": {"gates": column_block("hh"), "other": column_block("hm")},
        "float32_gemm": f"oneDNN brgemm ({isa})" if isa != "none" else "ATen gemm (BLAS)",
        "bf16_gemm": mode,
        "bf16_gemm_kernels": bf16_kernels,
        "weight_grad_gemm": str(_ops().weight_grad_gemm()),
        "k_split_bytes": [int(v) for v in _ops().k_split()],
        "onednn_isa": isa,
        "streamed_rows": {"max_rows": STREAM_MAX_ROWS, "from_MiB": round(STREAM_MIN_BYTES / 2**20, 1)},
        "buffer_cache_MiB": {"limit": round(limit_bytes() / 2**20, 1),
                             "held": round(_ops().buffer_cache_bytes() / 2**20, 1)},
    }


def fingerprint(tensor: torch.Tensor) -> int:
    """A 64-bit fingerprint of a contiguous CPU tensor's bytes (see mlstm_cpu.h)."""
    return int(_ops().fingerprint(tensor))


def fingerprints(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """:func:`fingerprint` of each tensor, in one call."""
    return tuple(_ops().fingerprints(tensors))


# Packed layouts (csrc/cpu/driver.h, "Packed weights"): float32 blocks for oneDNN's float32
# micro-kernels, VNNI bfloat16 blocks for native bfloat16 ones, and blocks in the weights' own 16-bit
# dtype for small batches (generation), where reading the weights is the whole cost.
FLOAT32, VNNI, NARROW = 0, 1, 2
# Batches up to this size read 16-bit weights as they are (half the bytes of float32 copies).
NARROW_MAX_ROWS = 4


# At one to three batch rows a step reads every weight once and does little with it: once the
# recurrent weights (5 H^2 bfloat16 values) outgrow the last-level cache, the step is a read of them
# from memory, which the narrow kernel (small_gemm) does faster than oneDNN's VNNI micro-kernel at so
# few rows (0.58-0.93x the step's time at H = 2048-4096 past a 32 MiB L3, 0.93-1.18x at four rows;
# bfloat16 generation 0.81-0.82x at H = 2048 and 4096; in the cache, 1.12-1.56x: narrow is slower
# there): bench/kernels/NOTES-cpu.md, "A few rows from memory".
STREAM_MAX_ROWS = 3


def last_level_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache", default: int = 32 << 20) -> int:
    """The size of the largest CPU cache Linux reports for CPU 0 (``index*/size``, e.g. ``32768K``),
    or ``default`` where it reports none (other systems, containers without /sys)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for index in sorted(glob.glob(os.path.join(cache_dir, "index*"))):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip().upper()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=0) or default


# Recurrent weights of this many bytes or more are read from memory at every step.
STREAM_MIN_BYTES = last_level_cache_bytes()


def layout(dtype: torch.dtype, rows: int, *ks: int, backward: bool = False) -> int:
    """The packed layout of the weights for activations of ``dtype``, ``rows`` batch rows, and GEMMs
    with inner dimensions ``ks`` (the first is H)."""
    streamed = rows <= STREAM_MAX_ROWS and not backward and 10 * ks[0] ** 2 >= STREAM_MIN_BYTES
    if dtype == torch.bfloat16 and all(k % 2 == 0 for k in ks) and bf16_gemm() != "float32" and not streamed:
        return VNNI
    if dtype != torch.float32 and rows <= NARROW_MAX_ROWS and not backward:
        return NARROW
    return FLOAT32


# Columns per packed block (csrc/cpu/driver.h, "Packed weights"). The gate weight's blocks hold
# cols / 4 hidden units of each gate: 64 columns where the epilogues run on AVX-512 (whole 16-float
# vectors per gate), 32 elsewhere (AVX2's 8-float vectors). The other weights' epilogues read whole
# vectors either way, and their narrower blocks stay in L2 beside the rows they multiply at large K
# (the backward's Wh^T has K = 4H).
WIDE_COLUMNS, NARROW_COLUMNS = 64, 32


def column_block(kind: str = "hh") -> int:
    """The width of the column blocks of a packed weight of ``kind`` (see :func:`_packed`) for the
    epilogues in use (:func:`kernel_isa`)."""
    return WIDE_COLUMNS if kind == "hh" and kernel_isa() == "avx512" else NARROW_COLUMNS


def _packed(weight: torch.Tensor, kind: str, layout: int = FLOAT32,
            input_weight: torch.Tensor | None = None) -> torch.Tensor:
    """A weight as the loops read it: ``"hh"`` z = m Wh^T (gate-interleaved blocks; with
    ``input_weight`` = Wx, [Wh | Wx] for z = [m | x] [Wh | Wx]^T), ``"hm"`` hm = h Wmh^T, for the
    backward ``"hh_t"``, ``"hm_t"`` (the transposed weights: rec = dhm Wmh, dm = dz Wh), and
    ``"xm"``: Wmx^T [I, H] for the xm GEMMs, float32, or bfloat16 in the VNNI layout (the loops'
    GEMMs multiply bfloat16 natively there, and so does the xm GEMM). Packed once while the weights
    are unchanged. A backward's packs (``"hh_t"``, ``"hm_t"``) first drop whatever was derived from
    weights that require grad: the optimizer step that follows may write them through ``.data``,
    which no version counter sees (:func:`fastmlstm.ops.weight_cache.forget_trainable`)."""
    weights = (weight,) if input_weight is None else (weight, input_weight)
    cols = column_block(kind)
    if kind.endswith("_t") and weight.requires_grad:
        forget_trainable()

    def pack() -> torch.Tensor:
        ops = _ops()
        with torch.no_grad():
            if kind == "hh":
                return ops.pack_weight(weight, True, layout, input_weight, False, cols)  # [Wh | Wx], no copy
            if kind == "hm":
                return ops.pack_weight(weight, False, layout, None, False, cols)
            if kind == "xm":
                return (weight if layout == VNNI else weight.float()).t().contiguous()
            return ops.pack_weight(weight, False, layout, None, True, cols)  # weight^T, read in place

    return derived(weights, ("cpu", kind, layout, cols), pack)


def _dense(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` contiguous (and in ``dtype``): itself when it already is, without the two operator
    calls (a good part of a generation step at small sizes)."""
    if (dtype is None or t.dtype == dtype) and t.is_contiguous():
        return t
    return (t if dtype is None else t.to(dtype)).contiguous()


def _optional(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    ops = _ops()
    H = weight_hm.shape[0]
    lay = layout(proj.dtype, proj.shape[1], H)
    # The operators have no autograd formula of their own: they run below autograd (op.py's custom
    # op owns the backward), so they are always called without recording a graph.
    with torch.no_grad():
        return tuple(ops.forward(
            _dense(proj), _packed(weight_hh, "hh", lay), _packed(weight_hm, "hm", lay),
            _dense(h0, torch.float32), _dense(c0, torch.float32), None if lengths is None else lengths.contiguous(),
            bool(save_for_backward), bool(return_cell_states), interface.POISON_BUFFERS, portable_bf16(),
        ))


def prepare_sequence_step(weight_hh, weight_hm, B: int):
    """:func:`forward` for one step of B rows without autograd, its packed weights bound once:
    ``step(proj [1, B, 5H], h0, c0) -> (output [1, B, H], c_n [B, H])`` on contiguous inputs (h0
    and c0 float32; the operator checks shapes and dtypes). Valid while the weights are unchanged:
    the layout, the bfloat16 GEMM mode and the epilogues are those of the call that prepared it (a
    generation loop prepares it per call)."""
    ops = _ops()
    lay = layout(weight_hm.dtype, B, weight_hm.shape[0])
    hh, hm = _packed(weight_hh, "hh", lay), _packed(weight_hm, "hm", lay)
    portable, poison = portable_bf16(), interface.POISON_BUFFERS

    def step(proj, h0, c0):
        output, c_n, _, _ = ops.forward(proj, hh, hm, h0, c0, None, False, False, poison, portable)
        return output, c_n

    return step


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    ops = _ops()
    dtype = output.dtype
    lay = layout(dtype, output.shape[1], weight_hm.shape[0], backward=True)
    with torch.no_grad():
        return tuple(ops.backward(
            _optional(grad_output, dtype), _optional(grad_c_n, torch.float32),
            _optional(grad_cell_states, torch.float32),
            _packed(weight_hh, "hh_t", lay), _packed(weight_hm, "hm_t", lay), h0.float().contiguous(),
            c0.float().contiguous(), None if lengths is None else lengths.contiguous(), output.contiguous(),
            cell_states.contiguous(), act.contiguous(), interface.POISON_BUFFERS, portable_bf16(),
        ))
