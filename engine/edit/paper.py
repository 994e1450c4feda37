"""DiffEdit (Couairon et al. 2022, arXiv 2210.11427), the paper's three steps: the mask from the noise
difference, DDIM encoding, masked decoding.

1. generate_mask: |ε_Q − ε_R| of the image noised to r, averaged over n draws and channels, extremes clipped,
   rescaled to [0, 1] per image, thresholded;
2. invert: DDIM encoding with ∅ and no guidance, keeping every x_t;
3. edit: decoding that blends after each step with the encoded latent at the *same* level, ending on the
   clean latent x0 outside the mask.
This module is the paper's algorithm and nothing else; engine/edit/diffedit.py is the public front that sends
compat="diffusers" to engine/edit/compat.py (the StableDiffusionDiffEditPipeline reproduction, which reuses
pieces of this module, never the reverse). The shared pieces (encoding, UNet running, guidance, blur, the
noise map) live in engine/edit/toolkit.py.

Shapes: an image is a PIL image, a (3,H,W) or a (B,3,H,W) float tensor in [0,1]; a single image gives
unbatched results ((h,w) mask, (S+1,4,h,w) latents, (3,H,W) image), a batch gives batched ones. Sizes that
are not multiples of 8 are replicate-padded right/bottom to the next multiple (engine.images.pad_to_multiple);
masks and latents live on the padded grid; `edit(..., size=(H, W))` crops the image back.

Random numbers: `generator` is one torch.Generator (or None) for the whole batch, or a list with one per
image: image b's numbers then come from generator[b] in the order of an unbatched run (ddim.randn).

Samplers: scheduler="ddim" (default) or "dpm++2m" (DPM-Solver++(2M), engine.dpm) on all three steps, built
from the checkpoint's scheduler configs (toolkit.schedulers; None: the checkpoint's own family). Every
config option applies (clip_sample, thresholding, the inverse_scheduler/ folder, ...). The decoding's fast
path is kernels.fusion.fused_step (CFG + a plain DDIM step + fusion in one pass); a plan that clips or
thresholds x̂0, or a DPM-Solver++ plan, runs CFG → Plan.step → kernels.fusion.fuse in torch instead.
"""
import torch

from ..samplers import ddim
from ..files.images import crop_to
from . import deepcache
from .settings import EditSettings, MaskSpec, unexpected, with_options
from .toolkit import (Cond, as_list, clip_extremes, close_masks, decode_latents, encode_image,  # noqa: F401
                            encode_prompts, gaussian_blur, guided, inverse_plan, is_plain_ddim, noise_maps,
                            noised_latents, plan, prepare_image, run_unet, smooth_maps, unet_grid)
from ...kernels import noise_diff
from ...kernels.fusion import fuse, fused_step

PAPER = MaskSpec(threshold="fixed:0.5", extremes=0.01)  # the paper's mask: min–max rescaled, > 0.5, extremes clipped


def mask_from_map(maps: torch.Tensor, spec: MaskSpec = PAPER) -> torch.Tensor:
    """(B, h, w) difference maps -> masks, each image on its own (never across the batch), by spec's clean-up:
    the Gaussian blur (spec.smooth: σ in latent pixels or (σ, size); None or 0 = off), the paper's removal of
    extremes (clipped to the [q, 1 − q] quantiles, q = spec.extremes; rules that rescale by min–max only),
    then a kernels.noise_diff rule — "fixed:v" is min–max rescaling then > v, as everywhere in the engine —
    or "soft": the rescaled map; then spec.close, the closing of a binary mask."""
    maps = maps.float()
    if spec.smooth:
        maps = smooth_maps(maps, spec.smooth)
    soft = spec.threshold == "soft"
    rule = None if soft else noise_diff.parse_rule(spec.threshold)
    if spec.extremes > 0 and (soft or rule.norm == "minmax"):
        maps = clip_extremes(maps, spec.extremes)
    if soft:
        lo, hi = maps.flatten(1).amin(1)[:, None, None], maps.flatten(1).amax(1)[:, None, None]
        return (maps - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    mask = noise_diff.masks_from_maps(maps[:, None], rule, "average").weights[:, 0]
    return close_masks(mask, spec.close) if spec.close else mask


# ---- 1. mask ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_mask(m, image, source_prompt, target_prompt, mask: MaskSpec | None = None, *, steps: int = 50,
                  generator=None, scheduler: str | None = "ddim", **options) -> torch.Tensor:
    """DiffEdit step 1 (paper §3.2): where Q (target) and R (source) disagree on the noise of the image
    noised to `encode_strength`. Returns an (h, w) fp32 mask in {0, 1} ((B, h, w) for an image batch).
    mask: a settings.MaskSpec (default PAPER: threshold "fixed:0.5", extremes 0.01); options: its field
    names (num_maps=10, encode_strength=0.5, guidance_scale=7.5, threshold, reduction, smooth, close,
    extremes) over it. n = num_maps draws of x_r, one UNet batch of 2n samples per image ([R, Q] per draw);
    the map is toolkit.noise_maps (mean over draws of |Δ| averaged over channels, "l1", or its L2 norm,
    "l2"); then mask_from_map. With a shared ∅ sample CFG makes Δ = g·(ε_Q − ε_R), a uniform scale every
    rule divides out, so the ∅ samples are skipped and guidance_scale changes nothing. The noise level is
    that of the first timestep of the `scheduler` run from encode_strength."""
    spec = with_options(mask or PAPER, options)
    unexpected("generate_mask", options)
    if spec.overlap != "argmax":
        raise ValueError(f"overlap {spec.overlap!r} applies between the masks of several pairs; generate_mask "
                         "makes one (use regions.masks)")
    x, _, batched = prepare_image(image)
    B = x.shape[0]
    src, tgt = as_list(source_prompt, B, "source_prompt"), as_list(target_prompt, B, "target_prompt")
    ddim.check_generators(generator, B)
    zt, t = noised_latents(m, x, spec.num_maps, spec.encode_strength, steps, generator, scheduler=scheduler)
    ctx = encode_prompts(m, [p for pair in zip(src, tgt) for p in pair]).grid(B, 2)
    eps = unet_grid(m, zt, t, ctx)  # (B, n, 2, C, h, w)
    maps = noise_maps(eps, [0], [1], 1.0, spec.reduction)[:, 0]  # guidance only scales the map
    out = mask_from_map(maps, spec)
    return out if batched else out[0]


# ---- 2. encoding -----------------------------------------------------------------------------------------


def _step_cache(m, cache_interval: int):
    """A loop's DeepCache state (engine.edit.deepcache.StepCache), None for cache_interval 1: the plain UNet."""
    if cache_interval == 1:
        return None
    return deepcache.StepCache(m, cache_interval)


def invert_trajectory(m, z0: torch.Tensor, ctx: Cond, plan, guidance_scale: float = 1.0,
                      cache_interval: int = 1) -> list:
    """Encoding of z0 (B,4,h,w) along an inverse plan (toolkit.inverse_plan: DDIM Eq. 12 with the levels
    swapped, or DPM-Solver++ run backwards). ctx: Cond (B, 1, ...) conditional only, or (B, 2, ...) =
    [uncond, cond] for CFG with guidance_scale. Returns [x after step 0, ..., x after the last] (ascending
    noise). cache_interval K > 1: DeepCache, the UNet's deep blocks every K-th step (_step_cache)."""
    out, x, x0 = [], z0, None
    sc = _step_cache(m, cache_interval)
    for i in range(len(plan)):
        e = unet_grid(m, x[:, None], plan.t[i], ctx, None if sc is None else sc.at(i))[:, 0]  # (B, P, C, h, w)
        e = guided(e[:, 0], e[:, 1], guidance_scale) if ctx.shape[1] == 2 else e[:, 0]
        x, x0 = plan.step(i, e, x, x0)
        out.append(x)
    return out


@torch.no_grad()
def invert(m, image, prompt="", *, steps: int = 50, strength: float = 0.8, guidance_scale: float | None = None,
           generator=None, negative_prompt: str = "", scheduler: str | None = "ddim") -> torch.Tensor:
    """DiffEdit step 2 (paper §3.2): DDIM-encode the image to the level `strength`, keeping every x_t.
    guidance_scale None means 1.0 (the paper: ∅ prompt, one UNet sample per step).
    Returns the latents in decoding order, noisiest first (S = int(steps·strength) levels):
    (S+1, 4, h, w) = [x_{t_S}, ..., x_{t_1}, x0], x0 the clean posterior-mean latent. A (B,3,H,W) image gives
    a leading batch dim. scheduler: the inverse scheduler's family (DDIMInverseScheduler /
    DPMSolverMultistepInverseScheduler)."""
    x, _, batched = prepare_image(image)
    B = x.shape[0]
    ddim.check_generators(generator, B)  # the paper's encoding draws nothing, but a wrong list is a mistake
    g = 1.0 if guidance_scale is None else guidance_scale
    inv = inverted_latents(m, encode_image(m, x), as_list(prompt, B, "prompt"), negative_prompt, g, steps, strength,
                           scheduler)
    return inv if batched else inv[0]


def inverted_latents(m, z0, prompts: list, negative_prompt: str, guidance_scale: float, steps: int, strength: float,
                     scheduler) -> torch.Tensor:
    """z0 (B, 4, h, w) encoded along the inverse plan under prompts (CFG with negative_prompt when guidance_scale
    > 1), laid out for edit: (B, S+1, 4, h, w) = [x_{t_S}, ..., x_{t_1}, z0], noisiest first."""
    B = z0.shape[0]
    if guidance_scale > 1.0:
        ctx = encode_prompts(m, [p for q in prompts for p in (negative_prompt, q)]).grid(B, 2)
    else:
        ctx = encode_prompts(m, prompts).grid(B, 1)
    ip = inverse_plan(m, scheduler, steps, strength, device=z0.device)
    return torch.stack(invert_trajectory(m, z0, ctx, ip, guidance_scale)[::-1] + [z0], 1)


# ---- 3. masked decoding ----------------------------------------------------------------------------------


def denoise_masked(m, inverted: torch.Tensor, weights: torch.Tensor, ctx: Cond, plan,
                   guidance_scale: float, cache_interval: int = 1) -> torch.Tensor:
    """The paper's decoding loop: from inverted[:, 0], after each step to level t_{i+1} fuse with the
    encoded latent at that same level, inverted[:, i+1] (the last is x0). inverted (B, S+1, 4, h, w);
    weights (B, N, h, w); ctx Cond (B, 1+N, ...) = [uncond, targets...]; plan from toolkit.plan. A plain DDIM
    plan runs kernels.fusion.fused_step; any other runs each region's guided output through plan.step (a
    multistep solver keeps each region's x̂0 history) and kernels.fusion.fuse. cache_interval K > 1: DeepCache,
    the UNet's deep blocks every K-th step (_step_cache)."""
    x, x0 = inverted[:, 0], None
    plain = is_plain_ddim(plan)
    sc = _step_cache(m, cache_interval)
    for i in range(len(plan)):
        c = ctx if guidance_scale > 1.0 else ctx[:, 1:]
        eps = unet_grid(m, x[:, None], plan.t[i], c, None if sc is None else sc.at(i))[:, 0]  # (B, P, C, h, w)
        if not plain:
            e = guided(eps[:, :1], eps[:, 1:], guidance_scale) if guidance_scale > 1.0 else eps  # (B, N, C, h, w)
            y, x0 = plan.step(i, e, x[:, None], x0)
            x = fuse(y, inverted[:, i + 1], weights).to(x.dtype)
            continue
        if guidance_scale <= 1.0:  # no ∅ sample: e_u := e_t makes the guided ε exactly e_t
            eps, g = torch.cat([eps[:, :1], eps], 1), 1.0
        else:
            g = guidance_scale
        x = fused_step(eps, x, inverted[:, i + 1], weights, g, plan.alpha_from[i], plan.alpha_to[i],
                       plan.prediction_type)
    return x


def check_edit_inputs(m, inverted, mask, target_prompt, steps, strength, negative_prompt, scheduler="ddim"):
    """(inverted (B, S+1, 4, h, w), mask (B, 1, h, w) fp32, ctx Cond (B, 2, ...), plan, batched) for edit."""
    batched = inverted.ndim == 5
    inv = inverted if batched else inverted[None]
    B = inv.shape[0]
    mk = mask.to(inv.device, torch.float32)
    mk = (mk if mk.ndim == 3 else mk[None])[:, None]  # (B, 1, h, w)
    if mk.shape[0] != B or mk.shape[-2:] != inv.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match latents {tuple(inverted.shape)}")
    sched = plan(m, scheduler, steps, strength, device=inv.device)
    if inv.shape[1] != len(sched) + 1:
        raise ValueError(f"inverted has {inv.shape[1]} latents; steps={steps}, strength={strength}, "
                         f"scheduler={scheduler!r} needs {len(sched) + 1} (see invert)")
    ctx = encode_prompts(m, [p for q in as_list(target_prompt, B, "target_prompt") for p in (negative_prompt, q)])
    return inv, mk, ctx.grid(B, 2), sched, batched


EDIT_FIELDS = ("steps", "strength", "guidance_scale", "negative_prompt", "compat", "scheduler")  # what edit uses


@torch.no_grad()
def edit(m, inverted: torch.Tensor, mask: torch.Tensor, target_prompt, settings: EditSettings | None = None, *,
         output: str = "image", size=None, **options) -> torch.Tensor:
    """DiffEdit step 3 (paper §3.2): decode from the encoded latent with the target prompt, keeping the
    encoded trajectory outside the mask. `inverted` and `mask` as returned by invert / generate_mask with
    the same steps/strength (unbatched or batched alike). After the step to level t the latent is
    M·y_t + (1−M)·x_t, x_t the encoded latent at level t, so it ends on x0 outside the mask; a soft mask in
    [0, 1] is allowed. settings: an EditSettings, of which edit uses steps=50, strength=0.8, guidance_scale=7.5,
    negative_prompt="", compat=None and scheduler="ddim" (the family `inverted` was made with); options:
    those names over it.
    output "image": (3, H, W) fp32 in [0, 1], cropped to `size` (H, W) when given; "latent": the final
    scaled latents (4, h, w). Batched inputs give a leading batch dim."""
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    s = with_options(settings or EditSettings(), options, EDIT_FIELDS)
    if options.pop("eta", 0.0) != 0.0:
        raise ValueError("eta > 0 is only available with compat='diffusers'")
    options.pop("generator", None)  # the paper's decoding draws nothing
    unexpected("edit", options)
    steps, strength, negative_prompt, scheduler = s.steps, s.strength, s.negative_prompt, s.scheduler
    inv, mk, ctx, sched, batched = check_edit_inputs(m, inverted, mask, target_prompt, steps, strength,
                                                     negative_prompt, scheduler)
    z = denoise_masked(m, inv, mk, ctx, sched, s.guidance_scale)
    if output == "latent":
        return z if batched else z[0]
    img = decode_latents(m, z)
    if size is not None:
        img = crop_to(img, size)
    return img if batched else img[0]
