"""Property tests: featurize takes any byte string and any Unicode text without a crash, and the
command line featurizes exactly the bytes the Python API does."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlstm
from fastmlstm.cli import main
from fastmlstm.probe import featurize, preprocess

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    model = fastmlstm.ByteLM(hidden_size=8, embed_size=4, backend="reference").eval()
    path = tmp_path_factory.mktemp("model") / "m.pt"
    model.save(path)
    return model, path


def _check(features, n):
    assert features.shape == (n, 8) and features.dtype == np.float32
    assert np.isfinite(features).all() and np.abs(features).max(initial=0) <= 1.0


@SETTINGS
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_any_bytes_featurize(model, texts):
    _check(featurize(model[0], texts, batch_size=4), len(texts))


@SETTINGS
@given(st.lists(st.text(max_size=40), max_size=6))
def test_any_unicode_featurizes_as_its_utf8_bytes(model, texts):
    as_text = featurize(model[0], texts, batch_size=4)
    _check(as_text, len(texts))
    np.testing.assert_array_equal(as_text, featurize(model[0], [t.encode("utf-8") for t in texts], batch_size=4))
    for t in texts:  # what the model reads is the paper's preprocessing of the text
        assert preprocess(t).startswith(b"\n ") and preprocess(t).endswith(b" ")


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), min_size=1, max_size=5))
def test_the_cli_featurizes_the_bytes_the_api_does(model, tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "in.txt").write_bytes(b"".join(line + b"\n" for line in lines))
    code = main(["featurize", "--model", str(model[1]), "--input", str(folder / "in.txt"), "-o",
                 str(folder / "out.npy"), "--no-progress", "--backend", model[0].backend])
    assert code == 0
    expected = featurize(model[0], [line.removesuffix(b"\r") for line in lines])
    np.testing.assert_array_equal(np.load(folder / "out.npy"), expected)
