"""Reading a data folder in any layout we know, found automatically; this module reads Kaggle's
Dogs vs. Cats (``DIR/train/{cat,dog}.N.jpg``, ``DIR/test/N.jpg``), ``features.layouts`` the others
(class folders, a labels CSV).

The competition ships the same folders zipped (``DIR/train.zip``, ``DIR/test.zip``); both forms
are read in place, without unpacking. Several data folders can be joined (e.g. the shared sample
plus the 200 px set): their training photos are pooled, and exactly one of them gives the test set.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import replace
from pathlib import Path

from features.layouts import Layout, labels_file, is_class_folders, read_class_folders, read_labels_csv
from features.photos import IGNORED, BytesReader, DataError, Photo, PhotoReader, PhotoSet
from features.task import DOGS_VS_CATS, id_order_key

# The photo types live in features.photos; importers of this module find them here too.
__all__ = ["BytesReader", "CLASSES", "DataError", "Photo", "PhotoReader", "PhotoSet", "find_data_dirs",
           "find_split", "load_photos", "read_folder"]

SPLITS = ("train", "test")
CLASSES = DOGS_VS_CATS.classes  # label 0, label 1: the metric is log loss on P(dog)
_TRAIN_NAME = re.compile(r"^(cat|dog)\.(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_TEST_NAME = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def _parse(split: str, name: str, where: str) -> tuple[str, int]:
    if split == "train":
        m = _TRAIN_NAME.match(name)
        if not m:
            raise DataError(f"{where}: unexpected file name '{name}' in train; expected "
                            "cat.N.jpg or dog.N.jpg (the label is the prefix)")
        return f"{m.group(1).lower()}.{int(m.group(2))}", CLASSES.index(m.group(1).lower())
    m = _TEST_NAME.match(name)
    if not m:
        raise DataError(f"{where}: unexpected file name '{name}' in test; expected N.jpg")
    return str(int(m.group(1))), -1


def _list_folder(split: str, folder: Path) -> list[Photo]:
    photos = []
    for entry in folder.iterdir():
        if IGNORED.match(entry.name) or entry.is_dir():
            continue
        pid, label = _parse(split, entry.name, str(folder))
        photos.append(Photo(pid, label, str(entry), None, entry.stat().st_size))
    return photos


def _list_zip(split: str, archive: Path) -> list[Photo]:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a readable zip file ({exc})") from None
    photos = []
    for info in infos:
        base = info.filename.rstrip("/").rpartition("/")[2]
        if info.is_dir() or IGNORED.match(base) or "__MACOSX" in info.filename:
            continue
        pid, label = _parse(split, base, str(archive))
        photos.append(Photo(pid, label, str(archive), info.filename, info.file_size))
    return photos


def find_split(data_dir: Path, split: str) -> list[Photo] | None:
    """The photos of one split of one folder, or None when the split is absent."""
    folder, archive = data_dir / split, data_dir / f"{split}.zip"
    if folder.is_dir():
        photos = _list_folder(split, folder)
        where = folder
    elif archive.is_file():
        photos = _list_zip(split, archive)
        where = archive
    else:
        return None
    if not photos:
        raise DataError(f"{where}: no photos in the {split} split")
    photos.sort(key=lambda p: id_order_key(p.id))
    for a, b in zip(photos, photos[1:]):
        if a.id == b.id:
            raise DataError(f"{where}: id '{a.id}' appears twice ({a.name} and {b.name})")
    return photos


def read_dogs_vs_cats(data_dir: Path) -> Layout:
    """One Kaggle Dogs vs. Cats folder (plain or zipped splits)."""
    train = find_split(data_dir, "train")
    if train is None:
        raise DataError(f"{data_dir}: missing split 'train', so no layout found: expected train/cat.N.jpg + "
                        "train/dog.N.jpg (Dogs vs. Cats, or train.zip), train/<class>/* (class folders) or "
                        "train.csv beside train/ (a labels CSV)")
    return Layout(DOGS_VS_CATS.layout, train, {p.id: CLASSES[p.label] for p in train},
                  find_split(data_dir, "test"), DOGS_VS_CATS)


def read_folder(data_dir: Path, labels: str | Path | None = None) -> Layout:
    """One data folder in whichever layout it is: a labels CSV (given, or found there), class
    folders, or Kaggle Dogs vs. Cats."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    csv = labels_file(data_dir, labels)
    if csv is not None:
        return read_labels_csv(data_dir, csv)
    if is_class_folders(data_dir):
        return read_class_folders(data_dir)
    return read_dogs_vs_cats(data_dir)


def load_photos(data_dirs: str | Path | list, require_test: bool = True,
                labels: str | Path | None = None) -> PhotoSet:
    """Read one or more data folders of one layout (``read_folder``) into one photo set and its task.

    Training photos are pooled (ids must not repeat); at most one folder gives the test set.
    ``require_test``: a Dogs vs. Cats folder must have its test split (the competition's);
    other layouts may have none. ``labels``: the labels CSV, where it is not in the folder.
    """
    dirs = [Path(d) for d in (data_dirs if isinstance(data_dirs, (list, tuple)) else [data_dirs])]
    layouts = [read_folder(d, labels) for d in dirs]
    kinds = sorted({lay.kind for lay in layouts})
    if len(kinds) > 1:
        raise DataError(f"{', '.join(map(str, dirs))}: folders of different layouts ({', '.join(kinds)}); "
                        "pool folders of one layout")
    with_test = [(d, lay) for d, lay in zip(dirs, layouts) if lay.test is not None]
    if len(with_test) > 1:
        raise DataError(f"{with_test[1][0]}: a second test split (the first came from {with_test[0][0]}); "
                        "pass exactly one folder with a test split")
    if not with_test and require_test and kinds == [DOGS_VS_CATS.layout]:
        where = " or ".join(str(d / "test") for d in dirs)
        raise DataError(f"missing split 'test': none of {where}(.zip) exists")
    task = (with_test[0][1] if with_test else layouts[0]).task
    named = {i: c for lay in layouts for i, c in lay.named.items()}
    unknown = set(named.values()) - set(task.classes)
    if unknown and task.test_order is not None:
        raise DataError(f"{', '.join(map(str, dirs))}: classes {', '.join(sorted(unknown)[:5])} are not columns "
                        "of the sample submission")
    if unknown:
        task = task.with_classes(sorted(set(named.values()) | set(task.classes), key=id_order_key))
    index = {c: k for k, c in enumerate(task.classes)}
    train = sorted((replace(p, label=index[named[p.id]]) for lay in layouts for p in lay.train),
                   key=lambda p: id_order_key(p.id))
    for a, b in zip(train, train[1:]):
        if a.id == b.id:
            raise DataError(f"training id '{a.id}' appears in two folders: {a.name} and {b.name}")
    test = []
    if with_test:
        given = with_test[0][1].test_named  # a labelled test split: scored, not trained on
        test = [replace(p, label=index[given[p.id]]) if p.id in given else p for p in with_test[0][1].test]
    return PhotoSet(train, test, [str(d) for d in dirs], task)


def is_data_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a data folder of some layout (a train split, or a labels CSV)."""
    return (folder / "train").is_dir() or (folder / "train.zip").is_file() or labels_file(folder) is not None


def find_data_dirs(root: Path, depth: int = 3) -> list[Path]:
    """The data folders under ``root`` (Kaggle's /kaggle/input: the competition's folder and the
    attached datasets), up to ``depth`` levels down; a data folder's own subfolders are not searched."""
    found: list[Path] = []

    def visit(folder: Path, level: int) -> None:
        if is_data_folder(folder):
            found.append(folder)
        elif level < depth:
            for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not IGNORED.match(d.name)):
                visit(sub, level + 1)

    if root.is_dir():
        visit(root, 0)
    return found
