"""stacking.run end to end on real photos, and the saved ensemble behind stacking.predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from features.data import Photo
from stacking import run as run_mod
from stacking.predict import Predictor
from stacking.score import score_files
from stacking.submission import CLIP
from tests.conftest import BACKBONES, make_kaggle_dir

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
    assert {"efficientnet_lite0__logistic", "efficientnet_lite2__logistic",
            "efficientnet_lite2__imagenet", "concat-fusion", "average", "stack-lr", "stack-lgbm"} <= names
    for f in oof_files:
        oof = pd.read_csv(f, dtype={"id": str})
        assert oof["id"].tolist() == folds_a["id"].tolist()
        assert oof["fold"].tolist() == folds_a["fold"].tolist(), f.name


def test_report_compares_every_model(runs):
    report = json.loads((runs / "a" / "report.json").read_text())
    assert set(report["cv"]) == set(report["holdout"])
    assert len(report["cv"]) == 7
    for name in ("efficientnet_lite0/logistic", "efficientnet_lite2/logistic",
                 "efficientnet_lite2/imagenet", "stack-lr", "average"):
        assert 0 < report["cv"][name]["log_loss"] < 0.3 and report["cv"][name]["accuracy"] > 0.8
    # 48 rows are too few for LightGBM's leaves of 40: it may stay at the prior, never worse.
    assert report["cv"]["stack-lgbm"]["log_loss"] <= np.log(2) + 1e-6
    md = (runs / "a" / "report.md").read_text()
    assert all(f"| {name}" in md for name in report["cv"])
    assert (runs / "a" / "logloss.png").stat().st_size > 10_000
    assert report["submit_with"] == min(report["cv"], key=lambda m: min(
        report["cv"][m]["log_loss"], report["cv"][m]["log_loss_clipped"]))


def test_imagenet_prior_reported_and_left_out_on_request(runs, tmp_path):
    """Run a has Lite2's ImageNet prior and says what it adds; --no-imagenet on the same cache and
    folds leaves it out, and its stackers are exactly run a's "without" figures."""
    report = json.loads((runs / "a" / "report.json").read_text())
    effect = report["imagenet_prior"]
    assert effect["models"] == ["efficientnet_lite2/imagenet"]
    saved = pd.read_csv(runs / "a" / "oof" / "stack-lr.csv")  # "with": the stacker as saved
    assert effect["stackers"]["stack-lr"]["with"]["log_loss"] == pytest.approx(
        log_loss(saved["label"], saved["pred"]), abs=1e-9)
    assert "What the ImageNet prior adds" in (runs / "a" / "report.md").read_text()
    args = ["--data", str(runs / "data"), "--backbones", BACKBONES, "--folds", "3", "--holdout", "0.2",
            "--cache", str(runs / "cache"), "--out", str(tmp_path / "none"), "--no-imagenet",
            "--finetune", "none"]  # as run a, made as on a CPU
    assert run_mod.main(args) == 0
    none = json.loads((tmp_path / "none" / "report.json").read_text())
    assert "efficientnet_lite2/imagenet" not in none["cv"] and none["imagenet_prior"] is None
    for name in ("stack-lr", "average"):
        assert none["cv"][name]["log_loss"] == pytest.approx(
            effect["stackers"][name]["without"]["log_loss"], abs=1e-9), name
    assert none["cv"]["efficientnet_lite2/logistic"] == report["cv"]["efficientnet_lite2/logistic"]


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


@pytest.mark.parametrize("extra,message", [
    (["--submit-with", "nope"], "Unknown model 'nope' for --submit-with; this run will have: "
                                "efficientnet_lite0/logistic, efficientnet_lite2/logistic, "
                                "efficientnet_lite2/imagenet, efficientnet_lite0/finetuned, "
                                "efficientnet_lite2/finetuned, concat-fusion, average, stack-lr, stack-lgbm"),
    # (the tops of both: fine-tuned by default on a CPU)
    (["--submit-with", "efficientnet_lite0/imagenet"], "Unknown model 'efficientnet_lite0/imagenet'"),
    (["--backbones", "resnet5"], "Unknown backbone 'resnet5'"),
    (["--backbones", ""], "--backbones names no backbone; e.g. --backbones efficientnet_lite0,"),
    (["--heads", "logistic,svm"], "Unknown head 'svm'"),
    (["--finetune", "efficientnet_lite9"], "Unknown backbone 'efficientnet_lite9'"),
    (["--finetune", "efficientnet_lite0", "--finetune-epochs", "0"],
     "--finetune-epochs 0: fine-tuning needs at least one epoch"),
    (["--finetune", "efficientnet_lite0", "--exclude", "OUTLIERS"], "--finetune and --exclude do not combine"),
    (["--exclude", "missing.csv"], "--exclude missing.csv: no such file"),
    (["--folds", "1"], "--folds 1: out-of-fold predictions need at least 2 folds"),
    (["--folds", "40"], "cat (30), dog (30): fewer training photos than the 40 folds"),
    (["--out", "FILE/run"], "--out FILE/run: cannot write there (Not a directory)"),
])
def test_run_errors_are_said_before_any_extraction(runs, tmp_path, capsys, monkeypatch, extra, message):
    """Each mistake gets one sentence naming it, before a photo is read: the fresh cache folder
    is never made. (The models listed are a CPU run's, whatever this machine has.)"""
    monkeypatch.setattr(run_mod, "has_gpu", lambda: False)
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "outliers.csv").write_text("id,drop\ncat.3,1\n")
    extra = [{"OUTLIERS": str(tmp_path / "outliers.csv"), "FILE/run": str(tmp_path / "FILE/run")}.get(e, e)
             for e in extra]
    args = ["--data", str(runs / "data"), "--backbones", BACKBONES, "--folds", "3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "e")]
    assert run_mod.main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message.replace("FILE/run", str(tmp_path / "FILE/run")) in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_one_class_is_refused_before_extraction(tmp_path, capsys):
    """Training photos of one class only: said in one sentence naming the folder, no photo decoded."""
    data = make_kaggle_dir(tmp_path / "data", 4, 2)
    for dog in (data / "train").glob("dog.*"):
        dog.unlink()
    assert run_mod.main(["--data", str(data), "--backbones", "efficientnet_lite0", "--folds", "2",
                         "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{data}: the training photos are all of one class (cat)" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_kernel_says_a_misspelt_backbone_first(tmp_path, capsys):
    from stacking.kaggle import kaggle_main

    assert kaggle_main(["--backbones", "resnet50,xceptoin", "--out", str(tmp_path / "out")]) == 2
    assert "Unknown backbone 'xceptoin'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_exclusion_is_compared_on_the_same_kept_rows(runs):
    report = json.loads((runs / "c" / "report.json").read_text())
    ex = report["exclusion"]
    assert ex["n_excluded"] == 2
    oof = pd.read_csv(runs / "c" / "oof" / "stack-lr.csv", dtype={"id": str})
    assert not {"cat.3", "dog.7"} & set(oof["id"]) and "dog.8" in set(oof["id"])
    folds_all = pd.read_csv(runs / "a" / "folds.csv", dtype={"id": str}).set_index("id")
    assert (oof.set_index("id")["fold"] == folds_all.loc[oof["id"], "fold"]).all()  # same folds
    stack = ex["models"]["stack-lr"]
    assert stack["kept_rows"]["with"]["n"] == stack["kept_rows"]["without"]["n"] == len(oof)
    # "with" is run a (same photos, same folds, nothing excluded), computed here from its files.
    with_all = pd.read_csv(runs / "a" / "oof" / "stack-lr.csv", dtype={"id": str}).set_index("id")
    kept = with_all.loc[oof["id"]]
    assert stack["kept_rows"]["with"]["log_loss"] == pytest.approx(log_loss(kept["label"], kept["pred"]), abs=1e-9)
    assert stack["all_rows"]["with"]["log_loss"] == pytest.approx(
        log_loss(with_all["label"], with_all["pred"]), abs=1e-9)
    assert stack["kept_rows"]["without"]["log_loss"] == pytest.approx(log_loss(oof["label"], oof["pred"]), abs=1e-9)
    # All rows: the excluded photos count too, predicted as the test set is by the models that
    # never trained on them (the fold mean, as run c predicts its test set).
    assert stack["all_rows"]["with"]["n"] == stack["all_rows"]["without"]["n"] == len(oof) + 2
    from stacking.predict import Predictor

    data = runs / "data" / "train"
    excluded = [Photo(i, int(i.startswith("dog")), str(data / f"{i}.jpg")) for i in ("cat.3", "dog.7")]
    p_ex, _ = Predictor(runs / "c" / "model").predict_all(excluded)
    y_all = np.r_[oof["label"].to_numpy(), [0, 1]]
    p_all = np.r_[oof["pred"].to_numpy(), p_ex["stack-lr"]]
    from stacking.submission import scores

    assert stack["all_rows"]["without"]["log_loss"] == pytest.approx(scores(y_all, p_all)["log_loss"], abs=1e-6)
    md = (runs / "c" / "report.md").read_text()
    assert "Without the 2 photos excluded" in md and "| model | all rows: with | all rows: without" in md
    assert "Leaving them out" in md


def test_every_model_has_a_kaggle_ready_submission(runs):
    """submissions/<model>.csv: every test id once, in order, equal to the run's test predictions of
    that model after its own clip rule (auto: where clipping lowers its CV; --clip on: always)."""
    from oof.store import prediction_path

    for name, forced in (("a", None), ("b", True)):
        run = runs / name
        report = json.loads((run / "report.json").read_text())
        files = sorted((run / "submissions").glob("*.csv"))
        assert {f.name for f in files} == {prediction_path(".", m).name for m in report["cv"]}
        for model, s in report["cv"].items():
            sub = pd.read_csv(prediction_path(run / "submissions", model))
            assert list(sub.columns) == ["id", "label"] and sub["id"].tolist() == list(range(1, 13))
            pred = pd.read_csv(prediction_path(run / "test", model)).sort_values("id")["pred"].to_numpy()
            clipped = forced if forced is not None else s["log_loss_clipped"] < s["log_loss"]
            expected = np.clip(pred, *CLIP) if clipped else pred
            np.testing.assert_allclose(sub["label"].to_numpy(), expected, rtol=0, atol=1e-12)
            assert report["submissions"][model]["clipped"] == clipped
        chosen = pd.read_csv(prediction_path(run / "submissions", report["submit_with"]))
        assert chosen.equals(pd.read_csv(run / "submission.csv"))
        md = (run / "report.md").read_text()
        assert f"kaggle competitions submit -c dogs-vs-cats-redux-kernels-edition -f {run}/submissions/" in md


def _copy_run(runs, name, tmp_path):
    return Path(shutil.copytree(runs / name, tmp_path / name))


def test_leaderboard_scores_go_into_the_report(runs, tmp_path, capsys):
    from stacking import leaderboard

    a, b = _copy_run(runs, "a", tmp_path), _copy_run(runs, "b", tmp_path)
    assert leaderboard.main([str(a), "--record", "stack-lr=0.0412,0.0398",
                             "--record", "concat-fusion=0.0512"]) == 0
    assert leaderboard.main([str(a), "--record", "stack-lr=0.0405"]) == 0  # newer replaces older
    board = pd.read_csv(a / "leaderboard.csv").set_index("model")
    assert board.loc["stack-lr", "public"] == 0.0405 and np.isnan(board.loc["stack-lr", "private"])
    assert board.loc["concat-fusion", "public"] == 0.0512
    report = json.loads((a / "report.json").read_text())
    assert {k: report["leaderboard"]["stack-lr"][k] for k in ("public", "private")} == {
        "public": 0.0405, "private": None}
    assert report["cv"] == json.loads((runs / "a" / "report.json").read_text())["cv"]
    md = (a / "report.md").read_text()
    assert "public LB | private LB |" in md and "| 0.04050 |" in md and "| 0.05120 |" in md
    assert (a / "cv_vs_leaderboard.png").stat().st_size > 10_000
    capsys.readouterr()
    assert leaderboard.main([str(a), str(b)]) == 0  # one table across runs
    out = capsys.readouterr().out
    assert "| a | stack-lr" in out and "| b | stack-lr" in out and "0.04050" in out
    assert "| a | concat-fusion" in out and "0.05120" in out


@pytest.mark.parametrize("args,message", [
    (["--record", "stack-xx=0.04"], "the run has no model 'stack-xx'; its models: "),
    (["--record", "stack-lr=abc"], "'abc' is not a number"),
    (["--record", "stack-lr"], "expected MODEL=PUBLIC[,PRIVATE]"),
    (["--record", "stack-lr=0.04", "--record", "average=-1"], "a log loss is a finite number >= 0"),
])
def test_leaderboard_bad_records_change_nothing(runs, tmp_path, capsys, args, message):
    from stacking import leaderboard

    a = _copy_run(runs, "a", tmp_path)
    before = {f: (a / f).read_bytes() for f in ("report.md", "report.json")}
    assert leaderboard.main([str(a), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (a / "leaderboard.csv").exists()
    assert {f: (a / f).read_bytes() for f in before} == before


def test_leaderboard_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from stacking import leaderboard

    assert leaderboard.main([str(tmp_path), "--record", "stack-lr=0.04"]) == 2
    assert f"{tmp_path}: not a gapstack run (no report.json)" in capsys.readouterr().err
    assert not (tmp_path / "leaderboard.csv").exists()


def test_leaderboard_refuses_what_it_cannot_use_and_writes_nothing(runs, tmp_path, capsys):
    """A file for a run folder, a run copied without oof/, an empty or damaged leaderboard.csv:
    one sentence each, no traceback, no file touched."""
    from stacking import leaderboard

    a = _copy_run(runs, "a", tmp_path)
    assert leaderboard.main([str(a / "report.md"), "--record", "stack-lr=0.04"]) == 2
    assert f"{a / 'report.md'}: a file, not a run folder" in capsys.readouterr().err
    no_oof = _copy_run(runs, "b", tmp_path)
    shutil.rmtree(no_oof / "oof")
    before = (no_oof / "report.md").read_bytes()
    assert leaderboard.main([str(no_oof), "--record", "stack-lr=0.04"]) == 2
    assert f"{no_oof / 'oof'}: no out-of-fold predictions of " in capsys.readouterr().err
    assert not (no_oof / "leaderboard.csv").exists() and (no_oof / "report.md").read_bytes() == before
    for damaged, says in (("", "unreadable"), ('model,public,private\n"stack-lr,0.04\n', "unreadable"),
                          ("name,score\nstack-lr,0.04\n", "not a leaderboard record"),
                          ("model,public,private\nstack-lr,abc,\n", "score 'abc' of stack-lr is not a number")):
        (a / "leaderboard.csv").write_text(damaged)
        before = (a / "report.md").read_bytes()
        for args in (["--record", "average=0.05"], []):
            assert leaderboard.main([str(a), *args]) == 2
            err = capsys.readouterr().err
            assert f"{a / 'leaderboard.csv'}: {says}" in err and "Traceback" not in err, err
        assert (a / "leaderboard.csv").read_text() == damaged and (a / "report.md").read_bytes() == before


def test_leaderboard_submit_refuses_unknown_models_before_asking_kaggle(runs, tmp_path, capsys):
    from stacking import leaderboard

    a = _copy_run(runs, "a", tmp_path)
    assert leaderboard.main([str(a), "--submit", "stack-lr,stack-xx"]) == 2
    assert "--submit: the run has no model 'stack-xx'; its models: " in capsys.readouterr().err
    assert leaderboard.main([str(a), "--submit", "stack-lr", "--record", "stack-lr=0.04"]) == 2
    assert "--record and --submit: one at a time" in capsys.readouterr().err
    assert not (a / "leaderboard.csv").exists()


def test_decode_once_gives_the_same_run(runs, tmp_path):
    """--decode-once (each photo decoded once for all backbones) makes the same features, so every
    model's CV is the same as run a's."""
    args = ["--data", str(runs / "data"), "--backbones", BACKBONES, "--folds", "3", "--holdout", "0.2",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "once"), "--decode-once",
            "--finetune", "none"]  # as run a, made as on a CPU
    assert run_mod.main(args) == 0
    once = json.loads((tmp_path / "once" / "report.json").read_text())["cv"]
    a = json.loads((runs / "a" / "report.json").read_text())["cv"]
    assert once.keys() == a.keys()
    for model in a:
        assert once[model]["log_loss"] == pytest.approx(a[model]["log_loss"], abs=1e-6), model
    from features.cache import read_attrs

    [made] = (tmp_path / "cache").glob("*/gap_efficientnet_lite0.h5")
    attrs = read_attrs(made)
    assert attrs["last_run"]["decoded_once_with"] == BACKBONES.split(",")
