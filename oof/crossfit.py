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
    """oof: P(class 1) for every training row, from the model that did not see its fold.
    models: the fold models (fold_mean) or the single refitted model (refit).
    inputs: None when every model reads the same features; else, per model, the name of the
    features it reads (a fine-tuned fold network's own GAP features, ``oof.finetune``)."""

    oof: np.ndarray
    models: list = field(default_factory=list)
    test_mode: str = "fold_mean"
    inputs: list[str] | None = None

    def predict(self, X) -> np.ndarray:
        """P(class 1) for new rows, the way the test set is predicted."""
        return np.mean([positive_proba(m, X) for m in self.models], axis=0)


def positive_proba(model, X) -> np.ndarray:
    """P(class 1) from a fitted classifier."""
    return model.predict_proba(X)[:, 1]


def cross_fit(estimator, X, y, fold: np.ndarray, test_mode: str = "fold_mean") -> CrossFit:
    """Fit ``estimator`` once per fold on the other folds; predict the held-out fold.

    Equals ``cross_val_predict(estimator, X, y, cv=PredefinedSplit(fold), method="predict_proba")``
    on the positive class.
    """
    if test_mode not in TEST_MODES:
        raise ValueError(f"test_mode must be one of {', '.join(TEST_MODES)}; got {test_mode!r}")
    X, y, fold = np.asarray(X), np.asarray(y), np.asarray(fold)
    if not (len(X) == len(y) == len(fold)):
        raise ValueError(f"X, y and fold disagree in length: {len(X)}, {len(y)}, {len(fold)}")
    oof = np.full(len(y), np.nan)
    models = []
    for k in np.unique(fold):
        held = fold == k
        model = clone(estimator).fit(X[~held], y[~held])
        oof[held] = positive_proba(model, X[held])
        models.append(model)
    if test_mode == "refit":
        models = [clone(estimator).fit(X, y)]
    return CrossFit(oof, models, test_mode)
