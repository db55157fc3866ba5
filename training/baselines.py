"""Classical baselines: the study's Naive Bayes and Random Forest on spectrum peaks, and a
regularised logistic regression on the full spectrum vector.

Features (the published classical methods used "characteristic OMIS spectra intensities and
peak positions"): the ``k`` highest peaks of ``y`` and the ``k`` deepest valleys (peaks of
``-y``), found with :func:`scipy.signal.find_peaks`, each as (position in nm, height), ordered
by prominence.  Missing peaks are padded with position 0 nm and height 0, so every slide has a
vector of length ``4k``.  The logistic regression reads every bin of ``y`` (standardised), with
an L2 penalty whose strength is chosen by 3-fold cross-validation inside the training data
(``LogisticRegressionCV``, log loss).  The simplest spectral rule, ``best_bin``, reads one bin:
the bin whose values separate the risk classes best on the training slides (largest
``|AUC - 0.5|``, Mann-Whitney), turned into a probability by a one-variable logistic
regression fitted on the same slides.  Every baseline runs on exactly the folds the network
uses, and is also fitted on each fold's inner fit/validation split so that its decision
threshold is chosen on validation predictions, as the network's is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import find_peaks
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Folds = Sequence[tuple[I64, I64]]

log = logging.getLogger(__name__)

DEFAULT_PEAKS = 5


def _top_peaks(x_nm: F64, values: F64, k: int) -> list[float]:
    idx, props = find_peaks(values, prominence=0.0)
    order = np.argsort(-props["prominences"], kind="stable")[:k]
    feats: list[float] = []
    for i in idx[order]:
        feats += [float(x_nm[i]), float(values[i])]
    feats += [0.0, 0.0] * (k - len(order))
    return feats


def peak_features(x_nm: F64, y: F64, k: int = DEFAULT_PEAKS) -> F64:
    """Positions (nm) and heights of the top ``k`` peaks and ``k`` valleys: length ``4k``."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x_nm, dtype=np.float64)
    return np.array(_top_peaks(x, y, k) + _top_peaks(x, -y, k), dtype=np.float64)


def feature_matrix(spectra: Sequence[tuple[F64, F64]], k: int = DEFAULT_PEAKS) -> F64:
    """One row of peak features per spectrum."""
    return np.stack([peak_features(x, y, k) for x, y in spectra])


def _naive_bayes(seed: int, y: I64) -> Any:
    return GaussianNB()


def _random_forest(seed: int, y: I64) -> Any:
    # balanced class weights: the same imbalance handling as the CNN's weighted loss
    return RandomForestClassifier(
        n_estimators=200, class_weight="balanced", random_state=seed, n_jobs=1
    )


def _logistic_regression(seed: int, y: I64) -> Any:
    # the inner CV needs every class in every split: fewer splits for a rare class, and the
    # default strength (C = 1) when a class has a single training slide
    rarest = int(np.bincount(y)[np.unique(y)].min())
    if rarest < 2:
        lr: Any = LogisticRegression(class_weight="balanced", max_iter=2000)
    else:
        lr = LogisticRegressionCV(
            Cs=10,
            cv=min(3, rarest),
            scoring="neg_log_loss",
            class_weight="balanced",
            max_iter=2000,
            l1_ratios=(0.0,),  # pure L2; explicit, as scikit-learn 1.9 asks
            use_legacy_attributes=False,  # scikit-learn 1.9 warns on every fit otherwise
        )
    return make_pipeline(StandardScaler(), lr)


class BestBinRule(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """One spectrum bin, chosen on the training slides, through a 1-D logistic regression."""

    def fit(self, x: F64, y: I64) -> BestBinRule:
        """Pick the most separating bin (positive class: the highest label) and fit on it."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        positive = y == self.classes_[-1]
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        ranks = np.apply_along_axis(rankdata, 0, x)
        u = ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
        auc = u / max(n_pos * n_neg, 1)
        self.bin_ = int(np.argmax(np.abs(auc - 0.5)))
        self.model_ = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000)
        )
        self.model_.fit(x[:, [self.bin_]], y)
        return self

    def predict_proba(self, x: F64) -> F64:
        """Class probabilities from the chosen bin."""
        out: F64 = self.model_.predict_proba(np.asarray(x, dtype=np.float64)[:, [self.bin_]])
        return out


def _best_bin(seed: int, y: I64) -> Any:
    return BestBinRule()


# name -> (feature set, estimator factory); "peaks" = peak_features, "spectrum" = every bin of y
BASELINES: dict[str, tuple[str, Callable[[int, I64], Any]]] = {
    "naive_bayes": ("peaks", _naive_bayes),
    "random_forest": ("peaks", _random_forest),
    "logistic_regression": ("spectrum", _logistic_regression),
    "best_bin": ("spectrum", _best_bin),
}


def _fit_predict(
    make: Callable[[int, I64], Any],
    x: F64,
    y: I64,
    *,
    train: I64,
    tests: tuple[I64, ...],
    k: int,
    seed: int,
) -> list[F64]:
    """One model fitted on ``train``; its class probabilities on each index set of ``tests``."""
    if np.unique(y[train]).size < 2:  # e.g. a tiny inner split: that class, with certainty
        log.warning("baseline trained on one class only (%d slides)", train.size)
        outs = [np.zeros((t.size, k), dtype=np.float64) for t in tests]
        for o in outs:
            o[:, int(y[train][0])] = 1.0
        return outs
    clf = make(seed, y[train])
    clf.fit(x[train], y[train])
    cols = np.asarray(clf.classes_, dtype=np.int64)
    result = []
    for t in tests:
        # a class absent from the training fold has no column: put the columns where they belong
        out = np.zeros((t.size, k), dtype=np.float64)
        if t.size:
            out[:, cols] = np.asarray(clf.predict_proba(x[t]), dtype=np.float64)
        result.append(out)
    return result


def cross_val_baselines(
    features: dict[str, F64],
    labels: I64,
    folds: Folds,
    num_classes: int,
    seed: int,
    *,
    inner: Folds | None = None,
) -> dict[str, tuple[F64, list[F64]]]:
    """Out-of-fold class probabilities of every baseline, and per fold its validation ones.

    ``features`` maps a feature-set name (``peaks``, ``spectrum``) to one row per slide; a
    baseline whose set is missing is not run.  ``inner`` holds each fold's (fit, validation)
    split: then one model, fitted on the fit part only, gives both the validation
    probabilities (where its thresholds are chosen) and the test probabilities (where they are
    applied), as for the network.  Without ``inner`` the model is fitted on the whole training
    fold.
    """
    out: dict[str, tuple[F64, list[F64]]] = {}
    for name, (kind, make) in BASELINES.items():
        if kind not in features:
            continue
        x = features[kind]
        probs = np.zeros((labels.size, num_classes), dtype=np.float64)
        val: list[F64] = []
        for i, (train, test) in enumerate(folds):
            fit_i, val_i = inner[i] if inner is not None else (train, train[:0])
            probs[test], v = _fit_predict(
                make, x, labels, train=fit_i, tests=(test, val_i), k=num_classes, seed=seed
            )
            if inner is not None:
                val.append(v)
        out[name] = (probs, val)
        log.info("baseline %s: done on %d folds", name, len(folds))
    return out
