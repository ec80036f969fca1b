"""Join the shard files of a sharded extraction into the cache one run makes.

    python -m features.merge --backbone NAME [--cache DIR]        (finds gap_NAME.shard-*-of-N.h5)
    python -m features.merge SHARD.h5 [SHARD.h5 ...] [--cache DIR]

The result has the same rows, order and recipe attributes as a single run, so every consumer
(stacking.run included) uses it unchanged. Shards made with different settings, on different
data, or with a different chunk size are refused with the differences; missing shards are listed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from features.cache import assemble, cache_path, recipe_differences
from features.defaults import CACHE_DIR
from features.shards import ShardFile, owner, shard_files

# Per-shard attributes that differ by design; the rest must agree.
_PER_SHARD = ("shard", "created", "runtime", "engine", "weights", "last_run")


class ShardError(ValueError):
    """Shards that cannot be merged; the message says which and why."""


class _Chunks:
    """The chunks of all shards, addressed as a journal is: load(split, index)."""

    def __init__(self, shards: list[ShardFile], n_train_chunks: int):
        self.n_train_chunks = n_train_chunks
        self.by_shard = {s.shard[0]: s for s in shards}
        self.n = shards[0].shard[1]

    def load(self, split: str, index: int) -> dict:
        g = index if split == "train" else self.n_train_chunks + index
        return self.by_shard[owner(g, self.n)].load(split, index)


def check_shards(shards: list[ShardFile]) -> None:
    """Refuse a set of shards that does not make one whole, consistent extraction."""
    if not shards:
        raise ShardError("no shard files to merge")
    first = shards[0]
    n = first.shard[1]
    for s in shards[1:]:
        if s.shard[1] != n:
            raise ShardError(f"{s.path}: shard {s.shard[0]}/{s.shard[1]} of a {s.shard[1]}-way split; "
                             f"{first.path} is from a {n}-way split")
        diffs = recipe_differences(first.attrs, s.attrs)
        diffs += [f"{k}: {first.attrs.get(k)!r} != {s.attrs.get(k)!r}"
                  for k in ("chunk_size", "chunks", "n_train", "n_test")
                  if first.attrs.get(k) != s.attrs.get(k)]
        if diffs:
            raise ShardError(f"{s.path} was made differently from {first.path}: " + "; ".join(diffs))
    seen: dict[int, Path] = {}
    for s in shards:
        if s.shard[0] in seen:
            raise ShardError(f"shard {s.shard[0]}/{n} given twice: {seen[s.shard[0]]} and {s.path}")
        seen[s.shard[0]] = s.path
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        names = ", ".join(f"{i}/{n}" for i in missing)
        raise ShardError(f"missing shard(s) {names} of {first.attrs['backbone']}: run "
                         f"python -m features.extract ... --shard I/{n} for each, then merge again")


def merge(shards: list[str | Path], cache_dir: str | Path | None = None) -> Path:
    """Merge shard files into ``<cache_dir>/gap_<backbone>.h5`` (default: the shards' folder)."""
    files = [ShardFile(p) for p in shards]
    check_shards(files)
    first = files[0].attrs
    chunks = first["chunks"]
    attrs = {k: v for k, v in first.items() if k not in _PER_SHARD + ("chunk_size", "chunks")}
    runtimes = sorted({f.attrs.get("runtime", "") for f in files})
    attrs.update(weights=first.get("weights"), runtime=runtimes[0] if len(runtimes) == 1 else runtimes,
                 merged_from=[f.path.name for f in sorted(files, key=lambda f: f.shard)],
                 created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    labels: dict[str, int] = {}
    for f in files:
        labels.update(f.labels())
    out = cache_path(cache_dir or files[0].path.parent, first["backbone"])
    out.parent.mkdir(parents=True, exist_ok=True)
    assemble(out, _Chunks(files, chunks["train"]), chunks, labels, first["feature_dim"], attrs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="*", help="shard files (default: all of --backbone's in --cache)")
    parser.add_argument("--backbone", default=None, help="merge every shard file of this backbone in --cache")
    parser.add_argument("--cache", default=None, help=f"cache folder (default: the shards' folder, or {CACHE_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.shards:
            shards = args.shards
        elif args.backbone:
            shards = shard_files(args.cache or CACHE_DIR, args.backbone)
            if not shards:
                raise ShardError(f"no shard files for {args.backbone} in {args.cache or CACHE_DIR}")
        else:
            parser.error("give shard files, or --backbone NAME")
        path = merge(shards, args.cache)
    except (ShardError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
