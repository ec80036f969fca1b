"""The Kaggle notebook entry point of kernel.py: its settings and how they become a stacking run.

``tools/build_kernel.py`` moves the settings block below to the top of kernel.py, so a Kaggle
user edits plain constants there (or passes the same settings as flags).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from features.defaults import KAGGLE_INPUT, KAGGLE_WORKING, default_data_dirs
from features.registry import get_backbone
from features.runtime import has_gpu
from stacking.run import main

# --- settings ---
# Edit these, or pass them as flags (python kernel.py --help).
DATA = None  # None: the competition input (/kaggle/input/dogs-vs-cats-redux-kernels-edition)
OUT = None  # None: /kaggle/working on Kaggle, else runs/<timestamp>
BACKBONES = "resnet50,inception_v3,xception,inception_resnet_v2"  # the public write-ups' four
WEIGHTS_DIR = None  # None: an attached dataset holding the Keras weight files if found, else download
FOLDS = 5
GPU_BATCH_SIZE = 128  # photos per forward pass on a GPU
# --- end settings ---


def find_weights_dir(backbones: list[str], root: Path = KAGGLE_INPUT) -> Path | None:
    """An attached Kaggle dataset (up to three folders deep) holding the backbones' weight files."""
    wanted = {get_backbone(b).weights_file for b in backbones}
    if not root.is_dir():
        return None
    for pattern in ("*/*", "*/*/*", "*/*/*/*"):
        for f in root.glob(pattern):
            if f.name in wanted:
                return f.parent
    return None


def kaggle_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kernel.py", description="Dogs vs. Cats Redux: GAP features of pretrained CNNs, "
        "out-of-fold heads and stacking; writes submission.csv and a report.",
        epilog="Any other stacking.run flag (--holdout, --heads, --submit-with, ...) is passed on.")
    parser.add_argument("--data", nargs="+", default=[DATA] if DATA else None)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--weights-dir", default=WEIGHTS_DIR)
    parser.add_argument("--folds", type=int, default=FOLDS)
    args, rest = parser.parse_known_args(argv)
    backbones = [b for b in args.backbones.split(",") if b]
    weights = args.weights_dir or find_weights_dir(backbones)
    data = args.data or [str(d) for d in default_data_dirs()]
    out = args.out or (str(KAGGLE_WORKING) if KAGGLE_WORKING.is_dir() else None)
    run_args = ["--data", *data, "--backbones", ",".join(backbones), "--folds", str(args.folds)]
    run_args += ["--weights", str(weights)] if weights else []
    run_args += ["--out", out] if out else []
    if has_gpu() and "--batch-size" not in rest:
        run_args += ["--batch-size", str(GPU_BATCH_SIZE)]
    print(f"kernel: weights {'from ' + str(weights) if weights else 'each backbone default (imagenet download)'}",
          flush=True)
    return main(run_args + rest)


if __name__ == "__main__":
    sys.exit(kaggle_main())
