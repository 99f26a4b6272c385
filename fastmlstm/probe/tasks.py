"""The paper's evaluations, one protocol per task.

============ ================================================================================
protocol     tasks and what is measured
============ ================================================================================
splits       sst2, imdb, yelp: train on train, choose C on dev, accuracy on test
cv10         mr, cr, subj, mpqa (and the Blitzer multidomain set): 10-fold stratified
             cross-validation; in each fold C is chosen on a 10% holdout of the training folds
pair         msrp: pair features [|u - v|, u * v] of the two sentences' features u, v;
             accuracy and F1 (paraphrase = positive)
relatedness  sick: the same pair features; a multinomial logistic regression on the score's
             two nearest integers as soft targets (Tai et al. 2015), prediction = expected score;
             Pearson r, Spearman rho, MSE
============ ================================================================================

Splits that are not distributed are replaced honestly, and the result says so
(``evaluated_on``, ``c_selection``): without a test split the dev split becomes the evaluation
split and C is chosen on a stratified 10% holdout of train; without either, 20% of train is held
out for evaluation. The paper's numbers are in :data:`PAPER` for comparison.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import datasets
from ..data.datasets import PairSplit, TextSplit
from ..errors import InputError, InputTypeError
from ..models.lm import ByteLM
from ..options import check
from .features import featurize
from .linear import (
    C_GRID,
    DataEfficiency,
    LinearProbe,
    _best_C,
    _fit,
    check_features,
    check_known_classes,
    check_labels,
    data_efficiency,
    stratified_holdout,
    train_probe,
)

__all__ = ["PAPER", "TASKS", "TaskResult", "evaluate", "fit_relatedness", "pair_features"]

TASKS = ("sst2", "imdb", "yelp", "mr", "cr", "subj", "mpqa", "msrp", "sick", "multidomain")

# The paper's results (MODEL.md), percent accuracy.
PAPER = {
    "sst2": {"accuracy": 91.8},
    "mr": {"accuracy": 86.9},
    "cr": {"accuracy": 91.4},
    "subj": {"accuracy": 94.6},
    "mpqa": {"accuracy": 88.5},
    "imdb": {"accuracy": 92.88, "unit_accuracy": 92.30},
    "yelp": {"accuracy": 95.22},
}

C_RELATEDNESS = tuple(float(c) for c in 2.0 ** np.arange(-10, 1, 2))  # on standardized pair features


@dataclass
class TaskResult:
    """``metrics``: the JSON-able results. The rest is kept for pictures: the probe trained on the
    training split, and the features/labels of the training and evaluation splits."""

    metrics: dict
    probe: LinearProbe | None = None
    train_features: np.ndarray | None = field(default=None, repr=False)
    train_labels: np.ndarray | None = field(default=None, repr=False)
    eval_features: np.ndarray | None = field(default=None, repr=False)
    eval_labels: np.ndarray | None = field(default=None, repr=False)
    curve: DataEfficiency | None = None


def _featurizer(model, batch_size, progress):
    if isinstance(model, ByteLM):
        return lambda texts: featurize(model, texts, batch_size=batch_size, progress=progress)
    if callable(model) and not isinstance(model, torch.nn.Module):
        return _checked(model)
    raise InputTypeError(f"model must be a ByteLM or a callable texts -> features [N, F], got {type(model).__name__}")


def _checked(featurize_fn):
    """``featurize_fn`` with its answer checked: a numeric [N, F] array, one row per text."""
    def run(texts):
        out = featurize_fn(texts)
        try:
            x = np.asarray(out, dtype=np.float32)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"the featurizer returned {type(out).__name__}, not a numeric array [N, F]") from None
        if x.ndim != 2 or x.shape[0] != len(texts):
            raise InputError(f"the featurizer returned shape {x.shape} for {len(texts)} texts; it must return "
                             f"[N, F], one row per text: expected {len(texts)} rows, got "
                             f"{x.shape[0] if x.ndim else 'a scalar'}")
        return x

    return run


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[N, 2F] = [|u - v|, u * v] of two [N, F] feature matrices (the skip-thought pair features)."""
    return np.concatenate([np.abs(u - v), u * v], axis=1).astype(np.float32, copy=False)


def _pair_featurize(featurize_fn, split: PairSplit) -> np.ndarray:
    unique = list(dict.fromkeys(split.first + split.second))  # SICK repeats sentences a lot
    feats = np.asarray(featurize_fn(unique), dtype=np.float32)
    row = {t: i for i, t in enumerate(unique)}
    u = feats[[row[t] for t in split.first]]
    v = feats[[row[t] for t in split.second]]
    return pair_features(u, v)


def _limit(split, limit: int | None, seed: int, stratify: bool):
    """``split`` cut to ``limit`` examples at random; with ``stratify``, each class in proportion
    (largest remainders) and at least one of each: exactly ``limit`` of them."""
    if limit is None or len(split) <= limit:
        return split
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(split.labels, return_counts=True)
    if not stratify or len(classes) > limit:
        return split.subset(np.sort(rng.choice(len(split), size=limit, replace=False)))
    share = counts * limit / len(split)
    take = np.floor(share).astype(int)
    take[np.argsort(take - share, kind="stable")[:limit - take.sum()]] += 1  # the largest remainders
    for c in np.flatnonzero(take == 0):  # a class too small for a share of its own: one example, from the largest
        take[np.argmax(take)] -= 1
        take[c] = 1
    index = [rng.choice(np.flatnonzero(split.labels == c), size=k, replace=False) for c, k in zip(classes, take)]
    return split.subset(np.sort(np.concatenate(index)))


def _holdout(split, fraction: float, seed: int, stratify: bool):
    labels = split.labels
    if stratify:
        kept, held = stratified_holdout(labels, fraction, seed)
    else:
        perm = np.random.default_rng(seed).permutation(len(split))
        k = max(1, round(fraction * len(split)))
        held, kept = np.sort(perm[:k]), np.sort(perm[k:])
    return split.subset(kept), split.subset(held)


def _check_splits(task: str, splits) -> dict:
    """``splits`` as a dict after checking its names, each split's kind (text or pair) and that none is empty."""
    info = datasets.DATASETS[task]
    if not isinstance(splits, Mapping):
        raise InputTypeError(f"splits must be a dict {{name: split}} like datasets.load({task!r}) returns, "
                             f"got {type(splits).__name__}")
    names = ("all",) if info.protocol == "cv10" else ("train", "dev", "test")
    for name in splits:
        if name not in names:
            raise InputError(f"{task}: unknown split {name!r}; its splits are {', '.join(names)}")
    if names[0] not in splits:
        raise InputError(f"{task}: splits has no {names[0]!r} split (got {', '.join(map(repr, splits)) or 'none'})"
                         + ("" if names[0] == "all" else "; the probe is trained on it, dev and test are optional"))
    kind = TextSplit if info.kind == "text" else PairSplit
    for name, split in splits.items():
        if not isinstance(split, kind):
            raise InputTypeError(f"{task}: split {name!r} must be a {kind.__name__}, got {type(split).__name__}")
        if len(split) == 0:
            raise InputError(f"{task}: the {name} split is empty")
    return dict(splits)


def _check_classes(task: str, splits: dict, limit: int | None) -> dict:
    """The (limited) splits with their labels checked: class labels; two classes in the training
    split, as many examples of each as the protocol's holdouts need; dev and test labels of those
    classes, both present. Relatedness scores: numbers in [1, 5]."""
    after = "" if limit is None else f" after limit={limit}"
    protocol = datasets.DATASETS[task].protocol
    if protocol == "relatedness":
        for name, split in splits.items():
            y = split.labels
            if y.dtype.kind not in "iuf" or not np.all((y >= 1) & (y <= 5)):
                raise InputError(f"{task}: the {name} labels must be relatedness scores, numbers in [1, 5]")
            if np.all(y == y[0]):
                raise InputError(f"{task}: the {name} split{after} has one relatedness score only ({y[0]:g}): "
                                 "a model cannot learn from it, and Pearson r and Spearman rho on it are "
                                 "undefined; give scores that vary")
        return splits
    splits = {name: dataclasses.replace(split, labels=check_labels(split.labels, name=f"{task}: the {name} labels"))
              for name, split in splits.items()}
    first = "all" if protocol == "cv10" else "train"
    classes, counts = np.unique(splits[first].labels, return_counts=True)
    if len(classes) != 2:
        held = "one class only" if len(classes) < 2 else f"{len(classes)} classes"
        raise InputError(f"{task}: the {first} split{after} holds {held} ({classes.tolist()[:10]}); the probe is "
                         "binary: it needs examples of two classes")
    missing = [name for name in ("dev", "test") if name not in splits]
    need, why = {0: (1, ""), 1: (2, "holding out 10% of train to choose C on"),
                 2: (3, "holding out 20% of train to evaluate on and 10% to choose C on")}[len(missing)]
    if protocol == "cv10":
        need, why = 3, "10-fold cross-validation with a holdout to choose C in each fold"
    if counts.min() < need:
        raise InputError(f"{task}: the {first} split{after} has {counts.min()} example(s) of class "
                         f"{classes.tolist()[int(np.argmin(counts))]!r}; {why} needs at least {need} of each class"
                         + ("; raise limit" if limit is not None else ""))
    for name in ("dev", "test"):
        if name in splits:
            y = splits[name].labels
            check_known_classes(y, classes, f"{task}: the {name} labels")
            if len(np.unique(y)) < 2:
                use = ("C cannot be chosen on it" if name == "dev" and "test" in splits
                       else "accuracy on it cannot tell the probe from one that always answers that class")
                raise InputError(f"{task}: the {name} split{after} holds one class only ({np.unique(y).tolist()}); "
                                 f"{use}: give examples of both classes")
    return splits


def _plan(splits: dict, seed: int, stratify: bool = True):
    """(train, selection split, evaluation split, notes) from whatever splits are present; holdouts
    keep the class proportions with ``stratify`` (classification)."""
    train, dev, test = splits["train"], splits.get("dev"), splits.get("test")
    notes = {}
    if test is not None:
        evaluation, notes["evaluated_on"] = test, "test"
    elif dev is not None:
        evaluation, dev, notes["evaluated_on"] = dev, None, "dev (no test split here)"
    else:
        train, evaluation = _holdout(train, 0.2, seed, stratify)
        notes["evaluated_on"] = "20% of train held out (no dev or test split here)"
    if dev is not None:
        notes["c_selection"] = "dev"
    else:
        train, dev = _holdout(train, 0.1, seed + 1, stratify)
        notes["c_selection"] = "10% of train held out"
    return train, dev, evaluation, notes


def _classification(featurize_fn, task, splits, *, Cs, seed, curve, curve_draws, curve_sizes) -> TaskResult:
    train, dev, evaluation, notes = _plan(splits, seed)
    if isinstance(train, PairSplit):
        fx = lambda s: _pair_featurize(featurize_fn, s)
    else:
        fx = lambda s: np.asarray(featurize_fn(s.texts), dtype=np.float32)
    tx, dx, ex = fx(train), fx(dev), fx(evaluation)
    probe = train_probe(tx, train.labels, dx, dev.labels, Cs=Cs, seed=seed)
    metrics = {"accuracy": 100 * probe.score(ex, evaluation.labels), "C": probe.C,
               "features_used": probe.features_used}
    if isinstance(train, PairSplit):
        from sklearn.metrics import f1_score

        metrics["f1"] = 100 * float(f1_score(evaluation.labels, probe.predict(ex), pos_label=probe.classes[1]))
    else:
        metrics.update({"sentiment_unit": probe.sentiment_unit, "unit_sign": probe.unit_sign,
                        "unit_threshold": probe.unit_threshold,
                        "unit_accuracy": None if probe.sentiment_unit is None
                        else 100 * probe.unit_score(ex, evaluation.labels)})
    metrics.update(notes)
    metrics.update({"n_train": len(train), "n_dev": len(dev), "n_eval": len(evaluation)})
    de = None
    if curve:
        de = data_efficiency(tx, train.labels, ex, evaluation.labels, dev_x=dx, dev_y=dev.labels,
                             sizes=curve_sizes, draws=curve_draws, Cs=Cs, seed=seed)
        metrics["data_efficiency"] = {k: (np.round(np.asarray(v) * 100, 3).tolist() if k in ("median", "p10", "p90")
                                          else v) for k, v in de.to_dict().items()}
    return TaskResult(metrics, probe, tx, train.labels, ex, evaluation.labels, de)


def _cross_validation(featurize_fn, task, split: TextSplit, *, Cs, seed, folds: int = 10) -> TaskResult:
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(featurize_fn(split.texts), dtype=np.float32)
    y = split.labels
    check_features(x, y)
    k = min(folds, int(np.min(np.unique(y, return_counts=True)[1])))
    if k < 2:
        raise InputError(f"{task}: 10-fold cross-validation needs at least 2 examples of each class")
    accs, unit_accs, chosen, used, units = [], [], [], [], []
    for f, (fit_idx, test_idx) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y)):
        kept, held = stratified_holdout(y[fit_idx], 0.1, seed + f)
        probe = train_probe(x[fit_idx][kept], y[fit_idx][kept], x[fit_idx][held], y[fit_idx][held], Cs=Cs, seed=seed)
        # refit on all training folds with the chosen C
        probe = train_probe(x[fit_idx], y[fit_idx], Cs=[probe.C], seed=seed)
        accs.append(probe.score(x[test_idx], y[test_idx]))
        if probe.sentiment_unit is not None:
            unit_accs.append(probe.unit_score(x[test_idx], y[test_idx]))
        chosen.append(probe.C)
        used.append(probe.features_used)
        units.append(probe.sentiment_unit)
    C = Counter(chosen).most_common(1)[0][0]
    full = train_probe(x, y, Cs=[C], seed=seed)  # for the pictures and the reported unit
    metrics = {
        "accuracy": 100 * float(np.mean(accs)), "accuracy_std": 100 * float(np.std(accs)),
        "C": C, "features_used": float(np.mean(used)),
        "sentiment_unit": full.sentiment_unit, "unit_sign": full.unit_sign, "unit_threshold": full.unit_threshold,
        "unit_accuracy": 100 * float(np.mean(unit_accs)) if unit_accs else None,
        "unit_folds": len(unit_accs),
        "fold_units": units, "evaluated_on": f"{k}-fold cross-validation",
        "c_selection": "10% holdout of the training folds, per fold", "n_train": len(y),
    }
    return TaskResult(metrics, full, x, y, x, y)


def _check_scores(scores, n: int) -> np.ndarray:
    """``scores`` as [n] float64 relatedness scores in [1, 5], not all equal."""
    scores = np.asarray(scores)
    if scores.shape != (n,):
        raise InputError(f"scores must be {n} relatedness scores, one per row of x; got shape {scores.shape}")
    if scores.dtype.kind not in "iuf":
        raise InputTypeError(f"scores must be numbers (relatedness scores in [1, 5]), got dtype {scores.dtype}")
    outside = np.flatnonzero(~((scores >= 1) & (scores <= 5)))
    if len(outside):
        raise InputError(f"scores must be relatedness scores in [1, 5], got {scores[outside[0]].item()!r} at index "
                         f"{outside[0]}")
    if np.all(scores == scores[0]):
        raise InputError(f"the scores are all {scores[0]:g}: the model cannot learn from one score")
    return scores.astype(np.float64)


def fit_relatedness(x: np.ndarray, scores: np.ndarray, C: float, seed: int = 0):
    """Fit the SICK relatedness model; returns ``predict(x) -> expected score``.

    A score s in [1, 5] becomes the distribution with mass ``floor(s) + 1 - s`` on ``floor(s)`` and
    ``s - floor(s)`` on ``floor(s) + 1``; a multinomial logistic regression is fit to those soft
    targets through sample weights (cross-entropy with soft targets equals weighted cross-entropy
    over both classes), and predicts the expected score.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = check_features(x, name="relatedness features")
    scores = _check_scores(scores, len(x))
    # |u - v| and u * v differ in scale by orders of magnitude; standardizing them keeps L-BFGS
    # from crawling at weak regularization.
    scaler = StandardScaler().fit(x)
    x = scaler.transform(x)
    low = np.clip(np.floor(scores), 1, 4).astype(int)
    w_high = scores - low
    rows = np.concatenate([np.arange(len(scores)), np.arange(len(scores))])
    targets = np.concatenate([low, low + 1])
    weights = np.concatenate([1 - w_high, w_high])
    keep = weights > 0
    clf = _fit(LogisticRegression(C=C, max_iter=1000, random_state=seed), x[rows[keep]], targets[keep],
               sample_weight=weights[keep])  # convergence warnings muted: the dev split judges each C
    classes = clf.classes_.astype(np.float64)
    return lambda z: clf.predict_proba(scaler.transform(z)) @ classes


def _correlation(kind: str, a, b) -> float:
    """Pearson's or Spearman's r of ``a`` and ``b``: NaN where one is constant (undefined), without
    scipy's warning about it."""
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", getattr(stats, "ConstantInputWarning", RuntimeWarning))
        return float((stats.pearsonr if kind == "pearson" else stats.spearmanr)(a, b)[0])


def _relatedness(featurize_fn, task, splits, *, seed) -> TaskResult:
    train, dev, evaluation, notes = _plan(splits, seed, stratify=False)
    tx, dx, ex = (check_features(_pair_featurize(featurize_fn, s), name=f"{name} pair features")
                  for s, name in ((train, "train"), (dev, "dev"), (evaluation, "evaluation")))
    scores = {}
    for C in C_RELATEDNESS:
        r = _correlation("pearson", fit_relatedness(tx, train.labels, C, seed)(dx), dev.labels)
        scores[C] = -np.inf if np.isnan(r) else float(r)  # NaN: constant predictions
    C = _best_C(scores)
    pred = fit_relatedness(tx, train.labels, C, seed)(ex)
    y = evaluation.labels
    metrics = {"pearson": _correlation("pearson", pred, y), "spearman": _correlation("spearman", pred, y),
               "mse": float(np.mean((pred - y) ** 2)), "C": C, **notes,
               "n_train": len(train), "n_dev": len(dev), "n_eval": len(evaluation)}
    return TaskResult(metrics, None, tx, train.labels, ex, y)


def evaluate(
    model,
    task: str,
    *,
    root=None,
    splits: dict | None = None,
    limit: int | None = None,
    Cs=C_GRID,
    seed: int = 0,
    curve: bool = False,
    curve_draws: int = 10,
    curve_sizes=None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> TaskResult:
    """Run one of the paper's evaluations.

    Args:
        model: a :class:`~fastmlstm.ByteLM` (features from :func:`featurize`) or any callable
            ``texts -> [N, F]`` array.
        task: one of :data:`TASKS`.
        root: the dataset's folder (default ``$FASTMLSTM_DATA/<folder>``); or pass ``splits``, a
            dict like a loader returns.
        limit: use at most this many examples of each split (a stratified random subset), for a
            quick run.
        Cs: the C grid of the probe.
        seed: for holdouts, folds, subsets and the solver.
        curve: also compute the data-efficiency curve (tasks with train/dev/test splits; an error
            for the cross-validated and relatedness ones), ``curve_draws`` random
            draws per size in ``curve_sizes`` (default 10, 20, 50, ..., all).
        batch_size, progress: passed to :func:`featurize`.

    Returns:
        :class:`TaskResult`; ``metrics`` holds ``task``, ``accuracy`` (percent; Pearson/Spearman/MSE
        for SICK, the correlations NaN where the predictions are constant), ``C``, ``features_used``, ``sentiment_unit``, ``unit_accuracy``, how C was chosen
        and what was evaluated on, and ``paper`` (the paper's number) where there is one.

    Example::

        >>> result = evaluate(fastmlstm.load_openai("model/"), "sst2")    # doctest: +SKIP
        >>> result.metrics["accuracy"], result.metrics["sentiment_unit"]   # doctest: +SKIP
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    limit, seed, batch_size = check("limit", limit), check("seed", seed), check("batch_size", batch_size)
    curve_draws = check("draws", curve_draws, "curve_draws")
    if curve and datasets.DATASETS[task].protocol in ("cv10", "relatedness"):
        raise InputError(f"curve: {task} is evaluated by {datasets.DATASETS[task].protocol}, which draws no "
                         "data-efficiency curve (the tasks with train/dev/test splits do)")
    featurize_fn = _featurizer(model, batch_size, progress)
    splits = _check_splits(task, datasets.load(task, root) if splits is None else splits)
    protocol = datasets.DATASETS[task].protocol
    splits = {name: _limit(s, limit, seed, protocol != "relatedness") for name, s in splits.items()}
    splits = _check_classes(task, splits, limit)
    if protocol == "cv10":
        result = _cross_validation(featurize_fn, task, splits["all"], Cs=Cs, seed=seed)
    elif protocol == "relatedness":
        result = _relatedness(featurize_fn, task, splits, seed=seed)
    else:
        result = _classification(featurize_fn, task, splits, Cs=Cs, seed=seed, curve=curve,
                                 curve_draws=curve_draws, curve_sizes=curve_sizes)
    result.metrics = {"task": task, "protocol": protocol, **result.metrics}
    if limit is not None:
        result.metrics["limit"] = limit
    if task in PAPER:
        result.metrics["paper"] = PAPER[task]
    return result
