"""The ImageNet prior: cached class logits, the level-1 model, cleaning reading the cache."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import cross_val_predict

from features.cache import load_features, read_attrs
from features.data import PhotoReader, load_photos
from features.extract import extract
from features.images import load_for_backbone
from features.imagenet import CAT_CLASSES, DOG_CLASSES, load_top, softmax, top_weights
from features.registry import get_backbone
from oof.crossfit import cross_fit
from oof.folds import fold_cv, make_folds
from oof.prior import FEATURES, ImageNetPrior, prior_features
from tests.conftest import WEIGHTS

LITE2 = "efficientnet_lite2"


@pytest.fixture(scope="module")
def lite2_cache(tmp_path_factory):
    """Lite2 features of 24 real training and 8 test photos, made without the top, then the top
    added the way a later run adds it."""
    from tests.conftest import make_kaggle_dir

    data = make_kaggle_dir(tmp_path_factory.mktemp("prior") / "data", 12, 8, start=40)
    photos = load_photos(data)
    cache = data.parent / "cache"
    path = extract(photos, LITE2, cache_dir=cache, progress=False, imagenet=False)
    before = read_attrs(path)
    assert load_features(path).top is None
    assert extract(photos, LITE2, cache_dir=cache, progress=False) == path
    return photos, path, before


def test_cached_logits_are_the_top_models_and_features_unchanged(lite2_cache):
    """softmax(cached logits) equals the real efficientnet_lite2_top.keras on the same photos, the
    GAP features equal the notop model's, and adding the top re-extracted nothing."""
    import keras

    from features.models import build_gap_model

    photos, path, before = lite2_cache
    f = load_features(path)
    after = read_attrs(path)
    assert after["created"] == before["created"] and after["last_run"] == before["last_run"]
    assert f.train_logits.shape == (24, 1000) and f.test_logits.shape == (8, 1000)
    assert f.top.identity == after["imagenet_top"] and f.top.identity.startswith("md5:")
    reader = PhotoReader()
    train = {p.id: p for p in photos.train}
    chosen = [train[i] for i in f.train_ids[:6]]
    pixels = np.stack([load_for_backbone(reader.read(p), p.name, (260, 260), "area")
                       for p in chosen]).astype(np.float32)
    top_model = keras.saving.load_model(WEIGHTS / "efficientnet_lite2_top.keras", compile=False)
    probs = top_model.predict(pixels, verbose=0)
    np.testing.assert_allclose(softmax(f.train_logits[:6]), probs, atol=2e-5)
    assert (softmax(f.train_logits[:6]).argmax(1) == probs.argmax(1)).all()
    gap = build_gap_model(get_backbone(LITE2)).predict(pixels, verbose=0)
    np.testing.assert_allclose(f.train[:6], gap, atol=1e-4, rtol=1e-4)


def test_top_found_where_the_weights_are(tmp_path):
    lite0, lite2 = get_backbone("efficientnet_lite0"), get_backbone(LITE2)
    assert top_weights(lite2) == str(WEIGHTS / "efficientnet_lite2_top.keras")
    assert top_weights(lite2, str(WEIGHTS / "efficientnet_lite2_notop.keras")) == top_weights(lite2)
    assert top_weights(lite0) is None  # no efficientnet_lite0_top.keras in the shared weights
    assert top_weights(lite2, None) is None
    assert top_weights(get_backbone("resnet50"), "imagenet") == "imagenet"
    assert top_weights(get_backbone("convnext_tiny"), "imagenet") is None  # its top is not linear
    nested = tmp_path / "dataset" / "v1"
    nested.mkdir(parents=True)
    (nested / "efficientnet_lite2_top.keras").symlink_to(WEIGHTS / "efficientnet_lite2_top.keras")
    assert top_weights(lite2, tmp_path / "dataset") == str(nested / "efficientnet_lite2_top.keras")


@pytest.fixture(scope="module")
def prior_data(lite2_cache):
    f = load_features(lite2_cache[1])
    return f.top, f.train.astype(np.float64), f.label.astype(int)


@pytest.mark.parametrize("kind", FEATURES)
def test_prior_is_a_cross_fittable_estimator(prior_data, kind):
    top, X, y = prior_data
    fold = make_folds([str(i) for i in range(len(y))], y, 3)["fold"].to_numpy()
    model = ImageNetPrior(top, kind)
    ours = cross_fit(model, X, y, fold).oof
    theirs = cross_val_predict(clone(model), X, y, cv=fold_cv(fold), method="predict_proba")[:, 1]
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    assert ((ours > 0.5) == y).mean() >= 0.9  # the classifier knows cats from dogs


@pytest.mark.parametrize("kind", FEATURES)
def test_prior_gradient_matches_finite_differences(prior_data, kind):
    """What the CAM spreads over positions is the true gradient of the prior's logit."""
    top, X, y = prior_data
    model = ImageNetPrior(top, kind).fit(X, y)
    x = X[0]
    grad = model.feature_gradient(x)
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(size=x.shape) * 1e-2  # float32 logits: a smaller step is lost in rounding
        step = model.decision_function((x + d)[None])[0] - model.decision_function((x - d)[None])[0]
        assert step == pytest.approx(2 * grad @ d, rel=1e-2, abs=1e-6)


def test_prior_features_are_the_classifiers_log_probabilities(prior_data):
    top, X, _ = prior_data
    z = top.logits(X)
    p = softmax(z)
    masses = prior_features(z, "masses")
    np.testing.assert_allclose(np.exp(masses[:, 0]), p[:, DOG_CLASSES].sum(1), rtol=1e-6)
    np.testing.assert_allclose(np.exp(masses[:, 1]), p[:, CAT_CLASSES].sum(1), rtol=1e-6)
    ratio = prior_features(z, "ratio")[:, 0]
    np.testing.assert_allclose(ratio, masses[:, 0] - masses[:, 1], atol=1e-9)


def test_class_ranges_are_where_the_real_classifier_puts_real_cats_and_dogs(lite2_cache):
    """The dog-breed and cat class ranges, each checked on its own against Lite2's real ImageNet
    classifier on real labelled photos (not against a copy of themselves). Cat range (5 classes):
    moved by 1 to 5 classes with the dog range kept, the dog-vs-cat log-odds it gives score worse.
    Dog range (118 breeds): every dog photo's top class is in it and few cat photos' are; moved
    alone by 5 down or 10 up, dog photos fall out or cat photos come in. (Its upper edge borders
    ImageNet's wolves, which photos of dogs cannot tell apart from it by a few classes.)"""
    from features.imagenet import log_softmax

    f = load_features(lite2_cache[1])
    lp, dog = log_softmax(f.train_logits), f.label == 1
    top = f.train_logits.argmax(axis=1)

    def log_loss(cat_shift):
        z = (np.logaddexp.reduce(lp[:, DOG_CLASSES], axis=1)
             - np.logaddexp.reduce(lp[:, CAT_CLASSES + cat_shift], axis=1))
        return float(np.mean(np.logaddexp(0, np.where(dog, -z, z))))

    assert log_loss(0) < 0.6
    for shift in (-5, -3, -2, -1, 1, 2, 3, 5):
        assert log_loss(shift) > log_loss(0) + 0.01, shift

    def top_in_dog_range(shift, photos):
        return float(np.isin(top[photos], DOG_CLASSES + shift).mean())

    assert top_in_dog_range(0, dog) == 1.0 and top_in_dog_range(0, ~dog) <= 0.1
    for shift in (-10, -5, 10, 20):
        assert top_in_dog_range(shift, dog) < 1.0 or top_in_dog_range(shift, ~dog) > 0.1, shift


def _saved_pair(folder, name, top_layers):
    """``<name>_notop.keras`` (a small conv net: pixels -> feature map of 8 channels) and
    ``<name>_top.keras``, the same net with ``top_layers`` after its global average pool."""
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    pixels = keras.Input((32, 32, 3))
    fmap = keras.layers.Conv2D(8, 3, name="conv")(pixels)
    keras.Model(pixels, fmap).save(folder / f"{name}_notop.keras")
    x = keras.layers.GlobalAveragePooling2D()(fmap)
    for layer in top_layers:
        x = layer(x)
    full = keras.Model(pixels, x)
    full.save(folder / f"{name}_top.keras")
    return get_backbone(str(folder / f"{name}_notop.keras")), full


def test_load_top_takes_only_a_dense_on_the_gap(tmp_path, caplog, monkeypatch):
    """A saved model's top is read where it is GAP -> (Dropout) -> Dense(1000); a top that
    normalises the GAP first (as ConvNeXt's does) or does not give 1,000 classes gives no prior,
    with a warning that says why."""
    import logging

    import keras

    monkeypatch.setattr(logging.getLogger("gapstack"), "propagate", True)  # to caplog

    on_gap, full = _saved_pair(tmp_path / "a", "gapnet", [keras.layers.Dropout(0.2),
                                                          keras.layers.Dense(1000, activation="softmax")])
    top = load_top(on_gap)
    assert top is not None and top.kernel.shape == (8, 1000) and top.bias.shape == (1000,)
    kernel, bias = full.layers[-1].get_weights()
    np.testing.assert_array_equal(top.kernel, kernel)
    np.testing.assert_array_equal(top.bias, bias)
    normed, _ = _saved_pair(tmp_path / "b", "normnet", [keras.layers.LayerNormalization(),
                                                        keras.layers.Dense(1000, activation="softmax")])
    assert top_weights(normed) == str(tmp_path / "b" / "normnet_top.keras")  # found: the check is reached
    assert load_top(normed) is None
    assert "not a Dense layer on the global average pool (Dense after LayerNormalization)" in caplog.text
    few, _ = _saved_pair(tmp_path / "c", "fewnet", [keras.layers.Dense(10, activation="softmax")])
    assert load_top(few) is None
    assert "does not map 8 GAP features to 1000 ImageNet classes" in caplog.text


def test_clean_reads_the_cached_probabilities(lite2_cache, tmp_path, monkeypatch):
    """Cleaning takes the classifier's probabilities from the cache (no forward pass: the
    classifier cannot even be built) and they are those of its own pass."""
    from features import clean
    from oof.clean import clean as clean_photos

    photos, path, _ = lite2_cache
    model = WEIGHTS / "efficientnet_lite2_top.keras"
    gap, probs = clean.from_cache(photos, model, path.parent)
    own_table, own_gap, own_probs = clean.scan(photos.train + photos.test, model)
    np.testing.assert_allclose(probs, own_probs, atol=2e-5)
    np.testing.assert_allclose(gap, own_gap, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(clean, "imagenet_model", lambda *a: pytest.fail("ran the classifier again"))
    result = clean_photos([str(photos.sources[0])], tmp_path / "clean", model, cache=path.parent)
    assert len(result) == 24 and (tmp_path / "clean" / "scores.csv").is_file()
    assert clean.from_cache(photos, model, tmp_path) is None  # no cache there: its own pass
