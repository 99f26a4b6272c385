"""Property tests: featurize takes any byte string and any Unicode text without a crash, and the
command line featurizes exactly the bytes the Python API does; the single-unit threshold is the
best cut whichever way the labels are coded; ``limit`` keeps every class, in proportion."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlstm
from fastmlstm.cli import main
from fastmlstm.data.datasets import TextSplit
from fastmlstm.probe import featurize, preprocess, unit_threshold
from fastmlstm.probe.tasks import _limit

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


VALUES = [-1.0, -0.5, 0.0, 0.25, float(np.nextafter(np.float32(0.25), np.float32(1))), 0.5, 2.0]  # ties on purpose


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(VALUES), st.booleans()), min_size=1, max_size=30), st.sampled_from([1, -1]))
def test_unit_threshold_is_the_best_cut_whichever_way_the_labels_are_coded(pairs, sign):
    v = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs]).astype(int)
    t, acc = unit_threshold(v, y, sign, 1)
    assert acc == np.mean((sign * (v - t) > 0) == (y == 1))
    cuts = np.concatenate([[v.min() - 1], (np.unique(v)[1:] + np.unique(v)[:-1]) / 2, [v.max() + 1]])
    assert acc == max(np.mean((sign * (v - c) > 0) == (y == 1)) for c in cuts)
    assert unit_threshold(v, 1 - y, -sign, 1) == (t, acc)  # 1/0 instead of 0/1: the same classifier
    assert unit_threshold(v, np.array(["neg", "pos"])[y], sign, "pos") == (t, acc)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(2, 120), st.integers(0, 2**32 - 1), st.booleans())
def test_limit_cuts_to_limit_examples_keeping_every_class_in_proportion(n0, n1, limit, seed, shuffle):
    labels = np.repeat([0, 1], [n0, n1])
    if shuffle:
        labels = np.random.default_rng(seed).permutation(labels)
    cut = _limit(TextSplit([str(i) for i in range(n0 + n1)], labels), limit, seed, True)
    counts = np.bincount(cut.labels, minlength=2)
    assert len(cut) == min(limit, n0 + n1) and len(set(cut.texts)) == len(cut) and counts.min() >= 1
    share = np.array([n0, n1]) * len(cut) / (n0 + n1)
    assert np.all(np.abs(counts - share) < 1) or share.min() < 1  # a class under one share gets one
