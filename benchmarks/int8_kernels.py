"""One int8 graph run two ways on this CPU: ONNX Runtime's fused int8 kernels, and its QDQ nodes
left unfused (float arithmetic on the int8 values, what ``run_int8_exactly`` picks on x86 CPUs
without VNNI or AMX), each against float32 features of the same photos.

    python benchmarks/int8_kernels.py [--photos 64] [--backbones efficientnet_lite0,...]

The graph is the product's (``features.quantize``: 32 training photos of the shared originals);
the photos it is judged on are other training photos. Prints Markdown: cosine to float32 (mean
over photos), largest relative difference, and photos a second (2 threads, batches of 16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    args = parser.parse_args()
    import onnxruntime as ort

    from features.data import PhotoReader, load_photos
    from features.defaults import SEED, shared_dir
    from features.extract import load_batch
    from features.models import build_gap_model, resolve_weights
    from features.quantize import agreement, calibration_sample, quantize
    from features.registry import get_backbone
    from features.runtime import cached_onnx, cpu_info, int8_kernels_exact, onnx_cache_path

    photos = load_photos(shared_dir() / "dogs-vs-cats")
    calibration = calibration_sample(photos.train)
    rest = [p for p in photos.train if p not in calibration]
    judged = [rest[i] for i in np.random.default_rng(SEED).choice(len(rest), args.photos, replace=False)]
    print(f"CPU: {cpu_info().get('model name')}; fused int8 kernels exact here: {int8_kernels_exact()}; "
          f"{len(judged)} photos, ONNX Runtime {ort.__version__}\n")
    print("| backbone | graph, kernels | cosine to float32 | largest rel. diff | photos/s |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.backbones.split(","):
        backbone = get_backbone(name)
        model = build_gap_model(backbone, resolve_weights(backbone))
        float_graph = cached_onnx(model, onnx_cache_path(model))
        cal, _ = load_batch(PhotoReader(), calibration, backbone, False)
        pixels, _ = load_batch(PhotoReader(), judged, backbone, False)
        int8 = quantize(float_graph, cal)
        reference = None
        for label, graph, unfused in (("float32", float_graph, False), ("int8, fused kernels", int8, False),
                                      ("int8, QDQ unfused", int8, True)):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            if unfused:
                options.add_session_config_entry("session.disable_quant_qdq", "1")
            session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            session.run(None, {"pixels": pixels[:16]})  # warm up
            start = time.perf_counter()
            out = np.concatenate([session.run(None, {"pixels": pixels[i:i + 16]})[0]
                                  for i in range(0, len(pixels), 16)])
            speed = len(pixels) / (time.perf_counter() - start)
            reference = out if reference is None else reference
            agreed = agreement(out, reference)
            print(f"| {name} | {label} | {agreed['cosine']:.4f} | {agreed['max_rel_diff']:.3f} | {speed:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
