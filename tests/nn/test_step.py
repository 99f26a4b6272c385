"""The single step: ``multiplicative_lstm_step`` and ``FastMLSTM.step``, and the prepared step the CPU
backend keeps for them (its packed weights bound once, :func:`fastmlstm.ops.layer_step`).

A step is the sequence path with T = 1 through the same kernel, so every comparison here is bit for
bit: the prepared step against a fresh one-step sequence, after every change that must reach it
(weights written in place, the epilogues' instruction set, the bf16 GEMM mode, the batch size)."""

import gc
import weakref

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES
from tolerances import ABS, FACTOR, rel_err

import fastmlstm
from fastmlstm import FastMLSTM, multiplicative_lstm, multiplicative_lstm_step
from fastmlstm.errors import InputError, InputTypeError

I, H, B = 5, 24, 3
CPU = "cpu" in fastmlstm.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not CPU, reason="the CPU backend's extension does not build here")


def _weights(dtype=torch.float32, device=DEVICE, seed=0, inputs=I):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4 * H, inputs), (4 * H, H), (H, inputs), (H, H), (4 * H,)]
    return [(0.3 * torch.randn(s, generator=g)).to(device, dtype) for s in shapes]


def _state(dtype=torch.float32, rows=B, device=DEVICE):
    return (0.5 * torch.randn(rows, H)).to(device, dtype), (0.5 * torch.randn(rows, H)).to(device)


def _one_step_sequence(x, weights, state, backend):
    """The same step through the sequence path: (output [B, H], (h, c))."""
    out, (h, c) = multiplicative_lstm(x.unsqueeze(0), *weights, initial_state=state, backend=backend)
    return out[0], (h, c)


def _assert_same(a, b):
    (out_a, (h_a, c_a)), (out_b, (h_b, c_b)) = a, b
    assert out_a.dtype == out_b.dtype and h_a.dtype == h_b.dtype == c_a.dtype == torch.float32
    assert torch.equal(out_a, out_b) and torch.equal(h_a, h_b) and torch.equal(c_a, c_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_step_is_the_one_step_sequence_bit_for_bit(backend, dtype):
    weights, x = _weights(dtype), torch.randn(B, I).to(DEVICE, dtype)
    state = _state(dtype)
    with torch.no_grad():
        for _ in range(3):  # the prepared step's first use and two reuses
            step = multiplicative_lstm_step(x, *weights, initial_state=state, backend=backend)
            _assert_same(step, _one_step_sequence(x, weights, state, backend))
            state = step[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_steps_through_a_sequence_as_its_forward_does(backend):
    rnn = FastMLSTM(I, H, backend=backend).to(DEVICE)
    x = torch.randn(6, B, I, device=DEVICE)
    with torch.no_grad():
        out, (h, c) = rnn(x)
        state, steps = None, []
        for t in range(x.shape[0]):
            y, state = rnn.step(x[t], state)
            steps.append(y)
    # Six one-step calls against one six-step call: the input GEMMs see 3 rows instead of 18, so
    # their blocking (and the last bits) may differ.
    assert state[0].shape == state[1].shape == (1, B, H)
    for got, want in ((torch.stack(steps), out), (state[0], h), (state[1], c)):
        assert rel_err(got, want) <= ABS[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stack_steps_layer_by_layer_as_its_forward_does_with_one_step(backend):
    rnn = FastMLSTM(I, H, num_layers=3, dropout=0.5, backend=backend).to(DEVICE).eval()  # eval: no dropout
    x = torch.randn(B, I, device=DEVICE)
    state = tuple(0.5 * torch.randn(3, B, H, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        out, (h, c) = rnn.step(x, state)
        want, (h_want, c_want) = rnn(x.unsqueeze(0), state)
    assert h.shape == c.shape == (3, B, H)
    assert torch.equal(out, want[0]) and torch.equal(h, h_want) and torch.equal(c, c_want)


@needs_cpu
def test_the_prepared_step_sees_weights_written_in_place():
    weights, x, state = _weights(device="cpu"), torch.randn(B, I), _state(device="cpu")
    with torch.no_grad():
        before = multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu")
        weights[1].mul_(1.5)  # an in-place update of W_hh, as an optimizer step does
        after = multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu")
    assert not torch.equal(before[0], after[0])
    _assert_same(after, _one_step_sequence(x, weights, state, "cpu"))


@needs_cpu
def test_the_prepared_step_follows_the_batch_size():
    weights = _weights(device="cpu")
    with torch.no_grad():
        for rows in (1, 4, 1, 7):
            x, state = torch.randn(rows, I), _state(rows=rows, device="cpu")
            _assert_same(multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu"),
                         _one_step_sequence(x, weights, state, "cpu"))


@needs_cpu
def test_the_prepared_step_runs_every_instruction_set_of_the_epilogues():
    from fastmlstm.ops.cpu import recurrence

    weights, x, state = _weights(device="cpu"), torch.randn(B, I), _state(device="cpu")
    with torch.no_grad():
        multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu")  # prepared in the default
        for isa in recurrence.kernel_isas():
            with recurrence.forced_kernel_isa(isa):
                _assert_same(multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu"),
                             _one_step_sequence(x, weights, state, "cpu"))


@needs_cpu
@pytest.mark.parametrize("rows", [2, 6])  # 16-bit weights read as they are (<= 4 rows), VNNI / float32 packs
def test_the_prepared_step_follows_the_bf16_gemm_mode(rows):
    from fastmlstm.ops.cpu import recurrence

    inputs = 6  # even K throughout (H + I and I), so that the VNNI layout applies
    weights, x = _weights(torch.bfloat16, "cpu", inputs=inputs), torch.randn(rows, inputs).bfloat16()
    state = _state(torch.bfloat16, rows, "cpu")
    modes = [m for m in recurrence.BF16_GEMMS if m != "native" or recurrence.native_bf16()]
    results = {}
    with torch.no_grad():
        for mode in modes + modes[::-1]:
            with recurrence.forced_bf16_gemm(mode):
                step = multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu")
                _assert_same(step, _one_step_sequence(x, weights, state, "cpu"))
                results.setdefault(mode, []).append(step[0])
    assert all(torch.equal(a, b) for a, b in results.values())


@needs_cpu
def test_the_prepared_step_keeps_no_weight_alive():
    weights = _weights(device="cpu")
    with torch.no_grad():
        multiplicative_lstm_step(torch.randn(B, I), *weights, backend="cpu")
    refs = [weakref.ref(w) for w in weights]
    del weights
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_through_the_step_as_through_the_sequence(backend):
    weights = [w.requires_grad_() for w in _weights()]
    x = torch.randn(B, I, device=DEVICE, requires_grad=True)
    h0, c0 = _state()
    out, (h, c) = multiplicative_lstm_step(x, *weights, initial_state=(h0, c0), backend=backend)
    got = torch.autograd.grad(out.sum() + 2 * c.sum(), [x, *weights])
    out2, (h2, c2) = _one_step_sequence(x, weights, (h0, c0), backend)
    want = torch.autograd.grad(out2.sum() + 2 * c2.sum(), [x, *weights])
    assert torch.equal(out, out2) and torch.equal(c, c2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_module_step_under_autocast_runs_in_the_autocast_dtype():
    rnn = FastMLSTM(I, H)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = rnn.step(torch.randn(B, I))
    assert out.dtype == torch.bfloat16 and h.dtype == c.dtype == torch.float32 and h.shape == (1, B, H)


@pytest.mark.parametrize("bad, error, words", [
    (lambda w, s: multiplicative_lstm_step(torch.randn(1, B, I), *w), InputError, "step input must be 2-D"),
    (lambda w, s: multiplicative_lstm_step(torch.randn(B, I + 1), *w), InputError, "weight_ih must have shape"),
    (lambda w, s: multiplicative_lstm_step(torch.randn(B, I).double(), *w), InputTypeError, "dtype"),
    (lambda w, s: multiplicative_lstm_step(torch.randn(B, I), *w, initial_state=(s[0][:1], s[1])), InputError,
     "initial_state h0 must have shape"),
    (lambda w, s: multiplicative_lstm_step("x", *w), InputTypeError, "input must be a torch.Tensor"),
    (lambda w, s: FastMLSTM(I, H).step(torch.randn(B, I + 1)), InputError, "input_size"),
    (lambda w, s: FastMLSTM(I, H).step(torch.randn(B, I), (s[0], s[1])), InputError, "hx h_0 must have shape"),
])
def test_a_bad_step_is_a_clear_error(bad, error, words):
    with pytest.raises(error, match=words):
        bad(_weights(torch.float32, "cpu"), _state(device="cpu"))


# FastMLSTM.step through the prepared steps it keeps with its cached weights (FastMLSTM._prepared_steps),
# against the same module with that path switched off (the functional step) and against its forward.

def _functional_steps(monkeypatch, rnn, x, state):
    with monkeypatch.context() as m:
        m.setattr(FastMLSTM, "_prepared_steps", lambda *args: None)
        return rnn.step(x, state)


def _memos(rnn):
    from fastmlstm.nn import weight_cache

    entry = weight_cache._ENTRIES.get(rnn)
    return {} if entry is None else entry.memos


def _assert_same_stacked(a, b):
    (out_a, (h_a, c_a)), (out_b, (h_b, c_b)) = a, b
    assert out_a.dtype == out_b.dtype and h_a.dtype == h_b.dtype == c_a.dtype == torch.float32
    assert torch.equal(out_a, out_b) and torch.equal(h_a, h_b) and torch.equal(c_a, c_b)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layers, inputs", [(1, I), (2, 6)])
def test_the_module_step_through_its_prepared_steps_is_the_functional_step_bit_for_bit(monkeypatch, dtype, layers,
                                                                                      inputs):
    rnn = FastMLSTM(inputs, H, num_layers=layers, backend="cpu").to(dtype)
    with torch.no_grad():
        for rows in (1, 3, 1):  # a new batch size, and back
            x = torch.randn(rows, inputs).to(dtype)
            state = tuple(0.5 * torch.randn(layers, rows, H) for _ in range(2))
            for _ in range(2):  # prepared, then reused
                got = rnn.step(x, state)
                _assert_same_stacked(got, _functional_steps(monkeypatch, rnn, x, state))
                state = got[1]
            assert _memos(rnn), "the step did not go through the prepared steps"
            out, (h, c) = rnn(x.unsqueeze(0), state)
            _assert_same_stacked(rnn.step(x, state), (out[0], (h, c)))


@needs_cpu
def test_the_module_step_follows_its_parameters_and_the_kernel_switches(monkeypatch):
    from fastmlstm.ops.cpu import recurrence

    inputs = 5  # odd: layer 0 never takes the VNNI layout, layer 1 (K = H) may: both keys must count
    rnn = FastMLSTM(inputs, H, num_layers=2, backend="cpu").bfloat16()
    x = torch.randn(6, inputs).bfloat16()
    state = tuple(0.5 * torch.randn(2, 6, H) for _ in range(2))
    modes = [m for m in recurrence.BF16_GEMMS if m != "native" or recurrence.native_bf16()]
    with torch.no_grad():
        first = rnn.step(x, state)
        for mode in modes + modes[::-1]:
            with recurrence.forced_bf16_gemm(mode):
                _assert_same_stacked(rnn.step(x, state), _functional_steps(monkeypatch, rnn, x, state))
        for isa in recurrence.kernel_isas():
            with recurrence.forced_kernel_isa(isa):
                _assert_same_stacked(rnn.step(x, state), _functional_steps(monkeypatch, rnn, x, state))
        rnn.weight_hh_l1_g.mul_(1.5)  # an in-place update (of the norm: v alone is scale-free), as a step does
        after = rnn.step(x, state)
    assert not torch.equal(first[0], after[0])
    _assert_same_stacked(after, _functional_steps(monkeypatch, rnn, x, state))


@needs_cpu
def test_the_module_step_keeps_the_functional_checks_and_autograd():
    rnn = FastMLSTM(I, H, backend="cpu").requires_grad_(False)
    x, state = torch.randn(B, I), tuple(0.5 * torch.randn(1, B, H) for _ in range(2))
    with torch.no_grad():
        rnn.step(x, state)  # prepared
        with pytest.raises(InputTypeError, match="dtype"):
            rnn.step(x.bfloat16(), state)
        with pytest.raises(InputTypeError, match="initial_state h0 has dtype torch.float64"):
            rnn.step(x, (state[0].double(), state[1]))
    x.requires_grad_()  # frozen weights, an input to differentiate: the functional path's autograd
    out, (h, c) = rnn.step(x, state)
    (grad,) = torch.autograd.grad(out.sum() + c.sum(), [x])
    with torch.no_grad():
        want = rnn.step(x, state)
    assert torch.equal(out, want[0]) and grad.abs().sum() > 0


@needs_cpu
def test_the_module_keeps_a_bounded_number_of_prepared_steps():
    from fastmlstm.nn import weight_cache

    rnn = FastMLSTM(I, H, backend="cpu")
    with torch.no_grad():
        for rows in range(1, weight_cache.MAX_MEMOS + 5):  # a prepared step per batch size
            rnn.step(torch.randn(rows, I))
    assert len(_memos(rnn)) == weight_cache.MAX_MEMOS


@pytest.fixture
def portable_vnni():
    """VNNI-packed bfloat16 weights on every CPU: the portable twin where the CPU has no bfloat16 dot
    products (whose default, the float32 mode, takes the narrow layout at every batch of up to 4 rows)."""
    from fastmlstm.ops.cpu import recurrence

    with recurrence.forced_bf16_gemm("portable"):
        yield


@needs_cpu
def test_a_few_streamed_rows_read_bf16_weights_as_they_are(monkeypatch, portable_vnni):
    """One to three batch rows over weights far past the last-level cache take the narrow layout (the
    plain 16-bit kernel streams them faster than the VNNI micro-kernel at so few rows); four rows, and
    the backward, keep theirs. The threshold is lowered here so that a small layer crosses it."""
    from fastmlstm.ops.cpu import recurrence

    monkeypatch.setattr(recurrence, "STREAM_MIN_BYTES", 10 * H * H)
    for rows in range(1, recurrence.STREAM_MAX_ROWS + 1):
        assert recurrence.layout(torch.bfloat16, rows, H, 6) == recurrence.NARROW
    assert recurrence.layout(torch.bfloat16, 1, H - 2, 6) != recurrence.NARROW
    assert recurrence.layout(torch.bfloat16, recurrence.STREAM_MAX_ROWS + 1, H, 6) != recurrence.NARROW
    assert recurrence.layout(torch.bfloat16, 1, H, 6, backward=True) != recurrence.NARROW
    weights, x = _weights(torch.bfloat16, "cpu", inputs=6), torch.randn(1, 6).bfloat16()
    state = _state(torch.bfloat16, 1, "cpu")
    with torch.no_grad():
        step = multiplicative_lstm_step(x, *weights, initial_state=state, backend="cpu")
        _assert_same(step, _one_step_sequence(x, weights, state, "cpu"))
        truth = multiplicative_lstm_step(x.double(), *(w.double() for w in weights),
                                         initial_state=tuple(s.double() for s in state), backend="reference")
        ref = multiplicative_lstm_step(x, *weights, initial_state=state, backend="reference")
    for got, base, want in ((step[0], ref[0], truth[0]), (step[1][1], ref[1][1], truth[1][1])):
        assert rel_err(got, want) <= FACTOR * rel_err(base, want) + ABS[torch.bfloat16]


@needs_cpu
def test_a_streamed_forward_and_its_backward_keep_the_parity_rule(monkeypatch, portable_vnni):
    """Below STREAM_MAX_ROWS rows over weights past the cache the forward takes the narrow layout and
    the backward its own (VNNI where the CPU has it): the gradients still keep the parity rule."""
    from fastmlstm.ops.cpu import recurrence

    monkeypatch.setattr(recurrence, "STREAM_MIN_BYTES", 10 * H * H)
    inputs, rows = 6, 2
    base = [w.requires_grad_() for w in _weights(torch.bfloat16, "cpu", inputs=inputs)]
    x = torch.randn(4, rows, inputs).bfloat16().requires_grad_()
    state = _state(torch.float32, rows, "cpu")
    grad_out = torch.randn(4, rows, H)

    def grads(backend, dtype):
        tensors = [t.detach().to(dtype).requires_grad_() for t in (x, *base)]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        out, (h, c) = multiplicative_lstm(tensors[0], *tensors[1:], initial_state=tuple(s.to(acc) for s in state),
                                          backend=backend)
        return torch.autograd.grad((out.double() * grad_out.double()).sum() + c.double().sum(), tensors)

    truth, ref, got = grads("reference", torch.float64), grads("reference", torch.bfloat16), grads("cpu", torch.bfloat16)
    for g, r, t in zip(got, ref, truth):
        assert rel_err(g, t) <= FACTOR * rel_err(r, t) + ABS[torch.bfloat16]
