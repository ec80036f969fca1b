"""stacking.run on other tasks, end to end on real photos: K = 3 clothing classes in class folders,
and a two-class labels CSV with a sample submission (Kaggle's Aerial Cactus shape) built from Dogs
vs. Cats. Every level, the multi-class log loss, the submission's format and order, the report."""

import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from stacking.run import main as run_main
from tests.conftest import BACKBONES, PHOTOS, make_class_dir

CLASSES = ("hat", "shoes", "skirt")


@pytest.fixture(scope="session")
def three_classes(tmp_path_factory):
    """A run on 3 clothing classes (10 + 2 validation photos each) with 6 test photos, Lite0
    fine-tuned too (one epoch a fold: a K-way softmax head)."""
    from stacking import run as run_mod

    root = tmp_path_factory.mktemp("k3")
    data = make_class_dir(root / "data", {c: 10 for c in CLASSES}, n_test=6, validation=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "has_gpu", lambda: False)
        assert run_main(["--data", str(data), "--backbones", BACKBONES, "--folds", "2",
                         "--cache", str(root / "cache"), "--out", str(root / "out"),
                         "--finetune", "efficientnet_lite0", "--finetune-epochs", "1"]) == 0
    return root


def test_every_level_gives_k_probabilities(three_classes):
    out = three_classes / "out"
    report = pd.read_json(out / "report.json", typ="series")
    assert report["classes"] == list(CLASSES)
    models = list(report["cv"])
    assert {"efficientnet_lite0/logistic", "efficientnet_lite2/logistic", "efficientnet_lite0/finetuned",
            "concat-fusion", "average", "stack-lr", "stack-lgbm"} <= set(models)
    assert not any(m.endswith("/imagenet") for m in models)  # the cat-or-dog prior is for cats and dogs
    folds = pd.read_csv(out / "folds.csv")
    for name in models:
        oof = pd.read_csv(out / "oof" / f"{name.replace('/', '__')}.csv")
        p = oof[[f"pred:{c}" for c in CLASSES]].to_numpy()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        assert (oof["fold"].to_numpy() == folds["fold"].to_numpy()).all()
        y = oof["label"].to_numpy()
        # the report's figures are the multi-class log loss and accuracy of these very rows
        assert report["cv"][name]["log_loss"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]), abs=1e-9)
        assert report["cv"][name]["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
        assert report["cv"][name]["n"] == 36  # validation/ pooled into training
    # Clothes apart from each other are easy: the stackers beat chance (log 3 = 1.10) by far.
    assert report["cv"]["stack-lr"]["log_loss"] < 0.5 and report["cv"]["stack-lr"]["accuracy"] > 0.8


def test_submission_has_a_column_per_class(three_classes):
    out = three_classes / "out"
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["id", *CLASSES]
    assert sub["id"].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(sub[list(CLASSES)].sum(axis=1), 1.0, atol=1e-6)
    # test photo k is of class k % 3 (make_class_dir): the submission gets them right
    assert (sub[list(CLASSES)].to_numpy().argmax(axis=1) == np.arange(6) % 3).mean() >= 5 / 6
    for name in ("stack-lr", "concat-fusion", "efficientnet_lite2/logistic"):
        assert list(pd.read_csv(out / "submissions" / f"{name.replace('/', '__')}.csv").columns) == ["id", *CLASSES]


def test_report_has_recall_and_confusion(three_classes):
    out = three_classes / "out"
    text = (out / "report.md").read_text()
    assert "Task: class folders: 3 classes (hat, shoes, skirt" in text
    assert "## Per-class recall (out of fold)" in text and "| skirt | 12 |" in text
    assert (out / "confusion.png").stat().st_size > 10_000 and "confusion.png" in text


def test_predict_prints_the_class_and_every_probability(three_classes, capsys):
    from stacking.predict import main as predict_main

    photo = three_classes / "data" / "test" / "2.jpg"  # a shoe (class 1 of 3)
    assert predict_main(["--model", str(three_classes / "out" / "model"), str(photo)]) == 0
    path, top, probs = capsys.readouterr().out.strip().split("\t")
    assert path == str(photo) and top == "shoes"
    shown = dict(part.rsplit(" ", 1) for part in probs.split(", "))
    assert set(shown) == set(CLASSES) and sum(map(float, shown.values())) == pytest.approx(1, abs=1e-5)
    sub = pd.read_csv(three_classes / "out" / "submission.csv").set_index("id")
    assert float(shown["shoes"]) == pytest.approx(sub.loc[2, "shoes"], abs=1e-5)


def test_binary_labels_csv_follows_the_sample_submission(tmp_path):
    """A two-class CSV task (``id,has_dog`` with 0/1 labels): the submission is the sample's
    columns, in the sample's row order, and its numbers are P(label 1)."""
    from stacking import run as run_mod

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    rows = []
    for k, cls in enumerate(["cat", "dog"] * 10):
        shutil.copy(PHOTOS / "train" / f"{cls}.{k}.jpg", data / "train" / f"p{k:02d}.jpg")
        rows.append({"id": f"p{k:02d}.jpg", "has_dog": int(cls == "dog")})
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)
    names = [f"t{k}.jpg" for k in range(4)]
    for name, i in zip(names, (1, 2, 3, 4)):
        shutil.copy(PHOTOS / "test" / f"{i}.jpg", data / "test" / name)
    pd.DataFrame({"id": names[::-1], "has_dog": 0.5}).to_csv(data / "sample_submission.csv", index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "has_gpu", lambda: False)
        assert run_main(["--data", str(data), "--backbones", "efficientnet_lite0", "--folds", "2",
                         "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-concat"]) == 0
    sub = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert list(sub.columns) == ["id", "has_dog"] and sub["id"].tolist() == names[::-1]
    report = pd.read_json(tmp_path / "out" / "report.json", typ="series")
    assert report["classes"] == ["0", "1"] and report["submit_with"] == "efficientnet_lite0/logistic"
    expected = pd.read_csv(tmp_path / "out" / "test" / "efficientnet_lite0__logistic.csv").set_index("id")
    expected = expected.loc[sub["id"], "pred"].to_numpy()
    np.testing.assert_allclose(sub["has_dog"], expected if report["clip"] is None else np.clip(expected, *report["clip"]),
                               atol=1e-9)


def test_logistic_head_fits_classes_of_two_photos_and_one(real_features):
    """C by inner CV needs a photo of every class in each inner fold: with 2 photos of a class it
    uses 2 folds, with 1 it takes the middle C instead of failing (a small class in a 2-fold run)."""
    from oof.heads import LogisticHead

    X, labels = real_features.train, real_features.label
    cats, dogs = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    for n_dogs, expected_C in ((2, None), (1, 0.03)):
        rows = np.r_[cats[:20], dogs[:n_dogs]]
        head = LogisticHead().fit(X[rows], labels[rows])
        assert head.C_ in LogisticHead().Cs and (expected_C is None or head.C_ == expected_C)
        p = head.predict_proba(X[rows])[:, 1]  # it learnt which way the classes lie
        assert p[20:].min() > p[:20].max()


def test_page_and_export_refuse_a_k_class_model_in_one_sentence(three_classes, capsys):
    """The CAM page and the mobile export output one P(class 1): a 3-class model is refused by
    name (nothing served, nothing written), pointing at stacking.predict."""
    from stacking.export import main as export_main
    from stacking.serve import main as serve_main

    model = str(three_classes / "out" / "model")
    assert serve_main(["--model", model]) == 2
    assert export_main(["--model", model, "--format", "onnx", "--out", str(three_classes / "x.onnx")]) == 2
    err = capsys.readouterr().err
    for what in ("The class activation map", "The mobile export"):
        assert f"{what} handles two-class models in this version; this one has 3 classes" in err
    assert not (three_classes / "x.onnx").exists()
