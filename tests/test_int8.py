"""int8 features (features.quantize): their own recipe, calibrated on training photos only, close
to float32, and a saved int8 ensemble predicts with the very graph that made its features."""

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest

from features import quantize
from features.cache import StaleCacheError, load_features, read_attrs, read_int8_graph
from features.data import Photo, PhotoReader, load_photos
from features.extract import extract, load_batch
from features.quantize import agreement, calibration_sample
from features.registry import get_backbone
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
    # The graph's features are what its QDQ nodes say, whatever int8 kernels this CPU has: the
    # same as it computed unfused, in float arithmetic (on CPUs without VNNI, fused kernels saturate).
    test = [p for p in photos.test if p.id in set(a.test_ids)]
    pixels, _ = load_batch(PhotoReader(), test, get_backbone(LITE0), False)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    unfused = ort.InferenceSession(read_int8_graph(int8), options, providers=["CPUExecutionProvider"])
    by_id = dict(zip(a.test_ids, a.test))
    assert agreement(np.stack([by_id[p.id] for p in test]),
                     unfused.run(None, {"pixels": pixels})[0])["cosine"] > 0.9995
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
    once the machine's cached int8 graph is gone, and where quantizing could not run (a GPU
    machine, no tf2onnx) and the float weights are gone: the graph needs ONNX Runtime only. The
    web page's map has the int8 logit as its mean. The run calibrated on training photos only:
    every calibration image is a training photo's pixels, none a test photo's."""
    import hashlib

    from features import extract as extract_mod
    from features.data import PhotoReader
    from features.extract import load_batch
    from features.registry import get_backbone
    from stacking.cam import CamExplainer
    from stacking.ensemble import Ensemble

    monkeypatch.setattr(quantize, "ONNX_CACHE", tmp_path / "onnx")  # calibrate afresh
    calibrated = []
    real_quantize = extract_mod.quantize
    monkeypatch.setattr(extract_mod, "quantize",
                        lambda graph, pixels, *a: calibrated.append(pixels.copy()) or real_quantize(graph, pixels, *a))
    data = make_kaggle_dir(tmp_path / "data", 16, 6)
    out = tmp_path / "out"
    assert run_mod.main(["--data", str(data), "--backbones", LITE0, "--folds", "2", "--heads", "logistic",
                         "--no-concat", "--precision", "int8", "--cache", str(tmp_path / "cache"),
                         "--out", str(out)]) == 0
    photos_all = load_photos(data)

    def keys(pixels):
        return {hashlib.md5(np.ascontiguousarray(x).tobytes()).hexdigest() for x in pixels}

    backbone = get_backbone(LITE0)
    [seen] = calibrated
    assert len(seen) == min(quantize.INT8["photos"], len(photos_all.train))
    assert keys(seen) <= keys(load_batch(PhotoReader(), photos_all.train, backbone, False)[0])
    assert not keys(seen) & keys(load_batch(PhotoReader(), photos_all.test, backbone, False)[0])
    assert len(list((tmp_path / "onnx").glob("int8-*.onnx"))) == 1
    saved = out / "model" / "int8" / f"{LITE0}.onnx"
    [made] = (tmp_path / "cache").glob(f"*/gap_{LITE0}.h5")
    assert saved.read_bytes() == read_int8_graph(made)
    for cached in (tmp_path / "onnx").glob("int8-*.onnx"):
        cached.unlink()
    photos = [Photo(str(i), -1, str(data / "test" / f"{i}.jpg")) for i in range(1, 7)]
    model = "efficientnet_lite0/logistic"
    test = pd.read_csv(out / "test" / f"{model.replace('/', '__')}.csv", dtype={"id": str})
    expected = test.set_index("id").loc[[p.id for p in photos], "pred"]
    predicted, reasons = Predictor(out / "model").predict_all(photos)
    assert not any(reasons)
    np.testing.assert_allclose(predicted[model], expected, atol=1e-6)

    # The map: its mean is the logit of the int8 P(dog) shown beside it, not the float network's.
    explainer = CamExplainer(Ensemble.load(out / "model"), model=model)
    for photo, p in zip(photos[:2], predicted[model][:2]):
        explained = explainer.explain(photo, (64, 64))
        assert explained.logit == pytest.approx(float(np.log(p / (1 - p))), abs=1e-4)
        assert float(explained.logit_map.mean()) == pytest.approx(explained.logit, abs=1e-4)

    # Another machine: quantizing is impossible there (a GPU, or no tf2onnx), the float weights
    # are not at hand; the saved graph still runs on ONNX Runtime.
    monkeypatch.setattr(extract_mod, "onnx_available", lambda: False)
    elsewhere, reasons = Predictor(out / "model", weights=tmp_path / "no-weights-here").predict_all(photos)
    assert not any(reasons)
    np.testing.assert_allclose(elsewhere[model], expected, atol=1e-6)


def test_auto_precision_is_int8_only_where_it_pays(monkeypatch):
    """int8 from INT8_MIN_PHOTOS photos up on a CPU with int8 instructions, never with Keras as
    the runtime, never on a CPU without them (both CPUs stood in for, whatever this one is)."""
    from features import runtime

    enough = runtime.INT8_MIN_PHOTOS
    monkeypatch.setattr(runtime, "int8_dot_product", lambda: True)
    assert runtime.choose_precision("auto", enough) == "int8"
    assert runtime.choose_precision("auto", enough - 1) == "float32"
    assert runtime.choose_precision("auto", enough, runtime="keras") == "float32"
    assert runtime.choose_precision("int8", 10) == "int8"  # asked for: the caller checks it can run
    monkeypatch.setattr(runtime, "int8_dot_product", lambda: False)
    assert runtime.choose_precision("auto", 10 * enough) == "float32"
    assert runtime.choose_precision("float32", 10 * enough) == "float32"


def test_auto_keeps_any_cache_and_takes_int8_for_a_new_one(small_data, tmp_path, monkeypatch):
    """Where "auto" means int8, a cache made in float32 is reused as it is, never refused as
    stale; a new cache is made in int8. Where "auto" means float32 (another machine, no int8
    instructions or no tf2onnx), an int8 cache made earlier is reused as it is too."""
    from features import runtime

    monkeypatch.setattr(runtime, "INT8_MIN_PHOTOS", 10)  # small_data's 32 photos count as many
    monkeypatch.setattr(runtime, "int8_dot_product", lambda: True)
    photos = load_photos(small_data)
    made = extract(photos, LITE0, cache_dir=tmp_path / "old", progress=False, precision="float32")
    stamp = made.stat().st_mtime_ns
    assert read_attrs(extract(photos, LITE0, cache_dir=tmp_path / "old", progress=False))["precision"] == "float32"
    assert made.stat().st_mtime_ns == stamp
    fresh = extract(photos, LITE0, cache_dir=tmp_path / "new", progress=False)
    assert read_attrs(fresh)["precision"] == "int8"
    stamp = fresh.stat().st_mtime_ns
    monkeypatch.setattr(runtime, "int8_dot_product", lambda: False)
    assert extract(photos, LITE0, cache_dir=tmp_path / "new", progress=False) == fresh
    assert fresh.stat().st_mtime_ns == stamp and read_attrs(fresh)["precision"] == "int8"


def test_auto_settles_its_precision_under_the_lock(small_data, tmp_path, monkeypatch):
    """Another process is making the float32 cache while "auto" (int8 here) asks for it: auto
    waits for the lock, then takes the float32 cache it finds, instead of refusing it as stale."""
    import shutil
    import threading
    import time

    from features import runtime
    from features.cache import cache_path, extraction_lock

    monkeypatch.setattr(runtime, "INT8_MIN_PHOTOS", 10)
    monkeypatch.setattr(runtime, "int8_dot_product", lambda: True)
    photos = load_photos(small_data)
    elsewhere = extract(photos, LITE0, cache_dir=tmp_path / "elsewhere", progress=False, precision="float32")
    path = cache_path(tmp_path / "cache", LITE0, photos)
    path.parent.mkdir(parents=True)
    result = {}

    def auto():
        try:
            result["path"] = extract(photos, LITE0, cache_dir=tmp_path / "cache", progress=False)
        except Exception as exc:  # noqa: BLE001 (reported below)
            result["error"] = exc

    with extraction_lock(path):  # the other process, writing its float32 cache
        waiting = threading.Thread(target=auto)
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive()  # waiting for the lock
        shutil.copyfile(elsewhere, path)
    waiting.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["path"] == path and read_attrs(path)["precision"] == "float32"


def test_a_resumed_int8_extraction_never_mixes_two_graphs(small_data, tmp_path, monkeypatch):
    """The journal of an int8 extraction belongs to the graph that made its chunks: chunks from
    another quantized graph (same settings, another machine or ONNX Runtime) are not reused."""
    from features.cache import Journal, cache_path
    from features.extract import make_recipe
    from features.models import resolve_weights, weights_identity
    from features.registry import get_backbone

    monkeypatch.setattr(quantize, "ONNX_CACHE", tmp_path / "onnx")
    photos = load_photos(small_data)
    backbone = get_backbone(LITE0)
    recipe = make_recipe(backbone, weights_identity(resolve_weights(backbone)), photos, False, False, "int8")
    path = cache_path(tmp_path / "cache", LITE0, photos)
    path.parent.mkdir(parents=True)
    other = Journal(path.with_name(path.name + ".partial"), recipe, b"another quantized graph")
    chunk = photos.train[:8]
    other.save("train", 0, [p.id for p in chunk], np.full((8, backbone.feature_dim), 7.0, np.float32),
               np.ones(8, bool), [""] * 8)
    f = load_features(extract(photos, LITE0, cache_dir=tmp_path / "cache", progress=False, precision="int8",
                              chunk_size=8))
    assert not (f.train == 7.0).all(axis=1).any()  # the other graph's rows were not assembled
    assert Journal(tmp_path / "j", recipe, b"a").has("train", 0) is False
