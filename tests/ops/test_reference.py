"""The reference backend (fastmlstm/ops/reference/) is the specification: in float64 it must equal the
independent float64 implementation of the tests (mlstm_f64.py, autograd through the equations) to
float64 rounding, outputs and every gradient; torch.autograd.gradcheck passes through the module
in float64; and it stays a plain loop a reader can hold against the paper's equations."""

from pathlib import Path

import pytest
import torch
from mlstm_f64 import recurrence_f64

import fastmlstm
from fastmlstm import FastMLSTM
from fastmlstm.ops import reference

SOURCE = Path(reference.__file__).resolve().parent


@pytest.mark.parametrize("lengths", [None, (5, 0, 3, 5)], ids=["full", "ragged"])
def test_float64_reference_equals_the_float64_truth(lengths):
    g = torch.Generator().manual_seed(0)
    T, B, H = 5, 4, 7
    proj = torch.randn(T, B, 5 * H, generator=g, dtype=torch.float64)
    w_hh = torch.randn(4 * H, H, generator=g, dtype=torch.float64) / H ** 0.5
    w_hm = torch.randn(H, H, generator=g, dtype=torch.float64) / H ** 0.5
    h0, c0 = torch.randn(2, B, H, generator=g, dtype=torch.float64)
    grads = [torch.randn(T, B, H, generator=g, dtype=torch.float64), torch.randn(B, H, generator=g, dtype=torch.float64),
             torch.randn(T, B, H, generator=g, dtype=torch.float64)]
    lens = None if lengths is None else torch.tensor(lengths)
    out, c_n, cells, act = reference.forward(proj, w_hh, w_hm, h0, c0, lens, True, True)
    got = reference.backward(*grads, w_hh, w_hm, h0, c0, lens, out, cells, act)

    leaves = [t.clone().requires_grad_() for t in (proj, w_hh, w_hm, h0, c0)]
    t_out, _, t_c, t_cells = recurrence_f64(*leaves, lengths)
    loss = (t_out * grads[0]).sum() + (t_c * grads[1]).sum() + (t_cells * grads[2]).sum()
    truth = torch.autograd.grad(loss, leaves)
    for a, b in [(out, t_out), (c_n, t_c), (cells, t_cells), *zip(got, truth)]:
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_module_in_float64():
    # Two layers, the second reverse: every path of the module (stacking, reversal within lengths,
    # weight norm, state in and out) in float64; small, since gradcheck perturbs every element.
    torch.manual_seed(0)
    rnn = FastMLSTM(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(rnn.parameters())

    def run(x, h0, c0, *values):
        out, (h, c) = torch.func.functional_call(rnn, dict(zip((n for n, _ in rnn.named_parameters()), values)),
                                                 (x, (h0, c0)), {"lengths": [3, 2]})
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params), eps=1e-6, atol=1e-7)


def test_float64_module_runs_on_the_reference_and_keeps_float64_state():
    rnn = FastMLSTM(3, 5, dtype=torch.float64)
    out, (h, c) = rnn(torch.randn(6, 2, 3, dtype=torch.float64))
    assert out.dtype == h.dtype == c.dtype == torch.float64
    with pytest.raises(fastmlstm.BackendUnavailableError, match="float64"):
        FastMLSTM(3, 5, dtype=torch.float64, backend="cpu")(torch.randn(6, 2, 3, dtype=torch.float64))


def test_the_specification_stays_short_and_plain():
    """The reference reads against the equations: no weight caches, no prepacked layouts, no
    vendor-specific calls; short enough to hold in the head."""
    source = (SOURCE / "recurrence.py").read_text()
    assert len(source.splitlines()) <= 150
    for marker in ("mkldnn", "weakref", "lru_cache", "_version", "torch.ops"):
        assert marker not in source, marker
