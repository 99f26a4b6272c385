"""Byte generation's recurrence (:func:`fastmlstm.models.generation.byte_advance`): one byte from a
state goes through the backend's prepared step (:func:`fastmlstm.ops.prepare_sequence_step`, the
CPU's), which must give what the functional recurrence gives, bit for bit, in every dtype, steered or
not; and the door refuses what it cannot prepare."""

import numpy as np
import pytest
import torch

import fastmlstm
from fastmlstm import ByteLM, ops
from fastmlstm.models import generation

CPU = "cpu" in fastmlstm.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not CPU, reason="the CPU backend's extension does not build here")
H = 24


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(0.3 * torch.randn(s, generator=g)).to(dtype) for s in ((4 * H, H), (H, H))]


def _recording(monkeypatch, prepared: bool) -> list:
    """Every advance's (last output, h, c), with the prepared step on or off."""
    seen, real = [], generation.byte_advance
    if not prepared:
        monkeypatch.setattr(ops, "prepare_sequence_step", lambda *args: None)

    def spy(*args, **kwargs):
        advance = real(*args, **kwargs)

        def recorded(byte_rows, state):
            last, (h, c) = advance(byte_rows, state)
            seen.append((last.clone(), h.clone(), c.clone()))
            return last, (h, c)

        return recorded

    monkeypatch.setattr(fastmlstm.models.lm, "byte_advance", spy)
    return seen


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("held", [None, {3: 0.5, 20: -1.0}])
def test_generation_through_the_prepared_step_is_the_functional_recurrence_bit_for_bit(monkeypatch, dtype, held):
    torch.manual_seed(0)
    model = ByteLM(hidden_size=H, embed_size=8, backend="cpu").to(dtype)
    runs, used = {}, []
    real_prepare = ops.prepare_sequence_step
    monkeypatch.setattr(ops, "prepare_sequence_step", lambda *a: used.append(real_prepare(*a)) or used[-1])
    for prepared in (True, False):
        with monkeypatch.context() as m:
            seen = _recording(m, prepared)
            samples = model.generate("ab", 9, seed=5, num_samples=3, fixed_units=held)
            runs[prepared] = samples, seen
    assert used and used[0] is not None  # the CPU backend prepared the step: the first run took it
    (samples_a, seen_a), (samples_b, seen_b) = runs[True], runs[False]
    assert samples_a == samples_b and len(seen_a) == len(seen_b) == (1 if held is None else 2) + 8
    for a, b in zip(seen_a, seen_b):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_the_prepared_sequence_step_is_the_one_step_sequence(dtype, B):
    w_hh, w_hm = _weights(dtype)
    step = ops.prepare_sequence_step("cpu", w_hh, w_hm, B)
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(1, B, 5 * H, generator=g).to(dtype)
    h0, c0 = 0.5 * torch.randn(B, H, generator=g), 0.5 * torch.randn(B, H, generator=g)
    out, c_n = step(proj, h0, c0)
    want, want_c, _ = ops.sequence(proj, w_hh, w_hm, h0, c0, None, "cpu", False)
    assert out.shape == (1, B, H) and out.dtype == dtype and torch.equal(out, want) and torch.equal(c_n, want_c)
    with pytest.raises(RuntimeError, match="h0"):  # the operator names what does not fit
        step(proj, h0[:, :-1].contiguous(), c0)


def test_the_door_prepares_nothing_it_cannot_run_without_autograd():
    w_hh, w_hm = _weights(torch.float32)
    assert ops.prepare_sequence_step("reference", w_hh, w_hm, 2) is None  # no prepared steps there
    if CPU:
        assert ops.prepare_sequence_step("cpu", w_hh, w_hm, 0) is None
        with torch.enable_grad():
            assert ops.prepare_sequence_step("cpu", w_hh.requires_grad_(), w_hm, 2) is None


def test_sampling_draws_from_the_softmax_at_its_temperature_and_within_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * 252]).expand(40000, -1)
    for temperature, top_k in ((1.0, None), (0.5, None), (1.0, 3)):
        drawn = generation.sample_bytes(logits, temperature, top_k, g)
        want = torch.softmax(logits[0, :4] / temperature, dim=0)
        if top_k is not None:
            want = torch.softmax(logits[0, :3] / temperature, dim=0)
            assert drawn.max() < top_k  # never outside the k most likely
        counts = torch.bincount(drawn, minlength=256).float() / drawn.numel()
        # 40000 draws: a frequency's standard deviation is at most 0.0025; 0.012 is about 5 of them
        torch.testing.assert_close(counts[: want.numel()], want, atol=0.012, rtol=0)
    assert torch.equal(generation.sample_bytes(logits[:2], 0, None, g), torch.tensor([0, 0]))


def test_sampling_is_reproducible_and_refuses_non_finite_logits():
    logits = torch.randn(5, 256)
    a = generation.sample_bytes(logits, 0.8, 20, torch.Generator().manual_seed(3))
    b = generation.sample_bytes(logits, 0.8, 20, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5,) and a.dtype == torch.long
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[2, 7] = bad
        for temperature in (1.0, 0):  # (the most likely byte too: argmax would pick the NaN or inf)
            with pytest.raises(FloatingPointError, match="not finite"):
                generation.sample_bytes(broken, temperature, None, torch.Generator().manual_seed(0))


def _released_step(arrays, held: dict, hold_before_h: bool = False):
    """One step of the released encoder's equations (float64 NumPy, from the 15 released arrays),
    then each held cell unit overwritten with its value. fastmlstm's convention: the overwrite comes
    after the step, so that step's h is o * tanh(c) of the unheld c, and the next step reads the held
    c (``hold_before_h`` is the other reading, kept to show this test tells them apart)."""
    p = [a.astype(np.float64) for a in arrays]

    def l2n(w, g):  # TensorFlow's l2_normalize(w, dim=0) * g
        return w / np.sqrt(np.maximum((w * w).sum(axis=0, keepdims=True), 1e-12)) * g

    wx, wh = l2n(p[1], p[9]), l2n(np.concatenate(p[2:6], axis=1), p[10])
    wmx, wmh = l2n(p[6], p[11]), l2n(p[7], p[12])
    sig = lambda z: 1 / (1 + np.exp(-z))

    def step(byte, h, c):
        x = p[0][byte]
        z = x @ wx + ((x @ wmx) * (h @ wmh)) @ wh + p[8]
        i, f, o, u = np.split(z, 4, axis=1)
        c = sig(f) * c + sig(i) * np.tanh(u)
        h = sig(o) * np.tanh(c)
        c = c.copy()
        for unit, value in held.items():
            c[:, unit] = value
        return (sig(o) * np.tanh(c) if hold_before_h else h), c

    return step


def test_held_units_are_overwritten_in_c_after_each_step_as_documented(monkeypatch):
    """Steered generation against the released equations: every prefix and sampled byte, the
    held cells are set after the step (h of that step from the unheld c)."""
    from fastmlstm.models.openai_weights import released_arrays

    torch.manual_seed(2)
    model = ByteLM(hidden_size=H, embed_size=8, backend="reference")
    held = {3: 1.5, 20: -1.0}
    seen = _recording(monkeypatch, prepared=True)
    calls = []
    recording = fastmlstm.models.lm.byte_advance

    def spy(*args, **kwargs):
        advance = recording(*args, **kwargs)
        return lambda byte_rows, state: calls.append(byte_rows.clone()) or advance(byte_rows, state)

    monkeypatch.setattr(fastmlstm.models.lm, "byte_advance", spy)
    model.generate("ab", 12, seed=4, num_samples=2, fixed_units=held)
    arrays = released_arrays(model)
    for hold_before_h, should_match in ((False, True), (True, False)):
        step = _released_step(arrays, held, hold_before_h)
        h, c = np.zeros((2, H)), np.zeros((2, H))
        worst = 0.0
        for byte_rows, (_, got_h, got_c) in zip(calls, seen):
            h, c = step(byte_rows[0].numpy(), h, c)
            worst = max(worst, np.abs(got_h.numpy() - h).max(), np.abs(got_c.numpy() - c).max())
            h, c = got_h.double().numpy(), got_c.double().numpy()  # stay on fastmlstm's path
        assert len(calls) == 2 + 11
        assert (worst < 1e-5) == should_match, (hold_before_h, worst)
