"""The study's classical baselines on spectrum peaks: Naive Bayes and Random Forest.

Features (the published classical methods used "characteristic OMIS spectra intensities and
peak positions"): the ``k`` highest peaks of ``y`` and the ``k`` deepest valleys (peaks of
``-y``), found with :func:`scipy.signal.find_peaks`, each as (position in nm, height), ordered
by prominence.  Missing peaks are padded with position 0 nm and height 0, so every slide has a
vector of length ``4k``.  Both baselines run on exactly the folds the CNN uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import find_peaks
from sklearn.ensemble import RandomForestClassifier
from sklearn.naive_bayes import GaussianNB

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


def _naive_bayes(seed: int) -> Any:
    return GaussianNB()


def _random_forest(seed: int) -> Any:
    # balanced class weights: the same imbalance handling as the CNN's weighted loss
    return RandomForestClassifier(
        n_estimators=200, class_weight="balanced", random_state=seed, n_jobs=1
    )


BASELINES: dict[str, Callable[[int], Any]] = {
    "naive_bayes": _naive_bayes,
    "random_forest": _random_forest,
}


def _fit_predict(
    make: Callable[[int], Any], x: F64, y: I64, *, train: I64, test: I64, k: int, seed: int
) -> F64:
    clf = make(seed)
    clf.fit(x[train], y[train])
    got = np.asarray(clf.predict_proba(x[test]), dtype=np.float64)
    # a class absent from the training fold has no column: put the columns where they belong
    out = np.zeros((test.size, k), dtype=np.float64)
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = got
    return out


def cross_val_baselines(
    features: F64, labels: I64, folds: Folds, num_classes: int, seed: int
) -> dict[str, F64]:
    """Out-of-fold class probabilities of every baseline, on the given folds."""
    out: dict[str, F64] = {}
    for name, make in BASELINES.items():
        probs = np.zeros((labels.size, num_classes), dtype=np.float64)
        for train, test in folds:
            probs[test] = _fit_predict(
                make, features, labels, train=train, test=test, k=num_classes, seed=seed
            )
        out[name] = probs
        log.info("baseline %s: done on %d folds", name, len(folds))
    return out
