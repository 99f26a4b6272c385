"""The CPU backend's instruction-set dispatch (issue 24, item 2): every copy of the epilogues that this
CPU can run (AVX-512, AVX2 and the portable one, which runs everywhere) passes the parity tests in
one process, whatever copy the machine would pick; the packed column blocks each copy reads; the
choice shown in ``fastmlstm.diagnostics``; and the AMX path where the CPU has AMX tiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import contract
from tolerances import ABS, rel_err

import fastmlstm
from fastmlstm.ops import registry

REPO = Path(__file__).resolve().parents[2]
AVAILABLE, WHY = registry.backend_status("cpu", "cpu")
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"the CPU extension is unavailable: {WHY}")
ISAS = ("avx512", "avx2", "default")


def _recurrence():
    from fastmlstm.ops.cpu import recurrence

    return recurrence


def _isa(isa):
    """The epilogues of ``isa`` for the test's duration, or a skip where this CPU cannot run them (the
    portable copy runs on every CPU, so its parity runs everywhere)."""
    recurrence = _recurrence()
    if isa not in recurrence.kernel_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {recurrence.kernel_isas()})")
    return recurrence.forced_kernel_isa(isa)


def test_the_kernels_follow_what_aten_runs():
    recurrence = _recurrence()
    isas = recurrence.kernel_isas()
    assert isas[-1] == "default" and recurrence.kernel_isa() == isas[0]
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    assert isas[0] == expected
    assert list(isas) == [i for i in ISAS if ISAS.index(i) >= ISAS.index(expected)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_kernel_copy_matches_the_float64_truth(isa, dtype):
    """The whole layer (input projections in the loop) and the recurrence on precomputed
    projections, forward and every gradient, ragged, at shapes spanning several row tiles and
    column blocks of either width, with the epilogues of ``isa``."""
    from test_cpu import _contract_failures, _layer_failures
    from test_recurrence import _ragged_lengths

    with _isa(isa):
        failures = _layer_failures(dtype, (dtype, 3, 67, 6, 130, _ragged_lengths(3, 67)))
        failures += _layer_failures(dtype, (dtype, 2, 1, 64, 96, None))
        failures += _contract_failures(dtype, (4, 67, 130), True)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("isa", ISAS)
def test_every_kernel_copy_runs_the_vnni_path_through_the_portable_twin(isa):
    """bfloat16 operands on VNNI-packed weights through the portable twin of the native
    micro-kernels, with each copy of the epilogues (and so each block width)."""
    from test_cpu import _layer_failures

    recurrence = _recurrence()
    with _isa(isa), recurrence.forced_bf16_gemm("portable"):
        assert recurrence.layout(torch.bfloat16, 67, 130, 6) == recurrence.VNNI
        failures = _layer_failures(torch.bfloat16, (torch.bfloat16, 3, 67, 6, 130, None))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bf16_gemm", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tile_gemms_split_along_k_match_the_float64_truth(dtype, bf16_gemm, isa, threads):
    """Long K ranges run as pieces summed in the tile (driver.h, k_piece): forced here at small
    shapes (a piece of 32 elements and an odd tail: K = 130 and 136), the layer (ragged lengths)
    and the recurrence on projections still meet the float64 truth, forward and every gradient,
    with the native bfloat16 GEMM and its portable twin, each copy of the epilogues, and column-
    (one thread) or row-parallel (two) loops."""
    from test_cpu import _contract_failures, _layer_failures
    from test_recurrence import _ragged_lengths

    recurrence = _recurrence()
    if dtype != torch.bfloat16 and bf16_gemm == "native":
        pytest.skip("the bfloat16 GEMM mode matters to bfloat16 only")
    if bf16_gemm == "native" and not recurrence.native_bf16():
        pytest.skip("no native bfloat16 GEMM here; its portable twin runs the same split in the other case")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _isa(isa), recurrence.forced_bf16_gemm(bf16_gemm), recurrence.forced_k_split(64, 128):
            failures = _layer_failures(dtype, (dtype, 3, 67, 6, 130, _ragged_lengths(3, 67)))
            failures += _contract_failures(dtype, (4, 67, 130), True)
    finally:
        torch.set_num_threads(previous)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("gemm", ["mkl", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_both_weight_gradient_gemms_match_the_float64_truth(dtype, gemm, split, isa):
    """The backward's float32 weight gradients (csrc/cpu/gemm.cpp, weight_gradient) through MKL
    or through micro-kernel tiles (m in column blocks, dz^T transposed by each copy's transpose;
    with them x's gradient, the input weights' and the bias's, and xm: csrc/cpu/gemm.cpp), forced on
    every machine: the layer (ragged) and the recurrence on projections, a partial column block
    (H = 130, 70, 33), several chunks of rows (1,200 rows), more input features than one column
    block (I = 70), K in pieces (split), every gradient."""
    from test_cpu import _contract_failures, _layer_failures
    from test_recurrence import _ragged_lengths

    recurrence = _recurrence()
    limits = (64, 128) if split else (1 << 40, 4096)
    with _isa(isa), recurrence.forced_weight_grad_gemm(gemm), recurrence.forced_k_split(*limits):
        failures = _layer_failures(dtype, (dtype, 3, 67, 6, 130, _ragged_lengths(3, 67)))
        failures += _layer_failures(dtype, (dtype, 2, 600, 6, 70, None))
        failures += _layer_failures(dtype, (dtype, 3, 21, 70, 33, None))
        failures += _contract_failures(dtype, (4, 67, 130), True)
    assert not failures, "\n".join(failures)
    with pytest.raises(ValueError, match="weight-gradient GEMM"):
        with recurrence.forced_weight_grad_gemm("blas"):
            pass


@pytest.mark.parametrize("isa", ISAS)
def test_the_weight_gradient_tiles_are_the_default_with_the_avx512_epilogues_only(isa):
    """Auto picks the tiles where the AVX-512 copy transposes in registers, MKL with the others; a
    forced choice holds with any copy; the report (and ``fastmlstm info``) says which runs."""
    recurrence = _recurrence()
    with _isa(isa):
        assert recurrence.kernel_report()["weight_grad_gemm"] == ("tiles" if isa == "avx512" else "mkl")
        for mode in ("mkl", "tiles"):
            with recurrence.forced_weight_grad_gemm(mode):
                assert recurrence.kernel_report()["weight_grad_gemm"] == mode
    assert recurrence.kernel_report()["weight_grad_gemm"] == ("tiles" if recurrence.kernel_isa() == "avx512"
                                                             else "mkl")


def test_the_k_split_changes_only_the_summation_order():
    recurrence = _recurrence()
    torch.manual_seed(0)
    rnn = fastmlstm.FastMLSTM(5, 70, backend="cpu")
    x = torch.randn(4, 9, 5, requires_grad=True)
    results = []
    for limits in ((1 << 40, 4096), (64, 128)):
        with recurrence.forced_k_split(*limits):
            out, (h, c) = rnn(x)
            results.append([out, h, c, *torch.autograd.grad(out.sum() + c.sum(), [x, *rnn.parameters()])])
    for a, b in zip(*results):
        assert rel_err(a, b) <= ABS[torch.float32]
    with pytest.raises(ValueError, match="K split limits"):
        with recurrence.forced_k_split(0, 128):
            pass


def test_the_kernel_copies_agree():
    """Every copy computes the same function: the others' results sit within float32 summation
    noise of the portable one's (they are not bit-equal: FMA contraction differs)."""
    recurrence = _recurrence()
    torch.manual_seed(0)
    rnn = fastmlstm.FastMLSTM(5, 70, backend="cpu")
    x = torch.randn(4, 9, 5, requires_grad=True)
    results = {}
    for isa in recurrence.kernel_isas():
        with recurrence.forced_kernel_isa(isa):
            out, (h, c) = rnn(x, lengths=[4, 4, 3, 3, 2, 2, 1, 1, 1])
            results[isa] = [out, h, c, *torch.autograd.grad(out.sum() + c.sum(), [x, *rnn.parameters()])]
    for isa, values in results.items():
        for a, b in zip(values, results["default"]):
            assert rel_err(a, b) <= ABS[torch.float32], isa


def test_forcing_a_kernel_copy_is_checked():
    recurrence = _recurrence()
    with pytest.raises(ValueError, match="kernel instruction set must be one of"):
        with recurrence.forced_kernel_isa("sse9"):
            pass
    with pytest.raises(RuntimeError, match="cannot run here"):
        recurrence._ops().set_kernel_isa("sse9")
    before = recurrence.kernel_isa()
    with recurrence.forced_kernel_isa("default"):
        assert recurrence.kernel_isa() == "default" and recurrence.column_block("hh") == 32
        assert str(recurrence._ops().kernel_isa()) == "default"  # (kernel_isa() keeps a copy of it)
    assert recurrence.kernel_isa() == before == str(recurrence._ops().kernel_isa())


@pytest.mark.parametrize("isa", ISAS)
def test_each_copy_reads_its_own_column_blocks(isa):
    recurrence = _recurrence()
    with _isa(isa):
        assert recurrence.column_block("hh") == (64 if isa == "avx512" else 32)
        assert recurrence.column_block("hm") == recurrence.column_block("hh_t") == 32


def test_packed_blocks_of_either_width_hold_the_weight_and_others_are_refused():
    from test_cpu import _unpack

    ops = _recurrence()._ops()
    for cols in (32, 64):
        for gates, (N, K) in ((False, (70, 46)), (True, (4 * 21, 46))):
            for layout, dtype in ((0, torch.float32), (1, torch.bfloat16), (2, torch.float16)):
                w = torch.randn(N, K).to(dtype)
                packed = ops.pack_weight(w, gates, layout, None, False, cols)
                assert packed.shape[2] == cols
                assert torch.equal(_unpack(packed, N, K, gates), w.double()), (cols, gates, layout)
    with pytest.raises(RuntimeError, match="blocks of 32 or 64 columns, got 48"):
        ops.pack_weight(torch.randn(8, 8), False, 0, None, False, 48)
    # The first-use check draws from its own generator: torch's global one does not move (a training
    # run resumed in a fresh process would otherwise record another random state).
    before = torch.get_rng_state()
    assert ops.bf16_gemm_works(True)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("isa", ISAS)
def test_each_copy_packs_every_weight_as_the_layout_says(isa):
    """The float32 and VNNI packs read runs of weight rows through the copy's transpose (8 x 8 blocks
    of 32-bit words in registers with AVX2 and AVX-512; the portable copy and the narrow layout loop
    over columns), the transposed ones row by row: every copy gives the layout's definition, with
    partial blocks, runs of rows and K that are no multiple of 8."""
    from test_cpu import _unpack

    ops = _recurrence()._ops()
    with _isa(isa):
        for cols in (32, 64):
            for layout, dtype in ((0, torch.float32), (1, torch.bfloat16), (2, torch.float16)):
                for k_first in (46, 45):  # VNNI pairs of words: an odd K of W takes the column loop
                    w_hh, w_ih = torch.randn(4 * 21, k_first).to(dtype), torch.randn(4 * 21, 56 - k_first).to(dtype)
                    gates = ops.pack_weight(w_hh, True, layout, w_ih, False, cols)
                    assert torch.equal(_unpack(gates, 84, 56, True), torch.cat([w_hh, w_ih], 1).double())
                w, w_t = torch.randn(70, 46).to(dtype), torch.randn(46, 70).to(dtype)
                assert torch.equal(_unpack(ops.pack_weight(w, False, layout, None, False, cols), 70, 46, False),
                                   w.double())
                transposed = ops.pack_weight(w_t, False, layout, None, True, cols)
                assert torch.equal(_unpack(transposed, 70, 46, False), w_t.t().double()), (cols, layout)


def test_diagnostics_show_the_kernels_in_use():
    recurrence = _recurrence()
    info = fastmlstm.diagnostics.environment()["cpu_kernels"]
    assert info["available"] and info["epilogues"] == recurrence.kernel_isa()
    from fastmlstm.ops.cpu import buffer_cache

    assert info["buffer_cache_MiB"]["limit"] == round(buffer_cache.limit_bytes() / 2**20, 1)
    assert info["epilogues_available"] == list(recurrence.kernel_isas())
    assert info["bf16_gemm"] == recurrence.bf16_gemm()
    assert info["column_block"] == {"gates": recurrence.column_block("hh"), "other": 32}
    with recurrence.forced_bf16_gemm("portable"):
        assert "portable twin" in fastmlstm.diagnostics.cpu_kernels()["bf16_gemm_kernels"]


def test_aten_cpu_capability_lowers_the_kernels():
    """ATEN_CPU_CAPABILITY (which lowers ATen's own kernels) lowers ours the same way."""
    recurrence = _recurrence()
    if "avx2" not in recurrence.kernel_isas():
        pytest.skip("this CPU runs no AVX2 kernels")
    code = ("from fastmlstm.ops.cpu import recurrence as r; "
            "assert r.kernel_isa() == 'avx2' and r.column_block() == 32, r.kernel_isa()")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO, timeout=300)


def test_without_onednns_micro_kernels_the_loops_agree_to_rounding():
    """Where ATen's brgemm falls back to its BLAS gemm (no AVX2, a non-x86 CPU, oneDNN disabled or
    capped: here ONEDNN_MAX_CPU_ISA=SSE41), the report says so and the thread-count and chunking
    tests hold to float32 rounding instead of bit for bit; every machine runs them that way too."""
    recurrence = _recurrence()
    enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        assert not recurrence.float32_micro_kernels()
        assert recurrence.kernel_report()["float32_gemm"] == "ATen gemm (BLAS)"
    finally:
        torch.backends.mkldnn.enabled = enabled
    if not recurrence.float32_micro_kernels():
        pytest.skip("this process already runs the BLAS fallback (the tests above took it)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "SSE41"}
    code = ("from fastmlstm.ops.cpu import recurrence as r; "
            "assert not r.float32_micro_kernels() and r.kernel_report()['float32_gemm'] == 'ATen gemm (BLAS)'")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=REPO, timeout=300)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "row_parallel_loops_equal or chunked_and_stepped and (150-64-3 or 150-70-67)"],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_amx_tiles_multiply_the_bfloat16_gemms_where_the_cpu_has_them():
    """On a CPU with AMX tiles oneDNN's bfloat16 micro-kernels run on them: the VNNI path then gives
    its portable twin's numbers (up to float32 summation order) and passes the parity tests. Here
    (no AMX) the same packed layout and products ran through the twin in the tests above."""
    from test_cpu import _layer_failures

    recurrence = _recurrence()
    if not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        pytest.skip("this CPU has no AMX tiles; the portable twin of the same path ran above")
    assert recurrence.kernel_report()["onednn_isa"] == "avx512_core_amx" and recurrence.native_bf16()
    ops = recurrence._ops()
    assert ops.bf16_gemm_works(False) and ops.bf16_gemm_works(True)
    with recurrence.forced_bf16_gemm("native"):
        assert "AMX tiles" in recurrence.kernel_report()["bf16_gemm_kernels"]
        failures = _layer_failures(torch.bfloat16, (torch.bfloat16, 3, 67, 6, 130, None))
    assert not failures, "\n".join(failures)


def _same_sums(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit for bit where the float32 tile GEMMs run on oneDNN's micro-kernels (sums over k in an order
    independent of a tile's rows); through ATen's BLAS fallback (other CPUs, or oneDNN disabled), whose
    kernels may change with the rows, within a few units in the last place of the module's ``dtype``
    (whose activations carry a rounding flip into the float32 states)."""
    if _recurrence().float32_micro_kernels():
        assert torch.equal(a, b)
    else:
        assert a.shape == b.shape and rel_err(a, b) <= 4 * ABS[dtype]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("I, H, B", [(150, 64, 3), (106, 195, 1), (150, 70, 67)])
@pytest.mark.parametrize("mode", ["tiles", "mkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_chunked_and_stepped_module_calls_repeat_the_one_shot_call(dtype, mode, I, H, B, isa):
    """The input projections run inside the loop, and xm as row tiles: a sequence in pieces, or step
    by step, on two threads repeats the one-shot call on one bit for bit (``_same_sums``), whichever GEMMs the
    backward uses (xm through MKL, as the backward's "mkl" once took it, differed in the last bits
    with the rows of the call and the threads at I ~ 100 and a few rows)."""
    torch.manual_seed(0)
    rnn = fastmlstm.FastMLSTM(I, H, backend="cpu").to(dtype)
    x = torch.randn(9, B, I).to(dtype)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad(), _isa(isa), _recurrence().forced_weight_grad_gemm(mode):
            torch.set_num_threads(1)
            out, (h, c) = rnn(x)
            torch.set_num_threads(2)
            state, pieces = None, []
            for chunk in (x[:4], x[4:5], x[5:]):
                piece, state = rnn(chunk, state)
                pieces.append(piece)
            step_state, steps = None, []
            for t in range(3):
                y, step_state = rnn.step(x[t], step_state)
                steps.append(y)
    finally:
        torch.set_num_threads(threads)
    for a, b in ((torch.cat(pieces), out), (state[0], h), (state[1], c), (torch.stack(steps), out[:3])):
        _same_sums(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_parallel_loops_equal_the_column_parallel_ones(dtype):
    """With two threads and enough rows, every thread runs its own rows (every other one) through
    whole chunks of steps; with one thread the column blocks of each step are the unit of work.
    Both compute every row the same way: outputs, states and every gradient bit for bit (``_same_sums``), with
    ragged lengths in no particular order, on the layer op and on precomputed projections."""
    torch.manual_seed(0)
    rnn = fastmlstm.FastMLSTM(6, 72, backend="cpu").to(dtype)
    x = torch.randn(7, 37, 6).to(dtype).requires_grad_()
    lengths = torch.randint(0, 8, (37,))
    proj, w_hh, w_hm, h0, c0, _, grads = contract.inputs(5, 37, 40, dtype)
    cpu = registry.module("cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, (h, c) = rnn(x, lengths=lengths)
            got = [out, h, c, *torch.autograd.grad(out.float().sum() + c.sum(), [x, *rnn.parameters()])]
            with torch.no_grad():
                got += list(rnn(x, lengths=lengths.sort(descending=True).values)[0:1])
            fwd = cpu.forward(proj, w_hh, w_hm, h0, c0, lengths[:37] % 6, True, True)
            got += list(fwd[:3]) + list(cpu.backward(*grads, w_hh, w_hm, h0, c0, lengths[:37] % 6, *fwd[0:1],
                                                     fwd[2], fwd[3]))
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        _same_sums(a, b, dtype)


@pytest.mark.parametrize("gemm", ["portable", "native"])
def test_the_bf16_xm_gemm_rounds_what_the_float32_one_computes(gemm):
    """With VNNI weights the inputs' xm = x Wmx^T runs as one bfloat16 GEMM per chunk of steps (float32
    sums rounded once to bfloat16, which the epilogue rounds a float32 xm to anyway): the xm it saves
    is the float32 GEMM's, rounded, but for summation order (nearly all equal, none over one bfloat16
    ulp apart); W_im^T's dtype picks the path."""
    recurrence = _recurrence()
    from fastmlstm.ops.cpu.recurrence import _ops, _packed

    if gemm == "native" and not recurrence.native_bf16():
        pytest.skip("no native bfloat16 GEMM on this CPU; the portable twin of the same path ran")
    T, B, I, H = 4, 37, 8, 40
    g = torch.Generator().manual_seed(0)
    x, w_ih, w_im, w_hh, w_hm = (torch.randn(*s, generator=g).bfloat16() for s in
                                 ((T, B, I), (4 * H, I), (H, I), (4 * H, H), (H, H)))
    h0 = c0 = torch.zeros(B, H)
    with recurrence.forced_bf16_gemm(gemm):
        lay = recurrence.layout(torch.bfloat16, B, H, I)
        assert lay == recurrence.VNNI
        xm16 = _packed(w_im, "xm", lay)
        assert xm16.dtype == torch.bfloat16 and xm16.shape == (I, H)
        acts = [_ops().forward_input(x, xm, None, _packed(w_hh, "hh", lay, w_ih), _packed(w_hm, "hm", lay), h0, c0,
                                     None, True, False, False, recurrence.portable_bf16())[3]
                for xm in (xm16, w_im.float().t().contiguous())]
    got, want = (a[..., 4 * H:5 * H].float() for a in acts)
    assert torch.equal(want, (x.float() @ w_im.float().t()).bfloat16().float())  # the float32 path: exact, rounded
    assert (got == want).float().mean() >= 0.98
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_every_copy_computes_the_gates_to_float32_accuracy_and_saturates_exactly(isa):
    """sigmoid and tanh of every copy (on the kernels' own exp in the AVX2 and AVX-512 copies, ATen's
    exp_u20 in the portable one) against float64, on
    pre-activations from -1e4 to 1e4: within 4e-7 relative error (a few float32 roundings) plus an
    absolute 2.5e-7 (tanh's 1 - 2 / (1 + exp(2z)) cancels near 0); and, once saturated, finite and
    exactly 1 or -1 (a forget gate a float32 step short of 1 slowly leaks), or under 4e-39, and
    exactly 0 where exp overflows (below -88.73: 1 / (1 + inf) is 0, as torch's sigmoid gives; an
    exp capped at FLT_MAX gave 1 / FLT_MAX, which hid a 0 * inf further on; a reciprocal estimate
    refined by r (2 - d r) gives inf * 0 there, and stalls a float32 step short of 1)."""
    H = 997  # a partial vector in every copy
    z = torch.cat([torch.linspace(-30, 30, 4 * H - 8), torch.tensor([-1e4, -89.0, -88.5, -44.0, 44.0, 88.5, 89.0, 1e4])])
    z = z[torch.randperm(4 * H, generator=torch.Generator().manual_seed(0))].view(1, 1, 4 * H)
    proj = torch.cat([z, torch.ones(1, 1, H)], -1)  # the gate pre-activations as given, xm = 1
    zeros = torch.zeros(1, H)
    from fastmlstm.ops import autograd

    with _isa(isa):
        act = autograd.sequence_forward(proj, torch.zeros(4 * H, H), torch.zeros(H, H), zeros, zeros, None, "cpu",
                                        True, False)[3][0, 0, :4 * H].double()
    zd = z.double()[0, 0]
    want = torch.cat([torch.sigmoid(zd[:3 * H]), torch.tanh(zd[3 * H:])])
    assert torch.isfinite(act).all()
    err = (act - want).abs()
    worst = (err / (4e-7 * want.abs() + 2.5e-7)).max()  # tanh near 0 cancels: an absolute part too
    assert worst <= 1, f"{worst}"
    saturated = zd.abs() > 40
    ones = saturated & (want.abs() > 0.5)
    assert torch.equal(act[ones], want[ones].sign())  # 1 or -1 exactly
    assert (act[saturated & ~ones].abs() <= 4e-39).all()
    shut = torch.zeros_like(saturated)
    shut[:3 * H] = zd[:3 * H] < -88.73  # sigmoid's exp(-z) overflows: exactly 0
    assert shut.sum() >= 2 and (act[shut] == 0).all()


@pytest.mark.parametrize("gemm", ["portable", "native"])
def test_small_batches_take_the_float32_xm_gemm_with_vnni_weights(gemm):
    """Up to NARROW_MAX_ROWS batch rows the layer's xm GEMM stays float32 with VNNI weights (oneDNN's
    bfloat16 matmul costs more per call than a generation step's GEMMs); the choice follows the
    batch, never T, and a step there equals the one-step sequence."""
    recurrence = _recurrence()
    from fastmlstm.ops.cpu import layer

    if gemm == "native" and not recurrence.native_bf16():
        pytest.skip("no native bfloat16 GEMM on this CPU; the portable twin of the same path ran")
    I, H = 8, 40
    g = torch.Generator().manual_seed(1)
    w_ih, w_im, w_hh, w_hm = (torch.randn(*s, generator=g).bfloat16() for s in ((4 * H, I), (H, I), (4 * H, H), (H, H)))
    with recurrence.forced_bf16_gemm(gemm):
        for rows, dtype in ((1, torch.float32), (recurrence.NARROW_MAX_ROWS, torch.float32),
                            (recurrence.NARROW_MAX_ROWS + 1, torch.bfloat16)):
            lay = recurrence.layout(torch.bfloat16, rows, H, I)
            assert lay == recurrence.VNNI
            assert layer._forward_packs(w_ih, w_im, w_hh, w_hm, lay, rows)[0].dtype == dtype
        x, zeros = torch.randn(6, 2, I, generator=g).bfloat16(), torch.zeros(2, H)
        step = layer.prepare_step(w_ih, w_im, None, w_hh, w_hm, 2)
        seq = layer.layer_forward(x, w_ih, w_im, None, w_hh, w_hm, zeros, zeros, None, False, False)[0]
        h, c = zeros, zeros
        for t in range(x.shape[0]):  # six steps and one six-step call: the same xm path, the same bits
            out, c = step(x[t:t + 1], h, c)
            h = out[0].float()
            assert torch.equal(out[0], seq[t])



def test_the_last_level_cache_size_comes_from_the_largest_cache_linux_reports(tmp_path):
    from fastmlstm.ops.cpu import recurrence

    for index, size in enumerate(["48K\n", "1024K", "96M", "garbage"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size)
    (tmp_path / "index9").mkdir()  # no size file: skipped
    assert recurrence.last_level_cache_bytes(str(tmp_path)) == 96 << 20
    assert recurrence.last_level_cache_bytes(str(tmp_path / "none"), default=7) == 7
    assert recurrence.kernel_report()["streamed_rows"] == {"max_rows": recurrence.STREAM_MAX_ROWS,
                                                           "from_MiB": round(recurrence.STREAM_MIN_BYTES / 2**20, 1)}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_copy_of_the_narrow_kernel_keeps_parity_at_every_row_count(isa, dtype):
    """The narrow layout (16-bit weights widened in registers) runs 1, 2, 3 or 4 rows per pass, each
    count compiled on its own (small_gemm_rows): every count, and 4 + 1, against the float64 truth,
    forward and every gradient, with the epilogues of ``isa``; bfloat16 in the float32 GEMM mode, where
    every CPU takes the narrow layout at these batches."""
    from test_cpu import _layer_failures
    from test_recurrence import _ragged_lengths

    recurrence = _recurrence()
    failures = []
    with _isa(isa), recurrence.forced_bf16_gemm("float32"):
        for rows in (1, 2, 3, 4, 5):
            assert recurrence.layout(dtype, rows, 40, 6) == (recurrence.NARROW if rows <= 4 else recurrence.FLOAT32)
            failures += _layer_failures(dtype, (dtype, 3, rows, 6, 40, _ragged_lengths(3, rows) if rows > 2 else None))
    assert not failures, "\n".join(failures)
