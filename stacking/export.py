"""Export the photo-to-P(dog) model (K classes: to K class probabilities) for phones and edge
devices: TFLite, ONNX or Core ML.

    python -m stacking.export --model OUT/model --format tflite|onnx|coreml --out FILE
                              [--use MODEL | --backbones NAME ...] [--quantize none|float16|int8]

One graph: RGB pixels (N, H, W, 3) float32 0..255 at the backbone's size -> the backbone(s), their
GAP, the fold heads and ImageNet priors (averaged in probability, as the run averages them), the
linear level-2 model and the clip -> P(dog) (N, 1), or with K > 2 classes every class's probability
(N, K), output ``probabilities``, the classes' order in the JSON. A JSON file beside it states the
input and output; the export is checked against the Python model on real photos and the result
goes into that JSON too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from features import __version__
from features.data import Photo, PhotoReader, load_photos
from features.defaults import default_data_dirs
from features.extract import setup_logging
from features.images import load_for_backbone
from features.models import build_gap_model
from features.registry import Backbone
from features.runtime import run_int8_exactly
from oof.crossfit import CrossFit
from oof.heads import linear_parts
from features.imagenet import CATS, DOGS
from oof.prior import PETS, ImageNetPrior
from stacking.ensemble import CONCAT, Ensemble
from stacking.stackers import LOGIT_EPS, AverageStacker, LRStacker, PooledSoftmax

log = logging.getLogger("gapstack")

FORMATS = ("tflite", "onnx", "coreml")
QUANTIZE = ("none", "float16", "int8")
CALIBRATION_PHOTOS = 100  # int8 calibration: training photos, spread over the set
SUFFIX = {"tflite": ".tflite", "onnx": ".onnx", "coreml": ".mlpackage"}


class ExportError(ValueError):
    """The requested model cannot be exported as asked; the message says why."""


def _dense(x, weights: np.ndarray, biases: np.ndarray, name: str):
    """A frozen Dense layer holding fitted coefficients (weights, not graph constants, so every
    converter sees an ordinary layer)."""
    import keras

    layer = keras.layers.Dense(weights.shape[1], name=name, trainable=False)
    out = layer(x)
    layer.set_weights([weights.astype(np.float32), biases.astype(np.float32)])
    return out


def _level1_head(feats: dict, ensemble: Ensemble, h: str):
    """A level-1 model's P(dog) column (K classes: its K columns): its fold models on its
    backbone's features, or, for a fine-tuned model, each fold's head on its own fold network's
    features, averaged."""
    from keras import ops

    cf, name = ensemble.level1[h], "head_" + h.replace("/", "_")
    if not cf.inputs:
        return _fold_head(feats[ensemble.backbone_of(h)], cf, name)
    parts = [_fold_head(feats[i], CrossFit(cf.oof, [m]), f"{name}_{k}")
             for k, (m, i) in enumerate(zip(cf.models, cf.inputs))]
    return ops.mean(ops.stack(parts, axis=1), axis=1)


def _fold_head(features, cf: CrossFit, name: str):
    """Mean over folds of sigmoid(linear head) (K classes: of softmax(its K logits)), on the GAP
    features."""
    from keras import ops

    if isinstance(cf.models[0], ImageNetPrior):
        return _prior_head(features, cf, name)
    weights, biases = [], []
    for m in cf.models:
        mean, scale, coef, b = linear_parts(m)
        coef = np.asarray(coef, np.float64)
        w = coef / np.asarray(scale, np.float64).reshape(-1, *[1] * (coef.ndim - 1))
        weights.append(w.reshape(len(w), -1))
        biases.append(np.asarray(b, np.float64).reshape(-1) - np.asarray(mean, np.float64) @ weights[-1])
    z = _dense(features, np.concatenate(weights, axis=1), np.concatenate(biases), name)
    if cf.n_classes == 2:
        return ops.mean(ops.sigmoid(z), axis=-1, keepdims=True)
    return ops.mean(ops.softmax(ops.reshape(z, (-1, len(cf.models), cf.n_classes)), axis=-1), axis=1)


def _prior_head(features, cf: CrossFit, name: str):
    """An ImageNet prior in the graph: the backbone's classifier (one Dense, shared by the folds),
    the log-probabilities the prior reads (``oof.prior.prior_features``, as ops), then each fold's
    logistic regression; mean over folds of the sigmoid."""
    from keras import ops

    top = cf.models[0].top
    if any(m.top is not top and not np.array_equal(m.top.kernel, top.kernel) for m in cf.models):
        raise ExportError(f"{name}: the fold models hold different ImageNet classifiers")
    z = _dense(features, top.kernel, top.bias, f"{name}_classifier")
    dog = ops.logsumexp(z[:, DOGS.start:DOGS.stop], axis=-1, keepdims=True)
    cat = ops.logsumexp(z[:, CATS.start:CATS.stop], axis=-1, keepdims=True)
    kind = cf.models[0].features
    if kind == "ratio":
        inputs = dog - cat
    elif kind == "masses":
        every = ops.logsumexp(z, axis=-1, keepdims=True)
        inputs = ops.concatenate([dog - every, cat - every], axis=-1)
    else:
        every = ops.logsumexp(z, axis=-1, keepdims=True)
        inputs = ops.take(z, PETS, axis=-1) - every
    parts = [m.linear_on_features() for m in cf.models]
    out = _dense(inputs, np.stack([w for w, _ in parts], axis=1), np.array([b for _, b in parts]), name)
    return ops.mean(ops.sigmoid(out), axis=-1, keepdims=True)


def _mean_of_models(columns, n_classes: int):
    """The plain mean of level-1 columns: (N, M) P(dog), or (N, M * K) model by model."""
    from keras import ops

    if n_classes == 2:
        return ops.mean(columns, axis=-1, keepdims=True)
    return ops.mean(ops.reshape(columns, (-1, columns.shape[-1] // n_classes, n_classes)), axis=1)


def _stack(columns, cf: CrossFit):
    """A linear level-2 CrossFit over level-1 P(dog) columns (N, J) (K classes: (N, J * K) class
    probabilities, on their logarithms)."""
    from keras import ops

    model, k = cf.models[0], cf.n_classes
    if isinstance(model, AverageStacker):
        mean = _mean_of_models(columns, k)
        if k == 2:
            return ops.clip(mean, LOGIT_EPS, 1 - LOGIT_EPS)
        mean = ops.clip(mean, LOGIT_EPS, 1.0)
        return mean / ops.sum(mean, axis=-1, keepdims=True)
    if not isinstance(model, LRStacker):
        raise ExportError(f"{type(model).__name__} is not linear in its inputs and has no graph "
                          "form here; export a linear model (--use stack-lr, average or a "
                          "backbone head) or pick --backbones")
    if k == 2:
        p = ops.clip(columns, LOGIT_EPS, 1 - LOGIT_EPS)
        W = np.stack([m.model_.coef_[0] for m in cf.models], axis=1)
        c = np.array([m.model_.intercept_[0] for m in cf.models])
        z = _dense(ops.log(p / (1 - p)), W, c, "level2")
        return ops.mean(ops.sigmoid(z), axis=-1, keepdims=True)
    parts = [_class_weights(m.model_, columns.shape[-1], k) for m in cf.models]
    z = _dense(ops.log(ops.clip(columns, LOGIT_EPS, 1.0)), np.concatenate([w for w, _ in parts], axis=1),
               np.concatenate([b for _, b in parts]), "level2")
    return ops.mean(ops.softmax(ops.reshape(z, (-1, len(parts), k)), axis=-1), axis=1)


def _class_weights(model, n_inputs: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A K-class linear stacker as (W (M * K, K), b (K,)): class logits = log P @ W + b. The pooled
    form (a weight per model, ``PooledSoftmax``) is the block matrix w_m * identity."""
    if isinstance(model, PooledSoftmax):
        return np.kron(model.coef_[:, None], np.eye(k)), model.intercept_
    return model.coef_.T, model.intercept_


def photo_model(ensemble: Ensemble, use: str | None = None, backbones: list[str] | None = None,
                weights: str | None = None):
    """(Keras model pixels -> P(dog) (K classes: their probabilities), description). ``backbones``:
    only these backbones' level-1 heads, averaged; otherwise the model ``use`` (default: the
    submitted one)."""
    import keras
    from keras import ops

    task = ensemble.task
    all_names = [b["name"] for b in ensemble.backbones]
    if backbones:
        unknown = sorted(set(backbones) - set(all_names))
        if unknown:
            raise ExportError(f"backbone(s) {', '.join(unknown)} not in this ensemble ({', '.join(all_names)})")
        heads = [n for n in ensemble.level1 if ensemble.backbone_of(n) in backbones]
        use = heads[0] if len(heads) == 1 else f"mean of {', '.join(heads)}"
    else:
        use = use or ensemble.submit_with
        if use not in ensemble.model_names:
            raise ExportError(f"no model '{use}' in this ensemble; it has {', '.join(ensemble.model_names)}")
        if use in ensemble.level1:
            heads, backbones = [use], []
        elif use == CONCAT:
            heads, backbones = [], [b["name"] for b in ensemble.feature_backbones]
        else:
            heads, backbones = list(ensemble.level1), []
    # What each head reads: its backbone's features, or (fine-tuned) its fold networks' own.
    backbones = [*backbones, *(i for h in heads
                               for i in ensemble.level1[h].inputs or [ensemble.backbone_of(h)])]
    entries = {b["name"]: b for b in ensemble.backbones if b["name"] in backbones}
    sizes = {n: tuple(e["entry"]["input_size"]) for n, e in entries.items()}
    height, width = max(sizes.values())
    # The photo is resized as the largest backbone's entry says (the pipeline's rule for it).
    method = next(e["entry"].get("resize", "area") for n, e in entries.items() if sizes[n] == (height, width))
    pixels = keras.Input((height, width, 3), dtype="float32", name="pixels")
    feats = {}
    for name, b in entries.items():
        x = pixels
        if sizes[name] != (height, width):  # one input for all: smaller backbones resize in-graph
            x = keras.layers.Resizing(*sizes[name], interpolation="bilinear", name=f"resize_{name}")(x)
        gap = build_gap_model(Backbone(**b["entry"]), ensemble.weights_for(b, weights))
        f = gap(x)
        if b.get("tta"):
            f = (f + gap(ops.flip(x, axis=2))) / 2
        feats[name] = f
    if use == CONCAT:
        p = _fold_head(ops.concatenate([feats[b["name"]] for b in ensemble.feature_backbones], axis=-1),
                       ensemble.concat, "concat_head")
    else:
        columns = ops.concatenate([_level1_head(feats, ensemble, h) for h in heads], axis=-1)
        if use in ensemble.level2:
            p = _stack(columns, ensemble.level2[use])
        else:
            p = _mean_of_models(columns, task.n_classes)
    if ensemble.clip:
        p = ops.clip(p, *ensemble.clip)
        if not task.binary:  # clipped, then renormalised, as the submission is
            p = p / ops.sum(p, axis=-1, keepdims=True)
    output = output_name(task)
    model = keras.Model(pixels, p, name=output)
    if task.binary:
        meaning = ("P(dog): probability that the photo shows a dog" if task.cats_and_dogs
                   else f"P({task.classes[1]}): probability of class '{task.classes[1]}' (the other: '{task.classes[0]}')")
        out = {"name": output, "shape": [None, 1], "dtype": "float32", "meaning": meaning}
    else:
        out = {"name": output, "shape": [None, task.n_classes], "dtype": "float32",
               "meaning": "each class's probability, in the order of 'classes'; rows sum to 1",
               "classes": list(task.classes)}
    description = {
        "model": use, "backbones": list(entries), "clip": ensemble.clip,
        "input": {"name": "pixels", "shape": [None, height, width, 3], "dtype": "float32",
                  "layout": "NHWC", "channel_order": "RGB", "value_range": [0, 255],
                  "resize": f"stretch the whole photo to {height}x{width} (no crop), {method} "
                            "interpolation (OpenCV; area falls back to bilinear when enlarging)",
                  "resize_method": method,
                  "preprocessing": "inside the graph: feed raw pixels"},
        "output": out,
    }
    if len(set(sizes.values())) > 1:
        description["note"] = ("backbones of several input sizes share one input; the smaller ones "
                               "resize it bilinearly in the graph, where Python resizes each from the photo")
    return model, description


def output_name(task) -> str:
    """The graph's output: ``p_dog`` for two classes (P(classes[1]), the name phone apps already
    read), ``probabilities`` for K."""
    return "p_dog" if task.binary else "probabilities"


def sample_photos(data_dirs=None, n: int = CALIBRATION_PHOTOS, offset: int = 0,
                  classes: tuple[str, ...] | None = None) -> list[Photo]:
    """``n`` training photos spread over the set (every k-th, starting at ``offset``: calibration
    takes offset 0, the parity check offset 1, so they never share a photo). ``classes``: the
    model's, which the photos' labels must index the same way."""
    dirs = data_dirs or default_data_dirs()
    found = load_photos(dirs, require_test=False)
    if classes is not None and tuple(found.task.classes) != tuple(classes):
        raise ExportError(f"{', '.join(map(str, dirs))}: photos of classes {', '.join(found.task.classes[:6])}, "
                          f"but the model's are {', '.join(classes[:6])}; pass --data with the "
                          "photos it was trained on (int8 calibration and the parity check use them)")
    photos = found.train
    step = max(2, len(photos) // n)
    return photos[offset::step][:n]


def pixels_of(photos: list[Photo], size: tuple[int, int], method: str = "area") -> np.ndarray:
    """Photos decoded and resized as the pipeline does it, float32 0..255."""
    reader = PhotoReader()
    return np.stack([load_for_backbone(reader.read(p), p.name, size, method).astype(np.float32)
                     for p in photos])


def _frozen_function(model):
    """The model as a TensorFlow concrete function with its weights as constants (batch 1), its
    output named as the model is (``output_name``): TFLite reads resource variables as
    uninitialised (NaN outputs) otherwise."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    @tf.autograph.experimental.do_not_convert
    def serve(pixels):
        return {model.name: model(pixels, training=False)}

    spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32, name="pixels")
    return convert_variables_to_constants_v2(tf.function(serve).get_concrete_function(spec))


def to_tflite(model, quantize: str, calibration: np.ndarray | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([_frozen_function(model)])
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
    return converter.convert()


def to_onnx_file(model, quantize: str, calibration: np.ndarray | None, out: Path) -> None:
    from features.runtime import to_onnx

    proto = to_onnx(model, output_name=model.name)
    if quantize == "float16":
        from onnxconverter_common import float16

        proto = float16.convert_float_to_float16(proto, keep_io_types=True)
    if quantize != "int8":
        out.write_bytes(proto.SerializeToString())
        return
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(calibration[i:i + 1] for i in range(len(calibration)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"pixels": row}

    tmp = out.with_name(out.name + ".float32.onnx")
    tmp.write_bytes(proto.SerializeToString())
    try:
        # Per-channel weights: EfficientNet's depthwise kernels differ too much per channel for
        # one scale (per-tensor gave P(dog) errors up to 0.2 on shared photos).
        quantize_static(str(tmp), str(out), Reader(), weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, per_channel=True)
    finally:
        tmp.unlink(missing_ok=True)


def to_coreml(model, quantize: str, out: Path) -> dict:
    """Save an .mlpackage; returns its spec's inputs and outputs (Core ML cannot run on Linux)."""
    import coremltools as ct

    fn = _frozen_function(model)
    precision = ct.precision.FLOAT16 if quantize == "float16" else ct.precision.FLOAT32
    mlmodel = ct.convert([fn], source="tensorflow", convert_to="mlprogram", compute_precision=precision,
                         inputs=[ct.TensorType(name="pixels", shape=(1, *model.input_shape[1:]))],
                         minimum_deployment_target=ct.target.iOS16)
    if quantize == "int8":  # weights only: Core ML has no activation calibration from here
        config = ct.optimize.coreml.OptimizationConfig(
            global_config=ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric"))
        mlmodel = ct.optimize.coreml.linear_quantize_weights(mlmodel, config)
    mlspec = mlmodel.get_spec()
    if mlspec.description.output[0].name != model.name:
        ct.utils.rename_feature(mlspec, mlspec.description.output[0].name, model.name)
        mlmodel = ct.models.MLModel(mlspec, weights_dir=mlmodel.weights_dir)
    mlmodel.short_description = (f"{'P(dog)' if model.name == 'p_dog' else 'class probabilities'} "
                                 "for one RGB photo, float32 0..255 (gapstack)")
    mlmodel.save(str(out))
    spec = mlmodel.get_spec()
    return {"inputs": [_coreml_feature(f) for f in spec.description.input],
            "outputs": [_coreml_feature(f) for f in spec.description.output]}


def _coreml_feature(f) -> dict:
    return {"name": f.name, "shape": list(f.type.multiArrayType.shape),
            "dtype": {65568: "float32", 65552: "float16"}.get(f.type.multiArrayType.dataType,
                                                              str(f.type.multiArrayType.dataType))}


class Runner:
    """Runs an exported TFLite or ONNX file on one photo at a time (as a phone would)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if self.path.suffix == ".tflite":
            from ai_edge_litert.interpreter import Interpreter

            self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]["index"]
            self.output = self.interpreter.get_output_details()[0]["index"]
            self.session = None
        elif self.path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            run_int8_exactly(options, self.path.read_bytes())
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        else:
            raise ExportError(f"{self.path}: only .tflite and .onnx files run here (Core ML needs Apple hardware)")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """P(dog) per photo (N,) (K classes: (N, K)) for (N, H, W, 3) float32 pixels."""
        out = []
        for row in np.asarray(pixels, np.float32):
            if self.session is not None:
                out.append(self.session.run(None, {"pixels": row[None]})[0].reshape(-1))
            else:
                self.interpreter.set_tensor(self.input, row[None])
                self.interpreter.invoke()
                out.append(self.interpreter.get_tensor(self.output).reshape(-1))
        out = np.array(out, dtype=np.float64)
        return out[:, 0] if out.shape[1] == 1 else out


def export(model_dir: str | Path, fmt: str, out: str | Path, use: str | None = None,
           backbones: list[str] | None = None, quantize: str = "none", weights: str | None = None,
           data_dirs=None, check_photos: int = 50) -> dict:
    """Write the file and its JSON; returns the JSON's content (with the parity check)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    out = Path(out)
    if out.suffix != SUFFIX[fmt]:
        raise ExportError(f"{out}: a {fmt} file should end in {SUFFIX[fmt]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    ensemble = Ensemble.load(model_dir)
    if any(b.get("precision") == "int8" for b in ensemble.backbones):
        log.warning("%s: this ensemble's heads were trained on int8 features (ONNX Runtime); the "
                    "export runs the float32 network%s, so its P(dog) differs a little from "
                    "stacking.predict's: the parity check in %s.json says how much", model_dir,
                    " quantized its own way" if quantize == "int8" else "", out)
    model, info = photo_model(ensemble, use, backbones, weights)
    size, method = tuple(info["input"]["shape"][1:3]), info["input"]["resize_method"]
    classes = ensemble.task.classes
    if data_dirs is None and not ensemble.task.cats_and_dogs and (quantize == "int8" or (fmt != "coreml" and check_photos)):
        raise ExportError(f"this model's classes ({', '.join(classes[:6])}) are not Dogs vs. Cats: pass "
                          "--data with its photos (int8 calibration and the parity check use them), "
                          "or --check-photos 0")
    calibration = pixels_of(sample_photos(data_dirs, classes=classes), size, method) if quantize == "int8" else None
    started = time.perf_counter()
    if fmt == "tflite":
        out.write_bytes(to_tflite(model, quantize, calibration))
    elif fmt == "onnx":
        to_onnx_file(model, quantize, calibration, out)
    else:
        info["coreml_spec"] = to_coreml(model, quantize, out)
    info.update(format=fmt, quantize=quantize, file=out.name, bytes=_size(out),
                export_seconds=round(time.perf_counter() - started, 1), gapstack_version=__version__,
                made_from=str(Path(model_dir).resolve()))
    if fmt != "coreml" and check_photos:
        info["parity"] = parity(out, model_dir, info, data_dirs, check_photos, weights)
    Path(str(out) + ".json").write_text(json.dumps(info, indent=2))
    return info


def parity(path: Path, model_dir, info: dict, data_dirs, n: int, weights=None) -> dict:
    """The exported file against the Python model (``stacking.predict``'s code) on ``n`` real
    training photos that int8 calibration did not see; and its single-photo latency."""
    from stacking.predict import Predictor
    from stacking.submission import clip, scores

    predictor = Predictor(model_dir, weights)
    photos = sample_photos(data_dirs, n, offset=1, classes=predictor.ensemble.task.classes)
    every, reasons = predictor.predict_all(photos)
    if info["model"] in every:
        reference = every[info["model"]]
    else:  # --backbones: the mean of those backbones' level-1 heads
        reference = np.mean([every[h] for h in predictor.ensemble.level1
                             if predictor.ensemble.backbone_of(h) in info["backbones"]], axis=0)
    reference = clip(reference, predictor.ensemble.clip)
    runner = Runner(path)
    pixels = pixels_of(photos, tuple(info["input"]["shape"][1:3]), info["input"]["resize_method"])
    got = runner(pixels)
    ok = ~np.isnan(reference.reshape(len(reference), -1)).any(axis=1)  # readable photos
    runner(pixels[:2])  # warm-up
    started = time.perf_counter()
    runner(pixels[:20])
    labels = np.array([p.label for p in photos])[ok]
    return {"photos": int(ok.sum()), "max_abs_diff_vs_python": float(np.abs(got - reference)[ok].max()),
            "mean_abs_diff_vs_python": float(np.abs(got - reference)[ok].mean()),
            "log_loss_python": scores(labels, reference[ok])["log_loss"],
            "log_loss_export": scores(labels, got[ok])["log_loss"],
            "latency_ms_per_photo": round((time.perf_counter() - started) / 20 * 1000, 1)}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacking.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model/ folder a stacking.run wrote")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file (.tflite, .onnx or .mlpackage)")
    parser.add_argument("--use", default=None, help="which model of the ensemble (default: the submitted one)")
    parser.add_argument("--backbones", nargs="+", default=None,
                        help="export only these backbones with their level-1 heads (averaged)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none")
    parser.add_argument("--data", nargs="+", default=None,
                        help="photos for int8 calibration and the parity check (default: the shared sample)")
    parser.add_argument("--check-photos", type=int, default=50,
                        help="training photos for the parity check against the Python model (0: none)")
    parser.add_argument("--weights", default=None, help="weights file or folder, if they have moved")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        info = export(args.model, args.format, args.out, args.use, args.backbones, args.quantize,
                      args.weights, args.data, args.check_photos)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("file", "bytes", "model", "quantize", "parity") if k in info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
