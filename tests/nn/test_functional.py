"""The functional forms (``multiplicative_lstm``, ``multiplicative_lstm_recurrence``,
``multiplicative_lstm_step``) and the door into the backends (``fastmlstm.ops``) on the inputs an
audit found mishandled: a ``weight_hm`` checked only for its first dimension, an empty batch sent to
the CPU kernels through the door (a division by zero there), plain tensors on the meta device,
autocast (which each backend obeyed differently), lengths of unsigned dtypes or beyond int64; and,
on every backend, views, stride-0 and transposed operands with only some inputs requiring grad,
against the float64 truth."""

import doctest
import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, DEVICE, REPO
from mlstm_f64 import mlstm_f64
from tolerances import ABS, FACTOR, REFERENCE, rel_err

import fastmlstm
from fastmlstm import FastMLSTM, multiplicative_lstm, multiplicative_lstm_recurrence, multiplicative_lstm_step, ops
from fastmlstm.errors import InputError, InputTypeError

T, B, I, H = 3, 2, 4, 6
CPU = "cpu" in fastmlstm.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not CPU, reason="the CPU backend's extension does not build here")


def _weights(dtype=torch.float32, device=DEVICE, seed=0, inputs=I, hidden=H):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4 * hidden, inputs), (4 * hidden, hidden), (hidden, inputs), (hidden, hidden), (4 * hidden,)]
    return [(0.4 * torch.randn(s, generator=g)).to(device, dtype) for s in shapes]


def _state(rows=B, device=DEVICE):
    return 0.5 * torch.randn(rows, H, device=device), torch.randn(rows, H, device=device)


def _calls(weights, x, state, backend):
    """The sequence and the step with these weights, as (name, thunk)."""
    return [("sequence", lambda: multiplicative_lstm(x, *weights, initial_state=state, backend=backend)),
            ("step", lambda: multiplicative_lstm_step(x[0], *weights, initial_state=state, backend=backend))]


BAD_WEIGHT_HM = [
    (lambda w: torch.randn(H, H + 1, device=w.device), InputError, r"weight_hm must have shape \[6, 6\], got \[6, 7\]"),
    (lambda w: w.to(torch.bfloat16), InputTypeError, "weight_hm has dtype torch.bfloat16"),
    (lambda w: w.to("meta"), InputError, "weight_hm is on meta"),
    (lambda w: torch.randn(0, H, device=w.device), InputError, r"weight_hm must be \[H, H\] with H > 0"),
]


@pytest.mark.parametrize("bad, error, words", BAD_WEIGHT_HM, ids=["not-square", "dtype", "device", "empty"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_hm_is_checked_as_the_other_weights_are(backend, bad, error, words):
    """Only its first dimension (H) was read: a non-square one crashed in the CPU backend's C++ or
    the reference's matmul, and one of another dtype ran as it was in the reference's step."""
    weights = _weights()
    weights[3] = bad(weights[3])
    for name, call in _calls(weights, torch.randn(T, B, I, device=DEVICE), _state(), backend):
        with pytest.raises(error, match=words):
            call()


@needs_cpu
def test_an_empty_batch_through_the_door_runs_without_the_kernels():
    """``ops.sequence``, ``ops.layer`` and ``ops.layer_step`` with ``backend="cpu"`` and B = 0 sent
    the batch to the C++ time loop, which divides by B: the process died of SIGFPE. In a child
    process, so that a regression fails this test and not the whole run."""
    code = """if True:
        import torch
        from fastmlstm import ops
        H, I = 6, 4
        w = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(H, I), torch.randn(H, H), torch.randn(4 * H)]
        e = torch.zeros(0, H)
        proj = torch.randn(2, 0, 5 * H, requires_grad=True)
        out, c_n, _ = ops.sequence(proj, w[1], w[3], e, e, None, "cpu", False)
        out.sum().backward()
        print(tuple(out.shape), tuple(c_n.shape), tuple(proj.grad.shape))
        out, c_n, _ = ops.layer(torch.randn(2, 0, I), *w, e, e, None, "cpu", False)
        print(tuple(out.shape), tuple(c_n.shape))
        out, c_n = ops.layer_step(torch.randn(0, I), *w, e, e, "cpu")
        print(tuple(out.shape), tuple(c_n.shape))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=600, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split("\n")[:3] == ["(2, 0, 6) (0, 6) (2, 0, 30)", "(2, 0, 6) (0, 6)", "(0, 6) (0, 6)"]


def test_the_cpu_kernels_refuse_an_empty_batch_instead_of_dividing_by_it():
    """A prepared step of 2 rows called with none (its inputs are the caller's to check) reached the
    loops' division by B: SIGFPE. The C++ forward operators refuse B = 0 with an error now."""
    code = """if True:
        import torch
        from fastmlstm import ops
        H, I = 6, 4
        w = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(H, I), torch.randn(H, H), torch.randn(4 * H)]
        step = ops.prepare_step("cpu", w[0], w[1], w[2], w[3], w[4], 2)
        try:
            step(torch.zeros(1, 0, I), torch.zeros(0, H), torch.zeros(0, H))
        except RuntimeError as exc:
            print("refused:", "B > 0 rows" in str(exc))
        sequence_step = ops.prepare_sequence_step("cpu", w[1], w[3], 2)
        try:
            sequence_step(torch.zeros(1, 0, 5 * H), torch.zeros(0, H), torch.zeros(0, H))
        except RuntimeError as exc:
            print("refused:", "B > 0 rows" in str(exc))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=600, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split("\n")[-3:-1] == ["refused: True", "refused: True"], done.stdout


def test_the_functional_forms_give_shapes_on_the_meta_device_without_autograd():
    """Plain meta tensors (a model built before its weights exist, run under no_grad) took the
    direct path, which entered autocast on "meta": "unsupported scalarType"."""
    weights = [w.to("meta") for w in _weights(device="cpu")]
    x = torch.randn(T, B, I, device="meta")
    out, (h, c), cells = multiplicative_lstm(x, *weights, lengths=[3, 1], return_cell_states=True)
    assert (out.shape, h.shape, c.shape, cells.shape) == ((T, B, H), (B, H), (B, H), (T, B, H))
    out, (h, c) = multiplicative_lstm_step(x[0], *weights)
    assert (out.shape, h.shape, c.dtype) == ((B, H), (B, H), torch.float32)
    out, (h, c) = multiplicative_lstm_recurrence(torch.randn(T, B, 5 * H, device="meta"), weights[1], weights[3])
    assert (out.shape, c.shape) == ((T, B, H), (B, H))
    rnn = FastMLSTM(I, H, device="meta")
    with torch.no_grad():
        out, (h, c) = rnn(x)
        step_out, _ = rnn.step(x[0])
    assert (out.shape, h.shape, step_out.shape) == ((T, B, H), (1, B, H), (B, H))


def _run_all(weights, x, state, backend):
    """Sequence (with its gradients), step and recurrence: a flat list of results."""
    leaf = x.detach().clone().requires_grad_()
    out, (h, c) = multiplicative_lstm(leaf, *weights, initial_state=state, lengths=[3, 2], backend=backend)
    (grad,) = torch.autograd.grad(out.float().sum() + c.sum(), leaf)
    step, (sh, sc) = multiplicative_lstm_step(x[0], *weights, initial_state=state, backend=backend)
    proj = torch.randn(T, B, 5 * H, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    rec, (rh, rc) = multiplicative_lstm_recurrence(proj, weights[1], weights[3], initial_state=state, backend=backend)
    return [out, h, c, grad, step, sh, sc, rec, rh, rc]


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast_every_backend_runs_in_the_autocast_dtype(backend):
    """As FastMLSTM does: the same numbers as the call on inputs and weights cast to bfloat16. The
    CPU backend ran in float32, the reference on autocast's bfloat16 projections with float32
    recurrent weights, and the recurrence ignored autocast."""
    weights, x, state = _weights(), torch.randn(T, B, I, device=DEVICE), _state()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = _run_all(weights, x, state, backend)
    want = _run_all([w.bfloat16() for w in weights], x.bfloat16(), state, backend)
    want[3] = want[3].float()  # the gradient reaches the float32 input through its cast
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_door_keeps_the_input_projections_in_the_weights_dtype_under_autocast(backend):
    """``ops.layer`` takes checked inputs of one dtype; autocast rounded the projections of the
    backends without a layer entry alone to 16 bits, and they met float32 recurrent weights."""
    weights, x, (h0, c0) = _weights(), torch.randn(T, B, I, device=DEVICE), _state()
    with torch.no_grad():
        want = ops.layer(x, *weights, h0, c0, None, backend, True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got = ops.layer(x, *weights, h0, c0, None, backend, True)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


UNSIGNED = [torch.uint8, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, *UNSIGNED], ids=str)
def test_lengths_of_every_integer_dtype_are_read(dtype):
    """torch computes no min or max of uint16/32/64: NotImplementedError from the range check."""
    weights, x = _weights(), torch.randn(T, B, I, device=DEVICE)
    want, _ = multiplicative_lstm(x, *weights, lengths=[3, 1], backend="reference")
    got, _ = multiplicative_lstm(x, *weights, lengths=torch.tensor([3, 1]).to(dtype), backend="reference")
    assert torch.equal(got, want)
    with pytest.raises(InputError, match=r"lengths must lie in \[0, T\] = \[0, 3\]"):
        multiplicative_lstm(x, *weights, lengths=torch.tensor([4, 1]).to(dtype), backend="reference")


@pytest.mark.parametrize("lengths", [[2**70, 1], [1, -2**64], torch.tensor([2**64 - 1, 1], dtype=torch.uint64)],
                         ids=["huge", "hugely-negative", "uint64-max"])
def test_lengths_beyond_int64_are_out_of_range(lengths):
    """They overflowed in torch.tensor (ValueError), or wrapped to a negative int64 unseen."""
    weights, x = _weights(), torch.randn(T, B, I, device=DEVICE)
    with pytest.raises(InputError, match=r"lengths must lie in \[0, T\] = \[0, 3\], got values in \[-?\d+, \d+\]"):
        multiplicative_lstm(x, *weights, lengths=lengths, backend="reference")
    with pytest.raises(InputError, match="lengths must lie in"):
        multiplicative_lstm_recurrence(torch.randn(T, B, 5 * H, device=DEVICE), weights[1], weights[3],
                                       lengths=lengths, backend="reference")


def _views(g):
    """Operands as views (float32): x a transposed batch-first tensor, the weights transposed
    copies read back through .t(), the bias and c0 expanded (stride 0), h0 transposed."""
    x = torch.randn(B, T, I, generator=g).to(DEVICE).transpose(0, 1)
    weights = [w.t().contiguous().t() for w in _weights(seed=2)[:4]]
    bias = torch.randn(1, generator=g).to(DEVICE).expand(4 * H)
    h0 = (0.5 * torch.randn(H, B, generator=g)).to(DEVICE).t()
    c0 = torch.randn(1, H, generator=g).to(DEVICE).expand(B, H)
    return [x, *weights, bias, h0, c0]


def _grads(results, leaves, g):
    outputs = [r for r in results if r.requires_grad]
    loss = sum((r.double() * torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.device)).sum()
               for r in outputs)
    wanted = [v for v in leaves if v.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [next(grads) if v.requires_grad else None for v in leaves]


def _functional(views, wants_grad, backend):
    """multiplicative_lstm on the views, each leaf requiring grad as asked: results and gradients."""
    leaves = [v.detach().requires_grad_(w) for v, w in zip(views, wants_grad)]
    x, *weights, h0, c0 = leaves
    lengths = torch.tensor([2, 0], dtype=torch.int32)
    out, (h, c), cells = multiplicative_lstm(x, *weights, initial_state=(h0, c0), lengths=lengths, backend=backend,
                                             return_cell_states=True)
    results = [out, h, c, cells]
    return results, _grads(results, leaves, torch.Generator().manual_seed(5)) if any(wants_grad) else []


def _truth(views, wants_grad):
    leaves = [v.detach().double().requires_grad_(w) for v, w in zip(views, wants_grad)]
    x, w_ih, w_hh, w_im, w_hm, b, h0, c0 = leaves
    results = list(mlstm_f64(x, w_ih, w_hh, w_im, w_hm, b, h0, c0, [2, 0]))
    return results, _grads(results, leaves, torch.Generator().manual_seed(5)) if any(wants_grad) else []


GRAD_CASES = {"all": [True] * 8, "x": [True] + [False] * 7, "weight_hm": [False] * 4 + [True] + [False] * 3,
              "h0": [False] * 6 + [True, False], "c0": [False] * 7 + [True], "none": [False] * 8}


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_views_and_partial_gradients_match_the_float64_truth(backend, case):
    views = _views(torch.Generator().manual_seed(4))
    got, got_grads = _functional(views, GRAD_CASES[case], backend)
    ref, ref_grads = _functional(views, GRAD_CASES[case], "reference")
    truth, truth_grads = _truth(views, GRAD_CASES[case])
    assert len(got_grads) == len(truth_grads)
    for k, (a, r, t) in enumerate(zip(got + got_grads, ref + ref_grads, truth + truth_grads)):
        if t is None:
            assert a is None and r is None, k
            continue
        err_ref = rel_err(r, t.detach())
        assert err_ref <= REFERENCE[torch.float32], k
        assert rel_err(a, t.detach()) <= FACTOR * err_ref + ABS[torch.float32], k


def test_the_docstring_examples_give_the_shapes_they_show():
    for module in (fastmlstm.nn.functional,):
        result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, result
