"""Cleaning detectors on real shared photos, each against a photo made to trip it."""

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from features.clean import clean, label_issues, near_duplicates
from oof.crossfit import cross_fit
from oof.folds import make_folds
from oof.heads import LogisticHead
from tests.conftest import PHOTOS, make_kaggle_dir

MADE = {"tiny": "cat.9001", "flat": "dog.9002", "text": "cat.9003", "twin": "dog.9004"}


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    data = make_kaggle_dir(root / "data", 20, 0)
    shutil.rmtree(data / "test")
    train = data / "train"
    photo = cv2.imread(str(PHOTOS / "train" / "cat.100.jpg"))
    cv2.imwrite(str(train / f"{MADE['tiny']}.jpg"), photo[100:130, 100:140])  # a 40x30 crop
    cv2.imwrite(str(train / f"{MADE['flat']}.jpg"), np.full((200, 200, 3), 128, np.uint8))
    text = np.full((200, 300, 3), 255, np.uint8)
    for k, line in enumerate(["ADOPTED!", "Call 949-492-1617", "Shelter hours 9-5"]):
        cv2.putText(text, line, (10, 50 + 50 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2)
    cv2.imwrite(str(train / f"{MADE['text']}.jpg"), text)
    shutil.copy(train / "dog.5.jpg", train / f"{MADE['twin']}.jpg")
    result = clean(data, root / "out").set_index("id")
    return result, root / "out"


def test_each_detector_fires_on_its_photo(cleaned):
    result, _ = cleaned
    assert result.loc[MADE["tiny"], "tiny"] and result["tiny"].sum() == 1
    assert result.loc[MADE["flat"], "colour"] and result.loc[MADE["text"], "colour"]
    assert result.loc[MADE["flat"], "imagenet"] and result.loc[MADE["text"], "imagenet"]
    assert result.loc[MADE["twin"], "duplicate"] and "dog.5 (1.000)" in result.loc[MADE["twin"], "duplicate_of"]
    assert not result.loc["dog.5", "duplicate"]  # the first of the pair stays


def test_clear_photos_are_not_flagged(cleaned):
    result, out = cleaned
    flagged = set(result.index[result["flagged"]])
    assert flagged == set(MADE.values())
    listed = pd.read_csv(out / "outliers.csv", dtype={"id": str})
    assert set(listed["id"]) == flagged and (listed["drop"] == 1).all()
    assert listed["score"].is_monotonic_decreasing
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] >= 214


def test_label_detector_finds_a_flipped_label(real_features):
    X, y = real_features.train, real_features.label.copy()
    y[7] = 1 - y[7]  # a cat now labelled dog
    fold = make_folds(real_features.train_ids, y, 5)["fold"].to_numpy()
    oof = cross_fit(LogisticHead(C=0.1), X, y, fold).oof
    best, fired = label_issues(y, np.column_stack([oof, oof]))
    assert fired[7] and best[7] < 0.05
    assert fired.sum() <= 2  # the real photos are not accused


def test_near_duplicates_between_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 64)), rng.normal(size=(30, 64))
    b[4] = a[11] * 1.5  # same direction: cosine 1
    assert [(i, j) for i, j, _ in near_duplicates(a, b)] == [(11, 4)]
    assert near_duplicates(a) == []
