"""Forward passes: the converted-graph cache behind ONNX Runtime (reused, keyed by weights,
repaired when damaged) and a quiet TensorFlow start."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from features.runtime import KerasForward, OnnxForward, max_relative_difference, model_key, onnx_cache_path
from tests.conftest import PHOTOS, cpu_path

REPO = Path(__file__).resolve().parent.parent


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


@cpu_path
def test_keras_check_is_remembered_for_the_same_graph(lite0_model, tmp_path, monkeypatch):
    import json

    import features.runtime as runtime

    monkeypatch.setattr(runtime, "ONNX_CACHE", tmp_path)
    calls = []
    real_call = KerasForward.__call__

    def counted(self, pixels):
        calls.append(len(pixels))
        return real_call(self, pixels)

    monkeypatch.setattr(KerasForward, "__call__", counted)
    first = runtime.make_forward(lite0_model, "auto")
    assert first.name == "onnxruntime" and calls == [4]
    record = first.path.with_suffix(".check.json")
    saved = json.loads(record.read_text())
    assert 0 < saved["max_rel_diff"] < runtime.TOLERANCE and saved["graph_md5"] == first.graph_md5
    # Same graph, same ONNX Runtime: Keras is not called again.
    assert runtime.make_forward(lite0_model, "auto").name == "onnxruntime" and calls == [4]
    # The record decides: one that says the graph is off sends the work to Keras...
    record.write_text(json.dumps(dict(saved, max_rel_diff=1.0)))
    assert runtime.make_forward(lite0_model, "auto").name == "keras" and calls == [4]
    # ...but a record for other graph bytes (a re-conversion) is ignored and the check runs again.
    record.write_text(json.dumps(dict(saved, graph_md5="0" * 32, max_rel_diff=1.0)))
    assert runtime.make_forward(lite0_model, "auto").name == "onnxruntime" and calls == [4, 4]


GPU_UNUSABLE = """
import features.runtime as rt
rt.nvidia_gpu_installed = lambda: True  # as on a machine whose driver sees a GPU
print("found", rt.accelerators(), rt.accelerators())
"""


@cpu_path
def test_start_up_lines_hidden_and_an_unusable_gpu_said_once_in_our_words():
    """TensorFlow's C++ start-up lines (cudart_stub, cuInit, ...) are not shown; where the driver
    sees a GPU that TensorFlow cannot use (here: no CUDA at all), one warning of ours says so,
    with TensorFlow's reason."""
    out = subprocess.run([sys.executable, "-c", GPU_UNUSABLE], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "found () ()"
    for noise in ("absl::InitializeLog", "cudart_stub", "E0000", "I0000"):
        assert noise not in out.stderr, out.stderr
    said = [l for l in out.stderr.splitlines() if "has an NVIDIA GPU but tensorflow cannot use it" in l]
    assert len(said) == 1, out.stderr
    reason = said[0].split("It said: ", 1)[1]  # TensorFlow's own line, without its log prefix
    assert "cuda" in reason.lower() and "]" not in reason, said[0]
