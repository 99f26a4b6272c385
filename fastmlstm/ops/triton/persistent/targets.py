"""Every persistent Gluon kernel at every configuration the dispatcher can pick for the model's
shapes, as compile targets: what ``bench/kernels/static.py`` compiles ahead of time for sm_90a (no
GPU needed) and what :mod:`.launch` launches (the same signatures and shared-memory layouts).

    python -m fastmlstm.ops.triton.persistent.targets [--dtype bf16]   # compile all, print the report

Each target's compile-time parameters come from its :class:`~.schedule.Schedule`: the cluster size
C, the reduction block BK (the descriptors' boxes), the batch tile BB, the ring's stages S, the
tile height ROWS (256 "cluster", 64 "stationary") and, for the stationary design, how many weight
tiles a CTA keeps (RES_BLOCKS) and whether the others stream (STREAM, with an L2 evict-last
policy: the PTX then holds ``L2::cache_hint``). The flags (SAVE, HAS_LEN, HAS_DOUT, HAS_DCELLS)
are compiled in their heaviest variant, the one that needs the most registers.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from ..configs import Device
from . import schedule as _schedule

# The shapes of the targets ((H, B): the paper's H = 4096 at training and generation batch,
# and the smaller models), on the two GPUs the cost model predicts for (both 132 SMs, sm_90).
MODEL_SHAPES = ((4096, 128), (2048, 128), (1024, 64), (4096, 1))
DEVICES = (Device(132, (9, 0), "NVIDIA H100 80GB HBM3"), Device(132, (9, 0), "NVIDIA H200"))
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
EXPECTED_PTX = ("wgmma", "cp.async.bulk.tensor", "multicast::cluster", "barrier.cluster")
# A stationary schedule's streamed weight tiles carry an L2 eviction policy.
KEEP_PTX = "L2::cache_hint"
# The default partition: two consumer warpgroups (the producer warp comes on top).
NUM_WARPS = 8
ARCH = 90


@dataclasses.dataclass(frozen=True)
class CompileTarget:
    """One kernel at one configuration: ``triton.compile(GluonASTSource(fn, signature, constexprs),
    target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_ctas": num_ctas})``."""

    name: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_ctas: int
    cluster_dims: tuple
    arch: int
    expected_ptx: tuple[str, ...]
    schedule: Any


def gl_dtype(dtype: str):
    from triton.experimental.gluon import language as gl

    return {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]


def layouts(direction: str, C: int, BK: int, BB: int, dtype: str, rows: int = 256) -> dict:
    """The shared-memory layouts of the kernels' tiles (and so of their TMA descriptors).

    forward: "w0" Wmh boxes [C*rows, BK] and "w1" Wh boxes [C*rows/4, BK] (one per gate), each CTA
    its rows; backward: "w0", "w1" boxes [BK, C*rows] of Wmh and Wh read transposed; "a": the
    activation box [BB, BK], every CTA a copy (the multicast).
    """
    from triton.experimental.gluon import language as gl

    from .gluon_common import broadcast, split_dim

    t = gl_dtype(dtype)
    # .fn: the plain function behind a Gluon constexpr_function.
    by_rows, by_cols, every = split_dim.fn(C, 2, 0), split_dim.fn(C, 2, 1), broadcast.fn(C, 2)
    a = gl.NVMMASharedLayout.get_default_for([BB, BK], t, cga_layout=every)
    if direction == "forward":
        w0, w1 = [C * rows, BK], [C * rows // 4, BK]
        return {"w0": (w0, gl.NVMMASharedLayout.get_default_for(w0, t, cga_layout=by_rows)),
                "w1": (w1, gl.NVMMASharedLayout.get_default_for(w1, t, cga_layout=by_rows)),
                "a": ([BB, BK], a)}
    w = gl.NVMMASharedLayout.get_default_for([BK, C * rows], t, cga_layout=by_cols)
    return {"w0": ([BK, C * rows], w), "w1": ([BK, C * rows], w), "a": ([BB, BK], a)}


def _desc(dtype: str, block: list, layout) -> str:
    return f"tensordesc<{dtype}[{','.join(map(str, block))}],{layout!r}>"


def signature(direction: str, C: int, BK: int, BB: int, dtype: str, rows: int = 256) -> dict:
    """The kernel's runtime parameters and their types, in order (the constexprs apart)."""
    lay = layouts(direction, C, BK, BB, dtype, rows)
    w0, w1, a = (_desc(dtype, *lay[k]) for k in ("w0", "w1", "a"))
    act, f32, i32 = f"*{dtype}", "*fp32", "*i32"
    if direction == "forward":
        tensors = {"w0_desc": w0, "w1_desc": w1, "h_desc": a, "m_desc": a, "p_proj": act, "p_h": act, "p_c": f32,
                   "p_act": act, "p_m": act, "p_len": "*i64"}
        scalars = ["T", "B", "H", "c_mod"]
    else:
        tensors = {"w0_desc": w0, "w1_desc": w1, "dhm_desc": a, "dz_desc": a, "p_dout": act, "p_dh": f32,
                   "p_dc": f32, "p_dcells": f32, "p_act": act, "p_cells": f32, "p_c0": f32, "p_dproj": act,
                   "p_ghm": act, "p_len": "*i64"}
        scalars = ["T", "B", "H"]
    common = {"p_ws": f32, "p_tickets": i32, "p_sync": i32, "p_err": i32, "p_table": i32, "p_counts": i32}
    ints = {name: "i32" for name in scalars + ["n_clusters", "n_ctas", "tile_base1", "max_items"]}
    return {**tensors, **common, **ints, "timeout_ns": "i64"}


def constexprs(sched: _schedule.Schedule, heaviest: bool = True) -> dict:
    """The compile-time parameters of ``sched``'s kernel (flags: all on with ``heaviest``)."""
    base = {"C": sched.cluster, "BB": sched.block_b, "S": sched.stages, "ROWS": sched.block_m,
            "RES_BLOCKS": sched.resident_blocks(), "STREAM": sched.streams}
    if sched.direction == "forward":
        return {**base, "SAVE": heaviest, "HAS_LEN": heaviest}
    return {**base, "HAS_DOUT": heaviest, "HAS_DCELLS": heaviest, "HAS_LEN": heaviest}


def kernel_fn(direction: str):
    if direction == "forward":
        from .gluon_forward import forward_kernel

        return forward_kernel
    from .gluon_backward import backward_kernel

    return backward_kernel


def target_for(sched: _schedule.Schedule, dtype: str) -> CompileTarget:
    const = constexprs(sched)
    name = (f"persistent_{sched.design}_{sched.direction}_C{sched.cluster}_BK{sched.block_k}_BB{sched.block_b}"
            f"_M{sched.block_m}" + (f"_R{const['RES_BLOCKS']}" if const["RES_BLOCKS"] else "")
            + ("_S" + str(sched.stages) if const["RES_BLOCKS"] and const["STREAM"] else ""))
    keeps = const["RES_BLOCKS"] > 0 and const["STREAM"]
    return CompileTarget(name=name, fn=kernel_fn(sched.direction),
                         signature=signature(sched.direction, sched.cluster, sched.block_k, sched.block_b, dtype,
                                             sched.block_m),
                         constexprs=const, num_warps=NUM_WARPS, num_ctas=sched.cluster,
                         cluster_dims=(sched.cluster, 1, 1), arch=ARCH,
                         expected_ptx=EXPECTED_PTX + ((KEEP_PTX,) if keeps else ()), schedule=sched)


def compile_targets(dtype: str) -> list[CompileTarget]:
    """Every kernel configuration the dispatcher can pick for :data:`MODEL_SHAPES` on
    :data:`DEVICES` in ``dtype`` ("bf16" or "fp16"; none for "fp32": the kernels are 16-bit only),
    one per distinct compiled variant (its first schedule attached)."""
    if dtype not in DTYPES:
        return []
    seen: dict[str, CompileTarget] = {}
    for device in DEVICES:
        for H, B in MODEL_SHAPES:
            for design in _schedule.DESIGNS:
                for direction in _schedule.DIRECTIONS:
                    sched = _schedule.plan(design, direction, B, H, 2, device)
                    if sched is not None:
                        target = target_for(sched, dtype)
                        seen.setdefault(target.name, target)
    return list(seen.values())


def compile_target(target: CompileTarget):
    """Compile one target for its arch without a GPU; returns (compiled kernel, ptxas log)."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import GluonASTSource

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(GluonASTSource(target.fn, target.signature, target.constexprs),
                                      target=GPUTarget("cuda", target.arch, 32),
                                      options={"num_warps": target.num_warps, "num_ctas": target.num_ctas})
    return compiled, log.getvalue()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import re
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    bad = 0
    for target in compile_targets(args.dtype):
        start = time.perf_counter()
        compiled, log = compile_target(target)
        ptx = compiled.asm["ptx"]
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        missing = [m for m in target.expected_ptx if m not in ptx]
        bad += bool(missing or any(spills))
        print(f"{target.name} {args.dtype}: registers {regs.group(1) if regs else '?'}, spill bytes {sum(spills)}, "
              f"shared {compiled.metadata.shared} B, PTX markers {'all present' if not missing else missing}, "
              f"{time.perf_counter() - start:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
