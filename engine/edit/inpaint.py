"""The older multi-edit route (the Technion project's): masks from the mask pass, then one inpainting pass
per pair with a 9-channel inpainting UNet, each pass's output image the next pass's input.

Conventions (SD-inpainting's, as StableDiffusionInpaintPipeline uses them): the UNet input is
cat(noisy latents (4), mask (1, latent resolution, 1 = repaint), masked-image latents (4)); the masked
image is image·(1 − mask) in [−1, 1] (the hole is mid-grey 0), VAE-encoded (posterior mean, scaled); the
mask is binarised at 0.5 (the model was trained on binary masks); CFG; DDIM from `strength` (pure noise
at strength 1, as the pipeline does, else the image latents noised to the first timestep).

Invariant (engine choice, like the DiffEdit decoder): after every step the latent is blended with the
image latents noised to the new level, M·y + (1−M)·x_prev, and the last step blends with the clean
latents, so outside the mask each pass ends on its input image's latents bit for bit (`blend=False`
gives the pipeline's unblended 9-channel behaviour). The step and the blend are kernels.fusion.fused_step
with one region.

Inpainting models as text-to-image models (`text_model`): the mask pass and the fused editor need a
plain ε(x, t, c). An inpainting UNet gets the input SD-inpainting was trained on for "repaint
everything" (its training masked the whole image in a share of the samples): mask = 1 everywhere and the
masked image = the fully masked image, i.e. a mid-grey image VAE-encoded — not zero latents, which the
model never saw. That makes it a text-to-image model, which is what DiffEdit's noise difference needs.
"""
import copy

import torch
import torch.nn.functional as F

from ..samplers import ddim
from . import toolkit
from ...kernels.fusion import fused_step


def is_inpaint(m) -> bool:
    return str(getattr(m, "kind", "")).endswith("-inpaint")


class _FullMaskUNet:
    """ε(x, t, c) of a 9-channel UNet with the all-repaint conditioning (module docstring)."""

    def __init__(self, m):
        self.m, self.unet, self.cache = m, m.unet, {}

    def cond(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w, str(device), dtype)
        if key not in self.cache:
            grey = torch.full((1, 3, 8 * h, 8 * w), 0.5, device=device)  # 0 in [-1, 1]
            z = toolkit.encode_image(self.m, grey).to(dtype)
            self.cache[key] = torch.cat([torch.ones_like(z[:, :1]), z], 1)  # (1, 5, h, w)
        return self.cache[key]

    def __call__(self, x, t, ctx, **added):  # added: SD-XL's text_embeds / time_ids
        c = self.cond(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return self.unet(torch.cat([x, c.expand(x.shape[0], -1, -1, -1)], 1), t, ctx, **added)


def text_model(m):
    """m itself, or for an inpainting model a shallow copy whose unet is the all-repaint 4-channel ε (and
    whose kind drops "-inpaint": it is a text-to-image model now)."""
    if not is_inpaint(m):
        return m
    t = copy.copy(m)
    t.unet, t.kind = _FullMaskUNet(m), m.kind[:-len("-inpaint")]
    return t


def plain_ddim_plan(m, steps: int, strength: float = 1.0, device=None):
    """m's DDIM plan (toolkit.plan), refused when its config clips or thresholds x̂0: the loops that sample
    with kernels.fusion.fused_step alone (inpainting, region-based generation) implement plain DDIM only."""
    p = toolkit.plan(m, "ddim", steps, strength, device=device)
    if not toolkit.is_plain_ddim(p):
        raise ValueError("this sampler runs plain DDIM only: a scheduler config with clip_sample or thresholding "
                         "is not supported here (set them off, or use the fused editor)")
    return p


@torch.no_grad()
def inpaint(m, image: torch.Tensor, mask: torch.Tensor, prompt: str, *, steps: int = 50, strength: float = 1.0,
            guidance_scale: float = 7.5, negative_prompt: str = "", generator=None, blend: bool = True) -> torch.Tensor:
    """One inpainting pass: image (B, 3, H, W) in [0, 1] (H, W multiples of 8), mask (B, h, w) at latent
    resolution (1 = repaint) -> final scaled latents (B, 4, h, w). Random draws: one noise tensor."""
    if not is_inpaint(m):
        raise ValueError(f"inpainting needs a 9-channel inpainting model (kind '...-inpaint'), got kind "
                         f"{getattr(m, 'kind', None)!r}; pass inpaint_model=")
    B, _, H, W = image.shape
    h, w = H // 8, W // 8
    mk = (mask.to(m.device, torch.float32).reshape(B, 1, h, w) >= 0.5).float()
    hole = F.interpolate(mk, size=(H, W), mode="nearest")
    img = image.to(m.device, torch.float32)
    z0 = toolkit.encode_image(m, img)                                             # (B, 4, h, w)
    # masked image in [-1, 1] is (2x − 1)(1 − M); encode_image maps [0, 1] → [-1, 1], so pass (that + 1)/2
    zm = toolkit.encode_image(m, ((2 * img - 1) * (1 - hole) + 1) / 2)
    cond = torch.cat([mk.to(z0.dtype), zm], 1)                                    # (B, 5, h, w)
    sch = plain_ddim_plan(m, steps, strength, device=z0.device)
    S = len(sch.t)
    noise = ddim.randn(z0.shape, generator, z0.device, z0.dtype)
    x = noise if strength >= 1.0 else ddim.add_noise(z0, noise, sch.alpha_from[0]).to(z0.dtype)
    ctx = toolkit.encode_context(m, [negative_prompt, prompt], "inpainting")      # (2, 77, D)
    ctx = ctx[None].expand(B, *ctx.shape).reshape(2 * B, *ctx.shape[1:])
    cond2 = cond[:, None].expand(B, 2, *cond.shape[1:]).reshape(2 * B, *cond.shape[1:])
    weights = mk if blend else torch.ones_like(mk)
    for i in range(S):
        xin = torch.cat([x[:, None].expand(B, 2, *x.shape[1:]).reshape(2 * B, *x.shape[1:]), cond2], 1)
        eps = toolkit.run_unet(m, xin, sch.t[i], ctx).view(B, 2, *x.shape[1:])
        bg = z0 if i == S - 1 else ddim.add_noise(z0, noise, sch.alpha_to[i]).to(z0.dtype)
        x = fused_step(eps, x, bg, weights, guidance_scale, sch.alpha_from[i], sch.alpha_to[i],
                       m.prediction_type)
    return x


@torch.no_grad()
def inpaint_sequence(m, image: torch.Tensor, masks: torch.Tensor, prompts, *, steps: int = 50,
                     strength: float = 1.0, guidance_scale: float = 7.5, negative_prompt: str = "",
                     generator=None, blend: bool = True):
    """(final latents (B, 4, h, w), UNet samples): `inpaint` once per (mask, prompt), masks (B, N, h, w),
    each pass starting from the previous pass's decoded output."""
    img, z = image, None
    S = len(plain_ddim_plan(m, steps, strength))
    for i, p in enumerate(prompts):
        if z is not None:
            img = toolkit.decode_latents(m, z)
        z = inpaint(m, img, masks[:, i], p, steps=steps, strength=strength, guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt, generator=generator, blend=blend)
    return z, len(prompts) * S * 2 * image.shape[0]
