"""MultiDiffusion region-based text-to-image (Bar-Tal et al. 2023, arXiv 2302.08113, §3.2 and §4.2).

Each region i (a mask M_i at latent resolution and a prompt) takes its own guided DDIM step y_i from the
shared latent, and the steps are fused by the masks (Eq. 5 with region weights, Eq. 8):
  x_prev = Σ_i W_i y_i / Σ_i W_i,
computed as kernels.fusion does it, with x_t itself as the background: where Σ W < 1 the remainder keeps
x_t's value, so a pixel no region covers keeps its value and a single full mask is plain DDIM.
`background_prompt` (a string) adds the background region the authors use, M_bg = clamp(1 − Σ_i M_i, 0, 1);
None leaves uncovered pixels alone. Regions whose mask is empty are dropped (one check before the loop).

Bootstrapping (Eq. 9): for the first `bootstrap` fraction of steps each foreground region sees
M_i·x_t + (1 − M_i)·S_t instead of x_t, S_t a random constant-colour image, VAE-encoded and noised to the
level t with the initial noise x_T; a colour is drawn per region and step from a pool of one colour per
bootstrap step (all random draws happen before the loop). Regions then see different inputs, so a step
costs 2R UNet samples; after it the unconditional sample is shared: R + 1.
"""
import torch
import torch.nn.functional as F

from ..samplers import ddim
from . import toolkit
from .inpaint import plain_ddim_plan, text_model
from .settings import EditSettings, unexpected, with_options
from ...kernels.fusion import fuse, fused_step


@torch.no_grad()
def generate(m, masks: torch.Tensor, prompts, settings: EditSettings | None = None, *,
             background_prompt: str | None = "", bootstrap: float = 0.2, size=None, generator=None,
             output: str = "image", **options):
    """Region-based text-to-image: masks (N, h', w') in [0, 1] (resized, nearest, to the latent grid of the
    image size (H, W) = `size`, default 8× the mask size), one prompt per mask. settings: an EditSettings,
    of which generation uses steps=50, guidance_scale=7.5 and negative_prompt="" (options: those names); it
    samples with DDIM. Returns the image (3, H, W) in [0, 1], or the final scaled latents (4, h, w) with
    output="latent". Random draws, in order: x_T (1, 4, h, w), then with bootstrapping the colours and their
    indices."""
    s = with_options(settings or EditSettings(), options, ("steps", "guidance_scale", "negative_prompt"))
    unexpected("generate", options)
    if s.scheduler not in ("ddim", None):
        raise ValueError(f"regions.generate samples with DDIM (got scheduler={s.scheduler!r})")
    steps, guidance_scale, negative_prompt = s.steps, s.guidance_scale, s.negative_prompt
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    if masks.ndim != 3 or masks.shape[0] != len(prompts):
        raise ValueError(f"masks must be (N, h, w) with one prompt each, got {tuple(masks.shape)} for "
                         f"{len(prompts)} prompts")
    m = text_model(m)
    H, W = size or (8 * masks.shape[-2], 8 * masks.shape[-1])
    if H % 8 or W % 8:
        raise ValueError(f"size (height, width) must be multiples of 8, got {H}×{W}")
    h, w = H // 8, W // 8
    M = masks.to(m.device, torch.float32)
    if M.shape[-2:] != (h, w):
        M = F.interpolate(M[None], size=(h, w), mode="nearest")[0]
    prompts, fg = list(prompts), [True] * len(prompts)
    if background_prompt is not None:
        M = torch.cat([(1 - M.sum(0, keepdim=True)).clamp(0, 1), M])
        prompts, fg = [background_prompt] + prompts, [False] + fg
    keep = (M.flatten(1).amax(1) > 0).tolist()  # the one host sync, before the loop
    M = M[keep]
    prompts = [p for p, k in zip(prompts, keep) if k]
    fg = torch.tensor([f for f, k in zip(fg, keep) if k], device=m.device)
    R = len(prompts)

    sch = plain_ddim_plan(m, steps, 1.0, device=m.device)
    S = len(sch.t)
    C = 4
    xT = ddim.randn((1, C, h, w), generator, m.device, m.dtype)
    nb = min(S, int(round(bootstrap * S))) if R else 0
    if nb:
        gdev = generator.device if generator is not None else torch.device("cpu")
        colours = torch.rand((nb, 3, 1, 1), generator=generator, device=gdev).to(m.device)
        pick = torch.randint(0, nb, (nb, R), generator=generator, device=gdev).to(m.device)
        pool = toolkit.encode_image(m, colours.expand(nb, 3, H, W))              # (nb, 4, h, w)
        # where a region is background (not bootstrapped) its input is x_t itself: mask 1
        Mb = torch.where(fg[:, None, None], M, torch.ones_like(M))[:, None].to(m.dtype)  # (R, 1, h, w)
    ctx = toolkit.encode_context(m, [negative_prompt] + prompts, "regions.generate")  # (1+R, 77, D)
    pairs = torch.stack([ctx[:1].expand(R, *ctx.shape[1:]), ctx[1:]], 1).reshape(2 * R, *ctx.shape[1:])
    ones = torch.ones((R, 1, h, w), device=m.device)
    x = xT
    for i in range(S if R else 0):
        if i < nb:
            s_t = ddim.add_noise(pool[pick[i]], xT, sch.alpha_from[i]).to(m.dtype)  # (R, 4, h, w)
            xi = Mb * x + (1 - Mb) * s_t
            eps = toolkit.run_unet(m, xi.repeat_interleave(2, 0), sch.t[i], pairs).view(R, 2, C, h, w)
            # each region's guided DDIM step: fused_step with one region of weight 1 is exactly y_i
            ys = fused_step(eps, xi, xi, ones, guidance_scale, sch.alpha_from[i], sch.alpha_to[i], m.prediction_type)
            x = fuse(ys[None], x, M[None]).to(x.dtype)  # the regions' own steps, fused by kernels.fusion's rule
        else:
            eps = toolkit.unet_grid(m, x[:, None], sch.t[i], ctx[None])[:, 0]  # (1, 1+R, 4, h, w)
            x = fused_step(eps, x, x, M[None], guidance_scale, sch.alpha_from[i], sch.alpha_to[i], m.prediction_type)
    if output == "latent":
        return x[0]
    return toolkit.decode_latents(m, x)[0]


def unet_samples(steps: int, regions: int, bootstrap: float = 0.2) -> int:
    """UNet samples `generate` spends for R non-empty regions (the bootstrap steps cost 2R, the others R+1)."""
    nb = min(steps, int(round(bootstrap * steps)))
    return nb * 2 * regions + (steps - nb) * (regions + 1)
