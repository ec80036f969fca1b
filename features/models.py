"""Build a registered backbone as a Keras model that takes raw RGB pixels (0..255).

Preprocessing lives inside the graph, so the same model serves extraction, the web page and
mobile export, and nobody can feed it the wrong normalisation.
"""

from __future__ import annotations

import hashlib
import importlib
from contextlib import contextmanager
from pathlib import Path

from features.defaults import default_weights_dir
from features.model_files import WeightsNotFound, load_keras_file
from features.registry import Backbone

# ImageNet statistics used by the "caffe" and "torch" modes (as in keras.applications).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocess(x, mode: str):
    """Normalise float RGB pixels 0..255 the way a backbone was trained (Keras ops, any backend)."""
    from keras import ops

    if mode == "none":
        return x
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - ops.convert_to_tensor(_TORCH_MEAN)) / ops.convert_to_tensor(_TORCH_STD)
    if mode == "caffe":
        return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR)
    raise ValueError(f"Expected preprocess mode to be one of caffe, tf, torch or none. Received: {mode!r}")


def resolve_weights(backbone: Backbone, weights: str | Path | None = "default") -> str | None:
    """Turn a weights request into what the constructor or loader takes.

    "default": the entry's default ("imagenet", or its file in the default weights folder);
    None: random initialisation (Keras applications only); "imagenet": Keras' download;
    a file: that file; a folder: the entry's ``weights_file`` inside it (or one level down,
    as Kaggle datasets nest their files).
    """
    if weights == "default":
        weights = backbone.weights
        if weights != "imagenet" and not Path(weights).is_absolute():
            weights = default_weights_dir() / weights
    if weights is None:
        if backbone.is_file:
            raise ValueError(f"Backbone '{backbone.name}' is a saved model file; it cannot be built "
                             "without its weights")
        return None
    if weights == "imagenet":
        if backbone.weights != "imagenet":
            raise ValueError(f"Backbone '{backbone.name}' has no Keras 'imagenet' download; pass its "
                             f"file ({backbone.weights_file}) or a folder holding it")
        return "imagenet"
    path = Path(weights)
    if path.is_dir():
        for candidate in [path / backbone.weights_file, *path.glob(f"*/{backbone.weights_file}")]:
            if candidate.is_file():
                return str(candidate)
        raise WeightsNotFound(f"{path}: no {backbone.weights_file} for backbone '{backbone.name}' "
                              "in this folder (or one level below)")
    if not path.is_file():
        raise WeightsNotFound(f"{path}: weights file for backbone '{backbone.name}' does not exist")
    return str(path)


def file_md5(path: str | Path) -> str:
    """MD5 of a file, read in blocks (weights files reach hundreds of MB)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(resolved: str | None) -> str:
    """A string that changes whenever the weights do: the file's md5, or the Keras release."""
    if resolved is None:
        return "random-init"
    if resolved == "imagenet":
        import keras

        return f"imagenet (keras {keras.__version__})"
    return f"md5:{file_md5(resolved)}"


def _constructor(dotted: str):
    """The function a registry entry names. In kernel.py our modules are one file, so a
    constructor of ours that cannot be imported is looked up in this module instead."""
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        if module.split(".")[0] != "features" or attr not in globals():
            raise
        return globals()[attr]


@contextmanager
def dtype_policy(precision: str):
    """Build layers under a Keras dtype policy ("float32", "mixed_float16", ...): Keras has only a
    global one, so it is restored afterwards."""
    import keras

    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(before)


def build_feature_map_model(backbone: Backbone, weights: str | Path | None = "default",
                            precision: str = "float32"):
    """Raw RGB pixels (N, H, W, 3) float32 0..255 -> last feature map (N, h, w, C), computed in
    ``precision`` (a Keras dtype policy; weights stay float32)."""
    with dtype_policy(precision):
        return _build_feature_map_model(backbone, weights)


def _build_feature_map_model(backbone: Backbone, weights: str | Path | None):
    import keras

    resolved = resolve_weights(backbone, weights)
    height, width = backbone.input_size
    if backbone.is_file:
        base = load_keras_file(resolved)
        if backbone.feature_layer and backbone.feature_layer != base.layers[-1].name:
            base = keras.Model(base.inputs, base.get_layer(backbone.feature_layer).output)
    else:
        base = _constructor(backbone.constructor)(include_top=False, weights=resolved, input_shape=(height, width, 3),
                           pooling=None)
        if backbone.feature_layer:
            base = keras.Model(base.inputs, base.get_layer(backbone.feature_layer).output)
    pixels = keras.Input((height, width, 3), dtype="float32", name="pixels")
    feature_map = base(preprocess(pixels, backbone.preprocess))
    return keras.Model(pixels, feature_map, name=f"{backbone.name}_map")


def build_gap_model(backbone: Backbone, weights: str | Path | None = "default",
                    precision: str = "float32"):
    """Raw RGB pixels (N, H, W, 3) float32 0..255 -> GAP features (N, feature_dim), float32 out."""
    import keras

    with dtype_policy(precision):
        fmap = _build_feature_map_model(backbone, weights)
        out = fmap.output
        if len(out.shape) == 4:
            out = keras.layers.GlobalAveragePooling2D(name="gap")(out)
        if precision != "float32":  # features leave in float32 whatever the policy computed in
            out = keras.layers.Activation("linear", dtype="float32", name="features")(out)
        return keras.Model(fmap.input, out, name=f"{backbone.name}_gap")
