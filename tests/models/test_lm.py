"""ByteLM: the gathered input tables equal the per-step projection, generation is seedable and can
hold units fixed, save/load round-trips, bad input is refused."""

import numpy as np
import pytest
import torch
from conftest import BACKENDS, DEVICE

import fastmlstm
from fastmlstm import ByteLM
from fastmlstm.models.lm import pad_bytes


def _model(backend="auto", **kw):
    torch.manual_seed(0)
    return ByteLM(hidden_size=kw.pop("hidden_size", 24), embed_size=kw.pop("embed_size", 8), backend=backend,
                  **kw).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_gather_equals_the_layer_on_embeddings(backend):
    model = _model(backend)
    x = torch.randint(0, 256, (3, 9), dtype=torch.uint8, device=DEVICE)
    logits, (h, c) = model(x)
    out, (h2, c2) = model.rnn(model.embedding(x.long()).transpose(0, 1))
    torch.testing.assert_close(logits, model.readout(out.transpose(0, 1)))
    torch.testing.assert_close(c, c2[0])
    # and gradients reach the embedding and every layer parameter through the table
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_variable_lengths_give_each_text_its_own_final_state():
    model = _model()
    texts = [b"short", b"a much longer review", b"", b"mid size"]
    batch, lengths = pad_bytes(texts, DEVICE)
    _, (h, c) = model.hidden(batch, lengths=lengths)
    for i, t in enumerate(texts):
        if not t:
            assert torch.equal(c[i], torch.zeros_like(c[i]))
            continue
        _, (_, c1) = model.hidden(torch.tensor([list(t)], dtype=torch.uint8, device=DEVICE))
        torch.testing.assert_close(c[i], c1[0])


def test_generation_is_reproducible_with_a_seed_and_batched():
    model = _model()
    a = model.generate("The movie", 30, seed=3, num_samples=4)
    b = model.generate("The movie", 30, seed=3, num_samples=4)
    c = model.generate("The movie", 30, seed=4, num_samples=4)
    assert a == b and a != c and len(a) == 4 and all(len(s) == 30 for s in a)
    assert len(set(a)) > 1  # the rows are independent samples


def test_greedy_generation_continues_the_prefix_state():
    model = _model()
    sample = model.generate("ab", 5, temperature=0)[0]
    # greedy decoding must agree with running the whole sequence and taking argmaxes
    seq = b"ab"
    for _ in range(5):
        logits, _ = model(torch.tensor([list(seq)], dtype=torch.uint8, device=DEVICE))
        seq += bytes([int(logits[0, -1].argmax())])
    assert sample == seq[2:]


def test_fixed_units_really_hold(monkeypatch):
    model = _model()
    seen = []
    real = fastmlstm.models.lm.byte_advance

    def spy(*args, **kwargs):
        advance = real(*args, **kwargs)

        def recorded(byte_rows, state):
            last, (h, c) = advance(byte_rows, state)
            seen.append(c.clone())  # c after every call, the hold applied
            return last, (h, c)

        return recorded

    monkeypatch.setattr(fastmlstm.models.lm, "byte_advance", spy)
    model.generate("xyz", 12, fixed_units={5: 1.0, 7: -1.0}, seed=0, num_samples=2)
    assert len(seen) == 3 + 11  # every prefix byte, then every sampled byte but the last
    for c in seen:
        assert torch.all(c[:, 5] == 1.0) and torch.all(c[:, 7] == -1.0)


def test_holding_a_unit_changes_the_samples():
    model = _model()
    free = model.generate("x", 40, seed=1)
    held = model.generate("x", 40, seed=1, fixed_units={0: 5.0, 1: -5.0, 2: 5.0})
    assert free != held


def test_save_and_load_round_trip(tmp_path):
    model = _model(dtype=torch.bfloat16)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = fastmlstm.load(path, map_location=DEVICE)
    assert loaded.config == model.config and loaded.readout.weight.dtype == torch.bfloat16
    x = torch.randint(0, 256, (2, 5), dtype=torch.uint8, device=DEVICE)
    assert torch.equal(loaded(x)[0], model(x)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        fastmlstm.load(tmp_path / "missing.pt")
    with pytest.raises(fastmlstm.ModelFileError, match="load_openai"):
        fastmlstm.load(tmp_path)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastmlstm model file"):
        fastmlstm.load(tmp_path / "other.pt")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m(torch.zeros(5, dtype=torch.uint8)), ValueError, r"2-D \[B, T\]"),
        (lambda m: m(torch.zeros(1, 5)), TypeError, "byte values"),
        (lambda m: m(torch.full((1, 5), 300)), ValueError, r"\[0, 255\]"),
        (lambda m: m.generate("", 5), ValueError, "at least one byte"),
        (lambda m: m.generate("a", 5, fixed_units={24: 1.0}), ValueError, "fixed_units"),
        (lambda m: m.generate("a", 5, temperature=-1), ValueError, "temperature"),
        (lambda m: m.generate(3, 5), TypeError, "str or bytes"),
        (lambda m: m.generate("a\ud800b", 5), ValueError, "lone surrogate U[+]D800 at character 1"),
        (lambda m: m.generate("a", 5, generator="x"), TypeError, "torch.Generator, got str"),
        (lambda m: m.generate("a", 5, seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
        (lambda m: m.generate("a", 5, temperature=1e-300), ValueError, "temperature 1e-300 is too small"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(ByteLM(hidden_size=24, embed_size=8))


def test_continuing_from_the_final_state_is_bit_exact():
    """The inputs come from a table, so a sequence cut anywhere continues exactly (README)."""
    model = ByteLM(hidden_size=24, embed_size=8).to(DEVICE)
    x = torch.randint(0, 256, (3, 17), dtype=torch.uint8, device=DEVICE)
    with torch.no_grad():
        whole, (h, c) = model.hidden(x)
        pieces, state = [], None
        for cut in ((0, 1), (1, 9), (9, 17)):
            piece, state = model.hidden(x[:, cut[0]:cut[1]], state)
            pieces.append(piece)
    assert torch.equal(torch.cat(pieces, 1), whole) and torch.equal(state[0], h) and torch.equal(state[1], c)


def test_a_float64_model_ignores_autocast_as_torch_does():
    """Autocast never casts float64: a float64 ByteLM's logits and features under it are the ones
    without it (the readout used to meet bfloat16 activations: a dtype error deep in the matmul)."""
    from fastmlstm import probe

    torch.manual_seed(0)
    model = ByteLM(hidden_size=12, embed_size=4, backend="reference").double()
    x = torch.tensor([list(b"autocast"), list(b"float64!")], dtype=torch.uint8)
    texts = ["a float64 model", "autocast"]
    plain, features = model(x)[0], probe.featurize(model, texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_features = model(x)[0], probe.featurize(model, texts)
    assert cast.dtype == torch.float64 and torch.equal(cast, plain)
    assert np.array_equal(cast_features, features)
