"""The ImageNet prior: a level-1 model on what a backbone's own ImageNet classifier says.

Its input is the backbone's GAP features, like every head's: the classifier (a fixed Dense layer,
``features.imagenet.ImageNetTop``) is part of the model, so the prior predicts, explains (CAM)
and exports wherever the heads do, from the same features. It learns only a calibration: a
logistic regression on a few log-probabilities the classifier gives, which (``FEATURES``) chosen
by CV (benchmarks/imagenet_prior.py, RESULTS.md).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted

from features.imagenet import CATS, DOGS, ImageNetTop
from oof.heads import BinaryClassifier, fit_standardised_logistic, validate_data

# The prior's inputs, each a function of the class logits z:
#   ratio:  log P(dog breeds) - log P(cats), one number: the classifier's own cat-or-dog odds;
#   masses: log P(dog breeds), log P(cats): also how much it believes in a pet at all;
#   pets:   log P(c) of each of the 123 dog and cat classes: which breed, calibrated.
FEATURES = ("ratio", "masses", "pets")
PETS = np.r_[np.arange(DOGS.start, DOGS.stop), np.arange(CATS.start, CATS.stop)]


def _lse(z: np.ndarray, cols=slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(log sum exp of z[:, cols], softmax over those columns: its gradient in z[:, cols])."""
    part = z[:, cols]
    top = part.max(axis=1, keepdims=True)
    e = np.exp(part - top)
    total = e.sum(axis=1, keepdims=True)
    return (top + np.log(total))[:, 0], e / total


def prior_features(z: np.ndarray, kind: str) -> np.ndarray:
    """The prior's inputs (n, k) from class logits z (n, 1000)."""
    z = np.asarray(z, np.float64)
    if kind not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {kind!r}")
    dog, _ = _lse(z, DOGS)
    cat, _ = _lse(z, CATS)
    if kind == "ratio":
        return (dog - cat)[:, None]
    every, _ = _lse(z)
    if kind == "masses":
        return np.column_stack([dog - every, cat - every])
    return z[:, PETS] - every[:, None]


def prior_jacobian(z: np.ndarray, kind: str) -> np.ndarray:
    """d prior_features / dz for one row of logits: (k, 1000)."""
    z = np.asarray(z, np.float64)[None, :]
    _, p_dog = _lse(z, DOGS)
    _, p_cat = _lse(z, CATS)
    _, p_all = _lse(z)
    d_dog, d_cat = np.zeros(z.shape[1]), np.zeros(z.shape[1])
    d_dog[DOGS], d_cat[CATS] = p_dog[0], p_cat[0]
    if kind == "ratio":
        return (d_dog - d_cat)[None, :]
    if kind == "masses":
        return np.stack([d_dog - p_all[0], d_cat - p_all[0]])
    jac = -np.tile(p_all[0], (len(PETS), 1))
    jac[np.arange(len(PETS)), PETS] += 1.0
    return jac


class ImageNetPrior(BinaryClassifier):
    """Logistic regression on the ImageNet classifier's pet log-probabilities; input: GAP features.

    Parameters
    ----------
    top : ImageNetTop, the backbone's classifier (kernel, bias) on its GAP features.
    features : one of ``FEATURES``, what the regression sees.
    C : float or "auto", inverse regularisation; "auto" picks one of ``Cs`` by inner 3-fold CV.
    Cs : tuple of float, the candidates for "auto".
    """

    def __init__(self, top: ImageNetTop | None = None, features: str = "ratio",
                 C: float | str = "auto", Cs: tuple = (0.01, 0.1, 1.0, 10.0, 100.0)):
        self.top = top
        self.features = features
        self.C = C
        self.Cs = Cs

    def _inputs(self, X) -> np.ndarray:
        if self.top is None:
            raise ValueError("ImageNetPrior needs the backbone's classifier (top=ImageNetTop)")
        if X.shape[1] != self.top.kernel.shape[0]:
            raise ValueError(f"ImageNetPrior: {X.shape[1]} features given, the classifier takes "
                             f"{self.top.kernel.shape[0]}")
        return prior_features(self.top.logits(X), self.features)

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        target = self._set_classes(y)
        self.scaler_, self.lr_, self.C_ = fit_standardised_logistic(self._inputs(X), target, self.C,
                                                                    self.Cs, 3000)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.lr_.decision_function(self.scaler_.transform(self._inputs(X)))

    def linear_on_features(self) -> tuple[np.ndarray, float]:
        """(w, b) with logit = prior_features @ w + b (the scaler folded in)."""
        check_is_fitted(self)
        w = self.lr_.coef_[0] / self.scaler_.scale_
        return w, float(self.lr_.intercept_[0] - self.scaler_.mean_ @ w)

    def feature_gradient(self, x: np.ndarray) -> np.ndarray:
        """d logit / d GAP features at one row ``x``: what the class activation map spreads over
        positions (the logit is not linear in the features, so the map is first-order, around
        the photo's own GAP, and still exact in its mean)."""
        w, _ = self.linear_on_features()
        z = self.top.logits(np.asarray(x, np.float32)[None, :])[0]
        return self.top.kernel.astype(np.float64) @ (w @ prior_jacobian(z, self.features))
