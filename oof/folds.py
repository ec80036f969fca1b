"""Folds made once, saved, and checked to be a partition every time they are used.

Every model at every level uses the same folds, so out-of-fold predictions are comparable and the
level-2 model for fold k is trained only on rows outside fold k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import PredefinedSplit, StratifiedKFold

from features.defaults import SEED


class FoldError(ValueError):
    """Fold assignments that are not a partition of the training ids."""


def make_folds(ids, labels, n_folds: int = 5, seed: int = SEED) -> pd.DataFrame:
    """Stratified, seeded assignment of every training id to one of ``n_folds`` folds."""
    ids, labels = np.asarray(ids, dtype=str), np.asarray(labels)
    if n_folds < 2:
        raise FoldError(f"need at least 2 folds, got {n_folds}")
    fold = np.empty(len(ids), dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(ids, labels)):
        fold[val] = k
    folds = pd.DataFrame({"id": ids, "fold": fold})
    validate_folds(folds, ids)
    return folds


def validate_folds(folds: pd.DataFrame, ids=None) -> None:
    """Raise ``FoldError`` unless ``folds`` gives each id (of ``ids``, if given) exactly one fold
    and every fold 0..K-1 is non-empty."""
    if list(folds.columns[:2]) != ["id", "fold"]:
        raise FoldError(f"folds need columns id, fold; got {list(folds.columns)}")
    dup = folds["id"][folds["id"].duplicated()]
    if len(dup):
        raise FoldError(f"id '{dup.iloc[0]}' has more than one fold ({len(dup)} duplicated ids)")
    k = int(folds["fold"].max()) + 1
    present = set(folds["fold"].unique().tolist())
    if present != set(range(k)) or k < 2:
        raise FoldError(f"folds must be 0..K-1, each non-empty, K >= 2; got {sorted(present)}")
    if ids is not None:
        have, want = set(folds["id"]), set(np.asarray(ids, dtype=str).tolist())
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise FoldError(f"folds do not cover the training ids: {len(missing)} missing "
                            f"(e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})")


def save_folds(folds: pd.DataFrame, path: str | Path) -> None:
    validate_folds(folds)
    folds.to_csv(path, index=False)


def load_folds(path: str | Path, ids=None) -> pd.DataFrame:
    """Read saved folds; with ``ids``, check they cover exactly those ids and return them in that order."""
    folds = pd.read_csv(path, dtype={"id": str, "fold": int})
    try:
        validate_folds(folds, ids)
    except FoldError as exc:
        raise FoldError(f"{path}: {exc}") from None
    return align_folds(folds, ids) if ids is not None else folds


def align_folds(folds: pd.DataFrame, ids) -> pd.DataFrame:
    """The fold rows of ``ids``, in that order (ids must all be present)."""
    ids = np.asarray(ids, dtype=str)
    out = folds.set_index("id").loc[ids].reset_index()
    return out


def fold_cv(fold: np.ndarray) -> PredefinedSplit:
    """The folds as a scikit-learn splitter (for ``cross_val_predict`` and friends)."""
    return PredefinedSplit(np.asarray(fold))
