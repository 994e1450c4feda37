"""The flow models (SD 3.x, FLUX.1) through every door — `diffedit edit`, `mask`, `batch` (and the Editor they
share) — on tiny random folders (tests/tiny_sd3.py, tests/tiny_flux.py): outputs written, the background kept
pixel for pixel, `--editor flowedit`, a resumed batch, the Editor and the CLI giving the same image (one run
path), a FLUX.1-dev folder and Black Forest Labs' single file with --text-encoders, the per-family defaults, and
the one-line refusals of what a family cannot take, before the model is loaded (issue 21, issue 22's CLI part)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tiny_flux
import tiny_sd3
from diffedit_engine import cli
from diffedit_engine.engine.edit.settings import EditSettings
from diffedit_engine.engine.files import images
from diffedit_engine.engine.jobs import session
from diffedit_engine.engine.runtime import Editor, family
from diffedit_engine.engine.runtime.memory import transformer_sample_bytes
from diffedit_engine.engine.runtime.runners import TransformerRunner
from test_cli import files_in, make_manifest, run

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "4", "--maps", "1", "--threshold", "quantile:0.85"]  # quantile: masks on a random model

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: never the user's ~/.cache


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3.make_folder(tmp_path_factory.mktemp("sd3"), "sd3")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return {v: tiny_flux.make_folder(tmp_path_factory.mktemp(f"flux-{v}"), v) for v in tiny_flux.VARIANTS}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """64x48: multiples of 16 (the flow models' 2x2 patches of 8x latents), so no padding hides a mask."""
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((64, 48)).save(p)
    return p


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_background_kept(out: Path, photo: Path, n_masks: int) -> None:
    """Beyond the masks' reach (keep_pixels: dilated 8 px and feathered 8 px more) the output is the input."""
    masks = np.stack([pixels(f"{out.with_suffix('')}.mask{i}.png")[..., 0] for i in range(n_masks)])
    union = torch.from_numpy((masks > 0).any(0).astype(np.float32))[None, None]
    reach = F.max_pool2d(union, 33, stride=1, padding=16)[0, 0].numpy() > 0
    a, b = pixels(out), pixels(photo)
    assert 0 < reach.mean() < 1, "the masks must leave some background"
    assert (a[~reach] == b[~reach]).all()
    assert (a[reach] != b[reach]).any()  # and the edit changed something inside


# ---- SD 3.x ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edits", [["cat -> dog"], ["cat -> dog", "a red circle -> a blue square"]])
def test_sd3_edit_writes_image_masks_and_keeps_the_background(capsys, tmp_path, sd3, photo, edits):
    out = tmp_path / "o" / "e.png"
    args = [a for e in edits for a in ("--edit", e)]
    rc, stdout, err = run(capsys, "edit", "--model", sd3, "--image", photo, *args, "--out", out, "--save-masks",
                          "--seed", 3, *FAST)
    assert rc == 0, err
    assert stdout.strip() == str(out)
    masks = [f"e.mask{i}.png" for i in range(len(edits))]
    assert files_in(out.parent) == sorted(["e.grid.png", "e.json", *masks, "e.overlay.png", "e.png"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"]["kind"] == "sd3" and meta["model"]["family"] == "sd3"
    assert meta["model"]["prediction_type"] == "flow"
    assert meta["settings"]["scheduler"] is None and meta["settings"]["guidance_scale"] == 7.0  # SD3's default
    assert "transformer_max_batch" in meta["engine"] and meta["engine"]["fused_attention_modules"] == 0
    assert_background_kept(out, photo, len(edits))


def test_sd3_flowedit_from_the_cli(capsys, tmp_path, sd3, photo):
    out = tmp_path / "f.png"
    rc, _, err = run(capsys, "edit", "--model", sd3, "--image", photo, "--edit", "cat -> dog", "--out", out,
                     "--editor", "flowedit", "--save-masks", *FAST)
    assert rc == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["editor"] == "flowedit"
    assert_background_kept(out, photo, 1)


def test_sd3_mask_command(capsys, tmp_path, sd3, photo):
    out = tmp_path / "m.png"
    rc, _, err = run(capsys, "mask", "--model", sd3, "--image", photo, "--edit", "cat -> dog",
                     "--edit", "a red circle -> a blue square", "--out", out, *FAST)
    assert rc == 0, err
    assert files_in(tmp_path) == ["m.json", "m.mask0.png", "m.mask1.png", "m.png"]
    masks = [pixels(tmp_path / f"m.mask{i}.png")[..., 0] > 0 for i in range(2)]
    assert all(0 < m.mean() < 1 for m in masks) and not (masks[0] & masks[1]).any()  # argmax: disjoint


def test_the_editor_and_the_cli_give_the_same_image(capsys, tmp_path, sd3, photo):
    """One run path (DESIGN §8): the CLI's edit is Editor.edit with the CLI's settings, pixel for pixel."""
    out = tmp_path / "c.png"
    rc, _, err = run(capsys, "edit", "--model", sd3, "--image", photo, "--edit", "cat -> dog", "--out", out,
                     "--seed", 5, *FAST)
    assert rc == 0, err
    ed = Editor.from_pretrained(sd3, device="cpu")
    assert ed.info["denoiser"] == "transformer" and isinstance(ed.model.transformer, TransformerRunner)
    s = EditSettings(steps=4, num_maps=1, threshold="quantile:0.85", guidance_scale=7.0, scheduler=None)
    r = ed.edit(images.to_tensor(images.load_image(photo)), [("cat", "dog")], settings=s, seed=5)
    assert np.array_equal(np.asarray(images.to_pil(r.image)), pixels(out).astype(np.uint8))


def test_sd3_batch_three_jobs_then_resume(capsys, tmp_path, sd3, photo):
    man = make_manifest(tmp_path, photo, 3)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "batch", "--model", sd3, "--manifest", man, "--out-dir", out, *FAST)
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert (rep["done"], rep["skipped"], rep["failed"]) == (3, 0, 0)
    assert rep["model"]["family"] == "sd3" and rep["settings"]["guidance_scale"] == 7.0
    sides = [json.loads((out / f"j{i}.json").read_text()) for i in range(3)]
    assert all(s["status"] == "ok" and s["model"]["kind"] == "sd3" for s in sides)
    assert not np.array_equal(pixels(out / "j0.png"), pixels(out / "j1.png"))  # seeds 0 and 1
    assert np.array_equal(pixels(out / "j0.png"), pixels(out / "j2.png"))  # the same job: the same pixels
    rc, _, err = run(capsys, "batch", "--model", sd3, "--manifest", man, "--out-dir", out, *FAST)
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and (rep["done"], rep["skipped"], rep["failed"]) == (0, 3, 0), err


def test_sd3_batch_on_ray_equals_the_local_batch(capsys, tmp_path, sd3, photo):
    """`batch --ray` (the real process: one worker, ~30 s of Ray start-up on 2 cores) writes the local batch's
    pixels: its actor holds the same Editor."""
    man = make_manifest(tmp_path, photo, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray worker's one CPU: the same float reductions, the same pixels
    try:
        rc, _, err = run(capsys, "batch", "--model", sd3, "--manifest", man, "--out-dir", tmp_path / "local", *FAST)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "batch", "--ray", "--workers", "1", "--model", str(sd3),
                        "--manifest", str(man), "--out-dir", str(tmp_path / "ray"), *FAST],
                       capture_output=True, text=True, timeout=300, env={**os.environ}, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ray" / "report.json").read_text())["done"] == 2
    for i in range(2):
        assert np.array_equal(pixels(tmp_path / "ray" / f"j{i}.png"), pixels(tmp_path / "local" / f"j{i}.png"))
        assert json.loads((tmp_path / "ray" / f"j{i}.json").read_text())["model"]["family"] == "sd3"


def test_info_on_sd3(capsys, sd3):
    rc, stdout, err = run(capsys, "info", "--model", sd3, "--json")
    assert rc == 0, err
    info = json.loads(stdout.splitlines()[-1])
    assert info["kind"] == "sd3" and info["t5"] is True and info["prediction_type"] == "flow"
    assert info["transformer"]["parameters"] == info["parameters"]["transformer"] > 0
    assert info["parameters"]["total"] == sum(v for k, v in info["parameters"].items() if k != "total")
    rc, stdout, _ = run(capsys, "info", "--model", sd3)
    assert "T5 encoder:       present" in stdout and "architecture:     sd3 (transformer 2 blocks" in stdout


# ---- FLUX.1 ---------------------------------------------------------------------------------------------------


def test_flux_dev_folder_edits_from_the_cli(capsys, tmp_path, flux, photo):
    out = tmp_path / "d.png"
    rc, _, err = run(capsys, "edit", "--model", flux["dev"], "--image", photo, "--edit", "cat -> dog", "--out", out,
                     "--save-masks", *FAST)
    assert rc == 0, err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"]["family"] == "flux-dev" and meta["settings"]["guidance_scale"] == 3.5
    assert_background_kept(out, photo, 1)


def test_bfl_single_file_with_text_encoders(capsys, tmp_path, flux, photo):
    """flux1-dev.safetensors (BFL's names) with ae.safetensors beside it, the encoders as ComfyUI's files in
    --text-encoders: the same image as the diffusers folder it was written from."""
    dev = flux["dev"]
    f = tiny_flux.write_bfl(dev, tmp_path / "repo", "flux1-dev.safetensors")
    shutil.copy(tiny_flux.write_separate(dev, tmp_path / "ae_src") / "ae.safetensors", tmp_path / "repo")
    te = tiny_flux.write_separate(dev, tmp_path / "text_encoders", ae=False)
    shutil.copytree(dev / "tokenizer_2", te / "tokenizer_2")
    assert family.family(f) == "flux-dev"
    rc, _, err = run(capsys, "edit", "--model", f, "--image", photo, "--edit", "cat -> dog", "--out",
                     tmp_path / "file.png", *FAST)
    last = err.splitlines()[-1]  # the file lacks its encoders: one line, naming the flag
    assert rc == 2 and err.count("diffedit: error") == 1 and last.startswith("diffedit: error: --model ")
    assert "pass --text-encoders <a folder" in last
    for model, extra, name in ((f, ["--text-encoders", te], "file.png"), (dev, [], "folder.png")):
        rc, _, err = run(capsys, "edit", "--model", model, *extra, "--image", photo, "--edit", "cat -> dog",
                         "--out", tmp_path / name, *FAST)
        assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "file.png"), pixels(tmp_path / "folder.png"))


# ---- per-family defaults and refusals -------------------------------------------------------------------------


def options(*args):
    return cli.options_from_args(cli.build_parser().parse_args([str(a) for a in args]))


def test_per_family_defaults_where_the_user_set_none(tmp_path, sd3, flux, tiny_folder, photo):
    base = ["--image", photo, "--edit", "a -> b", "--out", tmp_path / "x.png"]
    for model, want in ((sd3, (28, 0.8, 7.0, None)), (flux["dev"], (28, 0.8, 3.5, None)),
                        (flux["schnell"], (4, 0.75, 0.0, None)), (tiny_folder("sd1"), (50, 0.8, 7.5, "ddim"))):
        s = options("edit", "--model", model, *base).settings
        assert (s.steps, s.strength, s.guidance_scale, s.scheduler) == want, model
        assert Editor.from_pretrained(model, device="cpu").defaults == s  # the Python API's defaults: the same
    s = options("edit", "--model", sd3, *base, "--steps", 9, "--guidance", 2, "--strength", 0.5).settings
    assert (s.steps, s.guidance_scale, s.strength) == (9, 2.0, 0.5)  # the user's values win
    assert options("batch", "--model", flux["dev"], "--manifest", "m.jsonl", "--out-dir", tmp_path).settings.steps == 28


def test_default_dtype_per_family(sd3, flux, tiny_folder):
    assert [family.family(p) for p in (sd3, flux["dev"], flux["schnell"], tiny_folder("sd1"))] == \
        ["sd3", "flux-dev", "flux-schnell", "sd"]
    assert family.default_dtype("flux-dev", "cuda") == family.default_dtype("sd3", "cuda") == torch.bfloat16
    assert family.default_dtype("sd", "cuda") == torch.float16 and family.default_dtype("flux-dev", "cpu") == torch.float32


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(session, "load_model", refuse)


def refusals(sd3, flux, sd1):
    return [
        (sd3, ["--compat", "diffusers"], "--compat diffusers: --model"),
        (sd3, ["--scheduler", "dpm++2m"], "--scheduler dpm++2m:"),
        (sd3, ["--prediction-type", "epsilon"], "--prediction-type epsilon:"),
        (sd3, ["--editor", "inpaint"], "--editor inpaint:"),
        (sd3, ["--text-encoders", sd3], "--text-encoders applies to SD 3.x / FLUX.1 single files"),
        (sd1, ["--editor", "flowedit"], "--editor flowedit runs on rectified-flow models"),
        (flux["dev"], ["--negative-prompt", "blurry"], "--negative-prompt:"),
        (flux["schnell"], ["--guidance", "3"], "--guidance:"),
        (sd3, ["--crop-margin", "2"], "--crop-margin 2: --model"),
        (flux["dev"], ["--cache-interval", "3"], "--cache-interval 3: --model"),
        (sd3, ["--preset", "fast"], "--preset 'fast' is measured on SD UNet models"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_what_a_family_cannot_take_is_refused_in_one_line_before_loading(capsys, tmp_path, sd3, flux, tiny_folder,
                                                                          photo, no_loading, case):
    model, extra, message = refusals(sd3, flux, tiny_folder("sd1"))[case]
    rc, _, err = run(capsys, "edit", "--model", model, "--image", photo, "--edit", "cat -> dog",
                     "--out", tmp_path / "r.png", *extra)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("diffedit: error: ") and message in err, err
    assert files_in(tmp_path) == []


# ---- the runtime ------------------------------------------------------------------------------------------------


def test_transformer_runner_splits_and_pads_as_one_call(sd3, flux):
    """TransformerRunner: a batch split to the limit and padded to buckets gives the unsplit call's velocities;
    FLUX.1-dev's guidance (a number or per sample) follows the batch."""
    from diffedit_engine.weights import load_model

    for path, guidance in ((sd3, None), (flux["dev"], 3.5), (flux["dev"], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))):
        m = load_model(path)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 16, 4, 6, generator=g)
        t = torch.tensor([900.0, 800.0, 700.0, 600.0, 500.0])
        ctx, pooled = m.encode_prompt(["a cat", "a dog", "", "a red circle", "blue"])
        kw = {} if guidance is None else {"guidance": guidance}
        with torch.no_grad():
            want = m.transformer(x, t, ctx, pooled, **kw)
            got = TransformerRunner(m.transformer, buckets=(4,), max_batch=4)(x, t, ctx, pooled, **kw)
        assert (got - want).abs().max() <= 1e-5


def test_transformer_memory_estimate(sd3):
    """The per-sample estimate grows with the tokens (h·w/4 + text) and the attention matrix (tokens²)."""
    from diffedit_engine.weights import load_model

    m = load_model(sd3)
    small, big = transformer_sample_bytes(m, 32, 32), transformer_sample_bytes(m, 64, 64)
    n_small, n_big = 16 * 16 + 77 + m.max_sequence_length, 32 * 32 + 77 + m.max_sequence_length
    cfg = m.transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    for n, got in ((n_small, small), (n_big, big)):
        assert got == 24 * n * d * 4 + cfg.num_attention_heads * n ** 2 * 4  # fp32 on a CPU: the matrix counted


def test_editor_warmup_and_batch_on_a_flow_model(sd3):
    ed = Editor.from_pretrained(sd3, device="cpu")
    assert ed.warmup((32, 48), n_pairs=2, num_maps=1) > 0
    jobs = [{"image": torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(i)), "pairs": [("cat", "dog")],
             "options": {"seed": i, "num_maps": 1, "steps": 4}} for i in range(3)]
    rs = ed.edit_batch(jobs)
    assert [r.batch for r in rs] == [3, 3, 3] and all(r.image.shape == (3, 32, 48) for r in rs)
    alone = ed.edit(jobs[1]["image"], [("cat", "dog")], seed=1, num_maps=1, steps=4)
    assert torch.allclose(alone.image, rs[1].image, atol=1e-5)  # batched: each job's own draws
    assert set(ed.max_batch) == {(4, 6)}
