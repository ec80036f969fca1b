"""Out-of-fold predictions on saved folds, and the two named ways to predict the test set.

``test_mode="fold_mean"`` averages the K fold models' test predictions (vecstack's variant A);
``test_mode="refit"`` refits one model on every training row (variant B). The fitted models are
kept, so a saved ensemble reproduces the run's test predictions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone

TEST_MODES = ("fold_mean", "refit")


@dataclass
class CrossFit:
    """oof: P(class 1) (two classes; (n, K) class probabilities for more) for every training row,
    from the model that did not see its fold.
    models: the fold models (fold_mean) or the single refitted model (refit).
    inputs: None when every model reads the same features; else, per model, the name of the
    features it reads (a fine-tuned fold network's own GAP features, ``oof.finetune``)."""

    oof: np.ndarray
    models: list = field(default_factory=list)
    test_mode: str = "fold_mean"
    inputs: list[str] | None = None

    def predict(self, X) -> np.ndarray:
        """P(class 1) (or the K class probabilities) for new rows, the way the test set is predicted."""
        if len(X) == 0:
            return np.empty((0, *self.oof.shape[1:]))
        return np.mean([class_proba(m, X) for m in self.models], axis=0)

    @property
    def n_classes(self) -> int:
        return 2 if self.oof.ndim == 1 else self.oof.shape[1]


def prediction_shape(n: int, n_classes: int) -> tuple[int, ...]:
    """The shape of ``n`` rows' predictions: (n,) of P(class 1) for two classes, else (n, K)."""
    return (n,) if n_classes == 2 else (n, n_classes)


def class_proba(model, X) -> np.ndarray:
    """What every level passes on: P(class 1) from a two-class classifier, (n, K) from a K-class one."""
    p = model.predict_proba(X)
    return p[:, 1] if p.shape[1] == 2 else p


def cross_fit(estimator, X, y, fold: np.ndarray, test_mode: str = "fold_mean") -> CrossFit:
    """Fit ``estimator`` once per fold on the other folds; predict the held-out fold.

    Equals ``cross_val_predict(estimator, X, y, cv=PredefinedSplit(fold), method="predict_proba")``
    on the positive class (on every class for K > 2).
    """
    if test_mode not in TEST_MODES:
        raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}; got {test_mode!r}")
    X, y, fold = np.asarray(X), np.asarray(y), np.asarray(fold)
    if not (len(X) == len(y) == len(fold)):
        raise ValueError(f"X, y and fold disagree in length: {len(X)}, {len(y)}, {len(fold)}")
    oof = np.full(prediction_shape(len(y), len(np.unique(y))), np.nan)
    models = []
    for k in np.unique(fold):
        held = fold == k
        model = clone(estimator).fit(X[~held], y[~held])
        oof[held] = class_proba(model, X[held])
        models.append(model)
    if test_mode == "refit":
        models = [clone(estimator).fit(X, y)]
    return CrossFit(oof, models, test_mode)
