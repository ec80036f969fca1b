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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from features.cache import StaleCacheError, cache_path, load_features, read_attrs
from features.data import DataError, PhotoSet, load_photos
from features.defaults import CACHE_DIR, KAGGLE_COMPETITION, KAGGLE_WORKING, SEED, default_data_dirs
from features.extract import check_precision, extract, extract_many, setup_logging
from features.models import resolve_weights, weights_identity
from features.imagenet import top_weights
from features.registry import Backbone, get_backbone, list_backbones
from features.runtime import PRECISIONS, choose_precision, has_gpu
from features.task import DOGS_VS_CATS, Task
from oof.crossfit import TEST_MODES, cross_fit
from oof.folds import align_folds, load_folds, make_folds, save_folds
from oof.heads import HEADS
from oof.store import prediction_path, save_oof, save_test
from oof.finetune import (FINETUNED, Recipe, estimate_seconds, finetune_folds, fold_stats, is_kept,
                          network_folds, recipe_for, remembered_rate, work_folder)
from stacking.ensemble import CONCAT, PRIOR, Ensemble, fit_ensemble
from stacking.report import choose_model, write_report
from stacking.stackers import STACKERS
from stacking.submission import (CLIP, CLIP_MODES, SUBMISSIONS, scores, write_model_submissions,
                                 write_submission)

log = logging.getLogger("gapstack")

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Minutes of fine-tuning a run may spend by default: well inside a Kaggle GPU session's 12 hours,
# with extraction, the heads and the stackers still to come.
FINETUNE_MINUTES = 120.0


def holdout_ids(photos: PhotoSet, fraction: float, seed: int = SEED) -> set[str]:
    """A stratified, seeded fraction of the training photos, set aside as a labelled test."""
    if not fraction:
        return set()
    from sklearn.model_selection import train_test_split

    _, held = train_test_split([p.id for p in photos.train], test_size=fraction, random_state=seed,
                               stratify=[p.label for p in photos.train])
    return set(held)


@dataclass
class BackboneFeatures:
    """Stage 1: every backbone's cached features (``loaded``), what made them (``described``, one
    dict per backbone, as the ensemble keeps them), the photos some backbone could not read, and
    the ImageNet tops at hand ({backbone: top})."""

    loaded: dict
    described: list[dict]
    unreadable: list[str]

    @property
    def tops(self) -> dict:
        return {name: f.top for name, f in self.loaded.items() if f.top is not None}


@dataclass
class Setup:
    """What every stage reads, in one object: the run's settings (the parsed flags), what they
    planned (``Plan``), and the photos with their task (classes, labels, submission format,
    metric), as timm's ``pretrained_cfg`` travels with a model."""

    args: argparse.Namespace
    plan: "Plan"
    photos: PhotoSet

    @property
    def task(self) -> Task:
        return self.photos.task

    @property
    def cache(self) -> Path:
        return Path(self.args.cache)

    @property
    def imagenet(self) -> bool:
        return imagenet_prior_on(self.args, self.task)


def gather(setup: Setup) -> BackboneFeatures:
    """Features of every backbone from the cache (extracting what is missing: backbone by backbone,
    or with ``--decode-once`` each photo decoded once for all of them), and what made them; with
    each backbone's ImageNet classifier and logits where its top is at hand and the task uses them."""
    a, photos, backbones, imagenet = setup.args, setup.photos, setup.plan.backbones, setup.imagenet
    weights, tta, cache = a.weights, a.tta, setup.cache
    loaded, described, unreadable = {}, [], []
    if a.decode_once:
        paths = extract_many(photos, backbones, weights, cache, a.batch_size, overwrite=a.overwrite,
                             tta=tta, precision=a.precision, imagenet=imagenet)
    else:
        paths = {get_backbone(name).name: extract(photos, name, weights, cache, a.batch_size,
                                                  overwrite=a.overwrite, tta=tta, precision=a.precision,
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
    return BackboneFeatures(loaded, described, sorted(set(unreadable)))


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


@dataclass
class TrainingRows:
    """Stage 2: the training photos every backbone could read (held-out ones set aside), their
    ids, labels and feature rows, and the fold of each row (made once, saved, shared by every
    model at every level)."""

    train: list
    held: list
    ids: list[str]
    y: np.ndarray
    X: dict[str, np.ndarray]
    fold: np.ndarray | None = None


def split_holdout(photos: PhotoSet, fraction: float, seed: int = SEED) -> tuple[list, list]:
    """(kept, held out): the training photos, in order, without and with the holdout's."""
    held_out = holdout_ids(photos, fraction, seed)
    return ([p for p in photos.train if p.id not in held_out], [p for p in photos.train if p.id in held_out])


def training_rows(photos: PhotoSet, loaded: dict, holdout: float, seed: int) -> TrainingRows:
    """The rows every model trains on: readable by every backbone, not held out. (The cache holds
    every training photo; the holdout is a selection of rows, so changing --holdout never
    invalidates the features.)"""
    kept, held = split_holdout(photos, holdout, seed)
    readable = set.intersection(*(set(f.train_ids) for f in loaded.values()))
    train = [p for p in kept if p.id in readable]
    ids, y = [p.id for p in train], np.array([p.label for p in train])
    return TrainingRows(train, held, ids, y, rows(loaded, ids, "train"))


def assign_folds(ids: list[str], y: np.ndarray, n_folds: int, folds_file: str | None, seed: int) -> pd.DataFrame:
    """The folds of these rows: made (stratified, seeded) or read from ``folds_file``."""
    return load_folds(folds_file, ids) if folds_file else make_folds(ids, y, n_folds, seed)


def shared_folds(ids: list[str], y: np.ndarray, out: Path, n_folds: int, folds_file: str | None,
                 seed: int) -> np.ndarray:
    """The fold of each row: made once (or read from ``folds_file``), saved as OUT/folds.csv."""
    folds = assign_folds(ids, y, n_folds, folds_file, seed)
    save_folds(folds, out / "folds.csv")
    return align_folds(folds, ids)["fold"].to_numpy()


@dataclass
class FineTuned:
    """Stage 3a: the fine-tuned networks. ``models``: their level-1 CrossFits; ``described``: the
    fold networks as backbones; ``features``: their GAP rows by photo id; ``info``: what the report
    says of each backbone's fine-tuning."""

    models: dict = field(default_factory=dict)
    described: list[dict] = field(default_factory=list)
    features: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def finetune_all(setup: Setup, names: dict[str, float], loaded: dict, data: TrainingRows) -> FineTuned:
    """Each backbone of ``names`` ({backbone: seconds said for it}, as ``plan_finetune`` kept
    them) trained once per fold with its own recipe (``oof.finetune``; ``--finetune-epochs``, when
    set, overrides the recipes' epoch counts). The time said is revised as folds finish."""
    a, photos, cache, weights = setup.args, setup.photos, setup.cache, setup.args.weights
    tuned = FineTuned()
    extra = data.held + photos.test
    for name, estimate in names.items():
        backbone = get_backbone(name)
        recipe = recipe_of(setup.plan, backbone, a)
        warm = None if recipe.frozen_until else warm_features(setup, backbone, loaded, data)
        resolved = resolve_weights(backbone, weights)
        work = work_folder(cache / "finetune", backbone, weights_identity(resolved), recipe,
                           data.train, data.y, data.fold)
        result = finetune_folds(backbone, weights, data.train, data.y, data.fold, warm, extra, work, recipe,
                                estimate=estimate)
        tuned.models[f"{backbone.name}/{FINETUNED}"] = result.crossfit()
        for net in result.networks:
            tuned.described.append({"name": net.entry.name, "entry": asdict(net.entry),
                                    "weights": net.entry.weights, "tta": False, "precision": "float32",
                                    "fold_network_of": backbone.name})
        tuned.features.update(result.features)
        tuned.info[backbone.name] = {"recipe": asdict(recipe), "work": str(work), "folds": fold_stats(work),
                                     "seconds_this_run": result.seconds}
    return tuned


def warm_features(setup: Setup, backbone: Backbone, loaded: dict, data: TrainingRows) -> np.ndarray:
    """The frozen backbone's GAP features of the training rows, where a whole network's warm-up
    head is fitted: the run's own, else extracted (and cached) for this alone, not made one of the
    run's level-1 backbones. A top-only recipe needs none: it warms up on its kept activations."""
    a = setup.args
    feats = loaded[backbone.name] if backbone.name in loaded else load_features(
        extract(setup.photos, backbone.name, a.weights, setup.cache, a.batch_size, precision=a.precision))
    return rows({backbone.name: feats}, data.ids, "train")[backbone.name]


def plan_finetune(setup: Setup) -> dict[str, float]:
    """The backbones fine-tuning will train, settled before any photo is decoded: each one's time
    is said first (throughput measured here on a few steps), and with ``--finetune auto`` one that
    would take the run past ``--finetune-budget`` minutes is left out now, not after extraction.
    The rows and folds are the ones the run will have if every photo reads (as nearly always).
    Returns {backbone: the seconds said for it}."""
    plan, photos, args = setup.plan, setup.photos, setup.args
    if not plan.finetune:
        return {}
    train, held = split_holdout(photos, args.holdout, args.seed)
    ids, y = [p.id for p in train], np.array([p.label for p in train])
    folds = assign_folds(ids, y, args.folds, args.folds_file, args.seed)
    data = TrainingRows(train, held, ids, y, {}, align_folds(folds, ids)["fold"].to_numpy())
    n_extra, cache, budget = len(data.held) + len(photos.test), Path(args.cache), args.finetune_budget
    kept, spent = {}, 0.0
    for name in plan.finetune:
        backbone = get_backbone(name)
        recipe = recipe_of(plan, backbone, args)
        resolved = resolve_weights(backbone, args.weights)
        work = work_folder(cache / "finetune", backbone, weights_identity(resolved), recipe, train, y, data.fold)
        frozen = cache_path(cache, backbone.name, photos)
        seconds = finetune_estimate(backbone, args.weights, recipe, data, n_extra,
                                    read_attrs(frozen) if frozen.is_file() else {}, work)
        over = budget is not None and seconds and spent + seconds > budget * 60
        if over and plan.finetune_auto:
            log.warning("%s fine-tuning left out: it would take the run's fine-tuning to %.0f min, "
                        "past its %g-min budget (--finetune-budget, FINETUNE_BUDGET in kernel.py)",
                        backbone.name, (spent + seconds) / 60, budget)
            continue
        if over:
            log.warning("%s fine-tuning goes past the %g-min budget (--finetune-budget); "
                        "going on, since it was asked for by name", backbone.name, budget)
        spent += seconds
        kept[name] = seconds
    return kept


def read_exclusions(path: str | Path) -> set[str]:
    """Ids to leave out of training: rows of an outliers.csv (from oof.clean) whose ``drop``
    is 1, or every row when the file has no ``drop`` column."""
    df = pd.read_csv(path, dtype={"id": str})
    if "id" not in df.columns:
        raise ValueError(f"{path}: needs an id column (an outliers.csv from oof.clean)")
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
        merged = np.empty((len(keep),) + p.shape[1:])
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


# int8 extraction against float32 on CPUs with int8 instructions: 2.2-2.6x measured
# (benchmarks/RESULTS.md, "int8 features"); the fold networks and the frozen part run in float32.
INT8_SPEEDUP = 2.4


def finetune_estimate(backbone, weights, recipe: Recipe, data: TrainingRows, n_extra: int, frozen: dict,
                      work: Path) -> float:
    """Seconds the folds not yet kept in ``work`` will take, said in the log (0: all kept).
    Training speed, and a top-only recipe's pass through its frozen part, are measured on a few
    steps here (or were, on this machine: remembered_rate); predicting speed is the frozen
    backbone's extraction speed from its cache's attributes (``frozen``; {} before it exists),
    in float32 as fold networks predict (an int8 cache's divided by ``INT8_SPEEDUP``); before
    any extraction, three times the training speed."""
    folds = np.unique(network_folds(data.fold, recipe))
    left = [k for k in folds if not is_kept(work / f"fold{k}")]
    if not left:
        return 0.0
    speed = remembered_rate(backbone, weights, data.train, recipe)
    train_rate, measured = speed.train, speed.measured
    views = (1 + recipe.flip) if recipe.frozen_until else 0
    run = frozen.get("last_run") or {}
    if views and speed.frozen:
        predict_rate = speed.frozen
    elif run.get("seconds"):  # fold networks and the frozen part run in float32
        predict_rate = run["photos"] / run["seconds"] / (INT8_SPEEDUP if run.get("precision") == "int8" else 1)
    else:  # a forward pass against a training step: 3x for the whole network
        predict_rate = 3 * train_rate
    seconds = estimate_seconds(len(data.ids), n_extra, len(folds), recipe.epochs, train_rate,
                               predict_rate, len(left), views)
    log.info("%s fine-tuning%s: %d fold(s) x %d epoch(s) on %d photos, training at %.0f photos/s "
             "and %s at %.0f (measured here%s): about %.0f min", backbone.name,
             f" of the layers after {recipe.frozen_until}" if views else "", len(left),
             recipe.epochs, len(data.ids) * (len(folds) - 1) // len(folds), train_rate,
             "computing the frozen part once" if views else "predicting", predict_rate,
             f" on {measured}" if measured else "", seconds / 60)
    return seconds


@dataclass
class Plan:
    """What the arguments ask for, checked before any photo is read: the backbones and the
    fine-tuned backbones (as given: registry names or .keras paths), and the level-1 heads."""

    backbones: list[str]
    heads: list[str]
    finetune: list[str]
    finetune_auto: bool = False  # chosen by --finetune auto: kept within the budget
    recipe_kind: str = "whole"  # "whole" network or "top" only (--finetune-recipe)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def recipe_kind(requested: str, gpu: bool) -> str:
    """--finetune-recipe: "auto" (the default) is the whole network on a GPU and the top only on
    a CPU (benchmarks/RESULTS.md: the whole network's larger gain costs hours there)."""
    if requested == "auto":
        return "whole" if gpu else "top"
    recipe_for("efficientnet_lite0", kind=requested)  # an unknown kind is refused here
    return requested


def recipe_of(plan: "Plan", backbone: Backbone, args: argparse.Namespace) -> Recipe:
    """The backbone's recipe of the run's kind; the whole network where it has no top recipe
    (a backbone named with --finetune)."""
    recipe = (recipe_for(backbone, args.finetune_epochs, args.seed, plan.recipe_kind)
              or recipe_for(backbone, args.finetune_epochs, args.seed))
    return replace(recipe, networks=args.finetune_networks) if args.finetune_networks else recipe


def finetune_choice(requested: str, backbones: list[str], gpu: bool, exclude: bool, kind: str = "whole") -> list[str]:
    """The backbones to fine-tune. "auto" (the default): every backbone of the run where Keras has
    a GPU (minutes a backbone there); on a CPU, with ``kind`` "top" (the default there), those
    with a top-only recipe (minutes; the whole network takes hours there: opt-in, by name);
    none with --exclude; "none" or "": none; else the names given."""
    if requested.strip() != "auto":
        return [] if requested.strip() == "none" else _names(requested)
    if exclude:
        log.info("fine-tuning: off with --exclude (the fold networks would have to be trained "
                 "twice, with and without the excluded photos)")
        return []
    if gpu:
        return list(backbones)
    chosen = [b for b in backbones if kind == "top" and recipe_for(b, kind="top")]
    rest = [b for b in backbones if b not in chosen]
    log.info("fine-tuning on a CPU: %s%s", f"the top of {', '.join(chosen)} (minutes)" if chosen else "none",
             f"; not the whole of {', '.join(rest)} (hours here; --finetune {rest[0]} turns it on and says "
             "first how long it will take)" if rest else "")
    return chosen


def planned_models(backbones: list[Backbone], heads: list[str], weights, imagenet: bool,
                   finetune: list[Backbone], concat: bool) -> list[str]:
    """The models a run with these settings will have (an ImageNet prior where its top is at hand)."""
    level1 = [f"{b.name}/{h}" for b in backbones for h in heads]
    level1 += [f"{b.name}/{PRIOR}" for b in backbones if imagenet and top_weights(b, weights) is not None]
    level1 += [f"{b.name}/{FINETUNED}" for b in finetune]
    return level1 + ([CONCAT] if concat else []) + (list(STACKERS) if len(level1) > 1 else [])


def imagenet_prior_on(args: argparse.Namespace, task: Task) -> bool:
    """The ImageNet priors are cat-or-dog odds: on for that task unless --no-imagenet says no."""
    return task.cats_and_dogs and not args.no_imagenet


def check_args(args: argparse.Namespace, task: Task = DOGS_VS_CATS) -> Plan:
    """Every mistake that can be found before extraction, in one sentence naming it: unknown
    backbones, heads or models, settings that cannot work for this ``task``, an output folder
    that cannot be written (it is made here)."""
    backbones = _names(args.backbones)
    entries = [get_backbone(b) for b in backbones]  # an unknown name is refused here
    if not backbones:
        raise ValueError("--backbones names no backbone; e.g. --backbones "
                         f"{','.join(DEFAULT_BACKBONES)} (available: {', '.join(list_backbones())}, "
                         "or the path of a saved .keras model)")
    heads = _names(args.heads)
    for h in heads:
        if h not in HEADS:
            raise KeyError(f"Unknown head '{h}'; available: {', '.join(HEADS)}")
    auto = args.finetune.strip() == "auto"
    kind = recipe_kind(args.finetune_recipe, has_gpu())
    finetune = finetune_choice(args.finetune, backbones, has_gpu(), bool(args.exclude), kind)
    tuned = [get_backbone(b) for b in finetune]
    most = args.finetune_networks if args.folds_file else args.folds  # a folds file's count: checked once read
    if finetune and args.finetune_networks is not None and not 2 <= args.finetune_networks <= most:
        raise ValueError(f"--finetune-networks {args.finetune_networks}: between 2 and --folds ({args.folds})")
    if finetune and args.finetune_epochs is not None and args.finetune_epochs < 1:
        raise ValueError(f"--finetune-epochs {args.finetune_epochs}: fine-tuning needs at least one epoch")
    if finetune and args.exclude and not auto:
        raise ValueError("--finetune and --exclude do not combine (the fine-tuned networks "
                         "would have to be trained twice)")
    if not args.folds_file and args.folds < 2:
        raise ValueError(f"--folds {args.folds}: out-of-fold predictions need at least 2 folds")
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout {args.holdout}: a fraction of the training photos, 0 <= f < 1")
    check_precision(choose_precision(args.precision), "auto")
    for flag, path in (("--exclude", args.exclude), ("--folds-file", args.folds_file)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    check_submit_with(args, entries, heads, tuned, task=task)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gapstack-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return Plan(backbones, heads, finetune, auto, kind)


def check_submit_with(args: argparse.Namespace, entries: list[Backbone], heads: list[str],
                      tuned: list[Backbone], why: str = "", task: Task = DOGS_VS_CATS) -> None:
    """``--submit-with`` must name a model this run will have (``why``: what changed the plan)."""
    if not args.submit_with:
        return
    models = planned_models(entries, heads, args.weights, imagenet_prior_on(args, task), tuned, not args.no_concat)
    if args.submit_with not in models:
        raise KeyError(f"Unknown model '{args.submit_with}' for --submit-with; this run will have{why}: "
                       + ", ".join(models))


def check_training_set(photos: PhotoSet, holdout: float, n_folds: int | None, seed: int = SEED) -> None:
    """Labels that cannot make stratified folds, said before any photo is decoded: one class only,
    or a class with fewer training photos than folds."""
    # (One class cannot be split stratified; the photos as they are then say it.)
    classes = photos.task.classes
    kept = split_holdout(photos, holdout, seed)[0] if len({p.label for p in photos.train}) > 1 else photos.train
    counts = pd.Series([p.label for p in kept]).value_counts().reindex(range(len(classes)), fill_value=0)
    where = ", ".join(photos.sources)
    if (counts > 0).sum() < 2:
        raise DataError(f"{where}: the training photos are all of one class "
                        f"({classes[int(counts.idxmax())] if counts.any() else 'none'}); a classifier needs two at least")
    if n_folds and counts.min() < n_folds:
        few = [f"{classes[k]} ({n})" for k, n in counts.items() if n < n_folds]
        raise DataError(f"{where}: {', '.join(few[:5])}{' ...' if len(few) > 5 else ''}: fewer training photos "
                        f"than the {n_folds} folds (a class needs one photo in every fold)")


@dataclass
class Fitted:
    """Stages 3b and 4: the ensemble fitted on the training rows (all of them, or those kept by
    ``--exclude``), each model's OOF P(dog), the rows that OOF is over, and the exclusion
    comparison (None without ``--exclude``)."""

    ensemble: Ensemble
    oof: dict[str, np.ndarray]
    ids: list[str]
    y: np.ndarray
    fold: np.ndarray
    exclusion: dict | None
    seconds: float


def fit_levels(setup: Setup, feats: BackboneFeatures, data: TrainingRows, tuned: FineTuned) -> Fitted:
    """Level 1 (a head per backbone, the ImageNet priors, the fine-tuned networks, concat-fusion)
    and level 2 (the stackers), all on the shared folds. With ``--exclude`` (an outliers.csv), every
    model is fitted with the listed rows first, for the comparison, then without them."""
    heads, concat, test_mode, exclude = (setup.plan.heads, not setup.args.no_concat, setup.args.test_mode,
                                         setup.args.exclude)
    X, y, fold, ids = data.X, data.y, data.fold, data.ids
    if exclude:
        keep = ~np.isin(ids, sorted(read_exclusions(exclude)))
        log.info("exclusion: %d of %d training photos left out; fitting with them for comparison",
                 int((~keep).sum()), len(keep))
        _, oof_with = fit_ensemble(feats.described, X, y, fold, heads, concat, test_mode=test_mode,
                                   tops=feats.tops, log=log.debug)
        ids = [i for i, k in zip(ids, keep) if k]
        X, y, fold = {b: x[keep] for b, x in X.items()}, y[keep], fold[keep]
    started = time.time()
    ensemble, oof = fit_ensemble(feats.described, X, y, fold, heads, concat, test_mode=test_mode,
                                 tops=feats.tops, finetuned=tuned.models, log=log.info)
    ensemble.backbones, ensemble.task = feats.described + tuned.described, setup.task
    seconds = time.time() - started
    exclusion = None
    if exclude:
        excluded_pred = ensemble.predict_all({b: x[~keep] for b, x in data.X.items()})
        exclusion = compare_exclusion(exclude, keep, data.y, oof_with, oof, excluded_pred)
    return Fitted(ensemble, oof, ids, y, fold, exclusion, seconds)


def features_of(feats: BackboneFeatures, tuned: FineTuned, ids: list[str], split: str) -> dict[str, np.ndarray]:
    """Every backbone's rows for ``ids``, fold networks included."""
    out = rows({b["name"]: feats.loaded[b["name"]] for b in feats.described}, ids, split)
    for b in tuned.described:
        out[b["name"]] = id_rows(tuned.features[b["name"]], ids, b["entry"]["feature_dim"])
    return out


def write_outputs(setup: Setup, fitted: Fitted, test_pred: dict[str, np.ndarray]) -> tuple[dict, str, bool, str, dict]:
    """Stage 5: the ensemble (model/), every model's OOF and test predictions, submission.csv and
    one submission per model (none without test photos). Returns (CV scores, chosen model,
    clipped, why, submissions)."""
    out, task, submit_with, clip_mode = Path(setup.args.out), setup.task, setup.args.submit_with, setup.args.clip
    test_ids = [p.id for p in setup.photos.test]
    ensemble, oof = fitted.ensemble, fitted.oof
    cv = {name: scores(fitted.y, p) for name, p in oof.items()}
    chosen, clipped, reason = choose_model(cv, submit_with, clip_mode)
    ensemble.submit_with, ensemble.clip = chosen, CLIP if clipped else None
    ensemble.save(out / "model")
    (out / "oof").mkdir(exist_ok=True)
    for name, p in oof.items():
        save_oof(prediction_path(out / "oof", name), fitted.ids, fitted.y, fitted.fold, p, task.classes)
    if not test_ids:
        log.info("no test photos: no submission (the model in %s predicts new photos: python -m stacking.predict)",
                 out / "model")
        return cv, chosen, clipped, reason, {}
    (out / "test").mkdir(exist_ok=True)
    for name, p in test_pred.items():
        save_test(prediction_path(out / "test", name), test_ids, p, task.classes)
    write_submission(out / "submission.csv", test_ids, test_pred[chosen], ensemble.clip, task)
    submissions = write_model_submissions(out / SUBMISSIONS, test_ids, test_pred, cv, clip_mode, task)
    return cv, chosen, clipped, reason, submissions


def test_labelled(test: list) -> bool:
    """Whether the test split came with labels (class folders under test/): then it is scored."""
    return bool(test) and all(p.label >= 0 for p in test)


def score_holdout(out: Path, held: list, predict, models) -> dict | None:
    """Every model's scores on the held-out photos, and OUT/holdout.csv (their labels and P(dog));
    ``predict``: photo ids -> every model's P(dog)."""
    if not held:
        return None
    held_ids, held_y = [p.id for p in held], np.array([p.label for p in held])
    predicted = predict(held_ids)
    own = {name if p.ndim == 1 else f"{name}:P(label)": p if p.ndim == 1 else p[np.arange(len(p)), held_y]
           for name, p in predicted.items()}  # K > 2 classes: the probability each gave the photo's class
    pd.DataFrame({"id": held_ids, "label": held_y, **own}).to_csv(out / "holdout.csv", index=False)
    return {name: scores(held_y, predicted[name]) for name in models}


def run(args: argparse.Namespace) -> dict:
    """Features -> folds -> level 1 (heads, priors, fine-tuned networks) -> level 2 -> outputs."""
    started = time.time()
    photos = load_photos(args.data, labels=args.labels)
    log.info("%s", photos.task.describe(len(photos.train), len(photos.test), test_labelled(photos.test)))
    plan = check_args(args, photos.task)
    out = Path(args.out)
    check_training_set(photos, args.holdout, None if args.folds_file else args.folds, args.seed)
    setup = Setup(args, plan, photos)
    finetune = plan_finetune(setup)
    if list(finetune) != plan.finetune:
        check_submit_with(args, [get_backbone(b) for b in plan.backbones], plan.heads,
                          [get_backbone(b) for b in finetune], " once fine-tuning keeps within its budget",
                          photos.task)
    feats = gather(setup)
    data = training_rows(photos, feats.loaded, args.holdout, args.seed)
    data.fold = shared_folds(data.ids, data.y, out, args.folds, args.folds_file, args.seed)
    tuned = finetune_all(setup, finetune, feats.loaded, data)
    fitted = fit_levels(setup, feats, data, tuned)
    test_ids = [p.id for p in photos.test]
    test_pred = fitted.ensemble.predict_all(features_of(feats, tuned, test_ids, "test"))
    cv, chosen, clipped, reason, submissions = write_outputs(setup, fitted, test_pred)
    holdout = score_holdout(out, data.held, lambda ids: fitted.ensemble.predict_all(
        features_of(feats, tuned, ids, "train")), cv)
    test = {name: scores([p.label for p in photos.test], test_pred[name]) for name in cv} \
        if test_labelled(photos.test) else None
    level1, stackers = list(fitted.ensemble.level1), list(fitted.ensemble.level2)
    y, fold = fitted.y, fitted.fold
    info = {"out": str(out), "data": photos.sources, "n_train": len(fitted.ids), "n_holdout": len(data.held),
            "exclusion": fitted.exclusion,
            "finetune": tuned.info or None,
            "imagenet_prior": effect_of(of_kind(level1, PRIOR), fitted.oof, level1, y, fold, stackers),
            "finetune_effect": effect_of(of_kind(level1, FINETUNED), fitted.oof, level1, y, fold, stackers),
            "n_test": len(test_ids), "folds": int(fold.max()) + 1, "seed": args.seed,
            "task": photos.task.describe(len(photos.train), len(test_ids), bool(test)),
            "classes": list(photos.task.classes),
            "backbones": plan.backbones, "heads": plan.heads, "test_mode": args.test_mode,
            "unreadable": feats.unreadable, "backbone_details": feats.described,
            "seconds": round(time.time() - started, 1), "fit_seconds": round(fitted.seconds, 1)}
    table = write_report(out, info, cv, holdout, chosen, clipped, reason, fitted.oof, y, submissions, test=test)
    print(table)
    print(f"\nsubmission: {out / 'submission.csv'} ({chosen}); one per model in {out / SUBMISSIONS}; "
          f"report: {out / 'report.md'}" if test_ids else
          f"\nno test photos, so no submission; model: {out / 'model'} ({chosen}); report: {out / 'report.md'}")
    return {"cv": cv, "holdout": holdout, "test": test, "chosen": chosen}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stacking.run", description=__doc__.split("\n\n")[0])
    on_kaggle = KAGGLE_COMPETITION.exists()
    parser.add_argument("--data", nargs="+", default=[str(d) for d in default_data_dirs()],
                        help="data folder(s), in any layout read (Kaggle Dogs vs. Cats, class folders "
                             "train/<class>/*, or a labels CSV beside train/); default: the Kaggle input, "
                             "else the shared sample")
    parser.add_argument("--labels", default=None,
                        help="the labels CSV (an id and a label column) when it is not train.csv or "
                             "labels.csv in the data folder")
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
    parser.add_argument("--finetune", default="auto",
                        help="comma-separated backbones to fine-tune, one network per fold, as "
                             "level-1 models <backbone>/finetuned; auto (default): every backbone "
                             "where Keras has a GPU, on a CPU those with a top-only recipe "
                             "(--finetune-recipe), within --finetune-budget; none: off")
    parser.add_argument("--finetune-budget", type=float, default=FINETUNE_MINUTES, metavar="MINUTES",
                        help="minutes fine-tuning may take in all; with --finetune auto a backbone "
                             "that would pass it is left out (default: %(default)s)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="epochs of training per fold, for every fine-tuned backbone "
                             "(default: each backbone's recipe, oof.finetune.RECIPES)")
    parser.add_argument("--finetune-networks", type=int, default=None, metavar="G",
                        help="fold networks per fine-tuned backbone: G < --folds trains G networks, "
                             "each holding out every G-th fold (G=2: the photos once in all, not "
                             "folds-1 times; default: one per fold)")
    parser.add_argument("--finetune-recipe", choices=["auto", "whole", "top"], default="auto",
                        help="whole: train the whole network (oof.finetune.RECIPES, the larger gain); "
                             "top: only the layers after a split, on the lower part's activations "
                             "computed once (TOP_RECIPES, minutes on a CPU); auto (default): whole "
                             "on a GPU, top on a CPU")
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
                        help="how the features are computed: a Keras dtype policy, or int8 (ONNX "
                             "Runtime on a CPU, calibrated on training photos). auto: mixed_float16 "
                             "on GPUs with tensor cores; on a CPU, int8 where it pays (see "
                             "benchmarks/RESULTS.md), else float32")
    parser.add_argument("--cache", default=str(CACHE_DIR), help="feature cache folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="recompute stale feature caches")
    parser.add_argument("--exclude", default=None,
                        help="outliers.csv (oof.clean): train without its rows whose drop is 1, "
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
