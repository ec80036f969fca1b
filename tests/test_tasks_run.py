"""stacking.run on other tasks, end to end on real photos: K = 3 clothing classes in class folders,
and a two-class labels CSV with a sample submission (Kaggle's Aerial Cactus shape) built from Dogs
vs. Cats. Every level, the multi-class log loss, the submission's format and order, the report."""

import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from features.data import Photo
from stacking.ensemble import CONCAT
from stacking.run import main as run_main
from tests.conftest import BACKBONES, PHOTOS, make_class_dir

CLASSES = ("hat", "shoes", "skirt")


@pytest.fixture(scope="session")
def three_classes(tmp_path_factory):
    """A run on 3 clothing classes (10 + 2 validation photos each) with 6 test photos in class
    folders (a labelled test split), Lite0 fine-tuned too (one epoch a fold: a K-way softmax head)."""
    from stacking import run as run_mod

    root = tmp_path_factory.mktemp("k3")
    data = make_class_dir(root / "data", {c: 10 for c in CLASSES}, n_test=6, validation=2, labelled_test=True)
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


def test_labelled_test_split_is_scored_for_every_model(three_classes):
    """test/<class>/ photos are a labelled test split: ids stay the file names, and the report
    scores every model on them (sklearn's log loss of the model's submission file, unclipped)."""
    out = three_classes / "out"
    report = pd.read_json(out / "report.json", typ="series")
    assert set(report["test"]) == set(report["cv"]) and "labelled by their class folders" in report["task"]
    y = np.arange(6) % 3  # make_class_dir's test photo k is of class k % 3
    for name in ("stack-lr", "efficientnet_lite2/logistic"):
        p = pd.read_csv(out / "test" / f"{name.replace('/', '__')}.csv")[[f"pred:{c}" for c in CLASSES]]
        assert report["test"][name]["log_loss"] == pytest.approx(log_loss(y, p.to_numpy(), labels=[0, 1, 2]), abs=1e-9)
        assert report["test"][name]["n"] == 6
    assert "labelled test log loss" in (out / "report.md").read_text()


def test_report_has_recall_and_confusion(three_classes):
    out = three_classes / "out"
    text = (out / "report.md").read_text()
    assert "Task: class folders: 3 classes (hat, shoes, skirt" in text
    assert "## Per-class recall (out of fold)" in text and "| skirt | 12 |" in text
    assert (out / "confusion.png").stat().st_size > 10_000 and "confusion.png" in text


def test_predict_prints_the_class_and_every_probability(three_classes, capsys):
    from stacking.predict import main as predict_main

    photo = three_classes / "data" / "test" / "shoes" / "2.jpg"
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


@pytest.fixture(scope="module")
def k_service(three_classes):
    """The web page's service on the 3-class model (its predictor and CAM built once)."""
    from stacking.serve import Service

    return Service(three_classes / "out" / "model")


def test_class_map_is_exact_in_the_mean_and_to_first_order(k_service, three_classes):
    """The K-class CAM explains logit P(class): its mean is that logit from stacking.predict's path
    for every model and class; and the map's value at a position is the first-order change of
    the logit when the backbone's GAP moves to that position's features (checked against the
    ensemble's own predictions, GAP +- eps * (f_ij - GAP), for every backbone and fold network)."""
    from stacking.cam import class_logit

    predictor, ens, cam = k_service.predictor, k_service.ensemble, k_service.cam
    path = three_classes / "data" / "test" / "shoes" / "2.jpg"
    photo = Photo(path.name, -1, str(path))
    every, _ = predictor.predict_all([photo])
    for model in ens.model_names:
        for target in (None, "skirt"):
            e = cam.explain(photo, (120, 90), model=model, target=target)
            c = CLASSES.index(e.target)
            assert e.target == (target or CLASSES[int(np.argmax(every[model][0]))])
            assert e.logit_map.mean() == pytest.approx(class_logit(every[model][0], c), abs=1e-4), (model, target)
            assert e.logit_map.std() > 0.1, "a flat map explains nothing"
    fmaps = cam.feature_maps(photo)
    gaps = {n: f.mean(axis=(0, 1)) for n, f in fmaps.items()}
    eps = 0.02
    for n in fmaps:
        d = eps * (fmaps[n][1, 2] - gaps[n])
        two = {k: np.stack([g + d, g - d])[None] if k == n else np.broadcast_to(g, (1, 2, len(g)))
               for k, g in gaps.items()}
        moved = ens.predict_all({k: np.stack([g + d, g - d]) if k == n else np.stack([g, g])
                                 for k, g in gaps.items()})
        for model in ("efficientnet_lite0/logistic", CONCAT, "average", "stack-lr"):
            e = cam._explain_class(two, (1, 2), model, "shoes")
            change = [class_logit(row, 1) for row in moved[model]]
            assert (e.logit_map[0, 0] - e.logit_map[0, 1]) / 2 == pytest.approx(
                (change[0] - change[1]) / 2, abs=2e-3), (n, model)


def test_page_shows_the_top_classes_and_the_map_of_the_first(k_service, three_classes, tmp_path):
    """The web page and its API on a 3-class model: every class's probability (as
    stacking.predict gives them), the most probable first, each backbone's vote for it, and the
    map of that class; in headless Chromium the page names the class, not P(dog)."""
    import threading

    from stacking.serve import create_app, make_server
    from tests.conftest import unavailable
    from tools.page_screenshot import find_browser, upload_and_read

    service = k_service
    assert service.info()["classes"] == list(CLASSES)
    path = three_classes / "data" / "test" / "shoes" / "2.jpg"
    answer = service.answer(path.read_bytes(), path.name)
    expected = service.predictor.predict_photos([Photo(path.name, -1, str(path))])[0][0]
    assert answer["label"] == "shoes" and "p_dog" not in answer
    assert [c for c, _ in answer["probabilities"]][0] == "shoes"
    assert dict(answer["probabilities"]) == pytest.approx(dict(zip(CLASSES, expected)), abs=1e-6)
    assert answer["cam"]["class"] == "shoes"
    assert answer["cam"]["mean_logit"] == pytest.approx(np.log(expected[1] / (1 - expected[1])), abs=1e-3)
    assert set(answer["backbones"]) >= {"efficientnet_lite2", "efficientnet_lite0/finetuned"}
    if find_browser() is None:
        unavailable("needs apt packages chromium and chromium-driver")
    server = make_server(create_app(service), port=0)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        shown = upload_and_read(f"http://127.0.0.1:{server.effective_port}/", path, tmp_path / "page.png")
    finally:
        server.close()
    assert shown["title"] == "What is in this photo?" and shown["verdict"] == "Shoes"
    assert shown["p_name"] == "P(shoes)" and shown["p_dog"] == f"{expected[1]:.4f}"
    assert shown["classes"][1:] == [f"{c}\n{q:.4f}" for c, q in answer["probabilities"]]
    assert shown["votes"][0] == "Each backbone's vote for shoes"
    assert "for shoes" in shown["cam_note"] and shown["image_loaded"]


def test_export_outputs_every_class_probability(three_classes, tmp_path):
    """The mobile export of a 3-class model: an ONNX graph pixels -> 3 probabilities (Lite0's fold
    heads, each a softmax, averaged) that agrees with stacking.predict's code on real photos; the
    K-class level-2 graphs (stack-lr's pooled form, its full multinomial form, average) equal the
    Python stackers on the run's OOF rows; without --data the export asks for the task's photos."""
    import keras

    from oof.crossfit import cross_fit
    from stacking.ensemble import Ensemble
    from stacking.export import ExportError, _stack, export
    from stacking.stackers import LRStacker

    model, data = three_classes / "out" / "model", three_classes / "data"
    info = export(model, "onnx", tmp_path / "m.onnx", use="efficientnet_lite0/logistic", data_dirs=[data],
                  check_photos=6)
    assert info["output"]["name"] == "probabilities" and info["output"]["shape"] == [None, 3]
    assert info["output"]["classes"] == list(CLASSES)
    assert info["parity"]["photos"] == 6 and info["parity"]["max_abs_diff_vs_python"] < 1e-4, info["parity"]
    with pytest.raises(ExportError, match="not Dogs vs. Cats: pass --data"):
        export(model, "onnx", tmp_path / "n.onnx", check_photos=5)
    ens = Ensemble.load(model)
    L = np.column_stack([cf.oof for cf in ens.level1.values()])
    rows = pd.read_csv(three_classes / "out" / "oof" / "stack-lr.csv")  # the run's labels and folds
    full = cross_fit(LRStacker(weights="full"), L, rows["label"].to_numpy(), rows["fold"].to_numpy())
    for cf in (ens.level2["stack-lr"], ens.level2["average"], full):
        x = keras.Input((L.shape[1],))
        got = keras.Model(x, _stack(x, cf)).predict(L.astype(np.float32), verbose=0)
        np.testing.assert_allclose(got, cf.predict(L), atol=1e-5)
