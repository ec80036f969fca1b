"""The Kaggle-layout loader on real shared folders, zipped and plain, and its errors."""

import shutil
import zipfile

import pytest

from features.data import DataError, PhotoReader, load_photos
from tests.conftest import PHOTOS, PHOTOS_200


def test_shared_sample_in_numeric_order():
    photos = load_photos(PHOTOS)
    assert len(photos.train) == 1602 and len(photos.test) == 1001
    ids = [p.id for p in photos.train]
    assert ids[:3] == ["cat.0", "cat.1", "cat.2"] and ids.index("cat.10") == 10
    assert sum(p.label for p in photos.train) == 801
    assert [p.id for p in photos.test[:3]] == ["1", "2", "3"] and photos.test[-1].id == "1001"
    assert all(p.label == -1 for p in photos.test)


def test_zipped_form_matches_folders(small_data, tmp_path):
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for split in ("train", "test"):
        with zipfile.ZipFile(zipped / f"{split}.zip", "w") as zf:
            for f in sorted((small_data / split).iterdir()):
                zf.write(f, f"{split}/{f.name}")  # Kaggle zips hold a top folder
    plain, packed = load_photos(small_data), load_photos(zipped)
    assert [p.id for p in plain.train] == [p.id for p in packed.train]
    assert [p.id for p in plain.test] == [p.id for p in packed.test]
    assert plain.fingerprint() == packed.fingerprint()
    reader = PhotoReader()
    assert reader.read(packed.test[3]) == reader.read(plain.test[3])


def test_several_folders_pool_training_photos(small_data):
    photos = load_photos([small_data, PHOTOS_200])
    assert len(photos.train) == 24 + 8017 and len(photos.test) == 8
    ids = [p.id for p in photos.train]
    assert len(set(ids)) == len(ids)


def test_fingerprint_changes_with_the_photos(small_data):
    before = load_photos(small_data).fingerprint()
    (small_data / "test" / "8.jpg").unlink()
    assert load_photos(small_data).fingerprint() != before


def test_unknown_file_name_is_named(small_data):
    shutil.copy(small_data / "train" / "cat.0.jpg", small_data / "train" / "kitten.jpg")
    with pytest.raises(DataError, match=r"train: unexpected file name 'kitten.jpg'"):
        load_photos(small_data)


def test_empty_split_is_named(small_data):
    shutil.rmtree(small_data / "test")
    (small_data / "test").mkdir()
    with pytest.raises(DataError, match=r"test: no photos in the test split$"):
        load_photos(small_data)


def test_missing_split_is_named(small_data):
    shutil.rmtree(small_data / "train")
    with pytest.raises(DataError, match=r"missing split 'train'"):
        load_photos(small_data)
    with pytest.raises(DataError, match=r"missing split 'test'"):
        load_photos(PHOTOS_200)
    assert len(load_photos(PHOTOS_200, require_test=False).test) == 0


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: data folder does not exist"):
        load_photos(tmp_path / "nowhere")


def test_same_id_in_two_folders(small_data, tmp_path):
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    shutil.copy(small_data / "train" / "dog.3.jpg", other / "train")
    with pytest.raises(DataError, match=r"'dog.3' appears in two folders"):
        load_photos([small_data, other])
