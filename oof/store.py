"""Saving and checking level-1 predictions: one validator used wherever predictions are read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class PredictionError(ValueError):
    """Predictions that cannot be stacked: wrong length, out of [0, 1], NaN, or ids/folds disagree."""


def validate_oof(pred, ids=None, folds: pd.DataFrame | None = None, name: str = "predictions",
                 allow_nan: bool = False) -> np.ndarray:
    """Check a column of probabilities (and, if given, that it lines up with ids and folds)."""
    pred = np.asarray(pred, dtype=float)
    if pred.ndim != 1:
        raise PredictionError(f"{name}: expected one probability per row, got shape {pred.shape}")
    if ids is not None and len(ids) != len(pred):
        raise PredictionError(f"{name}: {len(pred)} predictions for {len(ids)} ids")
    bad = np.isnan(pred)
    if bad.any() and not allow_nan:
        raise PredictionError(f"{name}: {bad.sum()} NaN predictions (first at row {np.argmax(bad)})")
    finite = pred[~bad]
    if len(finite) and (finite.min() < 0 or finite.max() > 1):
        raise PredictionError(f"{name}: probabilities must lie in [0, 1]; got "
                              f"[{finite.min():.4g}, {finite.max():.4g}]")
    if folds is not None and ids is not None:
        if list(np.asarray(ids, dtype=str)) != list(folds["id"].astype(str)):
            raise PredictionError(f"{name}: ids are not those of the folds, in the same order")
    return pred


def prediction_path(folder: str | Path, model: str) -> Path:
    """Where a model's predictions live in a run's oof/ or test/ folder: level-1 names
    ("<backbone>/<head>") become "<backbone>__<head>.csv"."""
    return Path(folder) / f"{model.replace('/', '__')}.csv"


def level1_prediction_files(folder: str | Path) -> list[Path]:
    """The level-1 heads' files in a run's oof/ or test/ folder (see ``prediction_path``)."""
    return sorted(Path(folder).glob("*__*.csv"))


def save_oof(path: str | Path, ids, labels, fold, oof) -> None:
    """``id,label,fold,pred`` for every training row."""
    validate_oof(oof, ids, name=str(path))
    pd.DataFrame({"id": ids, "label": labels, "fold": fold, "pred": oof}).to_csv(path, index=False)


def save_test(path: str | Path, ids, pred) -> None:
    """``id,pred`` for every test row (NaN where the photo could not be read)."""
    validate_oof(pred, ids, name=str(path), allow_nan=True)
    pd.DataFrame({"id": ids, "pred": pred}).to_csv(path, index=False)


def load_oof(path: str | Path, folds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read saved OOF predictions, checked (and, with ``folds``, checked against them)."""
    df = pd.read_csv(path, dtype={"id": str})
    validate_oof(df["pred"], df["id"], folds, name=str(path))
    if folds is not None and not np.array_equal(df["fold"].to_numpy(), folds["fold"].to_numpy()):
        raise PredictionError(f"{path}: made on other folds than the run's")
    return df
