"""Clipping, scoring and the submission file: the one place for the clip bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss

from features.defaults import KAGGLE_COMPETITION
from oof.store import prediction_path

# Log loss punishes a confident mistake without bound; the public write-ups clip to these.
CLIP = (0.005, 0.995)


def clip(p, bounds: tuple[float, float] | None = CLIP) -> np.ndarray:
    """Clip probabilities to ``bounds`` (None: unchanged)."""
    p = np.asarray(p, dtype=float)
    return p if bounds is None else np.clip(p, *bounds)


def scores(y, p) -> dict:
    """Log loss (unclipped and clipped) and accuracy of P(dog) against 0/1 labels."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    return {
        "log_loss": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "log_loss_clipped": float(log_loss(y, clip(p), labels=[0, 1])),
        "accuracy": float(accuracy_score(y, p > 0.5)),
        "n": int(len(y)),
    }


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


def write_submission(path: str | Path, ids, p, bounds: tuple[float, float] | None = CLIP) -> pd.DataFrame:
    """``id,label`` with one row per test id in numeric order; NaN (unreadable photo) becomes 0.5."""
    ids = np.asarray(ids).astype(int)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("submission ids are not unique")
    p = np.asarray(p, dtype=float)
    p = np.where(np.isnan(p), 0.5, p)
    sub = pd.DataFrame({"id": ids, "label": clip(p, bounds)}).sort_values("id")
    sub.to_csv(path, index=False)
    return sub


def write_model_submissions(folder: str | Path, ids, predictions: dict[str, np.ndarray],
                            cv: dict[str, dict], clip_mode: str = "auto") -> dict[str, dict]:
    """A Kaggle-ready file per model (``folder/<model>.csv``, named as in test/), each clipped by
    ``clip_rule`` applied to that model's own CV scores; returns, per model, the file (relative
    to the run), whether it is clipped and its CV log loss as submitted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, p in predictions.items():
        clipped = clip_rule(cv[name], clip_mode)
        path = prediction_path(folder, name)
        write_submission(path, ids, p, CLIP if clipped else None)
        made[name] = {"file": f"{folder.name}/{path.name}", "clipped": clipped,
                      "cv_log_loss": cv[name]["log_loss_clipped" if clipped else "log_loss"]}
    return made
