"""Saved ``.keras`` model files: load them on every Keras 3 we support, and say what they take.

Below both the registry (an entry for any ``.keras`` path) and the model builders, so neither
imports the other.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from features.efficientnet_lite import LITE_SCALING, efficientnet_lite


class WeightsNotFound(FileNotFoundError):
    """A weights file or folder was asked for and is not there."""


def describe_model_file(path: Path) -> tuple[tuple[int, int], int]:
    """Input (height, width) and output channel count of a saved ``.keras`` model."""
    if not path.is_file():
        raise WeightsNotFound(f"{path}: saved model does not exist")
    model = load_keras_file(str(path))
    shape = model.input_shape
    if len(shape) != 4 or shape[1] is None or shape[2] is None or shape[3] != 3:
        raise ValueError(f"{path}: expected an input of shape (N, H, W, 3) with fixed H and W, "
                         f"got {shape}")
    return (int(shape[1]), int(shape[2])), int(model.output_shape[-1])


def saved_keras_version(path: str | Path) -> str | None:
    """The Keras version that wrote a ``.keras`` file (its metadata.json), if it says."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("metadata.json")).get("keras_version")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def load_keras_file(path: str):
    """A saved model; the shared EfficientNet-Lite files are built in code from their weights, so
    they load on every Keras 3, not only on the one that wrote them."""
    import keras

    lite = re.fullmatch(r"efficientnet_lite(\d)_(top|notop)\.keras", Path(path).name)
    if lite and int(lite[1]) in LITE_SCALING:
        return efficientnet_lite(int(lite[1]), include_top=lite[2] == "top", weights=path)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file; name the file either way.
        message = f"{path}: cannot load as a Keras model ({type(exc).__name__}: {exc})"
        saved = saved_keras_version(path)
        if saved and _version(saved) > _version(keras.__version__):
            message += (f". It was saved by Keras {saved} and this is Keras {keras.__version__}: a "
                        "newer Keras writes arguments an older one does not know. Upgrade Keras "
                        f"(pip install 'keras>={saved}'), or save the weights alone "
                        "(model.save_weights) and build the architecture in code")
        raise ValueError(message) from exc
