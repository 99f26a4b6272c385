"""What the README says about exporting and about non-finite inputs, checked."""

import warnings

import pytest
import torch
from conftest import DEVICE

from fastmlstm import FastMLSTM


def test_torch_export_runs_the_same_function(monkeypatch):
    """The exported program computes what the module computes. A traced program normalizes the
    weights with the graph-friendly formula that a CPU eager call replaces with PyTorch's fused
    kernel (fastmlstm.nn.modules.weight_norm): bit for bit the eager call with that formula, and
    within rounding the default eager call."""
    from fastmlstm.nn import modules

    rnn = FastMLSTM(4, 8, 2, bidirectional=True).to(DEVICE).eval()
    x = torch.randn(5, 3, 4, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(rnn, (x,))
    out, (h, c) = program.module()(x)
    expected, (h2, c2) = rnn(x)
    for a, b in ((out, expected), (h, h2), (c, c2)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(modules, "_fused_weight_norm_applies", lambda *args: False)
    expected, (h2, c2) = rnn(x)
    assert torch.equal(out, expected) and torch.equal(h, h2) and torch.equal(c, c2)


def test_torchscript_is_not_supported():
    """The README says so: torch.export and torch.compile are the supported ways."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception):  # noqa: B017 (TorchScript's own error types vary by version)
            torch.jit.script(FastMLSTM(4, 8))


def test_an_infinite_input_turns_its_row_nan_from_that_step_on():
    rnn = FastMLSTM(4, 8).to(DEVICE)
    x = torch.randn(6, 3, 4, device=DEVICE)
    x[2, 1, 0] = float("inf")
    with torch.no_grad():
        out, (h, c) = rnn(x)
    assert torch.isfinite(out[:, [0, 2]]).all() and torch.isfinite(out[:2, 1]).all()
    assert torch.isnan(out[2:, 1]).all() and torch.isnan(c[0, 1]).all()
