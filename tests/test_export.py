"""Mobile export: the Lite0 model + head as TFLite, ONNX and Core ML, against stacking.predict."""

import json

import numpy as np
import pytest

from stacking.export import ExportError, Runner, export, pixels_of, sample_photos
from stacking.predict import Predictor
from tests.conftest import PHOTOS

HEAD = "efficientnet_lite0/logistic"
# Stated tolerances on P(dog) against the float32 Python model: (largest, mean) absolute difference.
# Quantisation moves photos near P = 0.5 most; on 500 unseen 200 px photos the largest moves were
# 0.009-0.012 (float16) and 0.23 (TFLite int8), the means 2.4e-4 and 0.009 (benchmarks/RESULTS.md).
TOLERANCE = {"none": (1e-4, 1e-5), "float16": (0.02, 1e-3), "int8": (0.3, 0.02)}


@pytest.fixture(scope="module")
def reference(runs):
    """50 real shared training photos, their pixels, and P(dog) of Lite0's head from stacking.predict's code."""
    model_dir = runs / "a" / "model"
    photos = sample_photos([PHOTOS], 50, offset=1)
    every, reasons = Predictor(model_dir).predict_all(photos)
    assert not any(reasons)
    return model_dir, pixels_of(photos, (224, 224)), every[HEAD]


@pytest.mark.parametrize("fmt,quantize", [("tflite", "none"), ("onnx", "none"), ("tflite", "int8"),
                                          ("onnx", "float16")])
def test_export_agrees_with_the_python_model(reference, tmp_path, fmt, quantize):
    model_dir, pixels, expected = reference
    out = tmp_path / f"lite0.{fmt}"
    info = export(model_dir, fmt, out, backbones=["efficientnet_lite0"], quantize=quantize,
                  data_dirs=[PHOTOS], check_photos=0)
    diff = np.abs(Runner(out)(pixels) - expected)
    largest, mean = TOLERANCE[quantize]
    assert diff.max() <= largest and diff.mean() <= mean, (diff.max(), diff.mean())
    sidecar = json.loads((tmp_path / f"lite0.{fmt}.json").read_text())
    assert sidecar == info
    assert sidecar["model"] == HEAD and sidecar["quantize"] == quantize
    assert sidecar["input"]["shape"] == [None, 224, 224, 3]
    assert sidecar["input"]["channel_order"] == "RGB" and sidecar["input"]["value_range"] == [0, 255]
    assert sidecar["output"]["name"] == "p_dog" and sidecar["bytes"] == out.stat().st_size


@pytest.mark.parametrize("fmt,use,backbones", [
    ("tflite", "efficientnet_lite2/imagenet", None),
    ("onnx", "mean of efficientnet_lite2/logistic, efficientnet_lite2/imagenet", ["efficientnet_lite2"])])
def test_export_with_the_imagenet_prior_agrees_with_the_python_model(runs, tmp_path, fmt, use, backbones):
    """The prior's classifier and log-probabilities go into the graph, alone and beside Lite2's
    head (one input size, so the Python model's pixels are the export's); the parity check
    against stacking.predict's code holds."""
    model_dir = runs / "a" / "model"
    assert "efficientnet_lite2/imagenet" in Predictor(model_dir).ensemble.level1
    info = export(model_dir, fmt, tmp_path / f"m.{fmt}", use=None if backbones else use,
                  backbones=backbones, data_dirs=[PHOTOS], check_photos=12)
    assert info["model"] == use
    assert info["parity"]["photos"] == 12 and info["parity"]["max_abs_diff_vs_python"] < 1e-4, info["parity"]


def test_coreml_package_has_the_stated_inputs_and_outputs(reference, tmp_path):
    model_dir = reference[0]
    out = tmp_path / "lite0.mlpackage"
    info = export(model_dir, "coreml", out, backbones=["efficientnet_lite0"], check_photos=0)
    assert (out / "Manifest.json").is_file()
    assert info["coreml_spec"] == {"inputs": [{"name": "pixels", "shape": [1, 224, 224, 3], "dtype": "float32"}],
                                   "outputs": [{"name": "p_dog", "shape": [1, 1], "dtype": "float32"}]}


def test_export_refusals_are_clear(reference, tmp_path):
    model_dir = reference[0]
    with pytest.raises(ExportError, match="stack-lgbm.*not linear|LGBMStacker is not linear"):
        export(model_dir, "onnx", tmp_path / "m.onnx", use="stack-lgbm", check_photos=0)
    with pytest.raises(ExportError, match="not in this ensemble"):
        export(model_dir, "onnx", tmp_path / "m.onnx", backbones=["resnet50"], check_photos=0)
    with pytest.raises(ExportError, match="should end in .tflite"):
        export(model_dir, "tflite", tmp_path / "m.onnx", check_photos=0)
    assert not list(tmp_path.iterdir())
