"""Bad input to the probe toolkit is refused at the call with an InputError naming the problem:
labels of classes the training data lacks, one-class dev splits, numbers that are not integers,
figure suffixes matplotlib cannot write, objects that are not a ByteLM, malformed evaluation
splits; and a float64 model featurizes."""

import numpy as np
import pytest
import torch

import fastmlstm
from fastmlstm.data.datasets import PairSplit, TextSplit
from fastmlstm.errors import InputError, InputTypeError
from fastmlstm.probe import (
    DataEfficiency,
    cell_trace,
    data_efficiency,
    evaluate,
    featurize,
    plot_data_efficiency,
    plot_unit_histogram,
    steer,
    text_html,
    text_png,
    train_probe,
    visualize_text,
)

H = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastmlstm.ByteLM(H, 8)


def planted(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, 1] += 2 * y - 1
    return x, y


def featurizer(texts):
    """Features with the label planted: texts ending in "+" are positive."""
    x = np.random.default_rng(len(texts)).normal(scale=0.3, size=(len(texts), 4)).astype(np.float32)
    x[:, 1] += [1.0 if t.endswith("+") else -1.0 for t in texts]
    return x


def text_split(n, labels=None):
    y = np.arange(n) % 2 if labels is None else np.asarray(labels)
    return TextSplit([f"text {i} {'+' if v else '-'}" for i, v in enumerate(y)], y.astype(np.int64))


# ------------------------------------------------------------------------------------------
# 1. dev and test labels are checked against the training classes


def test_dev_labels_of_an_unseen_class_or_of_one_class_are_refused():
    x, y = planted()
    with pytest.raises(InputError, match=r"dev labels hold classes \[7\] that the training labels do not have"):
        train_probe(x[:30], y[:30], x[30:], np.full(10, 7))
    with pytest.raises(InputError, match="dev labels hold one class only.*C cannot be chosen"):
        train_probe(x[:30], y[:30], x[30:], np.ones(10, dtype=int))
    with pytest.raises(InputError, match="do not have"):  # strings never match integer classes
        train_probe(x[:30], y[:30], x[30:], np.array(["neg", "pos"])[y[30:]])


def test_test_labels_of_an_unseen_class_are_refused():
    x, y = planted()
    with pytest.raises(InputError, match=r"test labels hold classes \[5, 6\]"):
        data_efficiency(x, y, x, y + 5, C=1.0, sizes=[10], draws=1)
    probe = train_probe(x, y, Cs=[1.0])
    with pytest.raises(InputError, match=r"classes \[2\]"):
        probe.score(x, np.where(y == 1, 2, 0))
    with pytest.raises(InputError, match="3 columns; the probe was trained on 4"):
        probe.predict(x[:, :3])
    assert probe.score(x[y == 1], y[y == 1]) > 0.5  # a test set of one training class is fine


def test_evaluate_refuses_one_class_dev_and_test_splits():
    train = text_split(20)
    with pytest.raises(InputError, match="sst2: the dev split holds one class only"):
        evaluate(featurizer, "sst2", splits={"train": train, "dev": text_split(6, np.ones(6))})
    with pytest.raises(InputError, match="sst2: the dev split holds one class only.*C cannot be chosen"):
        evaluate(featurizer, "sst2", splits={"train": train, "dev": text_split(6, np.ones(6)), "test": text_split(6)})
    with pytest.raises(InputError, match=r"sst2: the test labels hold classes \[2\]"):
        evaluate(featurizer, "sst2", splits={"train": train, "dev": text_split(6), "test": text_split(6, [2] * 6)})


# ------------------------------------------------------------------------------------------
# 2. integers are integers


@pytest.mark.parametrize("units", [[1.7], 1.7, True, [True], torch.tensor(True), torch.tensor([True]),
                                   np.array([True]), [np.True_], torch.tensor([1.0]), ["a"], "a", [[1, 2]],
                                   np.array([[1]]), object(), [np.float64(2.0)]])
def test_cell_trace_refuses_units_that_are_not_integers(model, units):
    with pytest.raises(InputTypeError, match=r"units must be unit indices, integers in \[0, 16\)"):
        cell_trace(model, "hi", units=units)


@pytest.mark.parametrize("units, index", [(torch.tensor(3), [3]), (np.int64(3), [3]), (torch.tensor([1, 2]), [1, 2]),
                                          (np.array([1, 2]), [1, 2]), ((5, 0), [5, 0])])
def test_cell_trace_takes_integer_tensors_and_numpy_integers(model, units, index):
    np.testing.assert_array_equal(cell_trace(model, "hi", units=units), cell_trace(model, "hi")[:, index])


def test_cell_trace_names_the_unit_out_of_range(model):
    with pytest.raises(InputError, match=r"\[0, 16\), got 16 \(units\[1\]\)"):
        cell_trace(model, "hi", units=[0, 16])


def test_data_efficiency_sizes_and_draws_must_be_integers():
    x, y = planted()
    for sizes in ([4.7], [True], "10", [None]):
        with pytest.raises(InputTypeError, match=r"sizes must be integers in \[2, 40\]"):
            data_efficiency(x, y, x, y, C=1.0, sizes=sizes)
    with pytest.raises(InputError, match="sizes is empty"):
        data_efficiency(x, y, x, y, C=1.0, sizes=[])
    with pytest.raises(InputTypeError, match="draws must be an integer >= 1, got 1.5"):
        data_efficiency(x, y, x, y, C=1.0, sizes=[10], draws=1.5)
    assert list(data_efficiency(x, y, x, y, C=1.0, sizes=np.int64(10), draws=1).sizes) == [10]


# ------------------------------------------------------------------------------------------
# 3. figures are written in the format their suffix names


def test_figures_take_the_format_of_their_suffix(tmp_path):
    y = np.arange(20) % 2
    v = np.linspace(-1, 1, 20)
    assert plot_unit_histogram(v, y, tmp_path / "h.svg", bins=4).read_bytes().lstrip().startswith(b"<?xml")
    assert plot_unit_histogram(v, y, tmp_path / "h.PDF", bins=4).read_bytes().startswith(b"%PDF")
    assert plot_unit_histogram(v, y, tmp_path / "h", bins=4).read_bytes().startswith(b"\x89PNG")
    curve = DataEfficiency(np.array([2, 20]), np.array([[0.6], [0.9]]), np.ones((2, 1)))
    assert plot_data_efficiency(curve, tmp_path / "de.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert text_png([("a", 0.5)], tmp_path / "t.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("name", ["h.html", "h.xyz"])
def test_a_suffix_matplotlib_cannot_write_is_refused(tmp_path, name):
    y = np.arange(20) % 2
    with pytest.raises(InputError, match=r"cannot write \.(html|xyz) figures.*\.png"):
        plot_unit_histogram(np.linspace(-1, 1, 20), y, tmp_path / name)
    curve = DataEfficiency(np.array([2, 20]), np.array([[0.6], [0.9]]), np.ones((2, 1)))
    with pytest.raises(InputError, match="cannot write"):
        plot_data_efficiency(curve, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_visualize_text_checks_the_picture_suffix_before_writing_anything(tmp_path, model):
    with pytest.raises(InputError, match="cannot write .html"):
        visualize_text(model, "hi", 0, html_path=tmp_path / "v.html", png_path=tmp_path / "v.html")
    assert not (tmp_path / "v.html").exists()


def test_unit_histogram_refuses_non_finite_values(tmp_path):
    values = np.array([0.1, np.nan, 0.3, 0.4])
    with pytest.raises(InputError, match="values must be finite numbers, got nan at index 1"):
        plot_unit_histogram(values, np.array([0, 1, 0, 1]), tmp_path / "h.png")
    with pytest.raises(InputTypeError, match="DataEfficiency"):
        plot_data_efficiency({"sizes": [1]}, tmp_path / "de.png")
    with pytest.raises(InputError, match="bins must be an integer >= 1, got 0"):
        plot_unit_histogram(np.linspace(-1, 1, 4), np.array([0, 1, 0, 1]), tmp_path / "h.png", bins=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda p: text_html([("a", 0.5), ("b", float("nan"))]), InputError, "not a finite number: nan at pair 1"),
    (lambda p: text_html([("a", "x")]), InputTypeError, "numeric values"),
    (lambda p: text_html([("a", 0.5)], scale=-1.0), InputError, "scale must be a finite number > 0"),
    (lambda p: text_png([("a", 0.5)], p / "t.png", width=0), InputError, "width must be an integer >= 1"),
])
def test_the_coloured_text_checks_its_values_scale_and_width(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------
# 4. the model must be a ByteLM; 5. a float64 model featurizes


@pytest.mark.parametrize("bad", ["m.pt", fastmlstm.FastMLSTM(4, 8), None])
def test_a_model_that_is_not_a_bytelm_is_refused(bad):
    for call in (lambda: featurize(bad, ["abc"]), lambda: cell_trace(bad, "abc"), lambda: steer(bad, 0)):
        with pytest.raises(InputTypeError, match=f"model must be a ByteLM, got {type(bad).__name__}"):
            call()
    if isinstance(bad, str):
        with pytest.raises(InputTypeError, match=r"from_pretrained\('m.pt'\)"):
            featurize(bad, ["abc"])
    else:
        with pytest.raises(InputTypeError, match="ByteLM or a callable"):
            evaluate(bad, "mr", splits={"all": text_split(10)})


def test_a_float64_model_featurizes(model):
    texts = ["abc", "a longer text", ""]
    double = fastmlstm.ByteLM(H, 8).double()
    double.load_state_dict(model.state_dict())
    feats = featurize(double, texts, chunk_size=4)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, featurize(model, texts), atol=1e-5)
    trace = cell_trace(double, "abc", units=[2])
    np.testing.assert_allclose(trace, cell_trace(model, "abc", units=[2]), atol=1e-5)


# ------------------------------------------------------------------------------------------
# 6. malformed evaluation splits


def test_evaluate_refuses_malformed_splits():
    good = text_split(20)
    with pytest.raises(InputError, match="no 'train' split"):
        evaluate(featurizer, "sst2", splits={"dev": good})
    with pytest.raises(InputError, match="unknown split 'valid'"):
        evaluate(featurizer, "sst2", splits={"train": good, "valid": good})
    with pytest.raises(InputError, match="the train split is empty"):
        evaluate(featurizer, "sst2", splits={"train": text_split(0), "dev": good})
    with pytest.raises(InputTypeError, match="split 'train' must be a PairSplit"):
        evaluate(featurizer, "msrp", splits={"train": good})
    with pytest.raises(InputTypeError, match="splits must be a dict"):
        evaluate(featurizer, "sst2", splits=[good])
    with pytest.raises(InputError, match="relatedness scores"):
        evaluate(featurizer, "sick", splits={"train": PairSplit(["a"] * 4, ["b"] * 4, [1.0, 2.0, 6.0, 3.0])})


def test_evaluate_blames_a_featurizer_that_returns_the_wrong_number_of_rows():
    splits = {"train": text_split(20), "dev": text_split(10)}
    with pytest.raises(InputError, match="the featurizer returned shape .* expected 18 rows, got 19"):
        evaluate(lambda texts: np.zeros((len(texts) + 1, 4)), "sst2", splits=splits)
    with pytest.raises(InputTypeError, match="featurizer returned str"):
        evaluate(lambda texts: "features", "sst2", splits=splits)


def test_evaluate_says_what_limit_and_the_holdouts_need():
    splits = {"train": text_split(20), "dev": text_split(10)}
    with pytest.raises(InputError, match="train split after limit=2 has 1 example.*at least 2 of each class; raise limit"):
        evaluate(featurizer, "sst2", splits=splits, limit=2)
    assert evaluate(featurizer, "sst2", splits=splits, limit=4).metrics["n_train"] == 2
    with pytest.raises(InputError, match="20% of train to evaluate on.*at least 3 of each class"):
        evaluate(featurizer, "imdb", splits={"train": text_split(4)})
    with pytest.raises(InputError, match="cross-validation.*at least 3 of each class"):
        evaluate(featurizer, "mr", splits={"all": text_split(4)})
    assert evaluate(featurizer, "mr", splits={"all": text_split(6)}).metrics["evaluated_on"] == "3-fold cross-validation"
    labels = np.array(["neg", "pos"])[np.arange(20) % 2]  # string labels are held out by class too
    m = evaluate(featurizer, "imdb", splits={"train": TextSplit(text_split(20).texts, labels)}).metrics
    assert m["n_eval"] == 4 and m["accuracy"] == 100


# ------------------------------------------------------------------------------------------
# 7. labels, Cs


@pytest.mark.parametrize("labels, match", [
    (np.arange(40) % 2 + 0.5, r"got np.float64\(0.5\) at index 0; map scores to classes"),
    (np.where(np.arange(40) % 2, 1.0, np.nan), r"got np.float64\(nan\) at index 0"),
    ([None] * 20 + [1] * 20, "got None at index 0"),
    (np.array(["a"] * 20 + [1] * 20, dtype=object), "mix strings and numbers"),
    (np.arange(40).astype(complex), "dtype complex128"),
])
def test_labels_must_be_class_labels(labels, match):
    x, _ = planted()
    with pytest.raises(InputTypeError, match="train labels must be class labels|" + match) as info:
        train_probe(x, labels, Cs=[1.0])
    assert info.match(match)


def test_whole_valued_float_and_bool_labels_are_class_labels():
    x, y = planted()
    assert train_probe(x, y.astype(float), Cs=[1.0]).score(x, y) > 0.8
    assert train_probe(x, y.astype(bool), Cs=[1.0]).score(x, y.astype(bool)) > 0.8


@pytest.mark.parametrize("Cs, match", [([float("inf")], r"Cs\[0\] must be a finite number > 0, got inf"),
                                       ([1.0, 0.0], r"Cs\[1\] must be a finite number > 0"),
                                       ([1.0, float("nan")], r"Cs\[1\]"),
                                       ("1", "Cs must be a number > 0 or a sequence"), ([True], r"Cs\[0\]"),
                                       (-1.0, "Cs must be a finite number > 0"), ([], "Cs is empty")])
def test_Cs_must_be_finite_positive_numbers(Cs, match):
    x, y = planted()
    with pytest.raises(InputError, match=match):
        train_probe(x, y, Cs=Cs)


def test_other_train_probe_arguments_are_checked():
    x, y = planted()
    with pytest.raises(InputError, match="penalty"):
        train_probe(x, y, penalty="l3")
    with pytest.raises(InputError, match="cv must be an integer >= 2"):
        train_probe(x, y, cv=1)
    with pytest.raises(InputError, match="C must be a finite number > 0"):
        data_efficiency(x, y, x, y, C=float("inf"), sizes=[10])
    with pytest.raises(InputError, match="seed must be an integer"):
        data_efficiency(x, y, x, y, C=1.0, sizes=[10], seed=-1)
    with pytest.raises(InputError, match="seed must be an integer"):
        train_probe(x, y, seed=1.5)


def test_a_curve_where_the_protocol_draws_none_is_refused():
    # the curve was skipped in silence (cross-validated and relatedness tasks have no train split to subsample)
    with pytest.raises(InputError, match="curve: mpqa is evaluated by cv10, which draws no data-efficiency curve"):
        evaluate(featurizer, "mpqa", splits={"all": text_split(40)}, curve=True)
    pairs = PairSplit(["a"] * 4, ["b"] * 4, [1.0, 2.0, 4.0, 3.0])
    with pytest.raises(InputError, match="curve: sick is evaluated by relatedness"):
        evaluate(featurizer, "sick", splits={"train": pairs, "dev": pairs, "test": pairs}, curve=True)


def test_constant_relatedness_predictions_give_nan_correlations_without_warnings(recwarn):
    pairs = PairSplit([f"a{i}" for i in range(12)], [f"b{i}" for i in range(12)], [1.0 + (i % 5) for i in range(12)])
    metrics = evaluate(lambda texts: np.zeros((len(texts), 4), np.float32), "sick",
                       splits={"train": pairs, "dev": pairs, "test": pairs}).metrics
    assert np.isnan(metrics["pearson"]) and np.isnan(metrics["spearman"]) and np.isfinite(metrics["mse"])
    assert not [w for w in recwarn if "constant" in str(w.message).lower()]  # scipy printed one per C



def test_a_model_with_non_finite_weights_is_blamed_not_featurized_into_nan():
    # featurize returned NaN features (and `fastmlstm featurize` wrote them, exit 0); cell_trace's
    # NaN reached the plots' internal check ("chars hold a value that is not a finite number")
    torch.manual_seed(0)
    broken = fastmlstm.ByteLM(H, 8)
    with torch.no_grad():
        broken.rnn.weight_hh_v[3, 2] = float("nan")
    with pytest.raises(InputError, match=r"the features are not finite numbers: the model's parameters hold NaN "
                                         r"or inf \(rnn.weight_hh_v\)"):
        featurize(broken, ["a fine review", "another"])
    with pytest.raises(InputError, match=r"the cell states are not finite numbers: .*\(rnn.weight_hh_v\)"):
        cell_trace(broken, "a fine review", units=[0, 1])
    with torch.no_grad():
        broken.rnn.weight_hh_v[3, 2] = 0.0
    assert np.isfinite(featurize(broken, ["a fine review"])).all()
