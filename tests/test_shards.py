"""Sharded extraction, features.merge, and the Ray engine, against a single local run on real photos."""

import importlib.util

import numpy as np
import pytest

from features.cache import RECIPE_KEYS, load_features, read_attrs
from features.data import load_photos
from features.extract import extract
from features.extract import main as extract_main
from features.merge import ShardError, merge
from features.merge import main as merge_main
from features.runtime import TOLERANCE
from features.shards import parse_shard, shard_files
from tests.conftest import make_kaggle_dir, unavailable

BACKBONE = "efficientnet_lite0"
CHUNK = 8  # several chunks per shard on a small set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 cats, 20 dogs, 9 test photos, one training photo corrupt (it must land in the same place)."""
    root = make_kaggle_dir(tmp_path_factory.mktemp("shards") / "data", 20, 9)
    (root / "train" / "dog.5.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.fixture(scope="module")
def single(data):
    return extract(load_photos(data), BACKBONE, cache_dir=data.parent / "single", chunk_size=CHUNK,
                   progress=False)


@pytest.fixture(scope="module")
def shards(data):
    folder = data.parent / "sharded"
    for i in range(3):
        args = ["--data", str(data), "--backbone", BACKBONE, "--cache", str(folder),
                "--chunk-size", str(CHUNK), "--shard", f"{i}/3"]
        assert extract_main(args) == 0
    return folder


def assert_same_cache(a_path, b_path, tolerance=0.0):
    a, b = load_features(a_path), load_features(b_path)
    assert list(a.train_ids) == list(b.train_ids) and list(a.test_ids) == list(b.test_ids)
    assert np.array_equal(a.label, b.label) and np.array_equal(a.test_ok, b.test_ok)
    assert a.failed == b.failed
    scale = np.nanmax(np.abs(a.train))
    assert np.nanmax(np.abs(a.train - b.train)) <= tolerance * scale
    assert np.nanmax(np.abs(a.test - b.test)) <= tolerance * scale
    ra, rb = read_attrs(a_path), read_attrs(b_path)
    assert {k: ra[k] for k in RECIPE_KEYS} == {k: rb[k] for k in RECIPE_KEYS}


def test_three_shards_merge_into_the_single_run_cache(single, shards, capsys):
    assert len(shard_files(shards, BACKBONE)) == 3
    assert merge_main(["--backbone", BACKBONE, "--cache", str(shards)]) == 0
    merged = shards / f"gap_{BACKBONE}.h5"
    assert capsys.readouterr().out.strip() == str(merged)
    assert_same_cache(single, merged)
    assert load_features(merged).failed == [("train", "dog.5", load_features(single).failed[0][2])]
    # Consumers take it as their own: a normal extraction request finds it up to date.
    before = merged.stat().st_mtime_ns
    photos = load_photos(shards.parent / "data")
    assert extract(photos, BACKBONE, cache_dir=shards, chunk_size=CHUNK, progress=False) == merged
    assert merged.stat().st_mtime_ns == before


def test_missing_and_mismatched_shards_are_refused(data, shards, tmp_path, capsys):
    files = shard_files(shards, BACKBONE)
    with pytest.raises(ShardError, match=r"missing shard\(s\) 1/3 of efficientnet_lite0"):
        merge([files[0], files[2]], tmp_path)
    with pytest.raises(ShardError, match="shard 0/3 given twice"):
        merge([files[0], files[0], files[1], files[2]], tmp_path)
    other = extract(load_photos(data), BACKBONE, cache_dir=tmp_path / "other", chunk_size=CHUNK,
                    shard=(1, 3), fast_decode=True, progress=False)
    with pytest.raises(ShardError, match="made differently.*fast_decode"):
        merge([files[0], other, files[2]], tmp_path)
    two_way = extract(load_photos(data), BACKBONE, cache_dir=tmp_path / "two", chunk_size=CHUNK,
                      shard=(1, 2), progress=False)
    assert merge_main([str(files[0]), str(two_way)]) == 2
    assert "2-way split" in capsys.readouterr().err
    assert not (tmp_path / f"gap_{BACKBONE}.h5").exists()
    with pytest.raises(ValueError, match="I/N with 0 <= I < N"):
        parse_shard("3/3")


def test_ray_engine_on_a_local_two_cpu_instance(data, single):
    if importlib.util.find_spec("ray") is None:
        unavailable("needs ray (pip install gapstack[ray])")
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = extract(load_photos(data), BACKBONE, cache_dir=data.parent / "ray", chunk_size=CHUNK,
                       engine="ray", progress=False)
    finally:
        ray.shutdown()
    assert_same_cache(single, path, tolerance=TOLERANCE)
    assert read_attrs(path)["runtime"] == read_attrs(single)["runtime"]
