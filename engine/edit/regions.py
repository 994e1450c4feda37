"""N (source → target) edits in one pass: DiffEdit masks for every pair from one batched UNet call,
a threshold per mask, overlaps resolved, then one fused denoising trajectory (MultiDiffusion Eq. 5/8,
arXiv 2302.08113) or the older sequential inpainting route (engine/inpaint.py).

Mask pass. Every prompt sees the same noisy latent, so the unconditional prediction is shared, and with
CFG it cancels: e_tgt − e_src = (e_u + g(ε_t − e_u)) − (e_u + g(ε_s − e_u)) = g·(ε_t − ε_s). So per noise
draw the batch is just the distinct prompts among sources and targets (an empty source is ∅ itself):
n·P ≤ n·2N samples (the shared-∅ count n·(2N+1) minus the ∅ sample nobody needs) instead of 4nN.
kernels.noise_diff turns the raw output into N maps (CFG, |Δε|, channel reduction, mean over draws).
`masks` is the mask step alone (encode, mask pass, clean-up; the CLI's `mask` command), and edit_many
runs it. A list of generators, one per image, gives each image of a batch its unbatched run's draws.

Mask clean-up order (the reasons fix it):
  maps → Gaussian smoothing → threshold → morphological closing → overlap resolution.
Smoothing acts on scores, so it must come before the threshold, and it changes the statistics the
thresholds are computed from (median, Otsu, ...), which is what the seed project did. Closing is a binary
operation, so it comes after the threshold; it is extensive (the closed mask contains the mask), so run
after the overlap resolution it would grow regions back into each other and `argmax` masks would stop
being disjoint. Hence it sits between the two: the kernel thresholds, we close the binary masks, and the
overlap policy then runs on the closed masks (`kernels.noise_diff.resolve_overlaps`, the overlap
kernel's torch reference: a tiny (N, h, w) op). Without closing the kernel does normalisation, threshold and overlap in one call. Scores
and thresholds are the kernel's: per-map normalised scores in [0, 1] and the rule's threshold on them.

Fused editor. One shared inversion (∅ prompt, no guidance, every x_t kept, diffedit's helper), then one
trajectory: per step a UNet batch of one shared unconditional sample + N targets, and kernels.fusion
does per-region CFG, the DDIM step, and fuses the regions with the inverted background at the new level
(the paper's alignment: the last step's background is the clean image latent, so outside every mask the
result equals it bit for bit). With N = 1 this is diffedit.edit.

Rectified-flow models (m.kind "sd3" / "flux"): the same steps with engine/edit/flow.py's blocks (velocity
differences for the masks, the flow ODE inversion, the fused Euler decoding) and one more editor,
"flowedit" (engine/edit/flowedit.py: inversion-free FlowEdit inside the masks); this module only picks them.
"""
from dataclasses import dataclass

import torch

from ..samplers import ddim
from . import crop, flow, flowedit, inpaint, paper, toolkit
from ..files.images import crop_to
from .settings import EditSettings, MaskSpec, unexpected, with_options
from .toolkit import clip_extremes, close_masks, prompt_table, smooth_maps
from ...kernels import noise_diff
from .multidiffusion import generate  # noqa: F401  regions.generate: region-based text-to-image


@dataclass
class RegionsResult:
    image: torch.Tensor | None        # (3, H, W) in [0, 1], or (B, 3, H, W) for a batch of images
    masks: torch.Tensor               # (N, h, w) weights at latent resolution (B, N, h, w for a batch)
    thresholds: torch.Tensor          # (N,) / (B, N): the threshold each mask's scores were cut at
    scores: torch.Tensor              # (N, h, w) / (B, N, h, w): the maps the thresholds apply to
    latents: torch.Tensor | None = None  # final latents (scaled, as the UNet sees them) when output="latent"
    unet_samples: int = 0             # UNet samples spent (mask pass + inversion + decoding)
    work: int = 0                     # Σ UNet samples × the latent cells each ran over (crop_margin shrinks it)


@dataclass
class MaskResult:
    weights: torch.Tensor             # (N, h, w) / (B, N, h, w): the masks (RegionsResult.masks)
    thresholds: torch.Tensor          # (N,) / (B, N)
    scores: torch.Tensor              # (N, h, w) / (B, N, h, w)
    unet_samples: int = 0             # UNet samples of the mask pass


@torch.no_grad()
def mask_pass(m, z0: torch.Tensor, pairs, spec: MaskSpec = MaskSpec(), *, steps: int = 50, generator=None,
              scheduler: str | None = "ddim"):
    """(maps (B, N, h, w) fp32, UNet samples): DiffEdit's noise-difference maps (paper §3.2) for every pair,
    all pairs and draws in one UNet batch of B·n·P samples (n = spec.num_maps). z0 (B, 4, h, w): the scaled
    image latents, noised to spec.encode_strength with n draws (the same draws, in the same order, as
    diffedit.generate_mask; a list of generators gives image b its own draws from generator[b], see ddim.randn)
    at the level of the `scheduler` run's first timestep."""
    B, n, g = z0.shape[0], spec.num_maps, spec.guidance_scale
    ddim.check_generators(generator, B)
    prompts, src, tgt = prompt_table(pairs)
    zt, t = toolkit.noised_latents(m, z0, n, spec.encode_strength, steps, generator, scheduler=scheduler)  # (B, n, 4, h, w)
    ctx = toolkit.encode_prompts(m, prompts)                                       # (P, ...)
    eps = toolkit.unet_grid(m, zt, t, ctx.expand(B))
    maps = toolkit.noise_maps(eps, src, tgt, g if g > 0 else 1.0, spec.reduction)
    return maps, B * n * len(prompts)


def make_masks(maps: torch.Tensor, spec: MaskSpec = MaskSpec()):
    """(weights, thresholds, scores) from (B, N, h, w) raw maps by spec's clean-up, in the order of the module
    docstring: smoothing (and spec.extremes' clipping, for the min–max rules), then kernels.noise_diff
    (normalised scores, per-map thresholds, overlap policy). With closing, the kernel runs with a policy that
    returns the plain binary masks ("average", or "subtract", whose scores are the subtracted ones), the masks
    are closed, and the policy runs on the closed masks."""
    scores = smooth_maps(maps, spec.smooth) if spec.smooth else maps
    if spec.extremes > 0 and noise_diff.parse_rule(spec.threshold).norm == "minmax":
        scores = clip_extremes(scores, spec.extremes)
    if not spec.close:
        return tuple(noise_diff.masks_from_maps(scores, spec.threshold, spec.overlap))
    policy = "subtract" if spec.overlap == "subtract" else "average"
    binary, thr, s = noise_diff.masks_from_maps(scores, spec.threshold, policy)
    return noise_diff.resolve_overlaps(close_masks(binary, spec.close) > 0, s, spec.overlap), thr, s


@torch.no_grad()
def masks(m, image, pairs, mask: MaskSpec | None = None, *, steps: int = 50, generator=None,
          scheduler: str | None = "ddim", **options) -> MaskResult:
    """edit_many's masks alone (the same spec, steps and scheduler, the same draws: the same generator gives
    the same masks): the image VAE-encoded (posterior mean) on m's text-to-image view (inpaint.text_model),
    the mask pass, then make_masks. mask: a settings.MaskSpec (default MaskSpec()); options: its field names
    over it (threshold="clamp:3", overlap="argmax", num_maps=10, encode_strength=0.5, reduction, smooth,
    close, extremes, guidance_scale — which only scales the maps uniformly, ∅ cancels: prompt_table).
    image: PIL, (3,H,W) or (B,3,H,W) in [0,1], or 4-channel scaled latents (B dim kept when given)."""
    spec = with_options(mask or MaskSpec(), options)
    unexpected("masks", options)
    fl = flow.is_flow(m)  # a flow model: flow's image preparation, encoding and velocity mask pass
    if fl:
        flow.check_supported("masks", scheduler=scheduler)
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError("pairs must be a non-empty list of (source, target) prompts")
    x, _, batched = flow.prepare_image(m, image) if fl else toolkit.prepare_image(image)
    base = inpaint.text_model(m)
    z0 = (flow.encode_image if fl else toolkit.encode_image)(base, x)              # (B, 4, h, w)
    maps, samples = (flow.mask_pass if fl else mask_pass)(base, z0, pairs, spec, steps=steps, generator=generator,
                                                          scheduler=scheduler)
    weights, thr, scores = make_masks(maps, spec)
    one = (lambda v: v) if batched else (lambda v: v[0])
    return MaskResult(one(weights), one(thr), one(scores), samples)


@torch.no_grad()
def invert_shared(m, z0: torch.Tensor, *, steps: int = 50, strength: float = 0.8, scheduler: str | None = "ddim",
                  cache_interval: int = 1):
    """The paper's encoding (∅, no guidance, every x_t kept) of z0 (B, 4, h, w) with `scheduler`'s inverse
    scheduler, as diffedit.invert lays it out: (B, S+1, 4, h, w) = [x_{t_S}, ..., x_{t_1}, x0], noisiest first.
    cache_interval: DeepCache's K (paper.invert_trajectory; 1: every step exact)."""
    ctx = toolkit.encode_prompts(m, [""]).expand(z0.shape[0])
    ip = toolkit.inverse_plan(m, scheduler, steps, strength, device=z0.device)
    xs = paper.invert_trajectory(m, z0, ctx, ip, 1.0, cache_interval)[::-1]
    return torch.stack(xs + [z0], 1)


@torch.no_grad()
def fused_edit(m, inverted: torch.Tensor, masks: torch.Tensor, targets, *, steps: int = 50, strength: float = 0.8,
               guidance_scale: float = 7.5, negative_prompt: str = "", scheduler: str | None = "ddim",
               cache_interval: int = 1):
    """Final latents (B, 4, h, w) of one trajectory for N target prompts (paper.denoise_masked with N
    regions): per step the UNet batch is [uncond, target_1..N] at the shared x (N+1 samples per image) and
    kernels.fusion fuses the N guided sampler steps (`scheduler`'s) with the encoded latent at the new level
    by the mask weights (MultiDiffusion Eq. 8, DiffEdit §3.2). inverted (B, S+1, 4, h, w); masks (B, N, h, w).
    cache_interval: DeepCache's K (paper.denoise_masked; 1: every step exact)."""
    B = inverted.shape[0]
    sched = toolkit.plan(m, scheduler, steps, strength, device=inverted.device)
    if inverted.shape[1] != len(sched) + 1:
        raise ValueError(f"inverted has {inverted.shape[1]} latents; steps={steps}, strength={strength}, "
                         f"scheduler={scheduler!r} needs {len(sched) + 1}")
    ctx = toolkit.encode_prompts(m, [negative_prompt] + list(targets))             # (1+N, ...)
    weights = masks.to(inverted.device, torch.float32)
    return paper.denoise_masked(m, inverted, weights, ctx.expand(B), sched, guidance_scale, cache_interval)


@torch.no_grad()
def fused_edit_cropped(m, z0: torch.Tensor, masks: torch.Tensor, targets, settings: EditSettings):
    """(final latents (B, 4, h, w), UNet samples, latent cells per sample): invert_shared and fused_edit with
    `settings` (steps, strength, guidance_scale, negative_prompt, scheduler, cache_interval) on the crop.crop_box of `masks` (B, N, h, w) grown by settings.crop_margin cells, the crop's
    result pasted into a copy of z0 (B, 4, h, w). Outside the box the result is z0, as the full-frame route's
    is outside the masks (engine/edit/crop.py's docstring); all-zero masks run no UNet and return a copy of z0."""
    s = settings
    if s.crop_margin is None:
        raise ValueError("fused_edit_cropped needs settings.crop_margin (None is the full frame: regions.fused_edit)")
    box = crop.crop_box(masks, s.crop_margin, crop.size_multiple(m))
    if box is None:
        return z0.clone(), 0, 0
    rows, cols = box.slices()
    kw = dict(steps=s.steps, strength=s.strength, scheduler=s.scheduler, cache_interval=s.cache_interval)
    # a box over the whole latent slices z0 to itself: the same tensor, so the full-frame computation exactly
    inv = invert_shared(m, z0[..., rows, cols].contiguous(), **kw)
    zc = fused_edit(m, inv, masks[..., rows, cols].contiguous(), targets, guidance_scale=s.guidance_scale,
                            negative_prompt=s.negative_prompt, **kw)
    z = z0.clone()
    z[..., rows, cols] = zc.to(z.dtype)
    S = inv.shape[1] - 1
    uncond = 1 if s.guidance_scale > 1.0 else 0  # paper.denoise_masked drops the ∅ sample without guidance
    return z, z0.shape[0] * S * (1 + len(targets) + uncond), box.cells


@torch.no_grad()
def edit_many(m, image, pairs, settings: EditSettings | None = None, *, mask: MaskSpec | None = None,
              generator=None, output: str = "image", inpaint_model=None, inpaint_strength: float | None = None,
              **options) -> RegionsResult:
    """Edit `image` (PIL, (3,H,W) or (B,3,H,W) in [0,1]) by every (source, target) pair at once.
    settings: an EditSettings (steps, strength, guidance_scale, negative_prompt, scheduler, editor and the
    mask fields; compat must be None: the diffusers reproduction is engine.compat, one pair); mask: a
    MaskSpec for the mask pass (default settings.mask()); options: field names of either, applied over both
    (threshold="clamp:3", overlap="argmax", editor="fused", steps=50, strength=0.8, ...; reduction, smooth,
    close, extremes go to the mask spec).
    editor="fused": one shared inversion + one fused trajectory (module docstring). editor="inpaint": the
    same masks, then one inpainting pass per pair (engine/inpaint.py) on `inpaint_model`, or on m when it
    is an inpainting model; inpaint_strength defaults to `strength`. editor="flowedit" (flow models only):
    FlowEdit inside the masks, no inversion (flowedit.flowedit; options source_guidance_scale=3.5, n_avg=1). The mask pass runs on m (an
    inpainting m runs it as a text-to-image model, see inpaint.text_model). The image is VAE-encoded once
    for the mask pass and the inversion. output="latent" also returns the final scaled latents.
    threshold: fixed:v | clamp:r | mean[:k] | median | otsu | quantile:q; overlap: argmax | subtract |
    average | soft (kernels.noise_diff). smooth: Gaussian σ or (σ, size) on the maps before the threshold;
    close: kernel size or (size, iterations) of a closing of the binary masks before the overlap policy.
    Random draws, in order: the mask pass's noise, then (inpaint) each pass's start noise. generator: one
    for the batch, or a list with one per image (each image then gets the draws of its unbatched run).
    scheduler: "ddim" | "dpm++2m" (None: the checkpoint's own) for the mask pass's noise level, the inversion
    and the fused decoding (toolkit.schedulers); the inpainting editor samples with DDIM and refuses another.
    background: "pixels" (default) keeps the input's pixels beyond the masks (toolkit.keep_pixels: outside
    the masks the latents are the encoded image's exactly, but the VAE decoder shifts their colours);
    "latent": the decoded latent everywhere (the paper's output, and diffedit.edit's)."""
    mask_opts = {k: v for k, v in options.items() if k in MaskSpec.names()}
    rest = {k: v for k, v in options.items() if k not in mask_opts or k in EditSettings.names()}
    s = with_options(settings or EditSettings(), rest)   # takes the EditSettings names out of rest
    spec = with_options(mask or s.mask(), mask_opts)      # a name of both (threshold, ...) sets both
    fl = flow.is_flow(m)
    fe = {k: rest.pop(k) for k in ("source_guidance_scale", "n_avg") if k in rest} if s.editor == "flowedit" else {}
    unexpected("edit_many", rest)
    if fl:
        flow.check_supported("edit_many", s.compat, s.scheduler, s.editor, s.cache_interval)
        if s.crop_margin is not None:  # SD 3's position table is indexed by the patch grid: a crop moves every token
            raise ValueError(f"crop_margin applies to SD models' UNet; a flow model (SD 3.x, FLUX) runs the full "
                             f"frame (got crop_margin {s.crop_margin}; leave it unset)")
        flow.check_negative_prompt(m, s.negative_prompt)
    elif s.editor == "flowedit":
        raise ValueError(f"editor 'flowedit' runs on rectified-flow models (SD 3.x, FLUX), not on model kind "
                         f"{getattr(m, 'kind', None)!r}")
    if s.compat is not None:
        raise ValueError(f"edit_many runs the engine's algorithm: compat={s.compat!r} is the single-edit "
                         "reproduction, diffedit.generate_mask / invert / edit")
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError("pairs must be a non-empty list of (source, target) prompts")
    x, size, batched = flow.prepare_image(m, image) if fl else toolkit.prepare_image(image)  # latents pass
    if s.editor == "inpaint" and x.shape[1] != 3:
        raise ValueError("editor='inpaint' needs the image itself (the masked image is made in pixel space), "
                         "not latents")
    ddim.check_generators(generator, x.shape[0])
    if s.editor == "inpaint" and toolkit.schedulers(m, s.scheduler).family != "ddim":
        raise ValueError(f"editor='inpaint' samples with DDIM only (got scheduler={s.scheduler!r})")
    steps, strength, guidance_scale, scheduler = s.steps, s.strength, s.guidance_scale, s.scheduler
    base = inpaint.text_model(m)
    z0 = (flow.encode_image if fl else toolkit.encode_image)(base, x)              # (B, 4, h, w)
    # z0 (4 channels, batched) passes through masks' prepare/encode unchanged: the image is encoded once
    mk = masks(base, z0, pairs, spec, steps=steps, generator=generator, scheduler=scheduler)
    weights, thr, scores, samples = mk.weights, mk.thresholds, mk.scores, mk.unet_samples
    targets = [q for _, q in pairs]
    dec = base
    cells, work = z0.shape[-2] * z0.shape[-1], None
    if s.editor == "fused" and s.crop_margin is not None:  # flow models refused above
        z, n, crop_cells = fused_edit_cropped(base, z0, weights, targets, s)
        work = samples * cells + n * crop_cells
        samples += n
    elif s.editor == "fused":
        inv = (flow.invert_shared(base, z0, steps=steps, strength=strength, decode_guidance_scale=guidance_scale)
               if fl else invert_shared(base, z0, steps=steps, strength=strength, scheduler=scheduler,
                                        cache_interval=s.cache_interval))
        z = (flow.fused_edit(base, inv, weights, targets, steps=steps, strength=strength,
                             guidance_scale=guidance_scale, negative_prompt=s.negative_prompt, scheduler=scheduler)
             if fl else fused_edit(base, inv, weights, targets, steps=steps, strength=strength,
                                   guidance_scale=guidance_scale, negative_prompt=s.negative_prompt,
                                   scheduler=scheduler, cache_interval=s.cache_interval))
        S = inv.shape[1] - 1
        samples += x.shape[0] * S * (1 + len(targets) + flow.uses_cfg(base, guidance_scale))  # inversion + decode
    elif s.editor == "flowedit":
        z, n = flowedit.flowedit(base, z0, weights, pairs, steps=steps, strength=strength,
                                 guidance_scale=guidance_scale, negative_prompt=s.negative_prompt,
                                 generator=generator, spec=flowedit.FlowEditSpec(**fe))
        samples += n
    else:
        dec = m if inpaint_model is None else inpaint_model
        z, n = inpaint.inpaint_sequence(dec, x, weights, targets, steps=steps,
                                        strength=strength if inpaint_strength is None else inpaint_strength,
                                        guidance_scale=guidance_scale, negative_prompt=s.negative_prompt,
                                        generator=generator)
        samples += n
    img = None
    if output == "image":
        img = (flow.decode_latents if fl else toolkit.decode_latents)(dec, z)
        if s.background != "latent" and x.shape[1] == 3:  # the input's pixels where no mask reaches
            img = toolkit.keep_pixels(img, x, weights)
        img = crop_to(img, size)
    one = (lambda v: v) if batched else (lambda v: None if v is None else v[0])
    return RegionsResult(image=one(img), masks=one(weights), thresholds=one(thr), scores=one(scores),
                         latents=one(z) if output == "latent" else None, unet_samples=samples,
                         work=samples * cells if work is None else work)

