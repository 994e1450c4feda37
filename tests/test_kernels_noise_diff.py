"""kernels.noise_diff: Triton vs torch reference (TRITON_INTERPRET=1 on CPU), each threshold rule vs NumPy,
the overlap policies' invariants, the Technion `subtract` rule on hand-made maps."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from kernel_utils import DEVICE, assert_same, poisoned, require_triton  # first: sets TRITON_INTERPRET

from diffedit_engine.kernels import noise_diff as nd  # noqa: E402

KERNEL = getattr(nd, "_map_stats_kernel", None)
RULES = ["fixed:0.4", "clamp:3", "mean", "mean:1.3", "median", "otsu", "quantile:0.8", "quantile:0.25"]
OVERLAPS = ["argmax", "subtract", "average", "soft"]


def eps_for(B, n, N, h, w, dtype, seed=0, C=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, 2 * N + 1, C, h, w, generator=g).to(DEVICE, dtype)


def smooth_maps(B, N, h, w, seed=0):
    """Non-negative maps with blobs (like real noise-difference maps), values well spread."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(B, N, h, w, generator=g) * 0.3
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    for b in range(B):
        for i in range(N):
            cy, cx = torch.rand(2, generator=g).tolist()
            base[b, i] += 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
    return base.to(DEVICE)


def poisoned_masks(maps):
    B, N = maps.shape[:2]
    return nd.Masks(poisoned(maps.float()), torch.full((B, N), float("nan"), device=maps.device),
                    poisoned(maps.float()))


# ------------------------------------------------------------------------------------------- noise_maps
# (B, n, N, h, w, dtype, reduction): SD latents with small N·n, the odd shape across N in {1, 2, 5}, n in {1, 10}
MAP_CASES = [
    (1, 1, 1, 64, 64, torch.float16, "l1"),
    (1, 10, 1, 64, 64, torch.float32, "l2"),
    (1, 1, 2, 96, 96, torch.float32, "l1"),
    (2, 10, 2, 37, 53, torch.float16, "l1"),
    (2, 1, 5, 37, 53, torch.float32, "l2"),
    (1, 10, 5, 37, 53, torch.float16, "l2"),
    (2, 10, 1, 37, 53, torch.float32, "l1"),
]


@pytest.mark.parametrize("B,n,N,h,w,dtype,reduction", MAP_CASES)
def test_noise_maps_triton_matches_reference(B, n, N, h, w, dtype, reduction):
    require_triton(KERNEL)
    eps = eps_for(B, n, N, h, w, dtype)
    src, tgt = torch.arange(1, N + 1), torch.arange(N + 1, 2 * N + 1)
    ref = nd.noise_maps(eps, 0, src, tgt, 7.5, reduction, impl="torch")
    got = nd.noise_maps(eps, 0, src, tgt, 7.5, reduction, impl="triton",
                        out=torch.full((B, N, h, w), float("nan"), device=DEVICE))
    assert got.shape == (B, N, h, w) and got.dtype == torch.float32
    assert_same(got, ref, rtol=2e-6, atol=1e-5)


def test_noise_maps_small_blocks_and_tensor_guidance():
    """Several programs per map with a ragged tail; per-image guidance; unordered prompt indices."""
    require_triton(KERNEL)
    eps = eps_for(2, 2, 2, 13, 11, torch.float32, seed=1)
    src, tgt, g = [3, 1], [4, 2], torch.tensor([1.0, 5.0], device=DEVICE)
    ref = nd.noise_maps(eps, 0, src, tgt, g, "l1", impl="torch")
    out = torch.full((2, 2, 13, 11), float("nan"), device=DEVICE)
    assert_same(nd.noise_maps_triton(eps, 0, src, tgt, g, "l1", out=out, block=32), ref, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("reduction", ["l1", "l2"])
def test_noise_maps_definition_numpy(reduction):
    eps = eps_for(1, 3, 2, 6, 7, torch.float32, seed=2)
    e = eps.double().cpu().numpy()
    got = nd.noise_maps(eps, 0, [1, 2], [3, 4], 5.0, reduction, impl="torch").cpu().numpy()
    for i, (s, t) in enumerate([(1, 3), (2, 4)]):
        es = e[:, :, 0] + 5.0 * (e[:, :, s] - e[:, :, 0])
        et = e[:, :, 0] + 5.0 * (e[:, :, t] - e[:, :, 0])
        d = et - es
        per = np.abs(d).mean(2) if reduction == "l1" else np.sqrt((d ** 2).sum(2))
        np.testing.assert_allclose(got[:, i], per.mean(1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- masks_from_maps
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("rule", RULES)
def test_masks_triton_matches_reference_odd_shape(rule, overlap):
    require_triton(KERNEL)
    maps = smooth_maps(2, 3, 37, 53, seed=3)
    ref = nd.masks_from_maps(maps, rule, overlap, impl="torch")
    got = nd.masks_from_maps(maps, rule, overlap, impl="triton", out=poisoned_masks(maps))
    for g, r in zip(got, ref):
        assert_same(g, r, exact=DEVICE == "cpu")


@pytest.mark.parametrize("shape,N,rule,overlap", [
    ((64, 64), 2, "median", "argmax"),
    ((64, 64), 1, "otsu", "soft"),
    ((96, 96), 1, "quantile:0.9", "average"),
    ((96, 96), 2, "clamp:3", "subtract"),
    ((200, 200), 1, "median", "argmax"),  # larger than any block: exact order statistics still
])
def test_masks_triton_matches_reference_sd_shapes(shape, N, rule, overlap):
    require_triton(KERNEL)
    maps = smooth_maps(1, N, *shape, seed=4)
    ref = nd.masks_from_maps(maps, rule, overlap, impl="torch")
    got = nd.masks_from_maps(maps, rule, overlap, impl="triton", out=poisoned_masks(maps))
    for g, r in zip(got, ref):
        assert_same(g, r, exact=DEVICE == "cpu")


def test_masks_small_blocks():
    """Many programs per map and a ragged tail in every pass (the GPU block sizes are larger than the map)."""
    require_triton(KERNEL)
    maps = smooth_maps(2, 3, 19, 23, seed=5)
    for rule, overlap in [("median", "argmax"), ("quantile:0.6", "subtract"), ("otsu", "soft")]:
        ref = nd.masks_from_maps(maps, rule, overlap, impl="torch")
        got = nd.masks_from_maps_triton(maps, rule, overlap, out=poisoned_masks(maps), block=128)
        for g, r in zip(got, ref):
            assert_same(g, r, exact=DEVICE == "cpu")


def otsu_numpy(s):
    """Textbook Otsu on the documented 256 bins (j/256, (j+1)/256]: maximise w0 w1 (mu0 − mu1)² over the
    split after bin k, in exact rational arithmetic (empty bins make exact ties: the first k wins)."""
    idx = np.clip(np.ceil(s.astype(np.float64) * 256).astype(np.int64) - 1, 0, 255)
    hist = [int(v) for v in np.bincount(idx.ravel(), minlength=256)]
    n = sum(hist)
    best, best_k = Fraction(-1), 0
    for k in range(255):
        n0 = sum(hist[:k + 1])
        if n0 == 0 or n0 == n:
            continue
        w0, w1 = Fraction(n0, n), Fraction(n - n0, n)
        mu0 = sum(Fraction(2 * j + 1, 2) * hist[j] for j in range(k + 1)) / n0  # bin centres
        mu1 = sum(Fraction(2 * j + 1, 2) * hist[j] for j in range(k + 1, 256)) / (n - n0)
        var = w0 * w1 * (mu0 - mu1) ** 2
        if var > best:
            best, best_k = var, k
    return np.float32((best_k + 1) / 256)


def numpy_rule(m, rule):
    """(scores, threshold) of one raw map by the documented rule, in NumPy (fp32 like the kernels)."""
    m = m.astype(np.float32)
    name, _, arg = rule.partition(":")
    if name == "clamp":
        c = np.float32(m.astype(np.float64).mean()) * np.float32(arg)
        return np.clip(m, 0, c) / c, np.float32(0.5)
    s = (m - m.min()) / (m.max() - m.min())
    if name == "fixed":
        return s, np.float32(arg)
    if name == "mean":
        return s, np.float32(s.astype(np.float64).mean()) * np.float32(arg or 1)
    if name == "median":
        return s, np.median(s)
    if name == "quantile":
        return s, np.quantile(s, float(arg))
    return s, otsu_numpy(s)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_numpy(rule, impl):
    if impl == "triton":
        require_triton(KERNEL)
    odd = smooth_maps(1, 2, 31, 29, seed=6)  # 899 pixels: odd count (median = middle value)
    even = smooth_maps(1, 2, 30, 30, seed=7)  # even count (median = mean of the two middle values)
    for mp in (odd, even):
        res = nd.masks_from_maps(mp, rule, "average", impl=impl)
        for i in range(mp.shape[1]):
            s, t = numpy_rule(mp[0, i].cpu().numpy(), rule)
            assert res.thresholds[0, i].item() == float(np.float32(t)), (rule, i, res.thresholds[0, i].item(), t)
            np.testing.assert_array_equal(res.scores[0, i].cpu().numpy(), s.astype(np.float32))
            np.testing.assert_array_equal(res.weights[0, i].cpu().numpy(), (s > np.float32(t)).astype(np.float32))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_otsu_separates_two_clusters(impl):
    if impl == "triton":
        require_triton(KERNEL)
    g = torch.Generator().manual_seed(8)
    m = torch.where(torch.rand(1, 1, 20, 20, generator=g) < 0.3, 0.8, 0.1)
    m = m + 0.05 * torch.rand(1, 1, 20, 20, generator=g)
    res = nd.masks_from_maps(m.to(DEVICE), "otsu", "average", impl=impl)
    s = res.scores[0, 0]
    assert s[m[0, 0].to(DEVICE) < 0.5].max() <= res.thresholds[0, 0] < s[m[0, 0].to(DEVICE) > 0.5].min()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("rule", RULES)
def test_constant_map_no_nan(rule, impl):
    if impl == "triton":
        require_triton(KERNEL)
    maps = torch.stack([torch.full((9, 7), 0.3), torch.zeros(9, 7)])[None].to(DEVICE)
    for overlap in OVERLAPS:
        res = nd.masks_from_maps(maps, rule, overlap, impl=impl)
        for v in res:
            assert torch.isfinite(v).all(), (rule, overlap)
        assert (res.scores == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_argmax_disjoint_and_ties(impl):
    if impl == "triton":
        require_triton(KERNEL)
    maps = smooth_maps(2, 4, 24, 20, seed=9)
    res = nd.masks_from_maps(maps, "mean", "argmax", impl=impl)
    w = res.weights
    assert ((w == 0) | (w == 1)).all()
    assert (w.sum(1) <= 1).all()
    on = res.scores > res.thresholds[..., None, None]
    assert torch.equal(w.sum(1) > 0, on.any(1))  # assigned exactly where some mask is set
    pick = torch.where(on, res.scores, -1.0).argmax(1)  # first maximum: the lower index on ties
    assert torch.equal(w.argmax(1)[on.any(1)], pick[on.any(1)])
    # a hand-made exact tie goes to the lower index
    tie = torch.tensor([[[[0.0, 1.0, 1.0]], [[0.0, 1.0, 0.5]]]], device=DEVICE)  # (1, 2, 1, 3)
    r = nd.masks_from_maps(tie, "fixed:0.4", "argmax", impl=impl)
    assert r.weights[0, :, 0].tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_average_and_soft_weights(impl):
    if impl == "triton":
        require_triton(KERNEL)
    maps = smooth_maps(1, 3, 16, 16, seed=10)
    avg = nd.masks_from_maps(maps, "median", "average", impl=impl)
    soft = nd.masks_from_maps(maps, "median", "soft", impl=impl)
    on = avg.scores > avg.thresholds[..., None, None]
    assert torch.equal(avg.weights, on.float())
    assert torch.equal(soft.weights, torch.where(on, soft.scores, 0.0))


def technion_subtract_numpy(s):
    """The Technion project's loop (code/multi_mask_diff_edit.py, with_subtract), on [0, 1] floats
    instead of uint8 images (their threshold 128 of 255 -> 0.5)."""
    out = []
    for i in range(len(s)):
        diff = s[i].astype(np.float32)
        for j in range(i + 1, len(s)):
            below = s[i] < 0.5
            diff = diff - s[j]
            diff = (diff - diff.min()) / (diff.max() - diff.min())
            diff[below] = s[i][below]
        out.append(diff)
    return np.stack(out)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_subtract_hand_made(impl):
    if impl == "triton":
        require_triton(KERNEL)
    # maps already spanning [0, 1], so min–max leaves them as they are
    s = np.array([[0.0, 0.2, 0.6, 1.0, 0.9],
                  [1.0, 0.8, 0.2, 0.0, 0.9],
                  [0.0, 0.0, 1.0, 0.5, 0.25]], dtype=np.float32)
    maps = torch.from_numpy(s).reshape(1, 3, 1, 5).to(DEVICE)
    res = nd.masks_from_maps(maps, "fixed:0.45", "subtract", impl=impl)
    got = res.scores[0, :, 0].cpu().numpy()
    # by hand: map 2 (last) unchanged; map 1: pixels 2, 3 (< 0.5) keep 0.2, 0.0; elsewhere
    # minmax(s1 − s2) = minmax([1, .8, −.8, −.5, .65]) = [1, .888.., 0, .1666.., .8055..]
    np.testing.assert_allclose(got[2], s[2])
    np.testing.assert_allclose(got[1], [1.0, 1.6 / 1.8, 0.2, 0.0, 1.45 / 1.8], rtol=1e-6)
    # map 0: pixels 0, 1 keep 0, 0.2; d = minmax(s0 − s1) = minmax([−1, −.6, .4, 1, 0]) = [0, .2, .7, 1, .5],
    # then d = minmax(d − s2) over all pixels, low pixels reset again
    d = np.array([0.0, 0.2, 0.7, 1.0, 0.5]) - s[2]
    d = (d - d.min()) / (d.max() - d.min())
    d[:2] = s[0, :2]
    np.testing.assert_allclose(got[0], d, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, technion_subtract_numpy(s), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(res.weights[0, :, 0].cpu().numpy(), (got > np.float32(0.45)).astype(np.float32))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_subtract_matches_technion_loop_random(impl):
    if impl == "triton":
        require_triton(KERNEL)
    maps = smooth_maps(1, 4, 12, 10, seed=11)
    res = nd.masks_from_maps(maps, "fixed:0.45", "subtract", impl=impl)
    m = maps[0].reshape(4, -1).cpu().numpy()
    s = (m - m.min(1, keepdims=True)) / (m.max(1, keepdims=True) - m.min(1, keepdims=True))
    np.testing.assert_allclose(res.scores[0].reshape(4, -1).cpu().numpy(), technion_subtract_numpy(s),
                               rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    maps = torch.rand(1, 2, 4, 4)
    for rule in ["fixed", "clamp:0", "quantile:1.5", "bogus", "mean:x"]:
        with pytest.raises(ValueError):
            nd.masks_from_maps(maps, rule, "argmax", impl="torch")
    with pytest.raises(ValueError):
        nd.masks_from_maps(maps, "median", "union", impl="torch")
    with pytest.raises(ValueError):
        nd.noise_maps(torch.rand(1, 1, 3, 4, 2, 2), 0, [1], [5], 7.5, impl="torch")
    with pytest.raises(ValueError):
        nd.noise_maps(torch.rand(1, 1, 3, 4, 2, 2), 0, [1], [2], 7.5, "l3", impl="torch")
