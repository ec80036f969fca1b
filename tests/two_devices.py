"""Kaggle's T4 x2 paths on two logical CPU devices, in one process for both tests that need them
(``tests.conftest.two_devices`` runs it once): extraction with one replica per device, and one
fold network trained across both. Prints ``key value`` lines.

GPUs are hidden and TF32 is off, so the replicas are compared with a plain CPU model on any
machine at float32's precision; training uses plain SGD (Adam divides out any constant factor
on the gradients, so it would hide replicas that sum their gradients instead of averaging them).
"""

import sys

import keras
import numpy as np
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")
tf.config.experimental.enable_tensor_float_32_execution(False)
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from features.data import PhotoReader, load_photos  # noqa: E402 (after the devices are set)
from features.extract import Extractor, load_batch  # noqa: E402
from features.models import resolve_weights  # noqa: E402
from features.registry import get_backbone  # noqa: E402
from oof import finetune  # noqa: E402

devices = [d.name for d in tf.config.list_logical_devices("CPU")]
assert len(devices) == 2, devices
photos = load_photos(sys.argv[1]).train

# Extraction: one replica per device, against one plain Keras model.
two = Extractor("efficientnet_lite0", devices=devices, batch_size=4)
one = Extractor("efficientnet_lite0", runtime="keras", batch_size=4)
assert two.run.streams == 2 and one.run.streams == 1
a, _ = two.features(photos)
b, _ = one.features(photos)
placed = [sorted({v.value.device.rsplit("/", 1)[-1] for v in m.weights}) for _, m, _ in
          [two.run.replicas.get() for _ in devices]]
print("extract diff", float(np.abs(a - b).max() / np.abs(b).max()))
print("extract batches", sorted(two.run.batches.values()))
print("extract placed", placed)

# Training: one network across both devices, against the same recipe on one.
photos = photos[::2]
y = np.array([p.label for p in photos])
backbone = get_backbone("efficientnet_lite0")
weights = resolve_weights(backbone, "default")
recipe = finetune.Recipe(batch_size=8, dropout=0.0, flip=False)  # nothing random but the seeded order
pixels, _ = load_batch(PhotoReader(), photos, backbone, False)
for name, on, rate in [("two", devices, 0.05), ("one", [], 0.05), ("one_double_rate", [], 0.1)]:
    keras.utils.set_random_seed(recipe.seed)
    model, fmap = finetune.build_network(backbone, weights, recipe, (np.zeros(backbone.feature_dim), 0.0),
                                         devices=on)
    with model.distribute_strategy.scope():
        model.compile(optimizer=keras.optimizers.SGD(rate), loss=model.loss)
    data = finetune.batches(finetune.PhotoBatches(photos, y, backbone, 8, False, recipe.seed), 1)
    model.fit(data, epochs=1, verbose=0)
    var = next(v for v in model.trainable_variables if len(v.shape) == 4)
    copies = getattr(var.value, "values", [var.value])
    print(name, "replicas", model.distribute_strategy.num_replicas_in_sync)
    print(name, "placed", sorted(c.device.rsplit("/", 1)[-1] for c in copies))
    print(name, "copies_differ", float(np.abs(copies[0].numpy() - copies[-1].numpy()).max()))
    print(name, "p", model.predict(pixels, verbose=0)[:, 0].tolist())

# The folds' shared network across both devices: reset between folds, a fold trains as the first.
trainer = finetune.FoldTrainer(backbone, weights, recipe, 2, devices)
for turn in ("first", "again"):
    trainer.reset((np.zeros(backbone.feature_dim), 0.0))
    data = finetune.batches(finetune.PhotoBatches(photos, y, backbone, 8, False, recipe.seed), 1)
    trainer.train.fit(data, epochs=1, verbose=0, shuffle=False)  # as _train_fold: our order
    print("reset", turn, trainer.train.predict(pixels, verbose=0)[:, 0].tolist())
print("reset replicas", trainer.train.distribute_strategy.num_replicas_in_sync)
