"""Which ImageNet prior, and which head variant: chosen by cross-validation, over several fold seeds.

    python benchmarks/imagenet_prior.py --cache cache/full [--data DIR ...] [--seeds 3]
                                        [--backbones efficientnet_lite0,...]

Reads the caches a ``stacking.run`` made on the same data (``--cache``; ImageNet logits are added
where a backbone's top is at hand). For every fold seed, on the same folds for every variant:
  1. each prior feature set (``oof.prior.FEATURES``) alone, and stack-lr over the backbones'
     logistic heads with and without it;
  2. each backbone's logistic head on the GAP features as they are and power-normalised (signed
     square root), and stack-lr over the heads of each variant.
The noise is how much one model's CV moves between fold seeds. Prints Markdown tables for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.cache import load_features  # noqa: E402
from features.data import load_photos  # noqa: E402
from features.defaults import SEED, shared_dir  # noqa: E402


def signed_sqrt(X: np.ndarray) -> np.ndarray:
    return np.sign(X) * np.sqrt(np.abs(X))


def table(title: str, results: dict[str, list[float]], seeds: list[int]) -> str:
    lines = [f"\n{title}\n", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
             "| --- |" + " ---: |" * (len(seeds) + 2)]
    for name, values in results.items():
        v = np.array(values)
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in v)
                     + f" | {v.mean():.4f} | {v.max() - v.min():.4f} |")
    return "\n".join(lines)


def main() -> int:
    from sklearn.metrics import log_loss

    from features.extract import extract
    from oof.crossfit import cross_fit
    from oof.folds import make_folds
    from oof.heads import LogisticHead
    from oof.prior import FEATURES, ImageNetPrior
    from stacking.run import rows
    from stacking.stackers import LRStacker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(shared_dir() / "dogs-vs-cats"),
                                                     str(shared_dir() / "dogs-vs-cats-200px")])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    photos = load_photos(args.data)
    names = args.backbones.split(",")
    feats = {}
    for n in names:  # reuses the caches (and adds ImageNet logits where a top is at hand)
        feats[n] = load_features(extract(photos, n, cache_dir=args.cache, progress=False))
    ids = sorted(set.intersection(*(set(f.train_ids) for f in feats.values())))
    X = rows(feats, ids, "train")
    label = {p.id: p.label for p in photos.train}
    y = np.array([label[i] for i in ids])
    with_top = [n for n, f in feats.items() if f.top is not None]
    seeds = [SEED + k for k in range(args.seeds)]
    print(f"{len(ids)} training photos; backbones {', '.join(names)}; with an ImageNet top: "
          f"{', '.join(with_top) or 'none'}; fold seeds {seeds}")
    prior, power = {}, {}
    started = time.time()
    for seed in seeds:
        fold = make_folds(ids, y, 5, seed)["fold"].to_numpy()
        heads = {n: cross_fit(LogisticHead(), X[n], y, fold).oof for n in names}
        roots = {n: cross_fit(LogisticHead(), signed_sqrt(X[n]), y, fold).oof for n in names}

        def add(store, name, p):
            store.setdefault(name, []).append(log_loss(y, p))

        def stack(columns):
            return cross_fit(LRStacker(), np.column_stack(columns), y, fold).oof

        for n in names:
            add(power, f"{n}/logistic", heads[n])
            add(power, f"{n}/logistic, signed sqrt", roots[n])
        add(power, "stack-lr over the heads", stack(list(heads.values())))
        add(power, "stack-lr over the signed-sqrt heads", stack(list(roots.values())))
        add(prior, "stack-lr, GAP heads only", stack(list(heads.values())))
        for n in with_top:
            for kind in FEATURES:
                p = cross_fit(ImageNetPrior(feats[n].top, kind), X[n], y, fold).oof
                add(prior, f"{n}/imagenet ({kind}) alone", p)
                add(prior, f"stack-lr + {n}/imagenet ({kind})", stack([*heads.values(), p]))
        print(f"seed {seed} done ({time.time() - started:.0f} s)", flush=True)
    print(table("ImageNet prior (CV log loss, 5 folds)", prior, seeds))
    print(table("Power normalisation of the GAP features (CV log loss, 5 folds)", power, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
