"""Where extraction time goes, per backbone, in one run: the write-ups' way, ours end to end, the
forward pass alone per inference runtime, decoding alone per core, and the arithmetic limit.

    python benchmarks/pipeline.py [--backbones efficientnet_lite0 efficientnet_lite2] [--photos 2603] [--repeat 3]
    python benchmarks/pipeline.py --int8 [--backbones ...]   # int8 against float32, as ratios

Each end-to-end measurement runs in its own process (``benchmarks/extract.py``'s children), the
fastest of ``--repeat`` runs.
Forward-only rates use real decoded photos already in memory. The bound for end to end on this
machine: forward and decoding share the same cores, so at best
``1 / (1/forward_rate + 1/(cores * decode_rate_per_core))``. Prints Markdown for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from extract import _child  # noqa: E402  (benchmarks/extract.py)


def cpu_facts() -> dict:
    info = open("/proc/cpuinfo").read()
    flags = next(l for l in info.splitlines() if l.startswith("flags")).split()
    mhz = max(float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz"))
    model = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
    return {"model": model, "ghz": mhz / 1000, "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "amx": "amx_tile" in flags}


def peak_gflops(cpu: dict, lanes: int) -> float:
    """fp32 peak: cores x GHz x 2 FMA units x lanes x 2 flops (lanes 8 for AVX2, 16 for AVX-512)."""
    return cpu["cores"] * cpu["ghz"] * 2 * lanes * 2


def model_gflops(model) -> float:
    """FLOPs of one photo through the model (multiply-add = 2), from TensorFlow's profiler."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)
    frozen = convert_variables_to_constants_v2(tf.function(lambda x: model(x)).get_concrete_function(spec))
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    prof = tf.compat.v1.profiler.profile(graph=frozen.graph, options=opts)
    return prof.total_float_ops / 1e9


def decode_rate(photos, size, how: str) -> float:
    """Photos per second on one core: read bytes (page cache), decode, resize. ``how``: "pillow"
    (Pillow only), "default" (simplejpeg for plain JPEGs), "reduced" (--fast-decode)."""
    import features.images as images
    from features.data import PhotoReader

    reader = PhotoReader()
    blobs = [(reader.read(p), p.name) for p in photos]
    saved = images.simplejpeg
    images.simplejpeg = None if how == "pillow" else saved
    try:
        start = time.perf_counter()
        for data, name in blobs:
            images.load_for_backbone(data, name, size, "area", how == "reduced")
        return len(blobs) / (time.perf_counter() - start)
    finally:
        images.simplejpeg = saved


def forward_rate(runs, pixels: np.ndarray, batch: int, seconds: float = 4.0) -> float:
    """Photos per second with one caller thread per callable in ``runs``, all kept busy."""
    x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
    for run in runs:
        run(x)
        run(x)
    counts = [0] * len(runs)
    start = time.perf_counter()

    def caller(i):
        while time.perf_counter() - start < seconds:
            runs[i](x)
            counts[i] += batch

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def runtimes(model, streams: int):
    """(name, callables: one per concurrent caller) for each CPU runtime that can run here."""
    import tensorflow as tf

    from features.runtime import KerasForward, OnnxForward

    out = [("Keras (TensorFlow graph)", [KerasForward(model)])]
    xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
    out.append(("TensorFlow XLA jit_compile", [lambda x: xla(x).numpy()]))
    out.append((f"ONNX Runtime (tf2onnx), 1 session x {os.cpu_count()} threads", [OnnxForward(model)]))
    ours = OnnxForward(model, streams=streams)
    out.append((f"ONNX Runtime, {streams} sessions x {ours.threads} thread(s) (our default)", [ours] * streams))
    try:
        import openvino as ov

        from features.runtime import onnx_cache_path, cached_onnx

        core = ov.Core()
        ov_model = core.read_model(cached_onnx(model, onnx_cache_path(model)), b"")
        for hint, label, n in (({}, "OpenVINO default (bf16 on AMX)", 1),
                               ({"INFERENCE_PRECISION_HINT": "f32"}, "OpenVINO f32", 1),
                               ({"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT",
                                 "NUM_STREAMS": str(streams)}, f"OpenVINO f32, {streams} streams", streams)):
            compiled = core.compile_model(ov_model, "CPU", hint)
            requests = [compiled.create_infer_request() for _ in range(n)]
            out.append((label, [lambda x, r=r: r.infer({0: x})[0].copy() for r in requests]))
    except ImportError:
        pass
    return out


def int8_speed(name: str, ends: dict, originals, small, cpu: dict) -> list[str]:
    """int8 against float32 for one backbone, in one process and its children: forward alone
    (our sessions, each batch size), end to end (``ends``: {precision: the child's run}), the
    shared-core bound of each, calibration time and peak memory. Markdown rows."""
    from features.defaults import STREAMS
    from features.extract import quantized_graph
    from features.models import build_gap_model, resolve_weights
    from features.quantize import agreement, calibration_sample, quantize
    from features.registry import get_backbone
    from features.runtime import OnnxForward
    from stacking.export import pixels_of

    backbone = get_backbone(name)
    model = build_gap_model(backbone)
    graph, _ = quantized_graph(backbone, resolve_weights(backbone, "default"), originals)
    sessions = {"float32": OnnxForward(model, streams=STREAMS), "int8": OnnxForward(None, streams=STREAMS, graph=graph)}
    pixels = pixels_of(originals[:64], backbone.input_size, backbone.resize)
    started = time.perf_counter()
    quantize(sessions["float32"].graph, pixels_of(calibration_sample(originals), backbone.input_size, backbone.resize))
    calibration = time.perf_counter() - started
    forward = {p: [forward_rate([run] * STREAMS, pixels, k) for k in (1, 2, 4, 8)] for p, run in sessions.items()}
    dec = [decode_rate(photos_, backbone.input_size, "default") for photos_ in (originals, small)]
    decoding = cpu["cores"] * 2 / (1 / dec[0] + 1 / dec[1])
    rows = []
    for p in ("float32", "int8"):
        best = max(forward[p])
        end = ends[p]["last_run"]["photos"] / ends[p]["last_run"]["seconds"]
        bound = 1 / (1 / best + 1 / decoding)
        rows.append((p, forward[p], best, end, ends[p]["images"] / ends[p]["seconds"], bound, ends[p]["peak_rss_mb"]))
    out = [f"| {name} {p} | " + " / ".join(f"{r:.0f}" for r in fw) + f" | {end:.1f} | {start:.1f} | {bound:.0f} "
           f"({end / bound:.0%}) | {rss:.0f} |" for p, fw, best, end, start, bound, rss in rows]
    try:  # bfloat16 where the CPU has it (AVX512_BF16, AMX): OpenVINO's forward alone, for comparison
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(sessions["float32"].graph, b""), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT",
                                       "NUM_STREAMS": str(STREAMS)})
        requests = [compiled.create_infer_request() for _ in range(STREAMS)]
        runs = [lambda x, r=r: r.infer({0: x})[0].copy() for r in requests]
        bf16 = [forward_rate(runs, pixels, k) for k in (1, 2, 4, 8)]
        close = agreement(runs[0](pixels[:16]), sessions["float32"](pixels[:16]))
        out.append(f"| {name} bfloat16 (OpenVINO {ov.__version__}, forward alone) | " + " / ".join(f"{r:.0f}" for r in bf16)
                   + f" | | | | features vs float32: cosine {close['cosine']:.5f} |")
    except ImportError:
        pass
    f, i = rows
    out.append(f"| **{name} int8 / float32** | best {i[2] / f[2]:.2f}x | **{i[3] / f[3]:.2f}x** | {i[4] / f[4]:.2f}x | "
               f"{i[5] / f[5]:.2f}x | calibration {calibration:.0f} s ({len(calibration_sample(originals))} photos); "
               f"decoding alone {decoding:.0f} img/s |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--photos", type=int, default=2603, help="photos for the end-to-end runs")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end runs each; the fastest counts")
    parser.add_argument("--int8", action="store_true", help="only int8 against float32 (ONNX Runtime)")
    args = parser.parse_args()
    from features.data import load_photos
    from features.defaults import STREAMS, shared_dir
    from features.models import build_gap_model
    from features.registry import get_backbone
    from features.runtime import TOLERANCE, max_relative_difference
    from stacking.export import pixels_of

    cpu = cpu_facts()
    print(f"machine: {cpu['model']}, {cpu['cores']} cores at {cpu['ghz']:.2f} GHz, AVX-512 "
          f"{cpu['avx512']}, AMX {cpu['amx']}; {time.strftime('%Y-%m-%d')}; {args.photos} photos "
          "(shared originals and 200 px, interleaved)\n")
    originals = load_photos(shared_dir() / "dogs-vs-cats").train[:400]
    small = load_photos(shared_dir() / "dogs-vs-cats-200px", require_test=False).train[:400]
    if args.int8:
        print(f"int8 against float32, ONNX Runtime, {STREAMS} sessions; photos/s. Forward alone at batch "
              "1 / 2 / 4 / 8; end to end once the model is ready, and from the start (calibration kept "
              "from an earlier run); the bound: the best forward and decoding sharing the cores.\n")
        print("| backbone, precision | forward alone | end to end, ready | end to end, start-up included | "
              "bound (ours = % of it) | peak RSS MB |")
        print("| --- | --- | --- | --- | --- | --- |")
        # Children first, while this process is small (see below).
        ends = {name: {p: _child("ours", name, args.photos, args.repeat, p) for p in ("float32", "int8")}
                for name in args.backbones}
        for name in args.backbones:
            print("\n".join(int8_speed(name, ends[name], originals, small, cpu)), flush=True)
        return
    # End-to-end children first, while this process is small: a forked child starts with its
    # parent's peak RSS on Linux, which would spoil their memory figures.
    ends = {name: (_child("writeups", name, args.photos, args.repeat), _child("ours", name, args.photos, args.repeat))
            for name in args.backbones}
    for name in args.backbones:
        backbone = get_backbone(name)
        size = backbone.input_size
        model = build_gap_model(backbone)
        print(f"### {name} ({size[0]} px)\n")
        a, b = ends[name]
        writeups, ours = a["images"] / a["seconds"], b["images"] / b["seconds"]
        streaming = b["last_run"]["photos"] / b["last_run"]["seconds"]
        pixels = pixels_of(originals[:64], size, backbone.resize)
        reference = np.asarray(model.predict_on_batch(pixels[:16]))
        print("| forward pass alone (photos in memory) | " + " | ".join(f"batch {k}" for k in args.batches)
              + " | max rel diff vs Keras |")
        print("| --- | " + " | ".join("---" for _ in args.batches) + " | --- |")
        best, best_label = 0.0, ""
        for label, runs in runtimes(model, STREAMS):
            diff = max_relative_difference(np.asarray(runs[0](pixels[:16])), reference)
            rates = [forward_rate(runs, pixels, k, 2.0 if "XLA" in label else 4.0) for k in args.batches]
            if diff <= TOLERANCE and max(rates) > best:
                best = max(rates)
                best_label = f"{label}, batch {args.batches[rates.index(best)]}"
            print(f"| {label} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {diff:.1e} |", flush=True)
        dec = {(kind, how): decode_rate(photos, size, how)
               for kind, photos in (("originals", originals), ("200 px", small))
               for how in ("pillow", "default", "reduced")}
        mix = 2 / (1 / dec[("originals", "default")] + 1 / dec[("200 px", "default")])
        bound = 1 / (1 / best + 1 / (cpu["cores"] * mix))
        gflops = model_gflops(model)
        print()
        print("| decode + resize, one core | Pillow | default (simplejpeg for plain JPEGs) | reduced-size JPEG decode |")
        print("| --- | --- | --- | --- |")
        for kind in ("originals", "200 px"):
            print(f"| {kind} | " + " | ".join(f"{dec[(kind, how)]:.0f} img/s" for how in ("pillow", "default", "reduced")) + " |")
        print()
        print("| measure | img/s | note |")
        print("| --- | --- | --- |")
        print(f"| write-ups' way (cv2 into one array, model.predict) | {writeups:.1f} | peak {a['peak_rss_mb']:.0f} MB |")
        print(f"| ours end to end, start-up included | {ours:.1f} | {ours / writeups:.2f}x the write-ups'; "
              f"peak {b['peak_rss_mb']:.0f} MB; {b['seconds']:.1f} s |")
        print(f"| ours once the model is ready (cache attribute last_run) | {streaming:.1f} | "
              f"{streaming / writeups:.2f}x the write-ups'; {b['last_run']['seconds']:.1f} s, "
              f"batch {b['last_run']['batch_size']}, {b['last_run']['streams']} streams |")
        print(f"| best forward alone within {TOLERANCE:.0e} of Keras | {best:.1f} | {best_label}; ours = "
              f"{ours / best:.0%} of it end to end, {streaming / best:.0%} once ready |")
        print(f"| bound: that forward + decoding sharing {cpu['cores']} cores | {bound:.1f} | = {bound / best:.0%} "
              f"of the forward; ours = {streaming / bound:.0%} of it once ready; decoding alone "
              f"{cpu['cores'] * mix:.0f} img/s on this mix |")
        for lanes, isa in ((8, "AVX2 + FMA"), (16, "AVX-512")):
            peak = peak_gflops(cpu, lanes)
            print(f"| arithmetic limit, {isa} ({peak:.0f} GFLOP/s peak, {gflops:.2f} GFLOP/photo) | "
                  f"{peak / gflops:.0f} | best forward = {best * gflops / peak:.1%} of peak |")
        print(flush=True)


if __name__ == "__main__":
    main()
