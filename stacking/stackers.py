"""Level-2 models over level-1 probabilities, as scikit-learn estimators.

Inputs are the level-1 P(dog) columns; the stackers work on their logits, where a weighted sum
is the natural way to combine calibrated classifiers.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from features.defaults import SEED
from oof.heads import BinaryClassifier, validate_data

# Probabilities are clipped this far from 0 and 1 before taking logits (a level-1 model can
# output exactly 0 or 1 in float64).
LOGIT_EPS = 1e-6


def check_probabilities(X, who: str) -> np.ndarray:
    """Level-2 inputs are level-1 probabilities: refuse anything outside [0, 1]."""
    if (X < 0).any():
        raise ValueError(f"Negative values in data passed to {who}: level-2 inputs are "
                         "probabilities in [0, 1]")
    if (X > 1).any():
        raise ValueError(f"Values above 1 in data passed to {who}: level-2 inputs are "
                         "probabilities in [0, 1]")
    return X


def logit(p):
    p = np.clip(np.asarray(p, dtype=float), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p / (1 - p))


class LogitStacker(BinaryClassifier):
    """Base for stackers that see the level-1 columns as logits."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        target = self._set_classes(y)
        self.model_ = self._make().fit(logit(check_probabilities(X, type(self).__name__)), target)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self._margin(logit(check_probabilities(X, type(self).__name__)))


class LRStacker(LogitStacker):
    """Logistic regression on the level-1 logits: a learnt weight per input, plus a bias.

    Parameters
    ----------
    C : float, inverse regularisation strength.
    """

    def __init__(self, C: float = 1.0):
        self.C = C

    def _make(self):
        return LogisticRegression(C=self.C, max_iter=1000)

    def _margin(self, Z):
        return self.model_.decision_function(Z)


class LGBMStacker(LogitStacker):
    """LightGBM on the level-1 logits: can learn where the backbones disagree, and can overfit."""

    def __init__(self, n_estimators: int = 300, learning_rate: float = 0.03, num_leaves: int = 7,
                 min_child_samples: int = 40, random_state: int = SEED):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.random_state = random_state

    def _make(self):
        from lightgbm import LGBMClassifier

        return LGBMClassifier(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                              num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
                              subsample=0.8, subsample_freq=1, reg_lambda=1.0,
                              random_state=self.random_state, n_jobs=2, verbose=-1)

    def _margin(self, Z):
        return self.model_.predict(Z, raw_score=True)


class AverageStacker(BinaryClassifier):
    """The baseline: the plain mean of the level-1 probabilities (nothing is learnt)."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_probabilities(X, type(self).__name__)
        self._set_classes(y)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return logit(check_probabilities(X, type(self).__name__).mean(axis=1))


STACKERS = {
    "average": AverageStacker,
    "stack-lr": LRStacker,
    "stack-lgbm": LGBMStacker,
}
