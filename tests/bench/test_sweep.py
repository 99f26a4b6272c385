"""The dispatch space and the GPU sweep's candidates (bench/kernels/sweep.py): every launch
configuration the Triton dispatcher can choose computes the recurrence correctly, and the rule and
any tuned table stay inside the space.

The configs come from ``sweep.dispatch_space`` (the rule at every batch tile and the GPU sweep's
candidates; a tuned table may hold nothing else), and each one runs under Triton's interpreter (on
a GPU: natively) through the backend contract, forward and backward, against the float64 truth
with the suite's tolerances. Shapes: B = 33 (three 16-row batch tiles, a partial tile of a 64- or
128-row one), an odd H spanning several hidden tiles and K blocks, ragged lengths with an empty
row, and splits of 1 and 3 (uneven: 3 does not divide the K blocks).
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE
import contract

import fastmlstm
from fastmlstm.ops.triton import configs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "kernels"))

import sweep  # noqa: E402

T, B = 2, 33
H100 = configs.Device(sms=132, capability=(9, 0), name="NVIDIA H100 80GB HBM3")
A100 = configs.Device(sms=108, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
needs_triton = pytest.mark.skipif(not fastmlstm.backend_status("triton", DEVICE)[0],
                                  reason="the Triton backend cannot run here")


def _space_rows():
    """One plan per row: the i-th config of every kernel's list (the rule's fill in shorter lists),
    so every config of every kernel runs once; 16-bit spaces run in bfloat16, float32 in both dot
    precisions' space (the same tiles)."""
    rows = []
    for dtype, dtype_bytes in ((torch.bfloat16, 2), (torch.float32, 4)):
        space = sweep.dispatch_space(dtype_bytes)
        for i in range(max(len(v) for v in space.values())):
            row = {k: space[k][i % len(space[k])] for k in configs.KERNELS}
            rows.append(pytest.param(dtype, row, id=f"{str(dtype)[6:]}-{i}"))
    return rows


@needs_triton
@pytest.mark.parametrize("dtype,row", _space_rows())
def test_every_config_in_the_dispatch_space_matches_the_truth(dtype, row):
    # H: odd, two hidden tiles of the widest BN (the second partial), several K blocks of BK.
    H = max(c.BN for c in row.values()) + 3
    inputs = contract.inputs(T, B, H, dtype, ragged=True, device=DEVICE)
    truth = contract.truth(*inputs)
    ref = contract.run("reference", *inputs)
    # A config's compiled variant is decided by split == 1 or not; 3 splits are uneven here.
    plan = {k: dataclasses.replace(c, split=3 if c.split > 1 else 1) for k, c in row.items()}
    with configs.override(plan):
        got = contract.run("triton", *inputs)
    failures = contract.failures(got, ref, truth, dtype)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------ the space

@pytest.mark.parametrize("device", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_the_rule_stays_inside_the_space(device, dtype_bytes):
    for B in (1, 2, 16, 17, 33, 64, 100, 128, 129, 512, 4096):
        for H in (5, 64, 257, 1024, 4096):
            for k in configs.KERNELS:
                c = configs.rule(k, B, H, dtype_bytes, device)
                assert sweep.in_space(k, c, dtype_bytes), (k, B, H, c)


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_the_candidates_start_with_the_rule_and_fit_shared_memory(dtype_bytes):
    for H, B in sweep.SWEEP_SHAPES:
        for k in configs.KERNELS:
            candidates = sweep.sweep_candidates(k, B, H, dtype_bytes, H100)
            rule = configs.rule(k, B, H, dtype_bytes, H100)
            assert dataclasses.replace(candidates[0], split=rule.split) == rule
            assert len(set(candidates)) == len(candidates)
            for c in candidates:
                assert 1 <= c.split <= configs.k_blocks(k, H, c)
                assert configs.pipeline_bytes(k, c, dtype_bytes) <= configs.SMEM_BUDGET
                assert sweep.in_space(k, c, dtype_bytes)


def test_a_tuned_entry_outside_the_space_is_refused():
    """The sweep writes nothing outside the space (and the dispatcher's own check is of form only)."""
    bad = configs.KernelConfig(BB=32, BN=32, BK=32, num_warps=2, num_stages=2).as_dict()
    entry = {"device": H100.name, "dtype": "bfloat16", "precision": "ieee", "B": 128, "H": 4096,
             "configs": {k: bad for k in configs.KERNELS}}
    configs.validate_entry(entry)
    with pytest.raises(ValueError, match="outside the dispatch space"):
        sweep.check_entry(entry)
    good = dict(entry, configs={k: configs.rule(k, 128, 4096, 2, H100).as_dict() for k in configs.KERNELS})
    assert sweep.check_entry(good) == configs.validate_entry(good)


def test_the_committed_tuned_table_is_inside_the_space():
    """What the dispatcher reads from fastmlstm/ops/triton/tuned.py is compiled by the static report
    and run by the parity test above."""
    from fastmlstm.ops.triton import tuned

    for entry in tuned.ENTRIES:
        sweep.check_entry(entry)
