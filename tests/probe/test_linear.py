"""The linear probe finds a planted informative unit; C selection; the single-unit classifier;
the data-efficiency curve; the paper's evaluation protocols on synthetic data; bad labels."""

import numpy as np
import pytest

from fastmlstm.data.datasets import PairSplit, TextSplit
from fastmlstm.probe import data_efficiency, evaluate, train_probe, unit_threshold
from fastmlstm.probe.linear import default_sizes, stratified_holdout

F, UNIT = 48, 29


def planted(n, seed, unit=UNIT, strength=1.2, sign=1):
    """Noise features with one unit shifted by the label (and a weak decoy unit)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, F)).astype(np.float32)
    x[:, unit] += sign * strength * (2 * y - 1)
    x[:, 3] += 0.2 * (2 * y - 1)
    return x, y


def test_probe_finds_the_planted_unit():
    x, y = planted(600, 0)
    dx, dy = planted(200, 1)
    tx, ty = planted(400, 2)
    probe = train_probe(x, y, dx, dy)
    assert probe.sentiment_unit == UNIT and probe.unit_sign == 1
    assert probe.selection == "dev" and set(probe.scores) == set(2.0 ** np.arange(-8, 1))
    assert 1 <= probe.features_used < F // 2  # L1 keeps few features
    assert probe.score(tx, ty) > 0.85
    assert probe.unit_score(tx, ty) > 0.85  # one unit alone is nearly as good
    assert abs(probe.unit_threshold) < 0.3  # classes are symmetric around 0
    # the probe beats chance only through the planted unit: without it, accuracy collapses
    tx2 = tx.copy()
    tx2[:, UNIT] = 0
    assert probe.score(tx2, ty) < 0.7


def test_anticorrelated_unit_gets_a_negative_sign():
    x, y = planted(500, 3, sign=-1)
    tx, ty = planted(300, 4, sign=-1)
    probe = train_probe(x, y)  # no dev: C by cross-validation
    assert probe.selection == "cv5"
    assert probe.sentiment_unit == UNIT and probe.unit_sign == -1
    assert probe.unit_score(tx, ty) > 0.85
    assert np.all(probe.unit_predict(tx[:5]) == np.where(tx[:5, UNIT] < probe.unit_threshold, 1, 0))


def test_string_labels_and_fixed_C():
    x, y = planted(300, 5)
    names = np.array(["neg", "pos"])[y]
    probe = train_probe(x, names, Cs=[0.5])
    assert probe.selection == "fixed" and probe.C == 0.5 and probe.scores == {}
    assert set(probe.predict(x[:10])) <= {"neg", "pos"}
    assert probe.unit_score(x, names) > 0.8


def test_probe_without_any_informative_feature_reports_no_unit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    probe = train_probe(x, y, Cs=[1e-4])  # so strong that every weight is zero
    assert probe.features_used == 0 and probe.sentiment_unit is None and probe.unit_sign is None
    with pytest.raises(ValueError, match="no sentiment unit"):
        probe.unit_score(x, y)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((10, 4)), np.ones(10), "one class only"),
        (np.zeros((10, 4)), np.arange(10) % 3, "binary"),
        (np.zeros((0, 4)), np.zeros(0), "no examples"),
        (np.zeros(10), np.arange(10) % 2, "2-D"),
        (np.full((10, 4), np.nan), np.arange(10) % 2, "NaN"),
        (np.zeros((10, 4)), np.arange(9) % 2, "10 entries"),
    ],
)
def test_bad_probe_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        train_probe(x, y)


def test_dev_arguments_must_come_together():
    x, y = planted(50, 0)
    with pytest.raises(ValueError, match="both dev_x and dev_y"):
        train_probe(x, y, dev_x=x)
    with pytest.raises(ValueError, match="columns"):
        train_probe(x, y, x[:, :5], y)


def test_cv_needs_two_examples_per_class():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(ValueError, match="at least 2 examples of each class"):
        train_probe(x, np.array([0, 0, 0, 0, 1]))


def test_unit_threshold_is_the_best_cut():
    rng = np.random.default_rng(0)
    for trial in range(20):
        v = np.round(rng.normal(size=40), 1)  # ties on purpose
        y = rng.integers(0, 2, 40)
        for sign in (1, -1):
            t, acc = unit_threshold(v, y, sign, 1)
            assert acc == pytest.approx(np.mean((sign * (v - t) > 0) == (y == 1)))
            cuts = np.concatenate([[v.min() - 1], (np.unique(v)[1:] + np.unique(v)[:-1]) / 2, [v.max() + 1]])
            best = max(np.mean((sign * (v - c) > 0) == (y == 1)) for c in cuts)
            assert acc == pytest.approx(best)


def test_stratified_holdout():
    y = np.array([0] * 30 + [1] * 10)
    kept, held = stratified_holdout(y, 0.2, seed=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 40
    assert np.sum(y[held] == 0) == 6 and np.sum(y[held] == 1) == 2


def test_data_efficiency_curve():
    x, y = planted(400, 0, strength=0.8)
    dx, dy = planted(150, 1, strength=0.8)
    tx, ty = planted(300, 2, strength=0.8)
    curve = data_efficiency(x, y, tx, ty, dev_x=dx, dev_y=dy, sizes=[4, 20, 100, 400], draws=6, seed=0)
    assert curve.accuracies.shape == (4, 6) and list(curve.sizes) == [4, 20, 100, 400]
    assert np.all(np.isnan(curve.accuracies[-1, 1:]))  # one draw at the full size
    assert np.all(curve.p10 <= curve.median + 1e-12) and np.all(curve.median <= curve.p90 + 1e-12)
    assert curve.median[-1] > 0.75 and curve.median[-1] >= curve.median[0]
    d = curve.to_dict()
    assert d["sizes"] == [4, 20, 100, 400] and d["draws"] == 6 and len(d["median"]) == 4
    fixed = data_efficiency(x, y, tx, ty, C=0.5, sizes=[10, 50], draws=3)
    assert np.all(fixed.C[~np.isnan(fixed.C)] == 0.5)


def test_data_efficiency_argument_checks():
    x, y = planted(100, 0)
    with pytest.raises(ValueError, match="dev data"):
        data_efficiency(x, y, x, y)
    with pytest.raises(ValueError, match="sizes"):
        data_efficiency(x, y, x, y, C=1.0, sizes=[1, 10])
    with pytest.raises(ValueError, match="sizes"):
        data_efficiency(x, y, x, y, C=1.0, sizes=[10, 101])
    assert default_sizes(6920) == [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 6920]


# ------------------------------------------------------------------------------------------
# The evaluation protocols, with a featurizer that plants the label in unit UNIT.

WORDS = {"good": 1.0, "great": 1.0, "bad": -1.0, "awful": -1.0}


def fake_featurizer(texts):
    rng = np.random.default_rng(len(texts))
    x = rng.normal(scale=0.5, size=(len(texts), F)).astype(np.float32)
    for i, t in enumerate(texts):
        x[i, UNIT] += sum(WORDS.get(w, 0.0) for w in t.split())
    return x


def text_split(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    texts = [f"item {i} was {rng.choice(['good', 'great'] if label else ['bad', 'awful'])}" for i, label in enumerate(y)]
    return TextSplit(texts, y.astype(np.int64))


def test_evaluate_splits_protocol_with_and_without_test():
    splits = {"train": text_split(300, 0), "dev": text_split(100, 1), "test": text_split(120, 2)}
    r = evaluate(fake_featurizer, "sst2", splits=splits, curve=True, curve_draws=3, curve_sizes=[10, 50, 300])
    m = r.metrics
    assert m["task"] == "sst2" and m["evaluated_on"] == "test" and m["c_selection"] == "dev"
    assert m["accuracy"] > 95 and m["sentiment_unit"] == UNIT and m["unit_accuracy"] > 95
    assert m["paper"] == {"accuracy": 91.8} and m["n_eval"] == 120
    assert m["data_efficiency"]["sizes"] == [10, 50, 300] and r.curve is not None
    del splits["test"]
    m = evaluate(fake_featurizer, "sst2", splits=splits).metrics
    assert m["evaluated_on"].startswith("dev") and m["c_selection"] == "10% of train held out"
    m = evaluate(fake_featurizer, "imdb", splits={"train": text_split(200, 3)}, limit=150).metrics
    assert m["evaluated_on"].startswith("20% of train") and m["n_train"] + m["n_dev"] + m["n_eval"] == 150


def test_evaluate_cross_validation_protocol():
    r = evaluate(fake_featurizer, "mr", splits={"all": text_split(200, 4)})
    m = r.metrics
    assert m["protocol"] == "cv10" and m["evaluated_on"] == "10-fold cross-validation"
    assert m["accuracy"] > 95 and m["sentiment_unit"] == UNIT and len(m["fold_units"]) == 10
    assert m["paper"] == {"accuracy": 86.9}


def test_evaluate_pair_classification():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    first = [f"s{i} good" for i in range(n)]
    second = [f"t{i} {'great' if label else 'awful'}" for i, label in enumerate(y)]
    splits = {"train": PairSplit(first[:200], second[:200], y[:200]),
              "test": PairSplit(first[200:], second[200:], y[200:])}
    m = evaluate(fake_featurizer, "msrp", splits=splits).metrics
    assert m["protocol"] == "pair-classification" and m["accuracy"] > 90 and m["f1"] > 90
    assert "sentiment_unit" not in m


def test_evaluate_relatedness():
    rng = np.random.default_rng(0)
    n = 400
    k = rng.integers(0, 3, n)  # relatedness 1, 3 or 5: 0, 3 or 6 "good" words in the second sentence
    first = [f"a{i}" for i in range(n)]
    second = [f"b{i} " + " ".join(["good"] * int(3 * j)) for i, j in enumerate(k)]
    scores = np.clip(1.0 + 2.0 * k + rng.uniform(-0.3, 0.3, n), 1, 5)
    splits = {"train": PairSplit(first[:250], second[:250], scores[:250]),
              "dev": PairSplit(first[250:320], second[250:320], scores[250:320]),
              "test": PairSplit(first[320:], second[320:], scores[320:])}
    m = evaluate(fake_featurizer, "sick", splits=splits).metrics
    assert m["protocol"] == "relatedness" and m["pearson"] > 0.9 and m["spearman"] > 0.85
    assert m["mse"] < 0.2 * np.var(scores[320:])  # explains over 80% of the variance


def test_evaluate_rejects_unknown_tasks_and_one_class_data():
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(fake_featurizer, "trec", splits={})
    split = text_split(50, 0)
    one = TextSplit(split.texts, np.ones(50, dtype=np.int64))
    with pytest.raises(ValueError, match="one class"):
        evaluate(fake_featurizer, "mr", splits={"all": one})
    with pytest.raises(TypeError, match="callable"):
        evaluate("not a model", "mr", splits={"all": split})
