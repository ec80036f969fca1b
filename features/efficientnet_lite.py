"""EfficientNet-Lite0/1/2 built in code, the way ``keras.applications`` builds its networks.

A ``.keras`` file carries its architecture as a config that only the Keras which wrote it (or a
newer one) can read: the shared Lite files, saved by Keras 3.15, fail to load in Keras 3.8-3.12
(unknown initializer and BatchNormalization arguments), which is what a Kaggle notebook runs. Here
the architecture is code that every Keras 3 builds, and only the weights are read from the file
(a ``.keras`` archive or a ``.weights.h5``) with h5py, so the file's Keras version does not matter.

The network: EfficientNet-B0's seven stages of inverted-residual (MBConv) blocks with the Lite
changes (no squeeze-and-excitation, ReLU6, stem and head not scaled, first and last stage not
repeated), pixels 0..255 normalised inside by ``(x - 127) / 128``.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from pathlib import Path

# EfficientNet-B0's stages: kernel, repeats, output filters, expansion, first stride.
STAGES = ((3, 1, 16, 1, 1), (3, 2, 24, 6, 2), (5, 2, 40, 6, 2), (3, 3, 80, 6, 2),
          (5, 3, 112, 6, 1), (5, 4, 192, 6, 2), (3, 1, 320, 6, 1))
# Lite variant: (width multiplier, depth multiplier, native input size).
LITE_SCALING = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}
STEM_FILTERS, HEAD_FILTERS = 32, 1280


class WeightsMismatch(ValueError):
    """A weights file that does not fit the network being built."""


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def _block(x, name: str, filters_out: int, kernel: int, expand: int, stride: int):
    """One MBConv block without squeeze-and-excitation (names as in the shared files)."""
    from keras import layers

    filters_in = x.shape[-1]
    h = x
    if expand != 1:
        h = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False,
                          name=f"{name}_expand_conv")(h)
        h = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_expand_bn")(h)
        h = layers.ReLU(6.0, name=f"{name}_expand_relu")(h)
    h = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(h)
    h = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_dw_bn")(h)
    h = layers.ReLU(6.0, name=f"{name}_dw_relu")(h)
    h = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(h)
    h = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_project_bn")(h)
    if stride == 1 and filters_in == filters_out:
        h = layers.Add(name=f"{name}_add")([h, x])
    return h


def efficientnet_lite(variant: int, include_top: bool = False, weights: str | Path | None = None,
                      input_shape: tuple | None = None, pooling: str | None = None, classes: int = 1000):
    """EfficientNet-Lite``variant`` (0, 1, 2): RGB pixels 0..255 -> last feature map ("top_activation"),
    or the ImageNet class probabilities with ``include_top``; ``weights``: a file or None (random)."""
    import keras
    from keras import layers

    if variant not in LITE_SCALING:
        raise ValueError(f"EfficientNet-Lite{variant} is not built here; variants: {sorted(LITE_SCALING)}")
    if weights == "imagenet":
        raise ValueError(f"EfficientNet-Lite{variant} has no Keras 'imagenet' download; pass its "
                         f"weights file (efficientnet_lite{variant}_notop.keras) or a folder holding it")
    width, depth, size = LITE_SCALING[variant]
    pixels = keras.Input(input_shape or (size, size, 3), name="pixels")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(pixels)
    x = layers.Conv2D(STEM_FILTERS, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    index = 0
    for stage, (kernel, repeats, filters, expand, stride) in enumerate(STAGES):
        fixed = stage in (0, len(STAGES) - 1)  # Lite keeps the first and last stage at one block
        for r in range(repeats if fixed else math.ceil(depth * repeats)):
            x = _block(x, f"block{index}", _round_filters(filters, width), kernel, expand,
                       stride if r == 0 else 1)
            index += 1
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    elif pooling in ("avg", "max"):
        pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
        x = pool(name=f"{pooling}_pool")(x)
    model = keras.Model(pixels, x, name=f"efficientnet_lite{variant}")
    if weights is not None:
        load_weights_by_order(model, weights)
    return model


def EfficientNetLite0(**kwargs):  # noqa: N802 (named like keras.applications' constructors)
    return efficientnet_lite(0, **kwargs)


def EfficientNetLite1(**kwargs):  # noqa: N802
    return efficientnet_lite(1, **kwargs)


def EfficientNetLite2(**kwargs):  # noqa: N802
    return efficientnet_lite(2, **kwargs)


def _snake(class_name: str) -> str:
    """Keras 3's name for a layer's group in a weights file (``BatchNormalization`` ->
    ``batch_normalization``)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _weights_h5(path: Path) -> io.BytesIO | Path:
    """The Keras 3 weights file: inside a ``.keras`` archive, or the path of a ``.weights.h5``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise WeightsMismatch(f"{path}: a zip archive without model.weights.h5, not a .keras file")
            return io.BytesIO(archive.read("model.weights.h5"))
    return path


def load_weights_by_order(model, path: str | Path) -> None:
    """Set ``model``'s weights from a Keras 3 weights file whose layers come in the same order.

    Keras 3 files name a layer's group after its class and rank (``conv2d``, ``conv2d_1``, ...), not
    after the layer, so layers are matched class by class in order; every shape is checked.
    Classes the model lacks (a file with the ImageNet top, read for the feature map) are ignored.
    """
    import h5py

    path = Path(path)
    try:
        source = _weights_h5(path)
        f = h5py.File(source, "r")
    except (OSError, zipfile.BadZipFile) as exc:
        raise WeightsMismatch(f"{path}: cannot read as a Keras weights file ({exc})") from None
    with f:
        if "layers" not in f:
            raise WeightsMismatch(f"{path}: no 'layers' group; not a Keras 3 weights file")
        groups: dict[str, list[tuple[int, str]]] = {}
        for key in f["layers"]:
            base, rank = re.fullmatch(r"(.*?)(?:_(\d+))?", key).groups()
            groups.setdefault(base, []).append((int(rank or 0), key))
        by_class: dict[str, list] = {}
        for layer in model.layers:
            if layer.weights:
                by_class.setdefault(_snake(type(layer).__name__), []).append(layer)
        for cls, layers in by_class.items():
            stored = [key for _, key in sorted(groups.get(cls, []))]
            stored = [k for k in stored if "vars" in f["layers"][k] and len(f["layers"][k]["vars"])]
            if len(stored) != len(layers):
                raise WeightsMismatch(f"{path}: {len(stored)} {cls} layers with weights, the network "
                                      f"{model.name} has {len(layers)}; is this the right file?")
            for layer, key in zip(layers, stored):
                saved = f["layers"][key]["vars"]
                values = [saved[str(i)][()] for i in range(len(saved))]
                shapes = [tuple(w.shape) for w in layer.weights]
                if [v.shape for v in values] != shapes:
                    raise WeightsMismatch(f"{path}: {key} holds shapes {[v.shape for v in values]}, "
                                          f"layer {layer.name} of {model.name} needs {shapes}")
                layer.set_weights(values)
