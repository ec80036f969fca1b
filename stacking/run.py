"""The whole two-level run in one command.

    python -m stacking.run --folds 5 [--data DIR ...] [--backbones a,b,c] [--out DIR]
                           [--submit-with MODEL] [--holdout FRACTION] [--no-imagenet]
                           [--finetune BACKBONE[,BACKBONE...] [--finetune-epochs N]]

Extracts missing features through the cache, makes the folds once, fits every backbone's head,
its ImageNet prior (where the backbone's ImageNet classifier is at hand), the fine-tuned networks
asked for (``--finetune``, one per fold), concat-fusion and the stackers on those folds, and writes into ``--out``: submission.csv, folds.csv,
oof/ and test/ predictions of every model, report.md + report.json + plots, and model/ (the
fitted ensemble, for ``python -m stacking.predict``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from features.cache import StaleCacheError, load_features
from features.data import DataError, PhotoSet, load_photos
from features.defaults import CACHE_DIR, KAGGLE_COMPETITION, KAGGLE_WORKING, SEED, default_data_dirs
from features.extract import extract, extract_many, setup_logging
from features.models import resolve_weights, weights_identity
from features.registry import get_backbone
from features.runtime import PRECISIONS
from oof.crossfit import TEST_MODES, cross_fit
from oof.folds import align_folds, load_folds, make_folds, save_folds
from oof.heads import HEADS
from oof.store import prediction_path, save_oof, save_test
from oof.finetune import FINETUNED, Recipe, finetune_folds, fold_stats, work_folder
from stacking.ensemble import PRIOR, fit_ensemble
from stacking.report import choose_model, write_report
from stacking.stackers import STACKERS
from stacking.submission import (CLIP, CLIP_MODES, SUBMISSIONS, scores, write_model_submissions,
                                 write_submission)

log = logging.getLogger("gapstack")

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def holdout_ids(photos: PhotoSet, fraction: float, seed: int = SEED) -> set[str]:
    """A stratified, seeded fraction of the training photos, set aside as a labelled test."""
    if not fraction:
        return set()
    from sklearn.model_selection import train_test_split

    _, held = train_test_split([p.id for p in photos.train], test_size=fraction, random_state=seed,
                               stratify=[p.label for p in photos.train])
    return set(held)


def gather(photos: PhotoSet, backbones: list[str], weights, cache: Path, tta: bool,
           overwrite: bool, batch_size: int | None = None, precision: str = "auto",
           decode_once: bool = False, imagenet: bool = True) -> tuple[dict, list[dict], list]:
    """Features of every backbone from the cache (extracting what is missing: backbone by backbone,
    or with ``decode_once`` each photo decoded once for all of them), and what made them.
    ``imagenet``: with each backbone's ImageNet classifier and logits where its top is at hand."""
    loaded, described, unreadable = {}, [], []
    if decode_once:
        paths = extract_many(photos, backbones, weights, cache, batch_size, overwrite=overwrite,
                             tta=tta, precision=precision, imagenet=imagenet)
    else:
        paths = {get_backbone(name).name: extract(photos, name, weights, cache, batch_size,
                                                  overwrite=overwrite, tta=tta, precision=precision,
                                                  imagenet=imagenet)
                 for name in backbones}
    for name in backbones:
        backbone = get_backbone(name)
        path = paths[backbone.name]
        loaded[backbone.name] = load_features(path)
        if not imagenet:
            loaded[backbone.name].top = None  # a cache may hold one from an earlier run
        unreadable.extend(f"{s}/{i}: {r} ({backbone.name})" for s, i, r in loaded[backbone.name].failed)
        described.append({"name": backbone.name, "entry": asdict(backbone),
                          "weights": resolve_weights(backbone, weights), "tta": tta,
                          "precision": loaded[backbone.name].attrs.get("precision", "float32"),
                          "cache": str(path), "runtime": loaded[backbone.name].attrs.get("runtime"),
                          "imagenet_top": loaded[backbone.name].top and loaded[backbone.name].top.identity})
    return loaded, described, sorted(set(unreadable))


def rows(loaded: dict, ids: list[str], split: str) -> dict[str, np.ndarray]:
    """Each backbone's feature rows for ``ids`` (NaN rows for ids it could not read)."""
    out = {}
    for name, f in loaded.items():
        table_ids = f.train_ids if split == "train" else f.test_ids
        table = f.train if split == "train" else f.test
        index = {i: r for r, i in enumerate(table_ids)}
        X = np.full((len(ids), table.shape[1]), np.nan, dtype=np.float32)
        have = [(k, index[i]) for k, i in enumerate(ids) if i in index]
        if have:
            dst, src = map(list, zip(*have))
            X[dst] = table[src]
        out[name] = X
    return out


def id_rows(table: dict[str, np.ndarray], ids: list[str], dim: int) -> np.ndarray:
    """Rows of {photo id: feature vector} for ``ids`` (NaN where a photo has none)."""
    X = np.full((len(ids), dim), np.nan, dtype=np.float32)
    for k, i in enumerate(ids):
        if i in table:
            X[k] = table[i]
    return X


def finetune_all(args, photos: PhotoSet, names: list[str], loaded: dict, train: list, y: np.ndarray,
                 fold: np.ndarray, extra: list) -> tuple[dict, list[dict], dict, dict]:
    """Each backbone of ``--finetune`` trained once per fold (``oof.finetune``). Returns the
    level-1 CrossFits, the fold networks as backbone descriptions, their features by photo id,
    and what the report says of each."""
    recipe = Recipe(epochs=args.finetune_epochs, seed=args.seed)
    models, described, features, info = {}, [], {}, {}
    train_ids = [p.id for p in train]
    for name in names:
        backbone = get_backbone(name)
        if backbone.name not in loaded:  # the warm-up reads its frozen GAP features
            loaded[backbone.name] = load_features(extract(photos, name, args.weights, args.cache,
                                                          args.batch_size, precision=args.precision))
        warm = rows({backbone.name: loaded[backbone.name]}, train_ids, "train")[backbone.name]
        resolved = resolve_weights(backbone, args.weights)
        work = work_folder(Path(args.cache) / "finetune", backbone, weights_identity(resolved), recipe,
                           train_ids, y, fold)
        result = finetune_folds(backbone, args.weights, train, y, fold, warm, extra, work, recipe)
        models[f"{backbone.name}/{FINETUNED}"] = result.crossfit()
        for net in result.networks:
            described.append({"name": net.entry.name, "entry": asdict(net.entry),
                              "weights": net.entry.weights, "tta": False, "precision": "float32",
                              "fold_network_of": backbone.name})
        features.update(result.features)
        info[backbone.name] = {"recipe": asdict(recipe), "work": str(work), "folds": fold_stats(work),
                               "seconds_this_run": result.seconds}
    return models, described, features, info


def read_exclusions(path: str | Path) -> set[str]:
    """Ids to leave out of training: rows of an outliers.csv (from features.clean) whose ``drop``
    is 1, or every row when the file has no ``drop`` column."""
    df = pd.read_csv(path, dtype={"id": str})
    if "id" not in df.columns:
        raise ValueError(f"{path}: needs an id column (an outliers.csv from features.clean)")
    if "drop" in df.columns:
        df = df[df["drop"].astype(int) == 1]
    return set(df["id"])


def compare_exclusion(source, keep: np.ndarray, y_all: np.ndarray, oof_with: dict[str, np.ndarray],
                      oof_without: dict[str, np.ndarray], excluded_pred: dict[str, np.ndarray]) -> dict:
    """Every model trained with and without the excluded rows (same folds), scored two ways.

    kept rows: both variants' OOF on the rows kept (the narrow view). all rows: on every training
    row, the excluded ones predicted for the without-variant by its fold models, which never
    trained on them, exactly as the test set is predicted: the test set holds such photos too, so
    this is the comparison that says what leaving them out does to a submission.
    """
    table = {}
    for name, p in oof_without.items():
        merged = np.empty(len(keep))
        merged[keep], merged[~keep] = p, excluded_pred[name]
        table[name] = {"kept_rows": {"with": scores(y_all[keep], oof_with[name][keep]),
                                     "without": scores(y_all[keep], p)},
                       "all_rows": {"with": scores(y_all, oof_with[name]),
                                    "without": scores(y_all, merged)}}
    return {"n_excluded": int((~keep).sum()), "source": str(source), "models": table}


def effect_of(members: list[str], oof: dict[str, np.ndarray], level1: list[str], y: np.ndarray,
              fold: np.ndarray, stackers: list[str]) -> dict | None:
    """Every stacker's OOF with ``members`` among its inputs (as fitted) and refitted on the same
    folds without them: what those level-1 models add, in one run."""
    rest = [n for n in level1 if n not in members]
    if not members or len(rest) < 2:
        return None
    L = np.column_stack([oof[n] for n in rest])
    return {"models": members, "stackers": {
        name: {"with": scores(y, oof[name]),
               "without": scores(y, cross_fit(STACKERS[name](), L, y, fold).oof)}
        for name in stackers}}


def of_kind(level1: list[str], kind: str) -> list[str]:
    """The level-1 models named ``<backbone>/<kind>``."""
    return [n for n in level1 if n.endswith("/" + kind)]


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos(args.data)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    for h in heads:
        if h not in HEADS:
            raise KeyError(f"Unknown head '{h}'; available: {', '.join(HEADS)}")
    # The cache holds every training photo; the holdout is a selection of rows, so changing
    # --holdout never invalidates the features.
    loaded, described, unreadable = gather(photos, backbones, args.weights, Path(args.cache), args.tta,
                                           args.overwrite, args.batch_size, args.precision,
                                           args.decode_once, not args.no_imagenet)
    tops = {name: f.top for name, f in loaded.items() if f.top is not None}
    held_out = holdout_ids(photos, args.holdout, args.seed)
    held = [p for p in photos.train if p.id in held_out]
    # Training rows: photos every backbone could read.
    readable = set.intersection(*(set(f.train_ids) for f in loaded.values()))
    train = [p for p in photos.train if p.id in readable and p.id not in held_out]
    train_ids, y = [p.id for p in train], np.array([p.label for p in train])
    X = rows(loaded, train_ids, "train")
    if args.folds_file:
        folds = load_folds(args.folds_file, train_ids)
    else:
        folds = make_folds(train_ids, y, args.folds, args.seed)
    save_folds(folds, out / "folds.csv")
    folds = align_folds(folds, train_ids)
    fold = folds["fold"].to_numpy()

    finetune_names = [b.strip() for b in args.finetune.split(",") if b.strip()]
    finetuned, ft_described, ft_features, ft_info = {}, [], {}, {}
    if finetune_names:
        if args.exclude:
            raise ValueError("--finetune and --exclude do not combine (the fine-tuned networks "
                             "would have to be trained twice)")
        finetuned, ft_described, ft_features, ft_info = finetune_all(
            args, photos, finetune_names, loaded, train, y, fold, held + photos.test)

    def features_of(ids: list[str], split: str) -> dict[str, np.ndarray]:
        """Every backbone's rows for ``ids``, fold networks included."""
        out = rows({b["name"]: loaded[b["name"]] for b in described}, ids, split)
        for b in ft_described:
            out[b["name"]] = id_rows(ft_features[b["name"]], ids, b["entry"]["feature_dim"])
        return out

    exclusion = None
    if args.exclude:
        keep = ~np.isin(train_ids, sorted(read_exclusions(args.exclude)))
        log.info("exclusion: %d of %d training photos left out; fitting with them for comparison",
                 int((~keep).sum()), len(keep))
        _, oof_with = fit_ensemble(described, X, y, fold, heads, not args.no_concat,
                                   test_mode=args.test_mode, tops=tops, log=log.debug)
        X_all, y_all = X, y
        train_ids = [i for i, k in zip(train_ids, keep) if k]
        X, y, fold = {b: x[keep] for b, x in X.items()}, y[keep], fold[keep]
    fit_started = time.time()
    ensemble, oof = fit_ensemble(described, X, y, fold, heads, not args.no_concat,
                                 test_mode=args.test_mode, tops=tops, finetuned=finetuned, log=log.info)
    ensemble.backbones = described + ft_described
    fit_seconds = time.time() - fit_started
    if args.exclude:
        excluded_pred = ensemble.predict_all({b: x[~keep] for b, x in X_all.items()})
        exclusion = compare_exclusion(args.exclude, keep, y_all, oof_with, oof, excluded_pred)
    cv = {name: scores(y, p) for name, p in oof.items()}
    chosen, clipped, reason = choose_model(cv, args.submit_with, args.clip)
    ensemble.submit_with, ensemble.clip = chosen, CLIP if clipped else None
    ensemble.save(out / "model")

    (out / "oof").mkdir(exist_ok=True)
    (out / "test").mkdir(exist_ok=True)
    for name, p in oof.items():
        save_oof(prediction_path(out / "oof", name), train_ids, y, fold, p)
    test_ids = [p.id for p in photos.test]
    test_pred = ensemble.predict_all(features_of(test_ids, "test"))
    for name, p in test_pred.items():
        save_test(prediction_path(out / "test", name), test_ids, p)
    write_submission(out / "submission.csv", test_ids, test_pred[chosen], ensemble.clip)
    submissions = write_model_submissions(out / SUBMISSIONS, test_ids, test_pred, cv, args.clip)

    holdout = None
    if held:
        held_ids = [p.id for p in held]
        held_y = np.array([p.label for p in held])
        held_pred = ensemble.predict_all(features_of(held_ids, "train"))
        holdout = {name: scores(held_y, held_pred[name]) for name in cv}
        pd.DataFrame({"id": held_ids, "label": held_y, **held_pred}).to_csv(out / "holdout.csv", index=False)

    level1, stackers = list(ensemble.level1), list(ensemble.level2)
    info = {"out": str(out), "data": photos.sources, "n_train": len(train_ids), "n_holdout": len(held),
            "exclusion": exclusion,
            "finetune": ft_info or None,
            "imagenet_prior": effect_of(of_kind(level1, PRIOR), oof, level1, y, fold, stackers),
            "finetune_effect": effect_of(of_kind(level1, FINETUNED), oof, level1, y, fold, stackers),
            "n_test": len(test_ids), "folds": int(fold.max()) + 1, "seed": args.seed,
            "backbones": backbones, "heads": heads, "test_mode": args.test_mode,
            "unreadable": unreadable, "backbone_details": described,
            "seconds": round(time.time() - started, 1), "fit_seconds": round(fit_seconds, 1)}
    table = write_report(out, info, cv, holdout, chosen, clipped, reason, oof, y, submissions)
    print(table)
    print(f"\nsubmission: {out / 'submission.csv'} ({chosen}); one per model in {out / SUBMISSIONS}; "
          f"report: {out / 'report.md'}")
    return {"cv": cv, "holdout": holdout, "chosen": chosen}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stacking.run", description=__doc__.split("\n\n")[0])
    on_kaggle = KAGGLE_COMPETITION.exists()
    parser.add_argument("--data", nargs="+", default=[str(d) for d in default_data_dirs()],
                        help="Kaggle-layout folder(s); default: the Kaggle input, else the shared sample")
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                        help="comma-separated registry names or .keras paths (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="number of stratified folds (default: 5)")
    parser.add_argument("--folds-file", help="reuse a saved folds.csv instead of making new folds")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>/)")
    parser.add_argument("--submit-with", default=None, help="model for submission.csv "
                        "(default: the lowest CV log loss, clipped or not as --clip says)")
    parser.add_argument("--clip", choices=CLIP_MODES, default="auto",
                        help=f"clip the submission to {list(CLIP)}: auto keeps it where it lowers "
                             "the CV log loss")
    parser.add_argument("--heads", default="logistic",
                        help=f"level-1 heads per backbone, comma-separated: {', '.join(HEADS)}")
    parser.add_argument("--no-concat", action="store_true", help="skip the concat-fusion model")
    parser.add_argument("--finetune", default="",
                        help="comma-separated backbones to fine-tune, one network per fold, as "
                             "level-1 models <backbone>/finetuned (off by default: hours on a CPU)")
    parser.add_argument("--finetune-epochs", type=int, default=Recipe.epochs,
                        help="epochs of whole-network training per fold (default: %(default)s)")
    parser.add_argument("--no-imagenet", action="store_true",
                        help="leave out the ImageNet priors (<backbone>/imagenet: each backbone's "
                             "own ImageNet classifier, on by default where its top weights are at hand)")
    parser.add_argument("--test-mode", choices=TEST_MODES, default="fold_mean",
                        help="test predictions: mean of the fold models, or one model refitted on all rows")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="fraction of training photos kept aside as a labelled test (default: 0)")
    parser.add_argument("--weights", "--weights-dir", default="default",
                        help="weights for every backbone: 'imagenet', or a folder holding their files "
                             "(default: each backbone's own default)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="photos per forward pass (default: the runtime's measured best)")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation in extraction")
    parser.add_argument("--decode-once", action="store_true",
                        help="decode each photo once for all backbones (for a GPU fast enough that "
                             "decoding is the bound; on a CPU it does not help: benchmarks/RESULTS.md)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="Keras dtype policy of extraction (auto: mixed_float16 on GPUs with "
                             "tensor cores, else float32; benchmarks/RESULTS.md)")
    parser.add_argument("--cache", default=str(CACHE_DIR), help="feature cache folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="recompute stale feature caches")
    parser.add_argument("--exclude", default=None,
                        help="outliers.csv (features.clean): train without its rows whose drop is 1, "
                             "and report the CV with and without them")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    if args.out is None:
        base = KAGGLE_WORKING if on_kaggle else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        args.out = str(base)
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, KeyError, FileNotFoundError, StaleCacheError, ValueError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
