"""Decoding real photos in every form Kaggle users meet, and naming the file when one is bad."""

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

import features.images
from features.images import ImageError, decode_rgb, load_for_backbone, resize
from tests.conftest import PHOTOS, PHOTOS_200, unavailable

PHOTO = PHOTOS / "train" / "dog.3.jpg"


@pytest.fixture(scope="module")
def rgb():
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_plain_jpeg(rgb):
    out = decode_rgb(PHOTO.read_bytes(), "dog.3.jpg")
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.array_equal(out, rgb)


def test_grayscale_becomes_three_equal_channels(rgb):
    data = _encode(Image.fromarray(rgb).convert("L"), "JPEG", quality=95)
    out = decode_rgb(data, "gray.jpg")
    assert out.shape == rgb.shape
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_cmyk_jpeg_colours_survive(rgb):
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    out = decode_rgb(data, "cmyk.jpg")
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6  # JPEG noise, not inverted colours


def test_rgba_png_named_jpg_composites_on_white(rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:20, :20, 3] = 0  # a transparent corner
    data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    out = decode_rgb(data, "really_a_png.jpg")
    assert np.array_equal(out[20:, 20:], rgb[20:, 20:])
    assert (out[:20, :20] == 255).all()


_JPEG = PHOTO.read_bytes()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"cat.1.jpg is not a photo, it is this sentence.", "not an image"),
    (_JPEG[: len(_JPEG) // 2], "truncated"),
    (_JPEG[:1000] + bytes(range(256)) * 4, "corrupt"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 200, "header is corrupt"),
], ids=["zero-byte", "text", "truncated", "corrupt-body", "corrupt-header"])
def test_bad_files_raise_with_name_and_reason(data, reason):
    with pytest.raises(ImageError) as err:
        decode_rgb(data, "train/dog.99.jpg")
    assert "train/dog.99.jpg" in str(err.value)
    assert reason in err.value.reason


def test_resize_reaches_the_backbone_size(rgb):
    for method in ("area", "bilinear", "bicubic"):
        assert resize(rgb, (224, 240), method).shape == (224, 240, 3)
    tiny = rgb[:30, :40]
    assert resize(tiny, (224, 224), "area").shape == (224, 224, 3)  # upscaling works too


def test_fast_decode_stays_close(rgb):
    full = load_for_backbone(PHOTO.read_bytes(), "x", (224, 224)).astype(float)
    fast = load_for_backbone(PHOTO.read_bytes(), "x", (224, 224), fast_decode=True).astype(float)
    assert fast.shape == full.shape
    assert np.abs(fast - full).mean() < 4


def _pillow_only(data: bytes, name: str, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(features.images, "simplejpeg", None)
        return decode_rgb(data, name)


def test_fast_jpeg_path_gives_pillows_pixels(monkeypatch):
    """The speed path must not change a single pixel: every photo decodes identically with and
    without simplejpeg (originals, 200 px set, test photos, a grey JPEG)."""
    if importlib.util.find_spec("simplejpeg") is None:
        unavailable("needs simplejpeg (pip install simplejpeg)")
    files = (sorted((PHOTOS / "train").glob("*.jpg"))[::40] + sorted((PHOTOS / "test").glob("*.jpg"))[::50]
             + sorted((PHOTOS_200 / "train").glob("*.jpg"))[::200])
    grey = _encode(Image.open(PHOTO).convert("L"), "JPEG", quality=90)
    blobs = [(f.name, f.read_bytes()) for f in files] + [("grey.jpg", grey)]
    assert features.images._decode_plain_jpeg(blobs[0][1], blobs[0][0]) is not None  # the path is taken
    for name, data in blobs:
        fast, slow = decode_rgb(data, name), _pillow_only(data, name, monkeypatch)
        assert fast.shape == slow.shape and np.array_equal(fast, slow), name


def test_exif_orientation_is_honoured(rgb, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_rgb(data, "rotated.jpg")
    assert out.shape == (rgb.shape[1], rgb.shape[0], 3)
    assert np.array_equal(out, _pillow_only(data, "rotated.jpg", monkeypatch))


def test_too_large_jpeg_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(features.images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        decode_rgb(_JPEG, "big.jpg")
