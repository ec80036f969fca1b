"""Which fine-tuning recipe: the same folds, a few recipes, CV log loss of the fine-tuned model.

    python benchmarks/finetune_recipe.py --photos 2000 [--backbone efficientnet_lite0]
                                         [--recipes "epochs=1;epochs=2;epochs=1,learning_rate=3e-4"]

A stratified, seeded sample of the shared training photos (both folders), 5 folds; each recipe is
``oof.finetune.Recipe`` with the fields given changed, trained through ``finetune_folds`` exactly
as ``stacking.run --finetune`` trains it (kept folds are reused, so a rerun only trains what is
new). Prints a Markdown table (CV log loss, accuracy, seconds per fold) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.defaults import SEED, shared_dir  # noqa: E402


def parse_recipe(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        out[key.strip()] = float(value) if "." in value or "e" in value else int(value)
    return out


def main() -> int:
    from sklearn.metrics import log_loss

    from features.cache import load_features
    from features.data import PhotoSet, load_photos
    from features.extract import extract, setup_logging
    from features.models import resolve_weights, weights_identity
    from features.registry import get_backbone
    from oof.finetune import Recipe, finetune_folds, work_folder
    from oof.folds import make_folds
    from stacking.run import rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(shared_dir() / "dogs-vs-cats"),
                                                     str(shared_dir() / "dogs-vs-cats-200px")])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--recipes", default="epochs=1;epochs=2;epochs=1,learning_rate=3e-4")
    parser.add_argument("--cache", default="cache/finetune_recipe")
    args = parser.parse_args()
    setup_logging()
    from sklearn.model_selection import train_test_split

    every = load_photos(args.data, require_test=False)
    train, _ = train_test_split(every.train, train_size=args.photos, random_state=SEED,
                                stratify=[p.label for p in every.train])
    train = sorted(train, key=lambda p: (p.label, p.id))
    photos = PhotoSet(train, [], every.sources)
    backbone = get_backbone(args.backbone)
    f = load_features(extract(photos, backbone, cache_dir=args.cache, progress=False, imagenet=False))
    ids, y = [p.id for p in train], np.array([p.label for p in train])
    warm = rows({backbone.name: f}, ids, "train")[backbone.name]
    fold = make_folds(ids, y, 5, SEED)["fold"].to_numpy()
    lines = [f"{len(ids)} photos, 5 folds (seed {SEED}), {backbone.name}", "",
             "| recipe | CV log loss | CV accuracy | seconds per fold |", "| --- | ---: | ---: | ---: |"]
    for text in args.recipes.split(";"):
        recipe = replace(Recipe(), **parse_recipe(text))
        work = work_folder(Path(args.cache) / "finetune", backbone,
                           weights_identity(resolve_weights(backbone, "default")), recipe, ids, y, fold)
        started = time.time()
        result = finetune_folds(backbone, "default", train, y, fold, warm, [], work, recipe)
        seconds = (time.time() - started) / 5
        lines.append(f"| {text} | {log_loss(y, result.oof):.4f} | "
                     f"{((result.oof > 0.5) == y).mean():.4f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
