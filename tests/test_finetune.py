"""Fine-tuned backbones as level-1 models: the whole path on a few dozen real photos, one epoch."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from features.data import Photo
from features.images import decode_rgb
from oof import finetune
from stacking import run as run_mod
from stacking.cam import CamExplainer
from stacking.predict import Predictor
from stacking.stackers import logit
from tests.conftest import PHOTOS, make_kaggle_dir

FT = "efficientnet_lite0/finetuned"


def args_for(root, out: str) -> list[str]:
    return ["--data", str(root / "data"), "--backbones", "efficientnet_lite0,efficientnet_lite2", "--folds", "2",
            "--cache", str(root / "cache"), "--out", str(root / out), "--finetune",
            "efficientnet_lite0", "--finetune-epochs", "2", "--finetune-recipe", "whole"]


def whole_work(root) -> Path:
    """The work folder of ft_run's whole-network Lite0 folds (others in its cache hold tops)."""
    return Path(json.loads((root / "out" / "report.json").read_text())["finetune"]["efficientnet_lite0"]["work"])


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    """12 cats, 12 dogs (ids 60-71), 6 test photos; a run interrupted after fold 0, then resumed."""
    root = tmp_path_factory.mktemp("ft")
    make_kaggle_dir(root / "data", 12, 6, start=60)
    trained = []
    real = finetune._train_fold

    def interrupted(*a, **kw):
        if trained:  # the second fold: the notebook session ends here
            raise KeyboardInterrupt
        trained.append(a[10])
        return real(*a, **kw)

    finetune._train_fold = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_mod.main(args_for(root, "first"))
    finally:
        finetune._train_fold = real
    kept = sorted(p.parent.name for p in (root / "cache" / "finetune").glob("*/fold*/fold.json"))
    assert kept == ["fold0"], kept
    resumed = []

    def counting(*a, **kw):
        resumed.append(a[10])
        return real(*a, **kw)

    finetune._train_fold = counting
    try:
        assert run_mod.main(args_for(root, "out")) == 0
    finally:
        finetune._train_fold = real
    return root, resumed


def test_resumes_after_the_last_finished_fold(ft_run):
    _, resumed = ft_run
    assert resumed == [1]  # fold 0 was kept from the interrupted run, not refitted


def test_oof_covers_every_training_photo_once(ft_run):
    root, _ = ft_run
    folds = pd.read_csv(root / "out" / "folds.csv", dtype={"id": str})
    oof = pd.read_csv(root / "out" / "oof" / "efficientnet_lite0__finetuned.csv", dtype={"id": str})
    assert oof["id"].tolist() == folds["id"].tolist() and oof["id"].is_unique and len(oof) == 24
    assert oof["fold"].tolist() == folds["fold"].tolist()
    assert oof["pred"].between(0, 1).all()
    report = json.loads((root / "out" / "report.json").read_text())
    assert FT in report["cv"] and report["cv"][FT]["accuracy"] > 0.7
    stats = report["finetune"]["efficientnet_lite0"]["folds"]
    assert [s["fold"] for s in stats] == [0, 1] and all(s["train_seconds"] > 0 for s in stats)
    assert "stack-lr" in report["cv"]  # stacked with the rest


def test_fold_networks_reproduce_the_test_predictions(ft_run):
    root, _ = ft_run
    model = root / "out" / "model"
    assert sorted(p.name for p in (model / "finetuned").iterdir()) == [
        "efficientnet_lite0-ft0.keras", "efficientnet_lite0-ft1.keras"]
    predictor = Predictor(model)
    test = root / "data" / "test"
    photos = [Photo(str(i), -1, str(test / f"{i}.jpg")) for i in range(1, 7)]
    every, reasons = predictor.predict_all(photos)
    assert not any(reasons)
    saved = pd.read_csv(root / "out" / "test" / "efficientnet_lite0__finetuned.csv")
    np.testing.assert_allclose(every[FT], saved["pred"].to_numpy(), atol=1e-5)
    sub = pd.read_csv(root / "out" / "submission.csv")
    p, _ = predictor.predict_photos(photos)
    np.testing.assert_allclose(p, sub["label"].to_numpy(), atol=1e-5)
    per_model = pd.read_csv(root / "out" / "submissions" / "efficientnet_lite0__finetuned.csv")
    assert per_model["id"].tolist() == list(range(1, 7))


def test_cam_exact_in_mean_with_the_fine_tuned_model(ft_run):
    root, _ = ft_run
    predictor = Predictor(root / "out" / "model")
    cam = CamExplainer(predictor.ensemble)
    name = "dog.701.jpg"
    photo = Photo(name, -1, str(PHOTOS / "train" / name))
    size = decode_rgb((PHOTOS / "train" / name).read_bytes(), name).shape[:2]
    every, _ = predictor.predict_all([photo])
    for model in (FT, "stack-lr"):
        e = cam.explain(photo, size, model=model)
        assert e.logit_map.mean() == pytest.approx(logit(every[model])[0], abs=1e-4), model
        assert e.logit_map.std() > 0.01


def test_export_holds_the_fold_networks(ft_run, tmp_path):
    from stacking.export import export

    root, _ = ft_run
    info = export(root / "out" / "model", "onnx", tmp_path / "ft.onnx", use=FT, data_dirs=[PHOTOS],
                  check_photos=6)
    assert set(info["backbones"]) == {"efficientnet_lite0-ft0", "efficientnet_lite0-ft1"}
    assert info["parity"]["max_abs_diff_vs_python"] < 1e-4, info["parity"]


@pytest.mark.parametrize("warmup", ["logistic", "keras"])
def test_warm_head_is_the_frozen_head_on_raw_features(ft_run, warmup):
    """Fine-tuning starts from the head the recipe names, fitted on the cached frozen GAP rows:
    its (kernel, bias) on raw features give that head's logits."""
    from features.cache import load_features
    from oof.heads import KerasHead, LogisticHead

    root, _ = ft_run
    f = load_features(next((root / "cache").glob("*/gap_efficientnet_lite0.h5")))
    X, y = f.train.astype(np.float64), f.label
    recipe = finetune.Recipe(warmup=warmup, warmup_epochs=3)
    kernel, bias = finetune.warm_head(recipe, X, y)
    head = (LogisticHead() if warmup == "logistic" else
            KerasHead(dropout=recipe.dropout, epochs=3, standardize=False, random_state=recipe.seed))
    np.testing.assert_allclose(X @ kernel + bias, head.fit(X, y).decision_function(X), atol=1e-4)
    with pytest.raises(ValueError, match="warmup"):
        finetune.warm_head(finetune.Recipe(warmup="mean"), X, y)


def test_report_says_what_fine_tuning_adds(ft_run, tmp_path, monkeypatch):
    """The report's "without" column is the run without --finetune on the same folds."""
    root, _ = ft_run
    report = json.loads((root / "out" / "report.json").read_text())
    effect = report["finetune_effect"]
    assert effect["models"] == [FT]
    saved = pd.read_csv(root / "out" / "oof" / "stack-lr.csv")  # "with": the stacker as saved
    assert effect["stackers"]["stack-lr"]["with"]["log_loss"] == pytest.approx(
        log_loss(saved["label"], saved["pred"]), abs=1e-9)
    assert "What fine-tuning adds" in (root / "out" / "report.md").read_text()
    args = args_for(root, "plain")
    args = args[:args.index("--finetune")] + ["--finetune", "none"]
    args[args.index("--out") + 1] = str(tmp_path / "plain")
    assert run_mod.main(args) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert FT not in plain["cv"] and plain["finetune_effect"] is None
    for name in effect["stackers"]:
        assert plain["cv"][name]["log_loss"] == pytest.approx(
            effect["stackers"][name]["without"]["log_loss"], abs=1e-9), name


def test_a_cpu_run_fine_tunes_the_tops_by_default(ft_run, tmp_path, monkeypatch, caplog):
    """On a CPU the default run trains the tops of the backbones that have a top-only recipe
    (Lite0 and Lite2 here; not ResNet50, checked above), says so in one line, reports the recipe,
    and its saved fold networks (whole backbones) give the test predictions the run wrote."""
    import logging

    monkeypatch.setattr(logging.getLogger("gapstack"), "propagate", True)  # to caplog
    monkeypatch.setattr(run_mod, "has_gpu", lambda: False)  # a CPU, whatever this machine is
    root, _ = ft_run
    args = args_for(root, "cpu")
    args = args[:args.index("--finetune")] + ["--out", str(tmp_path / "cpu")]
    assert run_mod.main(args) == 0
    said = [r.getMessage() for r in caplog.records]
    assert "fine-tuning on a CPU: the top of efficientnet_lite0, efficientnet_lite2 (minutes)" in said, said
    assert any("efficientnet_lite2 fine-tuning of the layers after block6_add: 2 fold(s)" in m for m in said)
    report = json.loads((tmp_path / "cpu" / "report.json").read_text())
    top = "efficientnet_lite2/finetuned"
    assert report["finetune_effect"]["models"] == [FT, top]
    assert report["finetune"]["efficientnet_lite0"]["recipe"]["frozen_until"] == "block4_add"
    assert report["finetune"]["efficientnet_lite2"]["recipe"]["frozen_until"] == "block6_add"
    predictor = Predictor(tmp_path / "cpu" / "model")
    photos = [Photo(str(i), -1, str(root / "data" / "test" / f"{i}.jpg")) for i in range(1, 7)]
    every, _ = predictor.predict_all(photos)
    saved = pd.read_csv(tmp_path / "cpu" / "test" / "efficientnet_lite2__finetuned.csv")
    # the run predicted from the kept float16 activations, stacking.predict through the files
    np.testing.assert_allclose(every[top], saved["pred"].to_numpy(), atol=2e-3)


def test_kept_fold_predicts_photos_it_has_not_seen(ft_run, tmp_path):
    """A second run on the same training photos and folds reuses the kept fold networks, and its
    other test photos get real predictions from them (not 0.5): those of the saved ensemble."""
    import shutil

    root, _ = ft_run
    data = tmp_path / "data"
    shutil.copytree(root / "data" / "train", data / "train")
    (data / "test").mkdir()
    for i in range(7, 11):  # test photos the first run never saw
        shutil.copy(PHOTOS.parent / "dogs-vs-cats" / "test" / f"{i}.jpg", data / "test")
    cache = Path(shutil.copytree(root / "cache", tmp_path / "cache"))
    args = args_for(root, "unused") + ["--overwrite"]  # the feature caches are remade for the new
    args[args.index("--data") + 1] = str(data)         # test photos; the fold networks are kept
    args[args.index("--out") + 1] = str(tmp_path / "second")
    args[args.index("--cache") + 1] = str(cache)
    trained = []
    real = finetune._train_fold
    finetune._train_fold = lambda *a, **kw: trained.append(a[10]) or real(*a, **kw)
    try:
        assert run_mod.main(args) == 0
    finally:
        finetune._train_fold = real
    assert trained == []  # both folds kept from the first run
    saved = pd.read_csv(tmp_path / "second" / "test" / "efficientnet_lite0__finetuned.csv")
    assert saved["id"].tolist() == [7, 8, 9, 10]
    assert np.isfinite(saved["pred"]).all() and not np.isclose(saved["pred"], 0.5).any()
    photos = [Photo(str(i), -1, str(data / "test" / f"{i}.jpg")) for i in range(7, 11)]
    every, _ = Predictor(tmp_path / "second" / "model").predict_all(photos)
    np.testing.assert_allclose(every[FT], saved["pred"].to_numpy(), atol=1e-5)


def test_training_trains(ft_run):
    """Fine-tuning changes the network: its training loss goes down epoch by epoch, its
    convolution weights move away from the pretrained ones, and BatchNormalization's statistics
    (frozen by the recipe) stay exactly as they were."""
    import keras

    from features.models import build_feature_map_model
    from features.registry import get_backbone

    root, _ = ft_run
    pretrained = build_feature_map_model(get_backbone("efficientnet_lite0"))
    folds = sorted(f for f in whole_work(root).glob("fold*") if f.is_dir())
    assert [f.name for f in folds] == ["fold0", "fold1"]
    for done in folds:
        loss = json.loads((done / "fold.json").read_text())["loss"]
        assert len(loss) == 2 and loss[1] < loss[0], loss
        trained = keras.saving.load_model(done / "network.keras", compile=False)
        pairs = list(zip(finetune._all_layers(trained), finetune._all_layers(pretrained)))
        assert [type(a) for a, _ in pairs] == [type(b) for _, b in pairs]
        convs = moved = bn = 0
        for a, b in pairs:
            if isinstance(a, keras.layers.BatchNormalization):
                bn += 1
                for wa, wb in zip(a.get_weights(), b.get_weights()):
                    np.testing.assert_array_equal(wa, wb)
            elif isinstance(a, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
                convs += 1
                moved += not np.array_equal(a.get_weights()[0], b.get_weights()[0])
        assert bn > 10 and convs > 10 and moved == convs


def test_auto_fine_tunes_on_a_gpu_within_the_budget(ft_run, tmp_path, monkeypatch, caplog):
    """--finetune auto (the default): on a GPU (the decision forced here, on a CPU) every backbone
    of the run is fine-tuned, its time said first from throughput measured here, and one that
    would pass --finetune-budget is left out with the reason. (On a CPU only the tops of some:
    test_a_cpu_run_fine_tunes_the_tops_by_default.)"""
    import logging

    from stacking.run import finetune_choice

    assert finetune_choice("auto", ["a", "b"], gpu=True, exclude=False) == ["a", "b"]
    assert finetune_choice("auto", ["a", "b"], gpu=False, exclude=False) == []  # whole networks: not on a CPU
    assert finetune_choice("auto", ["a", "b"], gpu=True, exclude=True) == []
    assert finetune_choice("none", ["a"], gpu=True, exclude=False) == []
    assert finetune_choice("b,c", ["a"], gpu=False, exclude=False) == ["b", "c"]
    # --finetune-recipe top: on a CPU, the backbones that have a top-only recipe.
    lites = ["efficientnet_lite0", "efficientnet_lite2"]
    assert finetune_choice("auto", lites + ["resnet50"], gpu=False, exclude=False, kind="top") == lites
    assert finetune_choice("auto", lites, gpu=True, exclude=False, kind="top") == lites
    monkeypatch.setattr(logging.getLogger("gapstack"), "propagate", True)  # to caplog
    root, _ = ft_run
    base = ["--data", str(root / "data"), "--backbones", "efficientnet_lite0", "--folds", "2",
            "--cache", str(root / "cache")]

    def cv(out):
        return json.loads((tmp_path / out / "report.json").read_text())["cv"]

    monkeypatch.setattr(run_mod, "has_gpu", lambda: True)
    # The fold networks of this recipe are kept from ft_run's training: reused, nothing to time.
    assert run_mod.main([*base, "--out", str(tmp_path / "gpu"), "--finetune-epochs", "2"]) == 0
    assert FT in cv("gpu")
    # Three epochs: not kept, so measured and estimated; over a tiny budget, left out.
    caplog.clear()
    assert run_mod.main([*base, "--out", str(tmp_path / "tight"), "--finetune-epochs", "3",
                         "--finetune-budget", "0.01"]) == 0
    said = [r.getMessage() for r in caplog.records]
    estimate = next(m for m in said if m.startswith("efficientnet_lite0 fine-tuning: 2 fold(s) x 3 epoch(s)"))
    assert "photos/s" in estimate and "measured here" in estimate and "about" in estimate
    assert any(m.startswith("efficientnet_lite0 fine-tuning left out") and "0.01-min budget" in m
               for m in said), said
    assert FT not in cv("tight")
    # Said before any photo is decoded: --submit-with naming the model the budget leaves out
    # stops the run there, with no cache made for these new photos.
    fresh = make_kaggle_dir(tmp_path / "fresh", 6, 2, start=80)
    caplog.clear()
    monkeypatch.setattr(run_mod, "remembered_rate", lambda *a, **kw: finetune.Speed(1e-3))  # slow here
    assert run_mod.main(["--data", str(fresh), "--backbones", "efficientnet_lite0", "--folds", "2",
                         "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "late"),
                         "--submit-with", FT]) == 2
    assert not list((tmp_path / "cache").glob("*/gap_*.h5"))
    assert any(m.startswith("efficientnet_lite0 fine-tuning left out") for m in
               (r.getMessage() for r in caplog.records))
    # --exclude turns auto's fine-tuning off, and says so.
    caplog.clear()
    (tmp_path / "outliers.csv").write_text("id,drop\ncat.60,1\n")
    assert run_mod.main([*base, "--out", str(tmp_path / "excl"), "--exclude", str(tmp_path / "outliers.csv"),
                         "--finetune-epochs", "2"]) == 0
    assert any("fine-tuning: off with --exclude" in r.getMessage() for r in caplog.records)
    assert FT not in cv("excl")


def test_each_backbone_trains_with_its_own_recipe(ft_run, tmp_path, monkeypatch):
    """stacking.run takes each backbone's recipe from oof.finetune.RECIPES (Recipe() for one not
    listed), --finetune-epochs and --seed over it; the report records it, and a recipe of its own
    gets a work folder of its own (no fold of another recipe is reused)."""
    from dataclasses import asdict, replace

    root, _ = ft_run
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["finetune"]["efficientnet_lite0"]["recipe"] == asdict(
        replace(finetune.RECIPES["efficientnet_lite0"], epochs=2))
    assert finetune.recipe_for("resnet50") == finetune.Recipe()
    # The recipes chosen by CV (benchmarks/RESULTS.md), as literals: a change to one is a decision.
    assert {name: (r.epochs, r.learning_rate) for name, r in finetune.RECIPES.items()} == {
        "efficientnet_lite0": (1, 1e-4), "efficientnet_lite1": (1, 2e-5), "efficientnet_lite2": (1, 2e-5)}
    assert (finetune.Recipe().epochs, finetune.Recipe().learning_rate) == (1, 2e-5)
    assert {name: (r.epochs, r.learning_rate, r.frozen_until) for name, r in finetune.TOP_RECIPES.items()} == {
        "efficientnet_lite0": (1, 1e-4, "block4_add"), "efficientnet_lite1": (1, 2e-5, "block6_add"),
        "efficientnet_lite2": (1, 1e-4, "block6_add")}
    assert finetune.recipe_for("resnet50", kind="top") is None  # none chosen by CV: none
    assert finetune.recipe_for("efficientnet_lite2", epochs=2, kind="top") == replace(
        finetune.TOP_RECIPES["efficientnet_lite2"], epochs=2)
    with pytest.raises(ValueError, match="one of whole, top"):
        finetune.recipe_for("efficientnet_lite2", kind="half")
    assert all(replace(r, learning_rate=2e-5) == finetune.Recipe() for r in finetune.RECIPES.values())
    own = finetune.Recipe(learning_rate=3e-5, epochs=3)
    monkeypatch.setitem(finetune.RECIPES, "efficientnet_lite0", own)
    assert finetune.recipe_for("efficientnet_lite0", seed=7) == replace(own, seed=7)
    seen = []

    class Stop(Exception):
        pass

    def spy(backbone, weights, recipe, data, n_extra, frozen, work):
        seen.append((recipe, work))
        raise Stop  # the estimate comes before any photo is decoded: nothing more is needed

    monkeypatch.setattr(run_mod, "finetune_estimate", spy)
    base = ["--data", str(root / "data"), "--backbones", "efficientnet_lite0", "--folds", "2",
            "--cache", str(root / "cache"), "--finetune", "efficientnet_lite0", "--finetune-recipe", "whole"]
    for extra in ([], ["--finetune-epochs", "2"]):
        with pytest.raises(Stop):
            run_mod.main([*base, "--out", str(tmp_path / "own"), *extra])
    assert [r for r, _ in seen] == [own, replace(own, epochs=2)]
    kept = {w.name for w in (root / "cache" / "finetune").iterdir()}
    assert not {w.name for _, w in seen} & kept  # ft_run's folds (Lite0's recipe) not reused


def test_fold_networks_know_their_photos_contents(ft_run, tmp_path):
    """The work folder is named by the photos' contents too (their sizes, as the feature cache's
    fingerprint): the same ids, labels and folds over changed photos train anew; a test photo
    that changed under a kept id is predicted anew."""
    from dataclasses import replace as changed

    from features.data import load_photos

    root, _ = ft_run
    train = load_photos(root / "data").train
    y, fold = np.array([p.label for p in train]), np.arange(len(train)) % 2
    backbone = finetune.get_backbone("efficientnet_lite0")
    recipe = finetune.Recipe()
    a = finetune.work_folder(tmp_path, backbone, "w", recipe, train, y, fold)
    edited = [changed(p, size=p.size + 1) if i == 3 else p for i, p in enumerate(train)]
    assert finetune.work_folder(tmp_path, backbone, "w", recipe, edited, y, fold) != a
    assert finetune.work_folder(tmp_path, backbone, "w", recipe, list(train), y, fold) == a


def test_two_processes_fine_tuning_into_one_cache_take_turns(ft_run, tmp_path, monkeypatch, caplog):
    """A second process waits for the one holding a fold (never deleting its half-written
    ``foldK.tmp<pid>`` or ``features.tmp<pid>.npz``), then reuses the fold it kept."""
    import threading
    import time

    from features.cache import extraction_lock

    root, _ = ft_run
    work = whole_work(root)
    others = [work / "fold0.tmp999999", work / "fold0" / "features.tmp999999.npz"]
    others[0].mkdir()
    others[1].write_bytes(b"another process's half-written file")
    monkeypatch.setattr(finetune, "_train_fold", lambda *a, **kw: pytest.fail("a kept fold was trained"))
    result = {}
    args = args_for(root, "turns")
    args[args.index("--out") + 1] = str(tmp_path / "turns")
    waiting = threading.Thread(target=lambda: result.setdefault("rc", run_mod.main(args)))
    try:
        import logging

        monkeypatch.setattr(logging.getLogger("gapstack"), "propagate", True)  # to caplog
        with extraction_lock(work / "fold0"):  # the other process, training fold 0
            waiting.start()
            deadline = time.time() + 300
            while time.time() < deadline and not any(
                    "fold0" in r.getMessage() and "waiting for it to finish" in r.getMessage()
                    for r in caplog.records):
                time.sleep(0.2)
            assert waiting.is_alive() and not (tmp_path / "turns" / "report.json").exists()
        waiting.join(timeout=300)
        assert result["rc"] == 0
        assert all(p.exists() for p in others)
    finally:
        others[1].unlink(missing_ok=True)
        others[0].rmdir()


def test_training_speed_is_measured_once_per_machine(ft_run, tmp_path, monkeypatch):
    """The speed ft_run measured (Lite0, its recipe's batch) is reused with the day it was
    measured, building no network; another batch size is another key; a rates file that cannot
    be read or written costs only a measurement each time. A top-only recipe's frozen part is
    timed with it, and a speed kept without that time (from before it was timed) is measured
    again rather than estimated from."""
    from dataclasses import replace

    from features.defaults import RATES_FILE

    root, _ = ft_run
    backbone, recipe = finetune.get_backbone("efficientnet_lite0"), finetune.recipe_for("efficientnet_lite0")
    photos = [Photo(f.name, int(f.name.startswith("dog")), str(f)) for f in sorted((root / "data" / "train").iterdir())]
    built = []
    real_build = finetune.build_network
    monkeypatch.setattr(finetune, "build_network", lambda *a, **kw: built.append(a) or real_build(*a, **kw))
    speed = finetune.remembered_rate(backbone, "default", photos, recipe)
    assert speed.train > 0 and speed.frozen is None and speed.measured == time.strftime("%Y-%m-%d") and built == []
    other = replace(recipe, batch_size=2)
    assert finetune.rate_key(backbone, other) != finetune.rate_key(backbone, recipe)
    (tmp_path / "rates.json").mkdir()  # neither readable nor writable as a file
    fresh = finetune.remembered_rate(backbone, "default", photos, other, rates=tmp_path / "rates.json")
    assert fresh.train > 0 and fresh.measured is None and len(built) == 1
    assert finetune.rate_key(backbone, other) not in json.loads(RATES_FILE.read_text())
    top = replace(other, frozen_until="block4_add")
    key, rates = finetune.rate_key(backbone, top), tmp_path / "top.json"
    rates.write_text(json.dumps({key: {"photos_per_s": 5.0, "measured": "2026-01-01"}}))  # no frozen time
    timed = finetune.remembered_rate(backbone, "default", photos, top, rates=rates)
    assert timed.frozen > 0 and timed.train != 5.0 and timed.measured is None and len(built) == 2
    kept = json.loads(rates.read_text())[key]
    assert (kept["photos_per_s"], kept["frozen_per_s"]) == (timed.train, timed.frozen)
    assert finetune.remembered_rate(backbone, "default", photos, top, rates=rates).measured is not None


def test_the_time_said_is_revised_as_folds_finish():
    """Said again when a fold takes more than a quarter more or less than the estimate, from the
    fold just measured; not said for a fold within a quarter, nor after the last fold."""
    clock = finetune.FoldClock("efficientnet_lite0", 5 * 600.0, 5)  # 10 min a fold said
    assert clock.fold_done(0, 700.0) is None  # within a quarter
    said = clock.fold_done(1, 200.0)  # a machine shared with another job no longer
    assert said == ("efficientnet_lite0 fine-tuning: fold 1 took 200 s, not the 600 s estimated; "
                    "re-measured: about 10 min for the 3 fold(s) left")
    assert clock.fold_done(2, 230.0) is None  # within a quarter of the revised 200 s
    assert "about 10 min for the 1 fold(s) left" in clock.fold_done(3, 600.0)
    assert clock.fold_done(4, 60.0) is None  # nothing left to estimate
    assert finetune.FoldClock("x", None, 3).fold_done(0, 1e6) is None  # nothing was said before


def test_a_top_only_backbone_outside_the_run_costs_no_feature_pass(ft_run, tmp_path, monkeypatch):
    """Fine-tuning the top of a backbone the run does not stack frozen warms up on its kept
    activations: no GAP extraction for it, and no frozen head or ImageNet prior of it in the run."""
    root, _ = ft_run
    extracted = []
    real = run_mod.extract
    monkeypatch.setattr(run_mod, "extract", lambda photos, name, *a, **kw: extracted.append(name)
                        or real(photos, name, *a, **kw))
    args = args_for(root, "unused")
    args[args.index("--backbones") + 1] = "efficientnet_lite0"
    args[args.index("--finetune") + 1] = "efficientnet_lite2"
    args[args.index("--out") + 1] = str(tmp_path / "top")
    assert run_mod.main(args + ["--finetune-recipe", "top"]) == 0
    assert "efficientnet_lite2" not in extracted
    report = json.loads((tmp_path / "top" / "report.json").read_text())
    assert [m for m in report["cv"] if m.startswith("efficientnet_lite2")] == ["efficientnet_lite2/finetuned"]
    assert report["finetune"]["efficientnet_lite2"]["recipe"]["frozen_until"] == "block6_add"
