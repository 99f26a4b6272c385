"""Every backend at numerical extremes and degenerate shapes, against the reference backend (the
specification) and the float64 truth: NaN and +-inf in the inputs, the state, the weights and the
incoming gradients; huge finite values (products that overflow the 16-bit dtypes); denormals; gates
saturated exactly; H, I, B or T of 1, H off the vector width, I = 0, a long sequence, and batches
over several row tiles. The CPU backend runs with each copy of its epilogues this CPU can run (in
process) and, in subprocesses, with oneDNN lowered to AVX2 and to no AVX2 at all (other GEMMs).

Where a value is NaN or infinite the backends must put NaN and inf exactly where the reference does;
elsewhere the accuracy rule of tests/tolerances.py holds on the finite values. Overflow inside a
sum of finite values (terms near FLT_MAX) depends on the order of summation, so no case here makes
partial sums overflow; an infinite or NaN operand gives the same pattern in any order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import contract
import pytest
import torch
from conftest import BACKENDS
from mlstm_f64 import mlstm_f64
from tolerances import ABS, FACTOR, rel_err

from fastmlstm import multiplicative_lstm, multiplicative_lstm_recurrence
from fastmlstm.ops import autograd, registry

REPO = Path(__file__).resolve().parents[2]
CPU, WHY = registry.backend_status("cpu", "cpu")
needs_cpu = pytest.mark.skipif(not CPU, reason=f"the CPU extension is unavailable: {WHY}")
ISAS = ("avx512", "avx2", "default")
NAN, INF = float("nan"), float("inf")


def _isa(isa):
    from fastmlstm.ops.cpu import recurrence

    if isa not in recurrence.kernel_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {recurrence.kernel_isas()})")
    return recurrence.forced_kernel_isa(isa)


def _masked_err(actual, truth, keep):
    return rel_err(actual[keep], truth[keep]) if keep.any() else 0.0


def _pattern_failures(got, ref, truth, dtype):
    """NaN, +inf and -inf exactly where the reference has them; on the values finite in all three,
    at most FACTOR x the reference's error from the truth plus ABS[dtype]."""
    out = []
    for name, want in ref.items():
        have = got[name]
        for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            if not torch.equal(test(have), test(want)):
                out.append(f"{name}: {kind} at {int(test(have).sum())} places, the reference at {int(test(want).sum())}")
        keep = torch.isfinite(want) & torch.isfinite(have) & torch.isfinite(truth[name])
        err_ref, err = _masked_err(want, truth[name], keep), _masked_err(have, truth[name], keep)
        if err > FACTOR * err_ref + ABS[dtype]:
            out.append(f"{name}: error {err:.2e} > {FACTOR} x reference {err_ref:.2e} + {ABS[dtype]:.0e}")
    return out


# ---------------------------------------------------------------------------------------------
# Special values in every operand of the recurrence, forward and backward.

T, B, H = 3, 5, 9  # H: a partial vector in every copy of the epilogues
GATE = {"i": 0, "f": H, "o": 2 * H, "u": 3 * H, "xm": 4 * H}


def _special_case(where, value, dtype):
    proj, w_hh, w_hm, h0, c0, lengths, grads = contract.inputs(T, B, H, torch.float32, seed=3)
    grads = list(grads)
    if where in GATE:
        proj[1, 1, GATE[where] + 2] = value
    elif where == "h0":
        h0[1, 2] = value
    elif where == "c0":
        c0[1, 2] = value
    elif where == "w_hh":
        w_hh[2 * H + 1, 3] = value
    elif where == "w_hm":  # 0 x inf in hm wherever a gate is shut exactly (o = 0 makes h = 0)
        w_hm[1, 3] = value
    elif where == "dout":
        grads[0][1, 1, 2] = value
    elif where == "dc_n":
        grads[1][1, 2] = value
    elif where == "proj":
        proj.fill_(value)
    elif where == "saturated":  # every gate pre-activation +-value, the signs mixed
        sign = torch.randn(T, B, 4 * H, generator=torch.Generator().manual_seed(1)).sign()
        proj[..., :4 * H] = value * sign
    grads[0] = grads[0].to(dtype)
    return proj.to(dtype), w_hh.to(dtype), w_hm.to(dtype), h0.to(dtype).float(), c0, lengths, tuple(grads)


SPECIAL = [(w, v) for w in ("i", "f", "u", "xm", "h0", "c0", "w_hh", "w_hm", "dout", "dc_n") for v in (NAN, INF, -INF)]
SPECIAL += [("o", INF), ("o", -INF), ("xm", 1e30), ("c0", 1e30), ("h0", -1e30), ("i", 1e30), ("u", -1e30)]
SPECIAL += [("proj", 1e-40), ("c0", 1e-40), ("saturated", 100.0), ("saturated", 1e4), ("saturated", 88.8)]
# What the 16-bit dtypes cannot hold: xm * hm and dm * xm overflow float16 (m and dhm become inf).
OVERFLOW16 = [("xm", 6e4), ("h0", 6e4), ("proj", 6e-8)]
TRITON_SPECIAL = [("c0", NAN), ("w_hm", INF), ("xm", -INF), ("u", INF), ("o", -INF), ("dc_n", INF),
                  ("saturated", 1e4)]


def _special_values_hold(backend, dtype, cases, isa=None):
    failures = []
    for where, value in cases:
        args = _special_case(where, value, dtype)
        with torch.no_grad():
            ref = contract.run("reference", *args)
            if isa is None:
                got = contract.run(backend, *args)
            else:
                with _isa(isa):
                    got = contract.run(backend, *args)
        failures += [f"{where}={value}: {f}" for f in _pattern_failures(got, ref, contract.truth(*args), dtype)]
    return failures


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_special_values_give_the_reference_pattern_on_the_cpu(dtype, isa):
    cases = SPECIAL + (OVERFLOW16 if dtype == torch.float16 else [("xm", 3e38), ("proj", 1e-39)])
    assert not _special_values_hold("cpu", dtype, cases, isa)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is unavailable")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy under Triton's interpreter: overflow in exp, inf - inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_special_values_give_the_reference_pattern_in_triton(dtype):
    assert not _special_values_hold("triton", dtype, TRITON_SPECIAL)


# ---------------------------------------------------------------------------------------------
# Saturated gates are exact: 1 - 2^-24 or 1 / FLT_MAX in place of 1 or 0 would leak through c (a
# forget gate short of 1) or turn a later 0 x inf into a finite value where the reference has NaN.


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
def test_every_copy_shuts_a_saturated_gate_to_exactly_zero(isa):
    """Past ln(FLT_MAX) torch.sigmoid's exp overflows and the gate is exactly 0; so must the kernels'
    (their exp once stopped at FLT_MAX: 1 / (1 + FLT_MAX) = 2.9e-39, and 0 x inf stayed finite)."""
    z = torch.tensor([-INF, -1e30, -1e4, -100.0, -89.0, -88.75, 17.0, 100.0, INF])
    n = z.numel()
    proj = torch.cat([z.repeat(4), torch.ones(n)]).view(1, 1, 5 * n)  # each gate sees every z; xm = 1
    zeros = torch.zeros(1, n)
    with torch.no_grad(), _isa(isa):
        act = autograd.sequence_forward(proj, torch.zeros(4 * n, n), torch.zeros(n, n), zeros, zeros, None, "cpu",
                                        True, False)[3][0, 0, :4 * n]
    ref = autograd.sequence_forward(proj, torch.zeros(4 * n, n), torch.zeros(n, n), zeros, zeros, None,
                                    "reference", True, False)[3][0, 0, :4 * n]
    assert torch.equal(ref[:6], torch.zeros(6))  # the specification: shut exactly
    assert torch.equal(act, ref), (act - ref).abs().max()


# ---------------------------------------------------------------------------------------------
# Degenerate and awkward shapes: the accuracy rule on every output and gradient.

# (T, B, I, H): one of everything; H off the vector width by one (17, 33, 65: AVX-512 and AVX2
# tails of 1) and I = 1; a batch over several 64-row tiles.
SHAPES = [(1, 1, 1, 1), (3, 2, 1, 17), (4, 3, 5, 33), (2, 5, 3, 65), (2, 300, 3, 5)]
TINY = {(1, 1, 1, 1)}  # one rounding per gradient: the rule compares luck there, so float32 only


def _shape_failures(backend, dtype, shape):
    from test_recurrence import _run, _truth

    failures = []
    for lengths in (None, tuple((shape[0] * (b + 1)) // shape[1] for b in range(shape[1]))[::-1]):
        key = (dtype, *shape, lengths)
        failures += contract.failures(_run(backend, *key), _run("reference", *key), _truth(*key), dtype)
        args = contract.inputs(shape[0], shape[1], shape[3], dtype, ragged=lengths is not None)
        failures += contract.failures(contract.run(backend, *args), contract.run("reference", *args),
                                      contract.truth(*args), dtype)
    return failures


def _dtypes(shape):
    return [torch.float32] if shape in TINY else [torch.float32, torch.float16, torch.bfloat16]


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_awkward_shapes_keep_the_accuracy_rule_on_the_cpu(shape, isa):
    with _isa(isa):
        failures = [f"{dtype}: {f}" for dtype in _dtypes(shape) for f in _shape_failures("cpu", dtype, shape)]
    assert not failures


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is unavailable")
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 2, 1, 17)], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_awkward_shapes_keep_the_accuracy_rule_in_triton(shape):
    assert not [f for dtype in _dtypes(shape)[:2] for f in _shape_failures("triton", dtype, shape)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_input_features_leave_the_bias_and_the_state(backend):
    """I = 0 (the functional form allows it; the module refuses input_size=0): xm = 0, so m = 0
    and every gate is its bias alone."""
    T, B, H = 3, 2, 5
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(T, B, 0)
    w = [torch.randn(s, generator=g) for s in ((4 * H, 0), (4 * H, H), (H, 0), (H, H), (4 * H,))]
    state = (0.5 * torch.randn(B, H, generator=g), torch.randn(B, H, generator=g))
    leaves = [t.clone().requires_grad_() for t in (*w, *state)]
    out, (_, c_n) = multiplicative_lstm(x, *leaves[:5], initial_state=tuple(leaves[5:]), backend=backend)
    (out.sum() + c_n.sum()).backward()
    f64 = [t.double() for t in (x, *w, *state)]
    want, _, want_c, _ = mlstm_f64(*f64)
    assert rel_err(out, want) <= 1e-6 and rel_err(c_n, want_c) <= 1e-6
    assert torch.equal(leaves[1].grad, torch.zeros(4 * H, H))  # m = 0: nothing reaches W_hh
    assert torch.isfinite(leaves[4].grad).all() and leaves[4].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# A long sequence: the cell state grows to thousands (input and forget gates near 1, u near 1), and
# every backend's drift from float64 stays within the rule over T = 20000 steps.

LONG_T, LONG_B, LONG_H = 20000, 2, 4


def _long_case(dtype):
    g = torch.Generator().manual_seed(0)
    proj = 0.3 * torch.randn(LONG_T, LONG_B, 5 * LONG_H, generator=g)
    proj[..., :LONG_H] += 4.0
    proj[..., LONG_H:2 * LONG_H] += 8.0
    proj[..., 3 * LONG_H:4 * LONG_H] += 3.0
    w_hh = 0.3 * torch.randn(4 * LONG_H, LONG_H, generator=g)
    w_hm = 0.3 * torch.randn(LONG_H, LONG_H, generator=g)
    zeros = torch.zeros(LONG_B, LONG_H)
    return proj.to(dtype), w_hh.to(dtype), w_hm.to(dtype), zeros, zeros


def _long_forward(backend, proj, w_hh, w_hm, h0, c0):
    with torch.no_grad():
        out, (_, c_n), cells = multiplicative_lstm_recurrence(proj, w_hh, w_hm, initial_state=(h0, c0),
                                                              return_cell_states=True, backend=backend)
    return {"output": out, "c_n": c_n, "cell_states": cells}


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_long_sequence_drifts_no_more_than_the_reference(dtype):
    from mlstm_f64 import recurrence_f64

    case = _long_case(dtype)
    out, _, c_n, cells = recurrence_f64(*(t.double() for t in case))
    truth = {"output": out, "c_n": c_n, "cell_states": cells}
    assert c_n.abs().max() > 1000  # the state did grow
    ref = _long_forward("reference", *case)
    failures = []
    for isa in ISAS:
        from fastmlstm.ops.cpu import recurrence

        if isa in recurrence.kernel_isas():
            with recurrence.forced_kernel_isa(isa):
                got = _long_forward("cpu", *case)
            failures += [f"{isa}: {f}" for f in contract.failures(got, ref, truth, dtype)]
    assert not failures


@needs_cpu
def test_a_long_sequence_keeps_its_gradients_within_the_rule():
    """float32 forward and every gradient over 2000 steps (the 16-bit gradients through thousands of
    steps are rounding noise in every backend, the reference's too)."""
    proj, w_hh, w_hm, h0, c0 = _long_case(torch.float32)
    g = torch.Generator().manual_seed(1)
    n = 2000
    grads = (torch.randn(n, LONG_B, LONG_H, generator=g), torch.randn(LONG_B, LONG_H, generator=g),
             torch.randn(n, LONG_B, LONG_H, generator=g))
    args = (proj[:n], w_hh, w_hm, h0, c0, None, grads)
    failures = contract.failures(contract.run("cpu", *args), contract.run("reference", *args), contract.truth(*args),
                                 torch.float32)
    assert not failures


# ---------------------------------------------------------------------------------------------
# The same with oneDNN lowered (other GEMM kernels and, without AVX2, ATen's BLAS fallback), in
# subprocesses: the instruction sets are read when the libraries load.


@needs_cpu
@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                                 {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}],
                         ids=["avx2", "no-avx2"])
def test_lowered_instruction_sets_hold_at_the_extremes(env):
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("this process already runs with oneDNN lowered")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "(special_values and cpu) or (awkward and cpu and not T2-B300) or shuts"],
        env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
