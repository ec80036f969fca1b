"""The layouts besides Dogs vs. Cats, on real shared photos: class folders (clothing-small itself, and
small ones built from it and from Dogs vs. Cats) and labels CSVs with and without a sample
submission; every mistake said before a photo is decoded, naming the file."""

import shutil

import pandas as pd
import pytest

from features.data import DataError, load_photos
from tests.conftest import CLOTHING, make_class_dir, make_kaggle_dir


def test_clothing_small_is_read_as_class_folders():
    photos = load_photos(CLOTHING)
    task = photos.task
    assert task.layout == "class folders" and task.n_classes == 10 and not task.binary
    assert task.classes == ("dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts",
                            "skirt", "t-shirt")
    assert len(photos.train) == 3409 and photos.test == []  # validation/ pooled into training
    assert sum(p.id.startswith("validation/") for p in photos.train) == 341
    assert len({p.id for p in photos.train}) == 3409
    hats = [p for p in photos.train if p.label == task.classes.index("hat")]
    assert hats and all("/hat/" in p.path for p in hats)
    assert task.describe(len(photos.train), 0).startswith(
        "class folders: 10 classes (dress, hat, longsleeve, outwear, pants, shirt, ...; labels from the "
        "class folder names), 3,409 training photos, no test set")


def test_two_class_folders_are_the_binary_task(tmp_path):
    data = make_class_dir(tmp_path / "pets", {"cat": 4, "dog": 5}, n_test=3)
    photos = load_photos(data)
    assert photos.task.classes == ("cat", "dog") and photos.task.binary and photos.task.cats_and_dogs
    assert sum(p.label for p in photos.train) == 5
    assert [p.id for p in photos.test] == ["1", "2", "3"]


def _csv_layout(root, classes=("hat", "shoes", "skirt"), n=4, n_test=3, sample=True, ext_in_ids=False):
    """A labels-CSV layout built from clothing-small: train/<id>.jpg + train.csv (+ a sample
    submission whose columns put the classes in another order than sorted)."""
    made = make_class_dir(root / "src", {c: n for c in classes}, n_test=n_test)
    (root / "train").mkdir(parents=True)
    rows = []
    for k, f in enumerate(sorted((made / "train").rglob("*.jpg"))):
        shutil.copy(f, root / "train" / f"img{k}.jpg")
        rows.append({"image": f"img{k}.jpg" if ext_in_ids else f"img{k}", "kind": f.parent.name})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    shutil.copytree(made / "test", root / "test")
    shutil.rmtree(made)
    if sample:
        ids = [f"{i}.jpg" if ext_in_ids else str(i) for i in (3, 1, 2)][:n_test]
        columns = list(reversed(classes))
        pd.DataFrame({"image_id": ids, **{c: 1 / len(classes) for c in columns}}).to_csv(
            root / "sample_submission.csv", index=False)
    return root


def test_labels_csv_with_sample_submission(tmp_path):
    photos = load_photos(_csv_layout(tmp_path / "csv"))
    task = photos.task
    assert task.layout == "labels CSV" and task.labels_from == "train.csv column 'kind'"
    assert task.classes == ("skirt", "shoes", "hat")  # the sample submission's column order
    assert task.id_column == "image_id" and task.columns == task.classes
    assert task.test_order == ("3", "1", "2")
    labels = pd.read_csv(tmp_path / "csv" / "train.csv").set_index("image")["kind"]
    assert all(task.classes[p.label] == labels[p.id] for p in photos.train)


def test_labels_csv_ids_with_extensions_and_no_sample(tmp_path):
    data = _csv_layout(tmp_path / "csv", classes=("hat", "shoes"), sample=False, ext_in_ids=True)
    photos = load_photos(data)
    assert photos.task.classes == ("hat", "shoes") and photos.task.columns == ("kind",)
    assert photos.train[0].id.endswith(".jpg")
    assert [p.id for p in photos.test] == ["1", "2", "3"]


def test_labels_csv_mistakes_are_named_before_decoding(tmp_path):
    data = _csv_layout(tmp_path / "csv")
    table = pd.read_csv(data / "train.csv")
    pd.concat([table, pd.DataFrame({"image": ["ghost"], "kind": ["hat"]})]).to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv: 1 id\(s\) without a photo in .*train \(e.g. ghost\)"):
        load_photos(data)
    table.iloc[1:].to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train: 1 photo\(s\) without a label in train.csv \(e.g. img0.jpg\)"):
        load_photos(data)
    table.to_csv(data / "train.csv", index=False)
    shutil.copy(data / "test" / "1.jpg", data / "test" / "9.jpg")
    with pytest.raises(DataError, match=r"test: 1 photo\(s\) the sample submission does not name.*\(e.g. 9\)"):
        load_photos(data)
    (data / "test" / "9.jpg").unlink()
    (data / "test" / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"sample_submission.csv: 1 test id\(s\) without a photo .*\(e.g. 2\)"):
        load_photos(data)
    shutil.copy(data / "test" / "1.jpg", data / "test" / "2.jpg")
    pd.DataFrame({"image_id": ["3", "1", "2"], "hat": 0.5, "shoes": 0.5}).to_csv(data / "sample_submission.csv",
                                                                             index=False)
    with pytest.raises(DataError, match=r"sample_submission.csv: the classes skirt have no column there"):
        load_photos(data)
    pd.DataFrame({"image": ["a"], "kind": ["hat"], "extra": [1]}).to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv: which column is the label\? It has image, kind, extra"):
        load_photos(data)


def test_class_folder_mistakes_are_named(tmp_path):
    data = make_class_dir(tmp_path / "c", {"hat": 3, "skirt": 3})
    (data / "train" / "shoes").mkdir()
    with pytest.raises(DataError, match=r"train/shoes: a class folder with no photos"):
        load_photos(data)
    (data / "train" / "shoes").rmdir()
    pets = make_kaggle_dir(tmp_path / "pets", 2, 1)
    with pytest.raises(DataError, match=r"folders of different layouts \(Kaggle Dogs vs. Cats, class folders\)"):
        load_photos([pets, data])


def test_class_folders_pool_their_classes(tmp_path):
    a = make_class_dir(tmp_path / "a", {"hat": 3, "skirt": 3}, n_test=2)
    b = make_class_dir(tmp_path / "b", {"shoes": 3})
    photos = load_photos([a, b])
    assert photos.task.classes == ("hat", "shoes", "skirt") and len(photos.train) == 9
    assert photos.task.columns == ("hat", "shoes", "skirt") and len(photos.test) == 2


def test_test_split_in_class_folders_is_labelled(tmp_path):
    """test/<class>/ (a dataset's own test split) gives labelled test photos with the file names
    as ids; test/ folders that are not training classes stay unlabelled, named by their path."""
    data = make_class_dir(tmp_path / "c", {"hat": 3, "shoes": 3, "skirt": 3}, n_test=5, labelled_test=True)
    photos = load_photos(data)
    assert [(p.id, p.label) for p in photos.test] == [("1", 0), ("2", 1), ("3", 2), ("4", 0), ("5", 1)]
    (data / "test" / "skirt").rename(data / "test" / "batch2")
    photos = load_photos(data)
    assert [p.id for p in photos.test] == ["batch2/3", "hat/1", "hat/4", "shoes/2", "shoes/5"]
    assert all(p.label == -1 for p in photos.test)
