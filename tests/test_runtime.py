"""The converted-graph cache behind ONNX Runtime: reused, keyed by weights, repaired when damaged."""

import numpy as np

from features.runtime import KerasForward, OnnxForward, max_relative_difference, model_key, onnx_cache_path
from tests.conftest import PHOTOS


def real_pixels(n=4):
    from features.images import load_for_backbone

    names = [f"dog.{i}.jpg" for i in range(n)]
    return np.stack([load_for_backbone((PHOTOS / "train" / f).read_bytes(), f, (224, 224)).astype(np.float32)
                     for f in names])


def test_converted_graph_is_kept_keyed_and_repaired(lite0_model, tmp_path):
    pixels = real_pixels()
    expected = KerasForward(lite0_model)(pixels)
    first = OnnxForward(lite0_model, cache=tmp_path)
    path = onnx_cache_path(lite0_model, tmp_path)
    assert list(tmp_path.iterdir()) == [path]
    stored = path.read_bytes()
    # Reused: a second runtime reads the same file and gives the same features.
    second = OnnxForward(lite0_model, cache=tmp_path)
    assert path.read_bytes() == stored
    assert np.array_equal(first(pixels), second(pixels))
    assert max_relative_difference(second(pixels), expected) < 1e-4
    # Damaged: converted again, and the file repaired.
    path.write_bytes(b"\x00not an onnx graph")
    repaired = OnnxForward(lite0_model, cache=tmp_path)
    assert max_relative_difference(repaired(pixels), expected) < 1e-4
    assert len(path.read_bytes()) > 1_000_000
    # Any change of weights changes the key, so a stale graph is never used.
    w = lite0_model.weights[-1]
    before, original = model_key(lite0_model), w.numpy()
    try:
        w.assign(original + 1e-3)
        assert model_key(lite0_model) != before
    finally:
        w.assign(original)
    assert model_key(lite0_model) == before
