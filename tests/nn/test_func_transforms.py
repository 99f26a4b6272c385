"""``torch.func`` transforms (grad, vmap, jacrev, jvp) over the module and the functional form.

The recurrence is a ``torch.library`` custom op whose autograd formula comes from
``register_autograd``, which those transforms refuse (torch 2.13: "must override the setup_context
staticmethod"); under a transform the door runs the reference backend's plain loop instead
(``fastmlstm.ops._transformed``). Each transform is held to what ordinary autograd, or a loop of
ordinary calls, gives on the backend the module names."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from torch.func import functional_call, grad, jacrev, jvp, vmap

from fastmlstm import FastMLSTM, multiplicative_lstm

T, B, I, H = 5, 3, 4, 6
ATOL = 2e-6  # float32 sums in other orders (the kernels' backward against autograd through the loop)


def _module(backend, **kwargs):
    torch.manual_seed(0)
    rnn = FastMLSTM(I, H, backend=backend, **kwargs).to(DEVICE)
    return rnn, {k: v.detach().clone() for k, v in rnn.named_parameters()}


def _loss(rnn):
    def loss(params, x):
        output, (h_n, c_n) = functional_call(rnn, params, (x,))
        return output.square().sum() + (h_n * c_n).sum()

    return loss


@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True}], ids=["one-layer", "2x-bidir"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_matches_ordinary_autograd(backend, kwargs):
    rnn, params = _module(backend, **kwargs)
    x = torch.randn(T, B, I, device=DEVICE)
    got = grad(_loss(rnn))(params, x)  # a RuntimeError from the custom op before
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    _loss(rnn)(leaves, x).backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(got[name], leaf.grad, rtol=1e-5, atol=ATOL, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_match_one_backward_per_sample(backend):
    rnn, params = _module(backend)
    x = torch.randn(T, B, I, device=DEVICE)
    per_sample = vmap(grad(_loss(rnn)), in_dims=(None, 1))(params, x.unsqueeze(2))  # each sample a batch of 1
    for b in range(B):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        _loss(rnn)(leaves, x[:, b : b + 1]).backward()
        for name, leaf in leaves.items():
            torch.testing.assert_close(per_sample[name][b], leaf.grad, rtol=1e-5, atol=ATOL, msg=f"{name}, {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_an_extra_dimension_is_a_loop_of_calls(backend):
    rnn, _ = _module(backend)
    xs = torch.randn(4, T, B, I, device=DEVICE)
    h0 = torch.randn(4, 1, B, H, device=DEVICE), torch.randn(4, 1, B, H, device=DEVICE)
    output, (h_n, c_n) = vmap(lambda x, h, c: rnn(x, (h, c)))(xs, *h0)
    with torch.no_grad():
        for k in range(4):
            want, (want_h, want_c) = rnn(xs[k], (h0[0][k], h0[1][k]))
            for a, b in ((output[k], want), (h_n[k], want_h), (c_n[k], want_c)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobians_forward_and_reverse_match_autograd(backend):
    weights = [0.4 * torch.randn(s, device=DEVICE) for s in [(4 * H, I), (4 * H, H), (H, I), (H, H), (4 * H,)]]
    lengths = torch.tensor([T, 2, 0])  # padding and a row that never starts

    def last_state(x):
        return multiplicative_lstm(x, *weights, lengths=lengths, backend=backend)[1][1]

    x = torch.randn(T, B, I, device=DEVICE)
    want = torch.autograd.functional.jacobian(last_state, x)  # through the custom op's own backward
    torch.testing.assert_close(jacrev(last_state)(x), want, rtol=1e-5, atol=ATOL)
    tangent = torch.randn_like(x)
    _, forward_mode = jvp(last_state, (x,), (tangent,))
    torch.testing.assert_close(forward_mode, (want * tangent).sum(dim=(2, 3, 4)), rtol=1e-5, atol=1e-5)
