"""int8 features (features.quantize): their own recipe, calibrated on training photos only, close
to float32, and a saved int8 ensemble predicts with the very graph that made its features."""

import onnx
import numpy as np
import pandas as pd
import pytest

from features import quantize
from features.cache import StaleCacheError, load_features, read_attrs, read_int8_graph
from features.data import Photo, load_photos
from features.extract import extract
from features.quantize import agreement, calibration_sample
from stacking import run as run_mod
from stacking.predict import Predictor
from tests.conftest import cpu_path, make_kaggle_dir

LITE0 = "efficientnet_lite0"
pytestmark = cpu_path  # ONNX Runtime on a CPU is where int8 runs


def test_calibration_photos_are_a_seeded_sample_of_the_training_photos():
    train = [Photo(f"cat.{i}", 0, f"cat.{i}.jpg") for i in range(300)]
    settings = dict(quantize.INT8, photos=50)
    sample = calibration_sample(train, settings)
    assert len(sample) == 50 and len({p.id for p in sample}) == 50
    assert set(p.id for p in sample) <= {p.id for p in train}
    assert [p.id for p in calibration_sample(train[::-1], settings)] == [p.id for p in sample]  # order-free
    assert [p.id for p in calibration_sample(train, dict(settings, seed=1))] != [p.id for p in sample]
    assert len(calibration_sample(train[:20], settings)) == 20  # fewer photos than asked: all of them
    with pytest.raises(ValueError, match="calibrated on training photos, and there are none"):
        calibration_sample([], settings)


def test_int8_features_are_their_own_recipe_and_close_to_float32(small_data, tmp_path):
    photos = load_photos(small_data)
    int8 = extract(photos, LITE0, cache_dir=tmp_path / "int8", progress=False, precision="int8")
    full = extract(photos, LITE0, cache_dir=tmp_path / "float", progress=False, precision="float32")
    attrs = read_attrs(int8)
    assert attrs["precision"] == "int8" and attrs["runtime"] == "onnxruntime"
    assert attrs["quantization"] == quantize.describe() and read_attrs(full)["quantization"] == "none"
    assert attrs["int8_agreement"]["cosine"] > 0.98
    ops = {node.op_type for node in onnx.load_from_string(read_int8_graph(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    a, b = load_features(int8), load_features(full)
    assert list(a.train_ids) == list(b.train_ids) and list(a.test_ids) == list(b.test_ids)
    close = agreement(np.vstack([a.train, a.test]), np.vstack([b.train, b.test]))
    assert close["cosine"] > 0.98 and close["max_rel_diff"] > 1e-3  # quantized, and near float32
    with pytest.raises(StaleCacheError, match="precision: cache has 'int8', asked for 'float32'"):
        extract(photos, LITE0, cache_dir=tmp_path / "int8", progress=False, precision="float32")
    with pytest.raises(StaleCacheError, match="precision: cache has 'float32', asked for 'int8'"):
        extract(photos, LITE0, cache_dir=tmp_path / "float", progress=False, precision="int8")
    with pytest.raises(ValueError, match="cache has no int8 graph; its features were made in float32"):
        read_int8_graph(full)
    with pytest.raises(ValueError, match="--precision int8 runs on ONNX Runtime, not with --runtime keras"):
        extract(photos, LITE0, cache_dir=tmp_path / "k", progress=False, precision="int8", runtime="keras")


def test_saved_int8_ensemble_reproduces_the_run_without_the_graph_cache(tmp_path, monkeypatch):
    """stacking.predict predicts as the int8 run did, from the graph saved in model/int8/, even
    once the machine's cached int8 graph is gone; the run calibrated on training photos only."""
    monkeypatch.setattr(quantize, "ONNX_CACHE", tmp_path / "onnx")  # calibrate afresh
    seen = []
    monkeypatch.setattr("features.extract.calibration_sample",
                        lambda train: seen.extend(train) or calibration_sample(train))
    data = make_kaggle_dir(tmp_path / "data", 16, 6)
    out = tmp_path / "out"
    assert run_mod.main(["--data", str(data), "--backbones", LITE0, "--folds", "2", "--heads", "logistic",
                         "--no-concat", "--precision", "int8", "--cache", str(tmp_path / "cache"),
                         "--out", str(out)]) == 0
    assert seen and {p.id for p in seen} == {p.id for p in load_photos(data).train}  # no test photo
    assert len(list((tmp_path / "onnx").glob("int8-*.onnx"))) == 1
    saved = out / "model" / "int8" / f"{LITE0}.onnx"
    assert saved.read_bytes() == read_int8_graph(tmp_path / "cache" / f"gap_{LITE0}.h5")
    for cached in (tmp_path / "onnx").glob("int8-*.onnx"):
        cached.unlink()
    photos = [Photo(str(i), -1, str(data / "test" / f"{i}.jpg")) for i in range(1, 7)]
    predicted, reasons = Predictor(out / "model").predict_all(photos)
    assert not any(reasons)
    for model in ("efficientnet_lite0/logistic",):
        test = pd.read_csv(out / "test" / f"{model.replace('/', '__')}.csv", dtype={"id": str})
        np.testing.assert_allclose(predicted[model], test.set_index("id").loc[[p.id for p in photos], "pred"],
                                   atol=1e-6)


def test_auto_precision_is_int8_only_where_it_pays(monkeypatch):
    """On this CPU: int8 from INT8_MIN_PHOTOS photos up if it has int8 instructions, never with
    Keras as the runtime, never on a CPU without them."""
    from features import runtime

    enough = runtime.INT8_MIN_PHOTOS
    expected = "int8" if runtime.INT8_BY_DEFAULT and runtime.int8_dot_product() else "float32"
    assert runtime.choose_precision("auto", enough) == expected
    assert runtime.choose_precision("auto", enough - 1) == "float32"
    assert runtime.choose_precision("auto", enough, runtime="keras") == "float32"
    assert runtime.choose_precision("int8", 10) == "int8"  # asked for: the caller checks it can run
    monkeypatch.setattr(runtime, "int8_dot_product", lambda: False)
    assert runtime.choose_precision("auto", 10 * enough) == "float32"


def test_auto_keeps_a_float32_cache_and_takes_int8_for_a_new_one(small_data, tmp_path, monkeypatch):
    """Where "auto" now means int8, a cache made in float32 is reused as it is, never refused as
    stale; a new cache is made in int8 (on a CPU with int8 instructions)."""
    from features import runtime

    monkeypatch.setattr(runtime, "INT8_MIN_PHOTOS", 10)  # small_data's 32 photos count as many
    photos = load_photos(small_data)
    made = extract(photos, LITE0, cache_dir=tmp_path / "old", progress=False, precision="float32")
    stamp = made.stat().st_mtime_ns
    assert read_attrs(extract(photos, LITE0, cache_dir=tmp_path / "old", progress=False))["precision"] == "float32"
    assert made.stat().st_mtime_ns == stamp
    fresh = extract(photos, LITE0, cache_dir=tmp_path / "new", progress=False)
    assert read_attrs(fresh)["precision"] == ("int8" if runtime.int8_dot_product() else "float32")
