"""torch.compile and torch.library: the recurrence is an opaque custom op with fake impls."""

import pytest
import torch
from conftest import BACKENDS, DEVICE

from fastmlstm import FastMLSTM
from fastmlstm.ops import autograd, registry


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_passes(backend):
    T, B, H = 3, 2, 5
    args = (
        torch.randn(T, B, 5 * H, device=DEVICE, requires_grad=True),
        torch.randn(4 * H, H, device=DEVICE, requires_grad=True) / H,
        torch.randn(H, H, device=DEVICE, requires_grad=True) / H,
        torch.randn(B, H, device=DEVICE, requires_grad=True),
        torch.randn(B, H, device=DEVICE, requires_grad=True),
        torch.tensor([3, 1], device=DEVICE),
        backend, True, True,
    )
    torch.library.opcheck(autograd.sequence_forward, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_module_works_inside_torch_compile(compiler):
    rnn = FastMLSTM(4, 8, backend="reference").to(DEVICE)

    def loss_fn(x, h0, c0):
        out, (h, c) = rnn(x, (h0, c0))
        return out.pow(2).sum() + h.sum() + c.sum()

    compiled = torch.compile(loss_fn, backend=compiler, fullgraph=True)
    for T in (5, 7):  # a second shape: recompiles or goes dynamic, but stays correct
        x = torch.randn(T, 3, 4, device=DEVICE)
        state = [torch.randn(1, 3, 8, device=DEVICE) for _ in range(2)]
        eager_loss = loss_fn(x, *state)
        eager_grads = torch.autograd.grad(eager_loss, list(rnn.parameters()))
        loss = compiled(x, *state)
        grads = torch.autograd.grad(loss, list(rnn.parameters()))
        torch.testing.assert_close(loss, eager_loss)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b)
