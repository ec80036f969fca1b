"""Kaggle-layout photo sets: ``DIR/train/{cat,dog}.N.jpg`` and ``DIR/test/N.jpg``.

The competition ships the same folders zipped (``DIR/train.zip``, ``DIR/test.zip``); both forms
are read in place, without unpacking. Several data folders can be joined (e.g. the shared sample
plus the 200 px set): their training photos are pooled, and exactly one of them gives the test set.
"""

from __future__ import annotations

import hashlib
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "test")
CLASSES = ("cat", "dog")  # label 0, label 1: the metric is log loss on P(dog)
_TRAIN_NAME = re.compile(r"^(cat|dog)\.(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_TEST_NAME = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_IGNORED = re.compile(r"^(\.|__MACOSX|Thumbs\.db$|desktop\.ini$)", re.IGNORECASE)


class DataError(ValueError):
    """The data folder is not in the Kaggle layout; the message names the path."""


@dataclass(frozen=True)
class Photo:
    """One photo: its id ("cat.12" in train, "12" in test), label (1 dog, 0 cat, -1 unknown),
    and where its bytes are (a file path, or a zip file and member)."""

    id: str
    label: int
    path: str
    member: str | None = None
    size: int = 0

    @property
    def name(self) -> str:
        """How to name the photo in a message."""
        return f"{self.path}:{self.member}" if self.member else self.path


@dataclass
class PhotoSet:
    """The training and test photos of one or more Kaggle-layout folders, ids in numeric order."""

    train: list[Photo]
    test: list[Photo]
    sources: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """Changes when any photo is added, removed, renamed or changes size."""
        digest = hashlib.sha1()
        for split, photos in (("train", self.train), ("test", self.test)):
            for p in photos:
                digest.update(f"{split}/{p.id}/{p.size}\n".encode())
        return digest.hexdigest()


def _sort_key(photo: Photo) -> tuple:
    head, _, number = photo.id.rpartition(".")
    return (head, int(number))


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
        if _IGNORED.match(entry.name) or entry.is_dir():
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
        if info.is_dir() or _IGNORED.match(base) or "__MACOSX" in info.filename:
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
        subfolders = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
        if subfolders:
            raise DataError(f"{where}: no photos in the {split} split, only folders "
                            f"({', '.join(subfolders[:5])}{', ...' if len(subfolders) > 5 else ''}): "
                            "one folder per class is not a layout this version reads; it reads "
                            "train/cat.N.jpg, train/dog.N.jpg and test/N.jpg")
        raise DataError(f"{where}: no photos in the {split} split")
    photos.sort(key=_sort_key)
    for a, b in zip(photos, photos[1:]):
        if a.id == b.id:
            raise DataError(f"{where}: id '{a.id}' appears twice ({a.name} and {b.name})")
    return photos


def load_photos(data_dirs: str | Path | list, require_test: bool = True) -> PhotoSet:
    """Read one or more Kaggle-layout folders (plain or zipped splits).

    Every folder must have a train split; exactly one must have a test split unless
    ``require_test`` is False.
    """
    dirs = [Path(d) for d in (data_dirs if isinstance(data_dirs, (list, tuple)) else [data_dirs])]
    train: list[Photo] = []
    test: list[Photo] | None = None
    test_from = None
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"{d}: data folder does not exist")
        photos = find_split(d, "train")
        if photos is None:
            raise DataError(f"{d}: missing split 'train' (expected {d / 'train'}/ or {d / 'train.zip'})")
        train.extend(photos)
        test_photos = find_split(d, "test")
        if test_photos is not None:
            if test is not None:
                raise DataError(f"{d}: a second test split (the first came from {test_from}); "
                                "pass exactly one folder with a test split")
            test, test_from = test_photos, d
    if test is None:
        if require_test:
            where = " or ".join(str(d / "test") for d in dirs)
            raise DataError(f"missing split 'test': none of {where}(.zip) exists")
        test = []
    train.sort(key=_sort_key)
    for a, b in zip(train, train[1:]):
        if a.id == b.id:
            raise DataError(f"training id '{a.id}' appears in two folders: {a.name} and {b.name}")
    return PhotoSet(train, test, [str(d) for d in dirs])


class PhotoReader:
    """Reads photo bytes from files or zip members; safe to share between threads."""

    def __init__(self) -> None:
        self._local = threading.local()

    def read(self, photo: Photo) -> bytes:
        if photo.member is None:
            with open(photo.path, "rb") as f:
                return f.read()
        archives = self._local.__dict__.setdefault("archives", {})
        if photo.path not in archives:
            archives[photo.path] = zipfile.ZipFile(photo.path)
        return archives[photo.path].read(photo.member)


class BytesReader:
    """Photo bytes already in memory (a web upload), keyed by ``Photo.path``; nothing touches disk."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def read(self, photo: Photo) -> bytes:
        return self.blobs[photo.path]
