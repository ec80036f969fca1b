"""Shards: a deterministic 1/N of an extraction, in a file of its own, for any scheduler to run.

Photos are cut into the journal's chunks (train then test, in id order); chunk g belongs to shard
g mod N, so shards are balanced and every machine computes the same assignment from the data alone.
A shard file holds its chunks as they were journalled, plus the recipe and provenance;
``features.merge`` joins N of them into exactly the cache one run makes.

Layout of ``gap_<backbone>.shard-I-of-N.h5``: groups ``train/000007``, ``test/000002``... with
datasets ids, features, ok, reasons (and label for train); attrs: the cache's attrs plus
``shard`` [I, N], ``chunk_size`` and ``chunks`` {split: number of chunks in the whole set}.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from features.cache import _decode_attrs, cache_path

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), with 0 <= I < N."""
    m = _SHARD.match(text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard takes I/N with 0 <= I < N (e.g. 0/3, 1/3, 2/3); got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_path(cache_dir: str | Path, backbone_name: str, shard: tuple[int, int]) -> Path:
    base = cache_path(cache_dir, backbone_name)
    return base.with_name(f"{base.stem}.shard-{shard[0]}-of-{shard[1]}.h5")


def shard_files(cache_dir: str | Path, backbone_name: str) -> list[Path]:
    """The backbone's shard files in ``cache_dir`` or in its photo sets' folders (one set's)."""
    base = cache_path(cache_dir, backbone_name)
    for pattern in (f"{base.stem}.shard-*-of-*.h5", f"*/{base.stem}.shard-*-of-*.h5"):
        found = sorted(base.parent.glob(pattern))
        if found:
            folders = {f.parent for f in found}
            if len(folders) > 1:
                raise ValueError(f"shard files of {backbone_name} for several photo sets: "
                                 f"{', '.join(sorted(map(str, folders)))}; name one with --cache")
            return found
    return []


def owner(global_index: int, n_shards: int) -> int:
    """The shard that extracts the chunk with this global index (train chunks first, then test)."""
    return global_index % n_shards


def write_shard(path: Path, journal, tasks: list, labels: dict[str, int], attrs: dict) -> None:
    """Copy this shard's journalled chunks (``tasks``: (split, index, photos)) into one file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    str_dt = h5py.string_dtype()
    with h5py.File(tmp, "w") as f:
        for split, index, _ in tasks:
            chunk = journal.load(split, index)
            group = f.create_group(f"{split}/{index:06d}")
            group.create_dataset("ids", data=chunk["ids"].astype(object), dtype=str_dt)
            group.create_dataset("features", data=chunk["features"])
            group.create_dataset("ok", data=chunk["ok"])
            group.create_dataset("reasons", data=chunk["reasons"].astype(object), dtype=str_dt)
            if split == "train":
                group.create_dataset("label", data=np.array([labels[i] for i in chunk["ids"]], np.uint8))
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value)
    os.replace(tmp, path)


class ShardFile:
    """One shard file, read the way ``assemble`` reads a journal."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            self.attrs = _decode_attrs(f)
            self.chunks = {split: sorted(int(k) for k in f.get(split, {}).keys())
                           for split in ("train", "test")}
        if "shard" not in self.attrs:
            raise ValueError(f"{self.path}: not a shard file (no 'shard' attribute)")

    @property
    def shard(self) -> tuple[int, int]:
        return tuple(self.attrs["shard"])

    def load(self, split: str, index: int) -> dict:
        with h5py.File(self.path, "r") as f:
            g = f[f"{split}/{index:06d}"]
            out = {k: g[k][()] for k in g.keys()}
        for key in ("ids", "reasons"):
            out[key] = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in out[key]])
        return out

    def labels(self) -> dict[str, int]:
        out = {}
        for index in self.chunks["train"]:
            chunk = self.load("train", index)
            out.update(zip(chunk["ids"].tolist(), chunk["label"].tolist()))
        return out
