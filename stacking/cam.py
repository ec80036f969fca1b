"""Class activation maps (CAM) of the saved ensemble, exact in the mean.

A linear head on GAP features is linear in the spatial mean of the last feature map, so applying
the head at every position gives a logit map whose mean is the head's logit (Zhou et al., 2016).
The ensemble is not one linear head: each level-1 model averages K fold heads' probabilities, and
the level-2 model combines the level-1 columns. We carry the maps through both steps to first
order around this photo:

    map_b = sum_j w_j * sum_k g_jk * (head map_jk - its mean)      (deviations, per backbone b)
    map   = Z + sum_b resize(map_b)                                 (Z: the explained logit)

with g_jk = dL_j/dz_jk (fold k's share of level-1 column j) and w_j = dZ/dL_j (the level-2
model's weight of column j at this photo, by central differences through the fitted stacker).
Every deviation map has mean zero, so the map's mean is Z exactly, and Z itself is computed from
the feature maps (not copied from the prediction), so "mean == logit" checks the whole path.
For a tree stacker (LightGBM) dZ/dL is zero almost everywhere; there the map weighs the level-1
columns equally: it shows where the backbones looked, centred on the stacker's logit.

With K > 2 classes the map explains one class c (by default the most probable): Z = logit P_c =
log(P_c / (1 - P_c)), red where the photo says c. Each fold head gives K logits z_k, a level-1
model P^j = mean_k softmax(z_k), the level-2 model P from every P^j. The same first-order step,
with vectors: g_j = dZ/du_j for u_j = log P^j (a level-1 model served alone: (e_c - P) / (1 - P_c);
a stacker: central differences, renormalising each perturbed row), then fold k's share of it
dZ/dz_k = (r_k * g_j - s_k sum(r_k * g_j)) / F with s_k = softmax(z_k), r_k = s_k / P^j (<= F, so
no small probability is divided by), and each position's deviation is (f - GAP) @ W_k dZ/dz_k.
A level-1 model that is not linear in the GAP features (the ImageNet prior: a logistic regression
on log-probabilities of the backbone's ImageNet classifier) contributes its gradient at the
photo's GAP times each position's deviation from it: first order again, mean zero again, so the
map stays exact in its mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from features.data import Photo
from features.extract import Extractor, load_batch
from features.images import ImageError
from features.imagenet import softmax
from features.models import build_feature_map_model
from features.registry import Backbone
from oof.crossfit import CrossFit
from oof.heads import linear_parts
from stacking.ensemble import CONCAT, Ensemble, int8_graph
from stacking.stackers import LGBMStacker

# Step, in logits, of the central differences that give the level-2 weights.
STEP = 1e-4


def _softplus(x):
    return np.logaddexp(0.0, x)


def _log_mean_sigmoids(z: np.ndarray) -> tuple[float, float]:
    """(log p, log(1 - p)) for p = mean_k sigmoid(z_k), without overflow."""
    log_p = np.logaddexp.reduce(-_softplus(-z)) - np.log(len(z))
    log_q = np.logaddexp.reduce(-_softplus(z)) - np.log(len(z))
    return log_p, log_q


def logit_of_mean_sigmoid(z: np.ndarray) -> float:
    """logit(mean_k sigmoid(z_k)), stable for any z (a CrossFit averages fold probabilities)."""
    log_p, log_q = _log_mean_sigmoids(np.asarray(z, dtype=np.float64))
    return float(log_p - log_q)


def fold_shares(z: np.ndarray) -> np.ndarray:
    """g_k = d logit(mean sigmoid(z)) / d z_k, computed in log space."""
    z = np.asarray(z, dtype=np.float64)
    log_p, log_q = _log_mean_sigmoids(z)
    log_dsig = -_softplus(z) - _softplus(-z)
    return np.exp(log_dsig - np.log(len(z)) - log_p - log_q)


def feature_gradient(model, x: np.ndarray) -> np.ndarray:
    """d logit / d features of a fitted level-1 model at row ``x``: a linear head's weights ((D, K)
    for K class logits), or the model's own ``feature_gradient`` (the ImageNet prior)."""
    if hasattr(model, "feature_gradient"):
        return model.feature_gradient(x)
    _, scale, coef, _ = linear_parts(model)
    coef = np.asarray(coef, np.float64)
    return coef / np.asarray(scale, np.float64).reshape(-1, *[1] * (coef.ndim - 1))


def fold_logits(cf: CrossFit, x: np.ndarray) -> np.ndarray:
    """Each fold model's logit for one row."""
    return np.array([float(m.decision_function(x[None, :])[0]) for m in cf.models])


@dataclass
class LinearMaps:
    """A linear CrossFit applied at every position: its logit and per-backbone deviation maps."""

    logit: float
    deviations: dict[str, np.ndarray] = field(default_factory=dict)


def linear_maps(cf: CrossFit, fmaps: dict[str, np.ndarray], names: list[str]) -> LinearMaps:
    """The logit of ``cf`` on the GAP of ``fmaps`` (backbones ``names``, side by side as the model
    saw them) and, per backbone, sum_k g_k * (fold k's logit map - its mean), where fold k's map
    is its gradient at the GAP times each position's features (a linear head: its own logit map).
    Fold models that read features of their own (``cf.inputs``: fine-tuned fold networks) each
    read their backbone's map."""
    reads, gaps = fold_reads(cf, fmaps, names)
    z = np.array([float(m.decision_function(g[None, :])[0]) for m, g in zip(cf.models, gaps)])
    deviations: dict[str, np.ndarray] = {}
    for share, model, gap, r in zip(fold_shares(z), cf.models, gaps, reads):
        spread(deviations, fmaps, r, share * feature_gradient(model, gap))
    return LinearMaps(logit_of_mean_sigmoid(z), deviations)


def fold_reads(cf: CrossFit, fmaps: dict[str, np.ndarray], names: list[str]):
    """Per fold model, the backbones whose maps it reads and its GAP row (their spatial means)."""
    reads = [[i] for i in cf.inputs] if cf.inputs else [names] * len(cf.models)
    return reads, [np.concatenate([fmaps[n].mean(axis=(0, 1)) for n in r]) for r in reads]


def spread(deviations: dict[str, np.ndarray], fmaps: dict[str, np.ndarray], names: list[str],
           grad: np.ndarray) -> None:
    """Add (f - GAP) @ grad at every position of each backbone in ``names`` (``grad``: over their
    features side by side) to ``deviations``: a first-order map with mean zero."""
    start = 0
    for n in names:
        f = fmaps[n].astype(np.float64)
        width = f.shape[-1]
        dev = (f - f.mean(axis=(0, 1))) @ grad[start:start + width]
        deviations[n] = deviations.get(n, 0.0) + dev
        start += width


def class_logit(p: np.ndarray, c: int) -> float:
    """logit P_c = log P_c - log(sum of the other classes), exact when P_c rounds to 1."""
    return float(np.log(p[c]) - np.log(np.delete(p, c).sum()))


def logit_gradient(p: np.ndarray, c: int) -> np.ndarray:
    """d logit P_c / d u for P = softmax(u): (e_c - P) / (1 - P_c), 1 - P_c summed from the others."""
    g = -p / np.delete(p, c).sum()
    g[c] = 1.0
    return g


@dataclass
class ClassFolds:
    """A K-class level-1 CrossFit at one photo: each fold model's K logits at the GAP row it reads."""

    cf: CrossFit
    reads: list[list[str]]
    gaps: list[np.ndarray]
    z: np.ndarray  # (folds, K)

    @classmethod
    def at(cls, cf: CrossFit, fmaps: dict[str, np.ndarray], names: list[str]) -> "ClassFolds":
        reads, gaps = fold_reads(cf, fmaps, names)
        z = np.array([m.decision_function(g[None, :])[0] for m, g in zip(cf.models, gaps)], np.float64)
        return cls(cf, reads, gaps, z)

    @property
    def proba(self) -> np.ndarray:
        """P^j: the mean of the folds' softmax, as CrossFit.predict averages them."""
        return softmax(self.z).mean(axis=0)

    def deviations(self, fmaps: dict[str, np.ndarray], g: np.ndarray) -> dict[str, np.ndarray]:
        """Per backbone, the first-order map of Z around the GAP, given g = dZ/d log P^j."""
        s, p = softmax(self.z), self.proba
        out: dict[str, np.ndarray] = {}
        for s_k, model, gap, r in zip(s, self.cf.models, self.gaps, self.reads):
            rg = s_k / np.maximum(p, np.finfo(float).tiny) * g
            dz = (rg - s_k * rg.sum()) / len(s)
            spread(out, fmaps, r, feature_gradient(model, gap) @ dz)
        return out


def level2_class_gradients(cf: CrossFit, probas: list[np.ndarray], c: int) -> list[np.ndarray]:
    """g_j = dZ/du_j of a K-class level-2 CrossFit (Z = logit P_c) for each level-1 input
    P^j = softmax(u_j), by central differences in one batch of rows."""
    u = [np.log(np.maximum(p, np.finfo(float).tiny)) for p in probas]
    rows, k = [], len(probas[0])
    for j in range(len(u)):
        for i in range(k):
            for step in (STEP, -STEP):
                moved = [x.copy() for x in u]
                moved[j][i] += step
                rows.append(np.concatenate([softmax(x[None])[0] for x in moved]))
    z = np.array([class_logit(p, c) for p in cf.predict(np.array(rows))])
    return list(((z[0::2] - z[1::2]) / (2 * STEP)).reshape(len(u), k))


def level2_weights(cf: CrossFit, logits: np.ndarray) -> np.ndarray:
    """dZ/dL_j of a level-2 CrossFit at level-1 logits L, by central differences."""
    def z_at(L):
        p = 1.0 / (1.0 + np.exp(-L))
        return logit_of_mean_sigmoid(fold_logits(cf, p))

    weights = np.zeros(len(logits))
    for j in range(len(logits)):
        up, down = logits.copy(), logits.copy()
        up[j] += STEP
        down[j] -= STEP
        weights[j] = (z_at(up) - z_at(down)) / (2 * STEP)
    return weights


@dataclass
class Explanation:
    """logit_map: (H, W) at the photo's size, red where it says ``target`` (the class explained:
    dog, or with K classes the one asked for, by default the most probable); its mean is
    ``logit`` = logit P(target)."""

    model: str
    logit: float
    logit_map: np.ndarray
    weights: dict[str, float]
    note: str
    target: str = ""


class CamExplainer:
    """Builds each backbone's feature-map model once; explains one photo at a time."""

    def __init__(self, ensemble: Ensemble, weights=None, runtime: str = "auto", model: str | None = None):
        self.ensemble = ensemble
        self.model = model or ensemble.submit_with
        if self.model not in ensemble.model_names:
            raise KeyError(f"no model '{self.model}' in this ensemble; it has "
                           f"{', '.join(ensemble.model_names)}")
        self.names = [b["name"] for b in ensemble.backbones]
        self.tta = {b["name"]: bool(b.get("tta")) for b in ensemble.backbones}
        self.extractors, self.int8 = {}, {}
        for b in ensemble.backbones:
            backbone = Backbone(**b["entry"])
            w = ensemble.weights_for(b, weights)
            self.extractors[b["name"]] = Extractor(backbone, w, runtime, batch_size=1, streams=1,
                                                   model=build_feature_map_model(backbone, w))
            if b.get("precision") == "int8":  # the network whose features the ensemble reads
                self.int8[b["name"]] = Extractor(backbone, w, runtime, batch_size=1, streams=1,
                                                 tta=self.tta[b["name"]], precision="int8",
                                                 graph=int8_graph(b))

    def feature_maps(self, photo: Photo, reader=None) -> dict[str, np.ndarray]:
        """Each backbone's last feature map (h, w, C) for one photo (flip TTA: both views averaged,
        the mirrored one flipped back, so its spatial mean is the TTA feature vector; int8: its
        mean is the int8 graph's feature vector)."""
        out = {}
        for name, ex in self.extractors.items():
            pixels, reasons = load_batch(reader or ex.reader, [photo], ex.backbone, ex.fast_decode)
            if reasons[0]:
                raise ImageError(photo.name, reasons[0])
            fmap = ex.run(pixels)[0]
            if self.tta[name]:
                fmap = (fmap + ex.run(np.ascontiguousarray(pixels[:, :, ::-1]))[0][:, ::-1]) / 2
            if name in self.int8:
                # An int8 graph gives no feature map: the float network's map, shifted so that its
                # spatial mean is the int8 GAP vector the ensemble predicts from. Every deviation
                # is the float map's; every logit (and so the map's mean) is the int8 one.
                gap = self.int8[name].features([photo], reader)[0][0]
                fmap = fmap + (gap - fmap.mean(axis=(0, 1)))
            out[name] = fmap
        return out

    def explain(self, photo: Photo, size: tuple[int, int], reader=None, model: str | None = None,
                target: str | None = None) -> Explanation:
        """The CAM of ``model`` (default: the one chosen at construction) at ``size`` = (height,
        width) of the shown photo, for class ``target`` (two classes: always the second, P(dog);
        K classes: default the model's most probable class for this photo)."""
        fmaps = self.feature_maps(photo, reader)
        ens, model = self.ensemble, model or self.model
        if model not in ens.model_names:
            raise KeyError(f"no model '{model}' in this ensemble; it has {', '.join(ens.model_names)}")
        if not ens.task.binary:
            return self._explain_class(fmaps, size, model, target)
        note = ""
        if model == CONCAT:
            lm = linear_maps(ens.concat, fmaps, [b["name"] for b in ens.feature_backbones])
            logit, deviations, weights = lm.logit, lm.deviations, {CONCAT: 1.0}
        else:
            columns = {name: linear_maps(cf, fmaps, [ens.backbone_of(name)])
                       for name, cf in ens.level1.items()}
            if model in ens.level1:
                weights = {model: 1.0}
                logit = columns[model].logit
            else:
                cf = ens.level2[model]
                L = np.array([c.logit for c in columns.values()])
                logit = logit_of_mean_sigmoid(fold_logits(cf, 1.0 / (1.0 + np.exp(-L))))
                if isinstance(cf.models[0], LGBMStacker):
                    w = np.full(len(L), 1.0 / len(L))
                    note = tree_note(model)
                else:
                    w = level2_weights(cf, L)
                weights = dict(zip(columns, w.tolist()))
            deviations = {n: np.zeros(fmaps[n].shape[:2]) for n in self.names}
            for name, c in columns.items():
                if weights.get(name):
                    for n, dev in c.deviations.items():
                        deviations[n] += weights[name] * dev
        return Explanation(model, logit, combine(logit, deviations, size), weights, note, ens.task.classes[1])

    def _explain_class(self, fmaps: dict[str, np.ndarray], size: tuple[int, int], model: str,
                       target: str | None) -> Explanation:
        """The K-class map (module docstring): Z = logit P(target) of ``model``."""
        ens, note = self.ensemble, ""
        if model == CONCAT:
            parts = {CONCAT: ClassFolds.at(ens.concat, fmaps, [b["name"] for b in ens.feature_backbones])}
        else:
            parts = {name: ClassFolds.at(cf, fmaps, [ens.backbone_of(name)]) for name, cf in ens.level1.items()}
        probas = [part.proba for part in parts.values()]
        p = parts[model].proba if model in parts else ens.level2[model].predict(np.concatenate(probas)[None])[0]
        classes = list(ens.task.classes)
        if target is not None and target not in classes:
            raise KeyError(f"no class '{target}' in this task; it has {', '.join(classes)}")
        c = int(np.argmax(p)) if target is None else classes.index(target)
        if model in parts:
            gradients = {model: logit_gradient(p, c)}
        elif isinstance(ens.level2[model].models[0], LGBMStacker):
            gradients = {name: logit_gradient(q, c) / len(parts) for name, q in zip(parts, probas)}
            note = tree_note(model)
        else:
            gradients = dict(zip(parts, level2_class_gradients(ens.level2[model], probas, c)))
        deviations = {n: np.zeros(fmaps[n].shape[:2]) for n in self.names}
        for name, g in gradients.items():
            for n, dev in parts[name].deviations(fmaps, g).items():
                deviations[n] += dev
        logit = class_logit(p, c)
        weights = {name: float(g[c]) for name, g in gradients.items()}
        return Explanation(model, logit, combine(logit, deviations, size), weights, note, classes[c])


def tree_note(model: str) -> str:
    return (f"{model} is a tree model, not linear in its inputs: the map weighs the "
            "backbones equally and is centred on its logit")


def combine(logit: float, deviations: dict[str, np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """logit + each backbone's deviation map resized to ``size``; each resized map is re-centred,
    since bilinear resizing moves the mean slightly at the borders."""
    height, width = size
    out = np.full((height, width), logit, dtype=np.float64)
    for dev in deviations.values():
        up = cv2.resize(dev.astype(np.float64), (width, height), interpolation=cv2.INTER_LINEAR)
        out += up - up.mean()
    return out


def overlay(rgb: np.ndarray, logit_map: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The photo with the map on top: red where the map says the class it explains (dog), blue
    where it says otherwise (cat), the colour's strength in proportion to |logit| (scale: the
    map's largest |logit|)."""
    scale = max(float(np.abs(logit_map).max()), 1e-6)
    t = np.clip(logit_map / scale, -1, 1)[..., None]
    red, blue = np.array([220.0, 40, 30]), np.array([30.0, 90, 230])
    colour = np.where(t > 0, red, blue)
    strength = alpha * np.abs(t)
    return (rgb * (1 - strength) + colour * strength).clip(0, 255).astype(np.uint8)
