"""Streaming GAP feature extraction into the HDF5 cache.

    python -m features.extract --data DIR [DIR ...] --backbone NAME [--weights PATH]
                               [--cache DIR] [--batch-size N] [--shard I/N] [--engine ray]

Photos are read, decoded and resized by a small thread pool (on a CPU each thread also runs its
own batch through a single-threaded ONNX Runtime session; on a GPU it decodes a few batches ahead
of the forward pass), so decoding overlaps the network and memory holds only those batches,
whatever the number of photos. Finished chunks are journalled to disk; a killed run resumes where it stopped.
A photo that cannot be read is reported and recorded, and the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

from features import __version__
from features.cache import (FEATURE_FORMAT, Journal, StaleCacheError, add_imagenet, assemble,
                            cache_path, cached_top, check_fresh, extraction_lock, read_attrs,
                            recipe_differences, set_folder)
from features.data import Photo, PhotoReader, PhotoSet, load_photos
from features.defaults import CACHE_DIR, STREAMS, WORKERS, default_data_dirs
from features.images import ImageError, decode_rgb, load_for_backbone, resize
from features.imagenet import load_top, top_identity
from features.models import build_gap_model, resolve_weights, weights_identity
from features.registry import Backbone, get_backbone
from features.quantize import (INT8, INT8_MIN_COSINE, agreement, calibration_sample, describe, load_quantized,
                               quantize, quantized_path, save_quantized)
from features.runtime import (PRECISIONS, RUNTIMES, OnnxForward, accelerators, cached_onnx, choose_precision,
                              int8_kernels_exact, make_forward, onnx_available, onnx_cache_path)
from features.shards import owner, parse_shard, shard_path, write_shard

log = logging.getLogger("gapstack")

# Photos per forward call, by runtime (measured: benchmarks/RESULTS.md): small batches keep a
# single-threaded ONNX Runtime session's activations in the core's cache.
DEFAULT_BATCH = {"onnxruntime": 2, "keras": 32}
DEFAULT_CHUNK = 512  # photos per journalled chunk: the most a kill can cost
ENGINES = ("local", "ray")


def make_recipe(backbone: Backbone, weights_id: str, photos: PhotoSet, fast_decode: bool,
                tta: bool, precision: str = "float32") -> dict:
    """Everything that determines the features; a cache is reused only when all of it matches."""
    return {
        "feature_format": FEATURE_FORMAT,
        "backbone": backbone.name,
        "constructor": backbone.constructor or "saved .keras file",
        "weights_id": weights_id,
        "input_size": list(backbone.input_size),
        "preprocess": backbone.preprocess,
        "resize": backbone.resize,
        "feature_dim": backbone.feature_dim,
        "fast_decode": fast_decode,
        "tta": "flip" if tta else "none",
        "precision": precision,
        "quantization": describe(INT8) if precision == "int8" else "none",
        "data_fingerprint": photos.fingerprint(),
    }


def settled_precision(requested: str, chosen: str, path: Path, recipe_in) -> str:
    """The precision to extract in: ``chosen``, except that "auto" takes a cache already made in
    any precision (before "auto" chose otherwise here, on another machine, or without tf2onnx) as
    it is, rather than refusing it as stale. ``recipe_in(precision)``: the recipe asked for in
    that precision. Decide it again under the cache's lock: another process may have just made it."""
    if requested != "auto" or not path.exists():
        return chosen
    try:
        stored = read_attrs(path)
    except OSError:
        return chosen
    made = stored.get("precision", "float32")
    return made if made in PRECISIONS and not recipe_differences(stored, recipe_in(made)) else chosen


def check_precision(precision: str, runtime: str, graph_at_hand: bool = False) -> None:
    """int8 runs on ONNX Runtime: say so before any work, naming what is missing. Making int8
    features (quantizing) needs the TensorFlow backend on a CPU and tf2onnx; running a graph
    already made (``graph_at_hand``: a saved ensemble's) needs only onnxruntime, on any machine."""
    if precision != "int8":
        return
    if runtime == "keras":
        raise ValueError("--precision int8 runs on ONNX Runtime, not with --runtime keras")
    if graph_at_hand:
        if not importlib.util.find_spec("onnxruntime"):
            raise ValueError("this model's int8 features run on ONNX Runtime: pip install onnxruntime")
        return
    if not onnx_available():
        raise ValueError("--precision int8 needs ONNX Runtime on a CPU: the TensorFlow backend, no GPU, and "
                         "the onnxruntime and tf2onnx packages (pip install onnxruntime tf2onnx)")


def quantized_graph(backbone: Backbone, resolved, train: list[Photo]) -> tuple[bytes, dict]:
    """The backbone's int8 GAP graph, calibrated on training photos (``features.quantize``), and
    how its features agree with float32 on those photos; made once per machine."""
    model = build_gap_model(backbone, resolved)
    float_graph = cached_onnx(model, onnx_cache_path(model))
    pixels, reasons = load_batch(PhotoReader(), calibration_sample(train), backbone, False)
    pixels = pixels[np.array([not r for r in reasons])]  # an unreadable photo is no calibration
    path = quantized_path(float_graph, pixels)
    graph, agreed = load_quantized(path) or (None, None)
    if graph is None:
        float_run = make_forward(model, "onnx", streams=1)  # raises if it differs from Keras
        log.info("%s: quantizing to int8, calibrated on %d training photos (once; kept in %s)",
                 backbone.name, len(pixels), path.parent)
        graph = quantize(float_graph, pixels)
        agreed = agreement(OnnxForward(None, graph=graph)(pixels), float_run(pixels))
        save_quantized(path, graph, agreed)
    log.log(logging.INFO if agreed["cosine"] >= INT8_MIN_COSINE else logging.WARNING,
            "%s int8: features on the %d calibration photos agree with float32 at cosine %.4f%s%s",
            backbone.name, len(pixels), agreed["cosine"], "" if agreed["cosine"] >= INT8_MIN_COSINE else
            f", under the {INT8_MIN_COSINE} the Lite backbones reach: compare its CV with --precision float32",
            "" if int8_kernels_exact() else "; this CPU has no VNNI or AMX, where ONNX Runtime's int8 kernels "
            "saturate, so the int8 graph runs as float arithmetic, slower than --precision float32")
    return graph, agreed


class DecodedPhotos:
    """Photos decoded once for every backbone that needs them: the RGB array of each, or why it
    cannot be read. Holds one chunk's photos at a time (``extract_many``); two threads asking for
    the same photo at once may both decode it, and get the same pixels."""

    def __init__(self, reader: PhotoReader):
        self.reader, self.done = reader, {}

    def rgb(self, photo: Photo) -> np.ndarray:
        hit = self.done.get(photo.id)
        if hit is None:
            try:
                hit = decode_rgb(self.reader.read(photo), photo.name)
            except ImageError as exc:
                hit = exc
            except OSError as exc:
                hit = ImageError(photo.name, f"cannot read file: {exc.strerror or exc}")
            self.done[photo.id] = hit
        if isinstance(hit, ImageError):
            raise hit
        return hit


def load_batch(reader: PhotoReader, photos: list[Photo], backbone: Backbone, fast_decode: bool,
               decoded: DecodedPhotos | None = None):
    """Decode and resize one batch; unreadable photos become zero images with a reason.
    ``decoded``: take the photos already decoded there (the same pixels, decoded once)."""
    height, width = backbone.input_size
    pixels = np.zeros((len(photos), height, width, 3), dtype=np.float32)
    reasons = [""] * len(photos)
    for i, photo in enumerate(photos):
        try:
            if decoded is not None:
                pixels[i] = resize(decoded.rgb(photo), backbone.input_size, backbone.resize)
            else:
                pixels[i] = load_for_backbone(reader.read(photo), photo.name, backbone.input_size,
                                              backbone.resize, fast_decode)
        except ImageError as exc:
            reasons[i] = exc.reason
        except OSError as exc:
            reasons[i] = f"cannot read file: {exc.strerror or exc}"
    return pixels, reasons


class Forward:
    """Fixed-shape forward pass (the last batch is padded, so a graph is traced once), with
    optional flip test-time augmentation."""

    def __init__(self, run, batch_size: int, tta: bool):
        self.run, self.batch_size, self.tta = run, batch_size, tta

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *pixels.shape[1:]), dtype=pixels.dtype)
            pixels = np.concatenate([pixels, pad])
        out = self.run(pixels)
        if self.tta:
            out = (out + self.run(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
        return out[:n]


def _chunks(photos: list[Photo], size: int) -> list[list[Photo]]:
    return [photos[i:i + size] for i in range(0, len(photos), size)]


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    """A tqdm bar: live on a terminal, a widget in a notebook that has ipywidgets (Kaggle's),
    a line every 10 s in a log or a notebook without them (tqdm.auto would warn there)."""
    if importlib.util.find_spec("ipywidgets"):
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0,
                mininterval=0.5 if sys.stderr.isatty() else 10, smoothing=0.1)


def plan_chunks(photos: PhotoSet, chunk_size: int) -> list[tuple[str, int, list[Photo]]]:
    """(split, index, photos) for every journalled chunk: train chunks, then test chunks."""
    return [(split, k, chunk) for split in ("train", "test")
            for k, chunk in enumerate(_chunks(getattr(photos, split), chunk_size))]


def extract(photos: PhotoSet, backbone: Backbone | str, weights="default",
            cache_dir: str | Path = CACHE_DIR, batch_size: int | None = None, workers: int = WORKERS,
            overwrite: bool = False, chunk_size: int = DEFAULT_CHUNK, fast_decode: bool = False,
            tta: bool = False, progress: bool = True, runtime: str = "auto",
            shard: tuple[int, int] | None = None, engine: str = "local",
            ray_address: str | None = None, precision: str = "auto", imagenet: bool = True) -> Path:
    """Extract (or reuse) the GAP features of every photo; returns the cache file's path.

    A cache made with the same recipe is reused; one made differently raises
    ``StaleCacheError`` unless ``overwrite``. An interrupted run resumes from its journal.
    ``runtime`` picks the forward pass ("auto": ONNX Runtime when it matches Keras, see
    ``features.runtime``); ``batch_size`` None means the runtime's measured best.
    ``shard`` (I, N): only chunks g with g mod N == I, into a shard file for ``features.merge``.
    ``engine``: "local" (threads in this process) or "ray" (a Ray Data pipeline, ``features.ray_engine``).
    ``precision``: a Keras dtype policy for the forward pass, or "int8" (ONNX Runtime on a CPU,
    calibrated on training photos: ``quantized_graph``); "auto": ``choose_precision``.
    ``imagenet``: also cache the backbone's ImageNet class logits where its top is at hand
    (``add_top``; not for a shard: the merged cache gets them on its first use).
    """
    if (batch_size is not None and batch_size < 1) or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be positive")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    resolved = resolve_weights(backbone, weights)
    requested = precision
    # A shard never gets int8 by "auto" (each shard would calibrate its own graph).
    n_photos = 0 if shard is not None else len(photos.train) + len(photos.test)
    precision = "float32" if engine == "ray" and precision == "auto" else choose_precision(precision, n_photos, runtime)
    if engine == "ray" and precision != "float32":
        raise ValueError("--engine ray extracts in float32 only")
    check_precision(precision, runtime)
    if shard is not None and precision == "int8":
        raise ValueError("--shard extracts in float32 only (each shard would calibrate its own int8 graph)")
    path = (cache_path(cache_dir, backbone.name, photos) if shard is None
            else shard_path(set_folder(cache_dir, photos), backbone.name, shard))
    recipe_in = functools.partial(make_recipe, backbone, weights_identity(resolved), photos, fast_decode, tta)
    recipe = recipe_in(settled_precision(requested, precision, path, recipe_in))
    if not _reusable(path, recipe, overwrite):
        path.parent.mkdir(parents=True, exist_ok=True)
        with extraction_lock(path, log):
            # Another process may have made it while we waited for the lock.
            recipe = recipe_in(settled_precision(requested, precision, path, recipe_in))
            if not _reusable(path, recipe, overwrite):
                _extract(photos, backbone, resolved, recipe, path, batch_size, workers, chunk_size,
                         fast_decode, tta, progress, runtime, shard, engine, ray_address,
                         recipe["precision"])
    if imagenet and shard is None:
        add_top(path, backbone, resolved)
    return path


def add_top(path: Path, backbone: Backbone, resolved) -> bool:
    """Give the cache the backbone's ImageNet classifier and class logits, if its top is at hand
    and the cache lacks this one; True when the cache has them afterwards. The top is a Dense on
    the GAP features, so its logits come from the cached rows: no pass over the photos."""
    identity = top_identity(backbone, resolved)
    if identity is None:
        return False
    if cached_top(path) == identity:
        return True
    with extraction_lock(path, log):
        if cached_top(path) == identity:
            return True
        started = time.perf_counter()
        top = load_top(backbone, resolved)
        if top is None:
            return False
        add_imagenet(path, top)
    log.info("%s: ImageNet classifier of %s cached with its class logits (%.1f s)", path,
             backbone.name, time.perf_counter() - started)
    return True


def _reusable(path: Path, recipe: dict, overwrite: bool) -> bool:
    """True when ``path`` holds features made by ``recipe``; a stale one raises unless ``overwrite``."""
    if not path.exists():
        return False
    try:
        check_fresh(path, recipe)
    except StaleCacheError:
        if not overwrite:
            raise
        log.warning("%s: stale, recomputing (--overwrite)", path)
        return False
    log.info("%s: up to date, reusing it", path)
    return True


def _extract(photos: PhotoSet, backbone: Backbone, resolved, recipe: dict, path: Path,
             batch_size: int | None, workers: int, chunk_size: int, fast_decode: bool, tta: bool,
             progress: bool, runtime: str, shard, engine: str, ray_address: str | None,
             precision: str) -> None:
    """The extraction itself, under the cache's lock: journal the pending chunks, then assemble."""
    graph, agreed = quantized_graph(backbone, resolved, photos.train) if precision == "int8" else (None, None)
    journal = Journal(path.with_name(path.name + ".partial"), recipe, graph)
    every = plan_chunks(photos, chunk_size)
    chunks = _chunk_counts(every)
    tasks = every if shard is None else [t for g, t in enumerate(every) if owner(g, shard[1]) == shard[0]]
    pending = [t for t in tasks if not journal.has(t[0], t[1])]
    done = sum(len(t[2]) for t in tasks) - sum(len(t[2]) for t in pending)
    if done:
        log.info("%s: resuming, %d photos already extracted", path, done)
    run = {"runtime": "none (all chunks journalled)"}
    if pending:
        if engine == "ray":  # imported by name: an optional extra, and not part of kernel.py
            run_ray = importlib.import_module("features.ray_engine").run_ray
            run = {"runtime": run_ray(pending, journal, backbone, resolved, batch_size, fast_decode,
                                      tta, progress, runtime, ray_address)}
        else:
            run = _run(pending, journal, backbone, resolved, batch_size, workers, fast_decode, tta,
                       progress, runtime, precision, graph)
    attrs = _attrs(recipe, resolved, run, photos, backbone, agreed)
    labels = {p.id: p.label for p in photos.train}
    if shard is None:
        assemble(path, journal, chunks, labels, backbone.feature_dim, attrs, graph)
    else:
        write_shard(path, journal, tasks, labels,
                    dict(attrs, shard=list(shard), chunk_size=chunk_size, chunks=chunks, engine=engine))
    journal.remove()


def _attrs(recipe: dict, resolved, run: dict, photos: PhotoSet, backbone: Backbone,
           int8_agreement: dict | None = None) -> dict:
    """The cache's attributes: the recipe, and how this run made it."""
    run = dict(run)
    extra = {"int8_agreement": int8_agreement} if int8_agreement else {}
    return dict(recipe, **extra, gapstack_version=__version__, weights=str(resolved),
                keras_version=_keras_version(), backend=_backend(), runtime=run.pop("runtime"),
                last_run=run,
                n_train=len(photos.train), n_test=len(photos.test), sources=photos.sources,
                registry_entry=asdict(backbone), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _chunk_counts(every) -> dict[str, int]:
    return {s: sum(1 for t in every if t[0] == s) for s in ("train", "test")}


def extract_many(photos: PhotoSet, backbones: list, weights="default",
                 cache_dir: str | Path = CACHE_DIR, batch_size: int | None = None,
                 workers: int = WORKERS, overwrite: bool = False, chunk_size: int = DEFAULT_CHUNK,
                 tta: bool = False, progress: bool = True, runtime: str = "auto",
                 precision: str = "auto", imagenet: bool = True) -> dict[str, Path]:
    """``extract`` for several backbones in one pass: each photo is decoded once per chunk and
    resized for every backbone that still needs it. Meant for a GPU fast enough that decoding is
    the bound; on a CPU it measured no faster (ONNX Runtime) or slower (Keras), benchmarks/RESULTS.md.
    Each backbone keeps its own cache, recipe, lock and journal, and gets the cache ``extract``
    makes (tested). Returns {backbone name: path}."""
    chosen = choose_precision(precision, len(photos.train) + len(photos.test), runtime)
    check_precision(chosen, runtime)

    def entry(b):
        backbone = get_backbone(b) if isinstance(b, str) else b
        resolved = resolve_weights(backbone, weights)
        path = cache_path(cache_dir, backbone.name, photos)
        recipe_in = functools.partial(make_recipe, backbone, weights_identity(resolved), photos, False, tta)
        return backbone, resolved, recipe_in(settled_precision(precision, chosen, path, recipe_in)), path

    entries = [entry(b) for b in backbones]
    todo = [e for e in entries if not _reusable(e[3], e[2], overwrite)]
    if len(todo) > 1:
        with ExitStack() as locks:
            for e in sorted(todo, key=lambda e: str(e[3])):  # one order: no deadlock
                e[3].parent.mkdir(parents=True, exist_ok=True)
                locks.enter_context(extraction_lock(e[3], log))
            todo = [e for e in map(entry, (e[0] for e in todo)) if not _reusable(e[3], e[2], overwrite)]
            if todo:
                _extract_together(photos, todo, batch_size, workers, chunk_size, tta, progress, runtime)
    # What is left (one backbone, or none) goes the usual way; made caches are found fresh.
    return {e[0].name: extract(photos, e[0], e[1], cache_dir, batch_size, workers, overwrite, chunk_size,
                               tta=tta, progress=progress, runtime=runtime, precision=precision,
                               imagenet=imagenet)
            for e in entries}


def _extract_together(photos: PhotoSet, todo: list, batch_size: int | None, workers: int,
                      chunk_size: int, tta: bool, progress: bool, runtime: str) -> None:
    """Chunk by chunk, every backbone of ``todo`` over the same decoded photos; then each cache."""
    every = plan_chunks(photos, chunk_size)
    int8 = {b.name: quantized_graph(b, resolved, photos.train) if recipe["precision"] == "int8" else (None, None)
            for b, resolved, recipe, _ in todo}
    journals = {b.name: Journal(path.with_name(path.name + ".partial"), recipe, int8[b.name][0])
                for b, _, recipe, path in todo}
    extractors = {b.name: Extractor(b, resolved, runtime, batch_size, workers, False, tta,
                                    precision=recipe["precision"], graph=int8[b.name][0])
                  for b, resolved, recipe, _ in todo}
    needs = [(split, k, chunk, [n for n in extractors if not journals[n].has(split, k)])
             for split, k, chunk in every]
    needs = [t for t in needs if t[3]]
    bar = progress_bar(sum(len(t[2]) * len(t[3]) for t in needs), "+".join(extractors), progress)
    seconds, done, reported = dict.fromkeys(extractors, 0.0), dict.fromkeys(extractors, 0), set()
    reader = PhotoReader()
    for split, k, chunk, names in needs:
        decoded = DecodedPhotos(reader)  # one chunk of decoded photos in memory at a time
        for name in names:
            ex = extractors[name]
            started = time.perf_counter()
            feats, reasons = [], []
            batches = [chunk[i:i + ex.batch_size] for i in range(0, len(chunk), ex.batch_size)]
            for batch, out, why in ex.stream(batches, decoded=decoded):
                feats.append(out)
                reasons.extend(why)
                bar.update(len(batch))
            journals[name].save(split, k, [p.id for p in chunk], np.concatenate(feats),
                                np.array([not r for r in reasons]), reasons)
            seconds[name] += time.perf_counter() - started
            done[name] += len(chunk)
            for photo, reason in zip(chunk, reasons):
                if reason and photo.id not in reported:
                    reported.add(photo.id)
                    log.warning("skipped %s: %s", photo.name, reason)
    bar.close()
    labels = {p.id: p.label for p in photos.train}
    for backbone, resolved, recipe, path in todo:
        ex = extractors[backbone.name]
        run = ex.last_run(done[backbone.name], seconds[backbone.name], decoded_once_with=list(extractors))
        log.info("%s: %d photos in %.1f s (%.1f img/s, %s, %s), photos decoded once for %s",
                 backbone.name, done[backbone.name], seconds[backbone.name],
                 done[backbone.name] / max(seconds[backbone.name], 1e-9), ex.run.name, ex.precision,
                 "+".join(extractors))
        assemble(path, journals[backbone.name], _chunk_counts(every), labels, backbone.feature_dim,
                 _attrs(recipe, resolved, run, photos, backbone, int8[backbone.name][1]), int8[backbone.name][0])
        journals[backbone.name].remove()


class Extractor:
    """A backbone ready to turn photos into GAP features: model built and runtime chosen once."""

    def __init__(self, backbone: Backbone | str, weights="default", runtime: str = "auto",
                 batch_size: int | None = None, workers: int = WORKERS, fast_decode: bool = False,
                 tta: bool = False, model=None, streams: int | None = None,
                 devices: list[str] | None = None, precision: str = "float32", graph: bytes | None = None):
        """``model``: a ready Keras model (raw pixels in) to run instead of the backbone's GAP model.
        ``streams``: concurrent forward passes on a CPU runtime (None: ``STREAMS``, for bulk
        throughput; 1: one pass on every core, the lowest latency for a single photo).
        ``devices``: one model replica per device (default: every GPU when there are several).
        ``precision``: Keras dtype policy of the GAP model (not float32: Keras runs it, since the
        ONNX Runtime path is checked against float32 Keras), or "int8": ONNX Runtime runs
        ``graph``, the backbone's quantized graph (``quantized_graph``)."""
        self.backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.precision = precision
        if precision == "int8":  # the graph is the whole network: no float weights, no Keras
            if graph is None:
                raise ValueError(f"{self.backbone.name}: int8 needs its quantized graph")
            check_precision(precision, runtime, graph_at_hand=True)
            self.weights = None
            self.run = OnnxForward(None, streams=streams or STREAMS, graph=graph)
        else:
            self.weights = resolve_weights(self.backbone, weights)
            model = model if model is not None else build_gap_model(self.backbone, self.weights, precision)
            if precision != "float32" and runtime != "keras":
                if runtime == "onnx":
                    raise ValueError(f"--runtime onnx runs float32 only, not {precision}")
                runtime = "keras"
            self.run = make_forward(model, runtime, streams=streams or STREAMS, devices=devices)
        self.batch_size = batch_size or DEFAULT_BATCH[self.run.name]
        self.forward = Forward(self.run, self.batch_size, tta)
        self.workers, self.fast_decode = max(1, workers), fast_decode
        self.reader = PhotoReader()

    def last_run(self, photos: int, seconds: float, **extra) -> dict:
        """How a run went, for the cache's ``last_run`` attribute (and its ``runtime``)."""
        return {"runtime": self.run.name, "precision": self.precision, "batch_size": self.batch_size,
                "streams": self.run.streams, "device_batches": getattr(self.run, "batches", None),
                "workers": self.workers, "photos": photos, "seconds": round(seconds, 3), **extra}

    def stream(self, batches: list[list[Photo]], reader=None, decoded: DecodedPhotos | None = None):
        """Yield (photos, features, reasons) per batch, in order; features are NaN where the
        photo could not be read (reason non-empty). ``reader``: where the bytes come from
        (default: files and zip members); ``decoded``: photos decoded once for several backbones.

        With one stream (Keras, a GPU) worker threads decode a few batches ahead of the forward
        pass in this thread; with several (ONNX Runtime on a CPU) each worker decodes a batch and
        runs it on a free session, so every core alternates between the two with no hand-off.
        """
        reader = reader or self.reader
        concurrent = self.run.streams > 1

        def job(batch):
            pixels, reasons = load_batch(reader, batch, self.backbone, self.fast_decode, decoded)
            return (self.forward(pixels) if concurrent else pixels), reasons

        threads = max(self.workers, self.run.streams)
        # Batches in flight: enough that no thread waits for the one at the head of the line.
        ahead = 2 * threads if concurrent else threads + 1
        with ThreadPoolExecutor(threads) as pool:
            window: deque = deque()
            queue = iter(batches)

            def top_up():
                while len(window) < ahead:
                    batch = next(queue, None)
                    if batch is None:
                        return
                    window.append((batch, pool.submit(job, batch)))

            top_up()
            while window:
                batch, future = window.popleft()
                out, reasons = future.result()
                top_up()
                if not concurrent:
                    out = self.forward(out)
                out[np.array([bool(r) for r in reasons])] = np.nan
                yield batch, out, reasons

    def features(self, photos: list[Photo], reader=None) -> tuple[np.ndarray, list[str]]:
        """Features of a list of photos in memory (for prediction; extraction uses the cache)."""
        batches = [photos[i:i + self.batch_size] for i in range(0, len(photos), self.batch_size)]
        parts, reasons = [], []
        for _, feats, why in self.stream(batches, reader):
            parts.append(feats)
            reasons.extend(why)
        return np.concatenate(parts), reasons


def _run(pending, journal: Journal, backbone: Backbone, resolved, batch_size: int | None,
         workers: int, fast_decode: bool, tta: bool, progress: bool, runtime: str,
         precision: str = "float32", graph: bytes | None = None) -> dict:
    """Extract the pending chunks into the journal; returns the runtime used and how it went
    (kept in the cache's ``last_run`` attribute: settings, photos, seconds once the model was ready)."""
    ex = Extractor(backbone, resolved, runtime, batch_size, workers, fast_decode, tta, precision=precision,
                   graph=graph)
    tasks = [(split, k, chunk, chunk[i:i + ex.batch_size])
             for split, k, chunk in pending for i in range(0, len(chunk), ex.batch_size)]
    total = sum(len(t[3]) for t in tasks)
    bar = progress_bar(total, backbone.name, progress)
    started, failures = time.perf_counter(), 0
    feats, reasons_all = [], []
    for (split, k, chunk, _), (batch, out, reasons) in zip(tasks, ex.stream([t[3] for t in tasks])):
        for photo, reason in zip(batch, reasons):
            if reason:
                failures += 1
                log.warning("skipped %s: %s", photo.name, reason)
        feats.append(out)
        reasons_all.extend(reasons)
        bar.update(len(batch))
        if len(reasons_all) == len(chunk):
            journal.save(split, k, [p.id for p in chunk], np.concatenate(feats),
                         np.array([not r for r in reasons_all]), reasons_all)
            feats, reasons_all = [], []
    bar.close()
    elapsed = time.perf_counter() - started
    log.info("%s: %d photos in %.1f s (%.1f img/s, %s, %s, batch %d, %d stream(s)), %d unreadable",
             backbone.name, total, elapsed, total / max(elapsed, 1e-9), ex.run.name, precision,
             ex.batch_size, ex.run.streams, failures)
    return ex.last_run(total, elapsed)


def _keras_version() -> str:
    import keras

    return keras.__version__


def _backend() -> str:
    import keras

    return keras.backend.backend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=None,
                        help="Kaggle-layout folder(s) (train/, test/ or train.zip, test.zip); "
                             "default: the Kaggle input, else the shared sample")
    parser.add_argument("--backbone", required=True,
                        help="registered name (see --list) or the path of a saved .keras model")
    parser.add_argument("--weights", default="default",
                        help="'imagenet', a weights file, or a folder holding the entry's file "
                             "(default: the entry's default)")
    parser.add_argument("--cache", default=str(CACHE_DIR), help="cache folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="photos per forward call (default: the runtime's measured best)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="forward pass: ONNX Runtime if it matches Keras (auto), or force one")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="how the features are computed: a Keras dtype policy, or int8 (ONNX "
                             "Runtime on a CPU, calibrated on training photos). auto: mixed_float16 "
                             "on GPUs with tensor cores; on a CPU, int8 where it pays (see "
                             "benchmarks/RESULTS.md), else float32")
    parser.add_argument("--workers", type=int, default=WORKERS, help="decoding threads (default: cores)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                        help="photos per journalled chunk (what a killed run may redo)")
    parser.add_argument("--tta", action="store_true", help="average features of the photo and its mirror")
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode large JPEGs at reduced size (faster, features differ slightly)")
    parser.add_argument("--overwrite", action="store_true", help="recompute a stale cache")
    parser.add_argument("--no-imagenet", action="store_true",
                        help="do not cache the backbone's ImageNet class logits (cached by default "
                             "where its top weights are at hand)")
    parser.add_argument("--no-test", action="store_true", help="allow data with no test split")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="extract only shard I of N into its own file (join with python -m features.merge)")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: threads in this process; ray: a Ray Data pipeline (pip install gapstack[ray])")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: start a local Ray instance)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        shard = parse_shard(args.shard) if args.shard else None
        photos = load_photos(args.data or default_data_dirs(), require_test=not args.no_test)
        weights = None if args.weights == "none" else args.weights
        path = extract(photos, args.backbone, weights, args.cache, args.batch_size, args.workers,
                       args.overwrite, args.chunk_size, args.fast_decode, args.tta,
                       runtime=args.runtime, shard=shard, engine=args.engine,
                       ray_address=args.ray_address, precision=args.precision,
                       imagenet=not args.no_imagenet)
    except (ValueError, KeyError, FileNotFoundError, StaleCacheError, RuntimeError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def setup_logging() -> None:
    """Our messages on stderr for command-line use; quiet TensorFlow's and tf2onnx's chatter
    (TensorFlow starts here, its C++ start-up lines hidden: ``features.runtime.accelerators``)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    for noisy in ("tf2onnx", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    accelerators()


if __name__ == "__main__":
    sys.exit(main())
