"""Extraction on real photos: parity with plain Keras, bad files, cache reuse and refusal, kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from features.cache import StaleCacheError, cache_path, load_features, read_attrs
from features.data import load_photos
from features.defaults import STREAMS
from features.extract import extract
from features.images import load_for_backbone
from features.registry import get_backbone, with_overrides
from tests.conftest import WEIGHTS, cpu_path, make_kaggle_dir

LITE0 = get_backbone("efficientnet_lite0")
REPO = Path(__file__).resolve().parent.parent


def plain_keras_features(paths, size=(224, 224)):
    """The reference: the shipped .keras model and global average pooling, nothing of ours."""
    model = keras.saving.load_model(WEIGHTS / "efficientnet_lite0_notop.keras")
    pixels = np.stack([load_for_backbone(Path(p).read_bytes(), str(p), size) for p in paths])
    return np.asarray(model.predict(pixels.astype(np.float32), verbose=0)).mean(axis=(1, 2))


@cpu_path
def test_features_equal_plain_keras_and_bad_files_are_recorded(small_data, tmp_path):
    (small_data / "train" / "cat.0.jpg").write_bytes(b"")  # zero bytes
    good = (small_data / "test" / "5.jpg").read_bytes()
    (small_data / "test" / "5.jpg").write_bytes(good[: len(good) // 3])  # truncated
    photos = load_photos(small_data)
    path = extract(photos, LITE0, cache_dir=tmp_path / "cache", batch_size=5, progress=False)
    f = load_features(path)

    assert f.train.shape == (23, 1280) and f.test.shape == (8, 1280)
    assert "cat.0" not in set(f.train_ids) and len(set(f.train_ids)) == 23
    assert list(f.test_ids) == [str(i) for i in range(1, 9)]
    assert f.test_ok.tolist() == [True] * 4 + [False] + [True] * 3
    assert np.isnan(f.test[4]).all() and np.isfinite(np.delete(f.test, 4, axis=0)).all()
    reasons = {(s, i): r for s, i, r in f.failed}
    assert "empty file" in reasons[("train", "cat.0")]
    assert "truncated" in reasons[("test", "5")]
    assert f.label.tolist() == [0] * 11 + [1] * 12

    # Every row, in order: batches come back from concurrent forward passes (our default on a CPU).
    assert f.attrs["last_run"]["streams"] == STREAMS and f.attrs["last_run"]["photos"] == 32
    train_files = [small_data / "train" / f"{i}.jpg" for i in f.train_ids]
    np.testing.assert_allclose(f.train, plain_keras_features(train_files), atol=1e-4)
    assert f.attrs["weights_id"] == "md5:47eeba030d0a930e462a7de76716de9e"
    assert f.attrs["input_size"] == [224, 224] and f.attrs["backbone"] == "efficientnet_lite0"


def test_cache_is_reused_and_stale_one_refused(small_data, tmp_path):
    cache = tmp_path / "cache"
    photos = load_photos(small_data)
    path = extract(photos, LITE0, cache_dir=cache, progress=False)
    stamp = path.stat().st_mtime_ns
    assert extract(photos, LITE0, cache_dir=cache, progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten

    bilinear = with_overrides(LITE0, resize="bilinear")
    with pytest.raises(StaleCacheError, match=r"resize: cache has 'area', asked for 'bilinear'"):
        extract(photos, bilinear, cache_dir=cache, progress=False)
    with pytest.raises(StaleCacheError, match=r"weights_id"):
        extract(photos, LITE0, weights=WEIGHTS / "efficientnet_lite1_notop.keras", cache_dir=cache,
                progress=False)
    (small_data / "test" / "8.jpg").unlink()  # other photos: a cache of their own, beside the first
    other = extract(load_photos(small_data), LITE0, cache_dir=cache, progress=False)
    assert other != path and read_attrs(other)["n_test"] == 7
    assert path.stat().st_mtime_ns == stamp and read_attrs(path)["n_test"] == 8
    remade = extract(load_photos(small_data), bilinear, cache_dir=cache, overwrite=True, progress=False)
    assert remade == other and read_attrs(other)["resize"] == "bilinear"


def test_killed_extraction_resumes(tmp_path):
    """A real subprocess killed with SIGKILL mid-run resumes with no lost or duplicated rows."""
    data = make_kaggle_dir(tmp_path / "data", 40, 24)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "features.extract", "--data", str(data), "--backbone",
           "efficientnet_lite0", "--cache", str(cache), "--batch-size", "8", "--chunk-size", "8"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    made = cache_path(cache, LITE0.name, load_photos(data))  # the photo set's own folder
    journal = made.with_name(made.name + ".partial")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(journal.glob("*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(journal.glob("*.npz")))
    assert 3 <= done_before < 13, "the run should have been killed part-way"
    assert not made.exists()

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr
    resumed = load_features(made)
    assert not journal.exists()

    fresh = load_features(extract(load_photos(data), LITE0, cache_dir=tmp_path / "fresh",
                                  batch_size=8, chunk_size=8, progress=False))
    assert list(resumed.train_ids) == list(fresh.train_ids) and len(resumed.train_ids) == 80
    assert list(resumed.test_ids) == list(fresh.test_ids)
    np.testing.assert_allclose(resumed.train, fresh.train, atol=1e-5)
    np.testing.assert_allclose(resumed.test, fresh.test, atol=1e-5)
    with h5py.File(made) as f:
        assert set(f) >= {"train", "test", "label", "train_ids", "test_ids", "test_ok"}


def test_two_processes_one_cache(tmp_path):
    """Two real processes started together extract into one cache (two notebook kernels): one
    extracts, the other waits, naming it, then reuses what it made; nothing is lost or done twice."""
    data = make_kaggle_dir(tmp_path / "data", 40, 8)
    cache = tmp_path / "cache"
    # Keras and 88 photos: the lock is held for seconds, far longer than start-up times differ.
    cmd = [sys.executable, "-m", "features.extract", "--data", str(data), "--backbone",
           "efficientnet_lite0", "--cache", str(cache), "--runtime", "keras", "--chunk-size", "8"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    extracted = [k for k, e in enumerate(errs) if "photos in" in e]
    assert len(extracted) == 1, errs  # exactly one did the work
    first, second = procs[extracted[0]], errs[1 - extracted[0]]
    assert f"process {first.pid} " in second and "waiting for it to finish" in second
    assert "up to date, reusing it" in second
    made = cache_path(cache, LITE0.name, load_photos(data))
    f = load_features(made)
    assert len(f.train_ids) == 80 and len(f.test_ids) == 8 and np.isfinite(f.train).all()
    assert not made.with_name(made.name + ".partial").exists()
    assert not list(cache.glob("**/*.tmp*"))


def test_cli_errors_name_the_problem(tmp_path, capsys):
    from features.extract import main

    assert main(["--data", str(tmp_path), "--backbone", "efficientnet_lite0"]) == 2
    assert f"{tmp_path}: missing split 'train'" in capsys.readouterr().err
    assert main(["--backbone", "nope"]) == 2
    assert "Unknown backbone 'nope'; available:" in capsys.readouterr().err


@cpu_path
def test_precision_is_part_of_the_recipe(small_data, tmp_path):
    """float16 features (the GPU path's mixed precision) are recorded as such, never mistaken for
    float32 ones; a cache from before the precision key counts as float32."""
    from features.runtime import choose_precision

    assert choose_precision("auto") == "float32"  # no GPU here
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("float8")
    photos = load_photos(small_data)
    half = extract(photos, LITE0, cache_dir=tmp_path / "half", batch_size=8, progress=False,
                   precision="mixed_float16")
    full = extract(photos, LITE0, cache_dir=tmp_path / "full", batch_size=8, progress=False)
    attrs = read_attrs(half)
    assert attrs["precision"] == "mixed_float16" and attrs["runtime"] == "keras"
    assert attrs["last_run"]["precision"] == "mixed_float16"
    a, b = load_features(half), load_features(full)
    assert a.train.dtype == np.float32 and list(a.train_ids) == list(b.train_ids)
    rel = np.abs(a.train - b.train).max() / np.abs(b.train).max()
    assert 0 < rel < 0.05, rel  # float16 arithmetic: close to float32, not identical
    with pytest.raises(StaleCacheError, match=r"precision: cache has 'mixed_float16', asked for 'float32'"):
        extract(photos, LITE0, cache_dir=tmp_path / "half", progress=False, precision="float32")
    with h5py.File(full, "a") as f:  # as written before precision was recorded
        del f.attrs["precision"]
    assert extract(photos, LITE0, cache_dir=tmp_path / "full", progress=False) == full


def test_many_backbones_decode_each_photo_once(small_data, tmp_path, monkeypatch):
    """extract_many: every photo decoded once for all backbones, and each backbone's cache equal to
    the one extract() makes alone (features, ids, the unreadable photos, the recipe)."""
    import features.extract as ex_mod
    from features.cache import RECIPE_KEYS
    from features.extract import extract_many

    (small_data / "train" / "cat.0.jpg").write_bytes(b"")
    good = (small_data / "test" / "5.jpg").read_bytes()
    (small_data / "test" / "5.jpg").write_bytes(good[: len(good) // 3])
    photos = load_photos(small_data)
    names = ["efficientnet_lite0", "efficientnet_lite1"]
    decodes = []
    real_decode = ex_mod.decode_rgb
    monkeypatch.setattr(ex_mod, "decode_rgb", lambda data, name, *a: decodes.append(name) or real_decode(data, name, *a))
    paths = extract_many(photos, names, cache_dir=tmp_path / "many", chunk_size=8, progress=False)
    assert sorted(decodes) == sorted({p.name for p in photos.train + photos.test})  # once each
    monkeypatch.undo()
    for name in names:
        alone = load_features(extract(photos, name, cache_dir=tmp_path / "one", chunk_size=8, progress=False))
        many = load_features(paths[name])
        assert list(many.train_ids) == list(alone.train_ids) and list(many.test_ids) == list(alone.test_ids)
        np.testing.assert_allclose(many.train, alone.train, atol=1e-6)
        np.testing.assert_allclose(many.test[many.test_ok], alone.test[alone.test_ok], atol=1e-6)
        assert many.failed == alone.failed and len(many.failed) == 2
        assert {k: many.attrs[k] for k in RECIPE_KEYS} == {k: alone.attrs[k] for k in RECIPE_KEYS}
        assert many.attrs["last_run"]["decoded_once_with"] == names
    again = extract_many(photos, names, cache_dir=tmp_path / "many", chunk_size=8, progress=False)
    assert again == paths and read_attrs(paths[names[0]])["last_run"]["decoded_once_with"] == names


def test_caches_of_different_photo_sets_live_side_by_side(tmp_path):
    """A run on other photos never needs --overwrite and never touches another set's cache; a
    cache made before caches had folders (CACHE/gap_<backbone>.h5) is still used for its photos."""
    import shutil

    sample = load_photos(make_kaggle_dir(tmp_path / "sample", 4, 2))
    mine = load_photos(make_kaggle_dir(tmp_path / "mine", 3, 3, start=20))
    cache = tmp_path / "cache"
    a = extract(sample, LITE0, cache_dir=cache, progress=False, precision="float32")
    stamp = a.stat().st_mtime_ns
    b = extract(mine, LITE0, cache_dir=cache, progress=False, precision="float32")
    assert a != b and a.parent.parent == b.parent.parent == cache and a.name == b.name == "gap_efficientnet_lite0.h5"
    assert extract(sample, LITE0, cache_dir=cache, progress=False, precision="float32") == a
    assert a.stat().st_mtime_ns == stamp  # reused, never remade
    assert len(load_features(b).train_ids) == 6 and len(load_features(a).train_ids) == 8
    flat = tmp_path / "old" / "gap_efficientnet_lite0.h5"  # an older version's cache of the sample
    flat.parent.mkdir()
    shutil.copyfile(a, flat)
    assert extract(sample, LITE0, cache_dir=tmp_path / "old", progress=False, precision="float32") == flat
    assert extract(mine, LITE0, cache_dir=tmp_path / "old", progress=False, precision="float32") != flat
