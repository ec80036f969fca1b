"""Shared fixtures: real photos and weights from ../shared, small Kaggle-layout folders built from them."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _one_core_per_worker() -> None:
    """Under pytest-xdist (pytest.ini: a worker per core, four at most), each worker keeps to
    cores of its own (one each on 2 cores): TensorFlow and ONNX Runtime size their thread pools
    to the cores they may use, and two workers each spinning threads on both cores were slower
    than one core each (478 s against 510 s for the suite on 2 cores). os.cpu_count(), which our
    defaults read, is unchanged."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = _cores()
        own = cores[int(worker[2:]) % len(cores)::workers] or cores
        os.sched_setaffinity(0, set(own))


_one_core_per_worker()  # before TensorFlow or ONNX Runtime start any thread

# Fine-tuning speeds measured in this test session only (xdist workers and subprocesses inherit
# it): each suite run measures for real once, and not from a user's earlier runs.
os.environ.setdefault("GAPSTACK_RATES", os.path.join(tempfile.mkdtemp(prefix="gapstack-rates-"),
                                                     "training_rates.json"))

import pytest

from features.cache import extraction_lock
from features.defaults import default_weights_dir, shared_dir

SHARED = shared_dir()
PHOTOS = SHARED / "dogs-vs-cats"
PHOTOS_200 = SHARED / "dogs-vs-cats-200px"
WEIGHTS = default_weights_dir()


# For tests of the CPU path's defaults (ONNX Runtime chosen by "auto", one stream per core,
# float32, no accelerator found): on a machine whose TensorFlow uses a GPU, the defaults are the
# GPU's by design, so such a test would fail for a reason that is not the one it names. Asked
# when such a test starts, not when this file is imported: pytest-xdist's controller, which
# runs no test, then never starts TensorFlow (8 s of the suite's start on 2 cores).
cpu_path = pytest.mark.cpu_path


def pytest_runtest_setup(item):
    if item.get_closest_marker("cpu_path"):
        from features.runtime import has_gpu

        if has_gpu():
            pytest.skip("checks the CPU path's defaults; TensorFlow uses a GPU on this machine, "
                        "so the GPU's defaults apply")


def unavailable(reason: str) -> None:
    """A test cannot run for a part of the machine that is missing: skipped on a person's machine,
    failed under CI (``CI=true``), where .ci/run installs every such part, so that a green CI
    never hides a test that did not run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; under CI this is a failure, not a skip (.ci/run installs it)")
    pytest.skip(reason)


def pytest_configure(config):
    if not (PHOTOS / "train").is_dir() or not WEIGHTS.is_dir():
        raise pytest.UsageError(f"the tests need the shared photos and weights at {SHARED}")


# The longest test files, longest first (under pytest-xdist on 2 cores, 2026-12-03: 123, 110, 77,
# 71, 45, 37, 24, 24, 22 s), started first (pytest.ini keeps this order), so that the short
# ones fill the end: a worker that starts a long file last finishes long after the other.
LONGEST_FIRST = ("test_finetune.py", "test_kernel.py", "test_tasks_run.py", "test_export.py",
                 "test_extract.py", "test_activations.py", "test_two_devices.py", "test_shards.py", "test_runtime.py",
                 "test_registry.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """-n auto: a worker per core, four at most (each holds TensorFlow and a few networks)."""
    return min(len(_cores()), 4)


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``make`` fills, made once for the whole test session: under pytest-xdist every
    worker that needs a session fixture would make its own (a stacking run, the two-device
    script: half a minute each), so the first to take the lock makes it and the others read it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    folder = base / name
    with extraction_lock(folder):  # the project's flock: <folder>.lock beside it
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


def make_kaggle_dir(root: Path, n_train_per_class: int, n_test: int, start: int = 0) -> Path:
    """A Kaggle-layout folder with copies of real shared photos."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for cls in ("cat", "dog"):
        for i in range(start, start + n_train_per_class):
            shutil.copy(PHOTOS / "train" / f"{cls}.{i}.jpg", root / "train")
    for i in range(1, n_test + 1):
        shutil.copy(PHOTOS / "test" / f"{i}.jpg", root / "test")
    return root


CLOTHING = SHARED / "clothing-small"


def make_class_dir(root: Path, per_class: dict[str, int], n_test: int = 0, validation: int = 0,
                   labelled_test: bool = False) -> Path:
    """A class-folder layout (``train/<class>/``, ``validation/<class>/`` with ``validation`` more
    per class, ``test/`` with ``n_test`` unlabelled ones, or in ``test/<class>/`` with
    ``labelled_test``) of real shared photos: clothing-small's classes, or cat / dog from Dogs vs.
    Cats. Test photos are the next ones of each class in turn, named 1, 2, ..."""
    def source(cls: str) -> list[Path]:
        if cls in ("cat", "dog"):
            return [PHOTOS / "train" / f"{cls}.{i}.jpg" for i in range(200)]
        return sorted((CLOTHING / "train" / cls).iterdir())

    taken = {cls: source(cls) for cls in per_class}
    for cls, n in per_class.items():
        for split, files in (("train", taken[cls][:n]), ("validation", taken[cls][n:n + validation])):
            if files:
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for f in files:
                    shutil.copy(f, root / split / cls / f.name)
    if n_test:
        (root / "test").mkdir(parents=True)
        classes = list(per_class)
        for k in range(n_test):
            cls = classes[k % len(classes)]
            f = taken[cls][per_class[cls] + validation + k // len(classes)]
            folder = root / "test" / cls if labelled_test else root / "test"
            folder.mkdir(exist_ok=True)
            shutil.copy(f, folder / f"{k + 1}{f.suffix}")
    return root


@pytest.fixture
def small_data(tmp_path) -> Path:
    """12 cats, 12 dogs and 8 test photos."""
    return make_kaggle_dir(tmp_path / "data", 12, 8)


@pytest.fixture(scope="session")
def lite0_model():
    """The real EfficientNet-Lite0 GAP model, built once."""
    from features.models import build_gap_model
    from features.registry import get_backbone

    return build_gap_model(get_backbone("efficientnet_lite0"))


@pytest.fixture(scope="session")
def real_features(tmp_path_factory):
    """EfficientNet-Lite0 features of 240 real shared training photos and 20 test photos."""
    from features.cache import load_features
    from features.data import load_photos
    from features.extract import extract

    def make(root: Path) -> None:
        data = make_kaggle_dir(root / "data", 120, 20)
        extract(load_photos(data), "efficientnet_lite0", cache_dir=root / "cache", progress=False)

    root = made_once(tmp_path_factory, "feat", make)
    return load_features(next((root / "cache").glob("*/gap_efficientnet_lite0.h5")))


# Lite2's ImageNet top is in the shared weights: the runs have its ImageNet prior too.
BACKBONES = "efficientnet_lite0,efficientnet_lite2"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Three stacking.run runs on 30 cats, 30 dogs (ids 0-29), 12 test photos: a (the defaults
    of a CPU run but fine-tuning, which test_finetune covers), b (--clip on), c (--exclude); each
    has its model/ folder."""
    import pandas as pd

    from stacking import run as run_mod

    def make(root: Path) -> None:
        data = make_kaggle_dir(root / "data", 30, 12)
        args = ["--data", str(data), "--backbones", BACKBONES, "--folds", "3", "--cache", str(root / "cache"),
                "--holdout", "0.2", "--finetune", "none"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_mod, "has_gpu", lambda: False)  # the defaults of a CPU run, on any machine
            assert run_mod.main([*args, "--out", str(root / "a")]) == 0
            assert run_mod.main([*args, "--out", str(root / "b"), "--clip", "on"]) == 0
            pd.DataFrame({"id": ["cat.3", "dog.7", "dog.8"], "drop": [1, 1, 0]}).to_csv(root / "outliers.csv",
                                                                                      index=False)
            assert run_mod.main([*args, "--out", str(root / "c"), "--exclude", str(root / "outliers.csv")]) == 0

    return made_once(tmp_path_factory, "run", make)


@pytest.fixture(scope="session")
def two_devices(tmp_path_factory) -> dict[str, str]:
    """What ``tests/two_devices.py`` prints (extraction and training on two logical CPU devices,
    Kaggle's T4 x2 paths), run once in its own process for every test that reads it."""
    import subprocess
    import sys

    def make(root: Path) -> None:
        data = make_kaggle_dir(root / "data", 12, 1)
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run([sys.executable, str(repo / "tests" / "two_devices.py"), str(data)],
                             capture_output=True, text=True, timeout=600, cwd=repo,
                             env=dict(os.environ, PYTHONPATH=str(repo)))
        assert out.returncode == 0, out.stderr[-3000:]
        (root / "said.txt").write_text(out.stdout)

    said = {}
    for line in (made_once(tmp_path_factory, "two", make) / "said.txt").read_text().splitlines():
        # "<part> <what> <value>"
        part, what, value = line.split(" ", 2)
        said[part, what] = value
    return said

