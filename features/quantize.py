"""int8 features: the float32 ONNX graph quantized statically with ONNX Runtime, for CPUs with int8
dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX), where extraction runs about twice as fast.

Static quantization fixes each activation's int8 range from calibration photos. They are drawn,
seeded, from the training photos only (never the test photos), decoded as extraction decodes them;
the ranges come from the 99.99th percentile of each tensor's values, which held the log loss where
min/max ranges lost it (benchmarks/RESULTS.md, "int8 features"). The quantized graph is cached per
machine, keyed by the float graph, the calibration pixels and these settings; a feature cache made
with it carries the graph itself, so a saved ensemble predicts with exactly the network that made
its training features.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from features.cache import atomic_write
from features.defaults import ONNX_CACHE, SEED
from features.runtime import int8_kernels_exact

log = logging.getLogger("gapstack")

# How the int8 graph is made; part of the feature cache's recipe (``describe``).
INT8 = {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8",
        "calibration": "percentile", "percentile": 99.99, "photos": 32, "seed": SEED,
        "collected": "photo by photo"}
# The EfficientNet-Lite backbones' int8 features agree with float32 at cosine 0.990-0.995 on their
# calibration photos, and their CV holds; a backbone under this is said to be worth checking.
INT8_MIN_COSINE = 0.98
# Photos per calibration call: ONNX Runtime's collector stacks its batches, so they must all be
# the same size. Its histograms are collected photo by photo ("CalibStridedMinMax" 1, which serves
# every calibrator): all photos at once held every intermediate tensor of all 32 photos, 3 GB
# for Lite0, three times what extraction needs.
CALIBRATION_BATCH = 1


def describe(settings: dict = INT8) -> str:
    """The settings in one line (the cache recipe's ``quantization`` entry)."""
    return (f"{settings['format']}, {settings['weights']} weights, {settings['activations']} activations, "
            f"{settings['calibration']} {settings['percentile']} ranges from at most {settings['photos']} "
            f"training photos (seed {settings['seed']}), collected {settings['collected']}")


def calibration_sample(train: list, settings: dict = INT8) -> list:
    """The calibration photos: ``settings['photos']`` training photos drawn with the seed from the
    photos sorted by id, so the same photos give the same sample in any order."""
    if not train:
        raise ValueError("int8 quantization is calibrated on training photos, and there are none")
    ordered = sorted(train, key=lambda p: p.id)
    pick = np.random.default_rng(settings["seed"]).choice(len(ordered), min(settings["photos"], len(ordered)),
                                                          replace=False)
    return [ordered[i] for i in sorted(pick)]


def quantize(float_graph: bytes, pixels: np.ndarray, settings: dict = INT8) -> bytes:
    """The int8 graph of ``float_graph`` (input "pixels"), calibrated on ``pixels``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        """The photos one batch at a time, over the range ONNX Runtime sets (``set_range``)."""

        def __init__(self):
            self.set_range(0, len(pixels))

        def __len__(self):
            return len(pixels)

        def set_range(self, start_index: int, end_index: int):
            self.left = iter(range(start_index, end_index, CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.left, None)
            return None if start is None else {"pixels": pixels[start:start + CALIBRATION_BATCH]}

    # ONNX Runtime prints its calibration's progress to stdout: kept out of our output.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        src, pre, out = (Path(tmp) / name for name in ("float.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(float_graph)
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": settings["percentile"],
                                       "CalibStridedMinMax": CALIBRATION_BATCH})
        return out.read_bytes()


def quantized_path(float_graph: bytes, pixels: np.ndarray, settings: dict = INT8,
                   folder: Path | None = None) -> Path:
    """Where the int8 graph of these inputs is cached: any change to one of them is another file."""
    import onnxruntime as ort

    digest = hashlib.md5(float_graph)
    digest.update(np.ascontiguousarray(pixels, np.float32).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode() + ort.__version__.encode())
    # The agreement kept beside the graph was measured with the kernels this CPU runs it with.
    digest.update(b"fused int8 kernels" if int8_kernels_exact() else b"QDQ run in float")
    return Path(folder or ONNX_CACHE) / f"int8-{digest.hexdigest()}.onnx"


def load_quantized(path: Path) -> tuple[bytes, dict] | None:
    """A cached int8 graph and its agreement with float32 (``save_quantized``), or None."""
    try:
        return path.read_bytes(), json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def save_quantized(path: Path, graph: bytes, agreed: dict) -> None:
    """Keep an int8 graph for the next run (calibration takes 13-23 s a backbone here); an
    unwritable cache only costs calibrating again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(agreed).encode()))
        atomic_write(path, lambda f: f.write(graph))
    except OSError as exc:
        log.info("could not keep the int8 graph in %s (%s)", path.parent, exc)


def agreement(int8: np.ndarray, reference: np.ndarray) -> dict:
    """How far int8 features are from float32 ones: mean cosine and largest relative difference."""
    cosine = np.sum(int8 * reference, 1) / np.maximum(
        np.linalg.norm(int8, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
    return {"cosine": round(float(cosine.mean()), 5),
            "max_rel_diff": round(float(np.abs(int8 - reference).max() / max(np.abs(reference).max(), 1e-12)), 4)}
