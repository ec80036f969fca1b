"""Leaderboard scores back into the run they came from, beside CV.

    python -m stacking.leaderboard RUN --submit MODEL[,MODEL...|all] [--timeout S]
    python -m stacking.leaderboard RUN --fetch
    python -m stacking.leaderboard RUN --record MODEL=PUBLIC[,PRIVATE] [--record ...]
    python -m stacking.leaderboard RUN [RUN ...]

``--submit`` sends each model's ``submissions/<model>.csv`` to Kaggle with Kaggle's own client
(``pip install 'gapstack[kaggle]'``), waits for the scores and records them; ``--fetch`` reads
them again later (a submission still pending, or the private score once revealed); ``--record``
takes scores read off the website. The scores go to ``RUN/leaderboard.csv`` (with each
submission's ref, status and Kaggle's error, so a file is never submitted twice) and
``report.md`` / ``report.json`` are written again with the leaderboard columns beside CV (and
held-out) and a CV-against-leaderboard plot. Given several runs (say two backbone sets) it prints
one table across them. Bad input (a model the run does not have, a score that is not a number, a
folder that is not a run) changes nothing.
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

from features.defaults import KAGGLE_COMPETITION
from features.models import file_md5
from oof.store import load_oof, prediction_path, predictions
from stacking.kaggle_client import KaggleError
from stacking.report import write_report
from stacking.submission import SUBMISSIONS, clip_rule

LEADERBOARD = "leaderboard.csv"
# public/private: log loss; status: PENDING, COMPLETE or ERROR for a submission made here (empty
# for a hand-recorded score); ref, description, file_md5: which submission of which file.
COLUMNS = ["model", "public", "private", "recorded", "status", "error", "ref", "description", "file_md5"]
TIMEOUT = 900  # seconds --submit waits for Kaggle's scores (--fetch: none, one look)
POLL = 10.0  # seconds between the first two looks at Kaggle's list; each pause 1.5x the last ...
POLL_MAX = 60.0  # ... up to this
# report.json keys that write_report adds itself (the rest is the run's info).
_RESULT_KEYS = ("cv", "holdout", "test", "submit_with", "reason", "clip", "plots", "submissions", "leaderboard")


class LeaderboardError(ValueError):
    """A record or run folder that cannot be used; the message names it."""


def load_run(folder: str | Path) -> dict:
    """A run's report.json, checked to be one ``stacking.run`` wrote."""
    folder = Path(folder)
    path = folder / "report.json"
    if folder.exists() and not folder.is_dir():
        raise LeaderboardError(f"{folder}: a file, not a run folder; pass the folder that python -m "
                               "stacking.run or kernel.py wrote (the one holding report.json)")
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


def check_renderable(folder: Path, report: dict) -> None:
    """The report is drawn again from the run's OOF predictions: refuse, before anything is
    written, a run folder that lacks them (copied without oof/, say)."""
    missing = [name for name in report["cv"] if not prediction_path(folder / "oof", name).is_file()]
    if missing:
        raise LeaderboardError(f"{folder / 'oof'}: no out-of-fold predictions of {', '.join(missing)}; "
                               "the report is drawn from them, so copy the whole run folder")


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
    """model -> its row of RUN/leaderboard.csv ({} when none recorded); a damaged file is refused
    with its name, never read as no scores (the next write would lose them)."""
    path = Path(folder) / LEADERBOARD
    if not path.exists():
        return {}
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LeaderboardError(f"{path}: unreadable ({exc}); mend it, or delete it to start the "
                               "record again") from None
    if not {"model", "public", "private"} <= set(df.columns):
        raise LeaderboardError(f"{path}: not a leaderboard record (columns {', '.join(df.columns)}; "
                               "needs model, public, private); mend it, or delete it")
    board = {}
    for row in df.to_dict("records"):
        entry = {c: row.get(c) or None for c in COLUMNS[1:]}
        for c in ("public", "private"):
            entry[c] = _stored_score(entry[c], path, row["model"])
        entry["ref"] = int(entry["ref"]) if entry["ref"] else None
        board[row["model"]] = entry
    return board


def _stored_score(text: str | None, path: Path, model: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise LeaderboardError(f"{path}: score '{text}' of {model} is not a number; mend it, or "
                               "delete the file") from None


def store(folder: Path, report: dict, board: dict[str, dict]) -> None:
    """The report drawn again with these scores, then RUN/leaderboard.csv (atomically): the record
    is only written once the report it feeds is."""
    rerender(folder, report, board)
    rows = [{"model": m, **{c: e.get(c) for c in COLUMNS[1:]}} for m, e in board.items()]
    tmp = folder / (LEADERBOARD + ".tmp")
    pd.DataFrame(rows, columns=COLUMNS).astype({"ref": "Int64"}).to_csv(tmp, index=False)
    tmp.replace(folder / LEADERBOARD)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def record(folder: str | Path, records: list[str]) -> dict[str, dict]:
    """Store the records in RUN/leaderboard.csv (a model's newer scores replace its older ones) and
    write the report again; every record is checked before anything is written."""
    folder = Path(folder)
    report = load_run(folder)
    parsed = [parse_record(r, list(report["cv"])) for r in records]
    check_renderable(folder, report)
    board = read_leaderboard(folder)
    for model, public, private in parsed:
        board[model] = {**board.get(model, {}), "public": public, "private": private, "recorded": _stamp()}
    store(folder, report, board)
    return board


def rerender(folder: Path, report: dict, board: dict[str, dict]) -> None:
    """report.md / report.json / plots again, from the run's saved report and OOF predictions."""
    info = {k: v for k, v in report.items() if k not in _RESULT_KEYS}
    oof = {name: load_oof(prediction_path(folder / "oof", name)) for name in report["cv"]}
    y = next(iter(oof.values()))["label"].to_numpy()
    write_report(folder, info, report["cv"], report["holdout"], report["submit_with"],
                 report["clip"] is not None, report["reason"],
                 {name: predictions(df) for name, df in oof.items()}, y,
                 report.get("submissions"), board, report.get("test"))


def chosen_models(spec: str, report: dict, folder: Path) -> list[str]:
    """``MODEL[,MODEL...]`` or ``all``, each checked to be the run's and to have its file."""
    models = list(report["cv"])
    names = models if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise LeaderboardError("--submit: name the models to submit (e.g. stack-lr,concat-fusion), or all")
    unknown = [m for m in names if m not in models]
    if unknown:
        raise LeaderboardError(f"--submit: the run has no model {', '.join(map(repr, unknown))}; its "
                               "models: " + ", ".join(models))
    missing = [str(prediction_path(folder / SUBMISSIONS, m)) for m in names
               if not prediction_path(folder / SUBMISSIONS, m).is_file()]
    if missing:
        raise LeaderboardError(f"no submission file {', '.join(missing)}: the run wrote none for it "
                               "(rerun stacking.run)")
    return list(dict.fromkeys(names))


def submit(folder: str | Path, spec: str, competition: str = KAGGLE_COMPETITION.name,
           timeout: float = TIMEOUT, poll: float = POLL, api=None, say=print) -> dict[str, dict]:
    """Submit each chosen model's file (none twice: a file whose md5 already has a ref is not sent
    again), then wait up to ``timeout`` seconds for Kaggle's scores and record them. The ref of
    each submission is stored as soon as Kaggle has it, so an interrupted wait loses nothing
    (``fetch`` reads the scores later). A refusal (a competition rule such as the daily limit)
    stops the submitting; what was already submitted is still waited for and recorded."""
    from stacking import kaggle_client

    folder = Path(folder)
    report = load_run(folder)
    models = chosen_models(spec, report, folder)
    check_renderable(folder, report)
    board = read_leaderboard(folder)
    api = api or kaggle_client.connect()
    refused = None
    for model in models:
        path = prediction_path(folder / SUBMISSIONS, model)
        md5 = file_md5(path)
        entry = board.get(model, {})
        if entry.get("file_md5") == md5 and (entry.get("ref") or entry.get("description")):
            say(f"{model}: this file was submitted already (ref {entry.get('ref')}, "
                f"{(entry.get('status') or 'recorded').lower()}); not submitted again")
            continue
        description = f"gapstack {folder.resolve().name} {model} {md5[:8]}"
        try:
            ref = kaggle_client.submit(api, competition, path, description)
        except KaggleError as exc:
            refused = exc
            break
        say(f"{model}: submitted {path} (ref {ref})")
        board[model] = {"public": None, "private": None, "recorded": _stamp(), "status": "PENDING",
                        "error": None, "ref": ref, "description": description, "file_md5": md5}
        store(folder, report, board)
    if any(board.get(m, {}).get("status") for m in models):
        fetch(folder, competition, timeout, poll, api, say, report, board)
    if refused:
        raise refused
    return board


def fetch(folder: str | Path, competition: str = KAGGLE_COMPETITION.name, timeout: float = 0,
          poll: float = POLL, api=None, say=print, report: dict | None = None,
          board: dict | None = None) -> dict[str, dict]:
    """Look up every submission this run made (by ref, else by its description) until none is
    pending or ``timeout`` seconds have passed, pausing ever longer between looks (from ``poll``
    seconds up to ``POLL_MAX``);
    record what Kaggle says: the scores, or ERROR with Kaggle's reason."""
    from stacking import kaggle_client

    folder = Path(folder)
    report = report or load_run(folder)
    if board is None:
        check_renderable(folder, report)
        board = read_leaderboard(folder)
    ours = {m: e for m, e in board.items() if e.get("ref") or e.get("description")}
    if not ours:
        say(f"{folder}: no submission made with --submit to look up")
        return board
    api = api or kaggle_client.connect()
    started, pause = time.monotonic(), poll
    while True:
        listed = kaggle_client.submissions(api, competition, lambda found: all(
            _match(found, e) for e in ours.values()))
        changed = False
        for model, entry in ours.items():
            sub = _match(listed, entry)
            if sub is None or (sub.status, sub.public, sub.private) == (
                    entry.get("status"), entry.get("public"), entry.get("private")):
                continue
            entry.update(status=sub.status, public=sub.public, private=sub.private, error=sub.error,
                         ref=sub.ref or entry.get("ref"), recorded=_stamp())
            changed = True
            said = {"COMPLETE": f"public {sub.public}, private {sub.private}",
                    "ERROR": f"Kaggle could not score it: {sub.error}"}.get(sub.status, "waiting to be scored")
            say(f"{model}: {sub.status.lower()}, {said}")
        if changed:
            store(folder, report, board)
        pending = [m for m, e in ours.items() if e.get("status") == "PENDING"]
        waited = time.monotonic() - started
        if not pending:
            return board
        if waited + pause > timeout:
            say(f"still pending after {waited:.0f} s: {', '.join(pending)}; their refs are kept, "
                f"read the scores later with: python -m stacking.leaderboard {folder} --fetch")
            return board
        say(f"waiting for Kaggle to score {', '.join(pending)} ({waited:.0f} s of {timeout:.0f} s)")
        time.sleep(pause)
        pause = min(pause * 1.5, POLL_MAX)


def _match(listed, entry: dict):
    """The listed submission that is this entry's: by ref, else by the description we gave it."""
    for s in listed:
        if (entry.get("ref") and s.ref == entry["ref"]) or (
                not entry.get("ref") and entry.get("description") and s.description == entry["description"]):
            return s
    return None


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
    parser.add_argument("--submit", metavar="MODEL[,MODEL...]|all",
                        help="submit these models' files to Kaggle, wait for the scores, record them "
                             "(needs pip install 'gapstack[kaggle]' and Kaggle credentials)")
    parser.add_argument("--fetch", action="store_true",
                        help="read the scores of this run's earlier submissions again")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds to wait for Kaggle's scores (default: {TIMEOUT} with --submit, "
                             "0 with --fetch: one look)")
    parser.add_argument("--poll", type=float, default=POLL,
                        help=f"seconds between the first two looks at Kaggle's list; each pause is "
                             f"1.5 times the last, up to {POLL_MAX:.0f} (default: %(default)s)")
    parser.add_argument("--competition", default=KAGGLE_COMPETITION.name, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        asked = [flag for flag, on in (("--record", args.record), ("--submit", args.submit),
                                       ("--fetch", args.fetch)) if on]
        if len(asked) > 1:
            raise LeaderboardError(f"{' and '.join(asked)}: one at a time")
        if asked and len(args.runs) != 1:
            raise LeaderboardError(f"{asked[0]} takes exactly one run folder (the one the files came from)")
        if args.record:
            record(args.runs[0], args.record)
            print(f"recorded {len(args.record)} score(s) in {Path(args.runs[0]) / LEADERBOARD}; "
                  f"report: {Path(args.runs[0]) / 'report.md'}")
        elif args.submit is not None:
            submit(args.runs[0], args.submit, args.competition,
                   TIMEOUT if args.timeout is None else args.timeout, args.poll)
        elif args.fetch:
            fetch(args.runs[0], args.competition, args.timeout or 0, args.poll)
        print(markdown(table(args.runs)))
    except (LeaderboardError, KaggleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
