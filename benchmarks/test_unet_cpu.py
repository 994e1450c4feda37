"""unet_cpu.py's pieces on a tiny UNet: the FLOP count, every system computing the same call (OpenVINO skipped
where it is not installed; the compiled systems are the Editor's optimize path, tested in tests/, and take minutes
to compile), a child process, and the table."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny  # noqa: E402
import unet_cpu  # noqa: E402

HAS_OV = importlib.util.find_spec("openvino") is not None
LATENT, BATCH = 8, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_folder(tmp_path_factory.mktemp("unet_cpu"), "sd1")


def test_flops_count_the_call(folder):
    flops = unet_cpu.unet_flops(folder, LATENT, BATCH)
    # conv_in alone: 2 * batch * 4 * 32 * 9 * 8 * 8 multiply-adds; the whole call is far more, and scales with batch
    assert flops > 2 * BATCH * 4 * 32 * 9 * LATENT ** 2
    assert unet_cpu.unet_flops(folder, LATENT, 2 * BATCH) == 2 * flops


def test_systems_compute_the_same_call(folder):
    systems = ["engine-eager-fp32", "engine-eager-bf16", "diffusers-eager-fp32"]
    if HAS_OV:
        unet_cpu.convert_openvino(folder, LATENT, BATCH)
        systems += ["openvino-fp32", "openvino-bf16"]
    with torch.no_grad():
        out = {s: unet_cpu.build(s, folder, LATENT, BATCH)().float() for s in systems}
    ref = out["engine-eager-fp32"]
    assert ref.shape == (BATCH, 4, LATENT, LATENT)
    for s, o in out.items():
        tol = 1e-4 if s.endswith("fp32") else 5e-2
        assert (o - ref).abs().max() / ref.abs().max() < tol, s
    with pytest.raises(ValueError, match="unknown system"):
        unet_cpu.build("tensorrt-fp32", folder, LATENT, BATCH)


def test_rounds_in_child_processes_and_the_table(folder, tmp_path):
    per_round = unet_cpu.rounds(["engine-eager-fp32"], folder, LATENT, BATCH, n_rounds=1, calls=2, threads=1)
    assert [len(v) for v in per_round.values()] == [1]
    per_round["engine-eager-bf16"] = [{**per_round["engine-eager-fp32"][0], "wall_s": 0.5}]
    r = per_round["engine-eager-fp32"][0]
    assert r["threads"] == 1 and len(r["walls"]) == 2 and r["wall_s"] > 0 and r["cpu_s"] > 0
    per_round["openvino-fp32"] = [{"error": "ModuleNotFoundError: No module named 'openvino'"}]
    flops = unet_cpu.unet_flops(folder, LATENT, BATCH)
    peaks = {"float32": {"gemm 2048": 100.0, "peak": 100.0, "peak_per_cpu_s": 50.0},
             "bfloat16": {"gemm 2048": 200.0, "peak": 200.0, "peak_per_cpu_s": 100.0}}
    rows = unet_cpu.summarise(per_round, flops, peaks)
    by = {row["system"]: row for row in rows}
    assert by["openvino-fp32"]["error"].startswith("ModuleNotFoundError")
    fp32 = by["engine-eager-fp32"]
    assert fp32["gflops"] == pytest.approx(flops / fp32["wall_s"] / 1e9)
    assert fp32["peak_frac"] == pytest.approx(fp32["gflops"] / 100.0)
    assert fp32["peak_frac_cpu"] == pytest.approx(flops / fp32["cpu_s"] / 1e9 / 50.0)
    assert by["engine-eager-bf16"]["peak_frac"] == pytest.approx(by["engine-eager-bf16"]["gflops"] / 200.0)
    meta = {"machine": "test", "latent": LATENT, "batch": BATCH, "rounds": 1, "calls": 2, "warmup": 2,
            "threads": 1, "date": "now", "load_before": "0", "load_after": "0"}
    md = unet_cpu.markdown(rows, flops, peaks, "python benchmarks/unet_cpu.py", meta)
    assert "| engine-eager-fp32 |" in md and "failed: ModuleNotFoundError" in md and "| float32 |" in md
    json.dumps(rows)  # what --json writes
