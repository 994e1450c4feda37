"""engine.multidiffusion.generate (MultiDiffusion region-based text-to-image) on the tiny SD1 model."""
import pytest
import torch

from diffedit_engine.engine.samplers import ddim
from diffedit_engine.engine.edit import diffedit, multidiffusion
from diffedit_engine.kernels.fusion import fuse
from diffedit_engine.weights import load_model

STEPS = 4


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    return load_model(tiny_folder("sd1"))


def gen(seed=3):
    return torch.Generator().manual_seed(seed)


def plain_ddim(m, prompt, steps, g, seed):
    """Text-to-image DDIM with CFG, written out from the DDIM step (the reference the fusion must reduce to)."""
    x = torch.randn((1, 4, 8, 8), generator=gen(seed))
    ctx = diffedit.encode_prompts(m, ["", prompt]).context
    sch = ddim.schedule(m.scheduler, steps, 1.0)
    for i in range(len(sch.t)):
        e = m.unet(x.expand(2, -1, -1, -1), sch.t[i], ctx)
        x = ddim.ddim_step(e[:1] + g * (e[1:] - e[:1]), x, sch.alpha_from[i], sch.alpha_to[i], m.prediction_type)
    return x[0]


@pytest.mark.parametrize("bootstrap", [0.0, 0.5])
def test_one_full_mask_is_plain_ddim(sd1, bootstrap):
    z = multidiffusion.generate(sd1, torch.ones(1, 8, 8), ["a red ball"], steps=STEPS, bootstrap=bootstrap,
                                generator=gen(), output="latent")
    torch.testing.assert_close(z, plain_ddim(sd1, "a red ball", STEPS, 7.5, 3), rtol=0, atol=1e-5)


def test_uncovered_pixels_keep_their_value(sd1):
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :3] = 1
    masks[1, 4:, 2:5] = 1  # overlaps mask 0 in column 2
    z = multidiffusion.generate(sd1, masks, ["a cat", "a dog"], background_prompt=None, steps=STEPS,
                                bootstrap=0.5, generator=gen(), output="latent")
    xT = torch.randn((1, 4, 8, 8), generator=gen())[0]
    free = masks.sum(0) == 0
    assert torch.equal(z[:, free], xT[:, free])  # Σ W = 0: untouched, bit for bit
    assert not torch.allclose(z[:, ~free], xT[:, ~free])


def test_bootstrap_runs_and_counts(sd1):
    masks = torch.zeros(2, 64, 64)  # image-resolution masks are resized to the latent grid
    masks[0, :32], masks[1, 32:, 16:48] = 1, 1
    calls = []
    unet = sd1.unet
    sd1.unet = lambda x, t, c: calls.append(x.shape[0]) or unet(x, t, c)
    try:
        img = multidiffusion.generate(sd1, masks, ["a cat", "a dog"], background_prompt="a field", steps=10,
                                      size=(64, 64), bootstrap=0.2, generator=gen())
    finally:
        sd1.unet = unet
    R = 3  # background + 2 regions
    assert calls == [2 * R] * 2 + [R + 1] * 8
    assert sum(calls) == multidiffusion.unet_samples(10, R, 0.2)
    assert img.shape == (3, 64, 64) and torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1


def test_bootstrap_changes_the_result(sd1):
    masks = torch.zeros(1, 8, 8)
    masks[0, 2:6, 2:6] = 1
    a = multidiffusion.generate(sd1, masks, ["a cat"], steps=STEPS, bootstrap=0.0, generator=gen(), output="latent")
    b = multidiffusion.generate(sd1, masks, ["a cat"], steps=STEPS, bootstrap=0.5, generator=gen(), output="latent")
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_fuse_rule():
    """The bootstrap steps fuse the regions' own steps by kernels.fusion.fuse (one image, R regions)."""
    ys = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 4.0)])
    W = torch.tensor([[[1.0, 1.0], [0.5, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    x = torch.full((1, 1, 2, 2), 10.0)
    out = fuse(ys[None], x, W[None])[0, 0]
    assert out.tolist() == [[3.0, 2.0], [0.5 * 2 + 0.5 * 10, 10.0]]


def test_bad_inputs(sd1):
    with pytest.raises(ValueError, match="one prompt each"):
        multidiffusion.generate(sd1, torch.ones(2, 8, 8), ["a"], steps=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        multidiffusion.generate(sd1, torch.ones(1, 8, 8), ["a"], steps=2, size=(60, 64))
