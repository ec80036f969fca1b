"""Level-1 heads on GAP features, as scikit-learn estimators.

Both heads are linear in the features at prediction time, which is what makes the class
activation map exact: ``coef_`` and ``intercept_`` act on standardised features.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6 (older Kaggle images): the same check was a method
    def validate_data(estimator, X, y=None, reset=True, **kwargs):
        if y is None:
            return estimator._validate_data(X, reset=reset, **kwargs)
        return estimator._validate_data(X, y, reset=reset, **kwargs)

from features.defaults import SEED
from features.imagenet import softmax


def fit_standardised_logistic(X, target, C: float | str, Cs: tuple, max_iter: int):
    """(scaler, logistic regression, C used) on standardised ``X``; C "auto": the one of ``Cs``
    with the lowest inner stratified 3-fold CV log loss on these rows (2 folds where a class has
    2 photos; the middle of ``Cs`` where one has a single photo)."""
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    fewest = int(np.unique(target, return_counts=True)[1].min())
    if C == "auto" and fewest < 2:  # no inner CV can hold out a photo of every class: the middle C
        C = sorted(Cs)[len(Cs) // 2]
    if C == "auto":
        with warnings.catch_warnings():  # scikit-learn 1.9 announces attribute changes
            warnings.simplefilter("ignore", FutureWarning)
            # (3 inner folds, fewer where a class has fewer photos: stratified folds need one each)
            lr = LogisticRegressionCV(Cs=list(Cs), cv=min(3, fewest), scoring="neg_log_loss",
                                      max_iter=max_iter).fit(Z, target)
        return scaler, lr, float(np.ravel(lr.C_)[0])
    return scaler, LogisticRegression(C=C, max_iter=max_iter).fit(Z, target), float(C)


def output_layer(n_classes: int) -> tuple[int, str, str]:
    """(units, activation, Keras loss) of a Dense classifier layer: one sigmoid logit for two
    classes (P(class 1), as the binary task always was), a softmax over K for more."""
    if n_classes == 2:
        return 1, "sigmoid", "binary_crossentropy"
    return n_classes, "softmax", "sparse_categorical_crossentropy"


def train_dense(Z: np.ndarray, target: np.ndarray, n_classes: int, dropout: float, epochs: int,
                batch_size: int, learning_rate: float, l2: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (D, units), bias (units,)) of Dropout + Dense trained on ``Z`` with Adam.

    What ``keras.Model.fit(shuffle=True)`` does for ``output_layer(n_classes)``: Glorot-uniform
    kernel, zero bias; each epoch a new order, mini-batches of ``batch_size`` (the last one
    smaller); inverted dropout on the inputs; the mean cross-entropy of the batch (sigmoid or
    softmax, whose gradient in the logits is p - y) plus ``l2 * sum(kernel ** 2)``; Keras' Adam
    (beta 0.9 / 0.999, epsilon 1e-7, bias correction in the step size). ``target``: 0/1 for two
    classes, class indices for more (what ``Classifier._set_classes`` returns).
    """
    rng = np.random.default_rng(seed)
    n, d = Z.shape
    units = output_layer(n_classes)[0]
    Y = target.reshape(-1, 1).astype(np.float32) if units == 1 else np.eye(units, dtype=np.float32)[target]
    limit = np.sqrt(6.0 / (d + units))
    params = [rng.uniform(-limit, limit, (d, units)).astype(np.float32), np.zeros(units, np.float32)]
    moments = [[np.zeros_like(p) for p in params] for _ in range(2)]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-7, 0
    keep = 1.0 - dropout
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            x = Z[rows]
            if dropout > 0:
                x = x * ((rng.random(x.shape, dtype=np.float32) < keep) / np.float32(keep))
            z = x @ params[0] + params[1]
            p = 1.0 / (1.0 + np.exp(-z)) if units == 1 else softmax(z)
            g = (p - Y[rows]) / np.float32(len(rows))
            grads = [x.T @ g + np.float32(2 * l2) * params[0], g.sum(axis=0)]
            step += 1
            rate = learning_rate * np.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            for param, grad, m, v in zip(params, grads, *moments):
                m += (grad - m) * (1 - beta1)
                v += (grad * grad - v) * (1 - beta2)
                param -= (rate * m / (np.sqrt(v) + eps)).astype(np.float32)
    return params[0], params[1]


class Classifier(ClassifierMixin, BaseEstimator):
    """What our estimators share, for two classes or K: ``decision_function`` is the logit of
    P(classes_[1]) for two classes (the binary task stays exactly what it was), class logits
    (n, K) for more; ``predict_proba`` and ``predict`` follow from it."""

    def _set_classes(self, y) -> np.ndarray:
        """Record the classes; the training target: 0/1 floats for two classes, else class indices."""
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs two classes at least; y has only one class "
                             f"({self.classes_[0]!r})")
        if len(self.classes_) == 2:
            return (y == self.classes_[1]).astype(np.float32)
        return np.searchsorted(self.classes_, y)

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if z.ndim == 2:
            return softmax(z)
        p = 1.0 / (1.0 + np.exp(-z))
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        z = self.decision_function(X)
        return self.classes_[np.argmax(z, axis=1) if z.ndim == 2 else (z > 0).astype(int)]


class BinaryClassifier(Classifier):
    """A model made for two classes only (the cat-or-dog ImageNet prior)."""

    def _set_classes(self, y) -> np.ndarray:
        check_classification_targets(y)
        y_type = type_of_target(y, input_name="y")
        if y_type != "binary":
            raise ValueError("Only binary classification is supported. The type of the target "
                             f"is {y_type}.")
        return super()._set_classes(y)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags


class LogisticHead(Classifier):
    """The default head: standardised features, L2 logistic regression (multinomial for K > 2).

    The best regularisation depends on the backbone and the data (on the shared photos it moved
    from 0.1 on 1,600 photos to 0.01 on 7,700), so by default C is chosen by an inner stratified
    CV on the rows the head is fitted on: nested inside our folds, it never sees the held-out fold.

    Parameters
    ----------
    C : float or "auto", inverse regularisation strength; "auto" picks one of ``Cs`` by
        inner 3-fold CV log loss.
    Cs : tuple of float, the candidates for "auto".
    max_iter : int, solver iterations.
    """

    def __init__(self, C: float | str = "auto", Cs: tuple = (0.003, 0.01, 0.03, 0.1, 0.3),
                 max_iter: int = 3000):
        self.C = C
        self.Cs = Cs
        self.max_iter = max_iter

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        target = self._set_classes(y)
        self.scaler_, self.lr_, self.C_ = fit_standardised_logistic(X, target, self.C, self.Cs,
                                                                    self.max_iter)
        self.n_iter_ = np.max(self.lr_.n_iter_)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.lr_.decision_function(self.scaler_.transform(X))


class KerasHead(Classifier):
    """The public write-ups' Keras head: Dropout + Dense(1, sigmoid) (Dense(K, softmax) for K > 2
    classes), Glorot-uniform kernel, zero bias, Adam as Keras has it, shuffled mini-batches.

    Trained by ``train_dense`` in NumPy, step for step what ``keras.Model.fit`` does with these
    layers: a Keras fit costs about a second of graph building and per-epoch overhead whatever the
    data, which on a stacking run's small folds was most of the head's time, and made the head's
    results depend on the Keras version. At prediction time dropout is the identity, so the
    fitted head is a linear model kept as ``coef_``/``intercept_`` (on standardised features).

    Parameters
    ----------
    dropout : float, fraction of inputs dropped while training.
    epochs, batch_size, learning_rate : Adam training schedule.
    l2 : float, L2 penalty on the Dense kernel (Keras' ``L2(l2)``: ``l2 * sum(w ** 2)``).
    standardize : bool, scale features to zero mean, unit variance first.
    random_state : int, seed of weight initialisation, dropout and shuffling.
    """

    def __init__(self, dropout: float = 0.5, epochs: int = 20, batch_size: int = 128,
                 learning_rate: float = 1e-3, l2: float = 0.0, standardize: bool = True,
                 random_state: int = SEED):
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.l2 = l2
        self.standardize = standardize
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        target = self._set_classes(y)
        self.mean_ = X.mean(axis=0) if self.standardize else np.zeros(X.shape[1], np.float32)
        scale = X.std(axis=0) if self.standardize else np.ones(X.shape[1], np.float32)
        self.scale_ = np.where(scale > 0, scale, 1.0).astype(np.float32)
        kernel, bias = train_dense((X - self.mean_) / self.scale_, target, len(self.classes_),
                                   self.dropout, self.epochs, self.batch_size, self.learning_rate,
                                   self.l2, self.random_state)
        # Two classes: one logit, coef_ (D,); K classes: coef_ (D, K), intercept_ (K,).
        binary = kernel.shape[1] == 1
        self.coef_ = (kernel[:, 0] if binary else kernel).astype(np.float64)
        self.intercept_ = float(bias[0]) if binary else bias.astype(np.float64)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_


HEADS = {
    "logistic": LogisticHead,
    "keras": KerasHead,
}


def make_head(name: str, **params):
    """A fresh head by name (``logistic`` or ``keras``)."""
    if name not in HEADS:
        raise KeyError(f"Unknown head '{name}'; available: {', '.join(HEADS)}")
    return HEADS[name](**params)


def linear_parts(head) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | np.ndarray]:
    """(mean, scale, coef, intercept) of a fitted linear head: logit = ((x - mean) / scale) @ coef + b
    (coef (D,) and one logit for two classes; (D, K) and K class logits for more)."""
    if hasattr(head, "scale_"):  # KerasHead, and a fine-tuned network's DenseHead
        return head.mean_, head.scale_, head.coef_, head.intercept_
    if len(head.classes_) > 2:
        return head.scaler_.mean_, head.scaler_.scale_, head.lr_.coef_.T, head.lr_.intercept_
    return head.scaler_.mean_, head.scaler_.scale_, head.lr_.coef_[0], float(head.lr_.intercept_[0])
