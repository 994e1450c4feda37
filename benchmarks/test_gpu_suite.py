"""The GPU suite's CPU dry run (tiny model): stages run in their own processes, their results land in
suite.json as each ends, a stage stopped at its limit is reported as such and the others go on."""
import json
import subprocess
import sys
from pathlib import Path

import gpu_suite

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_env_and_eager(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--tiny",
                        "--stages", "env,eager"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "suite.json").read_text())
    env, eager = res["stages"]["env"], res["stages"]["eager"]
    assert env["_status"] == "ok" and env["torch"]
    assert eager["_status"] == "ok", eager.get("_error_tail")
    for row in ("N=1", "N=3", "compat"):
        assert eager[row]["finite"] and eager[row]["median_s"] > 0
    assert len(eager["N=3"]["mask_coverage"]) == 3 and len(eager["N=1"]["mask_coverage"]) == 1
    md = (out / "RESULTS_gpu_suite.md").read_text()
    assert md.startswith("<!-- BEGIN gpu_suite -->") and "| eager | N=3 |" in md


def test_stage_limit_keeps_the_suite_going(tmp_path, monkeypatch):
    with open(tmp_path / "suite.log", "w+") as log:
        data = gpu_suite.spawn("build", gpu_suite.TINY, tmp_path, log, limit=0.5)
    assert data["_status"].startswith("stopped at its limit")


def test_unknown_stage_is_a_usage_error(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path),
                        "--stages", "env,warp"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown stage(s) ['warp']" in p.stderr


def test_dry_run_sd3(tmp_path):
    """The SD 3.5 Medium rows on the tiny SD 3.5 Medium folder (no T5), eager on the CPU: a guided step and the
    1-pair and 3-pair edits, through the Editor or, while it does not take flow models, regions.edit_many."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--tiny",
                        "--stages", "sd3"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    sd3 = json.loads((out / "suite.json").read_text())["stages"]["sd3"]
    assert sd3["_status"] == "ok", sd3.get("_error_tail")
    assert sd3["context_tokens"] == 77 + 256 and sd3["guided_steps_per_s"] > 0
    for row, n in (("SD3.5M N=1", 1), ("SD3.5M N=3", 3)):
        assert sd3[row]["finite"] and sd3[row]["median_s"] > 0 and len(sd3[row]["mask_coverage"]) == n
    md = (out / "RESULTS_gpu_suite.md").read_text()
    assert "| sd3 | SD3.5M N=3 |" in md and "SD 3.5 Medium (the tiny test model, float32" in md


def test_dry_run_flux(tmp_path):
    """The FLUX.1-dev rows on make_model.build_flux's folder from a tiny spec, eager on the CPU: the folder loads with
    weights.load_model as FLUX.1-dev (guidance embedding, 512 T5 tokens, its dynamic-shift scheduler), one
    transformer call at batch 1 and the 1-pair and 3-pair edits through the Editor; the report says T5 is reduced."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--tiny",
                        "--stages", "flux"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    fx = json.loads((out / "suite.json").read_text())["stages"]["flux"]
    assert fx["_status"] == "ok", fx.get("_error_tail")
    assert fx["model"] == dict(kind="flux", guidance_embeds=True, max_sequence_length=512)
    assert fx["compiled"] is False and fx["editor"]["denoiser"] == "transformer" and "REDUCED" in fx["t5"]
    assert fx["context_tokens"] == 512 and fx["image_tokens"] == 16 and fx["steps_per_s_batch1"] > 0
    for row, n in (("FLUX.1-dev N=1", 1), ("FLUX.1-dev N=3", 3)):
        assert fx[row]["finite"] and fx[row]["median_s"] > 0 and len(fx[row]["mask_coverage"]) == n
    md = (out / "RESULTS_gpu_suite.md").read_text()
    assert "| flux | FLUX.1-dev N=3 |" in md and "T5 REDUCED to 2 layers" in md


def test_flux_dev_spec_has_the_released_shapes():
    """make_model.FLUX_DEV's transformer, built on the meta device, has FLUX.1-dev's 11,901,408,320 parameters; its
    scheduler is the released dynamic-shift config; the reduced T5 keeps the context width."""
    import torch
    from diffusers import FluxTransformer2DModel

    import make_model as mm

    with torch.device("meta"):
        tr = FluxTransformer2DModel(**mm.FLUX_DEV["transformer"])
    assert sum(p.numel() for p in tr.parameters()) == 11_901_408_320
    assert mm.FLUX_DEV["t5"]["d_model"] == mm.FLUX_DEV["transformer"]["joint_attention_dim"] == 4096
    sched = mm.FLUX_DEV["scheduler"]
    assert (sched["use_dynamic_shifting"], sched["base_shift"], sched["max_shift"], sched["base_image_seq_len"],
            sched["max_image_seq_len"], sched["shift"]) == (True, 0.5, 1.15, 256, 4096, 3.0)
