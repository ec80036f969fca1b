"""Fine-tuning only the top of a backbone on its lower part's kept activations: the kept
activations are the network's, resume after an interruption, and training on them is the whole
network's training with the lower part frozen."""

from dataclasses import replace

import numpy as np
import pytest

from features import activations
from features.data import Photo, PhotoReader
from features.extract import load_batch
from features.models import build_feature_map_model, resolve_weights
from features.registry import get_backbone
from oof import finetune
from tests.conftest import PHOTOS

SPLIT = "block14_add"  # EfficientNet-Lite0's last block and head conv train above it


@pytest.fixture(scope="module")
def lite0():
    backbone = get_backbone("efficientnet_lite0")
    return backbone, resolve_weights(backbone, "default")


def real_photos(n: int, start: int = 0) -> list[Photo]:
    return [Photo(f"{kind}.{i}", label, str(PHOTOS / "train" / f"{kind}.{i}.jpg"))
            for i in range(start, start + n // 2) for label, kind in enumerate(("cat", "dog"))]


def test_kept_activations_are_the_networks_and_resume(lite0, tmp_path, monkeypatch):
    """Each photo's row is the lower part's output for it (float16 kept), the mirror view its
    mirror image's; an unreadable photo is a NaN row marked not ok; a chunk lost to an
    interruption is the only one computed again; other photos get another folder."""
    backbone, weights = lite0
    monkeypatch.setattr(activations, "CHUNK", 4)
    broken = tmp_path / "cat.999.jpg"
    broken.write_bytes(b"not a jpeg")
    photos = real_photos(8) + [Photo("cat.999", 0, str(broken))]
    fmap = build_feature_map_model(backbone, weights)
    lower, upper, mirrored = activations.split_network(fmap, backbone, SPLIT)
    folder = activations.store_folder(tmp_path / "acts", backbone, "w", SPLIT, photos)
    kept = activations.compute(photos, folder, backbone, SPLIT, lower, mirrored, activations.VIEWS, progress=False)
    assert kept.n == 9 and kept.ok.tolist() == [True] * 8 + [False]
    pixels, _ = load_batch(PhotoReader(), photos[:8], backbone, False)
    want = lower.predict_on_batch(pixels)
    got = kept.rows(np.arange(8))
    assert got.shape == want.shape == (8, 7, 7, 192)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-2 * np.abs(want).max() / 100)
    mirror = lower.predict_on_batch(np.ascontiguousarray(pixels[:, :, ::-1]))
    flags = np.array([0, 1, 0, 1, 1, 0, 0, 1], bool)
    mixed = kept.rows(np.arange(8), flags)
    np.testing.assert_allclose(mixed[flags], mirror[flags], rtol=2e-3, atol=2e-2 * np.abs(want).max() / 100)
    np.testing.assert_allclose(mixed[~flags], got[~flags])
    assert np.isnan(kept.rows([8])).all()
    # The whole network: its top applied to the kept rows gives its feature map.
    np.testing.assert_allclose(upper.predict_on_batch(got), fmap.predict_on_batch(pixels), atol=2e-2)
    # Interrupted after all but one chunk: only that one is computed again.
    lost = activations.chunk_file(folder, "mirror", 1)
    lost.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    again = activations.compute(photos, folder, backbone, SPLIT, lower, mirrored, activations.VIEWS,
                                progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    assert set(after) - set(before) == {lost.name} and all(after[k] == v for k, v in before.items())
    np.testing.assert_array_equal(again.rows(np.arange(8), flags), mixed)
    assert activations.store_folder(tmp_path / "acts", backbone, "w", SPLIT, photos[:8]) != folder
    with pytest.raises(ValueError, match="no layer named 'block99_add'"):
        activations.split_network(fmap, backbone, "block99_add")
    with pytest.raises(ValueError, match="cannot be split at 'block14_project_bn'"):
        activations.split_network(fmap, backbone, "block14_project_bn")  # the residual goes around it


def test_top_trains_as_the_whole_network_with_its_lower_part_frozen(lite0):
    """A few steps of the top model on kept activations move the top's weights exactly as the
    same steps of the whole network move them when its lower part is frozen; the network the
    top shares its layers with (the one saved) carries them, its lower part untouched."""
    import keras

    backbone, weights = lite0
    recipe = replace(finetune.Recipe(learning_rate=1e-3, dropout=0.0), frozen_until=SPLIT)
    pixels, _ = load_batch(PhotoReader(), real_photos(8, 20), backbone, False)
    labels = np.array([0, 1] * 4, np.float32)
    head = (np.random.default_rng(0).normal(0, 0.01, backbone.feature_dim), 0.0)
    model, fmap = finetune.build_network(backbone, weights, recipe, head)
    lower, upper, _ = activations.split_network(fmap, backbone, SPLIT)
    lower_before = [w.numpy().copy() for w in lower.weights]
    top_before = [w.numpy().copy() for w in upper.weights]
    top = finetune.top_model(model, upper, recipe, 2)
    whole, whole_fmap = finetune.build_network(backbone, weights, recipe, head)
    for layer in finetune._all_layers(activations.split_network(whole_fmap, backbone, SPLIT)[0]):
        layer.trainable = False
    whole.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate), loss="binary_crossentropy")
    acts = lower.predict_on_batch(pixels)
    for _ in range(3):
        np.testing.assert_allclose(top.train_on_batch(acts, labels), whole.train_on_batch(pixels, labels), rtol=1e-5)
    whole_top = activations.split_network(whole_fmap, backbone, SPLIT)[1]
    moved = 0
    for a, b, start in zip(upper.weights, whole_top.weights, top_before):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
        moved += not np.array_equal(a.numpy(), start)
    assert moved >= 4  # the convolutions (BatchNormalization stays frozen)
    for w, start in zip(lower.weights, lower_before):
        np.testing.assert_array_equal(w.numpy(), start)
    np.testing.assert_allclose(fmap.predict_on_batch(pixels), upper.predict_on_batch(acts), atol=1e-5)


def test_top_fine_tuning_cross_fits_and_predicts_as_its_saved_networks(lite0, tmp_path):
    """``finetune_folds`` with a top-only recipe: the lower part is computed once for all folds
    (plain and mirrored training photos, plain extra photos), every training photo gets an
    out-of-fold prediction, and the features kept for the held-out and extra photos are what the
    saved fold network (the whole backbone, its top trained) computes for them. The folds share
    one network, reset before each: fold 1 trained after fold 0 is fold 1 trained alone, as a
    run resumed after fold 0 trains it (same weights, head, optimizer, dropout and batch order:
    Keras must not reorder the batches by what ran before in the process)."""
    import json
    import shutil

    from features.extract import Extractor

    backbone, weights = lite0
    train, extra = real_photos(16, 40), real_photos(4, 60)
    y = np.array([p.label for p in train])
    fold = np.arange(len(train)) // 2 % 2  # a cat and a dog to each fold in turn
    warm = Extractor(backbone, weights, "keras").features(train)[0]
    recipe = finetune.Recipe(learning_rate=1e-3, frozen_until=SPLIT, batch_size=2)  # 4 steps a fold
    result = finetune.finetune_folds(backbone, "default", train, y, fold, warm, extra, tmp_path / "ft" / "work",
                                     recipe, progress=False)
    shutil.copytree(tmp_path / "ft" / "work" / "fold0", tmp_path / "ft" / "alone" / "fold0")
    alone = finetune.finetune_folds(backbone, "default", train, y, fold, warm, extra, tmp_path / "ft" / "alone",
                                    recipe, progress=False)
    assert len(alone.seconds) == 1  # fold 1 only, on a network of its own
    heads = [json.loads((tmp_path / "ft" / w / "fold1" / "fold.json").read_text())["head"] for w in ("work", "alone")]
    np.testing.assert_allclose(heads[0]["kernel"], heads[1]["kernel"], atol=1e-6)
    np.testing.assert_allclose(alone.oof, result.oof, atol=1e-6)
    stores = sorted(p.name.split("-")[1] for p in (tmp_path / "ft" / "activations").iterdir() if p.is_dir())
    assert stores == [SPLIT, SPLIT]
    views = sorted(p.name.split("-")[0] for p in (tmp_path / "ft" / "activations").glob("*/*.act.npy"))
    assert views == ["mirror", "plain", "plain"]  # mirrored training photos only
    assert result.oof.shape == (16,) and not np.isnan(result.oof).any()
    pretrained = build_feature_map_model(backbone, weights)
    lower_names = {w.path for w in activations.split_network(pretrained, backbone, SPLIT)[0].weights}
    for k, net in enumerate(result.networks):
        info = finetune.fold_stats(tmp_path / "ft" / "work")[k]
        assert info["recipe"]["frozen_until"] == SPLIT and len(info["loss"]) == 1
        predicted = [p for p, f in zip(train, fold) if f == k] + extra
        kept = np.stack([result.features[net.entry.name][p.id] for p in predicted])
        through_file, _ = Extractor(net.entry, net.entry.weights, "keras").features(predicted)
        np.testing.assert_allclose(kept, through_file, atol=2e-3 * np.abs(through_file).max())
        saved = build_feature_map_model(net.entry, net.entry.weights)
        same = moved = 0
        for a, b in zip(saved.weights, pretrained.weights):
            if b.path in lower_names:
                same += np.array_equal(a.numpy(), b.numpy())
            else:
                moved += not np.array_equal(a.numpy(), b.numpy())
        assert same == len(lower_names) and moved >= 4


def test_fewer_networks_than_folds_keep_every_prediction_out_of_fold(lite0, tmp_path):
    """``Recipe.networks`` = 2 over the run's 3 folds: network g holds out the folds k with
    k % 2 == g, so there are two networks, each trained only on the photos it does not predict,
    and every training photo's prediction comes from the network that held it out."""
    from features.extract import Extractor

    backbone, weights = lite0
    train = real_photos(12, 70)
    y = np.array([p.label for p in train])
    fold = np.arange(len(train)) // 2 % 3  # folds 0, 1, 2: networks {0, 2} and {1}
    assert finetune.network_folds(fold, finetune.Recipe(networks=2)).tolist() == (fold % 2).tolist()
    assert finetune.network_folds(fold + 5, finetune.Recipe(networks=2)).tolist() == (fold % 2).tolist()
    np.testing.assert_array_equal(finetune.network_folds(fold, finetune.Recipe()), fold)
    with pytest.raises(ValueError, match="between 2 and the run's 3 folds"):
        finetune.network_folds(fold, finetune.Recipe(networks=4))
    warm = Extractor(backbone, weights, "keras").features(train)[0]
    recipe = finetune.Recipe(learning_rate=1e-3, frozen_until=SPLIT, networks=2)
    work = tmp_path / "ft" / "work"
    result = finetune.finetune_folds(backbone, "default", train, y, fold, warm, [], work, recipe, progress=False)
    stats = finetune.fold_stats(work)
    held = [fold % 2 == g for g in (0, 1)]
    assert [s["fold"] for s in stats] == [0, 1] and len(result.networks) == 2
    assert [s["photos"] for s in stats] == [int((~h).sum()) for h in held] == [4, 8]
    for net, h in zip(result.networks, held):
        assert set(result.features[net.entry.name]) == {p.id for p, x in zip(train, h) if x}
        X = np.stack([result.features[net.entry.name][p.id] for p, x in zip(train, h) if x])
        np.testing.assert_allclose(result.oof[h], net.head.predict_proba(X)[:, 1])
