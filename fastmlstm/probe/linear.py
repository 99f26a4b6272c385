"""The linear probe: L1-regularized logistic regression on the features, the sentiment unit, and
the data-efficiency curve (paper, Sec. 4 and Fig. 2).

Dimension letters: N examples, F features (H, or 2H for pair features), S sizes, D draws.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ..errors import InputError, InputTypeError
from ..options import Number, check, check_each

__all__ = [
    "C_GRID",
    "DataEfficiency",
    "LinearProbe",
    "check_features",
    "check_known_classes",
    "check_labels",
    "data_efficiency",
    "logistic_regression",
    "stratified_holdout",
    "train_probe",
    "unit_threshold",
]

C_GRID = tuple(float(c) for c in 2.0 ** np.arange(-8, 1))  # the released demo's sweep, 2^-8 .. 2^0

_C = Number(float, 0, low_open=True)  # an inverse regularization strength
_CV = Number(int, 2)  # cross-validation folds

_PENALTY_DEPRECATED = inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"


def logistic_regression(C: float, *, penalty: str = "l1", seed: int = 0, max_iter: int = 1000) -> LogisticRegression:
    """An unfitted scikit-learn logistic regression with an L1 (or L2) penalty of strength 1/C.

    liblinear is used for L1, as in the paper's released demo. Works across scikit-learn versions
    (``penalty=`` was replaced by ``l1_ratio=`` in 1.8).
    """
    if penalty not in ("l1", "l2"):
        raise InputError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    C = _C.check(C, "C")
    kwargs = {"C": C, "random_state": seed, "max_iter": max_iter, "solver": "liblinear"}
    if _PENALTY_DEPRECATED:
        kwargs["l1_ratio"] = 1.0 if penalty == "l1" else 0.0
    else:
        kwargs["penalty"] = penalty
    return LogisticRegression(**kwargs)


def single_threaded_blas():
    """A context that runs BLAS on one thread.

    The probe's fits are small, many and mostly single-threaded (liblinear); with BLAS threads on
    a busy machine they run many times slower than on one thread, because the threads wait on
    each other (figures in docs/benchmarks.md).
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    return threadpool_limits(limits=1, user_api="blas")


def _fit(clf: LogisticRegression, x: np.ndarray, y: np.ndarray, **kwargs) -> LogisticRegression:
    with warnings.catch_warnings(), single_threaded_blas():
        # Weak regularization on separable data stops at max_iter; the fit is still usable and the
        # dev score decides whether that C is chosen.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y, **kwargs)


_LABEL_RULE = "class labels (integers, bools or strings)"


def _label_error(name: str, y: np.ndarray, bad: int) -> InputTypeError:
    value = y[bad]
    hint = ""
    if isinstance(value, float):
        hint = "; map scores to classes first" if np.isfinite(value) else "; drop the examples without a label"
    return InputTypeError(f"{name} must be {_LABEL_RULE}, got {value!r} at index {bad}{hint}")


def check_labels(y, n: int | None = None, *, name: str = "labels", rows: str = "features") -> np.ndarray:
    """Labels [n] as an array: integers, bools, strings, or whole-valued floats (``1.0``). A
    fractional, NaN or infinite float, None, or a mix of strings and numbers raises
    :class:`InputTypeError` naming the first bad entry; another length raises :class:`InputError`."""
    y = np.asarray(y)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        what = "a 1-D array" if n is None else f"a 1-D array of {n} entries (one per row of {rows})"
        raise InputError(f"{name} must be {what}, got shape {y.shape}")
    if y.dtype.kind in "iubUS":
        return y
    if y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise _label_error(name, y, int(bad[0]))
        return y
    if y.dtype.kind == "O":
        is_text = [isinstance(v, str) for v in y]
        is_int = [isinstance(v, numbers.Integral) for v in y]  # ints, bools, numpy integers
        for i, (t, k) in enumerate(zip(is_text, is_int)):
            if not (t or k):
                raise _label_error(name, y, i)
        if any(is_text) and any(is_int):
            raise InputTypeError(f"{name} mix strings and numbers ({y[is_text.index(True)]!r} at index "
                                 f"{is_text.index(True)}, {y[is_int.index(True)]!r} at index {is_int.index(True)}); "
                                 "use one kind of class label")
        return np.asarray(y.tolist()) if len(y) else y.astype(np.int64)
    raise InputTypeError(f"{name} must be {_LABEL_RULE}, got an array of dtype {y.dtype}")


def check_known_classes(y: np.ndarray, classes: np.ndarray, name: str) -> None:
    """Raise :class:`InputError` if labels ``y`` hold a class that is not among the training ``classes``."""
    present = np.unique(y)
    if (present.dtype.kind in "US") != (np.asarray(classes).dtype.kind in "US"):
        unseen = present  # strings never equal numbers
    else:
        unseen = present[~np.isin(present, classes)]
    if len(unseen):
        raise InputError(f"{name} hold classes {unseen.tolist()[:10]} that the training labels do not have "
                         f"(classes {np.asarray(classes).tolist()}); the probe predicts only the classes it was "
                         "trained on: use the same label coding in every split")


def check_features(x, y=None, *, name: str = "features", binary: bool = True, labels: str = "labels"):
    """Validate a feature matrix [N, F] (finite floats) and, if given, labels [N] (see
    :func:`check_labels`) of two classes (any number without ``binary``). ``labels`` names them."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D array [N, F], got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{name} hold no examples (N = 0)")
    if not np.issubdtype(x.dtype, np.floating):
        try:
            x = x.astype(np.float32)
        except (TypeError, ValueError):
            raise InputTypeError(f"{name} must be numbers, got an array of dtype {x.dtype}") from None
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} contain NaN or infinite values")
    if y is None:
        return x
    y = check_labels(y, x.shape[0], name=labels, rows=name)
    classes = np.unique(y)
    if binary and len(classes) != 2:
        if len(classes) < 2:
            raise InputError(f"the {labels} hold one class only ({classes.tolist()}); a probe needs examples "
                             "of both classes")
        raise InputError(f"the probe is binary, but the {labels} hold {len(classes)} classes: {classes.tolist()[:10]}")
    return x, y


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` of each class held out (at least one per class)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            raise InputError(f"class {np.asarray(c).tolist()!r} has {len(idx)} example; holding some out needs at least 2 per class")
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(rng.choice(idx, size=k, replace=False))
    held = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(y)), held)
    return kept, held


def unit_threshold(values: np.ndarray, y: np.ndarray, sign: int, positive) -> tuple[float, float]:
    """The threshold t maximizing the accuracy of ``sign * (v - t) > 0 -> positive`` on (values, y),
    and that accuracy. Thresholds are midpoints between sorted distinct values (or beyond the ends);
    among equally accurate ones, the (lower) median, so that the same data coded the other way
    round (the other class positive, the opposite sign) gives the same threshold."""
    v = sign * np.asarray(values, dtype=np.float64)
    is_pos = np.asarray(y) == positive
    order = np.argsort(v, kind="stable")
    v, is_pos = v[order], is_pos[order]
    n = len(v)
    # Predicting positive for v > t: with the first k sorted values below t, the correct ones are
    # the negatives among them plus the positives above.
    neg_below = np.concatenate([[0], np.cumsum(~is_pos)])
    pos_above = is_pos.sum() - np.concatenate([[0], np.cumsum(is_pos)])
    correct = neg_below + pos_above  # k = 0 .. n
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = v[1:] > v[:-1]  # a cut between equal values is not realizable
    cuts = np.concatenate([[v[0] - 1.0], (v[:-1] + v[1:]) / 2, [v[-1] + 1.0]])  # the threshold of cut k
    best = np.flatnonzero(valid & (correct == correct[valid].max()))
    tied = np.sort(sign * cuts[best])  # in the unit's own values, which do not depend on the coding
    return float(tied[(len(tied) - 1) // 2]), float(correct[best[0]] / n)


@dataclass
class LinearProbe:
    """A fitted probe. ``classifier`` is the scikit-learn model.

    Attributes:
        C: the chosen inverse regularization strength.
        selection: how C was chosen (``"dev"`` or ``"cv<k>"``).
        scores: dev (or mean cross-validation) accuracy of every C tried.
        features_used: number of nonzero weights.
        sentiment_unit: the feature with the largest absolute weight; None when the chosen C
            zeroes every weight (features that carry nothing the dev split rewards).
        unit_sign: +1 if larger values of that unit mean the positive class (``classes[1]``), else -1.
        unit_threshold, unit_train_accuracy: the single-unit classifier fitted on the training data
            (None without a sentiment unit).
    """

    classifier: LogisticRegression
    C: float
    selection: str
    scores: dict[float, float]
    features_used: int
    sentiment_unit: int | None
    unit_sign: int | None
    unit_threshold: float | None
    unit_train_accuracy: float | None
    classes: np.ndarray = field(repr=False)

    @property
    def weights(self) -> np.ndarray:
        """[F] weights of the positive class."""
        return self.classifier.coef_[0]

    def _features(self, x) -> np.ndarray:
        x = check_features(x)
        if x.shape[1] != len(self.weights):
            raise InputError(f"features have {x.shape[1]} columns; the probe was trained on {len(self.weights)}")
        return x

    def predict(self, x) -> np.ndarray:
        return self.classifier.predict(self._features(x))

    def _check(self, x, y):
        x, y = check_features(x, y, binary=False)
        check_known_classes(y, self.classes, "the labels")
        return self._features(x), y

    def score(self, x, y) -> float:
        """Accuracy of the full probe; ``y`` must hold only the classes it was trained on."""
        x, y = self._check(x, y)
        return float(np.mean(self.classifier.predict(x) == y))

    def unit_predict(self, x) -> np.ndarray:
        """Labels from thresholding the sentiment unit alone."""
        x = self._features(x)
        if self.sentiment_unit is None:
            raise InputError("this probe has no sentiment unit: every weight is zero at the chosen C")
        # in float64, as the threshold was chosen: a float32 difference rounds a threshold between two
        # adjacent float32 values onto one of them, and that value lands on the wrong side
        values = x[:, self.sentiment_unit].astype(np.float64)
        above = self.unit_sign * (values - self.unit_threshold) > 0
        return np.where(above, self.classes[1], self.classes[0])

    def unit_score(self, x, y) -> float:
        """Accuracy of the single-unit threshold classifier."""
        x, y = self._check(x, y)
        return float(np.mean(self.unit_predict(x) == y))

    def summary(self) -> dict:
        return {"C": self.C, "selection": self.selection, "features_used": self.features_used,
                "sentiment_unit": self.sentiment_unit, "unit_sign": self.unit_sign,
                "unit_threshold": self.unit_threshold}


def _select_C(train_x, train_y, dev_x, dev_y, Cs, penalty, cv, seed) -> tuple[float, str, dict[float, float]]:
    scores: dict[float, float] = {}
    if dev_x is not None:
        for i, C in enumerate(Cs):
            clf = _fit(logistic_regression(C, penalty=penalty, seed=seed + i), train_x, train_y)
            scores[C] = float(np.mean(clf.predict(dev_x) == dev_y))
        selection = "dev"
    else:
        smallest = int(np.min(np.unique(train_y, return_counts=True)[1]))
        k = min(cv, smallest)
        if k < 2:
            raise InputError("choosing C by cross-validation needs at least 2 examples of each class; "
                             "give dev data or a single C")
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(train_x, train_y))
        for i, C in enumerate(Cs):
            accs = []
            for fit_idx, val_idx in folds:
                clf = _fit(logistic_regression(C, penalty=penalty, seed=seed + i), train_x[fit_idx], train_y[fit_idx])
                accs.append(np.mean(clf.predict(train_x[val_idx]) == train_y[val_idx]))
            scores[C] = float(np.mean(accs))
        selection = f"cv{k}"
    return _best_C(scores), selection, scores


def _best_C(scores: dict[float, float]) -> float:
    """The C of the best score; of tied ones the smallest (the strongest regularization), whatever
    the order of the grid: the released demo's ``argmax`` over its ascending grid. Scores within
    1e-9 tie: a mean of fold accuracies sums the same numbers in another order to another float."""
    best = max(scores.values())
    return min(c for c, s in scores.items() if s >= best - 1e-9)


def _check_Cs(Cs) -> list[float]:
    """``Cs`` (one number or a sequence of them) as a list of finite floats > 0."""
    if isinstance(Cs, (str, bytes)) or Cs is None:
        raise InputTypeError(f"Cs must be a number > 0 or a sequence of them, got {Cs!r}")
    if isinstance(Cs, np.ndarray) and Cs.ndim == 0:
        Cs = Cs.item()
    if not isinstance(Cs, (Sequence, np.ndarray)):
        return [_C.check(Cs, "Cs")]
    if not len(Cs):
        raise InputError("Cs is empty")
    return [_C.check(c, f"Cs[{i}]") for i, c in enumerate(Cs)]


def _check_dev(train_x, train_y, dev_x, dev_y):
    """The dev split checked against the training data: (dev_x, dev_y), or (None, None)."""
    if dev_x is None and dev_y is None:
        return None, None
    if dev_x is None or dev_y is None:
        raise InputError("give both dev_x and dev_y, or neither")
    dev_x, dev_y = check_features(dev_x, dev_y, name="dev features", binary=False, labels="dev labels")
    if dev_x.shape[1] != train_x.shape[1]:
        raise InputError(f"dev features have {dev_x.shape[1]} columns, train features {train_x.shape[1]}")
    check_known_classes(dev_y, np.unique(train_y), "dev labels")
    if len(np.unique(dev_y)) < 2:
        raise InputError(f"the dev labels hold one class only ({np.unique(dev_y).tolist()}): every C would "
                         "score by how often it predicts that class, so C cannot be chosen on them; give dev "
                         "data of both classes, or none (C by cross-validation)")
    return dev_x, dev_y


def train_probe(
    train_x,
    train_y,
    dev_x=None,
    dev_y=None,
    *,
    Cs: Sequence[float] = C_GRID,
    penalty: str = "l1",
    cv: int = 5,
    seed: int = 0,
) -> LinearProbe:
    """Fit the paper's linear probe and find the sentiment unit.

    Args:
        train_x: [N, F] features; train_y: [N] labels of two classes.
        dev_x, dev_y: optional dev split to choose C on (else ``cv``-fold stratified
            cross-validation on the training data).
        Cs: inverse regularization strengths to try (default 2^-8 .. 2^0, the released demo's);
            a single value skips the search. Of equally good ones the smallest is chosen.
        penalty: ``"l1"`` (the paper) or ``"l2"``.
        cv: folds for choosing C without dev data.
        seed: for the folds and the solver.

    Returns:
        A :class:`LinearProbe`, trained on the training data with the chosen C.

    Raises:
        InputError (a ValueError): empty or non-finite features, labels that are not class labels
            (fractional floats, NaN, None), labels of one class (or more than two), shape mismatch,
            dev labels of a class the training labels lack or of one class only (the dev accuracy
            of every C would then say nothing), a C that is not a finite number > 0.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(200, 32)).astype(np.float32); y = (x[:, 7] > 0).astype(int)
        >>> probe = train_probe(x[:150], y[:150], x[150:], y[150:])
        >>> probe.sentiment_unit
        7
    """
    train_x, train_y = check_features(train_x, train_y, name="train features", labels="train labels")
    if penalty not in ("l1", "l2"):
        raise InputError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    cv, seed = _CV.check(cv, "cv"), check("seed", seed)
    dev_x, dev_y = _check_dev(train_x, train_y, dev_x, dev_y)
    Cs = _check_Cs(Cs)
    if len(Cs) == 1:
        C, selection, scores = Cs[0], "fixed", {}
    else:
        C, selection, scores = _select_C(train_x, train_y, dev_x, dev_y, Cs, penalty, cv, seed)
    clf = _fit(logistic_regression(C, penalty=penalty, seed=seed + len(Cs)), train_x, train_y)
    w = clf.coef_[0]
    if np.any(w != 0):
        unit = int(np.argmax(np.abs(w)))
        sign = 1 if w[unit] > 0 else -1
        threshold, unit_acc = unit_threshold(train_x[:, unit], train_y, sign, clf.classes_[1])
    else:
        unit = sign = threshold = unit_acc = None
    return LinearProbe(clf, C, selection, scores, int(np.count_nonzero(w)), unit, sign, threshold, unit_acc,
                       clf.classes_)


@dataclass
class DataEfficiency:
    """Accuracy against the number of labelled training examples (paper, Fig. 2).

    ``sizes`` [S]; ``accuracies`` [S, D] (NaN where a size had fewer draws); ``median``, ``p10``,
    ``p90`` [S] over the draws; ``C`` [S, D] the chosen C of each draw.
    """

    sizes: np.ndarray
    accuracies: np.ndarray
    C: np.ndarray

    @property
    def median(self) -> np.ndarray:
        return np.nanmedian(self.accuracies, axis=1)

    @property
    def p10(self) -> np.ndarray:
        return np.nanpercentile(self.accuracies, 10, axis=1)

    @property
    def p90(self) -> np.ndarray:
        return np.nanpercentile(self.accuracies, 90, axis=1)

    def to_dict(self) -> dict:
        return {"sizes": self.sizes.tolist(), "median": self.median.tolist(), "p10": self.p10.tolist(),
                "p90": self.p90.tolist(), "draws": int(np.sum(~np.isnan(self.accuracies[0])))}


def default_sizes(n: int) -> list[int]:
    """10, 20, 50, 100, 200, 500, ... below n, then n."""
    sizes, base = [], 10
    while base < n:
        sizes += [s for s in (base, 2 * base, 5 * base) if s < n]
        base *= 10
    return sorted(set(sizes)) + [n]


def _check_sizes(sizes, low: int, N: int) -> list[int]:
    """``sizes`` (None: :func:`default_sizes`) as sorted distinct integers in [low, N]."""
    if sizes is None:
        return default_sizes(N)
    rule = f"integers in [{low}, {N}] (at least one example per class, at most every training example)"
    if isinstance(sizes, (str, bytes)):
        raise InputTypeError(f"sizes must be {rule}, got {sizes!r}")
    if isinstance(sizes, numbers.Integral) or (isinstance(sizes, np.ndarray) and sizes.ndim == 0):
        sizes = [sizes]
    try:
        sizes = list(sizes)
    except TypeError:
        raise InputTypeError(f"sizes must be {rule}, got {sizes!r}") from None
    if not sizes:
        raise InputError(f"sizes is empty; give the numbers of labelled examples to try, {rule}, or None "
                         "for 10, 20, 50, ..., N")
    return sorted(set(check_each(sizes, Number(int, low, N), f"sizes must be {rule}")))


def _draw(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices at random without replacement, at least one of each class."""
    classes = np.unique(y)
    first = np.array([rng.choice(np.flatnonzero(y == c)) for c in classes])
    rest = np.setdiff1d(np.arange(len(y)), first)
    return np.concatenate([first, rng.choice(rest, size=size - len(first), replace=False)])


def data_efficiency(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    dev_x=None,
    dev_y=None,
    C: float | None = None,
    sizes: Sequence[int] | None = None,
    draws: int = 10,
    Cs: Sequence[float] = C_GRID,
    penalty: str = "l1",
    seed: int = 0,
) -> DataEfficiency:
    """Test accuracy of the L1 probe trained on random subsets of the training data.

    Args:
        train_x, train_y: the pool to draw labelled examples from ([N, F], [N]).
        test_x, test_y: where accuracy is measured.
        dev_x, dev_y: dev split to choose C on for every draw; or give a fixed ``C``.
        sizes: numbers of labelled examples (default 10, 20, 50, ..., N).
        draws: random draws per size (one at size N, where every draw is the same set).
        Cs, penalty, seed: as for :func:`train_probe`.

    Returns:
        :class:`DataEfficiency` with the median and 10th/90th percentiles per size.
    """
    train_x, train_y = check_features(train_x, train_y, name="train features", labels="train labels")
    test_x, test_y = check_features(test_x, test_y, name="test features", binary=False, labels="test labels")
    if test_x.shape[1] != train_x.shape[1]:
        raise InputError(f"test features have {test_x.shape[1]} columns, train features {train_x.shape[1]}")
    check_known_classes(test_y, np.unique(train_y), "test labels")
    if C is None and dev_x is None:
        raise InputError("give dev data (dev_x, dev_y) to choose C for each draw, or a fixed C")
    C = _C.check(C, "C") if C is not None else None
    dev_x, dev_y = _check_dev(train_x, train_y, dev_x, dev_y)
    N = len(train_y)
    sizes = _check_sizes(sizes, len(np.unique(train_y)), N)
    draws, seed = check("draws", draws), check("seed", seed)
    rng = np.random.default_rng(seed)
    acc = np.full((len(sizes), draws), np.nan)
    chosen = np.full((len(sizes), draws), np.nan)
    grid = [C] if C is not None else Cs
    for i, size in enumerate(sizes):
        for d in range(draws if size < N else 1):
            idx = _draw(train_y, size, rng)
            probe = train_probe(train_x[idx], train_y[idx], dev_x, dev_y, Cs=grid, penalty=penalty, seed=seed)
            acc[i, d] = probe.score(test_x, test_y)
            chosen[i, d] = probe.C
    return DataEfficiency(np.asarray(sizes), acc, chosen)
