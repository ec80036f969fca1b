"""Clipping, scoring and the submission file: the one place for the clip bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss

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
