"""DiffEdit and FlowEdit on rectified-flow models (engine/edit/flow.py, engine/edit/flowedit.py) on tiny random SD3
models (a diffusers stand-in, and tests/tiny_sd3.py folders loaded by the engine): text-to-image equals diffusers' StableDiffusion3Pipeline, and the editing invariants hold — the
background bit exact on z0 (latents) and on the input (pixels, background="pixels"), one batched mask pass for
N pairs, N+1 samples per guided fused step, inversion then decoding reconstructs z0, per-pair masks, refusals.

The model is diffusers' own SD3Transformer2DModel and a 16-channel AutoencoderKL behind the engine's model
contract (m.transformer(x, t, context, pooled), m.encode_prompt, m.vae.encode/decode, scale and shift), with
fixed random prompt embeddings, so the pipeline oracle runs on exactly the same modules and embeddings (most
tests use it: the invariants are the algorithm's). The last tests load tiny_sd3 folders with weights.load_model
(the engine's MMDiT, VAE and text encoders) and compare with the full pipeline, prompts included.
"""
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffedit_engine.engine.edit import diffedit, flow, flowedit, regions
from diffedit_engine.engine.samplers import flow as flow_sampler

import tiny
import tiny_sd3

L, D, P = 8, 32, 24  # prompt tokens, joint_attention_dim, pooled_projection_dim


class Transformer(torch.nn.Module):
    """diffusers' SD3Transformer2DModel called as the engine's m.transformer, counting its samples per call."""

    def __init__(self, tr):
        super().__init__()
        self.tr, self.config, self.calls = tr, tr.config, []

    def forward(self, x, t, context, pooled):
        self.calls.append(x.shape[0])
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.tr(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled).sample


class VAE(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, img):
        d = self.vae.encode(img).latent_dist
        return d.mean, d.logvar

    def decode(self, z):
        return self.vae.decode(z).sample


def embed(prompts):
    """Fixed random (context (n, L, D), pooled (n, P)) per prompt string (its CRC seeds the draw)."""
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        out.append((torch.randn(L, D, generator=g), torch.randn(P, generator=g)))
    return torch.stack([c for c, _ in out]), torch.stack([q for _, q in out])


def make_model(seed=0, shift=3.0):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=D, caption_projection_dim=16,
                               pooled_projection_dim=P, out_channels=16, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    tiny._randomize(tr, seed)
    tiny._randomize(vae, seed + 1)
    tr.eval().requires_grad_(False), vae.eval().requires_grad_(False)
    return SimpleNamespace(kind="sd3", transformer=Transformer(tr), vae=VAE(vae), encode_prompt=embed,
                           vae_scaling_factor=1.5305, vae_shift_factor=0.0609, device=torch.device("cpu"),
                           dtype=torch.float32, scheduler=flow_sampler.FlowMatchConfig(shift=shift), _tr=tr,
                           _vae=vae)


@pytest.fixture(scope="module")
def m():
    return make_model()


def image(seed=0, size=128):
    """A smooth random picture (low-frequency noise upsampled), so the VAE sees structure rather than grain."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bilinear",
                         align_corners=False)[0]


# ---- text to image: the pipeline's loop ------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_generate_equals_sd3_pipeline(m, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline(transformer=m._tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=m._vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    (pe, npe), (pp, npp) = embed(["a red car", ""])[0].split(1), embed(["a red car", ""])[1].split(1)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pp,
              negative_pooled_prompt_embeds=npp, latents=noise, num_inference_steps=6, guidance_scale=guidance,
              height=64, width=64)
    ref_lat = pipe(**kw, output_type="latent").images
    ref_img = pipe(**kw, output_type="pt").images
    lat = flow.generate(m, "a red car", steps=6, guidance_scale=guidance, latents=noise, output="latent")
    img = flow.generate(m, "a red car", steps=6, guidance_scale=guidance, latents=noise)
    assert (lat - ref_lat).abs().max() <= 1e-4
    assert (img - ref_img).abs().max() <= 1e-4


# ---- editing ------------------------------------------------------------------------------------------------------

PAIRS3 = [("a cat", "a dog"), ("a tree", "a house"), ("sky", "sea")]
MASK = dict(threshold="quantile:0.9", smooth=2)  # compact masks on the random model (clamp:3 finds none there)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def beyond(weights, size, reach=16):
    """(H, W) bool: pixels farther than `reach` px from every mask (keep_pixels dilates 8 px and feathers 8 more)."""
    u = F.interpolate(weights.amax(0)[None, None].float(), size=size, mode="nearest")
    return F.max_pool2d(u, 2 * reach + 1, stride=1, padding=reach)[0, 0] == 0


def test_diffedit_edit_keeps_the_background_bit_exact(m):
    x = image(0)
    z0 = flow.encode_image(m, x[None])[0]
    mk = diffedit.generate_mask(m, x, "a cat", "a dog", steps=10, generator=gen())
    assert mk.shape == (16, 16) and 0 < mk.mean() < 1
    inv = diffedit.invert(m, x, steps=10, strength=0.8)
    assert inv.shape == (9, 16, 16, 16) and torch.equal(inv[-1], z0)
    z = diffedit.edit(m, inv, mk, "a dog", steps=10, strength=0.8, output="latent")
    out = mk == 0
    assert torch.equal(z[:, out], z0[:, out])
    assert (z - z0)[:, ~out].abs().mean() > 0.1  # the edit did change the inside
    img = diffedit.edit(m, inv, mk, "a dog", steps=10, strength=0.8)
    assert img.shape == (3, 128, 128) and 0 <= img.min() and img.max() <= 1


@pytest.mark.parametrize("pairs", [PAIRS3[:1], PAIRS3], ids=["1pair", "3pairs"])
@pytest.mark.parametrize("editor", ["fused", "flowedit"])
def test_edit_many_background_bit_exact_in_latents_and_pixels(m, pairs, editor):
    x = image(1, 256)
    z0 = flow.encode_image(m, x[None])[0]
    kw = dict(steps=10, editor=editor, **MASK)
    r = regions.edit_many(m, x, pairs, output="latent", generator=gen(), **kw)
    u = r.masks.amax(0)
    assert r.masks.shape == (len(pairs), 32, 32) and 0 < u.mean() < 0.5
    assert torch.equal(r.latents[:, u == 0], z0[:, u == 0])
    assert (r.latents - z0)[:, u > 0].abs().mean() > 0.05
    img = regions.edit_many(m, x, pairs, background="pixels", generator=gen(), **kw)
    assert torch.equal(img.masks, r.masks)  # the same draws, the same masks
    img = img.image
    far = beyond(r.masks, (256, 256))
    assert far.float().mean() > 0.3 and torch.equal(img[:, far], x[:, far])
    whole = regions.edit_many(m, x, pairs, background="latent", generator=gen(), **kw).image
    assert not torch.equal(whole[:, far], x[:, far])  # the VAE alone does not give the input back


def test_one_batched_mask_pass_for_n_pairs(m):
    """All pairs and draws in one transformer call of n·P samples (P distinct prompts: 6 for 3 pairs)."""
    m.transformer.calls.clear()
    r = regions.masks(m, image(0), PAIRS3, num_maps=4, steps=10, generator=gen(), **MASK)
    assert m.transformer.calls == [4 * 6] and r.unet_samples == 24
    assert r.weights.shape == (3, 16, 16)
    # masks per pair differ when the prompts differ (and are disjoint under argmax)
    assert not torch.equal(r.weights[0], r.weights[1]) and not torch.equal(r.scores[0], r.scores[2])
    assert (r.weights.sum(0) <= 1).all()


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_fused_decoding_spends_n_plus_one_samples_per_guided_step(m, guidance):
    z0 = flow.encode_image(m, image(0)[None])
    inv = flow.invert_shared(m, z0, steps=10, strength=0.8)
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, :4], masks[0, 1, 6:9], masks[0, 2, 12:] = 1, 1, 1
    m.transformer.calls.clear()
    z = flow.fused_edit(m, inv, masks, [t for _, t in PAIRS3], steps=10, strength=0.8, guidance_scale=guidance)
    assert m.transformer.calls == [3 + (guidance > 1)] * 8
    assert torch.equal(z[:, :, 4:6], z0[:, :, 4:6]) and torch.equal(z[:, :, 9:12], z0[:, :, 9:12])
    m.transformer.calls.clear()
    r = regions.edit_many(m, image(0), PAIRS3, steps=10, num_maps=2, guidance_scale=guidance, generator=gen(),
                          output="latent", **MASK)
    assert m.transformer.calls == [2 * 6] + [1] * 8 + [3 + (guidance > 1)] * 8
    assert r.unet_samples == sum(m.transformer.calls)


def test_invert_then_decode_reconstructs_z0(m):
    """Same prompt (∅), no guidance, full mask: only the Euler discretisation separates the two ODE runs, so the
    error falls as 1/steps: rms below 4 % of z0's rms at 50 steps (measured 2.7 %), halving per doubling."""
    x = image(0)
    z0 = flow.encode_image(m, x[None])[0]
    ones = torch.ones(16, 16)
    rms = {}
    for steps in (25, 50):
        inv = diffedit.invert(m, x, steps=steps, strength=1.0)
        z = diffedit.edit(m, inv, ones, "", steps=steps, strength=1.0, guidance_scale=1.0, output="latent")
        rms[steps] = ((z - z0) ** 2).mean().sqrt() / (z0 ** 2).mean().sqrt()
    assert rms[50] < 0.04 and rms[50] < 0.6 * rms[25]


def test_flowedit_with_the_same_prompt_and_scales_keeps_z0(m):
    """FlowEdit moves by v_tar(z_tar) − v_src(z_src); with one prompt and one scale, z_tar = z_src at the start and
    the difference is 0 at every step: the result is z0 exactly, mask or not."""
    z0 = flow.encode_image(m, image(2)[None])
    z, n = flowedit.flowedit(m, z0, torch.ones(1, 1, 16, 16), [("a cat", "a cat")], steps=10, strength=0.7,
                             guidance_scale=3.5, spec=flowedit.FlowEditSpec(source_guidance_scale=3.5), generator=gen())
    assert torch.equal(z, z0) and n == 7 * 4
    z, n = flowedit.flowedit(m, z0, torch.ones(1, 1, 16, 16), [("a cat", "a dog")], steps=10, strength=0.7,
                             spec=flowedit.FlowEditSpec(n_avg=2), generator=gen())
    assert (z - z0).abs().mean() > 0.05 and n == 7 * 2 * 4


def test_flowedit_draws_fresh_noise_per_step_from_the_generator(m):
    z0 = flow.encode_image(m, image(2)[None])
    w = torch.ones(1, 1, 16, 16)
    a = flowedit.flowedit(m, z0, w, [("a cat", "a dog")], steps=6, strength=1.0, generator=gen(1))[0]
    b = flowedit.flowedit(m, z0, w, [("a cat", "a dog")], steps=6, strength=1.0, generator=gen(1))[0]
    c = flowedit.flowedit(m, z0, w, [("a cat", "a dog")], steps=6, strength=1.0, generator=gen(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- refusals -----------------------------------------------------------------------------------------------------


def test_what_does_not_apply_to_flow_models_is_refused_in_one_line(m):
    x = image(0)
    m.transformer.calls.clear()
    inv = torch.zeros(9, 16, 16, 16)
    mk = torch.ones(16, 16)
    cases = [
        (lambda: diffedit.generate_mask(m, x, "a", "b", compat="diffusers"), "compat"),
        (lambda: diffedit.invert(m, x, compat="diffusers"), "compat"),
        (lambda: diffedit.edit(m, inv, mk, "b", compat="diffusers"), "compat"),
        (lambda: regions.edit_many(m, x, [("a", "b")], compat="diffusers"), "compat"),
        (lambda: diffedit.generate_mask(m, x, "a", "b", scheduler="dpm++2m"), "dpm"),
        (lambda: diffedit.invert(m, x, scheduler="dpm++2m"), "dpm"),
        (lambda: diffedit.edit(m, inv, mk, "b", scheduler="dpm++2m"), "dpm"),
        (lambda: regions.edit_many(m, x, [("a", "b")], scheduler="dpm++2m"), "dpm"),
        (lambda: regions.masks(m, x, [("a", "b")], scheduler="dpm++2m"), "dpm"),
        (lambda: regions.edit_many(m, x, [("a", "b")], editor="inpaint"), "inpaint"),
        (lambda: diffedit.edit(m, inv, mk, "b", eta=0.5), "eta"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word) as e:
            call()
        assert "\n" not in str(e.value)
    assert m.transformer.calls == []  # refused before any work
    sd = SimpleNamespace(kind="sd1")
    with pytest.raises(ValueError, match="flowedit.*flow models"):
        regions.edit_many(sd, x, [("a", "b")], editor="flowedit")


# ---- the engine's own SD3 model (weights.load_model on tiny_sd3 folders) --------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from diffedit_engine.weights import load_model
    folder = tiny_sd3.make_folder(tmp_path_factory.mktemp("sd3"), "sd3")
    m = load_model(folder, device="cpu", dtype=torch.float32)
    m.max_sequence_length = 32  # T5 tokens (the pipeline's max_sequence_length below): short keeps the tests fast
    return m, tiny_sd3.reference(folder)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_generate_equals_sd3_pipeline_with_prompts(loaded, guidance):
    m, pipe = loaded
    assert m.kind == "sd3"
    noise = torch.randn(1, 16, 8, 8, generator=gen(5))
    kw = dict(prompt="a photo of a red cat", negative_prompt="blue", latents=noise, num_inference_steps=4,
              guidance_scale=guidance, height=64, width=64, max_sequence_length=32)
    ours = dict(negative_prompt="blue", steps=4, guidance_scale=guidance, latents=noise)
    lat = flow.generate(m, "a photo of a red cat", output="latent", **ours)
    assert (lat - pipe(**kw, output_type="latent").images).abs().max() <= 1e-4
    img = flow.generate(m, "a photo of a red cat", **ours)
    assert (img - pipe(**kw, output_type="pt").images).abs().max() <= 1e-4


@pytest.mark.parametrize("editor", ["fused", "flowedit"])
def test_edit_many_on_the_loaded_model_keeps_the_background(loaded, editor):
    m = loaded[0]
    x = image(4, 128)
    z0 = flow.encode_image(m, x[None])[0]
    pairs = [("a cat", "a dog"), ("a red circle", "a blue square")]
    r = regions.edit_many(m, x, pairs, steps=8, editor=editor, generator=gen(), output="latent", **MASK)
    u = r.masks.amax(0)
    assert 0 < u.mean() < 0.5 and not torch.equal(r.masks[0], r.masks[1])
    assert torch.equal(r.latents[:, u == 0], z0[:, u == 0]) and not torch.equal(r.latents, z0)


def test_an_image_beyond_the_position_table_is_refused_before_any_work(loaded):
    """The Editor checks the latent size against SD 3's position table before the VAE or the transformer run."""
    from diffedit_engine.engine.runtime import Editor, EditorOptions

    m = loaded[0]
    ed = Editor(m, EditorOptions(compile=False))
    calls = []
    hook = m.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        table = m.transformer.config.pos_embed_max_size * m.transformer.config.patch_size * 8  # px
        with pytest.raises(ValueError, match="larger than the position table"):
            ed.edit(torch.rand(3, 64, table + 16), [("a cat", "a dog")], steps=2)
        assert calls == [] and ed.model.vae.fallbacks == 0
        ed.masks(torch.rand(3, 64, table), [("a cat", "a dog")], steps=2, num_maps=1)  # at the table's size: runs
        assert calls
    finally:
        hook.remove()
