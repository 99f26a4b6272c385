"""The GPU sweep's candidates and the dispatch space: the launch configurations the kernel lab
times, compiles and tests, beside the package's dispatcher (``fastmlstm.ops.triton.configs``: the
rule, the tuned table, the plan), which needs none of this at run time.

- :func:`sweep_candidates`: the alternatives to the rule that ``gpu_check.py sweep`` times at a
  target shape (its best plan per shape becomes an entry of ``fastmlstm/ops/triton/tuned.py``);
- :func:`dispatch_space`: every compiled variant the dispatcher can launch, the rule at every
  batch tile and the candidates at the target shapes; ``static.py`` compiles each of them ahead of
  time and ``tests/bench/test_sweep.py`` runs each under Triton's interpreter;
- :func:`check_entry`: a tuned entry's form (the package's ``validate_entry``) and every config in
  the space, so the static report and the parity tests cover whatever the tuned table says; the
  sweep refuses to write anything else and the test suite checks the committed table.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

try:
    from fastmlstm.ops.triton import configs as _configs
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fastmlstm.ops.triton import configs as _configs

KernelConfig = _configs.KernelConfig
Device = _configs.Device
KERNELS = _configs.KERNELS

# The shapes (H, B) the sweep times and the space is enumerated over, besides every batch tile the
# rule can pick. The compile-time part of a config does not depend on H beyond BN <= next_pow2(H).
SWEEP_SHAPES = ((4096, 128), (2048, 128), (1024, 64), (4096, 1))
REFERENCE_DEVICE = Device(sms=132, capability=(9, 0), name="NVIDIA H100 80GB HBM3")
# Split targets the sweep tries, in programs per SM (split is a runtime argument, so free to try).
PROGRAMS_PER_SM = (1, 0.25, 0.5, 2)


def sweep_candidates(kernel: str, B: int, H: int, dtype_bytes: int, device: Device) -> list[KernelConfig]:
    """Alternatives to the rule that ``gpu_check.sh`` times at a target shape: split targets of 1/4
    to 2 programs per SM (the cost model's assumption about L2 bandwidth decides between them and
    the GPU settles it); for 16-bit at 128 rows also half and twice the rule's hidden tile (where
    the accumulators fit in 64 registers per thread; the gate kernel only narrower), and PDL off."""
    base = _configs.rule(kernel, B, H, dtype_bytes, device)
    gate = kernel in _configs.GATE_KERNELS
    shapes = [base]
    if dtype_bytes == 2 and base.BB == 128:
        # The gate kernel's epilogue holds four gate tiles: its tile only gets narrower.
        for bn in (base.BN // 2,) if gate else (base.BN // 2, base.BN * 2):
            cols = bn * (4 if gate else 1)
            if bn >= 16 and base.BB * cols <= 16384:
                wider = dataclasses.replace(base, BN=bn, num_warps=_configs.warps_for(kernel, base.BB, bn))
                shapes.append(_configs.fit_stages(wider, kernel, dtype_bytes))
    out = []
    for config in shapes:
        for per_sm in PROGRAMS_PER_SM:
            split = _configs.split_for(kernel, B, H, config, int(device.sms * per_sm))
            out.append(dataclasses.replace(config, split=split))
    if base.pdl and dtype_bytes == 2 and base.BB == 128:
        out.append(dataclasses.replace(base, pdl=False))
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def dispatch_space(dtype_bytes: int, device: Device = REFERENCE_DEVICE) -> dict[str, list[KernelConfig]]:
    """Every compiled variant (``KernelConfig.compiled()``) the dispatcher can launch for one element
    size on a device like ``device``: the rule at every batch tile, and the sweep's candidates at
    the target shapes (which is all a tuned table may hold; see :func:`check_entry`)."""
    space: dict[str, list[KernelConfig]] = {k: [] for k in KERNELS}
    for k in KERNELS:
        found = []
        for B in (1, 16, 17, 64, 65, 128, 512):
            for H in (16, 1024, 4096):
                found.append(_configs.rule(k, B, H, dtype_bytes, device))
        for H, B in SWEEP_SHAPES:
            found += sweep_candidates(k, B, H, dtype_bytes, device)
        for c in found:
            c = c.compiled()
            if c not in space[k]:
                space[k].append(c)
    return space


def in_space(kernel: str, config: KernelConfig, dtype_bytes: int, device: Device = REFERENCE_DEVICE) -> bool:
    key = dataclasses.replace(config.compiled(), pdl=False)
    return any(dataclasses.replace(c, pdl=False) == key for c in dispatch_space(dtype_bytes, device)[kernel])


def check_entry(entry: dict) -> dict[str, KernelConfig]:
    """A tuned-table entry's configs, checked: the form the dispatcher checks at run time
    (``configs.validate_entry``), and only configs from the dispatch space, so the static report
    and the interpreter parity tests cover whatever the table says."""
    found = _configs.validate_entry(entry)
    dtype_bytes = _configs.DTYPE_BYTES[entry["dtype"]]
    for k, config in found.items():
        if not in_space(k, config, dtype_bytes):
            raise ValueError(f"tuned config for {k} {config} is outside the dispatch space")
    return found
