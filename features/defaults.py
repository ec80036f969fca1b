"""One place for the project's defaults: seeds, where data, weights and caches live."""

from __future__ import annotations

import os
from pathlib import Path

SEED = 42

# The competition's data and its output folder when running as a Kaggle notebook.
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_COMPETITION = KAGGLE_INPUT / "dogs-vs-cats-redux-kernels-edition"
KAGGLE_WORKING = Path("/kaggle/working")

CACHE_DIR = Path(os.environ.get("GAPSTACK_CACHE", "cache"))

# Per user, shared by every run: converted ONNX graphs, keyed by model and converter versions;
# fine-tuning speeds measured on this machine, keyed by network, batch, devices and versions.
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gapstack"
ONNX_CACHE = Path(os.environ.get("GAPSTACK_ONNX_CACHE", USER_CACHE / "onnx"))
RATES_FILE = Path(os.environ.get("GAPSTACK_RATES", USER_CACHE / "training_rates.json"))

# Decoding threads: one per core (the forward pass overlaps them).
WORKERS = os.cpu_count() or 2

# Concurrent forward passes for bulk extraction on a CPU, each on its own share of the cores:
# one per core up to 4 (each holds a copy of the weights). On 2 cores, two single-threaded
# sessions at batch 2 beat one two-threaded session: no barrier between threads, and each
# worker decodes its next batch between calls (benchmarks/RESULTS.md).
STREAMS = min(WORKERS, 4)


def shared_dir() -> Path:
    """The read-only ``shared/`` folder beside the checkout (``GAPSTACK_SHARED`` overrides)."""
    env = os.environ.get("GAPSTACK_SHARED")
    if env:
        return Path(env)
    # The checkout is the nearest folder, from this file's (features/, or the checkout itself for
    # kernel.py run as a file) upwards, with shared/ beside it; kernel.py pasted into a notebook
    # cell has no __file__, so the search starts at the working folder.
    here = globals().get("__file__")
    start = Path(here).resolve().parent if here else Path.cwd().resolve()
    for folder in (start, *start.parents):
        if (folder.parent / "shared").is_dir():
            return folder.parent / "shared"
    return start.parent / "shared"


def default_data_dirs() -> list[Path]:
    """The competition input on Kaggle, else the shared sample."""
    if KAGGLE_COMPETITION.exists():
        return [KAGGLE_COMPETITION]
    return [shared_dir() / "dogs-vs-cats"]


def default_weights_dir() -> Path:
    """Where backbones look for weights files that are not passed explicitly."""
    env = os.environ.get("GAPSTACK_WEIGHTS")
    return Path(env) if env else shared_dir() / "weights"
