"""The two-level ensemble: fitting every model on the same folds, and the saved artefact.

Level 1: one head per (backbone, head kind) on that backbone's GAP features, the ImageNet prior
(``<backbone>/imagenet``) of each backbone whose ImageNet classifier is at hand, plus
concat-fusion (the write-ups' head on all backbones' features side by side). Level 2: stackers over the level-1
heads' out-of-fold P(dog). The level-2 model for fold k is fitted on level-1 OOF rows outside
fold k only. The fitted models are kept, so the saved ensemble predicts new photos exactly as the
run predicted the test set.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np

from features.cache import atomic_write, read_int8_graph
from features.task import DOGS_VS_CATS, Task
from oof.crossfit import CrossFit, cross_fit, prediction_shape
from oof.heads import KerasHead, make_head
from oof.prior import ImageNetPrior
from stacking.stackers import STACKERS
from stacking.submission import clip

CONCAT = "concat-fusion"
PRIOR = "imagenet"  # level-1 name "<backbone>/imagenet": the backbone's ImageNet prior


@dataclass
class Ensemble:
    """Everything needed to go from GAP features to P(dog).

    backbones: per backbone, what makes its features (registry entry, resolved weights, tta); a
        fine-tuned fold network is one too, marked ``fold_network_of`` (its weights: a ``.keras``
        file kept in the saved ensemble's ``finetuned/`` folder).
    level1: model name ("<backbone>/<head>") -> its CrossFit; the key order is the stackers' input order.
    concat: concat-fusion's CrossFit (inputs: backbones' features in ``backbones`` order), or None.
    level2: stacker name -> CrossFit over the level-1 columns.
    submit_with: the model whose predictions are the submission.
    clip: the bounds the submission is clipped to, or None.
    task: what is predicted (classes; two: every model gives P(classes[1]), more: K probabilities).
    """

    backbones: list[dict]
    level1: dict[str, CrossFit]
    concat: CrossFit | None = None
    level2: dict[str, CrossFit] = field(default_factory=dict)
    submit_with: str = ""
    clip: tuple[float, float] | None = None
    task: Task = DOGS_VS_CATS

    @property
    def model_names(self) -> list[str]:
        return [*self.level1, *([CONCAT] if self.concat else []), *self.level2]

    def backbone_of(self, level1_name: str) -> str:
        return level1_name.split("/")[0]

    @property
    def feature_backbones(self) -> list[dict]:
        """The backbones whose GAP features the heads and concat-fusion read (not fold networks)."""
        return [b for b in self.backbones if not b.get("fold_network_of")]

    def predict_all(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """P(dog) (K > 2 classes: (n, K) probabilities) of every model for rows given as
        {backbone name: (n, D) features}.

        Rows whose features are NaN in a backbone (unreadable photo) get 0.5 (1/K) from that backbone.
        """
        out = {name: _predict_level1(cf, features, self.backbone_of(name))
               for name, cf in self.level1.items()}
        if self.concat:
            out[CONCAT] = _predict_rows(self.concat, np.hstack([features[b["name"]]
                                                                for b in self.feature_backbones]))
        if self.level2:
            level1 = np.column_stack([out[name] for name in self.level1])
            for name, cf in self.level2.items():
                out[name] = cf.predict(level1)
        return out

    def predict(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """P(dog) of the submission model, clipped as the submission is."""
        return clip(self.predict_all(features)[self.submit_with], self.clip)

    def save(self, folder: str | Path) -> None:
        """``ensemble.joblib`` + ``ensemble.json``; fine-tuned fold networks are copied into
        ``finetuned/``, int8 backbones' quantized graphs into ``int8/``, named relative to the
        folder, so the folder can move."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        saved = copy.copy(self)
        saved.backbones = []
        for b in self.backbones:
            if b.get("precision") == "int8":  # the quantized graph that made its features
                rel = f"int8/{b['name']}.onnx"
                (folder / "int8").mkdir(exist_ok=True)
                # From the feature cache; a loaded ensemble saved again has it in its own folder.
                graph = Path(b["int8_graph"]).read_bytes() if b.get("int8_graph") else read_int8_graph(b["cache"])
                atomic_write(folder / rel, lambda f: f.write(graph))
                b = {**b, "int8_graph": rel}
            if b.get("fold_network_of"):
                rel = f"finetuned/{b['name']}.keras"
                (folder / "finetuned").mkdir(exist_ok=True)
                if Path(b["weights"]).resolve() != (folder / rel).resolve():
                    shutil.copyfile(b["weights"], folder / rel)
                b = {**b, "weights": rel, "entry": {**b["entry"], "weights": rel}}
            saved.backbones.append(b)
        joblib.dump(saved, folder / "ensemble.joblib")
        summary = {"backbones": saved.backbones, "level1": list(self.level1),
                   "concat_fusion": bool(self.concat), "level2": list(self.level2),
                   "submit_with": self.submit_with, "clip": self.clip, "classes": list(self.task.classes),
                   "test_mode": next(iter(self.level1.values())).test_mode}
        (folder / "ensemble.json").write_text(json.dumps(summary, indent=2, default=str))

    @staticmethod
    def load(folder: str | Path) -> "Ensemble":
        path = Path(folder) / "ensemble.joblib"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved ensemble (made by python -m stacking.run)")
        ens = joblib.load(path)
        for b in ens.backbones:
            if b.get("int8_graph"):
                b["int8_graph"] = str(Path(folder).resolve() / b["int8_graph"])
            if b.get("fold_network_of"):
                b["weights"] = b["entry"]["weights"] = str(Path(folder).resolve() / b["weights"])
        return ens

    def weights_for(self, b: dict, override=None):
        """The weights to build backbone ``b`` with: ``override`` (weights that moved) for the
        pretrained backbones; a fold network always has its own file."""
        return b["weights"] if b.get("fold_network_of") or not override else override


def _predict_level1(cf: CrossFit, features: dict[str, np.ndarray], backbone: str) -> np.ndarray:
    if not cf.inputs:
        return _predict_rows(cf, features[backbone])
    return np.mean([_predict_rows(CrossFit(cf.oof, [m]), features[i])
                    for m, i in zip(cf.models, cf.inputs)], axis=0)


def _predict_rows(cf: CrossFit, X: np.ndarray) -> np.ndarray:
    ok = np.isfinite(X).all(axis=1)
    p = np.full(prediction_shape(len(X), cf.n_classes), 1.0 / cf.n_classes)
    if ok.any():
        p[ok] = cf.predict(X[ok])
    return p


def fit_ensemble(backbones: list[dict], features: dict[str, np.ndarray], y: np.ndarray,
                 fold: np.ndarray, heads: list[str], concat_fusion: bool = True,
                 stackers: list[str] | None = None, test_mode: str = "fold_mean",
                 head_params: dict | None = None, tops: dict | None = None,
                 finetuned: dict[str, CrossFit] | None = None,
                 log=print) -> tuple[Ensemble, dict[str, np.ndarray]]:
    """Fit every level on the same folds; returns the ensemble and each model's OOF P(dog) (or
    (n, K) class probabilities: the stackers then see every level-1 model's K columns).
    ``tops``: {backbone name: ImageNetTop} of the backbones that get an ImageNet prior;
    ``finetuned``: level-1 models already cross-fitted on these folds (``oof.finetune``)."""
    head_params = head_params or {}
    oof: dict[str, np.ndarray] = {}
    level1: dict[str, CrossFit] = {}
    for b in backbones:
        models = {head: make_head(head, **head_params.get(head, {})) for head in heads}
        if b["name"] in (tops or {}):
            models[PRIOR] = ImageNetPrior(tops[b["name"]], **head_params.get(PRIOR, {}))
        for head, model in models.items():
            name = f"{b['name']}/{head}"
            level1[name] = cross_fit(model, features[b["name"]], y, fold, test_mode)
            oof[name] = level1[name].oof
            log(f"level 1: {name} fitted")
    for name, cf in (finetuned or {}).items():
        level1[name], oof[name] = cf, cf.oof
    concat = None
    if concat_fusion:
        X = np.hstack([features[b["name"]] for b in backbones])
        concat = cross_fit(KerasHead(**head_params.get("concat", {})), X, y, fold, test_mode)
        oof[CONCAT] = concat.oof
        log(f"level 1: {CONCAT} fitted on {X.shape[1]} features")
    level2: dict[str, CrossFit] = {}
    if len(level1) > 1:
        L = np.column_stack([oof[name] for name in level1])
        for name in stackers or list(STACKERS):
            level2[name] = cross_fit(STACKERS[name](), L, y, fold, test_mode)
            oof[name] = level2[name].oof
            log(f"level 2: {name} fitted")
    return Ensemble(backbones, level1, concat, level2), oof


def int8_graph(backbone: dict) -> bytes | None:
    """The quantized graph a saved int8 backbone made its features with (None for float ones)."""
    if backbone.get("precision") != "int8":
        return None
    path = Path(backbone["int8_graph"])
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: the int8 graph of {backbone['name']} is missing from the saved "
                                f"model ({exc.strerror or exc})") from None
