"""The Kaggle notebook entry point of kernel.py: its settings and how they become a stacking run.

``tools/build_kernel.py`` moves the settings block below to the top of kernel.py, so a Kaggle
user edits plain constants there (or passes the same settings as flags).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from features.data import DataError, find_data_dirs
from features.defaults import KAGGLE_COMPETITION, KAGGLE_INPUT, KAGGLE_WORKING, default_data_dirs
from features.extract import setup_logging
from features.registry import get_backbone
from features.runtime import has_gpu
from stacking.run import log, main

# --- settings ---
# Edit these, or pass them as flags (python kernel.py --help).
INPUT = None  # None: /kaggle/input, where Kaggle mounts the competition and attached datasets
DATA = None  # None: the competition's folder under INPUT (dogs-vs-cats-redux-kernels-edition), else
#              the one data folder there (train.csv + sample_submission.csv, or train/<class>/ folders)
OUT = None  # None: /kaggle/working on Kaggle, else runs/<timestamp>
BACKBONES = "resnet50,inception_v3,xception,inception_resnet_v2"  # the public write-ups' four
WEIGHTS_DIR = None  # None: an attached dataset under INPUT holding the weight files, else download
FOLDS = 5
GPU_BATCH_SIZE = 128  # photos per forward pass on a GPU
FINETUNE = "auto"  # auto: fine-tune every backbone on a GPU (on a CPU the tops of some); "none"; or names
FINETUNE_EPOCHS = None  # epochs per fold when fine-tuning (None: each backbone's recipe)
FINETUNE_RECIPE = "auto"  # auto: the whole network on a GPU, only its top on a CPU; "whole"; "top"
FINETUNE_BUDGET = None  # minutes fine-tuning may take (None: stacking.run's); auto keeps within it
# --- end settings ---


def find_weights_dir(backbones: list[str], root: Path = KAGGLE_INPUT) -> Path | None:
    """The folder of the backbones' weight files in attached Kaggle datasets (up to four folders
    deep), with their ImageNet tops where a dataset has them (for the ImageNet priors). Files
    spread over several datasets are linked into one temporary folder."""
    wanted = {get_backbone(b).weights_file for b in backbones}
    tops = {get_backbone(b).top_weights_file for b in backbones} - {None}
    if not root.is_dir():
        return None
    found: dict[str, Path] = {}
    for pattern in ("*/*", "*/*/*", "*/*/*/*", "*/*/*/*/*"):
        for f in sorted(root.glob(pattern)):
            if f.name in wanted | tops and f.name not in found:
                found[f.name] = f
    if not wanted & set(found):
        return None
    missing = wanted - set(found)
    if missing:
        log.warning("kernel: no weights file under %s for %s", root, ", ".join(sorted(missing)))
    if tops - set(found):
        log.info("kernel: no ImageNet top under %s for %s, so no ImageNet prior for it (attach a "
                 "dataset with %s for one)", root, ", ".join(sorted(tops - set(found))),
                 ", ".join(sorted(tops - set(found))))
    folders = {f.parent for f in found.values()}
    if len(folders) == 1:
        return folders.pop()
    joined = Path(tempfile.mkdtemp(prefix="gapstack-weights-"))
    for name, f in found.items():
        (joined / name).symlink_to(f)
    return joined


def input_data(root: Path, given: bool) -> list[str]:
    """The data folder under the input root: the Dogs vs. Cats competition's where it is attached,
    else the one folder of any layout there (another competition's train.csv and
    sample_submission.csv, or a dataset of class folders); outside Kaggle, the shared sample."""
    if (root / KAGGLE_COMPETITION.name).is_dir():
        return [str(root / KAGGLE_COMPETITION.name)]
    if not given and not root.is_dir():
        return [str(d) for d in default_data_dirs()]
    found = find_data_dirs(root)
    if len(found) != 1:
        raise DataError(f"{root}: {'no data folder' if not found else 'several data folders'} found"
                        + (f" ({', '.join(str(f.relative_to(root)) for f in found)})" if found else
                           " (a train/ folder, train.zip or a labels CSV)")
                        + "; set DATA (or pass --data) to the one to use")
    log.info("kernel: data from %s", found[0])
    return [str(found[0])]


def own_argv() -> list[str]:
    """The command-line flags meant for the kernel: ``sys.argv[1:]`` when it runs as a file
    (``python kernel.py ...``, ``%run kernel.py ...``), none when it is pasted into a notebook
    cell, where there is no ``__file__`` and ``sys.argv`` is the Jupyter kernel's own
    (``-f CONNECTION_FILE.json``): the settings are then the constants above."""
    argv = sys.argv[1:]
    jupyter = argv[:1] == ["-f"] and len(argv) > 1 and argv[1].endswith(".json")
    return [] if "__file__" not in globals() or jupyter else argv


def kaggle_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kernel.py", description="Dogs vs. Cats Redux, or any labelled photos (class folders, a "
        "labels CSV): GAP features of pretrained CNNs, out-of-fold heads and stacking; writes "
        "submission.csv and a report.",
        epilog="Any other stacking.run flag (--holdout, --heads, --submit-with, ...) is passed on.")
    parser.add_argument("--input", default=INPUT,
                        help="where the competition and attached datasets are (default: /kaggle/input)")
    parser.add_argument("--data", nargs="+", default=[DATA] if DATA else None)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--weights-dir", default=WEIGHTS_DIR)
    parser.add_argument("--folds", type=int, default=FOLDS)
    parser.add_argument("--finetune", default=FINETUNE)
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument("--finetune-budget", type=float, default=FINETUNE_BUDGET)
    parser.add_argument("--finetune-recipe", default=FINETUNE_RECIPE)
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    root = Path(args.input) if args.input else KAGGLE_INPUT
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    try:  # a misspelt name is said before any weight search or extraction
        for name in backbones + [b.strip() for b in args.finetune.split(",") if b.strip() not in ("", "auto", "none")]:
            get_backbone(name)
    except KeyError as exc:
        print(f"error: {exc.args[0]} (in BACKBONES / FINETUNE, or --backbones / --finetune)", file=sys.stderr)
        return 2
    weights = args.weights_dir or find_weights_dir(backbones, root)
    try:
        data = args.data or input_data(root, bool(args.input))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or (str(KAGGLE_WORKING) if KAGGLE_WORKING.is_dir() else None)
    if not has_gpu() and KAGGLE_INPUT.is_dir():
        log.warning("No GPU: this notebook runs on the CPU, many times slower. In the notebook's "
                    "settings choose Accelerator: GPU T4 x2 (or P100).")
    run_args = ["--data", *data, "--backbones", ",".join(backbones), "--folds", str(args.folds)]
    run_args += ["--weights", str(weights)] if weights else []
    run_args += ["--finetune", args.finetune or "none", "--finetune-recipe", args.finetune_recipe]
    run_args += ["--finetune-budget", str(args.finetune_budget)] if args.finetune_budget is not None else []
    run_args += ["--finetune-epochs", str(args.finetune_epochs)] if args.finetune_epochs is not None else []
    run_args += ["--out", out] if out else []
    if has_gpu() and "--batch-size" not in rest:
        run_args += ["--batch-size", str(GPU_BATCH_SIZE)]
    print(f"kernel: weights {'from ' + str(weights) if weights else 'each backbone default (imagenet download)'}",
          flush=True)
    return main(run_args + rest)


if __name__ == "__main__":
    sys.exit(kaggle_main(own_argv()))
