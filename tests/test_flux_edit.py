"""DiffEdit and FlowEdit on FLUX.1 (engine/edit/flow.py, engine/edit/flowedit.py) on tiny dev / schnell folders
(tests/tiny_flux.py) loaded by weights.load_model: text-to-image equals diffusers' FluxPipeline with the same noise,
and the editing invariants hold on a distilled model — the background latents bit exact on z0, one sample per
prompt (no unconditional sample, no CFG batch), the guidance input given to the transformer on dev and not on
schnell, the mask pass 2n samples per image for one pair, N samples per decoding step for N pairs, refusals.
"""
import pytest
import torch
import torch.nn.functional as F

from diffedit_engine.engine.edit import diffedit, flow, flowedit, regions
from diffedit_engine.weights import load_model

import tiny_flux

PAIRS3 = [("a cat", "a dog"), ("a red circle", "a blue square"), ("the white", "an astronaut")]
MASK = dict(threshold="quantile:0.9", smooth=2)  # compact masks on the random model
L = 32  # T5 tokens in the editing tests (the pipelines' max_sequence_length): short keeps them fast


class Counting(torch.nn.Module):
    """The engine's FluxTransformer, recording (samples, guidance) of every call."""

    def __init__(self, tr):
        super().__init__()
        self.tr, self.config, self.calls = tr, tr.config, []

    def forward(self, x, t, context, pooled, guidance=None):
        g = None if guidance is None else torch.as_tensor(guidance).reshape(-1).expand(x.shape[0]).tolist()
        self.calls.append((x.shape[0], g))  # the guidance input of each sample (a number covers all)
        return self.tr(x, t, context, pooled, guidance)

    def samples(self):
        return [n for n, _ in self.calls]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {v: tiny_flux.make_folder(tmp_path_factory.mktemp(f"flux-{v}"), v) for v in tiny_flux.VARIANTS}


@pytest.fixture(scope="module")
def models(folders):
    out = {}
    for v, path in folders.items():
        m = load_model(path, device="cpu", dtype=torch.float32)
        m.max_sequence_length = L
        m.transformer = Counting(m.transformer)
        out[v] = m
    return out


def image(seed=0, size=128):
    """A smooth random picture (low-frequency noise upsampled), so the VAE sees structure rather than grain."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bilinear",
                         align_corners=False)[0]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- text to image: FluxPipeline's loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
@pytest.mark.parametrize("steps", [4, 1])
def test_generate_equals_flux_pipeline(folders, variant, steps):
    """The model's own max_sequence_length (512 dev, 256 schnell); a non-square latent so the dynamic shift's token
    count and the packing's row order both show; guidance 3.5 is an input on dev and ignored on schnell."""
    m, pipe = load_model(folders[variant]), tiny_flux.reference(folders[variant])
    noise = torch.randn(1, 16, 8, 12, generator=gen(3))
    kw = dict(prompt="a photo of a cat", latents=pipe._pack_latents(noise, 1, 16, 8, 12), num_inference_steps=steps,
              guidance_scale=3.5, max_sequence_length=m.max_sequence_length, height=64, width=96)
    ref = pipe._unpack_latents(pipe(**kw, output_type="latent").images, 64, 96, pipe.vae_scale_factor)
    lat = flow.generate(m, "a photo of a cat", steps=steps, guidance_scale=3.5, latents=noise, output="latent")
    assert lat.shape == (1, 16, 8, 12) and (lat - ref).abs().max() <= 1e-4
    img = flow.generate(m, "a photo of a cat", steps=steps, guidance_scale=3.5, latents=noise)
    assert (img - pipe(**kw, output_type="pt").images).abs().max() <= 1e-4
    if variant == "dev":  # the guidance input matters (it is not silently dropped)
        other = flow.generate(m, "a photo of a cat", steps=steps, guidance_scale=1.5, latents=noise, output="latent")
        assert (other - lat).abs().max() > 1e-3


def test_generate_draws_16_channel_noise_for_packed_images(models):
    m = models["schnell"]
    img = flow.generate(m, ["a cat", "a dog"], steps=1, size=(32, 48), generator=gen())
    assert img.shape == (2, 3, 32, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        flow.generate(m, "a cat", steps=1, size=(40, 48))


# ---- editing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_diffedit_edit_keeps_the_background_bit_exact(models, variant):
    m = models[variant]
    x = image(0)
    z0 = flow.encode_image(m, x[None])[0]
    m.transformer.calls.clear()
    mk = diffedit.generate_mask(m, x, "a cat", "a dog", steps=8, num_maps=3, guidance_scale=3.5, generator=gen(),
                                **MASK)
    assert mk.shape == (16, 16) and 0 < mk.mean() < 0.5
    g = 3.5 if variant == "dev" else None
    assert m.transformer.calls == [(3 * 2, None if g is None else [g] * 6)]  # (source, target) × 3 draws
    m.transformer.calls.clear()
    inv = diffedit.invert(m, x, steps=8, strength=0.75)
    assert inv.shape == (7, 16, 16, 16) and torch.equal(inv[-1], z0)
    assert m.transformer.calls == [(1, None if g is None else [g])] * 6  # ∅ with the decoding's guidance input
    m.transformer.calls.clear()
    z = diffedit.edit(m, inv, mk, "a dog", steps=8, strength=0.75, guidance_scale=3.5, output="latent")
    assert m.transformer.calls == [(1, None if g is None else [g])] * 6  # the target alone: no unconditional sample
    out = mk == 0
    assert torch.equal(z[:, out], z0[:, out])
    assert (z - z0)[:, ~out].abs().mean() > 0.05


@pytest.mark.parametrize("pairs", [PAIRS3[:1], PAIRS3], ids=["1pair", "3pairs"])
@pytest.mark.parametrize("editor", ["fused", "flowedit"])
def test_edit_many_background_bit_exact_on_dev(models, pairs, editor):
    m = models["dev"]
    x = image(1)
    z0 = flow.encode_image(m, x[None])[0]
    r = regions.edit_many(m, x, pairs, steps=8, num_maps=2, guidance_scale=3.5, editor=editor, output="latent",
                          generator=gen(), **MASK)
    u = r.masks.amax(0)
    assert r.masks.shape == (len(pairs), 16, 16) and 0 < u.mean() < 0.5
    assert torch.equal(r.latents[:, u == 0], z0[:, u == 0])
    assert (r.latents - z0)[:, u > 0].abs().mean() > 0.02


@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_fused_sample_counts_and_guidance_inputs(models, variant):
    """edit_many with 3 pairs: one mask pass of n·6 samples (6 distinct prompts), S inversion steps of 1 sample,
    S decoding steps of 3 samples (the targets; no ∅), every one with the guidance input on dev, none on schnell."""
    m = models[variant]
    m.transformer.calls.clear()
    r = regions.edit_many(m, image(0), PAIRS3, steps=8, strength=0.75, num_maps=2, guidance_scale=3.5,
                          generator=gen(), output="latent", **MASK)
    assert m.transformer.samples() == [2 * 6] + [1] * 6 + [3] * 6
    assert r.unet_samples == sum(m.transformer.samples())
    g = [c[1] for c in m.transformer.calls]
    assert g == ([[3.5] * n for n in m.transformer.samples()] if variant == "dev" else [None] * len(g))


def test_flowedit_on_dev_uses_per_sample_guidance_and_no_unconditional(models):
    m = models["dev"]
    z0 = flow.encode_image(m, image(2)[None])
    w = torch.ones(1, 1, 16, 16)
    m.transformer.calls.clear()
    z, n = flowedit.flowedit(m, z0, w, [("a cat", "a cat")], steps=8, strength=0.75, guidance_scale=2.0,
                             spec=flowedit.FlowEditSpec(source_guidance_scale=2.0), generator=gen())
    assert torch.equal(z, z0) and n == 6 * 2  # same prompt, same guidance: z_tar = z_src, Δ = 0 every step
    m.transformer.calls.clear()
    pairs = [("a cat", "a dog"), ("a cat", "a red circle")]
    z, n = flowedit.flowedit(m, z0, torch.ones(1, 2, 16, 16) / 2, pairs, steps=8, strength=0.75, guidance_scale=5.5,
                             generator=gen())
    # per step: [z_src × the one distinct source at 1.5 (the paper's FLUX source scale), z_tar × 2 targets at 5.5]
    assert m.transformer.calls == [(3, [1.5, 5.5, 5.5])] * 6 and n == 6 * 3
    assert (z - z0).abs().mean() > 0.02


def test_flowedit_on_schnell_has_no_guidance_input(models):
    m = models["schnell"]
    z0 = flow.encode_image(m, image(2)[None])
    m.transformer.calls.clear()
    z, n = flowedit.flowedit(m, z0, torch.ones(1, 1, 16, 16), [("a cat", "a dog")], steps=4, strength=0.75,
                             generator=gen())
    assert m.transformer.calls == [(2, None)] * 3 and n == 3 * 2 and not torch.equal(z, z0)


def test_invert_then_decode_with_the_same_guidance_reconstructs_z0(models):
    """dev: inverting with the decoding's guidance input retraces the field the decoding walks; another input at
    inversion does not (measured 28 steps: 0.21 vs 2.9 relative rms; here 16 steps)."""
    m = models["dev"]
    x = image(0)
    z0 = flow.encode_image(m, x[None])[0]
    ones = torch.ones(16, 16)
    err = {}
    for g_inv in (3.5, 1.0):
        inv = diffedit.invert(m, x, steps=16, strength=1.0, guidance_scale=g_inv)
        z = diffedit.edit(m, inv, ones, "", steps=16, strength=1.0, guidance_scale=3.5, output="latent")
        err[g_inv] = (((z - z0) ** 2).mean().sqrt() / (z0 ** 2).mean().sqrt()).item()
    assert err[3.5] < 0.6 and err[3.5] < 0.3 * err[1.0]


def test_schnell_defaults_keep_the_mask_noise_level_of_28_steps(models):
    """runtime.family's schnell defaults: 3 decoding steps (not a run from pure noise), and the mask pass's noise
    level at 4 steps is the 28-step one (the mask depends on it alone)."""
    from diffedit_engine.engine.edit.settings import EditSettings
    from diffedit_engine.engine.runtime.family import EDIT_DEFAULTS
    d = EDIT_DEFAULTS["flux-schnell"]
    s = EditSettings().updated(**d)
    m = models["schnell"]
    assert len(flow.plan(m, s.steps, s.strength, (16, 16))) == 3
    r = lambda steps: flow.plan(m, steps, s.encode_strength, (16, 16)).sigma_from[0]  # noqa: E731
    assert r(s.steps) == r(28) == 0.5


# ---- refusals -----------------------------------------------------------------------------------------------------


def test_what_does_not_apply_is_refused_in_one_line(models):
    m = models["dev"]
    x = image(0)
    m.transformer.calls.clear()
    inv = torch.zeros(7, 16, 16, 16)
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
        (lambda: regions.edit_many(m, x, [("a", "b")], editor="inpaint"), "inpaint"),
        (lambda: flow.generate(m, "a", negative_prompt="b", steps=1), "negative_prompt"),
        (lambda: diffedit.edit(m, inv, mk, "b", steps=8, strength=0.75, negative_prompt="c"), "negative_prompt"),
        (lambda: regions.edit_many(m, x, [("a", "b")], negative_prompt="c"), "negative_prompt"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word) as e:
            call()
        assert "\n" not in str(e.value)
    assert m.transformer.calls == []  # refused before any work
    with pytest.raises(ValueError, match="guidance"):  # schnell's transformer refuses a guidance value itself
        models["schnell"].transformer(torch.zeros(1, 16, 2, 2), 500.0, torch.zeros(1, 4, 64), torch.zeros(1, 32), 3.5)
