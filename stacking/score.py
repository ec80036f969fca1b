"""Score a submission against known labels (local validation).

    python -m stacking.score SUBMISSION.csv LABELS.csv

LABELS.csv has ``id,label`` with 0/1 labels (a run's holdout.csv works: its extra columns are
ignored). Prints log loss and accuracy over the ids both files share, and says which are missing.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from stacking.submission import scores


def score_files(submission: str, labels: str) -> dict:
    sub = pd.read_csv(submission)
    truth = pd.read_csv(labels)
    for name, df in ((submission, sub), (labels, truth)):
        if not {"id", "label"} <= set(df.columns):
            raise ValueError(f"{name}: needs columns id,label; has {', '.join(map(str, df.columns))}")
    sub["id"], truth["id"] = sub["id"].astype(str), truth["id"].astype(str)
    if sub["id"].duplicated().any():
        raise ValueError(f"{submission}: id '{sub['id'][sub['id'].duplicated()].iloc[0]}' appears twice")
    if sub["label"].isna().any() or not sub["label"].between(0, 1).all():
        raise ValueError(f"{submission}: labels must be probabilities in [0, 1]")
    merged = truth[["id", "label"]].merge(sub, on="id", suffixes=("_true", "_pred"))
    if merged.empty:
        raise ValueError(f"{submission} and {labels} share no id")
    result = scores(merged["label_true"], merged["label_pred"])
    result["missing"] = int(len(truth) - len(merged))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacking.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("submission")
    parser.add_argument("labels")
    args = parser.parse_args(argv)
    try:
        s = score_files(args.submission, args.labels)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"log loss {s['log_loss']:.5f}  accuracy {s['accuracy']:.4f}  on {s['n']} photos"
          + (f"  ({s['missing']} labelled ids missing from the submission)" if s["missing"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
