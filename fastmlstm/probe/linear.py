"""The linear probe: L1-regularized logistic regression on the features, the sentiment unit, and
the data-efficiency curve (paper, Sec. 4 and Fig. 2).

Dimension letters: N examples, F features (H, or 2H for pair features), S sizes, D draws.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ..errors import InputError

__all__ = [
    "C_GRID",
    "DataEfficiency",
    "LinearProbe",
    "check_features",
    "data_efficiency",
    "logistic_regression",
    "stratified_holdout",
    "train_probe",
    "unit_threshold",
]

C_GRID = tuple(float(c) for c in 2.0 ** np.arange(-8, 1))  # the released demo's sweep, 2^-8 .. 2^0

_PENALTY_DEPRECATED = inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"


def logistic_regression(C: float, *, penalty: str = "l1", seed: int = 0, max_iter: int = 1000) -> LogisticRegression:
    """An unfitted scikit-learn logistic regression with an L1 (or L2) penalty of strength 1/C.

    liblinear is used for L1, as in the paper's released demo. Works across scikit-learn versions
    (``penalty=`` was replaced by ``l1_ratio=`` in 1.8).
    """
    if penalty not in ("l1", "l2"):
        raise InputError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    if not C > 0:
        raise InputError(f"C must be > 0, got {C}")
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


def check_features(x, y=None, *, name: str = "features", binary: bool = True):
    """Validate a feature matrix [N, F] (finite floats) and, if given, labels [N] of two classes."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D array [N, F], got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{name} hold no examples (N = 0)")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} contain NaN or infinite values")
    if y is None:
        return x
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"labels must be a 1-D array of {x.shape[0]} entries (one per row of {name}), "
                         f"got shape {y.shape}")
    classes = np.unique(y)
    if binary and len(classes) != 2:
        if len(classes) < 2:
            raise InputError(f"the labels hold one class only ({classes.tolist()}); a probe needs examples "
                             "of both classes")
        raise InputError(f"the probe is binary, but the labels hold {len(classes)} classes: {classes.tolist()[:10]}")
    return x, y


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` of each class held out (at least one per class)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            raise InputError(f"class {c!r} has {len(idx)} example; holding some out needs at least 2 per class")
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(rng.choice(idx, size=k, replace=False))
    held = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(y)), held)
    return kept, held


def unit_threshold(values: np.ndarray, y: np.ndarray, sign: int, positive) -> tuple[float, float]:
    """The threshold t maximizing the accuracy of ``sign * (v - t) > 0 -> positive`` on (values, y),
    and that accuracy. Thresholds are midpoints between sorted distinct values (or beyond the ends)."""
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
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:
        t = v[0] - 1.0
    elif k == n:
        t = v[-1] + 1.0
    else:
        t = (v[k - 1] + v[k]) / 2
    return float(sign * t), float(correct[k] / n)


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

    def predict(self, x) -> np.ndarray:
        return self.classifier.predict(check_features(x))

    def score(self, x, y) -> float:
        """Accuracy of the full probe."""
        x, y = check_features(x, y, binary=False)
        return float(np.mean(self.classifier.predict(x) == y))

    def unit_predict(self, x) -> np.ndarray:
        """Labels from thresholding the sentiment unit alone."""
        x = check_features(x)
        if self.sentiment_unit is None:
            raise InputError("this probe has no sentiment unit: every weight is zero at the chosen C")
        above = self.unit_sign * (x[:, self.sentiment_unit] - self.unit_threshold) > 0
        return np.where(above, self.classes[1], self.classes[0])

    def unit_score(self, x, y) -> float:
        """Accuracy of the single-unit threshold classifier."""
        x, y = check_features(x, y, binary=False)
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
    best = max(scores.values())
    C = next(c for c in Cs if scores[c] == best)  # ties: the strongest regularization, as the released demo
    return C, selection, scores


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
            a single value skips the search.
        penalty: ``"l1"`` (the paper) or ``"l2"``.
        cv: folds for choosing C without dev data.
        seed: for the folds and the solver.

    Returns:
        A :class:`LinearProbe`, trained on the training data with the chosen C.

    Raises:
        ValueError: empty or non-finite features, labels of one class (or more than two), shape mismatch.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(200, 32)).astype(np.float32); y = (x[:, 7] > 0).astype(int)
        >>> probe = train_probe(x[:150], y[:150], x[150:], y[150:])
        >>> probe.sentiment_unit
        7
    """
    train_x, train_y = check_features(train_x, train_y, name="train features")
    if dev_x is not None or dev_y is not None:
        if dev_x is None or dev_y is None:
            raise InputError("give both dev_x and dev_y, or neither")
        dev_x, dev_y = check_features(dev_x, dev_y, name="dev features", binary=False)
        if dev_x.shape[1] != train_x.shape[1]:
            raise InputError(f"dev features have {dev_x.shape[1]} columns, train features {train_x.shape[1]}")
    Cs = [float(c) for c in (Cs if isinstance(Cs, (Sequence, np.ndarray)) else [Cs])]
    if not Cs:
        raise InputError("Cs is empty")
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
    train_x, train_y = check_features(train_x, train_y, name="train features")
    test_x, test_y = check_features(test_x, test_y, name="test features", binary=False)
    if C is None and dev_x is None:
        raise InputError("give dev data (dev_x, dev_y) to choose C for each draw, or a fixed C")
    N = len(train_y)
    sizes = default_sizes(N) if sizes is None else sorted({int(s) for s in sizes})
    n_classes = len(np.unique(train_y))
    if sizes[0] < n_classes or sizes[-1] > N:
        raise InputError(f"sizes must lie in [{n_classes}, {N}] (one example per class at least), got {sizes}")
    if draws < 1:
        raise InputError(f"draws must be >= 1, got {draws}")
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
