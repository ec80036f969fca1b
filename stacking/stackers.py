"""Level-2 models over level-1 probabilities, as scikit-learn estimators.

Inputs are the level-1 P(dog) columns; the stackers work on their logits, where a weighted sum
is the natural way to combine calibrated classifiers. With K > 2 classes the inputs are every
level-1 model's K class probabilities side by side (M models: M * K columns, model by model), and
the stackers work on their logarithms.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from features.defaults import SEED
from oof.heads import Classifier, validate_data

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


def model_columns(X: np.ndarray, n_classes: int, who: str) -> np.ndarray:
    """The level-1 inputs as (n, models, K) for K > 2 classes (columns are model by model)."""
    if X.shape[1] % n_classes:
        raise ValueError(f"{who}: {X.shape[1]} columns are not K = {n_classes} class probabilities "
                         "per level-1 model")
    return X.reshape(len(X), -1, n_classes)


class LogitStacker(Classifier):
    """Base for stackers that see the level-1 columns as logits (two classes) or class
    log-probabilities (K > 2)."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        target = self._set_classes(y)
        self.model_ = self._make().fit(self._inputs(X), target)
        return self

    def _inputs(self, X) -> np.ndarray:
        who = type(self).__name__
        P = check_probabilities(X, who)
        if len(self.classes_) == 2:
            return logit(P)
        model_columns(P, len(self.classes_), who)
        return np.log(np.clip(P, LOGIT_EPS, 1.0))

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self._margin(self._inputs(X))


class LRStacker(LogitStacker):
    """Logistic regression on the level-1 logits: a learnt weight per input, plus a bias.

    With K > 2 classes, ``weights="model"`` (the default) keeps that form: one weight per level-1
    model, shared by its K class log-probabilities, plus a bias per class (a weighted geometric
    pool of the models, M + K numbers); ``weights="full"`` is a multinomial logistic regression on
    all M * K log-probabilities (M * K * K weights: it can fix one model's confusions, and overfits
    sooner; benchmarks/RESULTS.md has both on clothing-small).

    Parameters
    ----------
    C : float, inverse regularisation strength (on the weights, not the biases).
    weights : "model" or "full", the K > 2 form.
    """

    def __init__(self, C: float = 1.0, weights: str = "model"):
        self.C = C
        self.weights = weights

    def _make(self):
        if len(self.classes_) == 2 or self.weights == "full":
            return LogisticRegression(C=self.C, max_iter=1000)
        if self.weights != "model":
            raise ValueError(f"LRStacker weights must be 'model' or 'full', not {self.weights!r}")
        return PooledSoftmax(len(self.classes_), self.C)

    def _margin(self, Z):
        return self.model_.decision_function(Z)


class PooledSoftmax:
    """softmax(sum_m w_m log p_m + b): a weight per model, a bias per class, fitted by L-BFGS on the
    mean log loss + ||w||^2 / (2 C n) (scikit-learn's penalty, per row). Starts from the plain
    geometric mean (w = 1/M)."""

    def __init__(self, n_classes: int, C: float = 1.0):
        self.n_classes, self.C = n_classes, C

    def fit(self, Z: np.ndarray, y: np.ndarray) -> "PooledSoftmax":
        from scipy.optimize import minimize

        L = model_columns(Z, self.n_classes, "PooledSoftmax")
        n, m, k = L.shape
        onehot = np.eye(k)[y]

        def loss(theta):
            w, b = theta[:m], theta[m:]
            z = np.einsum("imk,m->ik", L, w) + b
            z -= z.max(axis=1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            d = (np.exp(log_p) - onehot) / n
            value = -(onehot * log_p).sum() / n + w @ w / (2 * self.C * n)
            grad = np.r_[np.einsum("ik,imk->m", d, L) + w / (self.C * n), d.sum(axis=0)]
            return value, grad

        start = np.r_[np.full(m, 1.0 / m), np.zeros(k)]
        theta = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 500}).x
        self.coef_, self.intercept_ = theta[:m], theta[m:]
        return self

    def decision_function(self, Z: np.ndarray) -> np.ndarray:
        L = model_columns(Z, self.n_classes, "PooledSoftmax")
        return np.einsum("imk,m->ik", L, self.coef_) + self.intercept_


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


class AverageStacker(Classifier):
    """The baseline: the plain mean of the level-1 probabilities (nothing is learnt)."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_probabilities(X, type(self).__name__)
        self._set_classes(y)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        P = check_probabilities(X, type(self).__name__)
        if len(self.classes_) == 2:
            return logit(P.mean(axis=1))
        mean = model_columns(P, len(self.classes_), type(self).__name__).mean(axis=1)
        return np.log(np.clip(mean, LOGIT_EPS, 1.0))  # its softmax is the mean again


STACKERS = {
    "average": AverageStacker,
    "stack-lr": LRStacker,
    "stack-lgbm": LGBMStacker,
}
