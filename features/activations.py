"""A backbone's frozen lower part computed once per photo, kept on disk, for fine-tuning its top.

Fine-tuning the whole network recomputes every layer, forward and backward, for every photo of
every fold; with the lower part frozen (BatchNormalization frozen too, no randomness in it), what
it computes for a photo never changes, like the GAP features the cache keeps one level later. Here
it is computed once per photo (and once per mirror image, for the training flips), stored as
float16 chunks of ``.npy`` files read through memory maps (memory flat in the number of photos),
each written atomically, so an interrupted pass resumes at its first missing chunk. The folder is
named by everything that determines its contents (backbone, weights, split layer, photos, view).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from features.cache import atomic_write, extraction_lock
from features.data import Photo
from features.models import preprocess
from features.registry import Backbone

log = logging.getLogger("gapstack")

CHUNK = 512  # photos per file: a resumed pass loses at most this many photos' work
VIEWS = ("plain", "mirror")  # the photo as it is, and flipped left to right (training's flips)


def nested_base(fmap):
    """The backbone inside a feature-map model (``build_feature_map_model`` wraps it after the
    preprocessing), or the model itself when nothing is nested."""
    inner = [layer for layer in fmap.layers if hasattr(layer, "get_layer") and hasattr(layer, "layers")]
    return inner[-1] if inner else fmap


def split_network(fmap, backbone: Backbone, layer: str):
    """(lower: raw pixels -> the output of ``layer``; upper: that output -> ``fmap``'s feature map).

    ``upper`` is built from ``fmap``'s own layers, so training it trains ``fmap``: the network
    saved afterwards is the whole backbone with its top trained. ``layer`` must be a point every
    path through the network crosses (a block's output), or ``upper`` would need more inputs."""
    import keras

    base = nested_base(fmap)
    try:
        cut = base.get_layer(layer).output
    except ValueError:
        raise ValueError(f"{backbone.name}: no layer named {layer!r} to split the network at") from None
    try:
        upper = keras.Model(cut, base.output, name=f"{backbone.name}_top")
    except Exception as exc:  # a tensor that skips the cut: Keras cannot build the model
        raise ValueError(f"{backbone.name}: the network cannot be split at {layer!r}; a path "
                         f"goes around it ({exc})") from exc
    inner = keras.Model(base.input, cut, name=f"{backbone.name}_lower_inner")
    pixels = keras.Input(fmap.input_shape[1:], dtype="float32", name="pixels")
    x = pixels if base is fmap else preprocess(pixels, backbone.preprocess)
    lower = keras.Model(pixels, inner(x), name=f"{backbone.name}_to_{layer}")
    mirrored = keras.Model(pixels, inner(keras.ops.flip(x, axis=2)), name=f"{backbone.name}_to_{layer}_mirror")
    return lower, upper, mirrored


def store_folder(root: Path, backbone: Backbone, weights_id: str, layer: str, photos: list[Photo]) -> Path:
    """Where the activations of ``photos`` at ``layer`` live: named by everything they depend on."""
    digest = hashlib.md5(json.dumps([backbone.name, list(backbone.input_size), backbone.resize, weights_id,
                                     layer, [p.id for p in photos], [p.size for p in photos]]).encode())
    return Path(root) / f"{backbone.name}-{layer}-{digest.hexdigest()[:12]}"


def chunks(n: int) -> int:
    return -(-n // CHUNK)


def chunk_file(folder: Path, view: str, c: int, part: str = "act") -> Path:
    return Path(folder) / f"{view}-{c:05d}.{part}.npy"


class Activations:
    """Rows of one photo list's activations at a layer, per view, from their chunk files.

    ``rows(idx, mirror)``: float32 activations of photos ``idx``, each from its mirror image where
    ``mirror`` says so; NaN where the photo could not be read (``ok`` False)."""

    def __init__(self, folder: Path, n: int, views: tuple[str, ...]):
        self.folder, self.n, self.views = Path(folder), n, views
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        ok = [np.load(chunk_file(folder, "plain", c, "ok")) for c in range(chunks(n))]
        self.ok = np.concatenate(ok) if ok else np.zeros(0, bool)

    def _map(self, view: str, c: int) -> np.ndarray:
        if (view, c) not in self._maps:
            self._maps[view, c] = np.load(chunk_file(self.folder, view, c), mmap_mode="r")
        return self._maps[view, c]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._map("plain", 0).shape[1:]

    def rows(self, idx, mirror=None) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.empty((len(idx), *self.shape), np.float32)
        for i, r in enumerate(idx):
            view = "mirror" if mirror is not None and mirror[i] else "plain"
            out[i] = self._map(view, r // CHUNK)[r % CHUNK]
        return out


def compute(photos: list[Photo], folder: Path, backbone: Backbone, layer: str, lower, mirrored,
            views: tuple[str, ...], runtime: str = "auto", progress: bool = True) -> Activations:
    """The activations of ``photos`` per view (``VIEWS``) in ``folder``, computing the chunks not
    yet kept (``lower``/``mirrored``: pixels -> activations, plain and flipped). Photos that cannot
    be read get NaN rows and ``ok`` False, not an exception."""
    from features.extract import Extractor, progress_bar

    folder = Path(folder)
    record = {"photos": len(photos), "views": list(views), "chunk": CHUNK}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with extraction_lock(folder, log):
        recipe = folder / "recipe.json"
        if folder.exists() and (not recipe.is_file() or json.loads(recipe.read_text()) != record):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(recipe, lambda f: f.write(json.dumps(record).encode()))
        todo = [(v, c) for v in views for c in range(chunks(len(photos)))
                if not chunk_file(folder, v, c).is_file()]
        if todo:
            log.info("%s: activations at %s of %d photos (%s), %d of %d chunks to compute", backbone.name,
                     layer, len(photos), ", ".join(views), len(todo), len(views) * chunks(len(photos)))
            bar = progress_bar(sum(len(photos[c * CHUNK:(c + 1) * CHUNK]) for _, c in todo),
                               f"{backbone.name} activations", progress)
            runners = {}
            for view, c in todo:
                if view not in runners:
                    runners[view] = Extractor(backbone, None, runtime, model=lower if view == "plain" else mirrored)
                part = photos[c * CHUNK:(c + 1) * CHUNK]
                act, reasons = runners[view].features(part)
                ok = np.array([not r for r in reasons])
                if view == "plain":
                    atomic_write(chunk_file(folder, view, c, "ok"), lambda f: np.save(f, ok))
                atomic_write(chunk_file(folder, view, c), lambda f: np.save(f, act.astype(np.float16)))
                bar.update(len(part))
            bar.close()
    return Activations(folder, len(photos), views)
