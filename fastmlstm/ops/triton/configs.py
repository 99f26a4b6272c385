"""Launch configurations of the fused step kernels: the dispatch rule, the tuned table measured on
GPUs, and an override for tests.

Dimension letters: B batch rows, H hidden units; a config's BB (rows), BN (hidden units) and BK
(reduction block) are the kernels' tile sizes (legend in :mod:`.fused_step`), ``split`` the number
of programs that share an output tile (split-K), ``pdl`` programmatic dependent launch.

Every launch configuration the backend can use comes from :func:`plan`, in this order:

1. an override installed with :func:`override` (tests, the GPU sweep);
2. under Triton's interpreter, small tiles (the interpreter runs programs one after another);
3. the tuned table (:mod:`.tuned`, written by ``bench/kernels/gpu_check.sh`` from a correctness-gated
   sweep on a real GPU), for the device name, dtype, precision and shape it was measured at;
4. the rule :func:`rule`, derived from the cost model in ``bench/kernels/costmodel.py`` (reasoning in
   ``bench/kernels/NOTES.md``).

The sweep's candidates and the dispatch space (every config the rule or a tuned table can produce)
live with the kernel lab, in ``bench/kernels/sweep.py``: ``bench/kernels/static.py`` compiles each
config of the space ahead of time, the test suite runs each under the interpreter, and the sweep
writes (and the tests check) only tuned entries from the space. At run time :func:`validate_entry`
checks an entry's form.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import NamedTuple

KERNELS = ("fwd_m", "fwd_z", "bwd_h", "bwd_m")
# Kernels whose output tile covers BN units of all four gates (4 BN columns of the [B, 4H] gates).
GATE_KERNELS = ("fwd_z",)
# Reduction length of each kernel's product, in units of H.
K_OF = {"fwd_m": 1, "fwd_z": 1, "bwd_h": 1, "bwd_m": 4}
PRECISIONS = ("ieee", "tf32")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Every launch and ahead-of-time compile asks for floating-point contraction (a * b + c as one FMA)
# explicitly: the kernels were tested with it, Triton 3.9's default, and Triton 3.10 turns the
# default off (3.9 warns about the change on every compile that leaves it unset).
FP_FUSION = True


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How one kernel is launched. ``BB``, ``BN``, ``BK``, ``num_warps``, ``num_stages`` and ``pdl``
    select a compiled variant; ``split`` is a runtime argument (how many programs share a tile)."""

    BB: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    split: int = 1
    pdl: bool = False

    def __post_init__(self):
        for name in ("BB", "BN", "BK"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must lie in [1, 8], got {self.num_stages}")
        if self.split < 1:
            raise ValueError(f"split must be >= 1, got {self.split}")

    def compiled(self) -> KernelConfig:
        """The compile-time part: ``split`` only matters as 1 (no partials) or more."""
        return dataclasses.replace(self, split=1 if self.split == 1 else 2)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Device(NamedTuple):
    """What the rule needs to know about the GPU: multiprocessors, compute capability, name."""

    sms: int
    capability: tuple[int, int]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One config per kernel for a given (B, H, dtype, precision) on a given device."""

    fwd_m: KernelConfig
    fwd_z: KernelConfig
    bwd_h: KernelConfig
    bwd_m: KernelConfig
    source: str = "rule"

    def __getitem__(self, kernel: str) -> KernelConfig:
        return getattr(self, kernel)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tiles(kernel: str, B: int, H: int, config: KernelConfig) -> tuple[int, int]:
    """(hidden tiles, batch tiles) of a launch."""
    return math.ceil(H / config.BN), math.ceil(B / config.BB)


def k_blocks(kernel: str, H: int, config: KernelConfig) -> int:
    return math.ceil(K_OF[kernel] * H / config.BK)


# bwd_h's epilogue keeps about a dozen float32 tiles alive: at most this many values per thread
# per tile, or the tile goes through the workspace and the epilogue runs over column chunks.
_EPILOGUE_VALUES_PER_THREAD = 8


def uses_workspace(kernel: str, config: KernelConfig) -> bool:
    """Whether a launch writes partial tiles: split-K, or bwd_h with a tile too big for its epilogue."""
    if config.split > 1:
        return True
    return kernel == "bwd_h" and config.BB * config.BN > _EPILOGUE_VALUES_PER_THREAD * 32 * config.num_warps


def epilogue_width(kernel: str, config: KernelConfig) -> int | None:
    """bwd_h's epilogue column chunk (the whole tile when it stays in registers); None for the
    kernels whose epilogue always takes the whole tile."""
    if kernel != "bwd_h":
        return None
    if not uses_workspace(kernel, config):
        return config.BN
    # BB * width / (32 * num_warps) <= 8; all three are powers of two, so the width is one too.
    return max(16, min(config.BN, _EPILOGUE_VALUES_PER_THREAD * 32 * config.num_warps // config.BB))


# Values per thread the partial loads of one _gather round may hold (float32, beside everything the
# epilogue keeps): up to 4 partials at once where a tile is small, one where it is big. Half that
# at 16 warps, whose threads have at most 128 registers.
_GATHER_VALUES_PER_THREAD = 32


def gather_unroll(kernel: str, config: KernelConfig) -> int:
    """How many split partials the epilogue loads at once (1, 2 or 4; the kernels' GATHER): their
    L2 latencies overlap instead of adding up. 1 without a workspace (nothing to gather)."""
    if not uses_workspace(kernel, config):
        return 1
    width = epilogue_width(kernel, config) or config.BN
    per_thread = max(1, config.BB * width // (32 * config.num_warps))
    budget = _GATHER_VALUES_PER_THREAD // (2 if config.num_warps >= 16 else 1)
    fits = budget // per_thread
    return 4 if fits >= 4 else 2 if fits >= 2 else 1


def split_for(kernel: str, B: int, H: int, config: KernelConfig, target_programs: int) -> int:
    """Splits that bring the grid to about ``target_programs``: never more than the K blocks (an
    empty split is wasted), never more than 16 (each split adds a partial tile to write and read)."""
    n_tiles, b_tiles = tiles(kernel, B, H, config)
    want = max(1, target_programs // (n_tiles * b_tiles))
    return max(1, min(want, k_blocks(kernel, H, config), 16))


# ------------------------------------------------------------------------------------ the rule

def _batch_tile(B: int, dtype_bytes: int) -> int:
    # One batch tile up to 128 rows, so each weight tile crosses L2 once per step. Only three
    # sizes (16, 64, 128; float32 stops at 64, its operands taking twice the registers and shared
    # memory): rows past B are masked, so a larger tile costs no memory traffic, and every size
    # is another compiled variant for the static report and the parity suite to cover.
    if B <= 16:
        return 16
    return 64 if B <= 64 or dtype_bytes == 4 else 128


# Shared memory the rule's pipelines may take: under sm_80's 163 KB per block, so the one set of
# compiled variants also fits an A100 (sm_90 allows 227 KB).
SMEM_BUDGET = 160 * 1024


def rule(kernel: str, B: int, H: int, dtype_bytes: int, device: Device) -> KernelConfig:
    """The model-derived launch config (bench/kernels/NOTES.md, "The rule").

    - BB: 16, 64 or 128 rows (float32: 16 or 64), one batch tile up to 128 rows.
    - From 64 rows (16-bit): wide output tiles, so the activation operand [B, K] is re-read through
      L2 by few hidden tiles: BN = 128 units in the one-gate kernels, 32 units of each of the four
      gates (128 columns) in the gate kernel; and splits for about half a program per SM. The cost
      model finds L2 delivery, not HBM, binding at B = 128: every further program re-reads the
      activation (more hidden tiles) or writes partials (more splits), so fewer, wider programs win.
    - At 16 rows (B <= 16, 16-bit): the activation is negligible and the weights are everything:
      BN = 64 in the one-gate kernels (each backward weight row read is 128 contiguous bytes; the
      forward reads BK = 64 values, 128 bytes, along each row), 16 units per gate in the gate
      kernel; splits for about two programs per SM, for enough bytes in flight.
    - float32 (not a target of the model): BN = 32 (16 per gate), BK = 32, one program per SM.
    - num_warps: 8 when the accumulators hold 8192 or more values, else 4; 16 for bwd_h's big
      tiles, whose epilogue chunks run one after another (twice the threads, half the chunks);
      num_stages: 4 for 16-bit, 3 for float32, fewer where the pipeline would exceed SMEM_BUDGET.
    - pdl: on Hopper and newer, so the next launch is scheduled while this one finishes.
    Independent of H (a small H only masks columns), so the compiled variants stay few.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    wide = dtype_bytes == 2
    gate = kernel in GATE_KERNELS
    bb = _batch_tile(B, dtype_bytes)
    if not wide:
        bn, per_sm = (16 if gate else 32), 1.0
    elif bb >= 64:
        bn, per_sm = (32 if gate else 128), 0.5
    else:
        bn, per_sm = (16 if gate else 64), 2.0
    config = fit_stages(KernelConfig(BB=bb, BN=bn, BK=64 if wide else 32, num_warps=warps_for(kernel, bb, bn),
                                     num_stages=4 if wide else 3, pdl=device.capability >= (9, 0)), kernel, dtype_bytes)
    return dataclasses.replace(config, split=split_for(kernel, B, H, config, int(device.sms * per_sm)))


def warps_for(kernel: str, bb: int, bn: int) -> int:
    """num_warps for a BB x BN tile (the rule's; the sweep's other tile widths use it too)."""
    cols = bn * (4 if kernel in GATE_KERNELS else 1)
    if kernel == "bwd_h" and bb * cols >= 8192:
        # Its epilogue runs over column chunks one after another, each waiting for its operands
        # (bench/kernels/costmodel.py's epilogue_latency): twice the threads, half the chunks. 16 warps
        # stay under their 128-register cap without spilling (bench/results/static.md).
        return 16
    return 8 if bb * cols >= 8192 else 4


def pipeline_bytes(kernel: str, config: KernelConfig, dtype_bytes: int) -> int:
    """Shared memory of the operand pipeline: num_stages x (activation tile + weight tile)."""
    cols = config.BN * (4 if kernel in GATE_KERNELS else 1)
    return config.num_stages * (config.BB + cols) * config.BK * dtype_bytes


def fit_stages(config: KernelConfig, kernel: str, dtype_bytes: int) -> KernelConfig:
    """Fewer pipeline stages (down to 2) until the pipeline fits SMEM_BUDGET."""
    while config.num_stages > 2 and pipeline_bytes(kernel, config, dtype_bytes) > SMEM_BUDGET:
        config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    return config


def rule_plan(B: int, H: int, dtype_bytes: int, device: Device) -> StepPlan:
    return StepPlan(**{k: rule(k, B, H, dtype_bytes, device) for k in KERNELS}, source="rule")


# Under the interpreter every program runs in turn on the CPU: small tiles, and a few splits so
# that the split-K path is what the CI tests exercise.
INTERPRETER_CONFIG = KernelConfig(BB=16, BN=16, BK=16, num_warps=1, num_stages=1)


def interpreter_plan(B: int, H: int) -> StepPlan:
    configs = {}
    for k in KERNELS:
        split = max(1, min(3, k_blocks(k, H, INTERPRETER_CONFIG)))
        configs[k] = dataclasses.replace(INTERPRETER_CONFIG, split=split)
    return StepPlan(**configs, source="interpreter")


# ------------------------------------------------------------------------------- tuned table

def validate_entry(entry: dict) -> dict[str, KernelConfig]:
    """A tuned-table entry's configs, checked for form: a known dtype and precision, the shape, and
    one valid :class:`KernelConfig` for each kernel. Whether each config belongs to the dispatch
    space (so the static report and the interpreter parity tests cover it) is checked where the
    table is written and by the test suite, with the space (``bench/kernels/sweep.py``)."""
    if entry.get("dtype") not in DTYPE_BYTES:
        raise ValueError(f"tuned entry: unknown dtype {entry.get('dtype')!r}; one of {sorted(DTYPE_BYTES)}")
    if entry.get("precision") not in PRECISIONS:
        raise ValueError(f"tuned entry: unknown precision {entry.get('precision')!r}; one of {PRECISIONS}")
    for dim in ("B", "H"):
        if not isinstance(entry.get(dim), int) or entry[dim] < 1:
            raise ValueError(f"tuned entry: {dim} must be a positive int, got {entry.get(dim)!r}")
    given = entry.get("configs") or {}
    if set(given) != set(KERNELS):
        raise ValueError(f"tuned entry: configs for {sorted(given)}, expected exactly {list(KERNELS)}")
    configs = {}
    for k in KERNELS:
        try:
            configs[k] = KernelConfig(**given[k])
        except TypeError as exc:  # unknown or missing fields
            raise ValueError(f"tuned entry: bad config for {k}: {exc}") from None
    return configs


def _tuned_entries() -> list[dict]:
    from . import tuned

    return list(getattr(tuned, "ENTRIES", []))


def tuned_plan(B: int, H: int, dtype: str, precision: str, device: Device) -> StepPlan | None:
    """The tuned table's plan for exactly this device name, dtype, precision and (B, H), if any."""
    for entry in _tuned_entries():
        if (entry["device"] == device.name and entry["dtype"] == dtype and entry["precision"] == precision
                and entry["B"] == B and entry["H"] == H):
            return StepPlan(**validate_entry(entry), source="tuned")
    return None


# ------------------------------------------------------------------------------- override

_OVERRIDE: list[dict[str, KernelConfig]] = []


@contextlib.contextmanager
def override(configs: dict[str, KernelConfig] | KernelConfig) -> Iterator[None]:
    """Launch with these configs (one for every kernel, or one per kernel name) inside the block.

    For tests and the GPU sweep; ``split`` is used as given, capped at the K blocks of the shape.
    """
    if isinstance(configs, KernelConfig):
        configs = {k: configs for k in KERNELS}
    unknown = set(configs) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    _OVERRIDE.append(dict(configs))
    try:
        yield
    finally:
        _OVERRIDE.pop()


# ------------------------------------------------------------------------------- entry point

def plan(B: int, H: int, dtype: str, precision: str, device: Device | None, interpret: bool) -> StepPlan:
    """The configs one call of the recurrence launches with (sources in the module docstring).

    ``dtype``: "float32", "float16" or "bfloat16"; ``precision``: the float32 dot's "ieee" or
    "tf32"; ``device``: None under the interpreter.
    """
    dtype_bytes = 4 if dtype == "float32" else 2
    if interpret:
        base = interpreter_plan(B, H)
    else:
        base = tuned_plan(B, H, dtype, precision, device) or rule_plan(B, H, dtype_bytes, device)
    if _OVERRIDE:
        chosen = {k: _OVERRIDE[-1].get(k, base[k]) for k in KERNELS}
        if interpret:  # the interpreter has no grid dependency control
            chosen = {k: dataclasses.replace(c, pdl=False) for k, c in chosen.items()}
        chosen = {k: dataclasses.replace(c, split=max(1, min(c.split, k_blocks(k, H, c)))) for k, c in chosen.items()}
        return StepPlan(**chosen, source="override")
    return base
