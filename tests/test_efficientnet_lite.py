"""EfficientNet-Lite built in code: the shared .keras files' networks, on any Keras 3."""

import json
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from features.efficientnet_lite import WeightsMismatch, efficientnet_lite
from features.model_files import load_keras_file
from features.models import build_gap_model
from features.registry import get_backbone
from tests.conftest import PHOTOS, WEIGHTS


def _photos(size):
    return np.stack([np.asarray(Image.open(PHOTOS / "train" / f"{name}.jpg").convert("RGB")
                                .resize((size, size)), dtype=np.float32) for name in ("cat.5", "dog.9")])


@pytest.mark.parametrize("variant,top", [(0, False), (1, False), (2, False), (2, True)])
def test_built_in_code_equals_the_saved_model(variant, top):
    """Same layers, same names, same outputs as Keras' own loading of the file (which this Keras can
    do; the Kaggle one cannot)."""
    file = WEIGHTS / f"efficientnet_lite{variant}_{'top' if top else 'notop'}.keras"
    saved = keras.saving.load_model(file, compile=False)
    ours = efficientnet_lite(variant, include_top=top, weights=file)
    assert [l.name for l in ours.layers] == [l.name for l in saved.layers]
    x = _photos(saved.input_shape[1])
    np.testing.assert_allclose(ours.predict_on_batch(x), saved.predict_on_batch(x), atol=1e-5, rtol=0)


def test_registry_entry_is_built_in_code_with_the_file_weights():
    entry = get_backbone("efficientnet_lite0")
    assert entry.constructor.endswith("EfficientNetLite0") and not entry.is_file
    gap = build_gap_model(entry)
    saved = keras.saving.load_model(WEIGHTS / entry.weights_file, compile=False)
    x = _photos(224)
    np.testing.assert_allclose(gap.predict_on_batch(x), saved.predict_on_batch(x).mean(axis=(1, 2)),
                               atol=1e-5, rtol=0)


def test_weights_of_another_variant_are_refused_with_the_file_named():
    with pytest.raises(WeightsMismatch, match=r"efficientnet_lite0_notop.keras: .*layers"):
        efficientnet_lite(2, weights=WEIGHTS / "efficientnet_lite0_notop.keras")
    with pytest.raises(ValueError, match=r"no Keras 'imagenet' download"):
        efficientnet_lite(0, weights="imagenet")


def test_a_file_from_a_newer_keras_gets_both_versions_and_what_to_do(tmp_path):
    """What a Kaggle user sees when their own .keras file was saved by a newer Keras."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    model.save(tmp_path / "mine.keras")
    newer = tmp_path / "newer.keras"
    with zipfile.ZipFile(tmp_path / "mine.keras") as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                config = json.loads(data)
                config["config"]["layers"][-1]["config"]["argument_from_the_future"] = 1
                data = json.dumps(config).encode()
            if item == "metadata.json":
                data = json.dumps({"keras_version": "99.1.0"}).encode()
            dst.writestr(item, data)
    with pytest.raises(ValueError) as err:
        load_keras_file(str(newer))
    message = str(err.value)
    assert str(newer) in message and "saved by Keras 99.1.0" in message
    assert f"this is Keras {keras.__version__}" in message and "pip install 'keras>=99.1.0'" in message
