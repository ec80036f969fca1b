"""Run kernel.py alone the way a Kaggle notebook would, in a fresh virtual environment.

    python tools/kaggle_compat.py --tensorflow 2.18.1 --keras 3.8.0      # the oldest we support
    python tools/kaggle_compat.py --tensorflow 2.21.0 --keras 3.15.1     # the newest
    python tools/kaggle_compat.py ... [--train 200 --test 100] [--python python3.12] [--record FILE]
    python tools/kaggle_compat.py ... --notebook     # pasted as one cell in a real Jupyter kernel
    python tools/kaggle_compat.py ... --finetune efficientnet_lite2   # fine-tune, as on a GPU

A Kaggle notebook has Keras 3 on TensorFlow 2.18-2.21 and Python 3.12, and no onnxruntime,
tf2onnx or simplejpeg. This makes (or reuses) a virtual environment with exactly the pinned
TensorFlow and Keras and the kernel's other imports, checks that those three packages are absent,
lays the shared photos out as Kaggle does (the competition's train.zip / test.zip, the weights as
an attached dataset, all under one input folder), copies kernel.py alone into an empty notebook
folder, runs it (``--notebook``: its source, settings edited, as the one cell of a notebook
executed by nbclient in an ipykernel of that environment, as Kaggle's editor runs it), and
reports versions, time, extraction speed and every model's CV log loss as Markdown for
benchmarks/RESULTS.md. Exit status: the kernel's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from features.defaults import KAGGLE_COMPETITION, shared_dir  # noqa: E402
from tools.build_kernel import edit_settings  # noqa: E402

# What kernel.py imports besides TensorFlow and Keras; all on Kaggle's image.
KERNEL_PACKAGES = ("numpy", "pandas", "scikit-learn", "lightgbm", "h5py", "opencv-python-headless",
                   "pillow", "matplotlib", "tqdm", "joblib")
NOT_ON_KAGGLE = ("onnxruntime", "tf2onnx", "simplejpeg")
# A notebook kernel and the client that runs it (Kaggle's image has a Jupyter kernel).
NOTEBOOK_PACKAGES = ("ipykernel", "nbclient", "nbformat")
# Run by the environment's python: the kernel source as one cell, its outputs passed on.
NOTEBOOK_DRIVER = """
import sys, nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
nb = nbformat.v4.new_notebook()
nb.cells = [nbformat.v4.new_code_cell(open("cell.py").read())]
try:
    NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    code = 0
except CellExecutionError:
    code = 1
for o in nb.cells[0].outputs:
    text = o.get("text") or "".join(o.get("traceback", []))
    (sys.stderr if o.get("name") == "stderr" or o.get("output_type") == "error" else sys.stdout).write(text)
sys.exit(code)
"""
# TensorFlow's C++ start-up lines, which the kernel should hide (features.runtime.NATIVE_STARTUP).
STARTUP_LINE = r"cuInit|Unable to register cu|absl::InitializeLog|cudart_stub|cpu_feature_guard"
VERSIONS = ("sys", "tensorflow", "keras", "numpy", "sklearn", "lightgbm", "h5py", "cv2", "PIL")


def find_python(name: str) -> str:
    """The interpreter: on PATH, or a pyenv version of that name."""
    found = shutil.which(name)
    if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
        return found
    pyenv = Path.home() / ".pyenv" / "versions"
    for version in sorted(pyenv.glob(f"{name.removeprefix('python')}*"), reverse=True):
        if (version / "bin" / name).exists():
            return str(version / "bin" / name)
    raise SystemExit(f"kaggle_compat: no {name} interpreter found (install it, or pass --python)")


def make_venv(folder: Path, python: str, tensorflow: str, keras: str, notebook: bool = False) -> Path:
    """A virtual environment with the pinned versions and the kernel's imports (and a notebook
    kernel), reused if made."""
    exe = folder / "bin" / "python"
    stamp = folder / "gapstack-compat.json"
    packages = list(KERNEL_PACKAGES) + (list(NOTEBOOK_PACKAGES) if notebook else [])
    want = {"tensorflow": tensorflow, "keras": keras, "packages": packages}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        if not (exe.exists() and stamp.exists()):
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([python, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"tensorflow=={tensorflow}", f"keras=={keras}", *packages], check=True)
        stamp.write_text(json.dumps(want))
    present = subprocess.run([str(exe), "-c", "import importlib.util as u; print([m for m in "
                              f"{list(NOT_ON_KAGGLE)} if u.find_spec(m)])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if present != "[]":
        raise SystemExit(f"kaggle_compat: {folder} has {present}, which a Kaggle image does not")
    return exe


def versions(exe: Path) -> dict:
    code = ("import importlib, json, sys; out = {}\n"
            f"for m in {list(VERSIONS)}:\n"
            "    mod = importlib.import_module(m)\n"
            "    out[m] = sys.version.split()[0] if m == 'sys' else mod.__version__\n"
            "print(json.dumps(out))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return json.loads(subprocess.run([str(exe), "-c", code], capture_output=True, text=True, check=True,
                                     env=env).stdout.strip().splitlines()[-1])


def kaggle_input(root: Path, photos: Path, weights: Path, n_train: int | None, n_test: int | None) -> Path:
    """root/input: the competition's zips (a top folder inside each, as Kaggle ships them) and the
    weights folder linked in as an attached dataset."""
    competition = root / "input" / KAGGLE_COMPETITION.name
    competition.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        files = sorted((photos / split).iterdir())
        if n is not None and split == "train":  # n of each class
            files = [f for cls in ("cat.", "dog.") for f in [g for g in files if g.name.startswith(cls)][:n]]
        elif n is not None:
            files = files[:n]
        with zipfile.ZipFile(competition / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf:
            for f in files:
                zf.write(f, f"{split}/{f.name}")
    dataset = root / "input" / "gapstack-weights"
    if not dataset.exists():
        dataset.symlink_to(weights.resolve())
    return root / "input"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensorflow", required=True, help="TensorFlow version, e.g. 2.18.1")
    parser.add_argument("--keras", required=True, help="Keras version, e.g. 3.8.0")
    parser.add_argument("--python", default="python3.12", help="interpreter for the venv (Kaggle's: 3.12)")
    parser.add_argument("--venvs", default=str(Path.home() / ".cache" / "gapstack" / "venvs"))
    parser.add_argument("--work", default=None, help="folder for the input and the notebook (default: a new temp folder)")
    parser.add_argument("--photos", default=str(shared_dir() / "dogs-vs-cats"))
    parser.add_argument("--weights", default=str(shared_dir() / "weights"))
    parser.add_argument("--train", type=int, default=None, help="photos of each class (default: all)")
    parser.add_argument("--test", type=int, default=None, help="test photos (default: all)")
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--finetune", default="auto",
                        help="the kernel's FINETUNE: auto (none on a CPU), none, or backbones to fine-tune")
    parser.add_argument("--record", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--notebook", action="store_true",
                        help="run kernel.py pasted as the one cell of a notebook in a real Jupyter kernel")
    args = parser.parse_args()

    import tempfile

    python = find_python(args.python)
    exe = make_venv(Path(args.venvs) / f"tf{args.tensorflow}-keras{args.keras}", python,
                    args.tensorflow, args.keras, args.notebook)
    info = versions(exe)
    work = Path(args.work or tempfile.mkdtemp(prefix="gapstack-compat-"))
    root = kaggle_input(work, Path(args.photos), Path(args.weights), args.train, args.test)
    notebook = work / "notebook"
    shutil.rmtree(notebook, ignore_errors=True)
    notebook.mkdir()
    shutil.copy(REPO / "kernel.py", notebook / "kernel.py")
    started = time.time()
    if args.notebook:
        (notebook / "cell.py").write_text(edit_settings(
            (REPO / "kernel.py").read_text(), INPUT=str(root), OUT=str(notebook / "out"),
            BACKBONES=args.backbones, FOLDS=args.folds, FINETUNE=args.finetune))
        command = [str(exe), "-c", NOTEBOOK_DRIVER]
    else:
        command = [str(exe), "kernel.py", "--input", str(root), "--out", str(notebook / "out"),
                   "--backbones", args.backbones, "--folds", str(args.folds), "--finetune", args.finetune]
    out = subprocess.run(command, cwd=notebook, capture_output=True, text=True)
    seconds = time.time() - started
    (work / "kernel.log").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    result = {"date": time.strftime("%Y-%m-%d"), "versions": info, "returncode": out.returncode,
              "seconds": round(seconds, 1), "log": str(work / "kernel.log")}
    if out.returncode:
        print(out.stderr[-4000:], file=sys.stderr)
    else:
        import h5py

        report = json.loads((notebook / "out" / "report.json").read_text())
        speed = {}
        for b in args.backbones.split(","):
            with h5py.File(next((notebook / "cache").glob(f"*/gap_{b}.h5")), "r") as f:  # the set's folder
                run = json.loads(f.attrs["last_run"])
                speed[b] = {"runtime": json.loads(f.attrs["runtime"]),
                            "img_s": round(run["photos"] / run["seconds"], 1)}
        startup = [l for l in out.stderr.splitlines() if re.search(STARTUP_LINE, l)]
        result.update(n_train=report["n_train"], n_test=report["n_test"], submit_with=report["submit_with"],
                      cv={m: round(s["log_loss"], 4) for m, s in report["cv"].items()}, extraction=speed,
                      tensorflow_startup_lines_shown=len(startup))
    how = "pasted as a notebook cell" if args.notebook else "as a file"
    print(f"\n### kernel.py ({how}) on TensorFlow {info['tensorflow']} / Keras {info['keras']} "
          f"(Python {info['sys']}, no {', '.join(NOT_ON_KAGGLE)})\n")
    print(f"exit {out.returncode}, {seconds:.0f} s for the whole kernel; log: {work / 'kernel.log'}")
    if not out.returncode:
        print(f"{result['n_train']} training, {result['n_test']} test photos, {args.folds} folds; submitted "
              f"{result['submit_with']}; TensorFlow start-up lines shown: {result['tensorflow_startup_lines_shown']}\n")
        print("| model | CV log loss |\n| --- | --- |")
        print("\n".join(f"| {m} | {v:.4f} |" for m, v in result["cv"].items()))
        print("\n| backbone | runtime | img/s |\n| --- | --- | --- |")
        print("\n".join(f"| {b} | {s['runtime']} | {s['img_s']} |" for b, s in speed.items()))
        print("\nversions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.record:
        with open(args.record, "a") as f:
            f.write(json.dumps(result) + "\n")
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
