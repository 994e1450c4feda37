"""engine.inpaint: the sequential inpainting route of edit_many on the tiny 9-channel model, and inpainting
models used as text-to-image models for the mask pass."""
import pytest
import torch

from diffedit_engine.engine.edit import diffedit, inpaint, regions
from diffedit_engine.engine.edit.settings import MaskSpec
from diffedit_engine.weights import load_model

STEPS = 3
PAIRS = [("a cat", "a dog"), ("", "a red ball")]


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    return load_model(tiny_folder("sd1"))


@pytest.fixture(scope="module")
def inp(tiny_folder):
    return load_model(tiny_folder("inpaint"))


def image(seed=0, b=1):
    return torch.rand((b, 3, 64, 64), generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def half_mask(b=1):
    m = torch.zeros(b, 8, 8)
    m[:, 2:6, 1:5] = 1
    return m


def test_unet_input_is_sd_inpainting_layout(inp):
    """cat(noisy latents, mask at latent res (1 = repaint), VAE mean of image·(1 − mask) in [−1, 1], scaled)."""
    seen = []
    unet = inp.unet
    inp.unet = lambda x, t, c: seen.append(x.clone()) or unet(x, t, c)
    try:
        img, mk = image(2), half_mask()
        inpaint.inpaint(inp, img, mk, "a dog", steps=2, strength=1.0, generator=gen())
    finally:
        inp.unet = unet
    x = seen[0]
    assert x.shape == (2, 9, 8, 8)  # CFG pair [uncond, prompt]
    assert torch.equal(x[:, 4], mk.expand(2, 8, 8))
    hole = mk.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    masked = diffedit.encode_image(inp, ((2 * img - 1) * (1 - hole) + 1) / 2)
    assert torch.equal(x[:, 5:], masked.expand(2, -1, -1, -1))
    noise = torch.randn((1, 4, 8, 8), generator=gen())
    assert torch.equal(x[0, :4], noise[0])  # strength 1: pure noise, as the pipeline starts


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_outside_mask_ends_on_input_latents(inp, strength):
    img, mk = image(3), half_mask()
    z = inpaint.inpaint(inp, img, mk, "a dog", steps=STEPS, strength=strength, generator=gen())
    z0 = diffedit.encode_image(inp, img)
    out = mk[0] == 0
    assert torch.equal(z[0][:, out], z0[0][:, out])  # bit for bit
    assert not torch.allclose(z[0][:, ~out], z0[0][:, ~out])
    free = inpaint.inpaint(inp, img, mk, "a dog", steps=STEPS, strength=strength, generator=gen(), blend=False)
    assert not torch.equal(free[0][:, out], z0[0][:, out])  # the pipeline's unblended 9-channel behaviour


def test_sequence_chains_passes(inp):
    img, masks = image(4), torch.stack([half_mask()[0], half_mask()[0].flip(1)])[None]
    z, n = inpaint.inpaint_sequence(inp, img, masks, ["a dog", "a ball"], steps=STEPS, strength=1.0, generator=gen())
    g = gen()
    z1 = inpaint.inpaint(inp, img, masks[:, 0], "a dog", steps=STEPS, strength=1.0, generator=g)
    img2 = diffedit.decode_latents(inp, z1)
    z2 = inpaint.inpaint(inp, img2, masks[:, 1], "a ball", steps=STEPS, strength=1.0, generator=g)
    assert torch.equal(z, z2) and n == 2 * STEPS * 2
    out = masks[0, 1] == 0
    assert torch.equal(z[0][:, out], diffedit.encode_image(inp, img2)[0][:, out])


def test_edit_many_inpaint_route(sd1, inp):
    """Masks from the base model's mask pass, then inpainting on the inpainting model, one pass per pair,
    each on the previous pass's decoded output (random draws: mask noise, then each pass's noise)."""
    img = image(5)
    r = regions.edit_many(sd1, img[0], PAIRS, editor="inpaint", inpaint_model=inp, steps=STEPS, num_maps=2,
                          generator=gen(), output="latent")
    g = gen()
    maps, _ = regions.mask_pass(sd1, diffedit.encode_image(sd1, img), PAIRS, MaskSpec(num_maps=2), steps=STEPS, generator=g)
    masks = regions.make_masks(maps)[0]
    assert torch.equal(r.masks, masks[0]) and r.latents.shape == (4, 8, 8)
    z1 = inpaint.inpaint(inp, img, masks[:, 0], "a dog", steps=STEPS, strength=0.8, generator=g)
    img2 = diffedit.decode_latents(inp, z1)
    z2 = inpaint.inpaint(inp, img2, masks[:, 1], "a red ball", steps=STEPS, strength=0.8, generator=g)
    assert torch.equal(r.latents, z2[0])
    out = r.masks[1] == 0  # the last pass ends on its input's latents outside its mask
    assert torch.equal(r.latents[:, out], diffedit.encode_image(inp, img2)[0][:, out])


def test_inpaint_model_alone(inp):
    """m an inpainting model: its mask pass runs as text-to-image (all-ones mask, grey masked image), for both
    editors; sample counts as for a base model."""
    seen = []
    unet = inp.unet
    inp.unet = lambda x, t, c: seen.append(x.shape) or unet(x, t, c)
    try:
        r = regions.edit_many(inp, image(6)[0], PAIRS, editor="inpaint", steps=STEPS, num_maps=2, generator=gen())
        f = regions.edit_many(inp, image(6)[0], PAIRS, steps=STEPS, num_maps=2, generator=gen(), output="latent")
    finally:
        inp.unet = unet
    assert all(s[1] == 9 for s in seen)
    assert seen[0][0] == 2 * 4  # n·P: "a cat", "a dog", "", "a red ball"
    assert r.image.shape == (3, 64, 64) and torch.equal(r.masks, f.masks)
    z0 = diffedit.encode_image(inp, image(6))[0]
    out = f.masks.sum(0) == 0
    assert torch.equal(f.latents[:, out], z0[:, out])


def test_full_mask_conditioning_is_grey_image(inp):
    tm = inpaint.text_model(inp)
    assert tm is not inp and tm.unet is not inp.unet and inpaint.text_model(tm) is tm and tm.kind == "sd1"
    c = tm.unet.cond(8, 8, torch.device("cpu"), torch.float32)
    grey = diffedit.encode_image(inp, torch.full((1, 3, 64, 64), 0.5))
    assert torch.equal(c[:, :1], torch.ones(1, 1, 8, 8)) and torch.equal(c[:, 1:], grey)


def test_needs_inpaint_model(sd1):
    with pytest.raises(ValueError, match="inpainting model"):
        inpaint.inpaint(sd1, image(), half_mask(), "x", steps=2)
    with pytest.raises(ValueError, match="inpainting model"):
        regions.edit_many(sd1, image()[0], PAIRS, editor="inpaint", steps=2, num_maps=1)
