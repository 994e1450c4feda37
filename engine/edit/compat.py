"""The diffusers reproduction: StableDiffusionDiffEditPipeline.generate_mask / invert / __call__ (diffusers
0.42.1, pipelines/deprecated/stable_diffusion_diffedit/), same defaults, the CPU generator's numbers drawn in
the same order, to 1e-3 (the masks bit for bit). engine/edit/paper.py is the paper (this module reuses its
pieces, never the reverse); the public front engine/edit/diffedit.py hands compat="diffusers" to these. The
README's table lists where the two differ.

What the pipeline cannot express is refused rather than ignored: another threshold rule than clamp:k, the
l2 reduction, smoothing; (in the Editor) several pairs, overlap policies, the inpainting editor; SD-XL
(diffusers never had an SD-XL DiffEdit pipeline, so there is nothing to reproduce).

Schedulers: `scheduler` "ddim" is the pipeline with DDIMScheduler and DDIMInverseScheduler (the folder's
inverse_scheduler/ when it has one, else DDIMInverseScheduler.from_config(scheduler.config)); "dpm++2m" is
the pipeline with DPMSolverMultistepScheduler and DPMSolverMultistepInverseScheduler (both .from_config of
the folder's scheduler config). Every config option (clip_sample, thresholding, spacing, ...) applies as
there. The mask pass is always DDIM: the pipeline's generate_mask calls scheduler.add_noise with a 0-d
timestep, which DPMSolverMultistepScheduler cannot take, so DPM users generate the mask with DDIM.

Latents: `invert` returns (S+1, 4, h, w) = [x_{t_S}, ..., x_{t_1}, x0], the paper's layout, with x0 the
posterior sample the pipeline inverted from; the pipeline's own `latents` are its first S entries. `edit`
takes either layout (with_x0_slot): the pipeline's S latents straight from its invert, or ours.
"""
import torch

from ..samplers import ddim
from ..files.images import crop_to
from .paper import EDIT_FIELDS, check_edit_inputs, inverted_latents
from .settings import EditSettings, MaskSpec, unexpected, with_options
from .toolkit import (as_list, decode_latents, encode_image, encode_prompts, guided,
                            noised_latents, plan, prepare_image, unet_grid)


def check_family(m) -> None:
    """The pipeline is SD 1.x/2.x only: SD-XL (a pooled embedding, micro-conditioning) is a clear error."""
    kind = str(getattr(m, "kind", ""))
    if kind.startswith("sdxl") or getattr(m, "text_encoder_2", None) is not None:
        raise ValueError(f"compat='diffusers' reproduces StableDiffusionDiffEditPipeline, which is SD 1.x/2.x only "
                         f"(diffusers never had an SD-XL DiffEdit); model kind {kind or 'sdxl'!r}: use compat=None, "
                         f"the paper's DiffEdit, which runs on SD-XL")


@torch.no_grad()
def generate_mask(m, image, source_prompt, target_prompt, mask: MaskSpec | None = None, *, steps: int = 50,
                  generator=None, source_negative_prompt: str = "", target_negative_prompt: str = "",
                  **options) -> torch.Tensor:
    """The pipeline's generate_mask: VAE posterior samples, its CFG combination, rule clamp:k with the mean
    taken over the whole batch; the noise level of DDIM (module docstring). mask: a settings.MaskSpec
    (default MaskSpec(): clamp:3, the pipeline's mask_thresholding_ratio 3), options its field names
    (num_maps=10, encode_strength=0.5, guidance_scale=7.5, threshold="clamp:k"). (h, w) {0, 1} fp32 mask,
    (B, h, w) for a batch."""
    spec = with_options(mask or MaskSpec(), options)
    unexpected("generate_mask", options)
    check_family(m)
    rule, _, ratio = spec.threshold.partition(":")
    if rule != "clamp" or spec.reduction != "l1" or spec.smooth or spec.close or spec.extremes:
        raise ValueError("compat='diffusers' takes threshold='clamp:k' (its mask_thresholding_ratio) only, "
                         "with reduction='l1' and no smoothing, closing or clipping of extremes")
    if spec.overlap != "argmax":
        raise ValueError(f"compat='diffusers' makes one mask: overlap {spec.overlap!r} does not apply")
    x, _, batched = prepare_image(image)
    B = x.shape[0]
    src, tgt = as_list(source_prompt, B, "source_prompt"), as_list(target_prompt, B, "target_prompt")
    ddim.check_generators(generator, B)
    maps = _map(m, x, (src, tgt), (source_negative_prompt, target_negative_prompt), spec, steps, generator)
    cm = maps.mean() * float(ratio or 3.0)  # over the whole batch, as the pipeline does
    out = (torch.minimum(maps.clamp(min=0), cm) / cm > 0.5).float()
    return out if batched else out[0]


def _map(m, x, prompts, negatives, spec: MaskSpec, steps, generator):
    """StableDiffusionDiffEditPipeline.generate_mask's map (B, h, w). Its encode_prompt results are unpacked
    in swapped order, so its four chunks are [src, src_neg, tgt, tgt_neg] while named [neg_src, src, neg_tgt,
    tgt]: the 'guided' source is src + g·(src_neg − src), likewise the target. Reproduced as such."""
    (src, tgt), (src_neg, tgt_neg), B, g = prompts, negatives, x.shape[0], spec.guidance_scale
    zt, t = noised_latents(m, x, spec.num_maps, spec.encode_strength, steps, generator, sample=True, scheduler="ddim")
    cfg_on = g > 1.0
    per_image = [[s, sn, q, qn] if cfg_on else [s, q] for s, sn, q, qn in
                 zip(src, [src_neg] * B, tgt, [tgt_neg] * B)]
    distinct = [list(dict.fromkeys(p)) for p in per_image]
    P = max(len(d) for d in distinct)
    # Each image runs its distinct prompts only (3n samples with the default equal negatives, not 4n).
    ctx = encode_prompts(m, [p for d in distinct for p in d + [d[0]] * (P - len(d))]).grid(B, P)
    out = unet_grid(m, zt, t, ctx)  # (B, n, P, C, h, w)
    pick = lambda j: torch.stack([out[b, :, distinct[b].index(per_image[b][j])] for b in range(B)])  # noqa: E731
    if cfg_on:
        e_src, e_tgt = guided(pick(0), pick(1), g), guided(pick(2), pick(3), g)
    else:
        e_src, e_tgt = pick(0), pick(1)
    return (e_tgt - e_src).abs().mean([1, 2])


@torch.no_grad()
def invert(m, image, prompt="", *, steps: int = 50, strength: float = 0.8, guidance_scale: float = 7.5,
           generator=None, negative_prompt: str = "", scheduler: str | None = "ddim") -> torch.Tensor:
    """The pipeline's invert: the prompt with CFG, from a posterior sample, with the inverse scheduler of
    `scheduler`'s family. (S+1, 4, h, w) (module docstring)."""
    check_family(m)
    x, _, batched = prepare_image(image)
    B = x.shape[0]
    ddim.check_generators(generator, B)
    z0 = encode_image(m, x, generator, sample=True)  # the pipeline encodes a posterior sample
    inv = inverted_latents(m, z0, as_list(prompt, B, "prompt"), negative_prompt, guidance_scale, steps, strength,
                           scheduler)
    return inv if batched else inv[0]


def with_x0_slot(m, inverted: torch.Tensor, steps: int, strength: float, scheduler) -> torch.Tensor:
    """`inverted` in invert's (S+1)-latent layout. The pipeline's own `invert(...).latents` hold S latents
    ([x_{t_S} … x_{t_1}], no x0; (B, S, 4, h, w) or (S, 4, h, w)); its __call__ takes them as they are, and so
    does this reproduction: compat's decoding never reads x0 (it ends on the latent at t_1), so the slot is
    filled with a copy of the last latent only to share the paper's input checks. Any other count is refused,
    naming both layouts."""
    S = len(plan(m, scheduler, steps, strength, device=inverted.device))
    dim = 1 if inverted.ndim == 5 else 0
    n = inverted.shape[dim] if inverted.ndim in (4, 5) else -1
    if n == S:
        return torch.cat([inverted, inverted.narrow(dim, S - 1, 1)], dim)
    if n != S + 1:
        raise ValueError(f"inverted has {n} latents; steps={steps}, strength={strength}, scheduler={scheduler!r} "
                         f"needs {S} (the pipeline's invert(...).latents) or {S + 1} (invert's, with x0)")
    return inverted


@torch.no_grad()
def edit(m, inverted: torch.Tensor, mask: torch.Tensor, target_prompt, settings: EditSettings | None = None, *,
         output: str = "image", size=None, eta: float = 0.0, generator=None, **options) -> torch.Tensor:
    """The pipeline's __call__: mask binarised at 0.5, each step blended with the inverted latent one level
    noisier, ending on the latent at t_1; eta/generator passed to the DDIM step (DPMSolverMultistepScheduler
    takes no eta: eta > 0 with it is refused, where the pipeline would drop it silently). settings and
    options as diffedit.edit's (steps, strength, guidance_scale, negative_prompt, scheduler)."""
    s = with_options(settings or EditSettings(), options, EDIT_FIELDS)
    unexpected("edit", options)
    check_family(m)
    steps, strength, negative_prompt, scheduler = s.steps, s.strength, s.negative_prompt, s.scheduler
    inverted = with_x0_slot(m, inverted, steps, strength, scheduler)
    inv, mk, ctx, sched, batched = check_edit_inputs(m, inverted, mask, target_prompt, steps, strength,
                                                     negative_prompt, scheduler)
    if eta != 0.0 and not isinstance(sched, ddim.Plan):
        raise ValueError("eta > 0 needs scheduler='ddim' (DPMSolverMultistepScheduler.step has no eta)")
    ddim.check_generators(generator, inv.shape[0])
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    mk = (mk >= 0.5).to(inv.dtype)
    x, x0 = inv[:, 0].clone(), None
    g = s.guidance_scale
    for i in range(len(sched)):
        c = ctx if g > 1.0 else ctx[:, 1:]
        e = unet_grid(m, x[:, None], sched.t[i], c)[:, 0]
        e = guided(e[:, 0], e[:, 1], g) if g > 1.0 else e[:, 0]
        if eta != 0.0:
            x = ddim.ddim_step(e, x, sched.alpha_from[i], sched.alpha_to[i], sched.prediction_type, eta=eta,
                               generator=generator, clip_sample_range=sched.clip_sample_range,
                               thresholding=sched.thresholding)
        else:
            x, x0 = sched.step(i, e, x, x0)
        x = x * mk + inv[:, i] * (1 - mk)
    if output == "latent":
        return x if batched else x[0]
    img = decode_latents(m, x)
    img = crop_to(img, size) if size is not None else img
    return img if batched else img[0]
