"""The C++ CPU backend (``backend="cpu"``, csrc/cpu/, fastmlstm/ops/cpu/).

Beyond the parity suite (tests/ops/test_recurrence.py, tests/nn/test_modules.py and
tests/nn/test_compile.py run it through conftest's BACKENDS): shapes that span several row tiles
and column blocks, every packed layout, the layer op with the input projection inside the loop,
bit-exactness (chunks, thread counts, the inference path that skips finished rows), the portable
(non-AVX2) kernels, input checks in C++, and the build: a missing compiler or a broken source
falls back to the reference loop with one log line.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import contract
from conftest import DTYPES
from tolerances import ABS, rel_err

import fastmlstm
from fastmlstm import FastMLSTM, multiplicative_lstm, multiplicative_lstm_recurrence
from fastmlstm.ops import registry as backends
from fastmlstm.ops import autograd, registry
from fastmlstm.ops.cpu import build

REPO = Path(__file__).resolve().parents[2]
AVAILABLE, WHY = backends.backend_status("cpu", "cpu")
needs_cpu = pytest.mark.skipif(not AVAILABLE, reason=f"the CPU extension is unavailable: {WHY}")


def _ops():
    from fastmlstm.ops.cpu import recurrence

    return recurrence._ops()


# ---------------------------------------------------------------------------------------------
# Parity at shapes that exercise the tiling: rows over several 64-row tiles, hidden units over
# several 32-column blocks with a partial last one, odd sizes (no VNNI), batches of at most 4 rows
# (16-bit weights read as they are), and more than 64 input features (x's gradient over two column
# blocks).

LAYER_SHAPES = [(3, 67, 5, 130), (5, 3, 7, 45), (2, 1, 64, 96), (4, 4, 8, 40), (2, 9, 70, 24)]
# Even sizes only: the bfloat16 GEMMs take VNNI-packed weights (pairs of k) where both K are even.
VNNI_LAYER_SHAPES = [(3, 67, 6, 130), (2, 1, 64, 96), (4, 4, 8, 40), (1, 70, 2, 66), (2, 9, 70, 24)]


def _bf16_gemms():
    """The bfloat16 GEMMs to check here: the portable twin of the native micro-kernels everywhere,
    and the native ones where the CPU has them."""
    from fastmlstm.ops.cpu import recurrence

    return ["portable"] + (["native"] if AVAILABLE and recurrence.native_bf16() else [])


def _layer_failures(dtype, key):
    from test_recurrence import _run, _truth

    return contract.failures(_run("cpu", *key), _run("reference", *key), _truth(*key), dtype)


@needs_cpu
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_matches_float64_truth_at_tiled_shapes(dtype, shape, ragged):
    from test_recurrence import _ragged_lengths

    T, B, I, H = shape
    failures = _layer_failures(dtype, (dtype, T, B, I, H, _ragged_lengths(T, B) if ragged else None))
    assert not failures, "\n".join(failures)


@needs_cpu
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", VNNI_LAYER_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("gemm", ["portable", "native"])
def test_bf16_vnni_layer_matches_float64_truth(gemm, shape, ragged):
    """The VNNI path (bfloat16 operands, VNNI-packed weights) of the layer, forward and backward, with
    every GEMM through the given bfloat16 micro-kernels: the portable twin runs on every CPU."""
    from fastmlstm.ops.cpu import recurrence
    from test_recurrence import _ragged_lengths

    if gemm not in _bf16_gemms():
        pytest.skip("no native bfloat16 GEMM on this CPU; the portable twin of the same path ran")
    T, B, I, H = shape
    # Not the default layout's check: without bfloat16 dot products a batch of a few rows is NARROW.
    with recurrence.forced_bf16_gemm(gemm):
        assert recurrence.layout(torch.bfloat16, B, H, I) == recurrence.VNNI
        key = (torch.bfloat16, T, B, I, H, _ragged_lengths(T, B) if ragged else None)
        failures = _layer_failures(torch.bfloat16, key)
    assert not failures, "\n".join(failures)


GRADIENT_SUBSETS = {"all": (0, 1, 2), "output": (0,), "c_n": (1,), "cells": (2,), "none": ()}


@needs_cpu
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", [(4, 67, 130), (1, 1, 5), (0, 3, 8), (6, 2, 33)], ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_proj_contract_matches_float64_truth_for_every_gradient_subset(dtype, shape, ragged):
    """The recurrence on precomputed projections (the byte model's path), forward and backward."""
    failures = _contract_failures(dtype, shape, ragged)
    assert not failures, "\n".join(failures)


@needs_cpu
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", [(4, 67, 130), (1, 1, 6), (6, 2, 34)], ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("gemm", ["portable", "native"])
def test_bf16_vnni_proj_contract_matches_float64_truth(gemm, shape, ragged):
    from fastmlstm.ops.cpu import recurrence

    if gemm not in _bf16_gemms():
        pytest.skip("no native bfloat16 GEMM on this CPU; the portable twin of the same path ran")
    with recurrence.forced_bf16_gemm(gemm):
        assert recurrence.layout(torch.bfloat16, shape[1], shape[2], backward=True) == recurrence.VNNI
        failures = _contract_failures(torch.bfloat16, shape, ragged)
    assert not failures, "\n".join(failures)


def _contract_failures(dtype, shape, ragged):
    proj, w_hh, w_hm, h0, c0, lengths, grads = contract.inputs(*shape, dtype, ragged=ragged)
    failures = []
    for subset, keep in GRADIENT_SUBSETS.items():
        some = tuple(g if k in keep else None for k, g in enumerate(grads))
        inputs = (proj, w_hh, w_hm, h0, c0, lengths, some)
        got, ref = contract.run("cpu", *inputs), contract.run("reference", *inputs)
        failures += [f"{subset} {f}" for f in contract.failures(got, ref, contract.truth(*inputs), dtype)]
    return failures


# ---------------------------------------------------------------------------------------------
# Bit-exactness.


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_recurrence_with_lengths_is_bit_exact(dtype):
    T, B, H = 10, 70, 40
    proj, w_hh, w_hm, *_ = contract.inputs(T, B, H, dtype)
    lengths = torch.randint(0, T + 1, (B,)).sort(descending=True).values
    out, (h, c) = multiplicative_lstm_recurrence(proj, w_hh, w_hm, lengths=lengths, backend="cpu")
    state, pieces = None, []
    for start, stop in ((0, 3), (3, 4), (4, T)):
        seg = (lengths - start).clamp(0, stop - start)
        piece, state = multiplicative_lstm_recurrence(proj[start:stop], w_hh, w_hm, initial_state=state,
                                                      lengths=seg, backend="cpu")
        pieces.append(piece)
    assert torch.equal(torch.cat(pieces), out) and torch.equal(state[0], h) and torch.equal(state[1], c)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_skipping_finished_rows_equals_training_path(dtype):
    """Without a backward the loop stops multiplying rows past the last running one (sorted texts
    in featurize); every value is the one the full computation gives."""
    T, B, H = 7, 70, 36
    proj, w_hh, w_hm, h0, c0, _, _ = contract.inputs(T, B, H, dtype)
    lengths = torch.tensor(sorted(torch.randint(0, T + 1, (B,)).tolist(), reverse=True))
    cpu = registry.module("cpu")
    full = cpu.forward(proj, w_hh, w_hm, h0, c0, lengths, True, True)
    skipped = cpu.forward(proj, w_hh, w_hm, h0, c0, lengths, False, True)
    for a, b in zip(full[:3], skipped[:3]):
        assert torch.equal(a, b)


@needs_cpu
def test_results_do_not_depend_on_the_thread_count():
    rnn = FastMLSTM(8, 100, backend="cpu")
    x = torch.randn(5, 70, 8, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, (h, c) = rnn(x)
            grads = torch.autograd.grad(out.sum() + c.sum(), [x, *rnn.parameters()])
            results.append([out, h, c, *grads])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Packed layouts.


def _unpack(packed, N, K, gates):
    """The weight [N, K] a packed tensor holds (float64), from the layout's definition."""
    blocks, cols = packed.shape[0], packed.shape[2]
    p = packed.double()
    if p.dim() == 4:  # VNNI: [blocks, K/2, 32, 2] -> [blocks, K, 32]
        p = p.permute(0, 1, 3, 2).reshape(blocks, K, cols)
    W = torch.full((N, K), float("nan"), dtype=torch.float64)
    units = cols // 4 if gates else cols
    outputs = N // 4 if gates else N
    for j in range(blocks):
        q = min(units, outputs - j * units)
        for c in range(4 * q if gates else q):
            row = (c // q) * outputs + j * units + c % q if gates else j * units + c
            W[row] = p[j, :, c]
        assert torch.count_nonzero(p[j, :, (4 * q if gates else q):]) == 0  # zero padding
    return W


@needs_cpu
@pytest.mark.parametrize("gates", [False, True], ids=["plain", "gates"])
@pytest.mark.parametrize("layout", [0, 1, 2], ids=["float32", "vnni", "narrow"])
def test_packed_layouts_hold_the_weight(layout, gates):
    N, K = (4 * 21, 46) if gates else (70, 46)
    dtype = torch.float32 if layout == 0 else torch.bfloat16
    w = torch.randn(N, K).to(dtype)
    packed = _ops().pack_weight(w, gates, layout)
    assert packed.dtype == (torch.float32 if layout == 0 else dtype)
    assert torch.equal(_unpack(packed, N, K, gates), w.double())


@needs_cpu
@pytest.mark.parametrize("layout", [0, 1, 2], ids=["float32", "vnni", "narrow"])
def test_packing_reads_concatenated_and_transposed_weights_in_place(layout):
    ops = _ops()
    dtype = torch.float32 if layout == 0 else torch.bfloat16
    # Even inner sizes (VNNI packs pairs of k); the transposed weight is read as [46, 70].
    w_hh, w_ih, w_hm = torch.randn(4 * 21, 22).to(dtype), torch.randn(4 * 21, 6).to(dtype), torch.randn(70, 46).to(dtype)
    assert torch.equal(ops.pack_weight(w_hh, True, layout, w_ih), ops.pack_weight(torch.cat([w_hh, w_ih], 1), True, layout))
    assert torch.equal(ops.pack_weight(w_hm, False, layout, None, True),
                       ops.pack_weight(w_hm.t().contiguous(), False, layout))


@needs_cpu
@pytest.mark.parametrize("gemm", ["portable", "native"])
def test_bfloat16_vnni_paths_match_the_float32_one(gemm):
    """The VNNI path (natively where the CPU multiplies bfloat16: AVX-512-BF16, AMX; through the
    portable twin everywhere) must give the float32 path's numbers up to summation order, on the
    module's output and every gradient (the issue-24 case: wrong multiplicative-weight gradients)."""
    from fastmlstm.ops.cpu import recurrence

    if gemm not in _bf16_gemms():
        pytest.skip(f"no native bfloat16 GEMM on this CPU (kernels: {recurrence.kernel_isa()}); the portable twin ran")
    rnn = FastMLSTM(8, 64, backend="cpu").bfloat16()
    x = torch.randn(6, 20, 8).bfloat16().requires_grad_()

    def run():
        out, (h, c) = rnn(x)
        loss = out.float().sum() + h.sum() + c.sum()
        return out, torch.autograd.grad(loss, [x, *rnn.parameters()])

    with recurrence.forced_bf16_gemm(gemm):
        out, grads = run()
    with recurrence.forced_bf16_gemm("float32"):
        out2, grads2 = run()
    assert rel_err(out, out2) <= 2 * ABS[torch.bfloat16]
    names = ["input", *(n for n, _ in rnn.named_parameters())]
    bad = [f"{n}: {rel_err(a, b):.2e}" for n, a, b in zip(names, grads, grads2) if rel_err(a, b) > 4 * ABS[torch.bfloat16]]
    assert not bad, bad


@needs_cpu
def test_native_and_portable_bf16_gemms_agree():
    """Where the native bfloat16 micro-kernels run, they and their portable twin give the same
    products of the same packed weights (float32 sums in another order: a few float32 ulps)."""
    from fastmlstm.ops.cpu import recurrence

    if "native" not in _bf16_gemms():
        pytest.skip(f"no native bfloat16 GEMM on this CPU (kernels: {recurrence.kernel_isa()})")
    assert _ops().bf16_gemm_works(True) and _ops().bf16_gemm_works(False)
    proj, w_hh, w_hm, h0, c0, lengths, grads = contract.inputs(5, 67, 130, torch.bfloat16, ragged=True)
    runs = []
    for gemm in ("native", "portable"):
        with recurrence.forced_bf16_gemm(gemm):
            runs.append(contract.run("cpu", proj, w_hh, w_hm, h0, c0, lengths, grads))
    for key in runs[0]:
        assert rel_err(runs[0][key], runs[1][key]) <= ABS[torch.bfloat16], key


@needs_cpu
def test_bf16_gemm_setting_is_checked(monkeypatch):
    from fastmlstm.ops.cpu import recurrence

    with pytest.raises(ValueError, match="bf16 GEMM must be one of"):
        with recurrence.forced_bf16_gemm("fast"):
            pass
    recurrence._env_bf16_gemm.cache_clear()
    monkeypatch.setenv("FASTMLSTM_CPU_BF16", "portable")
    assert recurrence.bf16_gemm() == "portable"
    monkeypatch.setenv("FASTMLSTM_CPU_BF16", "bogus")
    with pytest.raises(fastmlstm.InputError, match="FASTMLSTM_CPU_BF16 must be one of"):
        recurrence.bf16_gemm()


# ---------------------------------------------------------------------------------------------
# Non-finite values propagate as in the reference loop: the fast exp clamps its argument, which
# must not turn a NaN pre-activation into a finite gate.


@needs_cpu
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs_give_the_reference_nan_pattern(dtype, bad):
    torch.manual_seed(0)
    T, B, I, H = 5, 6, 4, 40  # B > 4 and B <= 4 rows take different weight paths for 16-bit weights
    for rows in (B, 3):
        x = torch.randn(T, rows, I).to(dtype)
        x[1, 1, 2] = bad
        w = [torch.randn(s).mul_(0.3).to(dtype) for s in ((4 * H, I), (4 * H, H), (H, I), (H, H), (4 * H,))]
        with torch.no_grad():
            ref = multiplicative_lstm(x, *w, backend="reference")
            got = multiplicative_lstm(x, *w, backend="cpu")
        for r, g in zip((ref[0], *ref[1]), (got[0], *got[1])):
            assert torch.equal(torch.isnan(r), torch.isnan(g)) and torch.equal(torch.isinf(r), torch.isinf(g))
        assert torch.isnan(got[0][1:, 1]).all() and torch.isfinite(got[0][:, [0, 2]]).all()


# ---------------------------------------------------------------------------------------------
# The portable kernels (CPUs without AVX2, or ATEN_CPU_CAPABILITY=default) run the parity tests too,
# as on a CPU without bfloat16 dot products (oneDNN capped at AVX2: the layouts such CPUs choose).


@needs_cpu
def test_portable_kernels_pass_the_parity_tests():
    if _ops().kernel_isa() == "default":
        pytest.skip("this process already runs the portable kernels")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = ("import torch; from fastmlstm.ops.cpu import recurrence; "
            "assert recurrence.kernel_isa() == 'default', recurrence.kernel_isa(); "
            "assert not recurrence.native_bf16() and recurrence.bf16_gemm() == 'float32'")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "ops" / "test_cpu.py"),
         "-k", "tiled_shapes and (B3 or B67) or bit_exact or non_finite or vnni and portable"],
        env=env, capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Input checks in C++: clear messages, never a crash.


@needs_cpu
def test_operators_check_their_inputs():
    ops = _ops()
    T, B, H, I = 2, 3, 40, 5
    proj, w_hh, w_hm, h0, c0, _, _ = contract.inputs(T, B, H, torch.float32)
    packed_hh, packed_hm = ops.pack_weight(w_hh, True, 0), ops.pack_weight(w_hm, False, 0)
    ok = dict(proj=proj, packed_hh=packed_hh, packed_hm=packed_hm, h0=h0, c0=c0, lengths=None)

    def forward(**changes):
        a = {**ok, **changes}
        return ops.forward(a["proj"], a["packed_hh"], a["packed_hm"], a["h0"], a["c0"], a["lengths"], True, False)

    cases = [
        (dict(proj=proj.double()), r"proj must be float32, float16 or bfloat16"),
        (dict(proj=proj[..., :-1].contiguous()), r"5 \* hidden_size"),
        (dict(proj=proj[..., :-5].contiguous()), r"packed_hh must have the packed shape"),
        (dict(proj=proj.transpose(0, 1).contiguous().transpose(0, 1)), r"proj must be contiguous"),
        (dict(proj=proj[0]), r"proj must be 3-D"),
        (dict(packed_hh=packed_hm), r"packed_hh must have the packed shape"),
        (dict(packed_hm=w_hm), r"packed_hm is not a packed weight"),
        (dict(packed_hh=ops.pack_weight(w_hh.half(), True, 2)), r"packed_hh must be float32, or Float"),
        (dict(h0=h0.half()), r"h0 must have dtype Float"),
        (dict(c0=c0[:1]), r"c0 must have shape"),
        (dict(lengths=torch.tensor([1, 2, 2], dtype=torch.int32)), r"lengths must have dtype Long"),
        (dict(lengths=torch.tensor([1, 2])), r"lengths must have shape \[3\]"),
    ]
    for changes, message in cases:
        with pytest.raises(RuntimeError, match=message):
            forward(**changes)
    output, _, cells, act = forward()
    with pytest.raises(RuntimeError, match=r"saved by forward\(save_for_backward=True\)"):
        ops.backward(None, None, None, ops.pack_weight(w_hh.t().contiguous(), False, 0), packed_hm, h0, c0, None,
                     output, cells, act.new_empty(0))
    with pytest.raises(RuntimeError, match=r"grad_output must have shape"):
        ops.backward(output[:1], None, None, ops.pack_weight(w_hh.t().contiguous(), False, 0), packed_hm, h0, c0,
                     None, output, cells, act)
    with pytest.raises(RuntimeError, match=r"packed_hh_t must have the packed shape"):
        ops.backward(None, None, None, packed_hh, packed_hm, h0, c0, None, output, cells, act)
    x = torch.randn(T, B, I)
    with pytest.raises(RuntimeError, match=r"weight_im_t \(W_im\^T, float32; .*\) must have shape"):
        ops.forward_input(x, torch.randn(H, I), None, ops.pack_weight(torch.randn(4 * H, H + I), True, 0),
                          packed_hm, h0, c0, None, False, False)
    with pytest.raises(RuntimeError, match=r"packed_hh_ih must have the packed shape"):
        ops.forward_input(x, torch.randn(I, H), None, packed_hh, packed_hm, h0, c0, None, False, False)
    with pytest.raises(RuntimeError, match=r"the narrow layout keeps a 16-bit weight's dtype"):
        ops.pack_weight(w_hh, True, 2)
    with pytest.raises(RuntimeError, match=r"a gate weight must have 4 \* hidden_size rows"):
        ops.pack_weight(torch.randn(7, 3), True, 0)


@needs_cpu
def test_explicit_cpu_backend_on_a_cuda_tensor_says_why():
    ok, why = backends.backend_status("cpu", "cuda")
    assert not ok and "CPU tensors" in why


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.library.


@needs_cpu
def test_layer_op_passes_opcheck():
    T, B, I, H = 3, 2, 4, 5
    args = (
        torch.randn(T, B, I, requires_grad=True),
        torch.randn(4 * H, I, requires_grad=True),
        torch.randn(H, I, requires_grad=True),
        torch.randn(4 * H, requires_grad=True),
        torch.randn(4 * H, H, requires_grad=True),
        torch.randn(H, H, requires_grad=True),
        torch.randn(B, H, requires_grad=True),
        torch.randn(B, H, requires_grad=True),
        torch.tensor([3, 1]),
        "cpu", True, True,
    )
    torch.library.opcheck(autograd.layer_forward, args)


@needs_cpu
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_module_on_the_cpu_backend_works_inside_torch_compile(backend):
    rnn = FastMLSTM(4, 40, backend=backend)

    def loss_fn(x):
        out, (h, c) = rnn(x)
        return out.pow(2).sum() + c.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 4)
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, list(rnn.parameters()))
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(rnn.parameters()))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The build: on first use, keyed by the sources, falling back with one log line.


def test_build_directory_is_keyed_by_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = build.build_directory()
    assert first.parent == tmp_path / build.LIBRARY and torch.__version__ in first.name
    copy = tmp_path / "csrc"
    shutil.copytree(build.source_dir(), copy)
    monkeypatch.setattr(build, "source_dir", lambda: copy)
    # same contents elsewhere: its own folder (ninja's file names the sources' paths, so two checkouts
    # sharing one rebuilt it each in turn); the same place again: the same folder
    assert build.build_directory() != first and build.build_directory() == build.build_directory()
    same_place = build.build_directory()
    (copy / "mlstm_cpu.h").write_text((copy / "mlstm_cpu.h").read_text() + "\n// changed\n")
    assert build.build_directory() != same_place  # another version of the sources never reuses the library


def test_without_a_compiler_auto_falls_back_with_one_log_line(tmp_path):
    code = (
        "import logging, torch, fastmlstm\n"
        "from fastmlstm.ops import registry as backends\n"
        "records = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, r): records.append(r)\n"
        "logging.getLogger('fastmlstm').addHandler(H())\n"
        "logging.getLogger('fastmlstm').setLevel(logging.INFO)\n"
        "assert 'cpu' not in fastmlstm.available_backends('cpu')\n"
        "for _ in range(3):\n"
        "    out, (h, c) = fastmlstm.FastMLSTM(3, 5)(torch.randn(4, 2, 3))\n"
        "assert out.shape == (4, 2, 5)\n"
        "falls = [r for r in records if 'falling back' in r.getMessage()]\n"
        "assert len(falls) == 1 and falls[0].levelno == logging.WARNING, [r.getMessage() for r in records]\n"
        "assert 'no C++ compiler' in falls[0].getMessage(), falls[0].getMessage()\n"
        "try:\n"
        "    fastmlstm.FastMLSTM(3, 5, backend='cpu')(torch.randn(4, 2, 3))\n"
        "except fastmlstm.BackendUnavailableError as e:\n"
        "    assert 'C++ compiler' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("FASTMLSTM_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def fresh_loader():
    build._outcome.cache_clear()
    backends._package_status.cache_clear()
    backends._log_once.cache_clear()
    yield
    build._outcome.cache_clear()
    backends._package_status.cache_clear()
    backends._log_once.cache_clear()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_failed_build_reports_the_compiler_error_and_the_fix(monkeypatch, tmp_path, caplog, fresh_loader):
    sources = tmp_path / "csrc"
    shutil.copytree(build.source_dir(), sources)
    (sources / "mlstm_cpu.cpp").write_text('#error "fastmlstm deliberately broken cpu source"\n')
    for name in build.SOURCES[1:]:  # the other translation units compile in no time
        (sources / name).write_text("// empty for this test\n")
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setattr(build, "build_directory", lambda: tmp_path / "build")
    monkeypatch.setattr(build, "aot_library", lambda *args: None)
    # Another library name: torch.utils.cpp_extension versions its builds by name, and this process
    # must load the real extension under its own name again afterwards.
    monkeypatch.setattr(build, "LIBRARY", "fastmlstm_cpu_broken_for_a_test")
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        ok, why = backends.backend_status("cpu", "cpu")
        assert not ok
        assert backends.resolve_backend("auto", torch.device("cpu")) == "reference"
        assert backends.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert "deliberately broken cpu source" in why and "Fix:" in why and str(tmp_path / "build") in why, why
    messages = [r.getMessage() for r in caplog.records]
    assert sum("compiling the CPU extension" in m for m in messages) == 1
    assert sum("falling back" in m for m in messages) == 1
    with pytest.raises(build.ExtensionUnavailable, match="deliberately broken"):
        build.load_library()  # remembered, not rebuilt on every call


def test_sources_are_where_the_loader_and_setup_look():
    assert build.source_dir() == REPO / "csrc" / "cpu"
    assert [p.name for p in build.sources()] == list(build.SOURCES)
    assert sorted(p.name for p in (REPO / "csrc" / "cpu").iterdir() if p.suffix in (".cpp", ".h")) == sorted(
        build.SOURCES + build.HEADERS)
    setup_text = (REPO / "setup.py").read_text()
    assert all(name in setup_text for name in build.SOURCES)  # the ahead-of-time build lists them in link order


@needs_cpu
def test_fingerprint_sees_any_change_and_ignores_the_thread_count():
    from fastmlstm.ops.cpu.recurrence import fingerprint

    t = torch.randn(3 << 20)  # several pieces of the parallel hash
    base = fingerprint(t)
    assert fingerprint(t.clone()) == base
    flipped = t.clone()
    flipped.view(torch.int32)[123456] ^= 1  # one bit
    assert fingerprint(flipped) != base
    swapped = t.clone()
    swapped[[7, 8]] = swapped[[8, 7]]
    assert fingerprint(swapped) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fingerprint(t) == base
    finally:
        torch.set_num_threads(threads)
    assert fingerprint(torch.arange(5, dtype=torch.uint8)) != fingerprint(torch.arange(6, dtype=torch.uint8))


@needs_cpu
def test_featurize_calls_are_long_on_the_cpu_backend():
    """Rows past their length cost nothing on the CPU backend: featurize makes calls of at least 16
    steps sized to a 16 MiB projection tensor (fewer per-call input tables), with the same features."""
    from fastmlstm import probe
    from fastmlstm.probe import features

    lm = fastmlstm.ByteLM(hidden_size=256, embed_size=8)
    assert features._chunk_steps(lm, 16, None) == (16 << 20) // (16 * 5 * 256 * 4)
    assert features._chunk_steps(lm, 4096, None) == 16
    lm.rnn.backend = "reference"
    assert features._chunk_steps(lm, 16, None) != (16 << 20) // (16 * 5 * 256 * 4)
    lm.rnn.backend = "cpu"
    texts = ["a short one", "a somewhat longer text than that", "", "x" * 40]
    torch.testing.assert_close(torch.as_tensor(probe.featurize(lm, texts, progress=False)),
                               torch.as_tensor(probe.featurize(lm, texts, progress=False, chunk_size=3)),
                               rtol=0, atol=1e-6)


@needs_cpu
def test_the_extension_runs_its_loops_on_torchs_openmp_threads():
    """at::parallel_for is an inline template: compiled without -fopenmp, every loop of the extension
    ran on one thread whatever torch.get_num_threads() said."""
    if not build.OPENMP_FLAGS:
        pytest.skip("torch's parallel backend here is not OpenMP")
    library = Path(build.load_library()).read_bytes()
    assert b"GOMP_parallel" in library  # the OpenMP runtime entry the pragma compiles to
