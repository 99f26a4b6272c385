"""The linear probe finds a planted informative unit; C selection (against a hand-written
sklearn sweep, ties); the single-unit classifier; the data-efficiency curve; the paper's
evaluation protocols on synthetic data, their metrics recomputed; bad labels."""

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from fastmlstm.data.datasets import PairSplit, TextSplit
from fastmlstm.errors import InputError
from fastmlstm.probe import (
    data_efficiency,
    evaluate,
    fit_relatedness,
    linear,
    pair_features,
    train_probe,
    unit_threshold,
)
from fastmlstm.probe.linear import C_GRID, default_sizes, stratified_holdout

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


# ------------------------------------------------------------------------------------------
# C, the unit and its threshold, checked against independent computations.


def sweep(n, seed):
    """Features where several C of the grid reach the same dev accuracy."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 40)).astype(np.float32)
    return x, (x[:, 5] + 0.5 * rng.normal(size=n) > 0).astype(int)


def test_C_is_the_released_demos_choice():
    """The released demo's train_with_reg_cv: liblinear L1 at each C (seed + i), argmax of the
    dev accuracy over the ascending grid (first, i.e. smallest, of ties), refit at seed + len(C)."""
    (x, y), (dx, dy) = sweep(300, 0), sweep(100, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = [LogisticRegression(C=c, penalty="l1", solver="liblinear", random_state=i, max_iter=1000)
                  .fit(x, y).score(dx, dy) for i, c in enumerate(C_GRID)]
        C = C_GRID[int(np.argmax(scores))]
        ref = LogisticRegression(C=C, penalty="l1", solver="liblinear", random_state=len(C_GRID), max_iter=1000)
        ref.fit(x, y)
    probe = train_probe(x, y, dx, dy)
    assert list(probe.scores.values()) == scores and probe.C == C
    np.testing.assert_array_equal(probe.weights, ref.coef_[0])
    assert probe.sentiment_unit == int(np.argmax(np.abs(ref.coef_[0]))) == 5
    assert sorted(scores).count(max(scores)) > 1  # the data has ties, so the next test means something


def test_ties_go_to_the_smallest_C_in_any_grid_order():
    (x, y), (dx, dy) = sweep(300, 0), sweep(100, 1)
    asc = train_probe(x, y, dx, dy)
    assert train_probe(x, y, dx, dy, Cs=C_GRID[::-1]).C == asc.C == 2.0 ** -6
    assert train_probe(x, y, dx, dy, Cs=[0.5, 2.0 ** -6, 1.0, 2.0 ** -4]).C == 2.0 ** -6
    # a mean of fold accuracies that sums the same numbers in another order is still a tie
    from fastmlstm.probe.linear import _best_C

    assert _best_C({0.5: 0.1 + 0.2, 0.25: 0.3}) == 0.25 and _best_C({0.5: 0.31, 0.25: 0.3}) == 0.5


def test_unit_predictions_use_the_threshold_chosen_on_train():
    """The best cut lies between two adjacent float32 values; compared in float32, the threshold
    rounded onto the upper one and misclassified it."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = (0.01 * rng.normal(size=(200, 6))).astype(np.float32)
    x[:, 2] = np.where(y == 1, rng.uniform(0.25, 1, 200), rng.uniform(-0.5, 0.25, 200))
    x[0, 2] = np.nextafter(np.float32(0.25), np.float32(1))  # a negative ...
    x[1, 2] = np.nextafter(x[0, 2], np.float32(1))           # ... and the next float32 up, a positive
    probe = train_probe(x, y, Cs=[1.0])
    assert probe.sentiment_unit == 2 and probe.unit_train_accuracy == 1.0
    assert probe.unit_score(x, y) == 1.0
    np.testing.assert_array_equal(probe.unit_predict(x[:2]), [0, 1])


def test_unit_threshold_does_not_depend_on_the_label_coding():
    rng = np.random.default_rng(1)
    for _ in range(30):
        v = np.round(rng.normal(size=30), 1)  # ties of values and of accuracies
        y = rng.integers(0, 2, 30)
        for sign in (1, -1):
            assert unit_threshold(v, y, sign, 1) == unit_threshold(v, 1 - y, -sign, 1)
            assert unit_threshold(v, y, sign, 1) == unit_threshold(v, np.array(["a", "b"])[y], sign, "b")
    # the 10-fold protocol scores the unit the same with labels coded 0/1 and 1/0
    split = text_split(300, 0)
    flipped = TextSplit(split.texts, 1 - split.labels)
    a, b = (evaluate(fake_featurizer, "mr", splits={"all": s}).metrics for s in (split, flipped))
    assert a["unit_accuracy"] == b["unit_accuracy"] and a["unit_sign"] == -b["unit_sign"]
    assert a["unit_threshold"] == b["unit_threshold"] and a["accuracy"] == b["accuracy"]


def test_curve_draws_only_training_rows_and_is_reproducible(monkeypatch):
    x, y = planted(200, 0)
    x[:, 0] = np.arange(200)  # row ids
    dx, dy = planted(80, 1)
    tx, ty = planted(100, 2)
    drawn = []
    fit = linear.train_probe
    def spy(a, b, *args, **kw):
        drawn.append(a[:, 0])
        return fit(a, b, *args, **kw)

    monkeypatch.setattr(linear, "train_probe", spy)
    curve = data_efficiency(x[:150], y[:150], tx, ty, dev_x=dx, dev_y=dy, sizes=[5, 40, 150], draws=4, seed=3)
    assert [len(d) for d in drawn] == [5] * 4 + [40] * 4 + [150]
    for d in drawn:
        assert len(np.unique(d)) == len(d) and d.max() < 150  # without replacement, from the pool only
        assert len(np.unique(y[d.astype(int)])) == 2
    assert len({tuple(np.sort(d)) for d in drawn[:4]}) == 4  # the draws differ
    again = data_efficiency(x[:150], y[:150], tx, ty, dev_x=dx, dev_y=dy, sizes=[5, 40, 150], draws=4, seed=3)
    np.testing.assert_array_equal(again.accuracies, curve.accuracies)
    np.testing.assert_array_equal(np.concatenate(drawn[9:18]), np.concatenate(drawn[:9]))


def test_limit_keeps_every_class_and_exactly_limit_examples():
    """A stratified cut of 5 from 60 + 2 kept 6 and dropped the last by position: here the
    minority class, which then was missing from the training split."""
    y = np.array([0] * 60 + [1] * 2)
    splits = {"train": TextSplit([f"item {i} was {'good' if v else 'bad'}" for i, v in enumerate(y)], y),
              "dev": text_split(20, 1), "test": text_split(20, 2)}
    m = evaluate(fake_featurizer, "sst2", splits=splits, limit=5).metrics
    assert m["n_train"] == 5 and m["n_dev"] == 5 and m["n_eval"] == 5  # (the property: test_properties.py)


def test_pair_features_and_the_msrp_metrics():
    u, v = np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([[3.0, 1.0], [0.5, -1.0]])
    np.testing.assert_array_equal(pair_features(u, v), [[2, 3, 3, -2], [0, 1, 0.25, 0]])
    np.testing.assert_array_equal(pair_features(u, v), pair_features(v, u))  # a pair has no order
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    first = [f"s{i} good" for i in range(300)]
    second = [f"t{i} {'good' if label else ('awful' if i % 3 else 'good')}" for i, label in enumerate(y)]
    splits = {"train": PairSplit(first[:200], second[:200], y[:200]),
              "test": PairSplit(first[200:], second[200:], y[200:])}
    def words(texts):  # deterministic, unlike fake_featurizer, so the pair features can be recomputed
        return np.array([[sum(WORDS.get(w, 0.0) for w in t.split()), len(t) % 7, t.count("a")] for t in texts])

    r = evaluate(words, "msrp", splits=splits)
    np.testing.assert_array_equal(r.eval_features, pair_features(words(first[200:]), words(second[200:])))
    pred = r.probe.predict(r.eval_features)
    assert 60 < r.metrics["accuracy"] < 100 and r.metrics["accuracy"] == pytest.approx(100 * np.mean(pred == y[200:]))
    assert r.metrics["f1"] == pytest.approx(100 * f1_score(y[200:], pred))


def soft_target_regression(x, scores, C):
    """Tai et al. (2015)'s sparse target distribution, fit by a multinomial logistic regression with
    sklearn's L2 objective on standardized features, written out in NumPy: the expected score."""
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    low = np.minimum(np.floor(scores).astype(int), 4)
    p = np.zeros((len(scores), 5))
    p[np.arange(len(scores)), low - 1] = low + 1 - scores
    p[np.arange(len(scores)), low] = scores - low
    d = z.shape[1]

    def loss(theta):
        w, b = theta[:5 * d].reshape(d, 5), theta[5 * d:]
        logits = z @ w + b
        top = logits.max(1, keepdims=True)
        logq = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
        g = C * (np.exp(logq) - p)
        return -C * np.sum(p * logq) + 0.5 * np.sum(w ** 2), np.concatenate([(z.T @ g + w).ravel(), g.sum(0)])

    theta = minimize(loss, np.zeros(5 * d + 5), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000}).x

    def predict(t):
        logits = (t - mu) / sd @ theta[:5 * d].reshape(d, 5) + theta[5 * d:]
        q = np.exp(logits - logits.max(1, keepdims=True))
        return (q / q.sum(1, keepdims=True)) @ np.arange(1, 6)

    return predict


def test_relatedness_model_and_metrics_match_an_independent_computation():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(300, 5))
    v = u + rng.normal(scale=rng.uniform(0.1, 2, size=(300, 1)), size=(300, 5))
    x = pair_features(u, v)
    s = np.clip(5 - 1.5 * np.abs(u - v).mean(1) + rng.normal(scale=0.2, size=300), 1, 5)
    ours = fit_relatedness(x[:200], s[:200], 0.25)(x[200:])
    np.testing.assert_allclose(ours, soft_target_regression(x[:200].astype(np.float64), s[:200], 0.25)(x[200:]),
                               atol=0.02)
    r = evaluate(fake_featurizer, "sick", splits=relatedness_splits())
    m, y = r.metrics, r.eval_labels
    pred = fit_relatedness(r.train_features, r.train_labels, m["C"])(r.eval_features)
    assert m["pearson"] == pytest.approx(pearsonr(pred, y)[0]) and m["spearman"] == pytest.approx(spearmanr(pred, y)[0])
    assert m["mse"] == pytest.approx(np.mean((pred - y) ** 2))


def relatedness_splits(n=200):
    rng = np.random.default_rng(1)
    k = rng.integers(0, 3, n)
    second = [f"b{i} " + " ".join(["good"] * int(3 * j)) for i, j in enumerate(k)]
    scores = np.clip(1.0 + 2.0 * k + rng.uniform(-0.3, 0.3, n), 1, 5)
    first = [f"a{i}" for i in range(n)]
    return {"train": PairSplit(first[:120], second[:120], scores[:120]),
            "dev": PairSplit(first[120:160], second[120:160], scores[120:160]),
            "test": PairSplit(first[160:], second[160:], scores[160:])}


def test_relatedness_refuses_what_it_cannot_fit_or_score():
    splits = relatedness_splits()
    with pytest.raises(InputError, match="train pair features contain NaN"):
        evaluate(lambda texts: np.full((len(texts), 4), np.nan), "sick", splits=splits)
    for name in ("train", "test"):
        one = PairSplit(splits[name].first, splits[name].second, np.full(len(splits[name]), 3.0))
        bad = dict(splits, **{name: one})
        with pytest.raises(InputError, match=f"the {name} split has one relatedness score only"):
            evaluate(fake_featurizer, "sick", splits=bad)
    x = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(InputError, match=r"in \[1, 5\], got 6.0 at index 2"):
        fit_relatedness(x, [1.0, 2.0, 6.0, 3.0, 4.0, 5.0], 1.0)
    with pytest.raises(InputError, match="all 3"):
        fit_relatedness(x, np.full(6, 3.0), 1.0)
    with pytest.raises(InputError, match="NaN"):
        fit_relatedness(np.full((6, 3), np.nan), np.arange(1.0, 7.0) % 5 + 1, 1.0)
