"""fastmlstm.nn.precision.linear: 16-bit products on CPUs without native 16-bit GEMMs run as float32
GEMMs of the 16-bit values, rounded once: a native 16-bit GEMM's numbers at float32 speed."""

import pytest
import torch
import torch.nn.functional as F

import fastmlstm
from fastmlstm.nn import precision


def _operands(dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((37, 24), (19, 24), (19,)))
    return [t.to(dtype).requires_grad_(requires_grad) for t in (x, w, b)]


@pytest.fixture
def no_native(monkeypatch):
    """Behave as on a CPU without native 16-bit GEMMs (this one may have them)."""
    monkeypatch.setattr(precision, "native_16bit_gemm", lambda dtype: False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16bit_product_is_the_float32_product_rounded_once(no_native, dtype):
    x, w, b = _operands(dtype)
    got = precision.linear(x, w, b)
    assert got.dtype == dtype
    assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).to(dtype))
    # and within one 16-bit rounding of the exact product
    exact = F.linear(x.double(), w.double(), b.double())
    assert ((got.double() - exact).abs() <= exact.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_under_autocast_it_follows_autocasts_dtype_and_gradients_flow(no_native):
    x, w, b = _operands(torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = precision.linear(x, w, b)
        expected = F.linear(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float()).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    got.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    torch.testing.assert_close(x.grad, w.detach().bfloat16().float().sum(0).expand_as(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_under_autocast_float64_stays_float64_as_with_f_linear(no_native, dtype):
    # Autocast never casts float64 operands; this once rounded them to the autocast dtype.
    x, w, b = _operands(torch.float64)
    with torch.autocast("cpu", dtype=dtype):
        got, expected = precision.linear(x, w, b), F.linear(x, w, b)
    assert got.dtype == expected.dtype == torch.float64 and torch.equal(got, expected)


def test_float32_and_native_cpus_are_plain_linear(monkeypatch):
    x, w, b = _operands(torch.float32)
    assert torch.equal(precision.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setattr(precision, "native_16bit_gemm", lambda dtype: True)
    xb, wb, bb = (t.bfloat16() for t in (x, w, b))
    assert torch.equal(precision.linear(xb, wb, bb), F.linear(xb, wb, bb))


def test_byte_lm_logits_and_generation_take_it(no_native, monkeypatch):
    calls = []
    real = precision.linear

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fastmlstm.models.lm, "linear", counting)
    lm = fastmlstm.ByteLM(hidden_size=16, embed_size=8, dtype=torch.bfloat16)
    logits = lm(torch.randint(0, 256, (2, 5), dtype=torch.uint8))[0]
    assert logits.dtype == torch.bfloat16 and len(calls) == 2  # input table, readout
    lm.generate("ab", 3, seed=0)
    assert len(calls) > 2
