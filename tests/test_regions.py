"""engine.regions (N pairs in one pass, the fused editor) on tiny random models: equality with diffedit.edit
for one pair, the exact-background invariant, UNet sample counts, threshold wiring, mask clean-up order."""
import os

import numpy as np
import pytest
import torch

from diffedit_engine.engine.edit import diffedit, regions
from diffedit_engine.engine.runtime import UNetRunner
from diffedit_engine.engine.edit.settings import MaskSpec
from diffedit_engine.weights import load_model

STEPS = 3
PAIRS3 = [("", "a red ball"), ("a cat", "a dog"), ("a cat", "a lion")]


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    return load_model(tiny_folder("sd1"))


@pytest.fixture(scope="module")
def sd2(tiny_folder):
    return load_model(tiny_folder("sd2"))


def image(seed=0, b=None, size=64):
    shape = (3, size, size) if b is None else (b, 3, size, size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class CountingUNet:
    """Records the batch size of every UNet call."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, t, ctx):
        self.calls.append(x.shape[0])
        return self.unet(x, t, ctx)


@pytest.fixture
def counted(sd1):
    unet = sd1.unet
    sd1.unet = CountingUNet(unet)
    yield sd1
    sd1.unet = unet


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_one_pair_equals_diffedit_edit(variant, sd1, sd2):
    m = sd1 if variant == "sd1" else sd2
    img = image(3)
    r = regions.edit_many(m, img, [("a cat", "a dog")], steps=STEPS, num_maps=2, output="latent", generator=gen())
    inv = diffedit.invert(m, img, "", steps=STEPS, strength=0.8)
    ref = diffedit.edit(m, inv, r.masks[0], "a dog", steps=STEPS, output="latent")
    assert r.masks.shape == (1, 8, 8) and r.latents.shape == (4, 8, 8)
    torch.testing.assert_close(r.latents, ref, rtol=0, atol=1e-6)


def test_one_pair_mask_equals_generate_mask(sd1):
    """Same draws, same map: the N = 1 mask pass is diffedit's (its "clamp:3" rule, no smoothing)."""
    img = image(4)
    r = regions.edit_many(sd1, img, [("a cat", "a dog")], steps=STEPS, num_maps=3, threshold="clamp:3",
                          output="latent", generator=gen(5))
    ref = diffedit.generate_mask(sd1, img, "a cat", "a dog", num_maps=3, steps=STEPS, threshold="clamp:3",
                                 generator=gen(5))
    assert torch.equal(r.masks[0], ref)


def test_argmax_disjoint_and_background_exact(sd1):
    img = image(1)
    r = regions.edit_many(sd1, img, PAIRS3, steps=STEPS, num_maps=2, overlap="argmax", output="latent",
                          generator=gen())
    M = r.masks
    assert M.shape == (3, 8, 8)
    assert set(M.unique().tolist()) <= {0.0, 1.0}
    assert M.sum(0).max() <= 1  # disjoint
    outside = M.sum(0) == 0
    assert outside.any() and (~outside).any()
    z0 = diffedit.encode_image(sd1, img[None])[0]
    assert torch.equal(r.latents[:, outside], z0[:, outside])  # bit for bit
    out = regions.edit_many(sd1, img, PAIRS3, steps=STEPS, num_maps=2, generator=gen())
    assert out.image.shape == (3, 64, 64) and 0 <= out.image.min() and out.image.max() <= 1


def test_unet_batches(counted):
    """Mask pass: ONE call of n·P samples (P = distinct prompts, the unneeded ∅ dropped); inversion: S calls
    of 1; fused trajectory: S calls of N + 1 (one shared uncond + N targets)."""
    n, N = 3, len(PAIRS3)
    P = len({p for pair in PAIRS3 for p in pair})  # "", a red ball, a cat, a dog, a lion = 5 ≤ 2N
    r = regions.edit_many(counted, image(2), PAIRS3, steps=STEPS, num_maps=n, output="latent", generator=gen())
    S = int(STEPS * 0.8)
    assert counted.unet.calls == [n * P] + [1] * S + [N + 1] * S
    assert r.unet_samples == sum(counted.unet.calls)
    assert n * P <= n * (2 * N + 1) < 4 * n * N


def test_max_batch_splits_only(counted):
    base = regions.edit_many(counted, image(2), PAIRS3, steps=STEPS, num_maps=3, output="latent", generator=gen())
    counted.unet.calls.clear()
    counted.unet = UNetRunner(counted.unet, max_batch=4)  # batch splitting is the engine runner's job
    split = regions.edit_many(counted, image(2), PAIRS3, steps=STEPS, num_maps=3, output="latent", generator=gen())
    counted.unet = counted.unet.module
    assert max(counted.unet.calls) <= 4 and sum(counted.unet.calls) == split.unet_samples == base.unet_samples
    assert torch.equal(split.masks, base.masks)
    torch.testing.assert_close(split.latents, base.latents, rtol=0, atol=1e-5)


def test_batch_of_images(sd1):
    imgs = image(6, b=2)
    r = regions.edit_many(sd1, imgs, PAIRS3[1:], steps=STEPS, num_maps=2, generator=gen())
    assert r.image.shape == (2, 3, 64, 64) and r.masks.shape == (2, 2, 8, 8) and r.thresholds.shape == (2, 2)
    rl = regions.edit_many(sd1, imgs, PAIRS3[1:], steps=STEPS, num_maps=2, output="latent", generator=gen())
    z0 = diffedit.encode_image(sd1, imgs)
    for b in range(2):
        outside = rl.masks[b].sum(0) == 0
        assert torch.equal(rl.latents[b][:, outside], z0[b][:, outside])


def test_latents_input_and_generate_alias(sd1):
    img = image(8)
    z0 = diffedit.encode_image(sd1, img[None])[0]
    a = regions.edit_many(sd1, img, PAIRS3[1:], steps=2, num_maps=1, output="latent", generator=gen())
    b = regions.edit_many(sd1, z0, PAIRS3[1:], steps=2, num_maps=1, output="latent", generator=gen())
    assert torch.equal(a.latents, b.latents) and torch.equal(a.masks, b.masks)
    from diffedit_engine.engine.edit import multidiffusion
    assert regions.generate is multidiffusion.generate


def test_odd_size_image_cropped(sd1):
    r = regions.edit_many(sd1, torch.rand(3, 60, 70), PAIRS3[1:], steps=2, num_maps=1, generator=gen())
    assert r.image.shape == (3, 60, 70) and r.masks.shape == (2, 8, 9)


def numpy_otsu(s, bins=256):
    """Otsu (1979) on a 256-bin histogram of scores in [0, 1], bin j = (j/256, (j+1)/256] (0 in bin 0):
    the split maximising the between-class variance w0·w1·(μ0 − μ1)²; t = the split's upper bin edge."""
    idx = np.clip(np.ceil(s * bins).astype(int) - 1, 0, bins - 1)
    hist = np.bincount(idx.ravel(), minlength=bins).astype(np.float64)
    best, k_best = -1.0, 0
    for k in range(bins - 1):
        n0, n1 = hist[:k + 1].sum(), hist[k + 1:].sum()
        if n0 == 0 or n1 == 0:
            continue
        mu0 = (hist[:k + 1] * np.arange(k + 1)).sum() / n0
        mu1 = (hist[k + 1:] * np.arange(k + 1, bins)).sum() / n1
        v = n0 * n1 * (mu0 - mu1) ** 2
        if v > best * (1 + 1e-12):
            best, k_best = v, k
    return (k_best + 1) / bins


def numpy_threshold(rule, s):
    """The rules of kernels.noise_diff on the normalised scores s (what edit_many returns as .scores)."""
    name, _, arg = rule.partition(":")
    return {"clamp": lambda: 0.5, "fixed": lambda: float(arg), "mean": lambda: float(arg or 1) * s.mean(),
            "median": lambda: np.median(s), "quantile": lambda: np.quantile(s, float(arg)),
            "otsu": lambda: numpy_otsu(s)}[name]()


def numpy_scores(rule, raw):
    """The normalisation each rule applies to a raw map: clamp:r → clip(raw, 0, r·mean)/(r·mean); else min–max."""
    name, _, arg = rule.partition(":")
    if name == "clamp":
        c = float(arg) * raw.mean()
        return np.clip(raw, 0, c) / c
    return (raw - raw.min()) / (raw.max() - raw.min())


@pytest.mark.parametrize("rule", ["clamp:3", "fixed:0.4", "mean", "mean:1.2", "median", "otsu", "quantile:0.7"])
def test_threshold_rules_end_to_end(sd1, rule):
    """Wiring: the returned scores are the rule's normalisation of the (smoothed) raw maps, the thresholds the
    rule's statistic of the scores (NumPy), and the masks ("average": plain binary) exactly scores > threshold."""
    r = regions.edit_many(sd1, image(7), PAIRS3, steps=2, num_maps=2, threshold=rule, overlap="average",
                          smooth=1.0, output="latent", generator=gen())
    raw = regions.smooth_maps(regions.mask_pass(sd1, diffedit.encode_image(sd1, image(7)[None]), PAIRS3,
                                                MaskSpec(num_maps=2), steps=2, generator=gen())[0], 1.0)[0]
    for i in range(3):
        s = r.scores[i].double().numpy()
        np.testing.assert_allclose(s, numpy_scores(rule, raw[i].double().numpy()), atol=1e-6)
        assert r.thresholds[i].item() == pytest.approx(numpy_threshold(rule, s), rel=1e-6, abs=1e-7)
        assert torch.equal(r.masks[i] > 0, r.scores[i] > r.thresholds[i])


def test_subtract_end_to_end():
    """Hand-made maps through make_masks: "subtract" is the Technion rule (later maps subtracted from earlier
    ones and renormalised, an earlier map's own low scores kept), thresholded per map."""
    rng = np.random.default_rng(0)
    raw = rng.random((1, 3, 6, 7)).astype(np.float32)
    w, thr, s = regions.make_masks(torch.from_numpy(raw), MaskSpec(threshold="fixed:0.5", overlap="subtract"))
    mm = lambda a: (a - a.min()) / (a.max() - a.min())  # noqa: E731
    base = [mm(raw[0, i].astype(np.float64)) for i in range(3)]
    for i in range(3):
        d = base[i]
        for j in range(i + 1, 3):
            d = np.where(base[i] < 0.5, base[i], mm(d - base[j]))
        np.testing.assert_allclose(s[0, i].numpy(), d, atol=1e-6)
        np.testing.assert_array_equal(w[0, i].numpy(), (s[0, i].numpy() > 0.5).astype(np.float32))


def test_smooth_is_gaussian():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1
    y = regions.smooth_maps(x, 1.0)[0, 0]
    k = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    k = np.outer(k, k) / np.outer(k, k).sum()
    np.testing.assert_allclose(y[2:7, 2:7].numpy(), k, atol=1e-7)
    assert y.sum().item() == pytest.approx(1.0)
    c = torch.full((2, 3, 5, 6), 0.3)
    torch.testing.assert_close(regions.smooth_maps(c, (0.7, 3)), c)


def test_close_fills_holes_keeps_border():
    m = torch.ones(1, 1, 7, 7)
    m[0, 0, 3, 3] = 0  # a one-pixel hole
    m[0, 0, :, 6] = 0  # a band at the right border stays background
    c = regions.close_masks(m, 3)
    assert c[0, 0, 3, 3] == 1 and torch.equal(c[..., :6], torch.ones(1, 1, 7, 6))
    assert torch.equal(c[..., 6], torch.zeros(1, 1, 7))
    gap = torch.zeros(1, 1, 9, 9)
    gap[0, 0, 2:7, 1:4] = 1
    gap[0, 0, 2:7, 5:8] = 1  # a 1-pixel gap between two blocks
    assert regions.close_masks(gap, 3)[0, 0, 4, 4] == 1
    assert regions.close_masks(gap, (3, 2))[0, 0, 4, 4] == 1
    assert torch.equal(regions.close_masks(gap, 3) >= gap, torch.ones_like(gap, dtype=torch.bool))  # extensive


def test_closing_before_overlap_keeps_argmax_disjoint():
    """Hand-made maps: two touching blobs, each with a one-pixel hole; closing fills the holes and the argmax
    that runs after it keeps the masks disjoint (closing after the argmax would not)."""
    maps = torch.zeros(1, 2, 12, 12)
    maps[0, 0, 1:9, 1:7] = 2.0
    maps[0, 1, 3:11, 5:11] = 3.0
    maps[0, 0, 4, 3] = 0.0
    maps[0, 1, 7, 8] = 0.0
    w, thr, scores = regions.make_masks(maps, MaskSpec(threshold="fixed:0.5", close=3))
    assert torch.allclose(thr, torch.full((1, 2), 0.5))
    assert set(w.unique().tolist()) == {0.0, 1.0} and w.sum(1).max() == 1
    assert w[0, 0, 4, 3] == 1 and w[0, 1, 7, 8] == 1
    assert torch.equal(w[0, 0, 3:9, 5:7], torch.ones(6, 2))  # the overlap went to the first map (tie)
    # map 1 wins a blob by score except one pixel only map 0 covers; closing after the argmax would give
    # that pixel to both, closing before it keeps the masks disjoint
    maps = torch.ones(1, 2, 12, 12)
    maps[0, 0, 0, 0] = 0.0
    maps[0, 0, 3:9, 3:9] = 0.8
    maps[0, 1] = 0.0
    maps[0, 1, 3:9, 3:9] = 3.0
    maps[0, 1, 5, 5] = 0.0
    wrong = regions.close_masks(regions.make_masks(maps, MaskSpec(threshold="fixed:0.5"))[0], 3)
    assert wrong.sum(1).max() == 2
    w = regions.make_masks(maps, MaskSpec(threshold="fixed:0.5", close=3))[0]
    assert w.sum(1).max() == 1 and w[0, 0, 5, 5] == 1 and w[0, 1, 4, 4] == 1


@pytest.mark.parametrize("overlap", ["average", "soft", "subtract", "argmax"])
def test_closing_policies_match_kernel_when_nothing_to_close(overlap):
    """Closing with nothing to fill is the identity, so the torch overlap step after it equals the kernel's."""
    maps = torch.zeros(1, 3, 10, 10)
    maps[0, 0, 1:6, 1:6], maps[0, 1, 3:9, 3:9], maps[0, 2, 0:4, 5:10] = 1.0, 2.0, 1.5
    maps += 0.01 * torch.rand(maps.shape, generator=gen())
    ref = regions.make_masks(maps, MaskSpec(threshold="fixed:0.5", overlap=overlap))
    closed = regions.make_masks(maps, MaskSpec(threshold="fixed:0.5", overlap=overlap, close=1))
    for a, b in zip(ref, closed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("overlap", ["argmax", "subtract"])
def test_triton_kernels_end_to_end(sd1, monkeypatch, overlap):
    """The whole edit with the Triton kernels (interpreted) equals the torch references' bit for bit."""
    kw = dict(steps=3, num_maps=2, overlap=overlap, threshold="otsu", output="latent")
    monkeypatch.setenv("DIFFEDIT_KERNELS", "torch")
    ref = regions.edit_many(sd1, image(9), PAIRS3, generator=gen(), **kw)
    monkeypatch.setenv("DIFFEDIT_KERNELS", "triton")
    tri = regions.edit_many(sd1, image(9), PAIRS3, generator=gen(), **kw)
    for a, b in zip((tri.masks, tri.thresholds, tri.scores, tri.latents), (ref.masks, ref.thresholds, ref.scores,
                                                                         ref.latents)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("editor", ["fused", "inpaint"])
def test_generator_per_image_matches_single_runs(sd1, tiny_folder, editor):
    """A list of generators, one per image: each image of the batch gets the draws (mask-pass noise, and the
    inpainting passes' start noise) of its unbatched run, so its masks equal that run's bit for bit and its
    latents up to the last bits of the batched UNet/VAE arithmetic (observed ≤ 1.4e-5 on latents of
    magnitude ~2.5). One generator for the batch gives image 1 other draws: O(1) apart."""
    imgs, pairs = image(11, b=2), PAIRS3[:2]
    kw = dict(steps=STEPS, num_maps=2, output="latent", editor=editor)
    if editor == "inpaint":  # one pair: one inpainting pass keeps it fast; its start noise is what is new
        kw["inpaint_model"], pairs = load_model(tiny_folder("inpaint")), PAIRS3[1:2]
    both = regions.edit_many(sd1, imgs, pairs, generator=[gen(1), gen(2)], **kw)
    for b, seed in enumerate((1, 2)):
        solo = regions.edit_many(sd1, imgs[b], pairs, generator=gen(seed), **kw)
        assert torch.equal(both.masks[b], solo.masks)
        torch.testing.assert_close(both.scores[b], solo.scores, rtol=0, atol=1e-5)
        assert torch.equal(both.thresholds[b], solo.thresholds)
        torch.testing.assert_close(both.latents[b], solo.latents, rtol=0, atol=2e-5)
    if editor == "inpaint":
        return
    shared = regions.edit_many(sd1, imgs, pairs, generator=gen(1), **kw)
    solo = regions.edit_many(sd1, imgs[1], pairs, generator=gen(2), **kw)
    assert (shared.latents[1] - solo.latents).abs().max() > 0.1
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        regions.edit_many(sd1, imgs, pairs, generator=[gen(1), gen(2), gen(3)], **kw)


@pytest.mark.parametrize("opts", [{}, {"threshold": "otsu", "overlap": "soft", "smooth": 1.0, "close": 3}])
def test_masks_equals_edit_many_masks(counted, opts):
    """regions.masks is edit_many's mask step: the same generator seed gives the same weights, thresholds
    and scores (bit for bit), unbatched and batched, from one UNet call of the mask pass."""
    for img in (image(12), image(13, b=2)):
        r = regions.edit_many(counted, img, PAIRS3, steps=STEPS, num_maps=2, output="latent", generator=gen(4),
                              **opts)
        counted.unet.calls.clear()
        mk = regions.masks(counted, img, PAIRS3, steps=STEPS, num_maps=2, generator=gen(4), **opts)
        assert len(counted.unet.calls) == 1 and mk.unet_samples == counted.unet.calls[0]
        assert mk.weights.shape == r.masks.shape and mk.thresholds.shape == r.thresholds.shape
        assert torch.equal(mk.weights, r.masks) and torch.equal(mk.thresholds, r.thresholds)
        assert torch.equal(mk.scores, r.scores)
