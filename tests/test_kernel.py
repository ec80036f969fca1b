"""kernel.py: built from the package, standalone, and runs alone on a Kaggle-style zipped input."""

import ast
import shutil
import subprocess
import sys
import zipfile

import pandas as pd

from tests.conftest import WEIGHTS, make_kaggle_dir
from tools.build_kernel import OURS, REPO, build


def test_committed_kernel_is_a_fresh_build():
    assert (REPO / "kernel.py").read_text() == build(), "run: python tools/build_kernel.py"


def test_kernel_imports_nothing_of_ours():
    tree = ast.parse((REPO / "kernel.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in OURS, ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] not in OURS for a in node.names), ast.unparse(node)


def test_kernel_runs_alone_on_zipped_kaggle_input(tmp_path):
    photos = make_kaggle_dir(tmp_path / "photos", 30, 12)
    competition = tmp_path / "input" / "dogs-vs-cats-redux-kernels-edition"
    competition.mkdir(parents=True)
    for split in ("train", "test"):  # zipped the way Kaggle ships them: a top folder inside
        with zipfile.ZipFile(competition / f"{split}.zip", "w") as zf:
            for f in sorted((photos / split).iterdir()):
                zf.write(f, f"{split}/{f.name}")
    work = tmp_path / "notebook"
    work.mkdir()
    shutil.copy(REPO / "kernel.py", work / "kernel.py")
    # Our packages are installed here; make importing them fail, as on Kaggle.
    block = "import sys; sys.modules.update(features=None, oof=None, stacking=None, tools=None); "
    run = ("import runpy; sys.argv = ['kernel.py'] + sys.argv[1:]; "
           "runpy.run_path('kernel.py', run_name='__main__')")
    out = subprocess.run(
        [sys.executable, "-c", block + run, "--data", str(competition), "--out", str(work / "out"),
         "--backbones", "efficientnet_lite0,efficientnet_lite1", "--weights-dir", str(WEIGHTS),
         "--folds", "3"],
        cwd=work, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sub = pd.read_csv(work / "out" / "submission.csv")
    assert sub["id"].tolist() == list(range(1, 13)) and sub["label"].between(0, 1).all()
    report = (work / "out" / "report.md").read_text()
    for model in ("efficientnet_lite0/logistic", "efficientnet_lite1/logistic", "concat-fusion",
                  "stack-lr", "stack-lgbm"):
        assert f"| {model}" in report and f"| {model}" in out.stdout
    assert (work / "cache" / "gap_efficientnet_lite0.h5").exists()
