"""Kaggle's T4 x2 paths on two logical CPU devices: one replica per device for extraction, and one
fold network trained across both. Both read one run of tests/two_devices.py (the two_devices
fixture), a file of their own so that it is scheduled apart from the longer files."""

import numpy as np


def test_one_replica_per_device_on_two_logical_devices(two_devices):
    """Kaggle's T4 x2 path, on two logical CPU devices: each replica's weights live on its own
    device, both run batches, and the features are those of one plain Keras model."""
    assert float(two_devices["extract", "diff"]) < 1e-5
    batches = eval(two_devices["extract", "batches"])
    assert sum(batches) == 6 and min(batches) >= 1  # 24 photos in batches of 4, on both devices
    assert sorted(map(tuple, eval(two_devices["extract", "placed"]))) == [("device:CPU:0",), ("device:CPU:1",)]


def test_two_devices_train_one_network_as_one_device_would(two_devices):
    """Kaggle's T4 x2, on two logical CPU devices: the fold network is built once per device,
    each takes half of every batch, the copies stay identical, and the trained network predicts
    what the same training on one device predicts. Trained with plain SGD, so replicas that summed
    their gradients (twice the step) would differ: the same training at twice the rate does."""
    said = two_devices
    assert said["two", "replicas"] == "2" and said["one", "replicas"] == "1"
    assert eval(said["two", "placed"]) == ["device:CPU:0", "device:CPU:1"]
    assert float(said["two", "copies_differ"]) == 0.0
    two, one = np.array(eval(said["two", "p"])), np.array(eval(said["one", "p"]))
    double = np.array(eval(said["one_double_rate", "p"]))
    assert np.abs(two - 0.5).max() > 1e-3  # it trained (it started from a zero head: 0.5 everywhere)
    np.testing.assert_allclose(two, one, atol=1e-5)
    assert np.abs(double - one).max() > 100 * 1e-5  # a wrong gradient scale would show


def test_the_folds_shared_network_resets_on_two_devices(two_devices):
    """The network a fine-tuning's folds share (``FoldTrainer``), built across both devices:
    reset to the pretrained weights, a fresh head and a fresh optimizer, it trains the second
    time exactly as the first (mirrored weights and optimizer state restored on both copies)."""
    said = two_devices
    assert said["reset", "replicas"] == "2"
    first, again = np.array(eval(said["reset", "first"])), np.array(eval(said["reset", "again"]))
    assert np.abs(first - 0.5).max() > 1e-3  # it trained
    np.testing.assert_allclose(again, first, atol=1e-6)
