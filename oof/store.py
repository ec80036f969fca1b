"""Saving and checking level-1 predictions: one validator used wherever predictions are read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class PredictionError(ValueError):
    """Predictions that cannot be stacked: wrong length, out of [0, 1], NaN, or ids/folds disagree."""


def validate_oof(pred, ids=None, folds: pd.DataFrame | None = None, name: str = "predictions",
                 allow_nan: bool = False) -> np.ndarray:
    """Check a column of probabilities, or (n, K) class probabilities (and, if given, that they
    line up with ids and folds)."""
    pred = np.asarray(pred, dtype=float)
    if pred.ndim not in (1, 2):
        raise PredictionError(f"{name}: expected one probability per row, or one per class, got shape {pred.shape}")
    if ids is not None and len(ids) != len(pred):
        raise PredictionError(f"{name}: {len(pred)} predictions for {len(ids)} ids")
    bad = np.isnan(pred)
    if bad.any() and not allow_nan:
        rows = bad if bad.ndim == 1 else bad.any(axis=1)
        raise PredictionError(f"{name}: {rows.sum()} NaN predictions (first at row {np.argmax(rows)})")
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


CLASS_PREFIX = "pred:"  # K > 2 classes: one column "pred:<class>" per class


def _pred_columns(pred: np.ndarray, classes) -> dict:
    """``pred`` (two classes: P(class 1)), or ``pred:<class>`` for each of K > 2 classes."""
    if pred.ndim == 1:
        return {"pred": pred}
    names = list(classes) if classes is not None else list(range(pred.shape[1]))
    return {f"{CLASS_PREFIX}{c}": pred[:, k] for k, c in enumerate(names)}


def predictions(df: pd.DataFrame) -> np.ndarray:
    """The predictions of a saved table: its ``pred`` column, or its (n, K) ``pred:<class>`` columns."""
    if "pred" in df.columns:
        return df["pred"].to_numpy()
    return df[[c for c in df.columns if str(c).startswith(CLASS_PREFIX)]].to_numpy()


def save_oof(path: str | Path, ids, labels, fold, oof, classes=None) -> None:
    """``id,label,fold,pred`` for every training row (``pred:<class>`` columns for K > 2 classes)."""
    oof = validate_oof(oof, ids, name=str(path))
    pd.DataFrame({"id": ids, "label": labels, "fold": fold, **_pred_columns(oof, classes)}).to_csv(path, index=False)


def save_test(path: str | Path, ids, pred, classes=None) -> None:
    """``id,pred`` for every test row (NaN where the photo could not be read)."""
    pred = validate_oof(pred, ids, name=str(path), allow_nan=True)
    pd.DataFrame({"id": ids, **_pred_columns(pred, classes)}).to_csv(path, index=False)


def load_oof(path: str | Path, folds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read saved OOF predictions, checked (and, with ``folds``, checked against them)."""
    df = pd.read_csv(path, dtype={"id": str})
    validate_oof(predictions(df), df["id"], folds, name=str(path))
    if folds is not None and not np.array_equal(df["fold"].to_numpy(), folds["fold"].to_numpy()):
        raise PredictionError(f"{path}: made on other folds than the run's")
    return df
