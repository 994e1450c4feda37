"""Schedulers at run time (issue 11): the scheduler configs a folder carries change the edit exactly as they change
StableDiffusionDiffEditPipeline's (clip_sample, thresholding, an inverse_scheduler/ folder), compat="diffusers"
with DPM-Solver++ against the pipeline itself, the paper-mode invariants with DPM-Solver++, and --scheduler from
the command line into the sidecar. Tiny random SD1 (epsilon) and SD2 (v-prediction) folders; diffusers is the
oracle."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import (DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepInverseScheduler,
                       DPMSolverMultistepScheduler)
from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import (
    StableDiffusionDiffEditPipeline,
)

import tiny
from diffedit_engine.engine.edit import diffedit, regions, toolkit
from diffedit_engine.engine.edit.settings import EditSettings
from diffedit_engine.weights import load_model

TOL = 1e-3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _image(b=1, seed=0):
    return torch.rand(b, 3, 48, 32, generator=_gen(seed))


def _pipe(folder, scheduler, inverse_scheduler):
    ref = tiny.reference(folder)
    ref.tokenizer.model_max_length = 77
    pipe = StableDiffusionDiffEditPipeline(ref.vae, ref.text_encoder, ref.tokenizer, ref.unet, scheduler=scheduler,
                                           inverse_scheduler=inverse_scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _folder_with(tmp_path, src, sched: dict, inverse: dict | None = None):
    """A copy of a tiny folder with scheduler_config.json keys changed and, optionally, an inverse_scheduler/."""
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    path = dst / "scheduler" / "scheduler_config.json"
    cfg = {**json.loads(path.read_text()), **sched}
    path.write_text(json.dumps(cfg))
    if inverse is not None:
        (dst / "inverse_scheduler").mkdir()
        inv = {**cfg, "_class_name": "DDIMInverseScheduler", **inverse}
        (dst / "inverse_scheduler" / "scheduler_config.json").write_text(json.dumps(inv))
    return dst


def _compat_run(m, pipe, steps, strength, scheduler, mask_pipe=None):
    """(engine, pipeline) results of the three calls; the mask from the DDIM pipeline (mask_pipe) when given."""
    img = _image(seed=1)
    ref_mask = (mask_pipe or pipe).generate_mask(image=img, source_prompt="a cat", target_prompt="a dog",
                                                 num_maps_per_mask=2, mask_encode_strength=0.5,
                                                 num_inference_steps=steps, generator=_gen(1), output_type="np")
    mask = diffedit.generate_mask(m, img[0], "a cat", "a dog", num_maps=2, steps=steps, generator=_gen(1),
                                  compat="diffusers", scheduler=scheduler)
    assert torch.equal(mask, torch.from_numpy(ref_mask[0]).float())
    ref_inv = pipe.invert(prompt="a cat", image=img, num_inference_steps=steps, inpaint_strength=strength,
                          generator=_gen(2)).latents
    inv = diffedit.invert(m, img[0], "a cat", steps=steps, strength=strength, generator=_gen(2),
                          compat="diffusers", scheduler=scheduler)
    assert inv.shape[0] == ref_inv.shape[1] + 1
    ref_lat = pipe(prompt="a dog", mask_image=torch.from_numpy(ref_mask).float(), image_latents=ref_inv,
                   inpaint_strength=strength, num_inference_steps=steps, output_type="latent").images
    lat = diffedit.edit(m, inv, mask, "a dog", steps=steps, strength=strength, compat="diffusers",
                        output="latent", scheduler=scheduler)
    return SimpleNamespace(inv=inv, ref_inv=ref_inv, lat=lat, ref_lat=ref_lat)


def _close(r):
    assert (r.inv[:-1] - r.ref_inv[0]).abs().max() < TOL
    assert (r.lat - r.ref_lat[0]).abs().max() < TOL


# ---- DDIM configs: every option changes the numbers as in diffusers ---------------------------------------

DDIM_CASES = {
    # clip_sample with a small range (so that it clips) and an inverse_scheduler/ with its own offset and final ᾱ
    "clip+inverse_folder": (dict(clip_sample=True, clip_sample_range=0.5),
                            dict(steps_offset=0, set_alpha_to_one=True, clip_sample=True, clip_sample_range=0.5)),
    # dynamic thresholding (precedence over clip_sample in DDIMScheduler; DDIMInverseScheduler has none)
    "thresholding": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                          clip_sample=True), None),
}


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_ddim_configs_match_pipeline(tmp_path, tiny_folder, variant, case):
    sched, inverse = DDIM_CASES[case]
    folder = _folder_with(tmp_path, tiny_folder(variant), sched, inverse)
    m = load_model(folder)
    fwd = DDIMScheduler.from_pretrained(folder / "scheduler")
    inv = (DDIMInverseScheduler.from_pretrained(folder / "inverse_scheduler") if inverse is not None
           else DDIMInverseScheduler.from_config(fwd.config))
    r = _compat_run(m, _pipe(folder, fwd, inv), 4, 1.0, "ddim")
    _close(r)
    # honoured, not ignored: the plain folder gives other numbers
    plain = _compat_run(load_model(tiny_folder(variant)), _pipe(tiny_folder(variant), *_ddim_pair(tiny_folder(variant))),
                        4, 1.0, "ddim")
    assert (plain.lat - r.lat).abs().max() > 1e-2


def _ddim_pair(folder):
    fwd = DDIMScheduler.from_pretrained(folder / "scheduler")
    return fwd, DDIMInverseScheduler.from_config(fwd.config)


# ---- compat="diffusers" with DPM-Solver++ -----------------------------------------------------------------

@pytest.mark.parametrize("steps,strength", [(5, 1.0), (6, 0.5)])
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_compat_dpm_matches_pipeline(tiny_folder, variant, steps, strength):
    """The pipeline with DPMSolverMultistepScheduler + DPMSolverMultistepInverseScheduler (from_config of the
    folder's scheduler), its mask generated with DDIM (its generate_mask cannot run DPM-Solver)."""
    folder = tiny_folder(variant)
    m = load_model(folder)
    ddim_pipe = _pipe(folder, *_ddim_pair(folder))
    cfg = ddim_pipe.scheduler.config
    dpm_pipe = _pipe(folder, DPMSolverMultistepScheduler.from_config(cfg),
                     DPMSolverMultistepInverseScheduler.from_config(cfg))
    r = _compat_run(m, dpm_pipe, steps, strength, "dpm++2m", mask_pipe=ddim_pipe)
    _close(r)
    assert r.inv.shape[0] == int(steps * strength) + 1
    with pytest.raises(ValueError, match="eta"):
        diffedit.edit(m, r.inv, torch.ones(6, 4), "a dog", steps=steps, strength=strength, compat="diffusers",
                      scheduler="dpm++2m", eta=0.5)


# ---- paper mode with DPM-Solver++ -------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_dpm_paper_background_exact_and_masks_per_image(tiny_folder, variant):
    m = load_model(tiny_folder(variant))
    img = _image(2, seed=3)
    kw = dict(steps=5, scheduler="dpm++2m")
    masks = diffedit.generate_mask(m, img, "a cat", "a dog", num_maps=1, generator=[_gen(4), _gen(5)], **kw)
    for b in range(2):  # per image: the batch's mask b is image b's own
        solo = diffedit.generate_mask(m, img[b], "a cat", "a dog", num_maps=1, generator=_gen(4 + b), **kw)
        assert torch.equal(masks[b], solo)
    inv = diffedit.invert(m, img, strength=0.8, **kw)
    x0 = diffedit.encode_image(m, img)
    assert inv.shape[1] == 4 + 1 and torch.equal(inv[:, -1], x0)
    soft = torch.zeros(2, 6, 4)
    soft[:, 1:5, 1:3] = 0.5
    for mk in (masks, soft):
        z = diffedit.edit(m, inv, mk, "a dog", strength=0.8, output="latent", **kw)
        out = (mk == 0)[:, None].expand_as(z)
        assert torch.equal(z[out], x0[out])
        if mk.any():
            assert not torch.equal(z[~out], x0[~out])
    # DPM-Solver++ is not DDIM under another name
    z_ddim = diffedit.edit(m, diffedit.invert(m, img, steps=5, strength=0.8), soft, "a dog", steps=5,
                           strength=0.8, output="latent")
    assert (z_ddim - z).abs().max() > 1e-3


def test_dpm_regions_background_exact(tiny_folder):
    m = load_model(tiny_folder("sd1"))
    img = _image(seed=6)
    r = regions.edit_many(m, img[0], [("a cat", "a dog"), ("", "a hat")], threshold="quantile:0.7", num_maps=1,
                          steps=4, generator=_gen(7), output="latent", scheduler="dpm++2m")
    x0 = toolkit.encode_image(m, img)[0]
    out = (r.masks.sum(0) == 0).expand_as(r.latents)
    assert out.any() and torch.equal(r.latents[out], x0[out])
    assert r.unet_samples == 4 + 3 * (1 + 3)  # mask pass (P = 4 prompts) + inversion + decoding (∅ + 2)


def test_plans_and_fast_path_dispatch(tmp_path, tiny_folder):
    """The fused Triton/torch kernel serves plain DDIM only; a clipping config or DPM takes the torch path;
    None is the checkpoint's own family; unknown names are refused."""
    m = load_model(tiny_folder("sd1"))
    assert toolkit.is_plain_ddim(toolkit.plan(m, "ddim", 4))
    assert not toolkit.is_plain_ddim(toolkit.plan(m, "dpm++2m", 4))
    assert toolkit.schedulers(m, None).family == "ddim"
    clip = load_model(_folder_with(tmp_path, tiny_folder("sd1"), dict(clip_sample=True)))
    assert not toolkit.is_plain_ddim(toolkit.plan(clip, "ddim", 4))
    with pytest.raises(ValueError, match="scheduler"):
        toolkit.plan(m, "euler", 4)
    with pytest.raises(ValueError, match="scheduler"):
        EditSettings(scheduler="euler").checked()
    with pytest.raises(ValueError, match="inpaint"):
        EditSettings(scheduler="dpm++2m", editor="inpaint").checked()


def test_cli_scheduler_round_trip(tmp_path, tiny_folder, capsys, monkeypatch):
    from diffedit_engine import cli
    from PIL import Image

    monkeypatch.setenv("DIFFEDIT_CACHE_DIR", str(tmp_path / "cache"))
    photo = tmp_path / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((32, 24)).save(photo)
    out = tmp_path / "dog.png"
    rc = cli.main(["edit", "--model", str(tiny_folder("sd1")), "--image", str(photo), "--edit", "cat -> dog",
                   "--out", str(out), "--steps", "4", "--maps", "1", "--scheduler", "dpm++2m"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["scheduler"] == "dpm++2m"
    assert cli.main(["edit", "--model", str(tiny_folder("sd1")), "--image", str(photo), "--edit", "cat -> dog",
                     "--out", str(tmp_path / "x.png"), "--scheduler", "euler"]) == 2  # argparse's choices
