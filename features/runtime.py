"""Where the forward pass runs: ONNX Runtime on CPU when it is available and agrees with Keras,
else Keras itself.

On this project's 2-core CPUs, ONNX Runtime runs EfficientNet-Lite0 2.4x faster than TensorFlow
(benchmarks/RESULTS.md) with the same float32 features. A converted graph is checked against the
Keras model on one batch before use (the verdict is kept beside the cached graph); beyond
``TOLERANCE`` it is not used, so a faster path never silently changes results.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import queue
import re
import sys
import tempfile
from contextlib import contextmanager
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

    def __init__(self, model, threads: int | None = None, cache: Path | None = None, streams: int = 1,
                 graph: bytes | None = None):
        """``cache``: folder of converted graphs (default ``ONNX_CACHE``). ``graph``: run this ONNX
        graph instead of converting ``model`` (an int8 one, ``features.quantize``; ``path`` is None)."""
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self.streams = streams
        self.threads = threads or max(1, (os.cpu_count() or 1) // streams)
        self.path = path = None if graph is not None else onnx_cache_path(model, cache)
        if graph is not None:
            first = self._session(graph)
        else:
            try:
                graph = cached_onnx(model, path)
                first = self._session(graph)
            except Exception:  # a damaged cached graph: convert again (raises if conversion fails)
                path.unlink(missing_ok=True)
                graph = cached_onnx(model, path)
                first = self._session(graph)
        self.graph = graph
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
        run_int8_exactly(options, graph)
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


# TensorFlow's C++ start-up lines ("Could not find cuda drivers", "failed call to cuInit", CPU
# instruction notes): written to the process's stderr by native code before TensorFlow's logging
# is set up, so TF_CPP_MIN_LOG_LEVEL hides only some of them. A new user reads them as failures.
NATIVE_STARTUP = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|"
                            r"[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] |"  # absl (TF 2.16+)
                            r"\d{4}-\d\d-\d\d [\d:.]+: [IWEF] [\w/.-]+:\d+\] |"  # TF's own (2.18)
                            r"To enable the following instructions:|WARNING: Logging before InitGoogle")


@contextmanager
def native_stderr_filtered(hidden: list[str]):
    """Run a block with file descriptor 2 captured; afterwards pass on every line but TensorFlow's
    start-up lines, which go to ``hidden`` (``GAPSTACK_TF_LOG=1`` shows them all)."""
    if os.environ.get("GAPSTACK_TF_LOG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if NATIVE_STARTUP.match(line):
                    hidden.append(line)
                else:
                    print(line, file=sys.stderr)


def nvidia_gpu_installed() -> bool:
    """An NVIDIA driver sees a GPU on this machine (whatever TensorFlow makes of it)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


@functools.lru_cache(maxsize=None)
def accelerators() -> tuple[str, ...]:
    """The accelerators Keras will use, found once, with TensorFlow's start-up lines hidden.

    A GPU the driver sees but TensorFlow cannot use is the one real problem among those lines:
    it is said once, in our words, with TensorFlow's own reason.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's later INFO/WARNING lines
    hidden: list[str] = []
    with native_stderr_filtered(hidden):
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            found = tuple(d.name for d in tf.config.list_logical_devices("GPU"))
        elif keras.backend.backend() == "jax":
            import jax

            found = tuple(str(d) for d in jax.devices()) if jax.default_backend() != "cpu" else ()
        else:
            found = ()
    if not found and nvidia_gpu_installed():
        why = next((l.split("] ", 1)[-1] for l in hidden if "cuInit" in l or "cuda" in l.lower()), "")
        log.warning("This machine has an NVIDIA GPU but %s cannot use it, so everything runs on the "
                    "CPU, many times slower.%s", keras.backend.backend(),
                    f" It said: {why}" if why else "")
    return found


# The Keras dtype policies, and int8 (ONNX Runtime on a CPU, ``features.quantize``).
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16", "int8")
# Tensor cores (float16 matrix units) start at compute capability 7.0: T4 7.5, V100 7.0; P100
# (6.0) runs float16 no faster than float32 in practice. benchmarks/RESULTS.md: float16 features
# move every model's CV log loss far less than the fold seed does.
TENSOR_CORES = (7, 0)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each GPU TensorFlow sees (empty on a CPU or another backend)."""
    if not accelerators() or not _backend_is("tensorflow"):
        return []
    import tensorflow as tf

    details = [tf.config.experimental.get_device_details(d) for d in tf.config.list_physical_devices("GPU")]
    return [tuple(d.get("compute_capability") or (0, 0)) for d in details]


# int8 features (``features.quantize``) where the CPU multiplies int8 in hardware.
INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8")
# "auto" may pick int8: on the 9,619 shared photos every model's CV log loss stayed within the fold
# seed's noise with int8 features (benchmarks/RESULTS.md, "int8 features").
INT8_BY_DEFAULT = True
# ... from this many photos: calibrating costs 13-23 s a backbone (once per machine), which int8's
# faster extraction wins back from about 2,800 photos (Lite1) to 4,600 (Lite0), measured here.
INT8_MIN_PHOTOS = 5_000


def cpu_info() -> dict[str, str]:
    """The CPU's ``model name`` and ``flags`` from /proc/cpuinfo (their first lines; {} where
    there is no such file): what it can run, and what a speed measured on it holds for."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "flags"):
                    info.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return info


def int8_dot_product() -> bool:
    """The CPU has int8 dot-product instructions (VNNI or AMX), from /proc/cpuinfo's flags."""
    flags = cpu_info().get("flags", "").split()
    return any(flag in flags for flag in INT8_DOT_PRODUCT)


def int8_kernels_exact() -> bool:
    """ONNX Runtime's fused int8 kernels compute exactly here (``run_int8_exactly``): an x86 CPU
    with VNNI or AMX, or a CPU of another kind (the 16-bit pair sums are x86's VPMADDUBSW's)."""
    return platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86") or int8_dot_product()


def run_int8_exactly(options, graph: bytes) -> None:
    """Make a session of ``graph`` compute what its quantized (QDQ) nodes say, on any CPU. ONNX
    Runtime's fused int8 kernels add products in 32 bits with VNNI or AMX, but with AVX2 alone
    (VPMADDUBSW) they add pairs of uint8 x int8 products in 16 bits, which saturate: Lite0's
    features at cosine 0.90 to float32 there, against 0.994 computed exactly (benchmarks/RESULTS.md,
    "int8 on a CPU without VNNI"). There the QDQ pairs stay unfused and run as float arithmetic on
    the int8 values, at half to 0.7 of float32's speed: one int8 graph gives the same features on every
    machine, and a saved int8 ensemble predicts as it was trained."""
    if b"QuantizeLinear" in graph and not int8_kernels_exact():
        options.add_session_config_entry("session.disable_quant_qdq", "1")


def choose_precision(requested: str = "auto", photos: int | None = None, runtime: str = "auto") -> str:
    """The precision extraction runs in. "auto": mixed_float16 where every GPU has tensor cores;
    on a CPU, int8 for ``photos`` enough to pay for its calibration (``INT8_MIN_PHOTOS``) where
    the CPU has int8 instructions and ONNX Runtime runs; else float32 (float16 and bfloat16 are
    slower on CPUs and older GPUs, measured)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return requested
    capabilities = gpu_compute_capabilities()
    if capabilities:
        return "mixed_float16" if min(capabilities) >= TENSOR_CORES else "float32"
    if (INT8_BY_DEFAULT and runtime != "keras" and (photos or 0) >= INT8_MIN_PHOTOS
            and int8_dot_product() and onnx_available()):
        return "int8"
    return "float32"


def has_gpu() -> bool:
    """True when Keras runs on an accelerator (then it, not a CPU runtime, should do the work)."""
    return bool(accelerators())


class ReplicatedForward:
    """One copy of the model on each device (Kaggle's T4 x2: one per GPU), each serving one caller
    at a time: ``streams`` callers decode and run their batches side by side (TensorFlow backend)."""

    name = "keras"

    def __init__(self, model, devices: list[str]):
        import keras
        import tensorflow as tf

        if len(devices) < 2:
            raise ValueError("ReplicatedForward needs at least two devices")
        self.streams, self.devices = len(devices), list(devices)
        self.batches = dict.fromkeys(self.devices, 0)  # batches each device ran (last_run, tests)
        self.replicas: queue.SimpleQueue = queue.SimpleQueue()
        weights = model.get_weights()
        for device in devices:
            with tf.device(device):
                clone = keras.models.clone_model(model)
                clone.set_weights(weights)
                run = tf.function(lambda x, m=clone: m(x, training=False))
            self.replicas.put((device, clone, run))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        device, model, run = self.replicas.get()  # waits while every replica is busy
        try:
            with tf.device(device):
                out = np.array(run(tf.constant(pixels, tf.float32)), dtype=np.float32)  # a writable copy
            self.batches[device] += 1
            return out
        finally:
            self.replicas.put((device, model, run))


def _backend_is(name: str) -> bool:
    import keras

    return keras.backend.backend() == name


def onnx_available() -> bool:
    """ONNX Runtime can take over: TensorFlow backend on a CPU, with tf2onnx and onnxruntime."""
    if not _backend_is("tensorflow") or has_gpu():
        return False
    return all(importlib.util.find_spec(name) for name in ("onnxruntime", "tf2onnx"))


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def make_forward(model, runtime: str = "auto", streams: int = 1, devices: list[str] | None = None):
    """A callable pixels -> features for ``model`` on the chosen runtime.

    "auto": ONNX Runtime if installed, on the TensorFlow backend without a GPU, and within
    ``TOLERANCE`` of Keras (``checked_difference``); otherwise Keras. "onnx" insists (raises if
    unavailable or off). ``streams``: how many callers ONNX Runtime serves at once (Keras: one).
    ``devices``: run Keras on these devices, one replica each (default: every GPU when there are
    several, as on Kaggle's T4 x2; ``streams`` then does not apply).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if devices is None and runtime != "onnx" and len(accelerators()) > 1 and _backend_is("tensorflow"):
        devices = list(accelerators())
    if devices and len(devices) > 1:
        return ReplicatedForward(model, devices)
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
