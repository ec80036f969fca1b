"""The backbone table: everything about a backbone is one entry here, as data.

Adding a backbone is adding one ``Backbone`` to ``REGISTRY``; no other code path changes.
Entries name their constructor as a dotted path, so the table is importable without
loading TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
RESIZE_METHODS = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and feed it.

    name: registry key, also the cache file name (``gap_<name>.h5``).
    constructor: dotted path of a function built like ``keras.applications``' (``include_top``,
        ``weights``, ``input_shape``, ``pooling``), or None for a backbone that is a saved
        ``.keras`` file (the architecture comes with the weights).
    input_size: (height, width) the photo is resized to.
    preprocess: how 0..255 RGB pixels are normalised before the network
        ("caffe": BGR minus ImageNet mean; "tf": [-1, 1]; "torch": ImageNet mean/std;
        "none": the model normalises inside, as EfficientNet-style models do).
    feature_dim: width of the global-average-pooled feature vector.
    weights: default weights: "imagenet" (Keras download) or a file name looked up in
        the weights folder (then there is no download).
    weights_file: the file name to look for when a weights *folder* is given.
    resize: interpolation used to bring the photo to ``input_size``.
    feature_layer: layer whose output is the last feature map (None: the model's output).
    top_weights_file: the file of the same network with its ImageNet classifier (a Dense layer on
        the GAP features), looked up beside the weights; None when the top is not a Dense on the
        GAP (ConvNeXt normalises first) or not published. With "imagenet" weights Keras
        downloads it. Gives the ``<backbone>/imagenet`` level-1 model (``features.imagenet``).
    """

    name: str
    constructor: str | None
    input_size: tuple[int, int]
    preprocess: str
    feature_dim: int
    weights: str
    weights_file: str
    resize: str = "area"
    feature_layer: str | None = None
    top_weights_file: str | None = None

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"Backbone '{self.name}': preprocess must be one of {', '.join(PREPROCESS_MODES)}; "
                f"got {self.preprocess!r}"
            )
        if self.resize not in RESIZE_METHODS:
            raise ValueError(
                f"Backbone '{self.name}': resize must be one of {', '.join(RESIZE_METHODS)}; "
                f"got {self.resize!r}"
            )

    @property
    def is_file(self) -> bool:
        """True when the backbone is a saved model file rather than a Keras application."""
        return self.constructor is None


def _app(name, ctor, size, preprocess, dim, weights_file, top_file=None, **kw) -> Backbone:
    return Backbone(name, f"keras.applications.{ctor}", (size, size), preprocess, dim,
                    "imagenet", weights_file, top_weights_file=top_file, **kw)


def _lite(n: int, size: int) -> Backbone:
    # Built in code (features/efficientnet_lite.py), weights read from the .keras file: a .keras
    # architecture saved by a newer Keras does not load in the older ones Kaggle runs.
    fname = f"efficientnet_lite{n}_notop.keras"
    return Backbone(f"efficientnet_lite{n}", f"features.efficientnet_lite.EfficientNetLite{n}",
                    (size, size), "none", 1280, fname, fname,
                    top_weights_file=f"efficientnet_lite{n}_top.keras")


# Keras release file names: the notop file, and the one with the ImageNet classifier.
_TOP = "_weights_tf_dim_ordering_tf_kernels.h5"
_KERAS = "_weights_tf_dim_ordering_tf_kernels_notop.h5"

REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in [
        # The public write-ups' four.
        _app("resnet50", "ResNet50", 224, "caffe", 2048, "resnet50" + _KERAS, "resnet50" + _TOP),
        _app("inception_v3", "InceptionV3", 299, "tf", 2048, "inception_v3" + _KERAS,
             "inception_v3" + _TOP),
        _app("xception", "Xception", 299, "tf", 2048, "xception" + _KERAS, "xception" + _TOP),
        _app("inception_resnet_v2", "InceptionResNetV2", 299, "tf", 1536,
             "inception_resnet_v2" + _KERAS, "inception_resnet_v2" + _TOP),
        # Newer Keras applications (they normalise inside the model).
        _app("densenet121", "DenseNet121", 224, "torch", 1024, "densenet121" + _KERAS,
             "densenet121" + _TOP),
        _app("efficientnetv2_b0", "EfficientNetV2B0", 224, "none", 1280, "efficientnetv2-b0_notop.h5",
             "efficientnetv2-b0.h5"),
        _app("efficientnetv2_s", "EfficientNetV2S", 384, "none", 1280, "efficientnetv2-s_notop.h5",
             "efficientnetv2-s.h5"),
        # ConvNeXt's classifier normalises the GAP features first: no linear top, no prior.
        _app("convnext_tiny", "ConvNeXtTiny", 224, "none", 768, "convnext_tiny_notop.h5"),
        # EfficientNet-Lite: weights shipped as .keras files (see shared/README.md).
        _lite(0, 224),
        _lite(1, 240),
        _lite(2, 260),
    ]
}


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return sorted(REGISTRY)


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``, or an ad-hoc entry for a saved ``.keras`` file path."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.endswith(".keras"):
        return backbone_from_file(name)
    raise KeyError(f"Unknown backbone '{name}'; available: {', '.join(list_backbones())}, "
                   "or the path of a saved .keras model")


def backbone_from_file(path: str | Path) -> Backbone:
    """Describe any saved ``.keras`` model (RGB 0..255 in, feature map or vector out) as an entry."""
    from features.model_files import describe_model_file

    path = Path(path)
    size, dim = describe_model_file(path)
    top = path.name.replace("_notop.keras", "_top.keras") if path.name.endswith("_notop.keras") else None
    return Backbone(path.stem, None, size, "none", dim, str(path), path.name, top_weights_file=top)


def with_overrides(backbone: Backbone, **changes) -> Backbone:
    """A copy of an entry with some fields changed (e.g. another input size)."""
    return replace(backbone, **changes)
