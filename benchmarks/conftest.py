"""pytest-benchmark suites (benchmarks/test_bench_*.py) on the tiny random models of tests/tiny.py, so the CI
smoke run (`--benchmark-disable`: each body runs once) takes seconds and needs no full-size model."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (first: diffedit_engine is this checkout)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import tiny  # noqa: E402

# only test_*.py in this folder are collected (the pytest-benchmark suites test_bench_*.py and the GPU suite's
# dry run); the scripts beside them are not
collect_ignore_glob = [p.name for p in Path(__file__).parent.glob("*.py") if not p.name.startswith("test_")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny SD1-like model (tests/tiny.py "sd1") through weights.load_model, on CUDA when there is one."""
    from diffedit_engine.weights import load_model

    folder = tiny.make_folder(tmp_path_factory.mktemp("bench-sd1"), "sd1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(folder, device=device)
