"""Editing on SD-XL (tiny random models, CPU): diffedit's three steps and regions.edit_many carry the pooled
embedding and the size micro-conditioning through every UNet call, with the SD 1.x/2.x invariants — the
background bit for bit outside the mask, masks per image, one mask-pass UNet batch, N + 1 samples per fused
step; the Editor's runner (splitting, bucket padding) and the CLI (folder and single file); compat="diffusers"
is a clear error."""
import warnings

import pytest
import torch
from PIL import Image

from diffedit_engine import cli
import single_file
from diffedit_engine.engine.edit import diffedit, regions, toolkit
from diffedit_engine.engine.samplers import ddim
from diffedit_engine.engine.models import sdxl
from diffedit_engine.engine.runtime import Editor, EditorOptions, UNetRunner
from diffedit_engine.weights import load_model

STEPS = 3
S = int(STEPS * 0.8)
PAIRS = [("a cat", "a dog"), ("a cat", "a red ball")]


@pytest.fixture(scope="module")
def xl(tiny_sdxl_folder):
    return load_model(tiny_sdxl_folder("xl"))


def image(seed=0, b=None, h=48, w=64):
    shape = (3, h, w) if b is None else (b, 3, h, w)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


class Spy:
    """The UNet with every call's batch, pooled-embedding batch and time ids recorded."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, t, ctx, text_embeds=None, time_ids=None):
        self.calls.append((x.shape[0], None if text_embeds is None else text_embeds.shape[0],
                           None if time_ids is None else time_ids.tolist()))
        return self.unet(x, t, ctx, text_embeds=text_embeds, time_ids=time_ids)


@pytest.fixture
def spied(xl):
    unet = xl.unet
    xl.unet = Spy(unet)
    yield xl
    xl.unet = unet


def test_diffedit_conditioning_and_counts(spied):
    """Mask pass: ONE call of 2n samples; inversion: S calls of 1 (∅, unguided); decoding: S calls of 2 (∅ +
    target). Every call carries one pooled embedding per sample and time_ids (H, W, 0, 0, H, W) of the image."""
    img, n = image(1), 3
    mask = diffedit.generate_mask(spied, img, "a cat", "a dog", num_maps=n, steps=STEPS, generator=gen())
    inv = diffedit.invert(spied, img, steps=STEPS)
    diffedit.edit(spied, inv, mask, "a dog", steps=STEPS, output="latent")
    calls = spied.unet.calls
    assert [c[0] for c in calls] == [2 * n] + [1] * S + [2] * S
    assert all(b == p and ids == [[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]] for b, p, ids in calls)
    assert mask.shape == (6, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_diffedit_background_exact_and_image(xl):
    img = image(2)
    mask = torch.zeros(6, 8)
    mask[1:4, 2:6] = 1
    inv = diffedit.invert(xl, img, steps=STEPS)
    z = diffedit.edit(xl, inv, mask, "a dog", steps=STEPS, output="latent")
    z0 = toolkit.encode_image(xl, img[None])[0]
    out = mask == 0
    assert torch.equal(z[:, out], z0[:, out])  # bit for bit
    assert not torch.equal(z[:, ~out], z0[:, ~out])
    im = diffedit.edit(xl, inv, mask, "a dog", steps=STEPS)
    assert im.shape == (3, 48, 64) and 0 <= im.min() and im.max() <= 1


def test_diffedit_equals_hand_written_sdxl_loops(xl):
    """invert (∅, unguided) and edit (full mask, CFG) against DDIM written out with m.encode_prompt's context and
    pooled embedding and sdxl.time_ids of the image's size: the conditioning reaches the UNet as SD-XL wants."""
    img = image(3)
    ids = sdxl.time_ids((48, 64))
    ctx, pooled = xl.encode_prompt(["", "a dog"])
    x = toolkit.encode_image(xl, img[None])
    inv_s = ddim.inverse_schedule(xl.scheduler, STEPS, 0.8)
    ref = [x]
    for i in range(S):
        e = xl.unet(x, inv_s.t[i], ctx[:1], text_embeds=pooled[:1], time_ids=ids)
        x = ddim.ddim_inverse_step(e, x, inv_s.alpha_from[i], inv_s.alpha_to[i], xl.prediction_type)
        ref.append(x)
    inv = diffedit.invert(xl, img, steps=STEPS)
    torch.testing.assert_close(inv, torch.cat(ref[::-1]), rtol=0, atol=1e-6)
    sch = ddim.schedule(xl.scheduler, STEPS, 0.8)
    x = inv[:1]
    for i in range(S):
        e = xl.unet(x.expand(2, -1, -1, -1), sch.t[i], ctx, text_embeds=pooled, time_ids=ids)
        x = ddim.ddim_step(e[:1] + 7.5 * (e[1:] - e[:1]), x, sch.alpha_from[i], sch.alpha_to[i], xl.prediction_type)
    z = diffedit.edit(xl, inv, torch.ones(6, 8), "a dog", steps=STEPS, output="latent")
    torch.testing.assert_close(z, x[0], rtol=0, atol=1e-5)


def test_edit_many_two_pairs_counts_and_background(spied):
    """N = 2 pairs: one mask-pass call of n·P samples, S inversion calls of 1, S fused calls of N + 1; the
    background outside both masks is the clean latent bit for bit; argmax masks are disjoint."""
    img, n, N = image(4), 2, len(PAIRS)
    P = len({p for pair in PAIRS for p in pair})
    r = regions.edit_many(spied, img, PAIRS, steps=STEPS, num_maps=n, threshold="median", output="latent",
                          generator=gen())
    assert [c[0] for c in spied.unet.calls] == [n * P] + [1] * S + [N + 1] * S
    assert all(b == p and ids == [[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]] for b, p, ids in spied.unet.calls)
    assert r.unet_samples == n * P + S * (1 + N + 1)
    M = r.masks
    assert M.shape == (N, 6, 8) and r.thresholds.shape == (N,) and M.sum(0).max() <= 1
    out = M.sum(0) == 0
    assert out.any() and (~out).any()
    z0 = toolkit.encode_image(spied, img[None])[0]
    assert torch.equal(r.latents[:, out], z0[:, out])


def test_edit_many_masks_per_image_and_overlaps(xl):
    """A batch of two images with one generator each: every image gets the masks (and latents) of its own run;
    the subtract policy keeps the background exact too."""
    imgs = image(5, b=2)
    kw = dict(steps=STEPS, num_maps=2, overlap="subtract", threshold="clamp:3", output="latent")
    both = regions.edit_many(xl, imgs, PAIRS, generator=[gen(7), gen(8)], **kw)
    assert both.masks.shape == (2, 2, 6, 8)
    z0 = toolkit.encode_image(xl, imgs)
    for b, seed in enumerate((7, 8)):
        one = regions.edit_many(xl, imgs[b], PAIRS, generator=gen(seed), **kw)
        assert torch.equal(both.masks[b], one.masks)
        torch.testing.assert_close(both.latents[b], one.latents, rtol=0, atol=1e-4)
        out = both.masks[b].sum(0) == 0
        assert torch.equal(both.latents[b][:, out], z0[b][:, out])


def test_editor_runner_splits_and_pads_sdxl(xl):
    """The Editor on SD-XL equals regions.edit_many; its UNet runner splitting (max_batch 3) and padding to
    buckets carries text_embeds/time_ids along (the same results)."""
    img = image(6)
    ref = regions.edit_many(xl, img, PAIRS, steps=STEPS, num_maps=2, output="latent", generator=gen(0))
    ed = Editor(xl, EditorOptions(compile=False, max_batch=3, buckets=(2, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdxl.ResolutionWarning)
        r = ed.edit(img, PAIRS, steps=STEPS, num_maps=2, output="latent", seed=0)
    assert torch.equal(r.masks, ref.masks)
    torch.testing.assert_close(r.latents, ref.latents, rtol=0, atol=1e-5)


def test_unet_runner_time_ids_rows(xl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 8, generator=g)
    ctx, pooled = xl.encode_prompt(["a", "b", "c"])
    ids = torch.tensor([[48.0, 64, 0, 0, 48, 64], [64, 64, 0, 0, 64, 64], [32, 96, 0, 0, 32, 96]])
    with torch.no_grad():
        ref = xl.unet(x, 500, ctx, text_embeds=pooled, time_ids=ids)
        ref1 = xl.unet(x, 500, ctx, text_embeds=pooled, time_ids=ids[:1])
        run = UNetRunner(xl.unet, buckets=(2, 4), max_batch=2)
        torch.testing.assert_close(run(x, 500, ctx, pooled, ids), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(run(x, 500, ctx, text_embeds=pooled, time_ids=ids[:1]), ref1, rtol=0, atol=1e-5)


def test_compat_diffusers_is_a_clear_error(xl):
    img = image(7)
    with pytest.raises(ValueError, match="SD-XL"):
        diffedit.generate_mask(xl, img, "a cat", "a dog", steps=STEPS, num_maps=1, compat="diffusers")
    with pytest.raises(ValueError, match="SD-XL"):
        diffedit.invert(xl, img, "a cat", steps=STEPS, compat="diffusers")
    # the image is below SD-XL's size: the Editor states it (a ResolutionWarning) before the refusal
    with pytest.raises(ValueError, match="SD-XL"), pytest.warns(sdxl.ResolutionWarning):
        Editor(xl, EditorOptions(compile=False)).edit(img, PAIRS[:1], steps=STEPS, num_maps=1, compat="diffusers")


def test_low_resolution_is_stated(xl, tiny_folder):
    assert sdxl.resolution_note(xl, (1024, 1024)) is None and sdxl.resolution_note(xl, (768, 1024)) is None
    assert "1024x1024" in sdxl.resolution_note(xl, (512, 512))
    assert sdxl.resolution_note(load_model(tiny_folder("sd1")), (64, 64)) is None
    with pytest.warns(sdxl.ResolutionWarning, match="trained at 1024x1024"):
        Editor(xl, EditorOptions(compile=False)).masks(image(8), PAIRS[:1], steps=STEPS, num_maps=1)


@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_cli_edit_on_sdxl(capsys, tmp_path, tiny_sdxl_folder, layout, monkeypatch):
    monkeypatch.setenv("DIFFEDIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_sdxl_folder("xl")
    model = folder if layout == "folder" else single_file.write_single_file(folder, tmp_path / "xl.safetensors")
    photo = tmp_path / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((44, 36)).save(photo)
    out = tmp_path / "o" / "dog.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdxl.ResolutionWarning)
        rc = cli.main([str(a) for a in ("edit", "--model", model, "--image", photo, "--edit", "cat -> dog",
                                        "--out", out, "--steps", 3, "--maps", 1, "--seed", 2)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert Image.open(out).size == (44, 36)


def test_cli_vae_dtype_auto_is_the_models_rule(capsys, tmp_path, tiny_sdxl_folder, monkeypatch):
    """issue 20 item 1: `--dtype float16` with `--vae-dtype auto` (the default) keeps an SD-XL VAE that asks for
    it (force_upcast) in float32, as load_model does for a Python caller; an explicit --vae-dtype still wins."""
    import json

    monkeypatch.setenv("DIFFEDIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_sdxl_folder("xl")
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"]
    photo = tmp_path / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((32, 32)).save(photo)
    for extra, vae in (((), "float32"), (("--vae-dtype", "float16"), "float16")):
        out = tmp_path / f"m-{vae}.png"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sdxl.ResolutionWarning)
            rc = cli.main([str(a) for a in ("mask", "--model", folder, "--image", photo, "--edit", "cat -> dog",
                                            "--out", out, "--steps", 2, "--maps", 1, "--dtype", "float16", *extra)])
        _, err = capsys.readouterr()
        assert rc == 0, err
        engine = json.loads(out.with_suffix(".json").read_text())["engine"]
        assert (engine["dtype"], engine["vae_dtype"]) == ("float16", vae)
