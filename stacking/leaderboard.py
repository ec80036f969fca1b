"""Leaderboard scores back into the run they came from, beside CV.

    python -m stacking.leaderboard RUN --record MODEL=PUBLIC[,PRIVATE] [--record ...]
    python -m stacking.leaderboard RUN [RUN ...]

After submitting a run's ``submissions/<model>.csv`` files, record what Kaggle said: the scores go
to ``RUN/leaderboard.csv`` and ``report.md`` / ``report.json`` are written again with the
leaderboard columns beside CV (and held-out) and a CV-against-leaderboard plot. Given several runs
(say two backbone sets) it prints one table across them. Bad input (a model the run does not
have, a score that is not a number, a folder that is not a run) changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from oof.store import load_oof, prediction_path
from stacking.report import write_report
from stacking.submission import clip_rule

LEADERBOARD = "leaderboard.csv"
COLUMNS = ["model", "public", "private", "recorded"]
# report.json keys that write_report adds itself (the rest is the run's info).
_RESULT_KEYS = ("cv", "holdout", "submit_with", "reason", "clip", "plots", "submissions", "leaderboard")


class LeaderboardError(ValueError):
    """A record or run folder that cannot be used; the message names it."""


def load_run(folder: str | Path) -> dict:
    """A run's report.json, checked to be one ``stacking.run`` wrote."""
    folder = Path(folder)
    path = folder / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise LeaderboardError(f"{folder}: not a gapstack run (no report.json); pass a folder that "
                               "python -m stacking.run or kernel.py wrote") from None
    except ValueError as exc:
        raise LeaderboardError(f"{path}: unreadable ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("cv"), dict):
        raise LeaderboardError(f"{path}: not a gapstack report (no per-model CV scores)")
    return report


def _score(text: str, record: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LeaderboardError(f"--record {record}: '{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise LeaderboardError(f"--record {record}: a log loss is a finite number >= 0, got {text}")
    return value


def parse_record(record: str, models) -> tuple[str, float, float | None]:
    """``MODEL=PUBLIC[,PRIVATE]`` -> (model, public, private), the model checked against the run's."""
    model, sep, scores = record.rpartition("=")
    if not sep or not model or not scores:
        raise LeaderboardError(f"--record {record}: expected MODEL=PUBLIC[,PRIVATE], e.g. stack-lr=0.0412")
    if model not in models:
        raise LeaderboardError(f"--record {record}: the run has no model '{model}'; its models: "
                               + ", ".join(models))
    parts = scores.split(",")
    if len(parts) > 2:
        raise LeaderboardError(f"--record {record}: at most two scores (public, private)")
    return model, _score(parts[0], record), _score(parts[1], record) if len(parts) == 2 else None


def read_leaderboard(folder: str | Path) -> dict[str, dict]:
    """model -> {"public", "private"} from RUN/leaderboard.csv (empty when none recorded)."""
    path = Path(folder) / LEADERBOARD
    if not path.exists():
        return {}
    df = pd.read_csv(path)
    return {row.model: {"public": _none(row.public), "private": _none(row.private)}
            for row in df.itertuples()}


def _none(value) -> float | None:
    return None if pd.isna(value) else float(value)


def record(folder: str | Path, records: list[str]) -> dict[str, dict]:
    """Store the records in RUN/leaderboard.csv (a model's newer scores replace its older ones) and
    write the report again; every record is checked before anything is written."""
    folder = Path(folder)
    report = load_run(folder)
    parsed = [parse_record(r, list(report["cv"])) for r in records]
    board = read_leaderboard(folder)
    for model, public, private in parsed:
        board[model] = {"public": public, "private": private}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    pd.DataFrame([{"model": m, **s, "recorded": stamp} for m, s in board.items()],
                 columns=COLUMNS).to_csv(folder / LEADERBOARD, index=False)
    rerender(folder, report, board)
    return board


def rerender(folder: Path, report: dict, board: dict[str, dict]) -> None:
    """report.md / report.json / plots again, from the run's saved report and OOF predictions."""
    info = {k: v for k, v in report.items() if k not in _RESULT_KEYS}
    oof = {name: load_oof(prediction_path(folder / "oof", name)) for name in report["cv"]}
    y = next(iter(oof.values()))["label"].to_numpy()
    write_report(folder, info, report["cv"], report["holdout"], report["submit_with"],
                 report["clip"] is not None, report["reason"],
                 {name: df["pred"].to_numpy() for name, df in oof.items()}, y,
                 report.get("submissions"), board)


def table(folders: list[str | Path]) -> pd.DataFrame:
    """One row per (run, model): CV as submitted, held-out, recorded leaderboard scores."""
    rows = []
    for folder in folders:
        report = load_run(folder)
        board = read_leaderboard(folder)
        for name, s in report["cv"].items():
            held = (report.get("holdout") or {}).get(name)
            sub = (report.get("submissions") or {}).get(name)
            clipped = sub["clipped"] if sub else clip_rule(s)  # both scores as the file is made
            rows.append({"run": Path(folder).name, "model": name,
                         "cv": s["log_loss_clipped" if clipped else "log_loss"],
                         "held_out": held["log_loss_clipped" if clipped else "log_loss"] if held else np.nan,
                         "public": board.get(name, {}).get("public"),
                         "private": board.get(name, {}).get("private"),
                         "submitted": name == report["submit_with"]})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        return "" if v is None or pd.isna(v) else f"{v:.5f}"

    lines = ["| run | model | CV log loss (as submitted) | held out (as submitted) | public LB | private LB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in df.itertuples():
        mark = " **(submission.csv)**" if r.submitted else ""
        lines.append(f"| {r.run} | {r.model}{mark} | {fmt(r.cv)} | {fmt(r.held_out)} | {fmt(r.public)} | "
                     f"{fmt(r.private)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacking.leaderboard",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folder(s) written by stacking.run or kernel.py")
    parser.add_argument("--record", action="append", default=[], metavar="MODEL=PUBLIC[,PRIVATE]",
                        help="a model's leaderboard log loss (public, and private where known); repeatable")
    args = parser.parse_args(argv)
    try:
        if args.record:
            if len(args.runs) != 1:
                raise LeaderboardError("--record takes exactly one run folder (the one the files came from)")
            record(args.runs[0], args.record)
            print(f"recorded {len(args.record)} score(s) in {Path(args.runs[0]) / LEADERBOARD}; "
                  f"report: {Path(args.runs[0]) / 'report.md'}")
        print(markdown(table(args.runs)))
    except LeaderboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
