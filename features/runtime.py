"""Where the forward pass runs: ONNX Runtime on CPU when it is available and agrees with Keras,
else Keras itself.

On this project's 2-core CPUs, ONNX Runtime runs EfficientNet-Lite0 2.4x faster than TensorFlow
(benchmarks/RESULTS.md) with the same float32 features. A converted graph is checked against the
Keras model on one batch before use (the verdict is kept beside the cached graph); beyond
``TOLERANCE`` it is not used, so a faster path never silently changes results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import queue
import re
from pathlib import Path

import numpy as np

from features.cache import atomic_write
from features.defaults import ONNX_CACHE

log = logging.getLogger("gapstack")

RUNTIMES = ("auto", "onnx", "keras")
OPSET = 17
# Largest absolute difference allowed between ONNX Runtime and Keras features, relative to the
# largest feature value of the check batch.
TOLERANCE = 1e-4


class KerasForward:
    """Keras ``predict_on_batch``: any backend, any device. One caller at a time (``streams`` 1)."""

    name = "keras"
    streams = 1

    def __init__(self, model):
        self.model = model

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(pixels), dtype=np.float32)


class OnnxForward:
    """The Keras graph converted by tf2onnx, run by ONNX Runtime (TensorFlow backend only).

    ``streams`` sessions share the cores (``threads`` each, default cores // streams) and serve up
    to that many callers at once: one session for the lowest latency on one photo, one per core
    for bulk throughput.
    """

    name = "onnxruntime"

    def __init__(self, model, threads: int | None = None, cache: Path | None = None, streams: int = 1):
        """``cache``: folder of converted graphs (default ``ONNX_CACHE``)."""
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self.streams = streams
        self.threads = threads or max(1, (os.cpu_count() or 1) // streams)
        self.path = path = onnx_cache_path(model, cache)
        try:
            graph = cached_onnx(model, path)
            first = self._session(graph)
        except Exception:  # a damaged cached graph: convert again (raises if conversion fails)
            path.unlink(missing_ok=True)
            graph = cached_onnx(model, path)
            first = self._session(graph)
        self.graph_md5 = hashlib.md5(graph).hexdigest()
        self.sessions: queue.SimpleQueue = queue.SimpleQueue()
        for session in [first] + [self._session(graph) for _ in range(streams - 1)]:
            self.sessions.put(session)
        self.input = first.get_inputs()[0].name

    def _session(self, graph: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        # ONNX Runtime's threads spin between calls by default, taking the cores our decoding
        # threads need: off, end to end went from 174 to 191 img/s (forward alone: -1 %).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        session = self.sessions.get()  # waits while every session is busy
        try:
            return session.run(None, {self.input: np.ascontiguousarray(pixels, np.float32)})[0]
        finally:
            self.sessions.put(session)


def to_onnx(model, output_name: str | None = None):
    """The Keras model (TensorFlow backend) as an ONNX ModelProto with input "pixels" (any batch)."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="pixels"),)
    if output_name:
        fn = tf.function(lambda pixels: {output_name: model(pixels, training=False)})
    else:
        fn = tf.function(lambda pixels: model(pixels, training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    return proto


def model_key(model) -> str:
    """Changes whenever the graph, the weights or the converter would: md5 of the model's config,
    every weight's bytes, the input shape and the versions of TensorFlow, Keras, tf2onnx and onnx."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    digest = hashlib.md5()
    for part in (tf.__version__, keras.__version__, tf2onnx.__version__, onnx.__version__, str(OPSET),
                 str(model.input_shape), model.to_json()):
        digest.update(part.encode())
    for w in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return digest.hexdigest()


def onnx_cache_path(model, folder: Path | None = None) -> Path:
    safe = re.sub(r"[^\w.-]", "_", model.name)
    return Path(folder or ONNX_CACHE) / f"{safe}-{model_key(model)}.onnx"


def cached_onnx(model, path: Path) -> bytes:
    """The model's ONNX bytes, converted once per machine: tf2onnx takes 4-6 s a backbone, as long
    as extracting a thousand photos. An unwritable cache only costs a new conversion each time."""
    folder = path.parent
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = to_onnx(model).SerializeToString()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    except OSError as exc:
        log.info("could not keep the converted graph in %s (%s)", folder, exc)
    return data


def has_gpu() -> bool:
    """True when Keras runs on an accelerator (then it, not a CPU runtime, should do the work)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if keras.backend.backend() == "jax":
        import jax

        return jax.default_backend() != "cpu"
    return False


def onnx_available() -> bool:
    """ONNX Runtime can take over: TensorFlow backend on a CPU, with tf2onnx and onnxruntime."""
    import keras

    if keras.backend.backend() != "tensorflow" or has_gpu():
        return False
    return all(importlib.util.find_spec(name) for name in ("onnxruntime", "tf2onnx"))


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def make_forward(model, runtime: str = "auto", streams: int = 1):
    """A callable pixels -> features for ``model`` on the chosen runtime.

    "auto": ONNX Runtime if installed, on the TensorFlow backend without a GPU, and within
    ``TOLERANCE`` of Keras (``checked_difference``); otherwise Keras. "onnx" insists (raises if
    unavailable or off). ``streams``: how many callers ONNX Runtime serves at once (Keras: one).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    keras_forward = KerasForward(model)
    if runtime == "keras" or (runtime == "auto" and not onnx_available()):
        return keras_forward
    try:
        fast = OnnxForward(model, streams=streams)
    except Exception as exc:  # converter failures come in many types
        if runtime == "onnx":
            raise RuntimeError(f"ONNX Runtime unavailable for {model.name}: {exc}") from exc
        log.warning("ONNX conversion of %s failed (%s); using Keras", model.name, exc)
        return keras_forward
    diff = checked_difference(fast, keras_forward, model.input_shape[1:])
    if diff > TOLERANCE:
        message = f"ONNX Runtime differs from Keras by {diff:.2e} (tolerance {TOLERANCE:.0e})"
        if runtime == "onnx":
            raise RuntimeError(message)
        log.warning("%s for %s; using Keras", message, model.name)
        return keras_forward
    return fast


def checked_difference(fast: OnnxForward, reference: KerasForward, shape: tuple) -> float:
    """Largest relative difference of ONNX Runtime from Keras on four seeded random photos.

    The answer is kept beside the cached graph, stamped with the graph's md5 and ONNX Runtime's
    version (the graph's name already carries the model and the TensorFlow/Keras versions), so
    later runs skip Keras' first call: about 0.6 s a backbone at every start.
    """
    import onnxruntime as ort

    record = fast.path.with_suffix(".check.json")
    stamp = {"graph_md5": fast.graph_md5, "onnxruntime": ort.__version__}
    try:
        saved = json.loads(record.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return float(saved["max_rel_diff"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    batch = np.random.default_rng(0).uniform(0, 255, (4, *shape)).astype(np.float32)
    diff = max_relative_difference(fast(batch), reference(batch))
    try:
        atomic_write(record, lambda f: f.write(json.dumps(dict(stamp, max_rel_diff=diff)).encode()))
    except OSError:  # an unwritable cache only costs the check next time
        pass
    return diff
