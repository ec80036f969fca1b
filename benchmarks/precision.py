"""Does computing the features in float16, bfloat16 or int8 change what the models learn?

    python benchmarks/precision.py [--data DIR ...] [--photos 4000] [--seeds 3]
                                   [--backbones efficientnet_lite0,...]
                                   [--policies float32,mixed_float16,mixed_bfloat16,int8,int8@32]

Each precision extracts the same photos (``extract(precision=...)``, in its own process; Keras
runs the mixed policies, ONNX Runtime float32 and int8; ``int8@N`` is int8 calibrated on N photos
instead of ``features.quantize.INT8``'s number), then every model of the
run (each backbone's logistic head, concat-fusion, the stackers) is cross-validated on the same
folds for each policy. The noise: how much float32's own CV log loss moves from one fold seed to
another. A policy whose change is well inside that noise is safe to use where it is faster (a
GPU's float16 tensor cores). Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.data import PhotoSet, load_photos  # noqa: E402
from features.defaults import SEED, shared_dir  # noqa: E402


def subset(data: list[str], n: int) -> PhotoSet:
    """A stratified, seeded sample of ``n`` training photos of the shared folders (no test split)."""
    from sklearn.model_selection import train_test_split

    photos = load_photos(data, require_test=False)
    train = photos.train
    if n < len(train):
        train, _ = train_test_split(train, train_size=n, random_state=SEED, stratify=[p.label for p in train])
    return PhotoSet(sorted(train, key=lambda p: (p.label, p.id)), [], photos.sources)


def extract_with_policy(args) -> None:
    """Child process: extract every backbone with this policy into cache/<policy>/."""
    from features.cache import read_attrs
    from features.extract import extract

    from features.quantize import INT8

    photos = subset(args.data, args.photos)
    precision, _, calibration = args.policy.partition("@")
    if calibration:
        INT8["photos"] = int(calibration)
    keras = precision.startswith("mixed")
    timing = {}
    for name in args.backbones.split(","):
        started = time.time()
        path = extract(photos, name, cache_dir=Path(args.cache) / args.policy, runtime="keras" if keras else "auto",
                       batch_size=32 if keras else None, progress=False, precision=precision)
        run = read_attrs(path)["last_run"]
        timing[name] = {"img_s": round(run["photos"] / run["seconds"], 1) if run.get("seconds") else None,
                        "total_s": round(time.time() - started, 1)}
    print(json.dumps(timing))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(shared_dir() / "dogs-vs-cats"),
                                                      str(shared_dir() / "dogs-vs-cats-200px")])
    parser.add_argument("--photos", type=int, default=4000)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--policies", default="float32,mixed_float16,mixed_bfloat16")
    parser.add_argument("--seeds", type=int, default=3, help="fold seeds (the noise estimate)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache", default="cache/precision")
    parser.add_argument("--policy", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.policy:
        extract_with_policy(args)
        return 0

    from features.cache import load_features
    from features.quantize import agreement
    from oof.folds import make_folds
    from stacking.ensemble import fit_ensemble
    from stacking.submission import scores

    policies = args.policies.split(",")
    speed = {}
    for policy in policies:
        started = time.time()
        out = subprocess.run([sys.executable, __file__, "--policy", policy, "--data", *args.data,
                              "--photos", str(args.photos), "--backbones", args.backbones,
                              "--cache", args.cache], capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        speed[policy] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{policy}: extracted in {time.time() - started:.0f} s, img/s {speed[policy]}", flush=True)

    backbones = args.backbones.split(",")
    # Each policy's folder holds one photo set's caches (features.cache.set_folder).
    feats = {p: {b: load_features(next((Path(args.cache) / p).glob(f"*/gap_{b}.h5"))) for b in backbones}
             for p in policies}
    ref = feats[policies[0]]
    ids = ref[backbones[0]].train_ids
    y = ref[backbones[0]].label.astype(int)
    for p in policies:
        for b in backbones:
            assert list(feats[p][b].train_ids) == list(ids), (p, b)
    drift = {p: {b: agreement(feats[p][b].train, ref[b].train) for b in backbones} for p in policies}
    described = [{"name": b} for b in backbones]
    cv: dict[str, dict[int, dict[str, float]]] = {p: {} for p in policies}
    for seed in range(args.seeds):
        fold = make_folds(list(ids), y, args.folds, SEED + seed)["fold"].to_numpy()
        for p in policies:
            X = {b: feats[p][b].train for b in backbones}
            _, oof = fit_ensemble(described, X, y, fold, ["logistic"], log=lambda *_: None)
            cv[p][seed] = {m: scores(y, o)["log_loss"] for m, o in oof.items()}
            print(f"seed {seed} {p}: " + ", ".join(f"{m} {v:.4f}" for m, v in cv[p][seed].items()), flush=True)

    models = list(cv[policies[0]][0])
    base = policies[0]
    lines = [f"{len(ids)} photos, {args.folds} folds x {args.seeds} fold seeds; CV log loss (mean over seeds); "
             f"change vs {base} on the same folds (mean, largest); noise = {base}'s std over seeds.", "",
             "| model | " + " | ".join(policies) + " | noise (std over seeds) | "
             + " | ".join(f"{p} - {base} (mean / largest)" for p in policies[1:]) + " |",
             "| --- " * (2 + len(policies) + len(policies) - 1) + "|"]
    for m in models:
        values = {p: np.array([cv[p][s][m] for s in range(args.seeds)]) for p in policies}
        row = f"| {m} | " + " | ".join(f"{values[p].mean():.5f}" for p in policies)
        row += f" | {values[base].std(ddof=1) if args.seeds > 1 else float('nan'):.5f} | "
        row += " | ".join(f"{(values[p] - values[base]).mean():+.5f} / {np.abs(values[p] - values[base]).max():.5f}"
                          for p in policies[1:]) + " |"
        lines.append(row)
    lines += ["", "| policy | " + " | ".join(backbones) + " |", "| --- " * (1 + len(backbones)) + "|"]
    for p in policies:
        runtime = "Keras" if p.startswith("mixed") else "ONNX Runtime"
        lines.append(f"| {p}: img/s on this CPU ({runtime}), extraction | "
                     + " | ".join(str(speed[p][b]["img_s"]) for b in backbones) + " |")
        lines.append(f"| {p}: seconds from start to cache (int8: with calibration) | "
                     + " | ".join(str(speed[p][b]["total_s"]) for b in backbones) + " |")
        lines.append(f"| {p}: features vs {base}: mean cosine / largest relative change | "
                     + " | ".join(f"{drift[p][b]['cosine']:.5f} / {drift[p][b]['max_rel_diff']:.1e}"
                                  for b in backbones) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
