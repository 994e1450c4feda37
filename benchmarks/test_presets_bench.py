"""presets_bench.py's pieces on the tiny SD 1 folder (tests/tiny.py), seconds: the work counters see every UNet
evaluation, the exact preset runs its full count of samples with the deep blocks every time, and fast does
less work; the report's table has a row per preset with its speed-up against exact."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import presets_bench  # noqa: E402
import tiny  # noqa: E402
from tiny import one_thread  # noqa: E402,F401  (autouse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny.make_folder(tmp_path_factory.mktemp("presets-bench"), "sd1"))


def test_children_count_the_work_of_each_preset(folder):
    exact = presets_bench.child("exact", folder, 32, 1, 0)
    fast = presets_bench.child("fast", folder, 32, 1, 0)
    s = exact["settings"]
    steps = int(s["steps"] * s["strength"])
    # mask pass: num_maps draws × 2 prompts (source, target; ∅ cancels); inversion: 1 per step; decoding: ∅ + target
    assert exact["samples"] == s["num_maps"] * 2 + steps + 2 * steps
    assert exact["deep_samples"] == exact["samples"] and exact["full_frame_samples"] == exact["samples"]
    assert fast["samples"] < exact["samples"]
    runs = [exact, fast, {**exact, "seconds": exact["seconds"] * 1.1}]
    args = presets_bench.main.__globals__["argparse"].Namespace(threads=1, size=32, seed=0, rounds=2, scene=False,
                                                                model=folder)
    text = presets_bench.report(runs, args, {"min": 0.0, "max": 1.0, "median": 0.5})
    rows = [ln for ln in text.splitlines() if ln.startswith("| exact") or ln.startswith("| fast")]
    assert len(rows) == 2 and "1.00x" in rows[0]


def test_shapes_scene_case_is_an_edit_of_a_present_object():
    img, pairs = presets_bench.shapes_case(3)
    (src, tgt), = pairs
    assert img.shape == (3, 128, 128) and src != tgt and src.split()[-1] == tgt.split()[-1]
