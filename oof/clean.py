"""The cleaning command: ``features.clean``'s detectors with our model's out-of-fold doubt (any
number of classes; ImageNet's not-a-pet evidence only where the task is cats and dogs).

    python -m oof.clean --data DIR [DIR ...] [--out DIR] [--run RUN_DIR] [--cache DIR] [--top N]

The doubt is out-of-fold P(dog) of every training photo: a ``stacking.run``'s level-1 heads
(``--run``), else a logistic head cross-fitted here on the classifier's GAP features. Writes
``outliers.csv`` (id, label, score, detectors, values, drop=1 to edit), ``scores.csv`` (every photo,
ranked), ``contact_sheet.png`` and, with ``--top N``, ``top_N.png``; ``stacking.run --exclude
OUT/outliers.csv`` trains without the photos marked drop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from features.clean import IMAGENET_MODEL, MAX_FLAGGED, report_outliers, scan_photos
from features.defaults import CACHE_DIR, SEED
from oof.crossfit import cross_fit
from oof.folds import make_folds
from oof.heads import LogisticHead
from oof.store import level1_prediction_files, predictions


def oof_from_run(run_dir: Path, ids: list[str]) -> np.ndarray:
    """The level-1 heads' OOF P(dog) of a stacking run, one column per backbone head (n, models);
    with K > 2 classes each head's class probabilities (n, models, K)."""
    files = level1_prediction_files(run_dir / "oof")
    if not files:
        raise FileNotFoundError(f"{run_dir / 'oof'}: no level-1 OOF predictions (from stacking.run)")
    cols = []
    for f in files:
        df = pd.read_csv(f, dtype={"id": str}).set_index("id")
        missing = [i for i in ids if i not in df.index]
        if missing:
            raise ValueError(f"{f}: no OOF prediction for {len(missing)} photos (e.g. {missing[:3]})")
        cols.append(predictions(df.loc[ids]))
    return np.stack(cols, axis=1)


def cross_fitted_p_dog(gap: np.ndarray, labels: np.ndarray, ids: list[str], folds: int = 5,
                       seed: int = SEED) -> np.ndarray:
    """Out-of-fold P(dog) of a logistic head on GAP features, on stratified folds of the
    readable rows; 0.5 (no opinion) for a photo with no features. K > 2 classes: (n, 1, K), one
    model's class probabilities (1/K where there are no features)."""
    ok = np.isfinite(gap).all(axis=1)
    k = len(np.unique(labels))
    p_dog = np.full(len(gap) if k == 2 else (len(gap), 1, k), 1.0 / k)
    fold = make_folds(np.array(ids)[ok], labels[ok], folds, seed)["fold"].to_numpy()
    oof = cross_fit(LogisticHead(), gap[ok], labels[ok], fold).oof
    p_dog[ok] = oof if k == 2 else oof[:, None, :]
    return p_dog


def clean(data, out: Path, model_path: str | Path | None = None, run_dir: str | Path | None = None,
          folds: int = 5, top: int = 0, max_flagged: float = MAX_FLAGGED,
          cache: str | Path | None = None) -> pd.DataFrame:
    """Scan the photos, take the out-of-fold doubt (``run_dir``'s heads, else cross-fitted
    here) and write the cleaning files into ``out``; returns one row per training photo."""
    photos, table, gap, probs = scan_photos(data, model_path, cache)
    ids = [p.id for p in photos.train]
    labels = np.array([p.label for p in photos.train])
    if run_dir:
        p_dog = oof_from_run(Path(run_dir), ids)
    else:
        p_dog = cross_fitted_p_dog(gap[:len(ids)], labels, ids, folds)
    return report_outliers(photos, table, gap, probs, p_dog, out, top, max_flagged)


def main(argv: list[str] | None = None) -> int:
    from features.extract import setup_logging

    parser = argparse.ArgumentParser(prog="python -m oof.clean", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True,
                        help="data folder(s) in any layout stacking.run reads")
    parser.add_argument("--out", default="clean", help="output folder (default: %(default)s)")
    parser.add_argument("--imagenet-model", default=None,
                        help=f"Keras ImageNet classifier (default: {IMAGENET_MODEL} in the weights folder)")
    parser.add_argument("--cache", default=str(CACHE_DIR),
                        help="feature cache folder: where gap_efficientnet_lite2.h5 holds the "
                             "classifier's logits for these photos, they are read, not recomputed "
                             "(default: %(default)s)")
    parser.add_argument("--run", default=None,
                        help="a stacking.run output folder: use its level-1 OOF for label issues")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also draw top_N.png: the N most suspicious photos, flagged or not")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = clean(args.data, Path(args.out), args.imagenet_model, args.run, top=args.top,
                       cache=Path(args.cache))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flagged = result[result["flagged"]]
    counts = {d: int(result[d].sum()) for d in ("unreadable", "tiny", "colour", "imagenet", "nonpet", "far",
                                                 "label_issue", "duplicate")}
    print(f"{len(result)} photos; detectors fired: "
          + ", ".join(f"{d} {c}" for d, c in counts.items())
          + f"; flagged {len(flagged)} ({100 * len(flagged) / max(len(result), 1):.1f} %)")
    print(f"wrote {Path(args.out) / 'outliers.csv'} and {Path(args.out) / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
