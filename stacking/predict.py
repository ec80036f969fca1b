"""P(dog) (or, with K > 2 classes, the class and every class's probability) for new photos from a
saved ensemble.

    python -m stacking.predict --model OUT/model PHOTO [PHOTO ...]

Prints ``photo<TAB>P(dog)`` per photo (two classes: P of the task's second class), or
``photo<TAB>class<TAB>class p, class p, ...`` (every class, most probable first), computed exactly
as the run computed its test predictions (same backbones, weights, runtime choice, heads, stacker
and clipping).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from features.data import Photo
from features.extract import Extractor, setup_logging
from features.registry import Backbone
from stacking.ensemble import Ensemble, int8_graph
from stacking.submission import clip


class Predictor:
    """A loaded ensemble with its backbones built once (the web page keeps one of these)."""

    def __init__(self, model_dir: str | Path, weights=None, runtime: str = "auto",
                 batch_size: int | None = None, streams: int | None = None):
        """``batch_size``, ``streams``: photos per forward call and concurrent forward passes
        (None: the runtime's best for bulk work; the web page uses 1 and 1, since a padded
        batch costs a full batch's time and one photo is fastest on every core)."""
        self.ensemble = Ensemble.load(model_dir)
        self.extractors = {
            b["name"]: Extractor(Backbone(**b["entry"]), self.ensemble.weights_for(b, weights), runtime,
                                 batch_size, tta=b.get("tta", False), streams=streams,
                                 precision=b.get("precision", "float32"), graph=int8_graph(b))
            for b in self.ensemble.backbones}

    def features(self, photos: list[Photo], reader=None) -> tuple[dict[str, np.ndarray], list[str]]:
        feats, reasons = {}, [""] * len(photos)
        for name, ex in self.extractors.items():
            feats[name], why = ex.features(photos, reader)
            reasons = [a or b for a, b in zip(reasons, why)]
        return feats, reasons

    def predict_all(self, photos: list[Photo], reader=None) -> tuple[dict[str, np.ndarray], list[str]]:
        """Every model's P(dog) per photo (NaN where unreadable) and the reasons."""
        feats, reasons = self.features(photos, reader)
        bad = np.array([bool(r) for r in reasons])
        out = self.ensemble.predict_all(feats)
        for p in out.values():
            p[bad] = np.nan
        return out, reasons

    def predict_photos(self, photos: list[Photo], reader=None) -> tuple[np.ndarray, list[str]]:
        """P(dog) of the submission model per photo, clipped as the submission is (NaN where
        unreadable), and the reasons."""
        out, reasons = self.predict_all(photos, reader)
        return clip(out[self.ensemble.submit_with], self.ensemble.clip), reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacking.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model/ folder a stacking.run wrote")
    parser.add_argument("--weights", default=None,
                        help="weights file or folder, if they have moved since the run")
    parser.add_argument("photos", nargs="+", help="photo files")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        predictor = Predictor(args.model, args.weights)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    photos = [Photo(Path(p).name, -1, p) for p in args.photos]
    p, reasons = predictor.predict_photos(photos)
    classes = predictor.ensemble.task.classes
    for photo, prob, reason in zip(photos, p, reasons):
        if reason:
            print(f"{photo.path}\terror: {reason}")
        elif np.ndim(prob) == 0:
            print(f"{photo.path}\t{prob:.6f}")
        else:
            order = np.argsort(-prob, kind="stable")
            print(f"{photo.path}\t{classes[order[0]]}\t" + ", ".join(f"{classes[k]} {prob[k]:.6f}" for k in order))
    return 1 if any(reasons) else 0


if __name__ == "__main__":
    sys.exit(main())
