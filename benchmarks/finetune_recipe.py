"""Which fine-tuning recipe: the same folds, a few recipes, CV log loss of the fine-tuned model.

    python benchmarks/finetune_recipe.py --photos 2000 [--backbone efficientnet_lite0]
                                         [--recipes "epochs=1;epochs=2;epochs=1,learning_rate=3e-4"]

A stratified, seeded sample of the shared training photos (both folders), 5 folds; each recipe is
``oof.finetune.Recipe`` with the fields given changed, trained through ``finetune_folds`` exactly
as ``stacking.run --finetune`` trains it (kept folds are reused, so a rerun only trains what is
new). Each fold's held-out photos are also scored after every epoch (Keras, in memory; kept beside
the fold), so one ``epochs=3`` recipe gives the CV after 1, 2 and 3 epochs: with a constant
learning rate, the first epochs of a longer recipe are the shorter recipe. Prints a Markdown
table (CV log loss, accuracy, seconds per fold) for benchmarks/RESULTS.md, with the frozen
backbone's heads on the same folds.

    python benchmarks/finetune_recipe.py --run runs/base --cache cache/full --backbone efficientnet_lite1
                                         --recipes "epochs=2,learning_rate=2e-5"

With ``--run`` (a ``stacking.run --out`` folder), the photos, folds and cached features are that
run's, so the folds trained here are the ones ``stacking.run --finetune`` reuses with that recipe,
and the judge is the run's own stack-lr: refitted on the same folds with the fine-tuned column
(after each epoch) added to the run's frozen level-1 models (any fine-tuned column of the run left out).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.defaults import SEED, shared_dir  # noqa: E402

log = logging.getLogger("gapstack")


def parse_recipe(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        value = value.strip()
        try:
            out[key.strip()] = int(value)
        except ValueError:
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = value  # e.g. warmup=logistic
    return out


def epoch_scores(work: Path, backbone, batch_size: int = 64):
    """(fold, held-out photos) -> a Keras callback predicting them after every epoch, saved as
    ``work/epochs_fold{k}.npy`` (epochs x photos)."""
    import keras

    from features.data import PhotoReader
    from features.extract import load_batch

    def factory(k, photos):
        class Score(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.rows = []

            def on_epoch_end(self, epoch, logs=None):
                reader, out = PhotoReader(), []
                for i in range(0, len(photos), batch_size):
                    pixels, _ = load_batch(reader, photos[i:i + batch_size], backbone, False)
                    out.append(self.model.predict(pixels, verbose=0)[:, 0])
                self.rows.append(np.concatenate(out))
                np.save(work / f"epochs_fold{k}.npy", np.stack(self.rows))

        return [Score()]

    return factory


def sample_rows(n: int, data: list[str], cache: str, backbone):
    """A stratified, seeded sample of ``n`` shared training photos, new folds (seed 42), no run."""
    from sklearn.model_selection import train_test_split

    from features.cache import load_features
    from features.data import PhotoSet, load_photos
    from features.extract import extract
    from oof.folds import make_folds
    from stacking.run import rows

    every = load_photos(data, require_test=False)
    train, _ = train_test_split(every.train, train_size=n, random_state=SEED,
                                stratify=[p.label for p in every.train])
    train = sorted(train, key=lambda p: (p.label, p.id))
    f = load_features(extract(PhotoSet(train, [], every.sources), backbone, cache_dir=cache,
                              progress=False, imagenet=False))
    ids, y = [p.id for p in train], np.array([p.label for p in train])
    return train, rows({backbone.name: f}, ids, "train")[backbone.name], \
        make_folds(ids, y, 5, SEED)["fold"].to_numpy(), None


def run_rows(run: str, data: list[str], cache: str, backbone):
    """The training photos (in the run's order, so ``work_folder`` names the same folder), the
    backbone's cached GAP rows, the run's saved folds and its level-1 OOF predictions."""
    import json

    import pandas as pd

    from features.cache import load_features
    from features.data import load_photos
    from features.extract import extract
    from stacking.run import rows
    from stacking.stackers import STACKERS

    report = json.loads((Path(run) / "report.json").read_text())
    folds = pd.read_csv(Path(run) / "folds.csv", dtype={"id": str})
    photos = load_photos(data)
    by_id = {p.id: p for p in photos.train}
    train = [by_id[i] for i in folds["id"]]
    precision = {d["name"]: d["precision"] for d in report["backbone_details"]}.get(backbone.name, "float32")
    f = load_features(extract(photos, backbone, cache_dir=cache, progress=False, precision=precision))
    level1 = {name: pd.read_csv(Path(run) / "oof" / (name.replace("/", "__") + ".csv"), dtype={"id": str})
              .set_index("id").loc[folds["id"], "pred"].to_numpy()
              for name in report["cv"] if name not in STACKERS}
    return train, rows({backbone.name: f}, list(folds["id"]), "train")[backbone.name], \
        folds["fold"].to_numpy(), level1


def flip_tta(result, train: list, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold P(dog) with flip TTA: each fold network's GAP of a held-out photo averaged
    with that of its mirror image (as ``--tta`` does for frozen backbones), through its head."""
    from features.extract import Extractor

    oof = np.full(len(train), np.nan)
    for k, net in zip(np.unique(fold), result.networks):
        held = fold == k
        gap, _ = Extractor(net.entry, net.entry.weights, tta=True).features([p for p, h in zip(train, held) if h])
        oof[held] = net.head.predict_proba(gap)[:, 1]
    return oof


def stack_lr(columns: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray) -> float:
    """The run's stack-lr refitted on its folds over the level-1 OOF ``columns``."""
    from sklearn.metrics import log_loss

    from oof.crossfit import cross_fit
    from stacking.stackers import STACKERS

    return log_loss(y, cross_fit(STACKERS["stack-lr"](), np.column_stack(list(columns.values())), y, fold).oof)


def main() -> int:
    from sklearn.metrics import log_loss

    from features.extract import setup_logging
    from features.models import resolve_weights, weights_identity
    from features.registry import get_backbone
    from oof.crossfit import cross_fit
    from oof.finetune import FINETUNED, Recipe, finetune_folds, network_folds, work_folder
    from oof.heads import KerasHead, LogisticHead

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(shared_dir() / "dogs-vs-cats"),
                                                     str(shared_dir() / "dogs-vs-cats-200px")])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--recipes", default="epochs=1;epochs=2;epochs=1,learning_rate=3e-4")
    parser.add_argument("--cache", default="cache/finetune_recipe")
    parser.add_argument("--run", help="a stacking.run --out folder: its photos, folds and stack-lr")
    parser.add_argument("--tta", action="store_true",
                        help="also score each recipe's fold networks with flip TTA on their held-out photos")
    args = parser.parse_args()
    setup_logging()
    backbone = get_backbone(args.backbone)
    train, warm, fold, level1 = (run_rows(args.run, args.data, args.cache, backbone) if args.run
                                 else sample_rows(args.photos, args.data, args.cache, backbone))
    ids, y = [p.id for p in train], np.array([p.label for p in train])
    column = f"{backbone.name}/{FINETUNED}"
    rest = {k: v for k, v in (level1 or {}).items() if not k.endswith(f"/{FINETUNED}")}  # frozen models only

    def row(name: str, p: np.ndarray, seconds: str = "", judged: bool = True) -> str:
        judge = (f" {stack_lr({**rest, column: p}, y, fold):.4f} |" if judged else " |") if level1 else ""
        return f"| {name} | {log_loss(y, p):.4f} | {((p > 0.5) == y).mean():.4f} |{judge} {seconds} |"

    lines = [f"{len(ids)} photos, 5 folds (seed {SEED}), {backbone.name}", "",
             "| recipe | CV log loss | CV accuracy |" + (" stack-lr |" if level1 else "") + " seconds per fold |",
             "| --- | ---: | ---: |" + (" ---: |" if level1 else "") + " ---: |"]
    if level1:
        lines.append(f"| the run's frozen level-1 models alone | | | {stack_lr(rest, y, fold):.4f} | |")
        if column in level1:
            lines.append(row(f"the run's {column}", level1[column]))
    recipe = Recipe()
    for name, head in [("frozen, logistic head", LogisticHead()),
                       ("frozen, warm-up head alone", KerasHead(dropout=recipe.dropout, epochs=recipe.warmup_epochs,
                                                                standardize=False, random_state=recipe.seed))]:
        lines.append(row(name, cross_fit(head, warm, y, fold).oof, judged=False))
        print(lines[-1], flush=True)
    for text in args.recipes.split(";"):
        recipe = replace(Recipe(), **parse_recipe(text))
        work = work_folder(Path(args.cache) / "finetune", backbone,
                           weights_identity(resolve_weights(backbone, "default")), recipe, train, y, fold)
        started = time.time()
        result = finetune_folds(backbone, "default", train, y, fold, warm, [], work, recipe,
                                callbacks=None if recipe.frozen_until else epoch_scores(work, backbone))
        seconds = (time.time() - started) / len(np.unique(network_folds(fold, recipe)))
        per_epoch = np.full((recipe.epochs, len(y)), np.nan)
        nets = network_folds(fold, recipe)
        for k in np.unique(nets):
            kept = work / f"epochs_fold{k}.npy"
            if kept.is_file():
                per_epoch[:, nets == k] = np.load(kept)
        for e, p in enumerate(per_epoch[:-1], 1):
            if not np.isnan(p).any():
                lines.append(row(f"{text}, after epoch {e}", p))
        lines.append(row(text, result.oof, f"{seconds:.0f}"))
        if args.tta:
            lines.append(row(f"{text}, flip TTA at test time", flip_tta(result, train, fold)))
        if not np.isnan(per_epoch[-1]).any():  # the in-memory score of the last epoch = the saved network's
            log.info("last epoch in memory vs through the saved network: max |dP| %.2g",
                     np.abs(per_epoch[-1] - result.oof).max())
        print("\n".join(lines[-recipe.epochs:]), flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
