"""stacking.leaderboard --submit / --fetch: the real ``kaggle`` client (no patching) against a
local stand-in of Kaggle's competition endpoints, through the command a user types."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import unavailable
from tests.kaggle_standin import TOKEN, StandIn, expected_scores

REPO = Path(__file__).resolve().parent.parent
LABELS = {i: int(i % 3 == 0) for i in range(1, 13)}  # the stand-in's answers for the 12 test ids


def port_80_free() -> bool:
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 80))
        return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _port_80():
    if not port_80_free():
        unavailable("the kaggle client's LOCALHOST environment is http://localhost (port 80): "
                    "needs root and a free port 80")


def leaderboard(run: Path, home: Path, *args, **env) -> subprocess.CompletedProcess:
    """python -m stacking.leaderboard as a user runs it, with Kaggle at the stand-in."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    clean.update(HOME=str(home), KAGGLE_API_ENVIRONMENT="LOCALHOST", PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "stacking.leaderboard", str(run), *args, "--poll", "0.2"],
                          capture_output=True, text=True, timeout=300, env=clean, cwd=REPO)


def board(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "leaderboard.csv").set_index("model")


def test_submit_wait_record_resubmit_error_and_limit(runs, tmp_path):
    run = Path(shutil.copytree(runs / "a", tmp_path / "a"))
    home = tmp_path / "home"
    home.mkdir()
    report_before = (run / "report.md").read_bytes()

    # No credentials: one sentence, nothing sent, nothing written.
    out = leaderboard(run, home, "--submit", "stack-lr")
    assert out.returncode == 2 and "no usable Kaggle credentials: set KAGGLE_API_TOKEN" in out.stderr
    assert "Traceback" not in out.stderr and not (run / "leaderboard.csv").exists()
    # No network (legacy key, nobody at http://localhost): said, nothing written.
    out = leaderboard(run, home, "--submit", "stack-lr", KAGGLE_USERNAME="tester", KAGGLE_KEY="k")
    assert out.returncode == 2 and "cannot reach Kaggle to take stack-lr.csv (no network?)" in out.stderr
    assert not (run / "leaderboard.csv").exists() and (run / "report.md").read_bytes() == report_before

    with StandIn(LABELS, daily_limit=3) as kaggle:
        # Two models: submitted, pending once, then scored and recorded.
        out = leaderboard(run, home, "--submit", "stack-lr,concat-fusion", KAGGLE_API_TOKEN=TOKEN)
        assert out.returncode == 0, out.stderr
        assert "waiting for Kaggle to score" in out.stdout and "stack-lr: complete" in out.stdout
        b = board(run)
        for model in ("stack-lr", "concat-fusion"):
            sent = (run / "submissions" / f"{model}.csv").read_bytes()
            sub = next(s for s in kaggle.submissions if model in s["description"])
            assert kaggle.uploads[sub["token"]] == sent  # the file itself went up
            public, private = expected_scores(sent, LABELS)
            assert b.loc[model, "status"] == "COMPLETE" and b.loc[model, "ref"] == sub["ref"]
            assert (b.loc[model, "public"], b.loc[model, "private"]) == pytest.approx((public, private))
        report = json.loads((run / "report.json").read_text())
        assert report["leaderboard"]["stack-lr"]["public"] == pytest.approx(b.loc["stack-lr", "public"])
        assert f"| {b.loc['stack-lr', 'public']:.5f} |" in (run / "report.md").read_text()
        assert (run / "cv_vs_leaderboard.png").is_file()

        # Again, plus a damaged file: the two are not sent twice; Kaggle's error is recorded.
        damaged = run / "submissions" / "average.csv"
        damaged.write_text("".join(damaged.read_text().splitlines(keepends=True)[:7]))
        out = leaderboard(run, home, "--submit", "stack-lr,concat-fusion,average", KAGGLE_API_TOKEN=TOKEN)
        assert out.returncode == 0, out.stderr
        assert "stack-lr: this file was submitted already" in out.stdout
        assert len(kaggle.submissions) == 3
        b = board(run)
        assert b.loc["average", "status"] == "ERROR" and "Submission must have 12 rows" in b.loc["average", "error"]
        assert "| average | " in (run / "report.md").read_text() and "| error |" in (run / "report.md").read_text()

        # The daily limit: Kaggle's words, the record as it was.
        before = (run / "leaderboard.csv").read_bytes()
        out = leaderboard(run, home, "--submit", "stack-lgbm", KAGGLE_API_TOKEN=TOKEN)
        assert out.returncode == 2
        assert "Kaggle refused to take stack-lgbm.csv: Your team has used its daily Submission" in out.stderr
        assert (run / "leaderboard.csv").read_bytes() == before

        # A timeout leaves it pending with its ref; --fetch reads the score later.
        kaggle.daily_limit = 4
        out = leaderboard(run, home, "--submit", "stack-lgbm", "--timeout", "0", KAGGLE_API_TOKEN=TOKEN)
        assert out.returncode == 0 and "still pending after" in out.stdout and "--fetch" in out.stdout
        assert board(run).loc["stack-lgbm", "status"] == "PENDING"
        out = leaderboard(run, home, "--fetch", KAGGLE_API_TOKEN=TOKEN)
        assert out.returncode == 0, out.stderr
        b = board(run)
        public, _ = expected_scores((run / "submissions" / "stack-lgbm.csv").read_bytes(), LABELS)
        assert b.loc["stack-lgbm", "status"] == "COMPLETE" and b.loc["stack-lgbm", "public"] == pytest.approx(public)
        assert len(kaggle.submissions) == 4
