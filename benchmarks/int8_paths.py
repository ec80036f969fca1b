"""Two int8 quantizations of one network, side by side: the mobile export's int8 TFLite file and
the ``--precision int8`` features of ONNX Runtime.

    python benchmarks/int8_paths.py --float RUN_A/model --int8 RUN_B/model [--photos 200] [--use stack-lr]

RUN_A and RUN_B: ``stacking.run`` on the same photos and folds, float32 and ``--precision int8``.
On labelled photos neither run trained on (default: the shared 200 px photos, for runs on the shared
originals), it compares P(dog) of: the float32 ensemble in Python; the same ensemble exported as int8 TFLite
(the network and heads quantized by TensorFlow Lite, calibrated on 100 photos); and the int8
ensemble in Python (ONNX Runtime's int8 network, heads trained on int8 features). Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float", dest="float_model", required=True)
    parser.add_argument("--int8", dest="int8_model", required=True)
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--data", default=None, help="labelled photos the runs never saw (default: shared 200 px)")
    parser.add_argument("--use", default=None, help="the model to export (default: the run's submission model)")
    args = parser.parse_args()
    from features.defaults import shared_dir
    from stacking.export import Runner, export, pixels_of, sample_photos
    from stacking.predict import Predictor
    from stacking.submission import clip, scores

    photos = sample_photos([args.data or shared_dir() / "dogs-vs-cats-200px"], args.photos)
    labels = np.array([p.label for p in photos])
    runs = {"float32, Python": Predictor(args.float_model), "int8 features (ONNX Runtime), Python": Predictor(args.int8_model)}
    use = args.use or runs["float32, Python"].ensemble.submit_with
    p = {}
    for label, predictor in runs.items():
        every, reasons = predictor.predict_all(photos)
        assert not any(reasons), reasons
        p[label] = clip(every[use], predictor.ensemble.clip)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.tflite"
        info = export(args.float_model, "tflite", out, use=use, quantize="int8", check_photos=0)
        p["int8 TFLite export of the float32 ensemble"] = Runner(out)(
            pixels_of(photos, tuple(info["input"]["shape"][1:3]), info["input"]["resize_method"]))
    print(f"{len(photos)} labelled photos no run trained on or calibrated with; model {use}; P(dog) clipped as the run clips.\n")
    print("| P(dog) from | log loss | mean abs diff vs float32 | largest abs diff vs float32 |")
    print("| --- | --- | --- | --- |")
    ref = p["float32, Python"]
    for label, q in p.items():
        print(f"| {label} | {scores(labels, q)['log_loss']:.5f} | {np.abs(q - ref).mean():.5f} | "
              f"{np.abs(q - ref).max():.5f} |")
    a, b = p["int8 TFLite export of the float32 ensemble"], p["int8 features (ONNX Runtime), Python"]
    print(f"\nTFLite int8 against ONNX Runtime int8: mean abs diff {np.abs(a - b).mean():.5f}, "
          f"largest {np.abs(a - b).max():.5f}, correlation {np.corrcoef(a, b)[0, 1]:.5f}")


if __name__ == "__main__":
    main()
