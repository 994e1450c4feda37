"""engine.edit.deepcache (DeepCache, issue 23 lever 3) on tiny random models: the split forward equals the
UNet's own bit for bit (SD 1.x/2.x, SD-XL); cache_interval=1 is today's edit bit for bit; with K the deep blocks
run on ceil(S/K) steps per loop, the background stays bit-exact, K beyond the step count works, the runner's
memory split keeps one cache per chunk; the CLI and flow models refuse what does not apply."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffedit_engine import cli
from diffedit_engine.engine.edit import diffedit, regions
from diffedit_engine.engine.edit import deepcache
from diffedit_engine.engine.runtime import UNetRunner
from diffedit_engine.weights import load_model

STEPS = 5
S = int(STEPS * 0.8)  # 4 inversion steps, 4 decoding steps
PAIRS = [("a cat", "a dog"), ("", "a red ball")]


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    return load_model(tiny_folder("sd1"))


@pytest.fixture(scope="module")
def deep(tiny_folder):
    return load_model(tiny_folder("deep"))  # three levels: the deep part has a down, mid and two up blocks


def image(seed=0, size=64):
    return torch.rand((3, size, size), generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def inputs(m, B=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = m.unet.config
    x = torch.randn((B, cfg.in_channels, h, w), generator=g)
    ctx = torch.randn((B, 77, cfg.cross_attention_dim), generator=g)
    return x, torch.tensor(421), ctx


@pytest.mark.parametrize("variant", ["sd1", "sd2", "deep", "inpaint"])
def test_split_forward_equals_the_unet_bit_for_bit(tiny_folder, variant):
    unet = load_model(tiny_folder(variant)).unet
    x, t, ctx = inputs(SimpleNamespace(unet=unet))
    ref = unet(x, t, ctx)
    eps, cache = deepcache.full(unet, x, t, ctx)
    assert torch.equal(eps, ref)
    assert cache.shape[0] == 3 and cache.shape[-2:] == x.shape[-2:]  # the last up block's input, full resolution
    assert torch.equal(deepcache.shallow(unet, x, t, ctx, cache), ref)  # shallow on full's own x: the same ops
    x2 = x + 0.1 * torch.randn_like(x)
    assert not torch.equal(deepcache.shallow(unet, x2, t, ctx, cache), ref)  # the shallow path does see x


def test_split_forward_equals_the_sdxl_unet_bit_for_bit(tiny_sdxl_folder):
    from diffedit_engine.engine.edit import toolkit

    m = load_model(tiny_sdxl_folder("xl"))
    ctx, pooled = m.encode_prompt(["a cat", "a dog"])
    x = torch.randn((2, 4, 6, 8), generator=torch.Generator().manual_seed(0))
    ids = toolkit.grid_time_ids(x)
    ref = m.unet(x, 500, ctx, text_embeds=pooled, time_ids=ids)
    eps, cache = deepcache.full(m.unet, x, 500, ctx, text_embeds=pooled, time_ids=ids)
    assert torch.equal(eps, ref)
    assert torch.equal(deepcache.shallow(m.unet, x, 500, ctx, cache, text_embeds=pooled, time_ids=ids), ref)
    with pytest.raises(ValueError, match="text_embeds"):
        deepcache.full(m.unet, x, 500, ctx)


class DeepCalls:
    """Counts the calls of the deep part (the last down block) and of the last up block (every step)."""

    def __init__(self, unet):
        self.deep = self.last_up = 0
        self.hooks = [unet.down_blocks[-1].register_forward_hook(lambda *a: self._add("deep")),
                      unet.up_blocks[-1].register_forward_hook(lambda *a: self._add("last_up"))]

    def _add(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def close(self):
        for h in self.hooks:
            h.remove()


def edit(m, k, **kw):
    return regions.edit_many(m, image(2), PAIRS, steps=STEPS, num_maps=2, output="latent", generator=gen(),
                             cache_interval=k, **kw)


def test_interval_one_is_todays_edit_bit_for_bit(sd1):
    calls = DeepCalls(sd1.unet)
    try:
        one = edit(sd1, 1)
        assert calls.deep == calls.last_up == 1 + 2 * S  # the mask pass + every step in full
    finally:
        calls.close()
    today = regions.edit_many(sd1, image(2), PAIRS, steps=STEPS, num_maps=2, output="latent", generator=gen())
    assert torch.equal(one.latents, today.latents) and torch.equal(one.masks, today.masks)
    assert one.unet_samples == today.unet_samples


@pytest.fixture(scope="module")
def exact(deep):
    return edit(deep, 1)


@pytest.mark.parametrize("k", [2, 3, 1000])
def test_deep_blocks_run_every_kth_step_and_the_background_stays_exact(deep, exact, k):
    calls = DeepCalls(deep.unet)
    try:
        r = edit(deep, k)
        # the mask pass (one full call), then per loop (inversion, decoding) ceil(S / K) full steps of S
        assert calls.deep == 1 + 2 * math.ceil(S / k)
        assert calls.last_up == 1 + 2 * S
    finally:
        calls.close()
    assert torch.equal(r.masks, exact.masks)  # the mask pass is never cached
    outside = r.masks.sum(0) == 0
    assert outside.any() and (~outside).any()
    z0 = diffedit.encode_image(deep, image(2)[None])[0]
    assert torch.equal(r.latents[:, outside], z0[:, outside])  # bit for bit where no mask reaches
    inside = ~outside
    assert torch.isfinite(r.latents).all() and not torch.equal(r.latents[:, inside], exact.latents[:, inside])


@pytest.fixture(scope="module")
def cached2(deep):
    return edit(deep, 2)


def test_runner_split_keeps_one_cache_per_chunk(deep, cached2):
    """The Editor's runner split (max_batch 2 < the decoding's 1 + N = 3 samples): chunked cached calls, and the
    edit matches the unsplit cached one (up to the batch-size rounding of the convolutions)."""
    whole = cached2
    unet = deep.unet
    deep.unet = UNetRunner(unet, max_batch=2)
    calls = DeepCalls(unet)
    try:
        split = edit(deep, 2)
        # the mask pass (2 maps × 4 prompts = 8 samples: 4 calls), the inversion (1 sample: 1 call per full step),
        # the decoding (3 samples: 2 chunks per full step)
        assert calls.deep == 4 + math.ceil(S / 2) + 2 * math.ceil(S / 2)
    finally:
        calls.close()
        deep.unet = unet
    assert torch.equal(split.masks, whole.masks)
    torch.testing.assert_close(split.latents, whole.latents, rtol=0, atol=1e-4)


def test_step_cache_refuses_a_shallow_first_step_and_a_changed_batch(deep):
    sc = deepcache.StepCache(deep, 2)
    x, t, ctx = inputs(deep)
    with pytest.raises(ValueError, match="no full step"):
        sc.at(1)(x, t, ctx)
    sc.at(0)(x, t, ctx)
    with pytest.raises(ValueError, match="does not match the batch"):
        sc.at(1)(x[:2], t, ctx[:2])
    assert sc.full_steps == 1 and sc.shallow_steps == 0


def test_inpainting_model_as_text_model(tiny_folder):
    """An inpainting checkpoint runs the fused editor as a text-to-image model (inpaint.text_model): the cached
    path appends the same all-repaint conditioning."""
    m = load_model(tiny_folder("inpaint"))
    r = edit(m, 2)
    outside = r.masks.sum(0) == 0
    z0 = diffedit.encode_image(m, image(2)[None])[0]
    assert torch.isfinite(r.latents).all() and torch.equal(r.latents[:, outside], z0[:, outside])


def test_a_flow_model_refuses_before_any_work():
    m = SimpleNamespace(kind="sd3")  # refused before any attribute of the model is used
    with pytest.raises(ValueError, match="cache_interval 2 .*flow models"):
        regions.edit_many(m, image(0), [("a cat", "a dog")], cache_interval=2)


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "in.png"
    Image.fromarray((image(0).permute(1, 2, 0).numpy() * 255).astype("uint8")).save(p)
    return p


@pytest.mark.parametrize("extra, words", [(["--cache-interval", "0"], "cache-interval"),
                                          (["--cache-interval", "2", "--editor", "inpaint"], "cache-interval")])
def test_cli_refuses_in_one_line(capsys, tmp_path, tiny_folder, photo, extra, words, monkeypatch):
    monkeypatch.setenv("DIFFEDIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out" / "x.png"
    rc = cli.main(["edit", "--model", str(tiny_folder("sd1")), "--image", str(photo), "--edit", "cat -> dog",
                   "--out", str(out), "--steps", "2", "--maps", "1", *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc != 0 and len([ln for ln in lines if ln.startswith("diffedit: error: ")]) == 1, err
    assert lines[-1].startswith("diffedit: error: ") and words in lines[-1], err
    assert not Path(out).exists()
