"""Every registry entry checked against the real model it builds (timm's test_models pattern)."""

import numpy as np
import pytest
from PIL import Image

from features.model_files import WeightsNotFound
from features.models import build_gap_model, preprocess, resolve_weights
from features.registry import REGISTRY, get_backbone, list_backbones
from tests.conftest import PHOTOS, WEIGHTS


def _photo(size):
    img = Image.open(PHOTOS / "train" / "cat.5.jpg").convert("RGB").resize(size[::-1])
    return np.asarray(img, dtype=np.float32)[None]


@pytest.mark.parametrize("name", list_backbones())
def test_entry_matches_the_model(name):
    entry = get_backbone(name)
    weights = None if entry.weights == "imagenet" else "default"  # no imagenet download here
    model = build_gap_model(entry, weights)
    assert tuple(model.input_shape[1:3]) == entry.input_size
    out = np.asarray(model(_photo(entry.input_size), training=False))  # eager: no graph traced
    assert out.shape == (1, entry.feature_dim)
    assert np.isfinite(out).all()


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"Unknown backbone 'resnet5'; available: .*resnet50"):
        get_backbone("resnet5")


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocess_equals_keras_applications(mode):
    from keras.applications import imagenet_utils

    x = _photo((32, 32))
    ours = np.asarray(preprocess(x, mode))
    theirs = imagenet_utils.preprocess_input(x.copy(), mode=mode)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_weights_from_file_or_folder(tmp_path):
    entry = get_backbone("efficientnet_lite0")
    file = WEIGHTS / entry.weights_file
    assert resolve_weights(entry, WEIGHTS) == str(file)
    assert resolve_weights(entry, str(file)) == str(file)
    nested = tmp_path / "kaggle-dataset"
    (nested / "v1").mkdir(parents=True)
    (nested / "v1" / entry.weights_file).symlink_to(file)
    assert resolve_weights(entry, nested) == str(nested / "v1" / entry.weights_file)
    with pytest.raises(WeightsNotFound, match=r"no efficientnet_lite0_notop.keras"):
        resolve_weights(entry, tmp_path / "kaggle-dataset" / "v1" / ".." / "..")
    with pytest.raises(ValueError, match=r"no Keras 'imagenet' download"):
        resolve_weights(entry, "imagenet")
    with pytest.raises(ValueError, match=r"cannot be built without its weights"):
        resolve_weights(get_backbone(str(file)), None)


def test_keras_application_loads_a_local_weights_folder(tmp_path):
    """A Kaggle user attaches the Keras release files as a dataset: the folder form must load them."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    entry = get_backbone("efficientnetv2_b0")
    source = build_gap_model(entry, None)
    base = source.layers[-2]  # the application inside our pixels -> preprocess -> base -> GAP model
    with h5py.File(tmp_path / entry.weights_file, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)
    loaded = build_gap_model(entry, tmp_path)
    x = _photo(entry.input_size)
    np.testing.assert_allclose(loaded.predict_on_batch(x), source.predict_on_batch(x), atol=1e-5)
    fresh = build_gap_model(entry, None)
    assert not np.allclose(fresh.predict_on_batch(x), source.predict_on_batch(x), atol=1e-3)


def test_any_saved_keras_file_is_a_backbone():
    entry = get_backbone(str(WEIGHTS / "efficientnet_lite1_notop.keras"))
    assert entry.input_size == (240, 240) and entry.feature_dim == 1280 and entry.is_file
    assert entry.input_size == REGISTRY["efficientnet_lite1"].input_size
