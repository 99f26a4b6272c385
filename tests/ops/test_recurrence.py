"""Every backend against the float64 truth and the reference: outputs, final states, all cell
states and every gradient, at awkward shapes, in float32, float16 and bfloat16."""

import functools

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES, KERNEL_BACKENDS, ON_GPU
from mlstm_f64 import mlstm_f64, weight_norm_f64
from tolerances import ABS, FACTOR, REFERENCE, rel_err
from torch.nn.utils.rnn import pack_sequence

from fastmlstm import FastMLSTM, multiplicative_lstm_recurrence

# (T, B, I, H): T = 1 and B = 1; odd H with B not a multiple of 8; H spanning several kernel
# blocks; an empty sequence. With a GPU, real sizes too.
SHAPES = [(1, 1, 3, 5), (6, 5, 7, 19), (4, 9, 4, 33), (0, 3, 4, 8)]
if ON_GPU:
    SHAPES += [(9, 37, 64, 1031), (8, 128, 64, 4096)]


def _ragged_lengths(T, B):
    """Unsorted lengths in [0, T] with the full length present and, for B > 2, an empty row."""
    lens = [(T * (b + 1)) // B for b in range(B)][::-1]
    if B > 2:
        lens[1] = 0
    return tuple(lens)


@functools.lru_cache(maxsize=None)
def _case(T, B, I, H, seed=0):
    """Float32 master parameters, inputs and loss weights of one test case (CPU)."""
    g = torch.Generator().manual_seed(seed)
    rnn = FastMLSTM(I, H)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.endswith("_g"):  # gains away from the rows' norms, so their gradients matter
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "bias_ih":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in rnn.state_dict().items()}
    x = torch.randn(T, B, I, generator=g)
    h0 = 0.5 * torch.randn(B, H, generator=g)
    c0 = torch.randn(B, H, generator=g)
    loss_w = [torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g),
              torch.randn(B, H, generator=g), torch.randn(T, B, H, generator=g)]
    return state, x, h0, c0, loss_w


def _run(backend, dtype, T, B, I, H, lengths):
    """Run the module; return forward values and gradients as float64 CPU tensors, by name. Cached
    per case and per state of the switches that choose what runs (a test that forces the CPU
    backend's kernels, GEMMs or K split must run them, not find another setting's results)."""
    return _run_once(backend, dtype, T, B, I, H, lengths, _switches(backend))


def _switches(backend) -> tuple:
    """The thread count and, for the CPU backend, every forced choice its kernel report shows."""
    if backend != "cpu":
        return (torch.get_num_threads(),)
    from fastmlstm.ops.cpu import recurrence

    r = recurrence.kernel_report()
    return (torch.get_num_threads(), r["epilogues"], r["bf16_gemm"], r["weight_grad_gemm"], tuple(r["k_split_bytes"]))


@functools.lru_cache(maxsize=None)
def _run_once(backend, dtype, T, B, I, H, lengths, switches):
    state, x, h0, c0, (w_out, w_h, w_c, w_cells) = _case(T, B, I, H)
    rnn = FastMLSTM(I, H, backend=backend).to(DEVICE, dtype)
    rnn.load_state_dict(state)
    # clone: .to() may hand back the cached master tensor itself, whose .grad would then accumulate.
    x = x.to(DEVICE, dtype).clone().requires_grad_()
    h0 = h0.to(DEVICE).unsqueeze(0).clone().requires_grad_()
    c0 = c0.to(DEVICE).unsqueeze(0).clone().requires_grad_()
    out, (h_n, c_n), cells = rnn(x, (h0, c0), lengths=None if lengths is None else list(lengths),
                                 return_cell_states=True)
    assert out.dtype == dtype and h_n.dtype == c_n.dtype == cells.dtype == torch.float32
    loss = ((out.float() * w_out.to(DEVICE)).sum() + (h_n[0] * w_h.to(DEVICE)).sum()
            + (c_n[0] * w_c.to(DEVICE)).sum() + (cells * w_cells.to(DEVICE)).sum())
    loss.backward()
    result = {"output": out, "h_n": h_n[0], "c_n": c_n[0], "cell_states": cells,
              "grad_input": x.grad, "grad_h0": h0.grad[0], "grad_c0": c0.grad[0]}
    result.update({f"grad_{n}": p.grad for n, p in rnn.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in result.items()}


@functools.lru_cache(maxsize=None)
def _truth(dtype, T, B, I, H, lengths):
    """Float64 truth for the parameters and inputs as rounded to ``dtype``."""
    state, x, h0, c0, (w_out, w_h, w_c, w_cells) = _case(T, B, I, H)
    leaf = {k: v.to(dtype).double().requires_grad_() for k, v in state.items()}
    x = x.to(dtype).double().requires_grad_()
    h0 = h0.double().requires_grad_()
    c0 = c0.double().requires_grad_()
    w = {n: weight_norm_f64(leaf[f"{n}_v"], leaf[f"{n}_g"]) for n in ("weight_ih", "weight_hh", "weight_im", "weight_hm")}
    out, h_n, c_n, cells = mlstm_f64(x, w["weight_ih"], w["weight_hh"], w["weight_im"], w["weight_hm"],
                                     leaf["bias_ih"], h0, c0, lengths)
    loss = ((out * w_out.double()).sum() + (h_n * w_h.double()).sum() + (c_n * w_c.double()).sum()
            + (cells * w_cells.double()).sum())
    loss.backward()
    result = {"output": out, "h_n": h_n, "c_n": c_n, "cell_states": cells,
              "grad_input": x.grad, "grad_h0": h0.grad, "grad_c0": c0.grad}
    result.update({f"grad_{n}": p.grad for n, p in leaf.items()})
    inputs = {"grad_input": x, **{f"grad_{n}": p for n, p in leaf.items()}}
    # With T = 0 nothing reaches the weights or the input: their gradients are zero.
    return {k: torch.zeros_like(inputs[k]) if v is None else v.detach() for k, v in result.items()}


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_truth(backend, dtype, shape, ragged):
    T, B, I, H = shape
    key = (dtype, T, B, I, H, _ragged_lengths(T, B) if ragged else None)
    truth = _truth(*key)
    ref = _run("reference", *key)
    got = ref if backend == "reference" else _run(backend, *key)
    assert got.keys() == truth.keys()
    failures = []
    for name in truth:
        err_ref = rel_err(ref[name], truth[name])
        err = rel_err(got[name], truth[name])
        if err_ref > REFERENCE[dtype]:
            failures.append(f"reference {name}: error {err_ref:.2e} > {REFERENCE[dtype]:.1e}")
        if err > FACTOR * err_ref + ABS[dtype]:
            failures.append(f"{backend} {name}: error {err:.2e} > {FACTOR} x reference {err_ref:.2e} + {ABS[dtype]:.0e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_batch_equals_each_sequence_alone(backend):
    I, H = 5, 21
    rnn = FastMLSTM(I, H, backend=backend).to(DEVICE)
    seqs = [torch.randn(n, I, device=DEVICE, requires_grad=True) for n in (5, 2, 7, 1, 7)]
    packed_out, (h_n, c_n) = rnn(pack_sequence(seqs, enforce_sorted=False))
    grads = torch.autograd.grad((packed_out.data ** 2).sum() + h_n.sum() + c_n.sum(), seqs)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out)
    for b, seq in enumerate(seqs):
        out, (h, c) = rnn(seq.unsqueeze(1))
        grad, = torch.autograd.grad((out ** 2).sum() + h.sum() + c.sum(), seq)
        n = seq.shape[0]
        torch.testing.assert_close(padded[:n, b], out[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_n[0, b], h[0, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_n[0, b], c[0, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[b], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_recurrence_is_bit_exact(backend, dtype):
    """Carrying (h_n, c_n) from one call into the next reproduces one long call bit for bit."""
    T, B, H = 9, 3, 24
    proj = torch.randn(T, B, 5 * H, device=DEVICE).to(dtype)
    w_hh = (torch.randn(4 * H, H, device=DEVICE) / H ** 0.5).to(dtype)
    w_hm = (torch.randn(H, H, device=DEVICE) / H ** 0.5).to(dtype)
    out, (h, c), cells = multiplicative_lstm_recurrence(proj, w_hh, w_hm, backend=backend, return_cell_states=True)
    state, pieces = None, []
    for chunk in (proj[:4], proj[4:5], proj[5:], proj[9:]):
        piece, state = multiplicative_lstm_recurrence(chunk, w_hh, w_hm, initial_state=state, backend=backend)
        pieces.append(piece)
    assert torch.equal(torch.cat(pieces), out)
    assert torch.equal(state[0], h) and torch.equal(state[1], c) and torch.equal(c, cells[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_module_calls_match_one_call(backend, dtype):
    """Through the module only the input GEMM differs (BLAS blocks 3 rows unlike 27): rounding only."""
    I, H, B = 6, 24, 3
    rnn = FastMLSTM(I, H, backend=backend).to(DEVICE, dtype)
    x = torch.randn(9, B, I, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        out, (h, c) = rnn(x)
        state, pieces = None, []
        for chunk in (x[:4], x[4:5], x[5:]):
            piece, state = rnn(chunk, state)
            pieces.append(piece)
    assert rel_err(torch.cat(pieces), out) <= ABS[dtype]
    assert rel_err(state[0], h) <= ABS[dtype] and rel_err(state[1], c) <= ABS[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_gradients_match_one_call(backend, dtype):
    I, H, B = 6, 24, 3
    rnn = FastMLSTM(I, H, backend=backend).to(DEVICE, dtype)
    x = torch.randn(7, B, I, device=DEVICE, dtype=dtype, requires_grad=True)
    out, (h, c) = rnn(x)
    whole = torch.autograd.grad(out.float().sum() + c.sum(), [x, *rnn.parameters()])
    first, state = rnn(x[:3])
    second, (h2, c2) = rnn(x[3:], state)
    chunked = torch.autograd.grad(first.float().sum() + second.float().sum() + c2.sum(), [x, *rnn.parameters()])
    for a, b in zip(chunked, whole):
        assert rel_err(a, b) <= 2 * ABS[dtype]  # the weight GEMMs are split in two: rounding only


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_by_step_equals_sequence(backend, dtype):
    I, H, B = 4, 20, 2
    rnn = FastMLSTM(I, H, batch_first=True, backend=backend).to(DEVICE, dtype)
    x = torch.randn(B, 6, I, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        out, (h, c) = rnn(x)
        weights = rnn.effective_weights()
        state = None
        steps = []
        for t in range(x.shape[1]):
            y, state = rnn.step(x[:, t], state, weights=weights)
            steps.append(y)
    assert rel_err(torch.stack(steps, 1), out) <= ABS[dtype]
    assert rel_err(state[0], h) <= ABS[dtype] and rel_err(state[1], c) <= ABS[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_path_equals_training_path(backend):
    """The no-grad launch (nothing saved, c updated in place) computes what the training one does."""
    rnn = FastMLSTM(3, 17, backend=backend).to(DEVICE)
    x = torch.randn(5, 4, 3, device=DEVICE)
    out, (h, c), cells = rnn(x, return_cell_states=True)
    with torch.no_grad():
        out2, (h2, c2) = rnn(x)
        out3, _, cells3 = rnn(x, return_cell_states=True)
    assert torch.equal(out, out2) and torch.equal(h, h2) and torch.equal(c, c2)
    assert torch.equal(out, out3) and torch.equal(cells, cells3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_match_reference_at_the_op_level(backend):
    """The raw backward contract (grad_proj, both weight grads, state grads) equals the reference's."""
    from fastmlstm.ops import autograd, registry

    T, B, H = 5, 3, 18
    proj = torch.randn(T, B, 5 * H, device=DEVICE)
    w_hh = torch.randn(4 * H, H, device=DEVICE) / H ** 0.5
    w_hm = torch.randn(H, H, device=DEVICE) / H ** 0.5
    h0, c0 = torch.randn(B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)
    lengths = torch.tensor([5, 0, 3], device=DEVICE)
    grads = (torch.randn(T, B, H, device=DEVICE), torch.randn(B, H, device=DEVICE), torch.randn(T, B, H, device=DEVICE))
    results = {}
    for name in ("reference", backend):
        fwd = autograd.sequence_forward(proj, w_hh, w_hm, h0, c0, lengths, name, True, True)
        bwd = autograd.sequence_backward(*grads, w_hh, w_hm, h0, c0, lengths, fwd[0], fwd[2], fwd[3], name)
        results[name] = (*fwd, *bwd)
    for a, b in zip(results[backend], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_poisoned_buffers_are_detected():
    """The suite's NaN poisoning is on: an unwritten buffer element cannot pass a comparison."""
    from fastmlstm.ops.interface import new_buffer

    buf = new_buffer((2, 3), torch.float32, DEVICE)
    assert torch.isnan(buf).all()
    with pytest.raises(AssertionError, match="non-finite"):
        rel_err(buf, torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_weight_caches_see_in_place_updates(dtype):
    """The reference caches float32 copies and oneDNN layouts of weights reused across calls (a
    generation loop); an in-place change of a weight must invalidate them."""
    T, B, H = 2, 16, 512  # large enough for the prepacked path
    proj = torch.randn(T, B, 5 * H).to(dtype)
    w_hh = (torch.randn(4 * H, H) / H ** 0.5).to(dtype)
    w_hm = (torch.randn(H, H) / H ** 0.5).to(dtype)
    first, _ = multiplicative_lstm_recurrence(proj, w_hh, w_hm, backend="reference")
    again, _ = multiplicative_lstm_recurrence(proj, w_hh, w_hm, backend="reference")
    assert torch.equal(first, again)
    with torch.no_grad():
        w_hh.mul_(-1.0)
        w_hm.mul_(0.5)
    changed, _ = multiplicative_lstm_recurrence(proj, w_hh, w_hm, backend="reference")
    fresh, _ = multiplicative_lstm_recurrence(proj, w_hh.clone(), w_hm.clone(), backend="reference")
    assert torch.equal(changed, fresh) and not torch.equal(changed, first)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_lengths_and_state_are_read_by_their_strides(backend):
    """A column of a [B, 2] lengths tensor, a transposed (h0, c0) and a transposed gradient of c_n:
    views that a kernel indexing its operands row-major would read at the wrong rows (the Triton
    backend once did, for the lengths and for c0 in the forward that saves nothing)."""
    T, B, H = 6, 4, 8
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(T, B, 5 * H, generator=g).to(DEVICE)
    w_hh = (torch.randn(4 * H, H, generator=g) / H ** 0.5).to(DEVICE)
    w_hm = (torch.randn(H, H, generator=g) / H ** 0.5).to(DEVICE)
    lengths = torch.tensor([[6, 9], [1, 9], [3, 9], [0, 9]], device=DEVICE)[:, 0]
    state_t = [(s * torch.randn(H, B, generator=g)).to(DEVICE) for s in (0.5, 1.0)]
    w_c = torch.randn(H, B, generator=g).to(DEVICE)
    results = {}
    for name in ("reference", backend):
        with torch.no_grad():
            out, (_, c) = multiplicative_lstm_recurrence(proj, w_hh, w_hm, initial_state=(state_t[0].t(), state_t[1].t()),
                                                         lengths=lengths, backend=name)
        leaves = [t.clone().requires_grad_() for t in (proj, *state_t)]
        out_g, (_, c_g) = multiplicative_lstm_recurrence(leaves[0], w_hh, w_hm, lengths=lengths, backend=name,
                                                         initial_state=(leaves[1].t(), leaves[2].t()))
        grads = torch.autograd.grad(out_g.sum() + (c_g.t() * w_c).sum(), leaves)
        results[name] = (out, c, out_g, c_g, *grads)
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
