"""ByteLM.generate against an independent float64 byte model written here from MODEL.md's equations
(plain torch ops, reading only the model's stored parameters): the next-byte distribution at every
step, on every backend that runs here and in float32, bfloat16 and float16, steered or not; the
bytes a seed draws; the sampler against ``torch.multinomial`` and a chi-square test; and the
arguments and model states generation must refuse or survive."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import fastmlstm
import fastmlstm.probe
from fastmlstm import ByteLM
from fastmlstm.models import generation

CPU = torch.device("cpu")
BACKENDS = fastmlstm.available_backends(CPU)  # triton through its interpreter (conftest sets it)
# (the interpreter is slow: Triton runs the float32 distribution tests and the cross-backend seed one)
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]
LOCAL = "cpu" if "cpu" in BACKENDS else "reference"  # (the CPU backend's prepared steps, where it builds)
H, E = 16, 8
# max |p - p_f64| over a step's 256 probabilities (each near 1/256 at these sizes, so a wrong
# state, temperature or hold order moves them by 1e-3 or more): the model's dtype against float64
# from the same stored weights. float32 measured about 1e-8; bfloat16 about 2e-4, float16 3e-5.
PROB_TOL = {torch.float32: 1e-6, torch.float16: 3e-4, torch.bfloat16: 2e-3}


def _model(backend=LOCAL, dtype=torch.float32, seed=0) -> ByteLM:
    torch.manual_seed(seed)
    model = ByteLM(hidden_size=H, embed_size=E, backend=backend)
    with torch.no_grad():  # larger gains than the initialization's, so the bytes differ clearly
        model.readout.weight.mul_(6.0)
        model.rnn.weight_hh_g.mul_(2.0)
    return model.to(dtype)


class F64:
    """The byte model in float64 from ``model``'s parameters: weight norm W = g V / ||V|| (norm over
    each row's inputs), m = (x Wmx^T) * (h Wmh^T), z = x Wx^T + m Wh^T + b split i, f, o, u,
    c = f c + i u, h = o tanh(c); held cells overwritten after the step (docs/probe.md)."""

    def __init__(self, model: ByteLM):
        p = {k: v.detach().to(CPU, torch.float64) for k, v in model.named_parameters()}

        def wn(name):
            v, g = p[f"rnn.{name}_v"], p[f"rnn.{name}_g"]
            return g[:, None] * v / v.norm(dim=1, keepdim=True)

        self.emb, self.bias = p["embedding.weight"], p["rnn.bias_ih"]
        self.wx, self.wh, self.wmx, self.wmh = (wn(n) for n in ("weight_ih", "weight_hh", "weight_im", "weight_hm"))
        self.wr, self.br = p["readout.weight"], p["readout.bias"]

    def step(self, byte: torch.Tensor, h, c, held: dict | None):
        x = self.emb[byte]
        m = (x @ self.wmx.T) * (h @ self.wmh.T)
        i, f, o, u = (x @ self.wx.T + m @ self.wh.T + self.bias).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        h = torch.sigmoid(o) * torch.tanh(c)
        if held:
            c = c.clone()
            for unit, value in held.items():
                c[:, unit] = value
        return h, c

    def logits(self, h):
        return h @ self.wr.T + self.br

    def after(self, prefix: bytes, B: int, held: dict | None):
        """(logits after the prefix [B, 256], h, c)."""
        h = c = torch.zeros(B, H, dtype=torch.float64)
        for b in prefix:
            h, c = self.step(torch.full((B,), b), h, c, held)
        return self.logits(h), h, c


def _probs(logits, temperature):
    return torch.softmax(logits.double() / temperature, dim=-1)


def _recorded_generate(monkeypatch, model, *args, **kwargs):
    """(samples, [(logits [B, 256], drawn bytes [B])] of every draw generate made)."""
    seen, real = [], generation.sample_bytes

    def spy(logits, *rest):
        drawn = real(logits, *rest)
        seen.append((logits.clone(), drawn.clone()))
        return drawn

    with monkeypatch.context() as m:
        m.setattr(fastmlstm.models.lm, "sample_bytes", spy)
        samples = model.generate(*args, **kwargs)
    return samples, seen


# (Triton's interpreter is slow: float32 alone covers its path)
@pytest.mark.parametrize("backend, dtype", [(b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16,
                                            torch.float16) if b != "triton" or d == torch.float32])
@pytest.mark.parametrize("prefix, held", [(b"\n The movie was", None), (b"Q", {3: 1.5, 11: -1.0}),
                                          (b"steer me", {0: -2.0})])
def test_every_steps_distribution_is_the_float64_models(monkeypatch, backend, dtype, prefix, held):
    model, temperature, B = _model(backend, dtype), 0.7, 2
    samples, seen = _recorded_generate(monkeypatch, model, prefix, 12, temperature, num_samples=B, seed=1,
                                       fixed_units=held)
    ref = F64(model)
    logits, h, c = ref.after(prefix, B, held)
    worst = 0.0
    assert len(seen) == 12 and all(len(s) == 12 for s in samples)
    for k, (got, drawn) in enumerate(seen):
        assert got.dtype == torch.float32 and got.shape == (B, 256)
        assert drawn.tolist() == [s[k] for s in samples]  # the drawn bytes are the ones returned
        worst = max(worst, (_probs(got, temperature) - _probs(logits, temperature)).abs().max().item())
        h, c = ref.step(drawn, h, c, held)  # follow the bytes drawn
        logits = ref.logits(h)
    assert worst < PROB_TOL[dtype], worst


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("held", [None, {5: 1.0}])
def test_a_seed_draws_the_exponential_race_of_the_float64_distribution(backend, held):
    """The bytes themselves: byte = argmax(p / E) with E ~ Exp(1) drawn from a generator seeded with
    ``seed``, one [B, 256] draw per byte, p the float64 model's softmax at the temperature (and
    within top_k) - the same on every backend."""
    model, B, n, temperature = _model(backend), 3, 16, 0.8
    for top_k in (None, 5):
        got = model.generate(b"xy", n, temperature, num_samples=B, seed=7, top_k=top_k, fixed_units=held)
        ref, g = F64(model), torch.Generator().manual_seed(7)
        logits, h, c = ref.after(b"xy", B, held)
        want = []
        for _ in range(n):
            scores = logits / temperature
            if top_k is not None:
                scores = scores.masked_fill(scores < scores.topk(top_k, dim=-1).values[:, -1:], -math.inf)
            byte = (torch.softmax(scores, -1) / torch.empty(B, 256).exponential_(generator=g).double()).argmax(-1)
            want.append(byte)
            h, c = ref.step(byte, h, c, held)
            logits = ref.logits(h)
        assert got == [bytes(r) for r in torch.stack(want, 1).tolist()]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_greedy_decoding_is_the_float64_argmax_and_the_prefix_is_carried(backend):
    model = _model(backend)
    ref = F64(model)
    for prefix in (b"\x00", b"ab", bytes(range(200, 256)) + "é".encode()):
        got = model.generate(prefix, 10, 0, num_samples=2)
        assert got[0] == got[1]
        logits, h, c = ref.after(prefix, 1, None)
        want = []
        for _ in range(10):
            byte = logits.argmax(-1)
            want.append(int(byte))
            h, c = ref.step(byte, h, c, None)
            logits = ref.logits(h)
        assert got[0] == bytes(want), prefix


def test_the_same_seed_gives_the_same_bytes_across_calls_and_backends():
    runs = {b: _model(b).generate(b"seeded", 16, 1.0, num_samples=3, seed=11, fixed_units={2: 0.5})
            for b in BACKENDS}
    again = _model().generate(b"seeded", 16, 1.0, num_samples=3, seed=11, fixed_units={2: 0.5})
    assert len(set(map(tuple, runs.values()))) == 1 and again == runs[LOCAL]
    g = torch.Generator().manual_seed(11)  # a generator seeded alike draws the same
    assert _model().generate(b"seeded", 16, 1.0, num_samples=3, generator=g, fixed_units={2: 0.5}) == again


@pytest.mark.parametrize("held", [None, {2: 0.5}])
def test_a_long_prefix_carries_the_state_to_its_end(monkeypatch, held):
    """1000 prefix bytes, in one fused pass (free) or byte by byte (held): the first sampled byte's
    distribution is still the float64 model's."""
    model, prefix = _model(), bytes((37 * i) % 256 for i in range(1000))
    _, seen = _recorded_generate(monkeypatch, model, prefix, 1, num_samples=2, seed=0, fixed_units=held)
    logits, _, _ = F64(model).after(prefix, 2, held)
    assert (_probs(seen[0][0], 1.0) - _probs(logits, 1.0)).abs().max() < PROB_TOL[torch.float32]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_float64_model_generates_and_steers_in_float64(monkeypatch, backend):
    """The state of a float64 model is float64, and the held values are written into it (they
    were float32: holding any unit of a float64 model failed inside the index write)."""
    model = _model(backend, torch.float64)
    for held in (None, {3: 1.5, 9: -0.25}):
        _, seen = _recorded_generate(monkeypatch, model, b"f64", 8, 0.9, num_samples=2, seed=3,
                                     fixed_units=held)
        ref = F64(model)
        logits, h, c = ref.after(b"f64", 2, held)
        for got, drawn in seen:
            torch.testing.assert_close(got.double(), logits, atol=1e-6, rtol=0)  # (logits are float32)
            h, c = ref.step(drawn, h, c, held)
            logits = ref.logits(h)
    steered = fastmlstm.probe.steer(model, 3, n_bytes=4, num_samples=1)  # (the paper's steering, through generate)
    assert set(steered) == {"positive", "negative"}


def test_held_values_follow_the_state_dtype_not_the_default_dtype():
    """float32 state, float64 default dtype: the held values are still written (as float32)."""
    model = _model()
    want = model.generate(b"ab", 6, seed=2, fixed_units={4: 0.75})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = model.generate(b"ab", 6, seed=2, fixed_units={4: 0.75})
    finally:
        torch.set_default_dtype(previous)
    assert got == want


# ---------------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.3, None), (2.5, 7), (1.0, 1), (1e-4, None)])
def test_the_sampler_draws_exactly_what_torch_multinomial_draws(temperature, top_k):
    """Same generator state, same probabilities: the very same bytes as ``torch.multinomial(p, 1)``
    (rows with zeros from top_k, a single nonzero, and probabilities underflowing to 0 at a low
    temperature among them)."""
    logits = 3 * torch.randn(500, 256, generator=torch.Generator().manual_seed(0))
    p = generation.byte_probabilities(logits, temperature, top_k)
    got = generation.sample_bytes(logits, temperature, top_k, torch.Generator().manual_seed(5))
    want = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert torch.equal(got, want)
    assert bool((p.gather(1, got[:, None]) > 0).all())  # never a byte of probability 0


def test_the_samplers_frequencies_pass_a_chi_square_test_and_skip_zeros():
    g = torch.Generator().manual_seed(1)
    logits = 0.6 * torch.randn(256, generator=g)
    N = 40000
    for temperature, top_k in ((1.0, None), (0.5, 30)):
        p = generation.byte_probabilities(logits[None], temperature, top_k)[0].double()
        drawn = generation.sample_bytes(logits.expand(N, 256), temperature, top_k, g)
        counts = torch.bincount(drawn, minlength=256).double()
        assert counts[p == 0].sum() == 0 and int((p > 0).sum()) == (256 if top_k is None else top_k)
        kept = p > 0
        assert (N * p[kept]).min() > 5  # every expected count large enough for the test
        chi2, pvalue = stats.chisquare(counts[kept].numpy(), (N * p[kept] / p[kept].sum()).numpy())
        assert pvalue > 1e-4, (temperature, top_k, chi2, pvalue)
    # and the test tells a wrong distribution apart: the same draws against temperature 1's p
    wrong = generation.byte_probabilities(logits[None], 1.0, None)[0].double()
    assert stats.chisquare(counts[kept].numpy(), (N * wrong[kept] / wrong[kept].sum()).numpy()).pvalue < 1e-6


def test_low_temperatures_underflow_to_the_most_likely_bytes_and_split_ties():
    logits = torch.randn(1, 256, generator=torch.Generator().manual_seed(2))
    logits[0, 42] = logits.max() + 0.5
    g = torch.Generator().manual_seed(0)
    drawn = generation.sample_bytes(logits.expand(2000, 256), 1e-3, None, g)
    assert bool((drawn == 42).all())  # every other probability underflowed to 0
    logits[0, 200] = logits[0, 42]  # a tie: each of the two about half the time, nothing else
    drawn = generation.sample_bytes(logits.expand(4000, 256), 1e-6, None, g)
    share = float((drawn == 42).double().mean())
    assert set(drawn.tolist()) == {42, 200} and abs(share - 0.5) < 0.04  # 5 standard deviations
    assert bool((generation.sample_bytes(logits, 0, None, g) == 42).all())  # temperature 0: argmax, first of a tie
    with pytest.raises(ValueError, match="too small"):  # logits / temperature overflow float32
        generation.sample_bytes(logits * 100, 1e-38, None, g)


# ---------------------------------------------------------------------------------------------------
# arguments and model states


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_bytes": -1}, ValueError, "n_bytes must be an integer >= 0"),
    ({"n_bytes": 2.5}, TypeError, "n_bytes"),
    ({"n_bytes": True}, TypeError, "n_bytes"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"temperature": -0.5}, ValueError, "temperature"),
    ({"temperature": "hot"}, TypeError, "temperature"),
    ({"num_samples": 0}, ValueError, "num_samples"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_k": 257}, ValueError, "top_k"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"fixed_units": {H: 1.0}}, ValueError, r"units in \[0, 16\)"),
    ({"fixed_units": {-1: 1.0}}, ValueError, "a unit of fixed_units"),
    ({"fixed_units": {1.0: 1.0}}, TypeError, "a unit of fixed_units"),
    ({"fixed_units": {"3": 1.0}}, TypeError, "a unit of fixed_units"),
    ({"fixed_units": {2: float("nan")}}, ValueError, r"fixed_units\[2\] must be a finite number"),
    ({"fixed_units": {2: float("-inf")}}, ValueError, r"fixed_units\[2\]"),
    ({"fixed_units": {2: None}}, TypeError, r"fixed_units\[2\]"),
    ({"fixed_units": {2: 1e300}}, ValueError, "does not fit the float32 cell state"),  # (was held at inf)
    ({"fixed_units": {1: 1.0, torch.tensor(1): -1.0}}, ValueError, "names unit 1 twice"),  # (was: last won)
    ({"fixed_units": [(1, 1.0)]}, TypeError, "mapping"),
    ({"fixed_units": []}, TypeError, "mapping"),  # (an empty wrong type was taken for "no units")
    ({"fixed_units": 0}, TypeError, "mapping"),
    ({"prefix": b""}, ValueError, "at least one byte"),
    ({"prefix": None}, TypeError, "str or bytes"),
    ({"prefix": [97]}, TypeError, "str or bytes"),
    ({"prefix": torch.tensor([97])}, TypeError, "str or bytes"),
    ({"generator": torch.Generator(), "seed": 1}, ValueError, "seed or generator"),
    ({"generator": 3}, TypeError, "torch.Generator"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    model = _model("reference")
    args = {"prefix": b"a", "n_bytes": 3, **kwargs}
    with pytest.raises(error, match=match) as caught:
        model.generate(**args)
    assert isinstance(caught.value, fastmlstm.InputError)


def test_no_units_held_is_plain_generation():
    model = _model()
    plain = model.generate(b"ab", 10, seed=4, num_samples=2)
    assert model.generate(b"ab", 10, seed=4, num_samples=2, fixed_units={}) == plain
    assert model.generate(b"ab", 0, seed=4, num_samples=2) == [b"", b""]
    assert model.generate("ab", 10, seed=4, num_samples=2) == plain == model.generate(bytearray(b"ab"), 10, seed=4,
                                                                                       num_samples=2)


def test_train_mode_and_trainable_weights_change_nothing_and_build_no_graph(monkeypatch):
    model = _model()
    want = model.eval().generate(b"train", 10, seed=6, num_samples=2, fixed_units={1: 0.5})
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        got, seen = _recorded_generate(monkeypatch, model, b"train", 10, seed=6, num_samples=2,
                                       fixed_units={1: 0.5})
    assert got == want and model.training
    assert all(not logits.requires_grad and logits.grad_fn is None for logits, _ in seen)
    assert all(p.grad is None for p in model.parameters())


def test_calls_share_no_state_and_follow_weights_edited_between_them():
    model = _model()
    first = model.generate(b"one", 12, seed=1, num_samples=2)
    model.generate(b"two", 30, seed=9, num_samples=3, fixed_units={0: 3.0, 5: -3.0})
    model.generate(b"three", 5, 0, num_samples=1)
    assert model.generate(b"one", 12, seed=1, num_samples=2) == first == _model().generate(
        b"one", 12, seed=1, num_samples=2)
    before = model.generate(b"one", 12, 0)[0]
    with torch.no_grad():  # edits in place (an optimizer step's): the next call must see them
        model.rnn.weight_hm_v.neg_()
        model.rnn.weight_ih_g.mul_(3.0)
    ref = F64(model)
    logits, h, c = ref.after(b"one", 1, None)
    want = []
    for _ in range(12):
        byte = logits.argmax(-1)
        want.append(int(byte))
        h, c = ref.step(byte, h, c, None)
        logits = ref.logits(h)
    assert model.generate(b"one", 12, 0)[0] == bytes(want) != before
