"""Fine-tuned backbones as level-1 models, cross-fitted on the run's folds.

For fold k a copy of the backbone, with a Dropout + Dense(1, sigmoid) head on its global average
pool, is trained on the photos outside fold k and predicts fold k: every training photo gets an
out-of-fold P(dog), the test set the mean of the K fold networks, like every other level-1 model.

What the rest of the package sees: each fold network's feature-map model, saved as a ``.keras``
file, is a backbone of its own (``<backbone>-ft<k>``, a saved-model registry entry), and its head
is a linear model on that backbone's GAP features (``DenseHead``). So ``stacking.predict``, the web
page's CAM (exact in the mean: the head is linear in the GAP) and the export take a fine-tuned
model with no code path of their own.

Training streams photos from disk: a ``keras.utils.PyDataset`` decodes and resizes each batch in
worker threads while the step runs, so memory is flat in the number of photos. Each finished fold
is kept (network, head, predictions) under a folder named by everything that determines it, so an
interrupted run resumes at the first unfinished fold.

A top-only recipe (``Recipe.frozen_until``, ``TOP_RECIPES``) trains only the layers after a split:
the lower part's activations are computed once per photo for all folds (``features.activations``)
and each fold trains and predicts from them, a few minutes a backbone on a CPU; the network saved
is still the whole backbone, so the rest of the package cannot tell the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from features.activations import VIEWS, Activations, compute, split_network, store_folder
from features.cache import atomic_write, extraction_lock
from features.data import Photo, PhotoReader
from features.defaults import RATES_FILE, SEED, WORKERS
from features.extract import Extractor, load_batch, progress_bar
from features.models import build_feature_map_model, resolve_weights, weights_identity
from features.registry import Backbone, get_backbone
from features.runtime import accelerators, cpu_info
from oof.crossfit import CrossFit, class_proba, prediction_shape
from oof.heads import Classifier, KerasHead, LogisticHead, linear_parts, output_layer, validate_data

log = logging.getLogger("gapstack")

FINETUNED = "finetuned"  # level-1 name "<backbone>/finetuned"


@dataclass(frozen=True)
class Recipe:
    """How each fold network is trained (benchmarks/RESULTS.md says how it was chosen).

    The head starts from a Dropout + Dense head fitted on the frozen backbone's cached GAP features
    (the warm-up epoch of the usual recipe, without a pass over the photos); then the whole network
    trains for ``epochs`` at ``learning_rate`` (Adam) with BatchNormalization frozen (its running
    statistics kept: batches of 32 are too small to re-estimate them) and random horizontal flips.
    """

    epochs: int = 1
    learning_rate: float = 2e-5  # Lite1's and Lite2's by CV; Lite0 takes 1e-4 (RECIPES)
    batch_size: int = 32
    dropout: float = 0.2
    flip: bool = True
    freeze_batchnorm: bool = True
    warmup: str = "keras"  # the starting head: "keras" (Dropout + Dense) or "logistic" (our LogisticHead)
    warmup_epochs: int = 20  # of the "keras" head on cached GAP features
    seed: int = SEED
    # The last frozen layer: the network up to its output is computed once per photo and mirror
    # image (features.activations) and only what follows trains; None: the whole network trains.
    frozen_until: str | None = None
    # Keras dtype policy training computes in ("mixed_bfloat16": bfloat16 math, float32 weights);
    # the network saved computes in float32 whatever it trained in.
    precision: str = "float32"
    # Fold networks: None, one per fold of the run; G < folds: G networks, network g holding out
    # the run's folds k with k % G == g (nested in the run's folds, so every out-of-fold
    # prediction is still made by a network that never saw the photo, and stacking on the run's
    # folds is as leak-free as with one network per fold): G=2 trains on N photos in all, not 4N.
    networks: int | None = None


# Each backbone's recipe, chosen by 5-fold CV on the 9,619 shared photos with stack-lr as the judge
# (benchmarks/RESULTS.md, "Recipes per backbone"). A backbone not listed (the write-ups' four, a
# .keras file) trains with Recipe(): 2e-5, the rate both larger Lite backbones chose (1e-4 moved
# their pretrained features too far in one epoch), a recipe on paper until a CV says otherwise.
RECIPES: dict[str, Recipe] = {
    # 1 epoch at 1e-4: alone 0.0385 (2 epochs at 2e-5: 0.0400), stack-lr 0.0216 (0.0224)
    "efficientnet_lite0": Recipe(learning_rate=1e-4),
    # 1 epoch at 2e-5: alone 0.0294 (1e-4: 0.0454; frozen head 0.0313), stack-lr 0.0214 (1e-4: 0.0224)
    "efficientnet_lite1": Recipe(learning_rate=2e-5),
    # 1 epoch at 2e-5: alone 0.0241 (frozen head 0.0257), stack-lr 0.0209 (frozen models alone: 0.0225)
    "efficientnet_lite2": Recipe(learning_rate=2e-5),
}


# Each backbone's top-only recipe (issue #33): stages 4 onward (the split at the end of stage 3)
# trained on the lower part's activations, computed once per photo (benchmarks/RESULTS.md, "The
# middle of the network"): what --finetune auto trains on a CPU, about 2.6 times cheaper than the
# whole networks there. Chosen by 5-fold CV on both shared tasks over the last block alone (Lite1,
# Lite2 at 3e-4; Lite0's found no gain), at the whole networks' rates: Dogs vs. Cats (9,619 photos)
# stack-lr 0.0213 -> 0.0210 (whole networks 0.0189), clothing-small 0.3051 -> 0.2634 (accuracy
# 0.8986 -> 0.9081), each model alone nearly its whole network (0.0409 / 0.0297 / 0.0245 against
# 0.0359 / 0.0294 / 0.0241 on Dogs vs. Cats). Then Lite2's rate, below.
TOP_RECIPES: dict[str, Recipe] = {
    "efficientnet_lite0": Recipe(learning_rate=1e-4, frozen_until="block4_add"),  # blocks 5-15, 28x28x40 in
    "efficientnet_lite1": Recipe(learning_rate=2e-5, frozen_until="block6_add"),  # blocks 7-20, 30x30x40 in
    # Lite2 at 1e-4, not its whole network's 2e-5: worse alone, more to the stack (Dogs vs. Cats
    # stack-lr 0.0210 -> 0.0200, clothing-small 0.2693 -> 0.2621; RESULTS "The middles' learning rate")
    "efficientnet_lite2": Recipe(learning_rate=1e-4, frozen_until="block6_add"),  # blocks 7-20, 33x33x48 in
}
KINDS = {"whole": RECIPES, "top": TOP_RECIPES}


def recipe_for(backbone: Backbone | str, epochs: int | None = None, seed: int = SEED,
               kind: str = "whole") -> Recipe | None:
    """The backbone's recipe of ``kind`` ("whole": ``RECIPES``, else ``Recipe()``; "top":
    ``TOP_RECIPES``, else None: none chosen), with ``epochs`` and ``seed`` as the user set them
    (``--finetune-epochs``, ``--seed``)."""
    name = backbone if isinstance(backbone, str) else backbone.name
    if kind not in KINDS:
        raise ValueError(f"fine-tuning recipe must be one of {', '.join(KINDS)}, not {kind!r}")
    recipe = KINDS[kind].get(name, Recipe() if kind == "whole" else None)
    if recipe is None:
        return None
    return replace(recipe, epochs=recipe.epochs if epochs is None else epochs, seed=seed)


class DenseHead(Classifier):
    """A fitted Dense(1, sigmoid) head (Dense(K, softmax) for K classes) as a linear model on GAP
    features: logit(s) = X @ coef + b.
    ``fit`` learns nothing (the network trained it); it only records the classes."""

    def __init__(self, coef=None, intercept: float = 0.0):
        self.coef = coef
        self.intercept = intercept

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        self._set_classes(y)
        self.mean_ = np.zeros(X.shape[1])
        self.scale_ = np.ones(X.shape[1])
        self.coef_ = np.asarray(self.coef, np.float64)
        self.intercept_ = float(self.intercept) if self.coef_.ndim == 1 else np.asarray(self.intercept, np.float64)
        return self

    def decision_function(self, X) -> np.ndarray:
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_ + self.intercept_


class PhotoBatches:
    """Training batches streamed from disk: (pixels, labels, weights), unreadable photos weighted 0,
    a new order and new flips every epoch (seeded). Wrapped as a ``keras.utils.PyDataset`` by
    ``batches`` so Keras decodes ahead in worker threads."""

    def __init__(self, photos: list[Photo], labels: np.ndarray, backbone: Backbone, batch_size: int,
                 flip: bool, seed: int):
        self.photos, self.labels = photos, np.asarray(labels, np.float32)
        self.backbone, self.batch_size, self.flip, self.seed = backbone, batch_size, flip, seed
        self.reader, self.epoch = PhotoReader(), 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.photos))

    def _mirrored(self, i: int, n: int) -> np.ndarray | None:
        """Which of batch ``i``'s ``n`` photos this epoch flips (seeded; None without flips)."""
        return np.random.default_rng([self.seed, self.epoch, i]).random(n) < 0.5 if self.flip else None

    def __len__(self) -> int:
        return math.ceil(len(self.photos) / self.batch_size)

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        pixels, reasons = load_batch(self.reader, [self.photos[j] for j in idx], self.backbone, False)
        mirror = self._mirrored(i, len(idx))
        if mirror is not None:
            pixels[mirror] = pixels[mirror, :, ::-1]
        weights = np.array([0.0 if r else 1.0 for r in reasons], np.float32)
        return pixels, self.labels[idx], weights

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()


def batches(source: PhotoBatches, workers: int):
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=2 * workers)

        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            return source[i]

        def on_epoch_end(self):
            source.on_epoch_end()

    return Batches()


def training_devices() -> list[str]:
    """The devices one fold network trains on together: every GPU when there are several (Kaggle's
    T4 x2), on the TensorFlow backend; else none named (Keras' own device)."""
    import keras

    found = list(accelerators())
    return found if len(found) > 1 and keras.backend.backend() == "tensorflow" else []


def _replicated(devices: list[str]):
    """A scope in which a network is built once per device (``tf.distribute.MirroredStrategy``):
    each replica takes its share of every batch and the gradients are combined before each step,
    so the recipe (batch size, learning rate) trains as on one device."""
    if len(devices) < 2:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices).scope()


def build_network(backbone: Backbone, weights, recipe: Recipe, head: tuple | None = None,
                  devices: list[str] | None = None, n_classes: int = 2):
    """(training model: pixels -> P(dog) (``n_classes`` > 2: a softmax over them), compiled with
    the recipe's optimizer and loss; feature-map model inside it). BatchNormalization frozen as
    the recipe says; ``head``: (kernel, bias) to start the Dense from; ``devices``: train on
    these together (default: ``training_devices()``)."""
    with _replicated(training_devices() if devices is None else devices):
        return _network(backbone, weights, recipe, head, n_classes)


def _network(backbone: Backbone, weights, recipe: Recipe, head: tuple | None, n_classes: int = 2):
    import keras

    fmap = build_feature_map_model(backbone, weights, recipe.precision)
    if recipe.freeze_batchnorm:
        for layer in _all_layers(fmap):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    x = keras.layers.GlobalAveragePooling2D(name="gap")(fmap.output)
    x = keras.layers.Dropout(recipe.dropout, seed=recipe.seed, name="head_dropout")(x)
    units, activation, _ = output_layer(n_classes)
    dense = keras.layers.Dense(units, activation=activation, name="head", dtype="float32")
    p = dense(x)
    if head is not None:
        set_head(dense, head)
    return _compiled(keras.Model(fmap.input, p, name=f"{backbone.name}_finetune"), recipe, n_classes), fmap


def set_head(dense, head: tuple) -> None:
    """The Dense head's weights from (kernel, bias): (D,) and a scalar for two classes, else (D, K), (K,)."""
    units = dense.get_weights()[1].shape[0]
    dense.set_weights([np.asarray(head[0], np.float32).reshape(-1, units),
                       np.asarray(head[1], np.float32).reshape(-1)])


def _compiled(model, recipe: Recipe, n_classes: int):
    """``model`` compiled as the recipe trains: Adam at its rate, the task's loss."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate), loss=output_layer(n_classes)[2])
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


@dataclass
class FoldNetwork:
    """One fold's network: its feature-map model file, as a registry entry, and its head."""

    entry: Backbone
    head: DenseHead


@dataclass
class FinetuneResult:
    """oof: P(dog) per training row from the network that did not see its fold; networks: one per
    fold; features: {fold backbone name: {photo id: GAP row}} for the rows each network predicted
    (its held-out fold, the extra rows, the test photos); seconds: per fold."""

    oof: np.ndarray
    networks: list[FoldNetwork]
    features: dict[str, dict[str, np.ndarray]]
    seconds: list[float] = field(default_factory=list)

    def crossfit(self) -> CrossFit:
        """The level-1 CrossFit: fold k's head reads fold k's network's features."""
        return CrossFit(self.oof, [n.head for n in self.networks], "fold_mean",
                        inputs=[n.entry.name for n in self.networks])


def work_folder(root: Path, backbone: Backbone, weights_id: str, recipe: Recipe, train: list[Photo],
                labels, fold: np.ndarray) -> Path:
    """Where this fine-tuning keeps its finished folds: named by everything that determines them
    (backbone, weights, recipe, the photos and their contents' sizes, as the feature cache's
    fingerprint has them, labels, folds), so a resumed run finds exactly its own."""
    digest = hashlib.md5(json.dumps([backbone.name, weights_id, recipe_id(recipe), [p.id for p in train],
                                     [p.size for p in train], np.asarray(labels).tolist(),
                                     np.asarray(fold).tolist()]).encode())
    return Path(root) / f"{backbone.name}-{digest.hexdigest()[:12]}"


# Fields added to Recipe after folds were kept: left out of a work folder's name while they keep
# their default, so folds trained before they existed are still found.
LATER_FIELDS = {"frozen_until": None, "precision": "float32", "networks": None}


def network_folds(fold: np.ndarray, recipe: Recipe) -> np.ndarray:
    """Which fold network predicts each row: its fold, or with ``recipe.networks`` = G the
    network of its fold's group (the i-th fold value goes to network i % G)."""
    fold = np.asarray(fold)
    if not recipe.networks:
        return fold
    values = np.unique(fold)
    if not 2 <= recipe.networks <= len(values):
        raise ValueError(f"Recipe.networks {recipe.networks}: between 2 and the run's {len(values)} folds")
    return np.searchsorted(values, fold) % recipe.networks


def recipe_id(recipe: Recipe) -> dict:
    return {k: v for k, v in asdict(recipe).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


class FoldClock:
    """The time fine-tuning said it would take, re-measured as folds finish: a fold that takes more
    than a quarter longer or shorter than the current estimate (a machine shared with another job,
    a first estimate measured on too few steps) revises it, and the revision is said."""

    def __init__(self, name: str, seconds: float | None, folds: int):
        self.name, self.left = name, folds
        self.per_fold = seconds / folds if seconds and folds else None

    def fold_done(self, k, seconds: float) -> str | None:
        """Record fold ``k``'s ``seconds``; returns the revised estimate's sentence, if any."""
        self.left -= 1
        if not self.per_fold or abs(seconds - self.per_fold) <= 0.25 * self.per_fold:
            return None
        said = (f"{self.name} fine-tuning: fold {k} took {seconds:.0f} s, not the {self.per_fold:.0f} s "
                f"estimated; re-measured: about {seconds * self.left / 60:.0f} min for the "
                f"{self.left} fold(s) left")
        self.per_fold = seconds
        return said if self.left else None


def finetune_folds(backbone: Backbone | str, weights, train: list[Photo], y: np.ndarray,
                   fold: np.ndarray, warm_features: np.ndarray | None, extra: list[Photo], work: Path,
                   recipe: Recipe = Recipe(), workers: int = WORKERS, progress: bool = True,
                   runtime: str = "auto", callbacks=None, devices: list[str] | None = None,
                   estimate: float | None = None) -> FinetuneResult:
    """Train one network per fold (resuming at the first fold not yet kept in ``work``), predict
    its held-out fold and ``extra`` (test and held-out photos); ``warm_features``: the frozen
    backbone's GAP features of ``train`` (the warm-up of each fold's head; None with a top-only
    recipe, which computes them from its kept activations). ``callbacks``:
    (fold, its held-out photos) -> more Keras callbacks for that fold's training (the recipe
    benchmark scores the held-out fold after every epoch with them). ``devices``: each fold
    network trains on these together (default: every GPU when there are several). ``estimate``:
    the seconds said for the folds not yet kept, revised aloud as folds finish (``FoldClock``)."""
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    resolved = resolve_weights(backbone, weights)
    work.mkdir(parents=True, exist_ok=True)
    fold = network_folds(fold, recipe)
    left = sum(not is_kept(work / f"fold{k}") for k in np.unique(fold))
    started = time.perf_counter()
    cached = (frozen_part(backbone, resolved, recipe, train, extra, work.parent, runtime, progress)
              if recipe.frozen_until and left else None)
    if cached is not None:  # the warm-up reads what the network itself computes (float32), not the cache's
        warm_features = cached.warm
    if estimate:  # what is left of it is the folds'; none where the frozen pass took more than it
        # said in all (its speed is guessed from the extraction's): no fold time to revise against
        left_of_it = estimate - (time.perf_counter() - started)
        estimate = left_of_it if left_of_it > 0.1 * estimate else None
    clock = FoldClock(backbone.name, estimate, left)
    oof = np.full(prediction_shape(len(train), len(np.unique(y))), np.nan)
    networks, features, seconds = [], {}, []
    devices = training_devices() if devices is None else devices
    trainer = FoldTrainer(backbone, resolved, recipe, len(np.unique(y)), devices)
    for k in np.unique(fold):
        held = fold == k
        done = work / f"fold{k}"
        held_photos = [p for p, h in zip(train, held) if h]
        # One process trains a fold at a time: a second one (another notebook, another terminal
        # on the same cache) waits for it, then reuses the fold it kept.
        with extraction_lock(done, log):
            if is_kept(done):
                log.info("%s fine-tuning: fold %d already trained in %s, reusing it", backbone.name, k, done)
            else:
                started = time.perf_counter()
                _train_fold(backbone, resolved, [p for p, h in zip(train, held) if not h], y[~held],
                            warm_features[~held], y[~held], recipe, done, workers, progress, k,
                            held_photos + extra, runtime,
                            callbacks=list(callbacks(k, held_photos)) if callbacks else [], devices=devices,
                            cached=cached and cached.for_fold(~held), trainer=trainer)
                seconds.append(round(time.perf_counter() - started, 1))
                revised = clock.fold_done(k, seconds[-1])
                if revised:
                    log.info("%s", revised)
            net, kept = _load_fold(done, backbone, k)
            _predict_missing(net, kept, held_photos + extra, done, runtime)
        feats = {p.id: kept[(p.id, p.size)] for p in held_photos + extra}
        networks.append(net)
        features[net.entry.name] = feats
        X = np.stack([feats[p.id] for p, h in zip(train, held) if h])
        oof[held] = class_proba(net.head, X)
    trainer.close()
    return FinetuneResult(oof, networks, features, seconds)


@dataclass
class FrozenPart:
    """The frozen lower part's activations (``Recipe.frozen_until``) of a fine-tuning's training
    photos (plain and mirrored) and of its extra photos (plain), and which training rows a fold
    trains on (``rows``) and predicts (the rest, then every extra photo)."""

    train: Activations
    extra: Activations
    warm: np.ndarray  # the pretrained network's GAP features of the training photos, from ``train``
    rows: np.ndarray | None = None

    def for_fold(self, training: np.ndarray) -> "FrozenPart":
        return replace(self, rows=np.flatnonzero(training))

    def predicted(self) -> list[tuple[Activations, np.ndarray]]:
        held = np.setdiff1d(np.arange(self.train.n), self.rows)
        return [(self.train, held), (self.extra, np.arange(self.extra.n))]


def frozen_part(backbone: Backbone, resolved, recipe: Recipe, train: list[Photo], extra: list[Photo],
                root: Path, runtime: str, progress: bool) -> FrozenPart:
    """Compute (or find kept under ``root``/activations) the lower part's activations of the
    training photos, per view the recipe trains on, and of the extra photos; computed once for all
    folds, the whole point: the folds differ only above the split."""
    import keras

    fmap = build_feature_map_model(backbone, resolved)
    lower, upper, mirrored = split_network(fmap, backbone, recipe.frozen_until)
    wid = weights_identity(resolved)
    views = VIEWS if recipe.flip else VIEWS[:1]
    folders = [store_folder(Path(root) / "activations", backbone, wid, recipe.frozen_until, photos)
               for photos in (train, extra)]
    kept = [compute(photos, folder, backbone, recipe.frozen_until, lower, mirrored, v, runtime, progress)
            for photos, folder, v in ((train, folders[0], views), (extra, folders[1], VIEWS[:1]))]
    warm = np.nan_to_num(gap_of(upper, kept[0], np.arange(kept[0].n)))  # an unreadable photo: zeros
    keras.backend.clear_session()
    return FrozenPart(*kept, warm)


def is_kept(done: Path) -> bool:
    """A fold folder whose training finished (its record is written last, atomically)."""
    return (done / "fold.json").is_file()


class Speed(NamedTuple):
    """Measured on this machine: photos per second of a training step (``train``) and, for a
    top-only recipe, of the pass through the frozen lower part (``frozen``, else None); the day
    it was measured (``measured``; None: just now)."""

    train: float
    frozen: float | None = None
    measured: str | None = None


def training_rate(backbone: Backbone | str, weights, photos: list[Photo], recipe: Recipe = Recipe(),
                  steps: int = 3) -> Speed:
    """Photos per second of training on this machine, measured: a throwaway copy of the network
    takes one batch of the recipe's size ``steps`` times; the first step (graph building) is not
    counted. A top-only recipe's frozen part is timed on that batch too: its pass costs from a
    quarter of a training step (the last block trains) to several steps (stages 4 onward train),
    so no one ratio to the training speed guesses it."""
    import keras

    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    batch = [photos[i % len(photos)] for i in range(recipe.batch_size)]
    pixels, _ = load_batch(PhotoReader(), batch, backbone, False)
    labels = np.array([p.label for p in batch], np.float32)
    model, fmap = build_network(backbone, resolve_weights(backbone, weights), recipe)
    frozen = None
    if recipe.frozen_until:  # what trains is the top, on activations
        lower, upper, _ = split_network(fmap, backbone, recipe.frozen_until)
        frozen = _per_second(lambda: lower.predict_on_batch(pixels), len(batch), 3)
        pixels = lower.predict_on_batch(pixels)
        model = top_model(model, upper, recipe, 2)
    train = _per_second(lambda: model.train_on_batch(pixels, labels), len(batch), max(2, steps))
    keras.backend.clear_session()
    return Speed(train, frozen)


def _per_second(call, n: int, times: int) -> float:
    """``n`` / the mean seconds of ``call()`` run ``times`` times, the first (tracing) not counted."""
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return n / float(np.mean(seconds[1:]))


def rate_key(backbone: Backbone, recipe: Recipe) -> str:
    """What a training speed depends on: the network and its input, the batch, the devices, the
    software and the machine (CPU model and flags, cores); not the weights or the photos."""
    import keras

    parts = {"backbone": backbone.name, "input": list(backbone.input_size), "batch": recipe.batch_size,
             "trains_after": recipe.frozen_until,
             "devices": list(training_devices()), "keras": keras.__version__,
             "backend": keras.backend.backend(), "cpu": cpu_info(), "cores": os.cpu_count()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def remembered_rate(backbone: Backbone, weights, photos: list[Photo], recipe: Recipe = Recipe(),
                    rates: Path = RATES_FILE) -> Speed:
    """The training speed (``Speed``) on this machine, measured once and kept.

    Measuring costs a network built and a training step traced (about 12 s for Lite0 on 2 cores,
    more than the training of a small run), so a speed measured on this machine is kept in
    ``rates`` and reused; the estimate it gives is re-measured as folds finish (FoldClock)."""
    key = rate_key(backbone, recipe)
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(rates.read_text()).get(key)
        if known and (known.get("frozen_per_s") or not recipe.frozen_until):  # kept before it was timed
            return Speed(float(known["photos_per_s"]), known.get("frozen_per_s"), known["measured"])
    speed = training_rate(backbone, weights, photos, recipe)
    with contextlib.suppress(OSError):  # a read-only home keeps working, measuring each time
        rates.parent.mkdir(parents=True, exist_ok=True)
        with extraction_lock(rates):
            try:
                table = json.loads(rates.read_text())
            except (OSError, ValueError):
                table = {}
            table[key] = {"photos_per_s": speed.train, "frozen_per_s": speed.frozen,
                          "measured": time.strftime("%Y-%m-%d"), "backbone": backbone.name,
                          "batch": recipe.batch_size}
            atomic_write(rates, lambda f: f.write(json.dumps(table, indent=1).encode()))
    return speed


def estimate_seconds(n_train: int, n_predict: int, folds: int, epochs: int, train_rate: float,
                     predict_rate: float, folds_left: int | None = None, views: int = 0) -> float:
    """Seconds to fine-tune the folds left: each trains on the other folds' photos for ``epochs``
    and predicts its own fold and ``n_predict`` more photos (test, held out). ``views``: with a
    frozen lower part (``Recipe.frozen_until``), how many times each training photo goes through
    it (1, 2 with flips), once for all folds, the extra photos once; its pass is costed as a
    frozen extraction (``predict_rate``, an upper bound) and predicting from it as nothing."""
    left = folds if folds_left is None else folds_left
    training = epochs * n_train * (folds - 1) / folds / train_rate * left
    if views:
        return training + (views * n_train + n_predict) / predict_rate
    return training + (n_train / folds + n_predict) / predict_rate * left


class FoldTrainer:
    """The network one fine-tuning's folds train, built and traced once (on the first fold that
    trains). Before each fold it is reset to the pretrained weights, the fold's warm head, a fresh
    optimizer and the recipe's dropout seed, so a fold trains as on a network built for it
    (whether the folds before it trained in this process or were kept by an earlier one), without
    Keras building the network and tracing its training and prediction steps again: 5-9 s a fold
    on 2 cores, more than a small photo set's fold takes to train. ``train`` is the model that
    trains: the whole network, or with a top-only recipe the model over its kept activations
    (``upper``, the part after the split, then its head)."""

    def __init__(self, backbone: Backbone, resolved, recipe: Recipe, n_classes: int, devices: list[str]):
        self.backbone, self.resolved, self.recipe, self.n_classes = backbone, resolved, recipe, n_classes
        self.devices, self.built = devices, False

    def _build(self) -> None:
        recipe, n_classes = self.recipe, self.n_classes
        with _replicated(self.devices):
            self.model, self.fmap = _network(self.backbone, self.resolved, recipe, None, n_classes)
            self.upper = (split_network(self.fmap, self.backbone, recipe.frozen_until)[1]
                          if recipe.frozen_until else None)
            self.train = (top_model(self.model, self.upper, recipe, n_classes) if recipe.frozen_until
                          else self.model)
            self.train.optimizer.build(self.train.trainable_variables)
        self.weights = self.model.get_weights()
        self.optimizer = [v.numpy() for v in self.train.optimizer.variables]
        generators = [getattr(layer, "seed_generator", None) for layer in _all_layers(self.train)]
        self.seeds = [(g.state, g.state.numpy()) for g in generators if g is not None]  # dropout > 0
        self.built = True

    def reset(self, head: tuple) -> "FoldTrainer":
        """Pretrained weights, ``head`` = (kernel, bias) on the Dense, optimizer and dropout as new."""
        if not self.built:
            self._build()
        self.model.set_weights(self.weights)
        set_head(self.model.get_layer("head"), head)
        for v, value in zip(self.train.optimizer.variables, self.optimizer):
            v.assign(value)
        for state, value in self.seeds:
            state.assign(value)
        return self

    def close(self) -> None:
        if self.built:
            import keras

            keras.backend.clear_session()
            self.built = False


def _train_fold(backbone: Backbone, resolved, photos: list[Photo], labels: np.ndarray,
                warm_X: np.ndarray, warm_y: np.ndarray, recipe: Recipe, done: Path, workers: int,
                progress: bool, k: int, predict: list[Photo], runtime: str, callbacks=(),
                devices: list[str] | None = None, cached: FrozenPart | None = None,
                trainer: FoldTrainer | None = None) -> None:
    """Train fold ``k``'s network and keep it with its predictions in ``done``, atomically.
    ``cached``: train only the part above ``recipe.frozen_until`` on its kept activations.
    ``trainer``: the network the folds share (default: one for this fold alone)."""
    import keras

    keras.utils.set_random_seed(recipe.seed + int(k))
    devices = training_devices() if devices is None else devices
    own = trainer is None
    trainer = trainer or FoldTrainer(backbone, resolved, recipe, len(np.unique(labels)), devices)
    net = trainer.reset(warm_head(recipe, warm_X, warm_y, k))
    if cached is not None:
        source = ActivationBatches(cached.train, cached.rows, labels, recipe.batch_size, recipe.flip,
                                   recipe.seed + int(k))
    else:
        source = PhotoBatches(photos, labels, backbone, recipe.batch_size, recipe.flip, recipe.seed + int(k))
    log.info("%s fine-tuning: fold %d, %d photos, %d epoch(s)%s%s", backbone.name, k, len(photos), recipe.epochs,
             f", layers after {recipe.frozen_until} only" if cached is not None else "",
             f", each batch split across {len(devices)} devices" if len(devices) > 1 else "")
    started = time.perf_counter()
    bar = progress_bar(len(photos) * recipe.epochs, f"{backbone.name} fold {k}", progress)
    # shuffle=False: the batches come in our own seeded order (Keras 3 shuffles a PyDataset's
    # batches with Python's global random, whose state depends on what ran before in the process)
    history = net.train.fit(batches(source, workers), epochs=recipe.epochs, verbose=0, shuffle=False,
                            callbacks=[_Progress(bar, photos, recipe), *callbacks])
    bar.close()
    train_seconds = time.perf_counter() - started
    tmp = done.with_name(f"{done.name}.tmp{os.getpid()}")  # this process's own
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    float32_copy(net.fmap, backbone, resolved, recipe).save(tmp / "network.keras")
    kernel, bias = net.model.get_layer("head").get_weights()
    if cached is not None:  # the top on the kept activations: no pass over the photos
        gap = np.concatenate([gap_of(net.upper, acts, rows) for acts, rows in cached.predicted()])
    else:  # through the saved file, exactly as stacking.predict will
        entry = _entry(backbone, tmp / "network.keras", k)
        gap, _ = Extractor(entry, str(tmp / "network.keras"), runtime).features(predict)
    _save_features(tmp, [(p.id, p.size) for p in predict], gap)
    (tmp / "fold.json").write_text(json.dumps({
        "fold": int(k), "photos": len(photos), "recipe": asdict(recipe), "head": {
            "kernel": (kernel[:, 0] if kernel.shape[1] == 1 else kernel).tolist(),
            "bias": float(bias[0]) if len(bias) == 1 else bias.tolist()},
        "loss": [float(v) for v in history.history["loss"]],
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(train_seconds / max(recipe.epochs, 1), 1)}))
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)
    if own:
        trainer.close()


def float32_copy(fmap, backbone: Backbone, resolved, recipe: Recipe):
    """``fmap`` itself when it computes in float32, else a float32 network with its weights
    (what is saved predicts in float32, through ONNX Runtime where the rest does)."""
    if recipe.precision == "float32":
        return fmap
    plain = build_feature_map_model(backbone, resolved)
    plain.set_weights(fmap.get_weights())
    return plain


def top_model(model, upper, recipe: Recipe, n_classes: int):
    """The training model over activations: ``upper`` then ``model``'s own pooling, dropout and
    head (the same layers: training it trains the whole network's top), compiled as ``model``."""
    import keras

    x = keras.Input(upper.input_shape[1:], name="activations")
    p = model.get_layer("head")(model.get_layer("head_dropout")(model.get_layer("gap")(upper(x))))
    return _compiled(keras.Model(x, p, name=f"{model.name}_top"), recipe, n_classes)


def gap_of(upper, acts: Activations, rows: np.ndarray, batch: int = 256) -> np.ndarray:
    """GAP features of ``rows`` of ``acts`` through ``upper`` (NaN rows stay NaN: unreadable)."""
    out = [np.asarray(upper.predict_on_batch(acts.rows(rows[i:i + batch])), np.float32).mean(axis=(1, 2))
           for i in range(0, len(rows), batch)]
    return np.concatenate(out) if out else np.zeros((0, upper.output_shape[-1]), np.float32)


class ActivationBatches(PhotoBatches):
    """Training batches of kept activations (``FrozenPart``): rows ``rows`` of ``acts``, each
    from its mirror image where the epoch's seeded flip says so, unreadable photos weighted 0."""

    def __init__(self, acts: Activations, rows: np.ndarray, labels: np.ndarray, batch_size: int, flip: bool,
                 seed: int):
        self.acts, self.rows, self.labels = acts, np.asarray(rows), np.asarray(labels, np.float32)
        self.photos = self.rows  # for len() and the order
        self.batch_size, self.flip, self.seed, self.epoch = batch_size, flip, seed, 0
        self.order = self._order()

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.acts.rows(self.rows[idx], self._mirrored(i, len(idx)))
        weights = self.acts.ok[self.rows[idx]].astype(np.float32)
        return np.nan_to_num(x), self.labels[idx], weights


def warm_head(recipe: Recipe, X: np.ndarray, y: np.ndarray, k=0) -> tuple[np.ndarray, float | np.ndarray]:
    """(kernel, bias) on raw GAP features of the head fine-tuning starts from, fitted on the
    frozen backbone's cached features of the fold's training photos."""
    if recipe.warmup == "logistic":
        head = LogisticHead().fit(X, y)
    elif recipe.warmup == "keras":
        head = KerasHead(dropout=recipe.dropout, epochs=recipe.warmup_epochs, standardize=False,
                         random_state=recipe.seed + int(k)).fit(X, y)
    else:
        raise ValueError(f"Recipe.warmup must be 'keras' or 'logistic', not {recipe.warmup!r}")
    mean, scale, coef, intercept = linear_parts(head)
    coef = np.asarray(coef)
    kernel = coef / (scale if coef.ndim == 1 else scale[:, None])  # (D,) or (D, K)
    bias = intercept - mean @ kernel
    return kernel, float(bias) if coef.ndim == 1 else bias


def _Progress(bar, photos: list[Photo], recipe: Recipe):
    """A Keras callback moving ``bar`` by each batch's photos, with the running loss."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            start = batch * recipe.batch_size
            bar.update(len(photos[start:start + recipe.batch_size]))
            if logs and "loss" in logs:
                bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    return Progress()


def _entry(backbone: Backbone, path: Path, k) -> Backbone:
    return Backbone(f"{backbone.name}-ft{int(k)}", None, backbone.input_size, "none",
                    backbone.feature_dim, str(path), path.name, resize=backbone.resize)


def _load_fold(done: Path, backbone: Backbone, k) -> tuple[FoldNetwork, dict[tuple[str, int], np.ndarray]]:
    info = json.loads((done / "fold.json").read_text())
    with np.load(done / "features.npz") as z:
        feats = {(i, int(n)): g for i, n, g in zip(z["ids"].tolist(), z["sizes"], z["gap"])}
    kernel = np.array(info["head"]["kernel"])
    n_classes = 2 if kernel.ndim == 1 else kernel.shape[1]
    head = DenseHead(kernel, info["head"]["bias"])
    head.fit(np.zeros((n_classes, kernel.shape[0])), np.arange(n_classes))
    return FoldNetwork(_entry(backbone, done / "network.keras", k), head), feats


def _predict_missing(net: FoldNetwork, feats: dict[tuple[str, int], np.ndarray], photos: list[Photo], done: Path,
                     runtime: str) -> None:
    """A kept fold knows the photos of the run that trained it; photos this run needs beyond those
    (other test or held-out photos) are predicted by its saved network now and kept with the rest,
    never left without features (the ensemble would give them 0.5)."""
    missing = list({p.id: p for p in photos if (p.id, p.size) not in feats}.values())
    if not missing:
        return
    log.info("%s: %d photos this fold has not seen yet (or that changed), predicted with its saved "
             "network", net.entry.name, len(missing))
    gap, _ = Extractor(net.entry, net.entry.weights, runtime).features(missing)
    feats.update(zip([(p.id, p.size) for p in missing], gap))
    _save_features(done, list(feats), np.stack(list(feats.values())))


def _save_features(folder: Path, keys: list[tuple[str, int]], gap: np.ndarray) -> None:
    """A fold network's GAP rows by (photo id, size): a photo that changed is predicted anew;
    ``folder/features.npz``, replaced atomically through a file of this process's own."""
    tmp = folder / f"features.tmp{os.getpid()}.npz"
    np.savez(tmp, ids=np.array([i for i, _ in keys], dtype=str), sizes=np.array([n for _, n in keys]), gap=gap)
    tmp.replace(folder / "features.npz")


def fold_stats(work: Path) -> list[dict]:
    """What each kept fold says about its training (seconds, loss per epoch)."""
    return [{k: v for k, v in json.loads(f.read_text()).items() if k != "head"}
            for f in sorted(Path(work).glob("fold*/fold.json"))]
