"""FastMLSTM as a true drop-in for nn.LSTM: the constructor's words in nn.LSTM's order, stacked and
bidirectional layers against an independent float64 stack, dropout between layers, empty batches."""

import functools
import inspect

import pytest
import torch
from conftest import BACKENDS, DEVICE
from mlstm_f64 import mlstm_f64, weight_norm_f64
from tolerances import ABS, FACTOR, REFERENCE, rel_err
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import fastmlstm
from fastmlstm import FastMLSTM

MATRICES = ("weight_ih", "weight_hh", "weight_im", "weight_hm")


def test_constructor_takes_nn_lstms_words_in_nn_lstms_order():
    ours = list(inspect.signature(FastMLSTM).parameters)
    assert ours[:10] == ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                         "bidirectional", "proj_size", "device", "dtype"]
    params = inspect.signature(FastMLSTM).parameters
    assert params["weight_norm"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    # The positional calls that meant something else before now mean what nn.LSTM means.
    rnn = FastMLSTM(8, 16, 2, True, True)
    assert (rnn.num_layers, rnn.bias, rnn.batch_first) == (2, True, True)
    rnn = FastMLSTM(8, 16, 1, False)
    assert rnn.bias is False and rnn.bias_ih is None and not rnn.batch_first
    with pytest.raises(fastmlstm.InputError, match="num_layers must be an integer >= 1, got 0"):
        FastMLSTM(8, 16, 0)


def test_nn_lstm_options_that_do_not_apply_are_refused_clearly():
    with pytest.raises(fastmlstm.InputError, match="proj_size=4: FastMLSTM has no output projection"):
        FastMLSTM(8, 16, proj_size=4)
    with pytest.raises(fastmlstm.InputError, match=r"dropout must be a finite number in \[0, 1\]"):
        FastMLSTM(8, 16, 2, dropout=1.5)
    with pytest.raises(fastmlstm.InputTypeError, match="bidirectional must be True or False"):
        FastMLSTM(8, 16, bidirectional="yes")
    with pytest.warns(UserWarning, match="num_layers=1"):
        FastMLSTM(8, 16, dropout=0.2)
    rnn = FastMLSTM(8, 16, 2)
    assert rnn.flatten_parameters() is None  # nn.LSTM code calls it; nothing to do


def test_parameter_names_follow_nn_lstm_with_layer_0_unsuffixed():
    rnn = FastMLSTM(3, 5, 2, bidirectional=True)
    names = set(dict(rnn.named_parameters()))
    for suffix in ("", "_l0_reverse", "_l1", "_l1_reverse"):
        assert {f"{m}{suffix}_{s}" for m in MATRICES for s in "vg"} | {f"bias_ih{suffix}"} <= names
    assert len(names) == 4 * 9
    assert rnn.weight_ih_l1_v.shape == (20, 10)  # layer 1 reads both directions of layer 0
    assert rnn.weight_hh_l1_reverse.shape == (20, 5)  # the effective weight, by nn.LSTM's name
    # A one-layer module keeps the names every saved model and the released layout use.
    assert set(dict(FastMLSTM(3, 5).named_parameters())) == {f"{m}_{s}" for m in MATRICES for s in "vg"} | {"bias_ih"}


def test_hidden_state_shapes_match_nn_lstm():
    for layers, bidirectional in ((1, False), (2, False), (3, True)):
        ours = FastMLSTM(4, 6, layers, bidirectional=bidirectional).to(DEVICE)
        theirs = nn.LSTM(4, 6, layers, bidirectional=bidirectional).to(DEVICE)
        for x in (torch.randn(5, 3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)):
            (o1, (h1, c1)), (o2, (h2, c2)) = ours(x), theirs(x)
            assert o1.shape == o2.shape and h1.shape == h2.shape == c1.shape == c2.shape
            (o1, (h1, _)), (o2, (h2, _)) = ours(x, (h1, c1)), theirs(x, (h2, c2))
            assert o1.shape == o2.shape and h1.shape == h2.shape


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients():
    ours = FastMLSTM(4, 6, 2, bidirectional=True).to(DEVICE)
    theirs = nn.LSTM(4, 6, 2, bidirectional=True).to(DEVICE)
    x = torch.randn(5, 0, 4, device=DEVICE, requires_grad=True)
    (o1, (h1, c1)), (o2, (h2, c2)) = ours(x), theirs(x)
    assert o1.shape == o2.shape == (5, 0, 12) and h1.shape == h2.shape == (4, 0, 6)
    (o1.sum() + h1.sum() + c1.sum()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


# ------------------------------------------------------------------------------------------------
# Parity with an independent float64 stack


def _stack_f64(params, x, h0, c0, lengths, layers, bidirectional):
    """The stack by the book: each layer's forward direction with mlstm_f64; the reverse direction
    by slicing every row's valid part backwards, one row at a time (no shared index trick)."""
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    lengths = [T] * B if lengths is None else list(lengths)
    inp, finals_h, finals_c = x, [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            suffix = "" if layer == 0 and d == 0 else f"_l{layer}" + ("_reverse" if d else "")
            w = [weight_norm_f64(params[f"{m}{suffix}_v"], params[f"{m}{suffix}_g"]) for m in MATRICES]
            b, k = params[f"bias_ih{suffix}"], layer * dirs + d
            if d == 0:
                out, h, c, _ = mlstm_f64(inp, *w, b, h0[k], c0[k], lengths)
            else:
                rows, hs, cs = [], [], []
                for r in range(B):
                    n = lengths[r]
                    seq = inp[:n, r:r + 1].flip(0)
                    o, h_r, c_r, _ = mlstm_f64(seq, *w, b, h0[k][r:r + 1], c0[k][r:r + 1])
                    # past its length a row repeats the direction's final h, as documented
                    pad = h_r.expand(T - n, 1, -1)
                    rows.append(torch.cat([o.flip(0), pad]))
                    hs.append(h_r)
                    cs.append(c_r)
                out, h, c = torch.cat(rows, 1), torch.cat(hs), torch.cat(cs)
            outs.append(out)
            finals_h.append(h)
            finals_c.append(c)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(finals_h), torch.stack(finals_c)


CONFIGS = [(2, False, None), (2, True, None), (3, True, (5, 0, 2)), (1, True, (1, 5, 3))]


@functools.lru_cache(maxsize=None)
def _case(layers, bidirectional, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, B, I, H = 5, 3, 4, 7
    rnn = FastMLSTM(I, H, layers, bidirectional=bidirectional)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.endswith("_g"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    L = layers * (2 if bidirectional else 1)
    x, h0, c0 = torch.randn(T, B, I, generator=g), torch.randn(L, B, H, generator=g), torch.randn(L, B, H, generator=g)
    w_out, w_h, w_c = torch.randn(T, B, (L // layers) * H, generator=g), torch.randn(L, B, H, generator=g), \
        torch.randn(L, B, H, generator=g)
    return {k: v.clone() for k, v in rnn.state_dict().items()}, x, h0, c0, (w_out, w_h, w_c)


def _loss(out, h, c, weights):
    w_out, w_h, w_c = weights
    return (out.double() * w_out).sum() + (h.double() * w_h).sum() + (c.double() * w_c).sum()


def _run(backend, dtype, layers, bidirectional, lengths):
    state, x, h0, c0, weights = _case(layers, bidirectional)
    rnn = FastMLSTM(x.shape[2], h0.shape[2], layers, bidirectional=bidirectional, backend=backend).to(DEVICE, dtype)
    rnn.load_state_dict(state)
    x = x.to(DEVICE, dtype).clone().requires_grad_()
    h0, c0 = h0.to(DEVICE).clone().requires_grad_(), c0.to(DEVICE).clone().requires_grad_()
    out, (h, c) = rnn(x, (h0, c0), lengths=None if lengths is None else list(lengths))
    _loss(out, h, c, [w.to(DEVICE) for w in weights]).backward()
    result = {"output": out, "h_n": h, "c_n": c, "grad_input": x.grad, "grad_h0": h0.grad, "grad_c0": c0.grad}
    result.update({f"grad_{n}": p.grad for n, p in rnn.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in result.items()}


def _truth(dtype, layers, bidirectional, lengths):
    state, x, h0, c0, weights = _case(layers, bidirectional)
    params = {k: v.to(dtype).double().requires_grad_() for k, v in state.items()}
    x = x.to(dtype).double().requires_grad_()
    h0, c0 = h0.double().requires_grad_(), c0.double().requires_grad_()
    out, h, c = _stack_f64(params, x, h0, c0, lengths, layers, bidirectional)
    _loss(out, h, c, weights).backward()
    result = {"output": out, "h_n": h, "c_n": c, "grad_input": x.grad, "grad_h0": h0.grad, "grad_c0": c0.grad}
    result.update({f"grad_{n}": p.grad for n, p in params.items()})
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layers, bidirectional, lengths", CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stacks_match_an_independent_float64_stack(backend, dtype, layers, bidirectional, lengths):
    truth = _truth(dtype, layers, bidirectional, lengths)
    reference = _run("reference", dtype, layers, bidirectional, lengths)
    actual = reference if backend == "reference" else _run(backend, dtype, layers, bidirectional, lengths)
    assert actual.keys() == truth.keys()
    for name in truth:
        ref_err = rel_err(reference[name], truth[name])
        assert ref_err <= REFERENCE[dtype], (name, ref_err)
        assert rel_err(actual[name], truth[name]) <= FACTOR * ref_err + ABS[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_packed_sequences_equal_each_sequence_alone(backend):
    rnn = FastMLSTM(3, 6, 2, bidirectional=True, backend=backend).to(DEVICE)
    seqs = [torch.randn(n, 3, device=DEVICE) for n in (2, 5, 1, 4)]
    out, (h, c) = rnn(pack_sequence(seqs, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    assert lengths.tolist() == [2, 5, 1, 4]
    for b, seq in enumerate(seqs):
        alone, (h1, c1) = rnn(seq.unsqueeze(1))
        torch.testing.assert_close(padded[: len(seq), b], alone[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[:, b], h1[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[:, b], c1[:, 0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Dropout between layers, as nn.LSTM applies it


def test_dropout_falls_between_layers_in_training_mode_only():
    torch.manual_seed(0)
    stack = FastMLSTM(4, 8, 2, dropout=0.5).to(DEVICE)
    first, second = FastMLSTM(4, 8).to(DEVICE), FastMLSTM(8, 8).to(DEVICE)
    state = stack.state_dict()
    first.load_state_dict({k: v for k, v in state.items() if "_l1" not in k})
    second.load_state_dict({k.replace("_l1", ""): v for k, v in state.items() if "_l1" in k})
    x = torch.randn(6, 3, 4, device=DEVICE)
    torch.manual_seed(1)
    out, (h, c) = stack(x)
    torch.manual_seed(1)
    by_hand = second(nn.functional.dropout(first(x)[0], 0.5, training=True))[0]
    torch.testing.assert_close(out, by_hand)  # the last layer's output is not dropped
    stack.eval()
    torch.testing.assert_close(stack(x)[0], second(first(x)[0])[0])


def test_step_through_a_stack_equals_the_sequence():
    rnn = FastMLSTM(4, 8, 2, bidirectional=False).to(DEVICE).eval()
    x = torch.randn(5, 3, 4, device=DEVICE)
    with torch.no_grad():
        out, (h, c) = rnn(x)
        weights, state, steps = rnn.effective_weights(), None, []
        assert isinstance(weights, tuple) and len(weights) == 2
        for t in range(5):
            y, state = rnn.step(x[t], state, weights=weights)
            steps.append(y)
    torch.testing.assert_close(torch.stack(steps), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1], c, rtol=1e-5, atol=1e-6)
    with pytest.raises(fastmlstm.InputTypeError, match="2 MLSTMWeights"):
        rnn(x, weights=weights[0])
