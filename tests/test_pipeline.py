"""engine.runtime: the optimisation layer (fused q/k/v, channels_last, compile, fp32 VAE fallback, batch
size from memory) against the eager model, and the Editor's edit / edit_batch on tiny random models."""
import os
import sys

import pytest
import torch

from diffedit_engine.engine import runtime
from diffedit_engine.engine.runtime import fuse, memory, optimize
from diffedit_engine.engine.models.unet import Attention
from diffedit_engine.weights import load_model


def _unet_inputs(m, batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = m.unet.config.cross_attention_dim
    return (torch.randn(batch, m.unet.config.in_channels, size, size, generator=g), torch.tensor([981, 21])[:batch],
            torch.randn(batch, 77, d, generator=g))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_fuse_qkv_matches_separate_projections(tiny_folder, variant):
    m = load_model(tiny_folder(variant))
    x, t, ctx = _unet_inputs(m)
    with torch.no_grad():
        ref = m.unet(x, t, ctx)
        n_attn = sum(type(a) is Attention for a in m.unet.modules())
        n = fuse.fuse_qkv(m.unet)
        out = m.unet(x, t, ctx)
    assert n == n_attn > 0
    assert not any(type(a) is Attention for a in m.unet.modules())
    kinds = {type(a) for a in m.unet.modules()}
    assert {fuse.FusedSelfAttention, fuse.FusedCrossAttention} <= kinds
    assert _rel(out, ref) < 1e-5


def test_optimize_channels_last_and_runner(tiny_folder):
    m = load_model(tiny_folder("sd1"))
    x, t, ctx = _unet_inputs(m)
    with torch.no_grad():
        ref = m.unet(x, t, ctx)
        opt, info = optimize.optimize(m, runtime.EditorOptions(compile=False, channels_last=True, fuse_qkv=True))
        out = opt.unet(x, t, ctx)
        out_int_t = opt.unet(x[:1], 981, ctx[:1])  # python timestep converted to a tensor
    assert info["channels_last"] and not info["compiled"] and info["fused_attention_modules"] > 0
    assert opt.unet.module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.unet.config is m.unet.config
    # the default: fused on CUDA or when compiling only (eager CPU: no speed, more memory)
    assert optimize.optimize(load_model(tiny_folder("sd1")), runtime.EditorOptions(compile=False))[1][
        "fused_attention_modules"] == 0
    assert _rel(out, ref) < 1e-5
    assert _rel(out_int_t, ref[:1]) < 1e-5
    assert isinstance(opt.vae, runtime.VAERunner) and opt.vae.vae is m.vae  # the engine's VAE runner


@pytest.mark.slow
def test_compiled_unet_equals_eager():
    """The one compile test (CPU inductor, fullgraph, static shapes): a one-block UNet (attention, resnets,
    mid block; compile time grows with the graph) compiled equals eager."""
    from types import SimpleNamespace

    from diffedit_engine.engine.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=4,
                     cross_attention_dim=32, norm_num_groups=8)
    m = SimpleNamespace(unet=UNet(cfg).eval(), vae=None, device=torch.device("cpu"), dtype=torch.float32)
    x, t, ctx = _unet_inputs(m)
    with torch.no_grad():
        ref = m.unet(x, t, ctx)
        # freeze=False: inductor's freezing (the CPU default) bypasses the FX-graph cache, and this test should
        # be cheap on a second run; benchmarks/compare.py runs the frozen full-size UNet
        opt, info = optimize.optimize(m, runtime.EditorOptions(compile=True, channels_last=False, freeze=False))
        out = opt.unet(x, t, ctx)
        out2 = opt.unet(x, t + 1, ctx)  # another timestep value: same graph (t is a tensor input)
    assert info["compiled"] and not info["cuda_graphs"]
    assert _rel(out, ref) < 1e-5
    assert torch.isfinite(out2).all() and not torch.equal(out2, out)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == info["compile_cache"]


class _OverflowVAE(torch.nn.Module):
    """Decodes to inf in half precision, like the SD VAE's fp16 overflow; fine in fp32."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16), requires_grad=False)

    def decode(self, z):
        return z.to(self.w.dtype) * 1e5 * self.w


def test_vae_runner_falls_back_to_fp32():
    vae = runtime.VAERunner(_OverflowVAE())
    z = torch.ones(1, 4, 2, 2)
    out = vae.decode(z)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and vae.fallbacks == 1
    assert float(out.max()) == 1e5
    assert vae.vae.w.dtype == torch.float16  # the fp16 module is kept; the fp32 copy is separate


class _OverflowEncoder(torch.nn.Module):
    """Encodes to inf in half precision (the SD VAE's encoder overflows in fp16 as its decoder does); fine in
    fp32."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float16), requires_grad=False)

    def encode(self, x):
        y = x.to(self.w.dtype) * 1e5 * self.w
        return y, torch.zeros_like(y)


def test_vae_runner_encode_falls_back_to_fp32():
    """issue 20 item 1: encode has the decode's non-finite check and fp32 retry, counted with them."""
    vae = runtime.VAERunner(_OverflowEncoder())
    mean, logvar = vae.encode(torch.ones(1, 3, 8, 8))
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all() and float(mean.max()) == 1e5
    assert vae.fallbacks == 1 and vae.vae.w.dtype == torch.float16  # the fp16 module is kept
    vae.encode(torch.zeros(1, 3, 8, 8))  # finite in fp16: no redo
    assert vae.fallbacks == 1


def test_editor_threads_option(tiny_folder):
    """EditorOptions.threads sets torch's CPU threads (process-wide) and the Editor reports the count."""
    before = torch.get_num_threads()
    try:
        ed = runtime.Editor(load_model(tiny_folder("sd1")), runtime.EditorOptions(compile=False, threads=1))
        assert torch.get_num_threads() == 1 and ed.info["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert runtime.Editor(load_model(tiny_folder("sd1")), runtime.EditorOptions(compile=False)).info["threads"] == before


def test_max_batch_size_cpu(tiny_folder):
    m = load_model(tiny_folder("sd1"))
    assert memory.per_sample_bytes(m, 64, 64) > memory.per_sample_bytes(m, 32, 32) > 0
    assert 1 <= memory.max_batch_size(m, 8, 8) <= 8
    assert memory.max_batch_size(m, 8, 8, cap=3) <= 3


def test_cpu_memory_is_the_available_ram():
    """The CPU batch sizes come from MemAvailable, not MemFree: a page cache that fills RAM (a machine that read a
    few model folders) left MemFree at 0.2 GB of 23.5 and the runner at batch 1, while 23 GB were available."""
    meminfo = "MemTotal:       24683772 kB\nMemFree:          204000 kB\nMemAvailable:   23101836 kB\n"
    assert memory.available_ram(meminfo) == 23101836 * 1024
    assert memory.available_ram("MemTotal: 1024 kB\nMemFree: 512 kB\n") is None  # kernels before 3.14
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            avail = memory.available_ram(f.read())
        assert memory.free_bytes("cpu") == (pytest.approx(avail, rel=0.5), "cpu")


def test_compile_cache_env(tmp_path, monkeypatch):
    for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE"):
        monkeypatch.delenv(k, raising=False)
    d = optimize.enable_compile_cache(tmp_path)
    assert d == tmp_path / "inductor" and os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
    import torch._inductor.config as ic
    assert ic.fx_graph_cache


OPTS = dict(steps=4, num_maps=2, seed=3)


@pytest.fixture(scope="module")
def editor(tiny_folder):
    return runtime.Editor.from_pretrained(tiny_folder("sd1"), "cpu", compile=False)


def test_editor_edit_equals_regions_on_the_plain_model(editor, tiny_folder):
    from diffedit_engine.engine.edit import regions

    img = torch.rand(3, 64, 56, generator=torch.Generator().manual_seed(0))
    pairs = [("a cat", "a dog"), ("grass", "snow")]
    r = editor.edit(img, pairs, **OPTS)
    assert r.image.shape == (3, 64, 56) and r.masks.shape == (2, 8, 7) and r.seconds > 0
    ref = regions.edit_many(load_model(tiny_folder("sd1")), img, pairs, steps=4, num_maps=2,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(r.masks, ref.masks)
    assert (r.image - ref.image).abs().max() < 1e-4  # fused GEMMs round differently


def test_editor_keeps_the_input_pixels_beyond_the_masks(editor):
    """background "pixels" (the default): the decoded latent where the masks are, the input bit for bit
    beyond the masks dilated and feathered by 8 px (the VAE decoder's GroupNorm would shift them)."""
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    pairs = [("a cat", "a dog")]
    opts = {**OPTS, "threshold": "quantile:0.9"}  # a small mask, so there is a background to keep
    kept, latent = editor.edit(img, pairs, **opts), editor.edit(img, pairs, background="latent", **opts)
    assert torch.equal(kept.masks, latent.masks) and 0 < kept.masks.mean() < 0.5
    m = kept.masks.amax(0).repeat_interleave(8, 0).repeat_interleave(8, 1)  # (64, 64) mask pixels
    far = torch.nn.functional.max_pool2d(m[None, None], 33, stride=1, padding=16)[0, 0] == 0  # > 16 px away
    inside = m.bool()
    assert far.any() and torch.equal(kept.image[:, far], img[:, far])
    assert not torch.equal(latent.image[:, far], img[:, far])  # what the paste-back corrects
    assert torch.allclose(kept.image[:, inside], latent.image[:, inside], atol=1e-6)


def test_keep_pixels_blends_only_near_the_masks():
    from diffedit_engine.engine.edit import toolkit

    dec, img = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    w = torch.zeros(1, 2, 8, 8)
    assert torch.equal(toolkit.keep_pixels(dec, img, w), img)  # no mask: the input
    w[0, 1, 3, 3] = 1  # one latent cell: pixels 24..31
    out = toolkit.keep_pixels(dec, img, w)[0, 0]
    assert out[24:32, 24:32].max() < 1 and out[27, 27] == 0  # the cell itself: the decoded image
    assert out[:8].eq(1).all() and out[:, 48:].eq(1).all()  # beyond 8 + 8 px: the input exactly


def test_editor_compat_mode(editor):
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    r = editor.edit(img, [("a cat", "a dog")], compat="diffusers", **OPTS)
    assert r.image.shape == (3, 64, 64) and r.masks.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="one pair"):
        editor.edit(img, [("a", "b"), ("c", "d")], compat="diffusers", **OPTS)


def test_edit_batch_groups_same_size_and_pairs(editor, monkeypatch):
    g = torch.Generator().manual_seed(2)
    a, b, c = torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)
    pairs = [("a cat", "a dog")]
    calls = []
    real = runtime.Editor.edit
    monkeypatch.setattr(runtime.Editor, "edit", lambda self, img, p, **o: calls.append(tuple(img.shape)) or
                        real(self, img, p, **o))
    jobs = [runtime.Job(a, pairs, {**OPTS, "seed": 3}), dict(image=c, pairs=pairs, options=OPTS),
            runtime.Job(b, pairs, {**OPTS, "seed": 5})]
    out = editor.edit_batch(jobs)
    assert sorted(calls) == [(1, 3, 48, 64), (2, 3, 64, 64)]  # a and b in one batch (seeds differ), c alone
    assert [r.image.shape for r in out] == [(3, 64, 64), (3, 48, 64), (3, 64, 64)]
    # Each job draws from its own seed: batched, it gets the numbers of the same job run alone (up to the
    # last bits batched matmuls may change).
    for i, (img, seed) in ((0, (a, 3)), (2, (b, 5))):
        alone = real(editor, img, pairs, **{**OPTS, "seed": seed})
        assert torch.equal(out[i].masks, alone.masks)
        torch.testing.assert_close(out[i].image, alone.image, atol=1e-4, rtol=0)


def test_runner_pads_to_buckets(tiny_folder):
    """Batch sizes padded to a bucket (fewer compiled graphs) give the unpadded results, sliced back."""
    m = load_model(tiny_folder("sd1"))
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([981, 500, 21])
    runner = runtime.UNetRunner(m.unet, buckets=(2, 4))
    with torch.no_grad():
        ref = m.unet(x, t, ctx)
        out = runner(x, t, ctx)
        out0 = runner(x, torch.tensor(500), ctx)  # a 0-d timestep is shared by the padding too
        big = runner(torch.cat([x, x]), 500, torch.cat([ctx, ctx]))  # above the largest bucket: unpadded
    assert out.shape == ref.shape and _rel(out, ref) < 1e-5
    assert _rel(out0[1], ref[1]) < 1e-5
    assert big.shape[0] == 6
    assert runtime.pow2_buckets(16) == (1, 2, 4, 8, 16) and runtime.pow2_buckets(20)[-1] == 20


class _AlwaysInfVAE(_OverflowVAE):
    def decode(self, z):
        return z.float() * float("inf")


def test_non_finite_decode_is_an_error_never_a_black_image():
    from diffedit_engine.engine.edit import toolkit

    with pytest.raises(toolkit.NonFiniteError, match="not finite"):
        runtime.VAERunner(_AlwaysInfVAE()).decode(torch.ones(1, 4, 2, 2))


def test_low_precision_unet_with_fp32_vae_on_every_path(tiny_folder):
    """load_model(dtype=bf16, vae_dtype=fp32): the VAE stays fp32 and every algorithm runs (it used to fail
    with "Input type and bias type should be the same")."""
    from diffedit_engine.engine.edit import diffedit, regions

    m = load_model(tiny_folder("sd1"), dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert next(m.vae.parameters()).dtype == torch.float32 and m.vae_dtype == torch.float32
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = regions.edit_many(m, img, [("a cat", "a dog")], steps=2, num_maps=1, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(r.image).all()
    mask = diffedit.generate_mask(m, img, "a cat", "a dog", num_maps=1, steps=2, generator=torch.Generator().manual_seed(1))
    for compat in (None, "diffusers"):
        inv = diffedit.invert(m, img, "a cat", steps=2, strength=1.0, compat=compat,
                              generator=torch.Generator().manual_seed(2))
        out = diffedit.edit(m, inv, mask, "a dog", steps=2, strength=1.0, compat=compat)
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    ed = runtime.Editor(m, runtime.EditorOptions(compile=False))
    assert ed.info["vae_dtype"] == "float32" and ed.info["dtype"] == "bfloat16"
    assert torch.isfinite(ed.edit(img, [("a cat", "a dog")], steps=2, num_maps=1).image).all()


def test_editor_rejects_what_compat_cannot_honour(editor):
    img = torch.rand(3, 32, 32)
    for bad, match in (({"threshold": "otsu"}, "clamp"), ({"overlap": "soft"}, "overlap"),
                       ({"editor": "inpaint"}, "inpainting")):
        with pytest.raises(ValueError, match=match):
            editor.edit(img, [("a", "b")], compat="diffusers", steps=2, **bad)


def test_vae_runner_slices_and_tiles():
    calls = []

    class Vae(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1), requires_grad=False)

        def decode(self, z):
            calls.append(tuple(z.shape))
            return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    z = torch.randn(5, 4, 16, 16)
    ref = Vae().decode(z)
    calls.clear()
    out = runtime.VAERunner(Vae(), max_batch=2).decode(z)
    assert calls == [(2, 4, 16, 16), (2, 4, 16, 16), (1, 4, 16, 16)] and torch.equal(out, ref)
    calls.clear()
    tiled = runtime.VAERunner(Vae(), max_batch=8, tile_above=64 * 64, tile=64, overlap=16).decode(z)
    assert all(c[-1] == 8 for c in calls) and len(calls) > 1  # 64-pixel tiles = 8 latent pixels
    torch.testing.assert_close(tiled, ref)  # a tile-local function: blending reproduces it


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_heap_buffers_stop_the_per_call_page_faults(tiny_folder):
    """On CPU the Editor keeps large blocks in glibc's heap: a freed 64 MB buffer allocated again is not faulted
    in again (with glibc's defaults it is a fresh mmap each time: ~16 k faults)."""
    import resource

    opt, info = optimize.optimize(load_model(tiny_folder("sd1")), runtime.EditorOptions(compile=False))
    assert info["heap_buffers"] is True

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()  # 64 MB, written then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # two warm-up rounds: where the heap's top sits after the imports decides whether the first reuse still lands
    # on fresh pages (seen: 16 k, 16 k, then 0); with glibc's defaults every round is ~16 k
    faults(), faults()
    assert faults() < 1000
