"""kernels.fusion: the Triton fused step vs its torch reference (TRITON_INTERPRET=1 on CPU) and invariants."""
import pytest
import torch

from kernel_utils import DEVICE, assert_same, poisoned, require_triton  # first: sets TRITON_INTERPRET

from diffedit_engine.engine.samplers import ddim  # noqa: E402
from diffedit_engine.kernels import fusion  # noqa: E402

KERNEL = getattr(fusion, "_fused_step_kernel", None)


def make(B, N, h, w, dtype, seed=0, C=4, zero_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(B, N + 1, C, h, w, generator=g).to(DEVICE, dtype)
    x = torch.randn(B, C, h, w, generator=g).to(DEVICE, dtype)
    bg = torch.randn(B, C, h, w, generator=g).to(DEVICE, dtype)
    W = torch.rand(B, N, h, w, generator=g)
    W[W < zero_frac] = 0  # exact zeros, ones and overlaps all occur
    W[W > 0.8] = 1
    return eps, x, bg, W.to(DEVICE)


# (B, N, h, w, dtype, prediction_type): SD latents 64x64 / 96x96 with small N, odd 37x53 across N in {1,2,5}
CASES = [
    (1, 1, 64, 64, torch.float16, "epsilon"),
    (2, 2, 64, 64, torch.float32, "v_prediction"),
    (1, 1, 96, 96, torch.float32, "epsilon"),
    (2, 1, 96, 96, torch.float16, "v_prediction"),
    (1, 5, 37, 53, torch.float16, "epsilon"),
    (2, 5, 37, 53, torch.float32, "v_prediction"),
    (2, 2, 37, 53, torch.float16, "epsilon"),
    (1, 2, 37, 53, torch.float32, "sample"),
    (2, 1, 37, 53, torch.float32, "epsilon"),
]


@pytest.mark.parametrize("B,N,h,w,dtype,pred", CASES)
def test_triton_matches_reference(B, N, h, w, dtype, pred):
    require_triton(KERNEL)
    eps, x, bg, W = make(B, N, h, w, dtype)
    a_t = torch.tensor([0.3, 0.45][:B], device=DEVICE) if B == 2 else torch.tensor(0.3, device=DEVICE)
    a_p = torch.tensor([0.5, 0.62][:B], device=DEVICE) if B == 2 else torch.tensor(0.5, device=DEVICE)
    ref = fusion.fused_step(eps, x, bg, W, 7.5, a_t, a_p, pred, impl="torch")
    got = fusion.fused_step(eps, x, bg, W, 7.5, a_t, a_p, pred, impl="triton", out=poisoned(x))
    assert_same(got, ref)
    assert got.dtype == x.dtype


def test_tensor_guidance_and_broadcast_alphas():
    require_triton(KERNEL)
    eps, x, bg, W = make(2, 2, 17, 19, torch.float32, seed=1)
    g = torch.tensor([1.0, 7.5], device=DEVICE)
    a_t, a_p = torch.tensor(0.2, device=DEVICE), torch.tensor([0.4, 0.5], device=DEVICE)
    ref = fusion.fused_step(eps, x, bg, W, g, a_t, a_p, impl="torch")
    assert_same(fusion.fused_step(eps, x, bg, W, g, a_t, a_p, impl="triton", out=poisoned(x)), ref)
    # per-image guidance really is per image
    ref0 = fusion.fused_step(eps[:1], x[:1], bg[:1], W[:1], 1.0, a_t, a_p[:1], impl="torch")
    assert_same(ref[:1], ref0)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_zero_weight_is_background_bit_exact(impl):
    if impl == "triton":
        require_triton(KERNEL)
    eps, x, bg, W = make(2, 3, 21, 23, torch.float16, seed=2)
    W[:, :, :10] = 0
    eps[:, 1, :, 3, 4] = float("inf")  # a non-finite region prediction where W = 0 must not leak
    out = fusion.fused_step(eps, x, bg, W, 7.5, torch.tensor(0.3), torch.tensor(0.5), impl=impl,
                            out=poisoned(x))
    assert torch.equal(out[..., :10, :], bg[..., :10, :])
    assert torch.isfinite(out[..., :10, :]).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_single_region_is_masked_ddim_blend(impl, pred):
    """N = 1: W·y + (1 − W)·bg with y = engine.ddim.ddim_step of the guided prediction (the DiffEdit step)."""
    if impl == "triton":
        require_triton(KERNEL)
    eps, x, bg, W = make(1, 1, 16, 24, torch.float32, seed=3)
    a_t, a_p = torch.tensor(0.35, device=DEVICE), torch.tensor(0.55, device=DEVICE)
    e = eps[:, 0] + 7.5 * (eps[:, 1] - eps[:, 0])
    y = ddim.ddim_step(e, x, a_t, a_p, pred)
    expect = W * y + (1 - W) * bg
    out = fusion.fused_step(eps, x, bg, W, 7.5, a_t, a_p, pred, impl=impl, out=poisoned(x))
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
    if impl == "torch":  # the reference is the DiffEdit blend bit for bit
        assert torch.equal(out, expect)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_overlap_normalises(impl):
    """Σ W > 1: the background drops out and the regions are averaged by their weights (MultiDiffusion)."""
    if impl == "triton":
        require_triton(KERNEL)
    eps, x, bg, _ = make(1, 2, 8, 8, torch.float32, seed=4)
    W = torch.ones(1, 2, 8, 8, device=DEVICE)
    W[:, 1] = 0.5
    a_t, a_p = torch.tensor(0.3), torch.tensor(0.5)
    ys = [ddim.ddim_step(eps[:, 0] + 3.0 * (eps[:, 1 + i] - eps[:, 0]), x, a_t, a_p) for i in range(2)]
    out = fusion.fused_step(eps, x, bg, W, 3.0, a_t, a_p, impl=impl, out=poisoned(x))
    torch.testing.assert_close(out, (ys[0] + 0.5 * ys[1]) / 1.5, rtol=1e-5, atol=1e-5)


def test_poison_detects_a_skipped_element():
    eps, x, bg, W = make(1, 1, 8, 8, torch.float32)
    ref = fusion.fused_step(eps, x, bg, W, 7.5, torch.tensor(0.3), torch.tensor(0.5), impl="torch")
    out = poisoned(x)
    out[..., :-1] = ref[..., :-1]  # a kernel that forgot the last column
    with pytest.raises(AssertionError, match="not written"):
        assert_same(out, ref)


def test_bad_shapes_raise():
    eps, x, bg, W = make(1, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError):
        fusion.fused_step(eps, x, bg, W[:, :1], 7.5, torch.tensor(0.3), torch.tensor(0.5), impl="torch")
    with pytest.raises(ValueError):
        fusion.fused_step(eps, x, bg, W, 7.5, torch.tensor(0.3), torch.tensor(0.5), "x0", impl="torch")


def test_small_blocks_ragged_tail():
    """Several programs per image and a partial last block (the default interpreter block covers the map)."""
    require_triton(KERNEL)
    eps, x, bg, W = make(2, 3, 13, 11, torch.float16, seed=5)
    a_t, a_p = torch.tensor(0.3, device=DEVICE), torch.tensor(0.5, device=DEVICE)
    ref = fusion.fused_step(eps, x, bg, W, 7.5, a_t, a_p, impl="torch")
    assert_same(fusion.fused_step_triton(eps, x, bg, W, 7.5, a_t, a_p, out=poisoned(x), block=32), ref)


def test_dispatch(monkeypatch):
    from diffedit_engine.kernels.dispatch import HAS_TRITON, choose
    cpu = torch.zeros(1)
    monkeypatch.delenv("DIFFEDIT_KERNELS", raising=False)
    assert choose("auto", cpu) == "torch"  # CPU tensors: the reference
    assert choose("torch", cpu) == "torch"
    if HAS_TRITON:
        assert choose("triton", cpu) == "triton"
        monkeypatch.setenv("DIFFEDIT_KERNELS", "triton")
        assert choose("auto", cpu) == "triton"
        assert choose("torch", cpu) == "torch"  # an explicit argument wins over the environment
    monkeypatch.setenv("DIFFEDIT_KERNELS", "torch")
    assert choose("auto", cpu) == "torch"
    monkeypatch.setenv("DIFFEDIT_KERNELS", "cuda")
    with pytest.raises(ValueError):
        choose("auto", cpu)
    with pytest.raises(ValueError):
        choose("fast", cpu)


def test_poison_catches_a_kernel_that_skips_pixels():
    """End to end: the real kernel launched with one program too few leaves NaN that the comparison reports."""
    require_triton(KERNEL)
    eps, x, bg, W = make(1, 1, 8, 8, torch.float32)
    a_t, a_p = torch.tensor([0.3], device=DEVICE), torch.tensor([0.5], device=DEVICE)
    ref = fusion.fused_step(eps, x, bg, W, 7.5, a_t, a_p, impl="torch")
    out = poisoned(x)
    fusion._fused_step_kernel[(1, 1)](eps, x, bg, W, out, a_t, a_t, a_p, 7.5, 1, 4, 64, 0, 0,
                                      PRED=0, G_IS_PTR=False, BLOCK=32)  # grid covers pixels 0..31 only
    assert torch.isnan(out[..., 4:, :]).all() and not torch.isnan(out[..., :4, :]).any()
    with pytest.raises(AssertionError, match="not written"):
        assert_same(out, ref)
