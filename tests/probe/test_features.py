"""featurize and cell_trace: batched, sorted, chunked runs equal running each text alone; the
paper's preprocessing; float32 output whatever the dtype; bad input is refused or handled as
documented."""

import numpy as np
import pytest
import torch
from conftest import BACKENDS

import fastmlstm
from fastmlstm.probe import cell_trace, featurize, preprocess

TEXTS = [
    "A stirring, funny and finally transporting re-imagining of Beauty and the Beast",
    "",
    "Bad.",
    "caf\u00e9 \u2603 na\u00efve",
    "line one\nline two &amp; &quot;three&quot;",
    b"raw \xff\xfe invalid utf-8",
    "control \x00\x1a\x07 chars",
    "   ",
    "x" * 150,
    "mid-sized review text",
]


def _model(backend="auto", dtype=None, H=32):
    torch.manual_seed(0)
    return fastmlstm.ByteLM(hidden_size=H, embed_size=8, backend=backend, dtype=dtype)


def _alone(model, data: bytes) -> np.ndarray:
    """Final cell state of one byte string, run by itself in one call."""
    with torch.no_grad():
        _, (_, c) = model.hidden(torch.tensor([list(data)], dtype=torch.uint8))
    return c[0].float().numpy()


@pytest.mark.parametrize("batch_size, chunk_size", [(3, 7), (64, None), (1, 1000)])
def test_featurize_equals_running_each_text_alone(batch_size, chunk_size):
    model = _model()
    feats = featurize(model, TEXTS, batch_size=batch_size, chunk_size=chunk_size)
    assert feats.shape == (len(TEXTS), 32) and feats.dtype == np.float32
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(feats[i], np.tanh(_alone(model, preprocess(text))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_featurize_with_kernel_backends(backend):
    model = _model(backend, H=16)
    ref = _model("reference", H=16)
    texts = TEXTS[:5]
    np.testing.assert_allclose(featurize(model, texts, batch_size=2, chunk_size=8), featurize(ref, texts),
                               rtol=1e-4, atol=1e-5)


def test_batches_run_in_fused_passes_not_per_text(monkeypatch):
    model = _model()
    calls = []
    real = model.hidden

    def spy(x, *args, **kwargs):
        calls.append((tuple(x.shape), kwargs.get("lengths")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(model, "hidden", spy)
    texts = [f"text number {i} " * (i + 1) for i in range(10)]
    featurize(model, texts, batch_size=4, chunk_size=10_000)
    assert len(calls) == 3  # ceil(10 / 4) batches, each one call over all its steps
    longest = max(len(preprocess(t)) for t in texts)
    assert calls[0][0] == (4, longest) and calls[0][1] is not None  # sorted longest first, ragged lengths
    calls.clear()
    featurize(model, texts, batch_size=10, chunk_size=16)
    # rows that ended leave the batch: each chunk holds only the rows still running
    rows = [shape[0] for shape, _ in calls]
    assert rows == sorted(rows, reverse=True) and rows[-1] < 10


def test_order_is_preserved_and_duplicates_agree():
    model = _model()
    texts = ["b" * 30, "a", "b" * 30, "ccc"]
    f = featurize(model, texts)
    g = featurize(model, texts[::-1])
    np.testing.assert_array_equal(f, g[::-1])
    np.testing.assert_array_equal(f[0], f[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_gives_float32_features(dtype):
    model = _model().to(dtype)
    feats = featurize(model, TEXTS[:4])
    assert feats.dtype == np.float32 and np.all(np.abs(feats) <= 1)
    np.testing.assert_allclose(feats, featurize(_model(), TEXTS[:4]), atol=0.05)


def test_preprocessing_is_the_papers():
    assert preprocess("Great&amp;cheap\nphone ") == b"\n Great&cheap phone "
    assert preprocess("") == b"\n  "  # start token, space, end space
    assert preprocess("  padded  ") == b"\n padded "
    assert preprocess("caf\u00e9") == b"\n caf\xc3\xa9 "
    # bytes: invalid UTF-8 kept byte for byte, control characters kept
    assert preprocess(b"a\xff\x1ab") == b"\n a\xff\x1ab "
    assert preprocess("a\x00b") == b"\n a\x00b "


def test_empty_texts_and_raw_mode():
    model = _model()
    f = featurize(model, ["", "   ", "\n"])
    # all three preprocess to the same bytes: the features of the empty review
    np.testing.assert_array_equal(f[0], f[1])
    np.testing.assert_array_equal(f[0], f[2])
    assert np.any(f[0] != 0)
    raw = featurize(model, ["", "ab"], preprocess=False, activation=None)
    np.testing.assert_array_equal(raw[0], np.zeros(32, np.float32))  # no bytes: the zero state
    np.testing.assert_allclose(raw[1], _alone(model, b"ab"), rtol=1e-5, atol=1e-6)


def test_empty_list_gives_an_empty_matrix():
    out = featurize(_model(), [])
    assert out.shape == (0, 32) and out.dtype == np.float32


@pytest.mark.parametrize(
    "texts, error, match",
    [
        ("one string", TypeError, "not a single str"),
        (b"one bytes", TypeError, "not a single str"),
        (["ok", 3], TypeError, r"texts\[1\] is int"),
        (["ok", None], TypeError, r"texts\[1\] is NoneType"),
        (["ok", "lone \udc80 surrogate", "\ud800"], ValueError, r"texts\[2\].*U\+D800"),
        (5, TypeError, "sequence of str or bytes"),
    ],
)
def test_bad_texts(texts, error, match):
    with pytest.raises(error, match=match):
        featurize(_model(), texts)


def test_surrogate_escaped_str_round_trips_to_its_bytes():
    model = _model()
    data = b"bad \xe9 byte"
    as_str = data.decode("utf-8", errors="surrogateescape")
    np.testing.assert_array_equal(featurize(model, [as_str]), featurize(model, [data]))


def test_featurize_argument_checks():
    model = _model()
    with pytest.raises(ValueError, match="activation"):
        featurize(model, ["a"], activation="relu")
    with pytest.raises(ValueError, match="batch_size"):
        featurize(model, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        featurize(model, ["a"], chunk_size=0)


def test_progress_bar_reports_characters(capsys):
    featurize(_model(), ["some text"] * 20, progress=True)
    err = capsys.readouterr().err
    assert "featurize" in err and "char" in err


def test_cell_trace_matches_featurize_and_the_full_state():
    model = _model()
    text = "The best purchase I made this year &amp; more"
    trace = cell_trace(model, text, chunk_size=9)
    data = preprocess(text)
    assert trace.shape == (len(data), 32) and trace.dtype == np.float32
    with torch.no_grad():
        _, _, cells = model.hidden(torch.tensor([list(data)], dtype=torch.uint8), return_cell_states=True)
    np.testing.assert_allclose(trace, cells[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.tanh(trace[-1]), featurize(model, [text])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cell_trace(model, text, units=[3, 7], chunk_size=9), trace[:, [3, 7]])
    assert cell_trace(model, text, units=5).shape == (len(data), 1)
    assert cell_trace(model, b"", preprocess=False).shape == (0, 32)


@pytest.mark.parametrize("units", [[32], [-1], [], 40])
def test_cell_trace_rejects_bad_units(units):
    with pytest.raises(ValueError, match="units"):
        cell_trace(_model(), "text", units=units)
