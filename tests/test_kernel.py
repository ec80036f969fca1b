"""kernel.py: built from the package, standalone, and runs alone on a Kaggle-style zipped input
the way a Kaggle notebook has it: pasted into a cell or %run in a real Jupyter kernel, or run as a
file; no onnxruntime, tf2onnx or simplejpeg, weights in an attached dataset, and none of
TensorFlow's C++ start-up lines in what the user reads."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pandas as pd

from features.registry import get_backbone
from tests.conftest import WEIGHTS, make_class_dir, make_kaggle_dir
from tools.build_kernel import OURS, REPO, build, edit_settings

# Not on a Kaggle image: the kernel must run with these unimportable.
NOT_ON_KAGGLE = ("onnxruntime", "tf2onnx", "simplejpeg")
WRITEUPS = ("resnet50", "inception_v3", "xception", "inception_resnet_v2")
CLOTHES = ("hat", "shoes", "skirt")


def test_committed_kernel_is_a_fresh_build():
    assert (REPO / "kernel.py").read_text() == build(), "run: python tools/build_kernel.py"


def test_kernel_imports_nothing_of_ours():
    tree = ast.parse((REPO / "kernel.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in OURS, ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] not in OURS for a in node.names), ast.unparse(node)


def kaggle_input(tmp_path, n_per_class: int, n_test: int):
    """<tmp>/input/dogs-vs-cats-redux-kernels-edition/{train,test}.zip, zipped as Kaggle ships them."""
    photos = make_kaggle_dir(tmp_path / "photos", n_per_class, n_test)
    competition = tmp_path / "input" / "dogs-vs-cats-redux-kernels-edition"
    competition.mkdir(parents=True)
    for split in ("train", "test"):  # a top folder inside, as in the competition's zips
        with zipfile.ZipFile(competition / f"{split}.zip", "w") as zf:
            for f in sorted((photos / split).iterdir()):
                zf.write(f, f"{split}/{f.name}")
    return tmp_path / "input"


def run_kernel(tmp_path, *args):
    """kernel.py copied alone into a notebook folder and run with our packages and the
    NOT_ON_KAGGLE packages unimportable, as on Kaggle."""
    work = tmp_path / "notebook"
    work.mkdir()
    shutil.copy(REPO / "kernel.py", work / "kernel.py")
    blocked = ", ".join(f"{m}=None" for m in (*OURS, "tools", *NOT_ON_KAGGLE))
    block = f"import sys; sys.modules.update({blocked}); "
    run = ("import runpy; sys.argv = ['kernel.py'] + sys.argv[1:]; "
           "runpy.run_path('kernel.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", block + run, "--out", str(work / "out"), *args],
                         cwd=work, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in ("cuInit", "E0000", "absl::InitializeLog", "cudart_stub"):
        assert noise not in out.stderr + out.stdout, f"TensorFlow start-up line shown: {noise}"
    return work, out


def check_outputs(work, out, models, n_test, folder="out"):
    sub = pd.read_csv(work / folder / "submission.csv")
    assert sub["id"].tolist() == list(range(1, n_test + 1)) and sub["label"].between(0, 1).all()
    report = (work / folder / "report.md").read_text()
    for model in models:
        assert f"| {model}" in report and f"| {model}" in out.stdout
        per_model = pd.read_csv(work / folder / "submissions" / f"{model.replace('/', '__')}.csv")
        assert per_model["id"].tolist() == sub["id"].tolist() and per_model["label"].between(0, 1).all()


def run_notebook(work, cells: list[str]):
    """Execute the cells in a real Jupyter kernel (ipykernel), as Kaggle's notebook editor does;
    returns the executed notebook. A cell that raises fails the test with its output."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(work)}}).execute()
    return nb


def cell_text(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                   + "".join(o.get("traceback", [])) for o in cell.outputs)


def test_kernel_runs_in_a_notebook_pasted_and_with_percent_run(tmp_path):
    """kernel.py pasted as one notebook cell with its settings edited (no __file__, ipykernel's
    -f CONNECTION_FILE in sys.argv), then as %run kernel.py with flags on an input holding a
    dataset of class folders (a 3-class task, found there), in a real Jupyter kernel,
    with our packages and the NOT_ON_KAGGLE ones unimportable: both write submission.csv and
    submissions/, and a successful run ends without SystemExit."""
    root = kaggle_input(tmp_path, 10, 6)
    competition = root / "dogs-vs-cats-redux-kernels-edition"
    work = tmp_path / "notebook"
    work.mkdir()
    shutil.copy(REPO / "kernel.py", work / "kernel.py")
    source = edit_settings((REPO / "kernel.py").read_text(), DATA=str(competition), WEIGHTS_DIR=str(WEIGHTS),
                    OUT=str(work / "out"), BACKBONES="efficientnet_lite0,efficientnet_lite2", FOLDS=2,
                    FINETUNE="efficientnet_lite0", FINETUNE_EPOCHS=1)
    blocked = ", ".join(f"{m}=None" for m in (*OURS, "tools", *NOT_ON_KAGGLE))
    # %run on another input: an attached dataset of class folders (3 clothing classes), found there
    clothes = make_class_dir(tmp_path / "input2" / "clothes-dataset" / "clothing", {c: 4 for c in CLOTHES}, n_test=3)
    percent_run = (f"%run kernel.py --input {tmp_path / 'input2'} --weights-dir {WEIGHTS} --out {work / 'run'} "
                   "--backbones efficientnet_lite0 --folds 2")
    nb = run_notebook(work, [f"import sys\nsys.modules.update({blocked})\nprint(sys.argv)", source,
                             percent_run])
    argv, pasted, ran = (cell_text(c) for c in nb.cells)
    assert "-f" in argv and ".json" in argv  # the kernel's own arguments were there to be ignored
    for text in (pasted, ran):
        assert "SystemExit" not in text and "Traceback" not in text and "Warning" not in text, text[-3000:]
        for noise in ("cuInit", "E0000", "absl::InitializeLog", "cudart_stub"):
            assert noise not in text, f"TensorFlow start-up line shown: {noise}"

    class Out:
        stdout = pasted

    check_outputs(work, Out, ("efficientnet_lite0/logistic", "efficientnet_lite2/logistic",
                              "efficientnet_lite2/imagenet", "efficientnet_lite0/finetuned",
                              "concat-fusion", "stack-lr", "stack-lgbm"), 6)
    assert "What the ImageNet prior adds" in (work / "out" / "report.md").read_text()
    assert list((work / "cache").glob("*/gap_efficientnet_lite0.h5"))  # in the photo set's folder
    assert f"kernel: data from {clothes}" in ran and "class folders: 3 classes (hat, shoes, skirt" in ran
    sub = pd.read_csv(work / "run" / "submission.csv")
    assert list(sub.columns) == ["id", *CLOTHES] and sub["id"].tolist() == [1, 2, 3]
    report = (work / "run" / "report.md").read_text()
    assert "| efficientnet_lite0/logistic" in report and "| concat-fusion" in report
    assert "efficientnet_lite2/logistic" not in report  # the flags won


def test_writeups_four_backbones_from_an_attached_weights_dataset(tmp_path):
    """The Keras release weight files (here: random weights in that format and under those names)
    in an attached dataset are found under the input root and go through the whole kernel; a
    release file with the ImageNet top (ResNet50's) gives that backbone its ImageNet prior."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    root = kaggle_input(tmp_path, 5, 4)
    dataset = root / "keras-pretrained-models"
    dataset.mkdir()
    for name in WRITEUPS:
        keras.utils.set_random_seed(0)  # the same files every time: graphs converted once per machine
        entry = get_backbone(name)
        constructor = getattr(keras.applications, entry.constructor.rsplit(".", 1)[1])
        base = constructor(include_top=False, weights=None, input_shape=(*entry.input_size, 3))
        with h5py.File(dataset / entry.weights_file, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, base)
        if name == "resnet50":
            full = constructor(include_top=True, weights=None, input_shape=(*entry.input_size, 3))
            with h5py.File(dataset / entry.top_weights_file, "w") as f:
                legacy_h5_format.save_weights_to_hdf5_group(f, full)
        keras.backend.clear_session()
    # Batches of 8: Keras pads the last batch, and these 14 photos are all one would be at 32.
    work, out = run_kernel(tmp_path, "--input", str(root), "--folds", "2", "--batch-size", "8")
    assert f"kernel: weights from {dataset}" in out.stdout
    check_outputs(work, out, [f"{b}/logistic" for b in WRITEUPS] + ["resnet50/imagenet", "concat-fusion",
                                                                    "stack-lr"], 4)
    assert "xception/imagenet" not in (work / "out" / "report.md").read_text()  # no top attached
    for name in WRITEUPS:
        assert list((work / "cache").glob(f"*/gap_{name}.h5"))


def test_kernel_run_as_a_file_finds_shared_beside_its_checkout(tmp_path):
    """``python kernel.py`` in a checkout (not on Kaggle): the shared photos and weights are found
    beside the checkout, as they are for the package, from any working folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("GAPSTACK_SHARED", "GAPSTACK_WEIGHTS")}
    out = subprocess.run([sys.executable, "-c", "import runpy, sys; "
                          "print(runpy.run_path(sys.argv[1], run_name='kernel')['shared_dir']())",
                          str(REPO / "kernel.py")], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(REPO.parent / "shared")
