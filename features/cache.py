"""The HDF5 feature cache, and the crash-safe journal an extraction writes before it.

Layout of ``gap_<backbone>.h5`` (the public write-ups' ``train``/``test``/``label`` plus ids):
  train (n_train_ok, D) float32, label (n_train_ok,) uint8, train_ids: readable training photos;
  test (n_test, D) float32, test_ids, test_ok: every test photo (a row is NaN where ``test_ok`` is
  False, since the submission needs every id);
  failed_split / failed_id / failed_reason: photos that could not be read, and why.
  imagenet_kernel (D, 1000), imagenet_bias, train_imagenet_logits, test_imagenet_logits: the
  backbone's ImageNet classifier and its class logits for the same rows, where it has one
  (``features.imagenet``; attribute ``imagenet_top`` says what it was read from).
  attrs: the recipe (everything that determines the features) and provenance.

HDF5 files are not safe against ``kill -9`` mid-write, so an extraction first writes finished
chunks as separate ``.npz`` files, each renamed into place atomically, in ``<cache>.partial/``;
the HDF5 file is assembled at the end under a temporary name and renamed, so a cache file
either is complete or does not exist.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from features.imagenet import ImageNetTop

# Bump when a change to extraction changes the features, so older caches count as stale.
FEATURE_FORMAT = 1

# Recipe keys: a cache is reused only if all of them match the request.
RECIPE_KEYS = ("feature_format", "backbone", "constructor", "weights_id", "input_size",
               "preprocess", "resize", "feature_dim", "fast_decode", "tta", "precision",
               "quantization", "data_fingerprint")
# What a cache made before a key existed was made with (so adding a key does not make it stale).
RECIPE_DEFAULTS = {"precision": "float32", "quantization": "none"}
INT8_GRAPH = "int8_graph"  # dataset: the quantized ONNX graph that made an int8 cache's features


class StaleCacheError(RuntimeError):
    """A cache exists for this backbone but was made differently from what is asked."""


def set_folder(cache_dir: str | Path, photos) -> Path:
    """The folder of one photo set's caches: ``CACHE/<data folders>-<fingerprint>/``. Caches of
    different photo sets (the sample, the full data, one's own photos) live side by side, so a run
    on other photos never finds a cache "made differently", nor replaces another set's."""
    names = re.sub(r"[^\w.+-]", "_", "+".join(Path(s).name for s in photos.sources) or "photos")
    return Path(cache_dir) / f"{names[:60]}-{photos.fingerprint()[:10]}"


def cache_path(cache_dir: str | Path, backbone_name: str, photos=None) -> Path:
    """``gap_<backbone>.h5``: of the photo set ``photos`` (a ``PhotoSet``) in its own folder, or
    directly in ``cache_dir`` without one (as shards are merged, or as before caches had folders:
    such a cache made from the same photos is still used where it is)."""
    flat = Path(cache_dir) / f"gap_{backbone_name}.h5"
    if photos is None:
        return flat
    try:
        if flat.is_file() and read_attrs(flat).get("data_fingerprint") == photos.fingerprint():
            return flat
    except OSError:
        pass
    return set_folder(cache_dir, photos) / flat.name


def recipe_differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable list of the recipe entries that differ."""
    diffs = []
    for key in RECIPE_KEYS:
        a, b = stored.get(key, RECIPE_DEFAULTS.get(key)), wanted.get(key)
        if json.dumps(a) != json.dumps(b):
            diffs.append(f"{key}: cache has {a!r}, asked for {b!r}")
    return diffs


def read_attrs(path: str | Path) -> dict:
    """The cache's attributes (recipe and provenance), JSON-decoded."""
    with h5py.File(path, "r") as f:
        return _decode_attrs(f)


def _decode_attrs(f: h5py.File) -> dict:
    return {k: json.loads(v) for k, v in f.attrs.items()}


def check_fresh(path: Path, recipe: dict) -> None:
    """Raise ``StaleCacheError`` naming every difference if ``path`` was made another way."""
    try:
        stored = read_attrs(path)
    except OSError as exc:
        raise StaleCacheError(f"{path}: unreadable cache ({exc}); delete it or pass --overwrite") from None
    diffs = recipe_differences(stored, recipe)
    if diffs:
        raise StaleCacheError(f"{path} was made differently from this request:\n  " + "\n  ".join(diffs)
                              + "\nPass --overwrite to recompute it, or --cache to use another folder.")


@dataclass
class Features:
    """A loaded cache."""

    train: np.ndarray
    label: np.ndarray
    train_ids: np.ndarray
    test: np.ndarray
    test_ids: np.ndarray
    test_ok: np.ndarray
    attrs: dict = field(default_factory=dict)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    top: ImageNetTop | None = None  # the backbone's ImageNet classifier, where the cache has it
    train_logits: np.ndarray | None = None  # its class logits, rows as train / test
    test_logits: np.ndarray | None = None


def load_features(path: str | Path) -> Features:
    """Read a whole cache into memory (GAP features are small: 25,000 x 2048 floats is 200 MB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature cache does not exist; run python -m features.extract")
    with h5py.File(path, "r") as f:
        failed = list(zip(f["failed_split"].asstr()[:], f["failed_id"].asstr()[:],
                          f["failed_reason"].asstr()[:]))
        attrs = _decode_attrs(f)
        top = logits = None
        if "imagenet_kernel" in f:
            top = ImageNetTop(f["imagenet_kernel"][:], f["imagenet_bias"][:], attrs["imagenet_top"])
            logits = f["train_imagenet_logits"][:], f["test_imagenet_logits"][:]
        return Features(
            train=f["train"][:], label=f["label"][:], train_ids=f["train_ids"].asstr()[:],
            test=f["test"][:], test_ids=f["test_ids"].asstr()[:], test_ok=f["test_ok"][:],
            attrs=attrs, failed=failed, top=top,
            train_logits=logits[0] if logits else None, test_logits=logits[1] if logits else None)


def cached_top(path: str | Path) -> str | None:
    """What the cache's ImageNet logits were made from (``ImageNetTop.identity``), or None."""
    return read_attrs(path).get("imagenet_top")


def add_imagenet(path: Path, top: ImageNetTop) -> None:
    """Store ``top`` and its logits for every cached row in the cache (replacing another top's),
    atomically: a copy is written and renamed over the cache. Call under ``extraction_lock``."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "r+") as f:
            for split in ("train", "test"):
                name = f"{split}_imagenet_logits"
                if name in f:
                    del f[name]
                rows = f[split]
                out = f.create_dataset(name, (len(rows), top.kernel.shape[1]), dtype="float32",
                                       chunks=(min(256, len(rows)), top.kernel.shape[1])
                                       if len(rows) else None)
                for start in range(0, len(rows), 4096):
                    out[start:start + 4096] = top.logits(rows[start:start + 4096])
            for name, value in (("imagenet_kernel", top.kernel), ("imagenet_bias", top.bias)):
                if name in f:
                    del f[name]
                f.create_dataset(name, data=value.astype(np.float32))
            f.attrs["imagenet_top"] = json.dumps(top.identity)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Journal:
    """Finished chunks of an extraction in progress, each an atomically written ``.npz``."""

    def __init__(self, folder: Path, recipe: dict, graph: bytes | None = None):
        """``recipe``: the cache's; ``graph``: the int8 graph computing the chunks, whose md5 is
        part of what the chunks must share (a graph quantized anew, on another machine or
        ONNX Runtime, gives other features for the same settings)."""
        self.folder = folder
        recipe = dict(recipe, int8_graph_md5=hashlib.md5(graph).hexdigest() if graph else None)
        recipe_file = folder / "recipe.json"
        if folder.exists():
            stored = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
            if json.dumps(stored, sort_keys=True) != json.dumps(recipe, sort_keys=True):
                shutil.rmtree(folder)  # unfinished work for another request: start afresh
        folder.mkdir(parents=True, exist_ok=True)
        if not recipe_file.exists():
            atomic_write(recipe_file, lambda f: f.write(json.dumps(recipe).encode()))

    def _chunk(self, split: str, index: int) -> Path:
        return self.folder / f"{split}-{index:06d}.npz"

    def has(self, split: str, index: int) -> bool:
        return self._chunk(split, index).exists()

    def save(self, split: str, index: int, ids, features, ok, reasons) -> None:
        atomic_write(self._chunk(split, index), lambda f: np.savez(
            f, ids=np.asarray(ids, dtype=str), features=features, ok=ok,
            reasons=np.asarray(reasons, dtype=str)))

    def load(self, split: str, index: int) -> dict:
        with np.load(self._chunk(split, index)) as z:
            return {k: z[k] for k in z.files}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def extraction_lock(path: Path, log=None):
    """Hold ``<cache>.lock`` while extracting into ``path``: a second process (another notebook
    kernel, another terminal) waits for the first, says whom it waits for, then finds the cache
    made. The lock is the kernel's (``flock``), so a killed holder releases it at once."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(40):  # the holder writes its line just after taking the lock
                f.seek(0)
                holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            holder = holder or "another process"
            if log:
                log.warning("%s: %s is extracting into it; waiting for it to finish", path, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]}), "
                f"since {time.strftime('%H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` so readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def assemble(path: Path, journal: Journal, chunks: dict[str, int], labels: dict[str, int],
             feature_dim: int, attrs: dict, int8_graph: bytes | None = None) -> None:
    """Write the final HDF5 cache from the journal's chunks, atomically (with the int8 graph that
    made the features, if it was one)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    str_dt = h5py.string_dtype()
    failed = []
    with h5py.File(tmp, "w") as f:
        for split in ("train", "test"):
            rows = f.create_dataset(split, (0, feature_dim), maxshape=(None, feature_dim),
                                    dtype="float32", chunks=(256, feature_dim))
            ids_out, ok_out = [], []
            for index in range(chunks[split]):
                chunk = journal.load(split, index)
                ok = chunk["ok"]
                for pid, good, reason in zip(chunk["ids"], ok, chunk["reasons"]):
                    if not good:
                        failed.append((split, str(pid), str(reason)))
                keep = ok if split == "train" else np.ones_like(ok)
                block = chunk["features"][keep]
                if len(block):
                    rows.resize(rows.shape[0] + len(block), axis=0)
                    rows[-len(block):] = block
                ids_out.extend(chunk["ids"][keep].tolist())
                ok_out.extend(ok[keep].tolist())
            f.create_dataset(f"{split}_ids", data=np.array(ids_out, dtype=object), dtype=str_dt)
            if split == "train":
                f.create_dataset("label", data=np.array([labels[i] for i in ids_out], dtype=np.uint8))
            else:
                f.create_dataset("test_ok", data=np.array(ok_out, dtype=bool))
        for name, col in (("failed_split", 0), ("failed_id", 1), ("failed_reason", 2)):
            f.create_dataset(name, data=np.array([r[col] for r in failed], dtype=object), dtype=str_dt)
        if int8_graph is not None:
            f.create_dataset(INT8_GRAPH, data=np.frombuffer(int8_graph, dtype=np.uint8))
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value)
    os.replace(tmp, path)


def read_int8_graph(path: str | Path) -> bytes:
    """The quantized graph an int8 cache was made with."""
    with h5py.File(path, "r") as f:
        if INT8_GRAPH not in f:
            raise ValueError(f"{path}: this cache has no int8 graph; its features were made in "
                             f"{_decode_attrs(f).get('precision', 'float32')}")
        return f[INT8_GRAPH][:].tobytes()
