"""The web page and API (stacking.serve) on a real ensemble and real shared photos."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from features.data import Photo
from features.images import decode_rgb
from stacking.cam import CamExplainer
from stacking.predict import Predictor
from stacking.serve import MAX_UPLOAD_MB, Service, create_app, make_server
from stacking.stackers import logit
from tests.conftest import PHOTOS, unavailable
from tools.page_screenshot import find_browser, upload_and_read

# Not among the ensemble's training photos (ids 0-29 of each class); plain photos of one animal
# (the small 48-photo ensemble gives cat.704, a calico cat in a shelter cage with a hand, 0.63).
DOGS = [f"dog.{i}.jpg" for i in (700, 701, 705, 706, 707)]
CATS = [f"cat.{i}.jpg" for i in (700, 703, 705, 706, 707)]


def photo_bytes(name: str) -> bytes:
    return (PHOTOS / "train" / name).read_bytes()


@pytest.fixture(scope="module")
def model_dir(runs):
    return runs / "a" / "model"


@pytest.fixture(scope="module")
def service(model_dir):
    return Service(model_dir)


@pytest.fixture(scope="module")
def client(service):
    return create_app(service).test_client()


@pytest.fixture(scope="module")
def server(service):
    server = make_server(create_app(service), port=0)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"http://127.0.0.1:{server.effective_port}/"
    server.close()


def post(client, data: bytes, filename: str = "photo.jpg"):
    return client.post("/api/predict", data={"file": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def test_real_photos_answered_as_stacking_predict_does(client, model_dir):
    predictor = Predictor(model_dir)  # what python -m stacking.predict uses, bulk batch size
    expected, reasons = predictor.predict_photos([Photo(n, -1, str(PHOTOS / "train" / n)) for n in DOGS + CATS])
    assert not any(reasons)
    for name, p in zip(DOGS + CATS, expected):
        reply = post(client, photo_bytes(name), name)
        assert reply.status_code == 200, reply.json
        body = reply.json
        assert body["label"] == name.split(".")[0]
        assert (body["p_dog"] > 0.9) if name.startswith("dog") else (body["p_dog"] < 0.1), (name, body["p_dog"])
        assert body["p_dog"] == pytest.approx(p, abs=1e-6)
        # Each level-1 model's vote; Lite2 has two (its head and its ImageNet prior).
        assert set(body["backbones"]) == {"efficientnet_lite0", "efficientnet_lite2/logistic",
                                          "efficientnet_lite2/imagenet"}
        png = Image.open(io.BytesIO(__import__("base64").b64decode(body["cam_png"])))
        assert png.format == "PNG" and max(png.size) <= 512


def test_cam_mean_equals_the_logit_for_every_model(model_dir):
    """The map is exact in the mean: for each model of the ensemble (level-1 heads, concat-fusion,
    stackers), the mean of its CAM equals the logit of P(dog) from stacking.predict's path."""
    predictor = Predictor(model_dir)
    cam = CamExplainer(predictor.ensemble)
    for name in ("dog.701.jpg", "cat.702.jpg"):
        photo = Photo(name, -1, str(PHOTOS / "train" / name))
        size = decode_rgb(photo_bytes(name), name).shape[:2]
        every, _ = predictor.predict_all([photo])
        for model in predictor.ensemble.model_names:
            e = cam.explain(photo, size, model=model)
            assert e.logit_map.shape == size
            assert e.logit_map.mean() == pytest.approx(logit(every[model])[0], abs=1e-4), (name, model)
            assert e.logit_map.std() > 0.1, "a flat map explains nothing"


def test_bad_uploads_get_clear_4xx_answers(client):
    good = photo_bytes(DOGS[0])
    big = io.BytesIO()
    Image.new("RGB", (10_000, 10_000), (120, 90, 60)).save(big, format="JPEG", quality=30)
    cases = {
        "not an image": (b"this is not a photo\n" * 50, "notes.txt", 422),
        "empty upload": (b"", "empty.jpg", 400),
        "truncated": (good[: len(good) // 2], "half.jpg", 422),
        "too large (10000x10000 pixels": (big.getvalue(), "huge.jpg", 413),
        f"over the {MAX_UPLOAD_MB} MB limit": (b"\xff" * ((MAX_UPLOAD_MB + 1) << 20), "big.jpg", 413),
    }
    for message, (data, filename, status) in cases.items():
        reply = post(client, data, filename)
        assert reply.status_code == status, (message, reply.json)
        assert message in reply.json["error"], reply.json
    reply = client.post("/api/predict", data={}, content_type="multipart/form-data")
    assert reply.status_code == 400 and "field 'file'" in reply.json["error"]
    # A file name is only ever shown, never used as a path.
    reply = post(client, b"GIF89a-not-really", "../../etc/passwd")
    assert reply.status_code == 422 and reply.json["error"].startswith("passwd:")
    assert post(client, good, DOGS[0]).status_code == 200, "still serving after bad input"


def test_fifty_concurrent_requests(server):
    names = DOGS + CATS
    blobs = {n: photo_bytes(n) for n in names}

    def ask(i):
        name = names[i % len(names)]
        reply = requests.post(server + "api/predict", files={"file": (name, blobs[name])}, timeout=300)
        return name, reply.status_code, reply.json()

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(ask, range(50)))
    assert [r[1] for r in replies] == [200] * 50, [r[2] for r in replies if r[1] != 200]
    by_photo = {}
    for name, _, body in replies:
        by_photo.setdefault(name, []).append(body["p_dog"])
    for name, ps in by_photo.items():
        assert np.ptp(ps) == 0, f"{name}: answers differ under concurrency: {ps}"


def test_page_in_headless_chromium(server, tmp_path):
    if find_browser() is None:
        unavailable("needs apt packages chromium and chromium-driver")
    name = DOGS[2]
    expected = requests.post(server + "api/predict", files={"file": (name, photo_bytes(name))}).json()
    shot = tmp_path / "page.png"
    shown = upload_and_read(server, PHOTOS / "train" / name, shot)
    assert shown["verdict"] == "Dog"
    assert shown["p_dog"] == f"{expected['p_dog']:.4f}"
    assert shown["image_loaded"] and shown["image_displayed_width"] > 100
    assert shot.stat().st_size > 10_000
