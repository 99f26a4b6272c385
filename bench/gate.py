"""The correctness gate: every multiplicative-LSTM implementation must compute the same function
before anything of it is timed (``run.py`` refuses one that fails)."""

from __future__ import annotations

import math

import torch

from fastmlstm import self_check
from fastmlstm.diagnostics import parity_tolerance
from impls import EagerImpl, FastImpl, Impl, flat
from mlstm_eager import mlstm_sequence, mlstm_step

__all__ = ["check", "tolerance"]


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Largest allowed ||actual - truth|| / ||truth|| against float64 (METHOD.md's measure), worst
    over the output, final (h, c) and every gradient: the library's parity bound
    (:func:`fastmlstm.diagnostics.parity_tolerance`), with TF32 where a GPU's float32 matmuls use it.
    The same bound judges ``fastmlstm.self_check`` (max difference over max magnitude, against the
    reference backend in the same dtype). Measured on the gate's problem (CPU): bfloat16 1.8e-2
    (fastmlstm reference) and 3.0e-2 (the eager loop, whose cell state is bfloat16 too); float16
    1.7e-3 and 2.6e-3; float32 under 1e-6.
    """
    return parity_tolerance(dtype, tf32=device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


def _rel_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    if actual.shape != truth.shape or not torch.isfinite(actual).all():
        return math.inf
    return ((actual - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def check(impl: Impl, dtype: torch.dtype, device: torch.device, ctx: dict) -> dict:
    """The gate: outputs, final states and the gradients of the input, the initial state and every
    weight on a small problem against the float64 loop, within ``tolerance``; for fastmlstm also
    ``fastmlstm.self_check`` (weight norm and ragged lengths, against the reference backend)."""
    T, B, I, H = 7, 3, 5, 20
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    bound = 1 / math.sqrt(H)
    weights = [rand(4 * H, I, scale=bound * 2), rand(4 * H, H, scale=bound * 2), rand(H, I, scale=bound * 2),
               rand(H, H, scale=bound * 2), rand(4 * H, scale=bound)]
    x, h0, c0 = rand(T, B, I), rand(B, H, scale=0.5), rand(B, H, scale=0.5)
    g_out, g_h, g_c = rand(T, B, H), rand(B, H), rand(B, H)
    # The truth sees the same dtype-rounded inputs, so only the arithmetic is judged.
    inputs = [t.to(dtype).double() for t in (x, h0, c0, *weights)]
    x, h0, c0 = inputs[:3]
    weights = inputs[3:]

    def run(fn, dt, dev):
        leaves = [t.to(dev, dt).requires_grad_() for t in inputs]
        out, h, c = fn(leaves[0], leaves[1], leaves[2], leaves[3:])
        loss = ((out.double() * g_out.to(dev)).sum() + (h.double() * g_h.to(dev)).sum()
                + (c.double() * g_c.to(dev)).sum())
        grads = torch.autograd.grad(loss, leaves)
        return [out, h, c, *grads]

    names = ["output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0", "grad_weight_ih", "grad_weight_hh",
             "grad_weight_im", "grad_weight_hm", "grad_bias"]
    truth = run(lambda x, h0, c0, w: flat(mlstm_sequence(x, h0, c0, *w)), torch.float64, torch.device("cpu"))
    result = {"impl": impl.name, "dtype": str(dtype).removeprefix("torch."), "tolerance": tolerance(dtype, device),
              "shape": {"T": T, "B": B, "I": I, "H": H}}
    try:
        actual = run(impl.gate_runner(ctx), dtype, device)
        errors = {n: _rel_err(a, t) for n, a, t in zip(names, actual, truth)}
        if isinstance(impl, EagerImpl) and impl.compile == "step":
            step = torch.compile(mlstm_step, fullgraph=True, backend=ctx["compile_backend"], dynamic=False)
            w = [t.to(device, dtype) for t in weights]
            with torch.no_grad():
                h1, c1 = step(x[0].to(device, dtype), h0.to(device, dtype), c0.to(device, dtype), *w)
                th, tc = mlstm_step(x[0], h0, c0, *weights)
            errors["step_h"], errors["step_c"] = _rel_err(h1, th), _rel_err(c1, tc)
        if isinstance(impl, FastImpl):
            errors["self_check_vs_reference"] = self_check(device, impl.backend, dtype)
    except Exception as exc:  # a crash fails the gate like a wrong number does
        result.update(passed=False, error=f"{type(exc).__name__}: {exc}")
        return result
    worst = max(errors, key=errors.get)
    result.update(passed=errors[worst] <= result["tolerance"], max_rel_err=errors[worst], worst=worst,
                  errors={k: float(f"{v:.3g}") for k, v in errors.items()})
    return result
