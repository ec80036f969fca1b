"""The photos of a task, whatever layout they came in: what each one is, where its bytes are, and
how to read them (from files, zip members, or memory)."""

from __future__ import annotations

import hashlib
import re
import threading
import zipfile
from dataclasses import dataclass, field

from features.task import DOGS_VS_CATS, Task

# Files that are never photos: hidden files, macOS zip debris, Windows thumbnails.
IGNORED = re.compile(r"^(\.|__MACOSX|Thumbs\.db$|desktop\.ini$)", re.IGNORECASE)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """The data folder is not in a layout we read, or its labels cannot train; the message names the path."""


@dataclass(frozen=True)
class Photo:
    """One photo: its id ("cat.12" in train, "12" in test), label (the index of its class in the
    task's classes: 1 dog, 0 cat; -1 unknown), and where its bytes are (a file path, or a zip file
    and member)."""

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
    """The training and test photos of one or more data folders, ids in natural order, and their task."""

    train: list[Photo]
    test: list[Photo]
    sources: list[str] = field(default_factory=list)
    task: Task = DOGS_VS_CATS

    def fingerprint(self) -> str:
        """Changes when any photo is added, removed, renamed or changes size."""
        digest = hashlib.sha1()
        for split, photos in (("train", self.train), ("test", self.test)):
            for p in photos:
                digest.update(f"{split}/{p.id}/{p.size}\n".encode())
        return digest.hexdigest()


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
