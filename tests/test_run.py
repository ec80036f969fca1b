"""stacking.run end to end on real photos, and the saved ensemble behind stacking.predict."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from features.data import Photo
from stacking import run as run_mod
from stacking.predict import Predictor
from stacking.score import score_files
from stacking.submission import CLIP
from tests.conftest import BACKBONES

def test_submission_has_every_test_id_once_in_order(runs):
    for name in ("a", "b"):
        sub = pd.read_csv(runs / name / "submission.csv")
        assert list(sub.columns) == ["id", "label"]
        assert sub["id"].tolist() == list(range(1, 13))
        assert sub["label"].between(0, 1).all()
    clipped = pd.read_csv(runs / "b" / "submission.csv")["label"]
    assert clipped.min() >= CLIP[0] and clipped.max() <= CLIP[1]
    assert json.loads((runs / "b" / "report.json").read_text())["clip"] == list(CLIP)


def test_folds_identical_across_levels_and_runs(runs):
    folds_a = pd.read_csv(runs / "a" / "folds.csv", dtype={"id": str})
    folds_b = pd.read_csv(runs / "b" / "folds.csv", dtype={"id": str})
    assert folds_a.equals(folds_b)
    oof_files = sorted((runs / "a" / "oof").glob("*.csv"))
    names = {f.stem for f in oof_files}
    assert {"efficientnet_lite0__logistic", "efficientnet_lite1__logistic", "concat-fusion",
            "average", "stack-lr", "stack-lgbm"} <= names
    for f in oof_files:
        oof = pd.read_csv(f, dtype={"id": str})
        assert oof["id"].tolist() == folds_a["id"].tolist()
        assert oof["fold"].tolist() == folds_a["fold"].tolist(), f.name


def test_report_compares_every_model(runs):
    report = json.loads((runs / "a" / "report.json").read_text())
    assert set(report["cv"]) == set(report["holdout"])
    assert len(report["cv"]) == 6
    for name in ("efficientnet_lite0/logistic", "efficientnet_lite1/logistic", "stack-lr", "average"):
        assert 0 < report["cv"][name]["log_loss"] < 0.3 and report["cv"][name]["accuracy"] > 0.8
    # 48 rows are too few for LightGBM's leaves of 40: it may stay at the prior, never worse.
    assert report["cv"]["stack-lgbm"]["log_loss"] <= np.log(2) + 1e-6
    md = (runs / "a" / "report.md").read_text()
    assert all(f"| {name}" in md for name in report["cv"])
    assert (runs / "a" / "logloss.png").stat().st_size > 10_000
    assert report["submit_with"] == min(report["cv"], key=lambda m: min(
        report["cv"][m]["log_loss"], report["cv"][m]["log_loss_clipped"]))


def test_saved_model_reproduces_the_test_predictions(runs):
    predictor = Predictor(runs / "a" / "model")
    data = runs / "data" / "test"
    photos = [Photo(str(i), -1, str(data / f"{i}.jpg")) for i in range(1, 13)]
    p, reasons = predictor.predict_photos(photos)
    assert not any(reasons)
    sub = pd.read_csv(runs / "a" / "submission.csv")
    np.testing.assert_allclose(p, sub["label"].to_numpy(), atol=1e-5)


def test_predict_command_and_unreadable_photo(runs, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    photo = runs / "data" / "test" / "3.jpg"
    out = subprocess.run([sys.executable, "-m", "stacking.predict", "--model", str(runs / "a" / "model"),
                          str(photo), str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    p = float(lines[0].split("\t")[1])
    sub = pd.read_csv(runs / "a" / "submission.csv").set_index("id")
    assert abs(p - sub.loc[3, "label"]) < 1e-5
    assert lines[1].startswith(f"{bad}\terror: not an image")


def test_score_matches_the_report(runs, tmp_path):
    held = pd.read_csv(runs / "a" / "holdout.csv", dtype={"id": str})
    report = json.loads((runs / "a" / "report.json").read_text())
    held[["id", "stack-lr"]].rename(columns={"stack-lr": "label"}).to_csv(tmp_path / "sub.csv", index=False)
    s = score_files(tmp_path / "sub.csv", runs / "a" / "holdout.csv")
    assert s["log_loss"] == pytest.approx(report["holdout"]["stack-lr"]["log_loss"], rel=1e-9)
    assert s["missing"] == 0


def test_run_errors_are_clear(runs, capsys):
    args = ["--data", str(runs / "data"), "--backbones", BACKBONES, "--folds", "3",
            "--cache", str(runs / "cache"), "--out", str(runs / "e")]
    assert run_mod.main([*args, "--submit-with", "nope"]) == 2
    assert "Unknown model 'nope' for --submit-with; available:" in capsys.readouterr().err
    assert run_mod.main([*args[:2], "--backbones", "resnet5", "--out", str(runs / "d")]) == 2
    assert "Unknown backbone 'resnet5'" in capsys.readouterr().err


def test_exclusion_is_compared_on_the_same_kept_rows(runs):
    report = json.loads((runs / "c" / "report.json").read_text())
    ex = report["exclusion"]
    assert ex["n_excluded"] == 2
    oof = pd.read_csv(runs / "c" / "oof" / "stack-lr.csv", dtype={"id": str})
    assert not {"cat.3", "dog.7"} & set(oof["id"]) and "dog.8" in set(oof["id"])
    folds_all = pd.read_csv(runs / "a" / "folds.csv", dtype={"id": str}).set_index("id")
    assert (oof.set_index("id")["fold"] == folds_all.loc[oof["id"], "fold"]).all()  # same folds
    kept = ex["cv_with_excluded_rows"]["stack-lr"]
    assert kept["n"] == report["cv"]["stack-lr"]["n"] == len(oof)
    assert "Without the 2 photos excluded" in (runs / "c" / "report.md").read_text()
