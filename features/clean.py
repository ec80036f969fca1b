"""Find training photos that are not a clear cat or dog photo, show them, and list them.

The detectors and the files they write; the command is ``python -m oof.clean`` (our cat/dog
model's out-of-fold doubt comes from cross-fitting, which the ``oof`` layer owns: here it is an
input, as cleanlab takes ``pred_probs``).

Detectors (plain functions over arrays, each returning its values and where it fires):
  tiny        smallest side under ``TINY_PX``;
  colour      the write-up's IQR rule on colour statistics (share of coloured pixels, pixel
              standard deviation), low side: text, drawings, flat images;
  imagenet    no dog breed (ImageNet 151..268) or domestic cat (281..285) in the top-N classes
              of an ImageNet classifier (``efficientnet_lite2_top.keras`` by default);
  label       every model's out-of-fold P(given label) under ``LABEL_P``: probably mislabelled;
  duplicate   cosine similarity of GAP features over ``DUPLICATE_COS`` (within train, train-test).
  nonpet      strong "no pet here" evidence of that classifier: little cat+dog probability mass and
              no cat or dog class near the top (``imagenet_evidence``);
  far         far from the photos of its own label in GAP-feature space (``feature_outliers``).
A photo is flagged when tiny, label or duplicate (the later of a pair) fires, when nonpet and far
both fire, or when one of nonpet, far, imagenet, colour fires and our cat/dog model is unsure too
(out-of-fold P(given label) < 0.5): grey photos and cats in cages stay. At most ``MAX_FLAGGED`` of
the photos are flagged, the most suspicious by ``suspicion``, one score that ranks every photo.
Writes ``outliers.csv`` (id, label, score, detectors, values, drop=1 to edit), ``scores.csv``
(every photo, ranked), ``contact_sheet.png`` and, with ``--top N``, ``top_N.png``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from features.data import Photo, PhotoReader, PhotoSet, load_photos
from features.defaults import WORKERS, default_weights_dir
from features.images import ImageError, decode_rgb, resize
from features.imagenet import CAT_CLASSES, DOG_CLASSES, softmax

TINY_PX = 64
IQR_K = 1.5
TOP_N = 5
LABEL_P = 0.05
DUPLICATE_COS = 0.97
# Chosen by looking at the 200 most suspicious of the 8,017 shared 200 px photos (RESULTS.md).
NONPET_MASS = 0.1  # cat+dog probability mass under this ...
NONPET_RANK = 10  # ... and no cat or dog class among this many top classes: little belief in a pet
OUTLIER_K = 10
OUTLIER_Z = 4.0  # robust z of the distance to the label's photos: far from every cat (or dog)
MAX_FLAGGED = 0.01  # flag at most this share of the photos, the most suspicious first
IMAGENET_MODEL = "efficientnet_lite2_top.keras"


def colour_stats(rgb: np.ndarray) -> tuple[float, float]:
    """(share of pixels whose channels differ by more than 20, pixel standard deviation)."""
    small = resize(rgb, (128, 128), "area").astype(np.int16)
    return float(((small.max(2) - small.min(2)) > 20).mean()), float(small.std())


def iqr_low(values: np.ndarray, k: float = IQR_K) -> tuple[np.ndarray, float]:
    """Tukey's rule, low side: fires below Q1 - k * IQR. Returns (fired, bound)."""
    q1, q3 = np.percentile(values, [25, 75])
    bound = q1 - k * (q3 - q1)
    return values < bound, float(bound)


def imagenet_catdog(probs: np.ndarray, top_n: int = TOP_N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cat+dog probability mass, top class, fired: no cat or dog class among the top N)."""
    catdog = np.concatenate([DOG_CLASSES, CAT_CLASSES])
    top = np.argsort(-probs, axis=1)[:, :top_n]
    fired = ~np.isin(top, catdog).any(axis=1)
    return probs[:, catdog].sum(axis=1), top[:, 0], fired


def imagenet_evidence(probs: np.ndarray, mass_below: float = NONPET_MASS,
                      rank_over: int = NONPET_RANK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strong "no cat or dog here" evidence from an ImageNet classifier, on its own.

    Returns (cat+dog probability mass, rank of the best cat or dog class, 0 = top, fired). Fires
    when the mass is under ``mass_below`` and no cat or dog class is among the top ``rank_over``:
    both, since a photo with a pet in it keeps some mass on pets even when a cage, a sofa or a
    person takes the top class."""
    catdog = np.concatenate([DOG_CLASSES, CAT_CLASSES])
    order = np.argsort(-probs, axis=1)
    rank = np.argmax(np.isin(order, catdog), axis=1)
    mass = probs[:, catdog].sum(axis=1)
    return mass, rank, (mass < mass_below) & (rank >= rank_over)


def feature_outliers(gap: np.ndarray, labels: np.ndarray, k: int = OUTLIER_K,
                     block: int = 1024) -> np.ndarray:
    """How far each photo lies from the photos of its own label in GAP-feature space: the mean
    cosine distance to its ``k`` nearest same-label neighbours, as a robust z-score within the
    label (median and MAD), so "far" means far for a cat among cats. NaN rows get NaN."""
    gap = np.asarray(gap, dtype=np.float32)
    labels = np.asarray(labels)
    z = np.full(len(gap), np.nan)
    ok = np.isfinite(gap).all(axis=1)
    for label in np.unique(labels[ok]):
        idx = np.flatnonzero(ok & (labels == label))
        unit = gap[idx] / np.maximum(np.linalg.norm(gap[idx], axis=1, keepdims=True), 1e-12)
        kk = min(k, len(idx) - 1)
        if kk < 1:
            continue
        dist = np.empty(len(idx))
        for start in range(0, len(idx), block):
            sims = unit[start:start + block] @ unit.T
            np.fill_diagonal(sims[:, start:start + block], -np.inf)  # not its own neighbour
            nearest = -np.partition(-sims, kk - 1, axis=1)[:, :kk]
            dist[start:start + block] = 1 - nearest.mean(axis=1)
        median = np.median(dist)
        mad = np.median(np.abs(dist - median)) * 1.4826 or 1e-12
        z[idx] = (dist - median) / mad
    return z


def suspicion(mass: np.ndarray, outlier_z: np.ndarray, p_given_label: np.ndarray) -> np.ndarray:
    """One score that ranks every photo, most suspicious first: how little of the ImageNet
    classifier's belief is on pets (log scale), how far the photo lies from its label's photos,
    and how much our own cat/dog model doubts its label."""
    return (-np.log10(np.clip(mass, 1e-4, 1)) + np.clip(np.nan_to_num(outlier_z), 0, None) / 4
            + (1 - p_given_label))


def label_issues(labels: np.ndarray, p_dog: np.ndarray, threshold: float = LABEL_P):
    """(highest P(given label) over the models, fired: every model gives it under ``threshold``).

    ``p_dog``: out-of-fold P(dog), one column per model (n, models); with K > 2 classes, every
    model's class probabilities (n, models, K)."""
    labels, p = np.asarray(labels), np.asarray(p_dog)
    if p.ndim == 3:
        p_label = p[np.arange(len(labels)), :, labels]
    else:
        p = np.atleast_2d(p.T).T
        p_label = np.where(labels[:, None] == 1, p, 1 - p)
    best = p_label.max(axis=1)
    return best, best < threshold


def near_duplicates(a: np.ndarray, b: np.ndarray | None = None, threshold: float = DUPLICATE_COS,
                    block: int = 2048) -> list[tuple[int, int, float]]:
    """Pairs (i in a, j in b) with cosine similarity over ``threshold``; within ``a`` if b is None."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a_u = unit(a.astype(np.float32))
    b_u = a_u if b is None else unit(b.astype(np.float32))
    pairs = []
    for start in range(0, len(a_u), block):
        sims = a_u[start:start + block] @ b_u.T
        for i, j in zip(*np.nonzero(sims > threshold)):
            gi = start + i
            if b is None and j <= gi:
                continue
            pairs.append((int(gi), int(j), float(sims[i, j])))
    return pairs


def imagenet_model(path: str | Path):
    """The classifier as one model: raw pixels -> [GAP features (1280), class probabilities]."""
    import keras

    model = keras.saving.load_model(path, compile=False)
    gap = next((l.output for l in model.layers if len(l.output.shape) == 2 and l is not model.layers[-1]
                and "pool" in l.name), None)
    if gap is None:
        raise ValueError(f"{path}: no global pooling layer before the classifier")
    return keras.Model(model.input, keras.layers.Concatenate()([gap, model.output]))


def from_cache(photos: PhotoSet, model_path: Path, cache_dir: Path | None):
    """(GAP features, class probabilities) of every photo (train, then test) from a feature cache
    that holds this classifier's logits for all of them (``stacking.run`` leaves one), else None."""
    from features.cache import cache_path, cached_top, load_features
    from features.models import weights_identity

    if cache_dir is None:
        return None
    path = cache_path(cache_dir, model_path.stem.replace("_top", ""), photos)
    if not path.is_file() or cached_top(path) != weights_identity(model_path):
        return None
    f = load_features(path)
    rows = []
    for split, photos_ in (("train", photos.train), ("test", photos.test)):
        ids = f.train_ids if split == "train" else f.test_ids
        where = {i: k for k, i in enumerate(ids)}
        if any(p.id not in where for p in photos_):
            return None
        k = [where[p.id] for p in photos_]
        gap, logits = (f.train, f.train_logits) if split == "train" else (f.test, f.test_logits)
        rows.append((gap[k], logits[k]))
    gap = np.concatenate([r[0] for r in rows])
    return gap, softmax(np.concatenate([r[1] for r in rows]))


def scan(photos: list[Photo], model_path: Path, workers: int = WORKERS, cached=None):
    """Decode every photo once for sizes and colour, and run the classifier: per-photo table,
    GAP features and class probabilities (NaN rows where a photo cannot be read). ``cached``:
    the features and probabilities already at hand (``from_cache``): no forward pass."""
    from features.extract import Extractor
    from features.registry import backbone_from_file

    reader = PhotoReader()

    def look(photo):
        try:
            rgb = decode_rgb(reader.read(photo), photo.name)
        except (ImageError, OSError) as exc:
            return np.nan, np.nan, np.nan, str(exc)
        return (min(rgb.shape[:2]), *colour_stats(rgb), "")

    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(look, photos))
    table = pd.DataFrame(rows, columns=["min_side", "colour_ratio", "pixel_std", "error"])
    if cached is not None:
        return table, *cached
    entry = backbone_from_file(model_path)
    model = imagenet_model(model_path)
    out, _ = Extractor(entry, str(model_path), model=model).features(photos)
    n_gap = out.shape[1] - 1000
    return table, out[:, :n_gap], out[:, n_gap:]


def find_outliers(photos: list[Photo], table: pd.DataFrame, probs: np.ndarray, p_dog: np.ndarray,
                  dup_pairs: list[tuple[int, str, float]], gap: np.ndarray | None = None,
                  max_flagged: float = MAX_FLAGGED, pets: bool = True) -> pd.DataFrame:
    """Combine the detectors into one row per photo with the detectors that fired and a score
    (``suspicion``); at most ``max_flagged`` of the photos are flagged, the most suspicious.
    ``pets``: the task is cats and dogs, so ImageNet's belief in a pet is evidence; for any
    other task those two detectors stay off and the score leaves them out."""
    labels = np.array([p.label for p in photos])
    df = table.copy()
    df.insert(0, "id", [p.id for p in photos])
    df.insert(1, "label", labels)
    ok = df["error"] == ""
    df["tiny"] = ok & (df["min_side"] < TINY_PX)
    # The coloured-pixel share is skewed (many photos near 0.5, a tail towards 0): on a log scale
    # Tukey's rule has a bound above zero, so grey, text and drawn photos fall below it.
    colour_lo, _ = iqr_low(np.log10(df.loc[ok, "colour_ratio"].to_numpy() + 0.01))
    std_lo, _ = iqr_low(df.loc[ok, "pixel_std"].to_numpy())
    df["colour"] = False
    df.loc[ok, "colour"] = colour_lo | std_lo
    mass, top, fired = imagenet_catdog(np.nan_to_num(probs))
    df["catdog_mass"], df["top_class"] = mass, top
    df["imagenet"] = ok & fired & pets
    _, rank, nonpet = imagenet_evidence(np.nan_to_num(probs))
    df["catdog_rank"], df["nonpet"] = rank, ok & nonpet & pets
    df["outlier_z"] = feature_outliers(gap, labels) if gap is not None else np.nan
    df["far"] = ok & (df["outlier_z"] > OUTLIER_Z)
    best, wrong = label_issues(labels, p_dog)
    df["p_given_label"], df["label"] = best, labels
    df["label_issue"] = ok & wrong
    df["duplicate_of"] = ""
    for i, other, cos in dup_pairs:
        df.loc[i, "duplicate_of"] = f"{other} ({cos:.3f})"
    df["duplicate"] = df["duplicate_of"] != ""
    df["unreadable"] = ~ok
    detectors = ["unreadable", "tiny", "nonpet", "far", "imagenet", "label_issue", "duplicate", "colour"]
    # Each of ImageNet's evidence, the GAP outlier score and the colour rule alone catches real
    # pets (a cat in a sink, behind bars, a dark or grey photo). Together, no belief in a pet and
    # far from every photo of the label, they find drawings, logos, text and scenes even where our
    # cat/dog model is sure of the label; alone, they flag only with that model's doubt.
    doubt = df["p_given_label"] < 0.5
    df["flagged"] = (df[["unreadable", "tiny", "label_issue", "duplicate"]].any(axis=1)
                     | (df["nonpet"] & df["far"])
                     | (df[["nonpet", "far", "imagenet", "colour"]].any(axis=1) & doubt))
    df["detectors"] = df[detectors].apply(lambda r: ";".join(d for d in detectors if r[d]), axis=1)
    df["score"] = suspicion(mass if pets else np.ones(len(df)), df["outlier_z"].to_numpy(),
                            df["p_given_label"].to_numpy()).round(4)
    df.loc[~ok, "score"] = np.inf  # unreadable: always first
    cap = int(max_flagged * len(df))
    order = df[df["flagged"]].sort_values("score", ascending=False).index
    df.loc[order[cap:], "flagged"] = False
    # A photo whose only fault is a twin in the test set is kept (it is still a good example).
    test_twin_only = (df["detectors"] == "duplicate") & df["duplicate_of"].str.startswith("test/")
    df["drop"] = (df["flagged"] & ~test_twin_only).astype(int)
    return df


def contact_sheet(photos: list[Photo], flagged: pd.DataFrame, path: Path, size: int = 180,
                  columns: int = 8, limit: int = 160) -> None:
    """A PNG grid of the flagged photos, each captioned with its id and the detectors that fired."""
    reader = PhotoReader()
    by_id = {p.id: p for p in photos}
    tiles = []
    for _, row in flagged.head(limit).iterrows():
        try:
            rgb = decode_rgb(reader.read(by_id[row["id"]]), row["id"])
            h, w = rgb.shape[:2]
            scale = size / max(h, w)
            thumb = cv2.resize(rgb, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
        except (ImageError, OSError):
            thumb = np.zeros((size, size, 3), np.uint8)
        tile = np.full((size + 34, size, 3), 255, np.uint8)
        tile[:thumb.shape[0], :thumb.shape[1]] = thumb
        mark = "FLAGGED " if row.get("flagged") else ""
        for k, text in enumerate([f"{row['id']}  {row['score']:.2f}", (mark + row["detectors"])[:30]]):
            cv2.putText(tile, text, (2, size + 13 + 15 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        tiles = [np.full((size + 34, size, 3), 255, np.uint8)]
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)])
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def scan_photos(data, model_path: str | Path | None = None, cache: str | Path | None = None):
    """Load the photos of ``data`` and ``scan`` them (train, then test): (photos, per-photo table,
    GAP features, class probabilities). ``cache``: a feature cache folder whose
    ``gap_<model>.h5`` already holds the classifier's logits for these photos: they are read
    instead of running the classifier again."""
    photos = load_photos(data, require_test=False)
    model_path = Path(model_path or default_weights_dir() / IMAGENET_MODEL)
    cached = from_cache(photos, model_path, Path(cache) if cache else None)
    return (photos, *scan(photos.train + photos.test, model_path, cached=cached))


def report_outliers(photos: PhotoSet, table: pd.DataFrame, gap: np.ndarray, probs: np.ndarray,
                    p_dog: np.ndarray, out: Path, top: int = 0,
                    max_flagged: float = MAX_FLAGGED) -> pd.DataFrame:
    """Every detector on what ``scan_photos`` found and the out-of-fold P(dog) of the training
    photos (``p_dog``: one column per model, from a model that never saw the photo: cleanlab's
    contract); writes outliers.csv (flagged), scores.csv (every photo, most suspicious first),
    contact_sheet.png (flagged) and top_<N>.png (the ``top`` most suspicious, flagged or not:
    what the rule leaves). Returns one row per training photo."""
    n = len(photos.train)
    train_table, train_gap = table.iloc[:n].reset_index(drop=True), gap[:n]
    ids = [p.id for p in photos.train]
    ok = np.isfinite(train_gap).all(axis=1)
    safe = np.where(ok[:, None], train_gap, 0)
    # Within train, the later photo of a pair is the duplicate; the first one stays.
    pairs = [(j, ids[i], c) for i, j, c in near_duplicates(safe)]
    if photos.test:
        test_gap = np.nan_to_num(gap[n:])
        pairs += [(i, f"test/{photos.test[j].id}", c) for i, j, c in near_duplicates(safe, test_gap)]
    result = find_outliers(photos.train, train_table, probs[:n], p_dog, pairs, train_gap, max_flagged,
                           photos.task.cats_and_dogs)
    out.mkdir(parents=True, exist_ok=True)
    ranked = result.sort_values("score", ascending=False)
    flagged = ranked[ranked["flagged"]]
    columns = ["id", "label", "score", "detectors", "drop", "min_side", "colour_ratio", "pixel_std",
               "catdog_mass", "catdog_rank", "top_class", "outlier_z", "p_given_label", "duplicate_of",
               "error"]
    flagged[columns].to_csv(out / "outliers.csv", index=False)
    ranked[["flagged", *columns]].to_csv(out / "scores.csv", index=False)
    contact_sheet(photos.train, flagged, out / "contact_sheet.png")
    if top:
        contact_sheet(photos.train, ranked.head(top), out / f"top_{top}.png", limit=top)
    return result


if __name__ == "__main__":  # the command moved up a layer; say so rather than exit 0 doing nothing
    import sys

    print("error: the cleaning command is now `python -m oof.clean` (same arguments: "
          f"python -m oof.clean {' '.join(sys.argv[1:])}); features.clean holds only its detectors",
          file=sys.stderr)
    sys.exit(2)
