"""Clipping, scoring and the submission file: the one place for the clip bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss

from features.defaults import KAGGLE_COMPETITION
from features.task import DOGS_VS_CATS, Task, id_order_key
from oof.store import prediction_path

# Log loss punishes a confident mistake without bound; the public write-ups clip to these.
CLIP = (0.005, 0.995)


# The metric's own guard against log(0): Kaggle's, and scikit-learn's before 1.5.
EPS = 1e-15


def clip(p, bounds: tuple[float, float] | None = CLIP) -> np.ndarray:
    """Clip probabilities to ``bounds`` (None: unchanged). Class probabilities (n, K) are clipped,
    then each row renormalised: what Kaggle's multi-class log loss scores, so the file says it."""
    p = np.asarray(p, dtype=float)
    if bounds is None:
        return p
    p = np.clip(p, *bounds)
    return p / p.sum(axis=1, keepdims=True) if p.ndim == 2 else p


def scores(y, p) -> dict:
    """Log loss (unclipped and clipped) and accuracy of P(class 1) against 0/1 labels, or of (n, K)
    class probabilities against class indices (the multi-class log loss, rows renormalised)."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    labels = list(range(2 if p.ndim == 1 else p.shape[1]))
    predicted = p.argmax(axis=1) if p.ndim == 2 else p > 0.5
    return {
        "log_loss": float(log_loss(y, clip(p, (EPS, 1 - EPS)), labels=labels)),
        "log_loss_clipped": float(log_loss(y, clip(p), labels=labels)),
        "accuracy": float(accuracy_score(y, predicted)),
        "n": int(len(y)),
    }


def per_class_recall(y, p, classes) -> dict[str, float]:
    """The fraction of each class's photos whose most probable class is their own."""
    y, predicted = np.asarray(y), np.asarray(p).argmax(axis=1)
    return {c: float((predicted[y == k] == k).mean()) if (y == k).any() else float("nan")
            for k, c in enumerate(classes)}


CLIP_MODES = ("auto", "on", "off")
SUBMISSIONS = "submissions"  # a run's folder of per-model Kaggle files


def clip_rule(score: dict, mode: str = "auto") -> bool:
    """Whether a model's submission is clipped: "auto" where clipping lowers its CV log loss
    (``scores``' two log losses), or forced by "on" / "off"."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}; got {mode!r}")
    return {"on": True, "off": False}.get(mode, score["log_loss_clipped"] < score["log_loss"])


def submit_command(path: str | Path, message: str) -> str:
    """The Kaggle CLI line that submits a file to the competition."""
    return f'kaggle competitions submit -c {KAGGLE_COMPETITION.name} -f {path} -m "{message}"'


def submission_table(ids, p, bounds: tuple[float, float] | None = CLIP, task: Task = DOGS_VS_CATS) -> pd.DataFrame:
    """The task's submission: its id column, then P(classes[1]) (two classes), a probability
    per class, or the most probable class's name (a one-column format with K > 2 classes); rows
    in the sample submission's order, else in natural id order. An unreadable photo (NaN) gets
    the uniform 1/K."""
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("submission ids are not unique")
    p = np.asarray(p, dtype=float)
    p = clip(np.where(np.isnan(p), 1.0 / (2 if p.ndim == 1 else p.shape[1]), p), bounds)
    if p.ndim == 1:
        values = {task.columns[0]: p}
    elif len(task.columns) == 1:
        values = {task.columns[0]: np.asarray(task.classes)[p.argmax(axis=1)]}
    else:
        values = {c: p[:, k] for k, c in enumerate(task.classes)}
    sub = pd.DataFrame({task.id_column: ids, **values})
    order = task.test_order or sorted(ids, key=id_order_key)
    sub = sub.set_index(task.id_column).loc[list(order)].reset_index()
    if all(i.isdigit() for i in ids):
        sub[task.id_column] = sub[task.id_column].astype(int)
    return sub


def write_submission(path: str | Path, ids, p, bounds: tuple[float, float] | None = CLIP,
                     task: Task = DOGS_VS_CATS) -> pd.DataFrame:
    """``submission_table`` written as CSV (``id,label`` on Dogs vs. Cats)."""
    sub = submission_table(ids, p, bounds, task)
    sub.to_csv(path, index=False)
    return sub


def write_model_submissions(folder: str | Path, ids, predictions: dict[str, np.ndarray],
                            cv: dict[str, dict], clip_mode: str = "auto",
                            task: Task = DOGS_VS_CATS) -> dict[str, dict]:
    """A Kaggle-ready file per model (``folder/<model>.csv``, named as in test/), each clipped by
    ``clip_rule`` applied to that model's own CV scores; returns, per model, the file (relative
    to the run), whether it is clipped and its CV log loss as submitted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, p in predictions.items():
        clipped = clip_rule(cv[name], clip_mode)
        path = prediction_path(folder, name)
        write_submission(path, ids, p, CLIP if clipped else None, task)
        made[name] = {"file": f"{folder.name}/{path.name}", "clipped": clipped,
                      "cv_log_loss": cv[name]["log_loss_clipped" if clipped else "log_loss"]}
    return made
