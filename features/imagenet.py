"""Each backbone's own ImageNet classifier, kept as what it is: a Dense layer on the GAP features.

A backbone published with its ImageNet top ends in GAP -> Dense(1000) -> softmax, so the 1,000
class logits of a photo are ``gap @ kernel + bias``: the top costs one small matrix product on the
cached GAP features, the very numbers the forward pass would give, with no second pass over the
photos (and a cache made before the top was wanted gets it added in seconds). 118 of those classes
are dog breeds and 5 domestic cats: a cat-or-dog opinion learnt from a million other photos, which
``oof.prior.ImageNetPrior`` turns into a level-1 model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.defaults import default_weights_dir
from features.model_files import load_keras_file
from features.models import _constructor, dtype_policy, weights_identity
from features.registry import Backbone

log = logging.getLogger("gapstack")

# ImageNet-1k class indices: dog breeds and domestic cats (both contiguous).
DOG_CLASSES = np.arange(151, 269)
CAT_CLASSES = np.arange(281, 286)
DOGS, CATS = slice(151, 269), slice(281, 286)


@dataclass(frozen=True)
class ImageNetTop:
    """The classifier on a backbone's GAP features: logits = gap @ kernel + bias.
    identity: what it was read from (a file's md5, or the Keras release), for the cache."""

    kernel: np.ndarray  # (feature_dim, 1000)
    bias: np.ndarray  # (1000,)
    identity: str

    def logits(self, gap: np.ndarray) -> np.ndarray:
        """(n, 1000) class logits of GAP feature rows (NaN rows stay NaN)."""
        return (np.asarray(gap, np.float32) @ self.kernel + self.bias).astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    top = z.max(axis=-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits (n, K): ImageNet's from cached logits, a K-class head's."""
    return np.exp(log_softmax(logits))


def top_weights(backbone: Backbone, weights="default") -> str | None:
    """Where this backbone's ImageNet top comes from, or None when there is none at hand:
    "imagenet" (Keras downloads it), or the ``top_weights_file`` found where the weights are
    (the default weights folder, the given folder or one level below, or beside the given file)."""
    name = backbone.top_weights_file
    if name is None or weights is None:
        return None
    if weights == "imagenet" or (weights == "default" and backbone.weights == "imagenet"):
        return None if backbone.is_file else "imagenet"
    if weights == "default":
        weights = Path(backbone.weights) if Path(backbone.weights).is_absolute() else default_weights_dir()
    path = Path(weights)
    folders = [path, *path.glob("*/")] if path.is_dir() else [path.parent]
    found = next((f / name for f in folders if (f / name).is_file()), None)
    return str(found) if found else None


def top_identity(backbone: Backbone, weights="default") -> str | None:
    """The identity of the top ``load_top`` would read (a file's md5: no network is built)."""
    source = top_weights(backbone, weights)
    return None if source is None else weights_identity(source)


def load_top(backbone: Backbone, weights="default") -> ImageNetTop | None:
    """The backbone's ImageNet classifier as (kernel, bias), or None when it has none here.

    The network is built with its top and the last layer read; it must be a Dense on the global
    average pool (Dropout between is the identity at inference), the same GAP our features are,
    else there is no prior (a warning says why)."""
    import keras

    source = top_weights(backbone, weights)
    if source is None:
        return None
    with dtype_policy("float32"):
        if backbone.is_file:
            model = load_keras_file(source)
        else:
            model = _constructor(backbone.constructor)(
                include_top=True, weights=source, input_shape=(*backbone.input_size, 3))
    dense, before = model.layers[-1], [l for l in model.layers[:-1]
                                       if not isinstance(l, keras.layers.Dropout)][-1]
    if not isinstance(dense, keras.layers.Dense) or not isinstance(
            before, keras.layers.GlobalAveragePooling2D):
        log.warning("%s: its classifier is not a Dense layer on the global average pool "
                    "(%s after %s); no ImageNet prior for %s", source, type(dense).__name__,
                    type(before).__name__, backbone.name)
        return None
    kernel, bias = (np.asarray(w, np.float32) for w in dense.get_weights())
    if kernel.shape[0] != backbone.feature_dim or kernel.shape[1] != 1000:
        log.warning("%s: classifier kernel %s does not map %d GAP features to 1000 ImageNet "
                    "classes; no ImageNet prior for %s", source, kernel.shape, backbone.feature_dim,
                    backbone.name)
        return None
    return ImageNetTop(kernel, bias, weights_identity(source))
