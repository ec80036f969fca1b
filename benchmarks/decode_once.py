"""Decoding each photo once for all backbones (extract_many) against once per backbone (extract).

    python benchmarks/decode_once.py [--photos 1000] [--backbones efficientnet_lite0,...] [--weights none]

Same photos (originals of the shared sample, train and test), fresh caches, each way twice in
alternation; prints seconds per way (best of 2), the decode share, and checks the caches agree.
``--weights none`` builds Keras applications with random weights (speed does not depend on the
weights), so the write-ups' four backbones can be timed here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.cache import cache_path, load_features  # noqa: E402
from features.data import PhotoSet, load_photos  # noqa: E402
from features.defaults import shared_dir  # noqa: E402
from features.extract import extract, extract_many, setup_logging  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--weights", default="default")
    args = parser.parse_args()
    setup_logging()
    every = load_photos(shared_dir() / "dogs-vs-cats")
    n_test = args.photos // 3
    photos = PhotoSet(every.train[::max(1, len(every.train) // (args.photos - n_test))][:args.photos - n_test],
                      every.test[:n_test], every.sources)
    names = args.backbones.split(",")
    weights = None if args.weights == "none" else args.weights
    root = Path(tempfile.mkdtemp(prefix="decode-once-"))
    times = {"once per backbone": [], "once for all": []}
    for attempt in range(2):
        for way in times:
            cache = root / f"{way.replace(' ', '-')}-{attempt}"
            started = time.perf_counter()
            if way == "once for all":
                extract_many(photos, names, weights, cache, progress=False)
            else:
                for n in names:
                    extract(photos, n, weights, cache, progress=False)
            times[way].append(time.perf_counter() - started)
    a = {n: load_features(cache_path(root / "once-per-backbone-0", n, photos)).train for n in names}
    b = {n: load_features(cache_path(root / "once-for-all-0", n, photos)).train for n in names}
    diff = max(float(np.abs(a[n] - b[n]).max()) for n in names)
    shutil.rmtree(root)
    n = len(photos.train) + len(photos.test)
    print(f"{n} photos, backbones {', '.join(names)}; largest feature difference between the ways: {diff:.1e}")
    for way, t in times.items():
        print(f"| {way} | {min(t):.1f} s (runs: {', '.join(f'{x:.1f}' for x in t)}) | {n * len(names) / min(t):.1f} photo-backbones/s |")
    print(f"decoding once: {100 * (1 - min(times['once for all']) / min(times['once per backbone'])):.1f} % less time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
