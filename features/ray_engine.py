"""The extraction as a Ray Data pipeline: decoding as parallel tasks, the forward pass in a pool of
actors (one model load each, a GPU each when the cluster has them), results journalled by the
driver exactly as the local engine does, so the cache (and resuming) is the same.

    python -m features.extract --engine ray [--ray-address auto|ray://HOST:10001] ...

Ray is an optional extra: ``pip install gapstack[ray]``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from features.data import Photo, PhotoReader
from features.extract import DEFAULT_BATCH, Forward, load_batch
from features.models import build_gap_model
from features.registry import Backbone
from features.runtime import make_forward

log = logging.getLogger("gapstack")

# An actor on a CPU runs one ONNX Runtime session on all its cores (not one per core, as local
# extraction does); batch 8 suits that layout and Ray's per-batch overhead (2,603 shared photos,
# Lite0, one actor: 110 img/s at batch 8, 90 at batch 2).
ACTOR_CPU_BATCH = 8


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'gapstack[ray]' "
                           f"(or pip install 'ray[data]'); {exc}") from None
    return ray


class _Decode:
    """Ray task: photo rows -> uint8 pixels at the backbone's size, and a reason per unreadable one."""

    def __init__(self, backbone: Backbone, fast_decode: bool):
        self.backbone, self.fast_decode = backbone, fast_decode
        self.reader = PhotoReader()

    def __call__(self, batch: dict) -> dict:
        photos = [Photo(i, -1, p, m or None) for i, p, m in zip(batch["id"], batch["path"], batch["member"])]
        pixels, reasons = load_batch(self.reader, photos, self.backbone, self.fast_decode)
        return {"key": batch["key"], "pixels": pixels.astype(np.uint8), "reason": np.array(reasons, dtype=object)}


class _Embed:
    """Ray actor: the backbone's GAP model, built once, on the chosen runtime."""

    def __init__(self, backbone: Backbone, weights, runtime: str, batch_size: int, tta: bool):
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        run = make_forward(build_gap_model(backbone, weights), runtime)
        self.forward = Forward(run, batch_size, tta)
        self.runtime = run.name

    def __call__(self, batch: dict) -> dict:
        features = self.forward(batch["pixels"].astype(np.float32))
        return {"key": batch["key"], "features": features, "reason": batch["reason"],
                "runtime": np.array([self.runtime] * len(features), dtype=object)}


def run_ray(pending, journal, backbone: Backbone, resolved, batch_size: int | None, fast_decode: bool,
            tta: bool, progress: bool, runtime: str, address: str | None = None,
            actors: int | None = None) -> str:
    """Extract the pending chunks ((split, index, photos)) through Ray into the journal; returns the runtime."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = actors or max(1, gpus or int(resources.get("CPU", 1)) // 2)
    rows, chunks = [], {}
    for split, index, photos in pending:
        chunks[(split, index)] = photos
        rows += [{"key": f"{split}/{index}/{pos}", "id": p.id, "path": p.path, "member": p.member or ""}
                 for pos, p in enumerate(photos)]
    batch = batch_size or (DEFAULT_BATCH["keras"] if gpus else ACTOR_CPU_BATCH)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = (ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // (4 * batch)))
          .map_batches(_Decode, fn_constructor_kwargs={"backbone": backbone, "fast_decode": fast_decode},
                       batch_size=batch, concurrency=(1, max(1, int(resources.get("CPU", 1)))))
          .map_batches(_Embed, fn_constructor_kwargs={"backbone": backbone, "weights": resolved,
                                                       "runtime": runtime, "batch_size": batch, "tta": tta},
                       batch_size=batch, concurrency=actors, num_gpus=1 if gpus else 0))
    started, used, failures = time.perf_counter(), set(), 0
    filled: dict[tuple[str, int], dict[int, tuple]] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        used.update(out["runtime"].tolist())
        for key, feats, reason in zip(out["key"], out["features"], out["reason"]):
            split, index, pos = key.split("/")
            part = filled.setdefault((split, int(index)), {})
            part[int(pos)] = (feats, str(reason))
            photos = chunks[(split, int(index))]
            if reason:
                failures += 1
                log.warning("skipped %s: %s", photos[int(pos)].name, reason)
            if len(part) == len(photos):
                feats_k = np.stack([part[i][0] for i in range(len(photos))]).astype(np.float32)
                reasons = [part[i][1] for i in range(len(photos))]
                feats_k[np.array([bool(r) for r in reasons])] = np.nan
                journal.save(split, int(index), [p.id for p in photos], feats_k,
                             np.array([not r for r in reasons]), reasons)
                del filled[(split, int(index))]
    total = len(rows)
    elapsed = time.perf_counter() - started
    log.info("%s (ray, %d actor(s)%s): %d photos in %.1f s (%.1f img/s), %d unreadable", backbone.name,
             actors, f", {gpus} GPU(s)" if gpus else "", total, elapsed, total / max(elapsed, 1e-9), failures)
    return ",".join(sorted(used)) or "none"
