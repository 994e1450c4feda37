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


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(variant) -> path of a tiny random diffusers folder, built once per session."""
    cache = {}

    def get(variant="sd1", **kw):
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = tiny.make_folder(tmp_path_factory.mktemp(variant), variant, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """tiny_sdxl_folder(variant) -> path of a tiny random SD-XL diffusers folder, built once per session."""
    import tiny_sdxl

    cache = {}

    def get(variant="xl", **kw):
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = tiny_sdxl.make_folder(tmp_path_factory.mktemp(variant), variant, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """The engine's cache (random model, model hashes, compile cache) in a temp folder, never the user's
    ~/.cache; the CLI test modules use it for all their tests (pytestmark)."""
    old = os.environ.get("DIFFEDIT_CACHE_DIR")
    os.environ["DIFFEDIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DIFFEDIT_CACHE_DIR", None)
    else:
        os.environ["DIFFEDIT_CACHE_DIR"] = old
