"""The K-class stackers compared on a finished run's out-of-fold predictions (same folds).

    python benchmarks/stackers_k.py RUN_DIR

Reads RUN_DIR/oof/ (a ``stacking.run`` on a K > 2 task, e.g. ../shared/clothing-small) and
cross-fits, on the run's folds, every level-2 form over the level-1 heads (with and without
concat-fusion as one more input): ``average``, ``stack-lr`` with one weight per model
(``weights="model"``, the default) and as a full multinomial regression on all M * K
log-probabilities (``weights="full"``) at two strengths, and ``stack-lgbm``. Prints a Markdown
table of multi-class log loss and accuracy (results: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oof.crossfit import cross_fit  # noqa: E402
from oof.store import level1_prediction_files, load_oof, predictions  # noqa: E402
from stacking.stackers import LGBMStacker, LRStacker, AverageStacker  # noqa: E402
from stacking.submission import scores  # noqa: E402

FORMS = {
    "average": AverageStacker,
    "stack-lr (a weight per model)": lambda: LRStacker(weights="model"),
    "stack-lr full, C=1": lambda: LRStacker(weights="full"),
    "stack-lr full, C=0.01": lambda: LRStacker(C=0.01, weights="full"),
    "stack-lgbm": LGBMStacker,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    tables = {f.stem: load_oof(f) for f in level1_prediction_files(args.run / "oof")}
    first = next(iter(tables.values()))
    y, fold = first["label"].to_numpy(), first["fold"].to_numpy()
    level1 = {name: predictions(t) for name, t in tables.items()}
    concat = predictions(load_oof(args.run / "oof" / "concat-fusion.csv"))
    print("| inputs | stacker | CV log loss | CV accuracy | seconds |\n| --- | --- | --- | --- | --- |")
    for label, inputs in (("heads", list(level1.values())), ("heads + concat-fusion", [*level1.values(), concat])):
        L = np.column_stack(inputs)
        for name, make in FORMS.items():
            started = time.time()
            s = scores(y, cross_fit(make(), L, y, fold).oof)
            print(f"| {label} | {name} | {s['log_loss']:.4f} | {s['accuracy']:.4f} | {time.time() - started:.1f} |")


if __name__ == "__main__":
    main()
