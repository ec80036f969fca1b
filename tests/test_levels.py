"""Level 1 and level 2 on real cached features: folds, OOF parity, estimator contract, no leak."""

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.estimator_checks import check_estimator

from oof.crossfit import cross_fit
from oof.folds import FoldError, fold_cv, load_folds, make_folds, save_folds, validate_folds
from oof.heads import KerasHead, LogisticHead, linear_parts
from oof.store import PredictionError, validate_oof
from stacking.stackers import AverageStacker, LGBMStacker, LRStacker


def test_folds_are_stratified_reproducible_and_checked(real_features, tmp_path):
    ids, y = real_features.train_ids, real_features.label
    a, b = make_folds(ids, y, 5), make_folds(ids, y, 5)
    assert a.equals(b)
    assert not a.equals(make_folds(ids, y, 5, seed=7))
    per_fold = pd.crosstab(a["fold"], y)
    assert (per_fold.max() - per_fold.min()).max() <= 1  # stratified
    save_folds(a, tmp_path / "folds.csv")
    assert load_folds(tmp_path / "folds.csv", ids).equals(a)
    with pytest.raises(FoldError, match="folds.csv: folds do not cover the training ids: 1 missing"):
        load_folds(tmp_path / "folds.csv", list(ids) + ["dog.99999"])
    broken = pd.concat([a, a.iloc[:1]])
    with pytest.raises(FoldError, match=r"id 'cat.0' has more than one fold"):
        validate_folds(broken)


@pytest.mark.parametrize("head", [LogisticHead(), KerasHead(epochs=5)], ids=["logistic", "keras"])
def test_oof_equals_cross_val_predict(real_features, head):
    X, y = real_features.train, real_features.label
    fold = make_folds(real_features.train_ids, y, 4)["fold"].to_numpy()
    ours = cross_fit(head, X, y, fold)
    ref = cross_val_predict(clone(head), X, y, cv=fold_cv(fold), method="predict_proba")[:, 1]
    np.testing.assert_allclose(ours.oof, ref, rtol=1e-6, atol=1e-7)
    assert len(ours.models) == 4
    refit = cross_fit(head, X, y, fold, test_mode="refit")
    assert len(refit.models) == 1
    np.testing.assert_allclose(refit.oof, ours.oof)


def test_heads_learn_cats_from_dogs(real_features):
    X, y = real_features.train.astype(np.float64), real_features.label
    fold = make_folds(real_features.train_ids, y, 4)["fold"].to_numpy()
    for head in (LogisticHead(), KerasHead(epochs=10)):
        oof = cross_fit(head, X, y, fold).oof
        assert ((oof > 0.5) == y).mean() > 0.93
        mean, scale, coef, b = linear_parts(head.fit(X, y))
        np.testing.assert_allclose(((X - mean) / scale) @ coef + b, _logit(head.predict_proba(X)[:, 1]),
                                   atol=1e-4)


def _logit(p):
    return np.log(p / (1 - p))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_keras_head_trains_as_keras_fit_does(real_features, n_classes):
    """train_dense is keras.Model.fit on the same layers: from the same initial weights, one
    batch of every row (so the order cannot matter) and no dropout, 15 steps of Keras' Adam with
    the L2 penalty give Keras' weights (binary sigmoid and K-way softmax)."""
    import keras

    from oof.heads import output_layer, train_dense

    X = real_features.train[:90].astype(np.float32)
    Z = (X - X.mean(0)) / X.std(0)
    target = (np.arange(90) % n_classes) if n_classes > 2 else real_features.label[:90].astype(np.float32)
    start = train_dense(Z, target, n_classes, 0.0, 0, 128, 1e-2, 0.01, 3)  # 0 epochs: the initial weights
    ours = train_dense(Z, target, n_classes, 0.0, 15, 128, 1e-2, 0.01, 3)
    units, activation, loss = output_layer(n_classes)
    dense = keras.layers.Dense(units, activation=activation, kernel_regularizer=keras.regularizers.L2(0.01))
    model = keras.Sequential([keras.Input((Z.shape[1],)), keras.layers.Dropout(0.0), dense])
    dense.set_weights(list(start))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    model.fit(Z, target, epochs=15, batch_size=128, verbose=0)
    for a, b in zip(ours, dense.get_weights()):
        assert not np.allclose(a, start[0] if a.ndim == 2 else start[1], atol=1e-3)  # it trained
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("estimator", [LogisticHead(), KerasHead(epochs=2)], ids=["logistic", "keras"])
def test_heads_pass_scikit_learn_estimator_checks(estimator):
    expected = {}
    if isinstance(estimator, KerasHead):
        expected = {"check_classifiers_train": "2 epochs (6 steps of Adam at 1e-3) on sklearn's 300 toy rows are too few to fit them"}
    check_estimator(estimator, expected_failed_checks=expected, on_fail="raise", on_skip=None)


@pytest.mark.parametrize("stacker", [AverageStacker(), LRStacker(), LGBMStacker(n_estimators=20)],
                         ids=["average", "stack-lr", "stack-lgbm"])
def test_stackers_keep_the_estimator_contract_on_probabilities(stacker):
    """check_estimator feeds arbitrary reals; stackers take probabilities, so check the contract here."""
    from sklearn.exceptions import NotFittedError

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    P = np.clip(y[:, None] * 0.6 + rng.uniform(0, 0.4, (300, 3)), 0, 1)
    assert clone(stacker).get_params() == stacker.get_params()
    with pytest.raises(NotFittedError):
        clone(stacker).predict_proba(P)
    fitted = clone(stacker)
    assert fitted.fit(P, y) is fitted
    fold = make_folds([f"cat.{i}" for i in range(300)], y, 3)["fold"].to_numpy()
    ref = cross_val_predict(clone(stacker), P, y, cv=fold_cv(fold), method="predict_proba")[:, 1]
    np.testing.assert_allclose(cross_fit(stacker, P, y, fold).oof, ref)
    assert ((ref > 0.5) == y).mean() > 0.95
    with pytest.raises(ValueError, match="Values above 1 in data passed to"):
        fitted.predict_proba(P + 1)
    with pytest.raises(ValueError, match="Negative values in data passed to"):
        clone(stacker).fit(P - 1, y)


class Memorizer(ClassifierMixin, BaseEstimator):
    """1-nearest-neighbour: perfect on rows it was fitted on, chance on unseen noise."""

    def fit(self, X, y):
        self.knn_ = KNeighborsClassifier(1).fit(X, y)
        self.classes_ = self.knn_.classes_
        return self

    def predict_proba(self, X):
        return self.knn_.predict_proba(X)


def test_level2_never_sees_its_own_fold():
    """Noise inputs with random labels: a leak would let the memorizer score perfectly."""
    rng = np.random.default_rng(0)
    level1 = rng.uniform(size=(600, 3))
    y = rng.integers(0, 2, 600)
    fold = make_folds([f"cat.{i}" for i in range(600)], y, 5)["fold"].to_numpy()
    oof = cross_fit(Memorizer(), level1, y, fold).oof
    accuracy = ((oof > 0.5) == y).mean()
    assert 0.4 < accuracy < 0.6
    leaky = Memorizer().fit(level1, y).predict_proba(level1)[:, 1]
    assert ((leaky > 0.5) == y).mean() == 1.0  # what a leak would have looked like


def test_stackers_beat_noise_on_real_level1(real_features):
    X, y = real_features.train, real_features.label
    fold = make_folds(real_features.train_ids, y, 4)["fold"].to_numpy()
    level1 = np.column_stack([cross_fit(h, X, y, fold).oof for h in (LogisticHead(C=0.1),
                                                                       LogisticHead(C=0.01))])
    for stacker in (AverageStacker(), LRStacker(), LGBMStacker(n_estimators=50, min_child_samples=10)):
        oof = cross_fit(stacker, level1, y, fold).oof
        assert ((oof > 0.5) == y).mean() > 0.9


def test_validate_oof_names_the_problem():
    with pytest.raises(PredictionError, match=r"x: 2 NaN predictions"):
        validate_oof([0.2, np.nan, np.nan], name="x")
    with pytest.raises(PredictionError, match=r"must lie in \[0, 1\]"):
        validate_oof([0.2, 1.3], name="x")
    with pytest.raises(PredictionError, match=r"3 predictions for 2 ids"):
        validate_oof([0.2, 0.3, 0.4], ids=["a", "b"], name="x")
