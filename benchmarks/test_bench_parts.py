"""Per-part benchmarks (issue 5, item 3): text encoder, UNet step (eager and through engine.runtime's
optimisation layer), VAE encode/decode, each kernel, and a whole tiny edit. Tiny models, so that the CI
smoke run (`python -m pytest tests benchmarks -q --benchmark-disable`) takes seconds; for figures, run
`python -m pytest benchmarks -q` (pytest-benchmark's table), on a GPU for the Triton rows."""
import pytest
import torch

from diffedit_engine.kernels import fusion, noise_diff

CUDA = torch.cuda.is_available()
IMPLS = ["torch"] + (["triton"] if CUDA else [])  # Triton on CPU tensors only runs interpreted: not timed


def _sync(out):
    if CUDA:
        torch.cuda.synchronize()
    return out


def _rand(*shape, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def test_bench_text_encoder(benchmark, tiny_model):
    ids = tiny_model.tokenizer(["a photograph of a cat", ""]).to(tiny_model.device)
    out = benchmark(lambda: _sync(tiny_model.text_encoder(ids)))
    assert out.shape[:2] == (2, 77)


@torch.no_grad()
def test_bench_unet_guided_step(benchmark, tiny_model):
    m = tiny_model
    x, ctx = _rand(2, 4, 8, 8, device=m.device), _rand(2, 77, m.unet.config.cross_attention_dim, device=m.device)
    t = torch.tensor(500, device=m.device)
    out = benchmark(lambda: _sync(m.unet(x, t, ctx)))
    assert out.shape == x.shape


@torch.no_grad()
def test_bench_unet_guided_step_optimised(benchmark, tiny_folder_model):
    """The UNet after engine.runtime.optimize (fused q/k/v; compile and CUDA graphs on CUDA)."""
    from diffedit_engine.engine.runtime.optimize import EditorOptions, optimize

    m = tiny_folder_model
    opt, _ = optimize(m, EditorOptions(compile=CUDA))
    x, ctx = _rand(2, 4, 8, 8, device=m.device), _rand(2, 77, m.unet.config.cross_attention_dim, device=m.device)
    t = torch.tensor(500, device=m.device)
    opt.unet(x, t, ctx)  # compile outside the timing
    out = benchmark(lambda: _sync(opt.unet(x, t, ctx)))
    assert out.shape == x.shape


@pytest.fixture
def tiny_folder_model(tmp_path):
    """A fresh copy of the tiny model (optimize changes its modules in place)."""
    import tiny
    from diffedit_engine.weights import load_model

    return load_model(tiny.make_folder(tmp_path, "sd1"), device="cuda" if CUDA else "cpu")


@torch.no_grad()
def test_bench_vae_encode(benchmark, tiny_model):
    img = _rand(1, 3, 64, 64, device=tiny_model.device).clamp(-1, 1)
    mean, logvar = benchmark(lambda: _sync(tiny_model.vae.encode(img)))
    assert mean.shape == (1, 4, 8, 8)


@torch.no_grad()
def test_bench_vae_decode(benchmark, tiny_model):
    z = _rand(1, 4, 8, 8, device=tiny_model.device)
    out = benchmark(lambda: _sync(tiny_model.vae.decode(z)))
    assert out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_kernel_fused_step(benchmark, impl):
    """kernels.fusion.fused_step at SD's 64x64 latent, 3 regions (1 + 3 UNet outputs)."""
    dev = "cuda" if CUDA else "cpu"
    B, N, C, h, w = 1, 3, 4, 64, 64
    eps, x, bg = _rand(B, N + 1, C, h, w, device=dev), _rand(B, C, h, w, device=dev, seed=1), _rand(B, C, h, w, device=dev, seed=2)
    wts = (_rand(B, N, h, w, device=dev, seed=3) > 0).float()
    a_t, a_p = torch.tensor(0.3, device=dev), torch.tensor(0.5, device=dev)
    out = benchmark(lambda: _sync(fusion.fused_step(eps, x, bg, wts, 7.5, a_t, a_p, "epsilon", impl=impl)))
    assert out.shape == x.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_kernel_noise_maps(benchmark, impl):
    """kernels.noise_diff.noise_maps: 10 draws, 3 pairs (6 prompts + uncond), 64x64."""
    dev = "cuda" if CUDA else "cpu"
    B, n, P, C, h, w = 1, 10, 7, 4, 64, 64
    eps = _rand(B, n, P, C, h, w, device=dev)
    src, tgt = torch.tensor([1, 2, 3], device=dev), torch.tensor([4, 5, 6], device=dev)
    maps = benchmark(lambda: _sync(noise_diff.noise_maps(eps, 0, src, tgt, 7.5, impl=impl)))
    assert maps.shape == (B, 3, h, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_kernel_masks_from_maps(benchmark, impl):
    dev = "cuda" if CUDA else "cpu"
    maps = _rand(1, 3, 64, 64, device=dev).abs()
    out = benchmark(lambda: _sync(noise_diff.masks_from_maps(maps, "clamp:3", "argmax", impl=impl)))
    assert out[0].shape == (1, 3, 64, 64)


def test_bench_edit_tiny(benchmark, tiny_model):
    """A whole 2-pair edit (mask pass, inversion, fused decoding, VAE) at 64x64, 4 steps."""
    from diffedit_engine.engine.edit import regions

    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    pairs = [("a cat", "a dog"), ("grass", "snow")]
    r = benchmark(lambda: _sync(regions.edit_many(tiny_model, img, pairs, steps=4, num_maps=2,
                                                  generator=torch.Generator().manual_seed(0))))
    assert r.image.shape == (3, 64, 64)
