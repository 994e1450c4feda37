"""DiffEdit (Couairon et al. 2022, arXiv 2210.11427): automatic mask, DDIM encoding, masked decoding.

Default (compat=None) is the paper: the mask from |ε_Q − ε_R| of the image noised to r, normalised per image;
DDIM encoding with ∅ and no guidance, keeping every x_t; decoding that blends after each step with the
encoded latent at the *same* level, ending on the clean latent x0 outside the mask.
compat="diffusers" reproduces StableDiffusionDiffEditPipeline.generate_mask / invert / __call__ (same
defaults, the CPU generator's numbers drawn in the same order). ../.dev/readme_diffedit.md lists the
differences.

Shapes: an image is a PIL image, a (3,H,W) or a (B,3,H,W) float tensor in [0,1]; a single image gives
unbatched results ((h,w) mask, (S,4,h,w) latents, (3,H,W) image), a batch gives batched ones. Sizes that are
not multiples of 8 are replicate-padded right/bottom to the next multiple (engine.images.pad_to_multiple);
masks and latents live on the padded grid; `edit(..., size=(H, W))` crops the image back.

Random numbers: `generator` is one torch.Generator (or None) for the whole batch, drawn in diffusers'
order, or a list with one per image: image b's numbers then come from generator[b] in the order of an
unbatched run, so a batched result does not depend on the image's position in the batch (ddim.randn).

Public helpers reused by engine.regions: encode_prompts, encode_image, decode_latents, prepare_image,
run_unet, noised_latents, mask_from_map, invert_trajectory, denoise_masked.
The decode step is kernels.fusion.fused_step (N = 1), the path the many-pairs editor shares.
"""
import math

import torch
import torch.nn.functional as F

from engine import ddim
from engine.images import as_tensor, crop_to, pad_to_multiple
from kernels.fusion import fused_step

# ---- shared helpers --------------------------------------------------------------------------------------


def prepare_image(image):
    """PIL / (3,H,W) / (B,3,H,W) in [0,1] -> ((B,3,H8,W8) padded fp32 tensor, (H, W) original size, batched).
    A 4-channel (4,h,w) / (B,4,h,w) tensor is taken as scaled latents (from encode_image) and passed
    through, so a caller can VAE-encode an image once for generate_mask and invert."""
    batched = torch.is_tensor(image) and image.ndim == 4
    x = image if batched else as_tensor(image)[None]
    if x.ndim != 4 or x.shape[1] not in (3, 4):
        raise ValueError(f"image must be (3,H,W) or (B,3,H,W) (or 4-channel latents), got {tuple(x.shape)}")
    if x.shape[1] == 4:
        return x, (8 * x.shape[2], 8 * x.shape[3]), batched
    x, size = pad_to_multiple(x.float(), 8)
    return x, size, batched


def _as_list(prompt, n: int, name: str) -> list:
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{name}: {len(prompts)} prompts for {n} images")
    return prompts


def encode_prompts(m, prompts) -> torch.Tensor:
    """Text embeddings (len(prompts), 77, D) on m.device/m.dtype; each distinct prompt is encoded once."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    distinct = list(dict.fromkeys(prompts))
    emb = m.text_encoder(m.tokenizer(distinct).to(m.device)).to(m.dtype)
    index = torch.tensor([distinct.index(p) for p in prompts], device=emb.device)
    return emb.index_select(0, index)


def encode_image(m, x: torch.Tensor, generator=None, sample: bool = False,
                 repeats: int = 1) -> torch.Tensor:
    """Scaled latents sf·z of a (B,3,H,W) [0,1] image batch, VAE-encoded once. sample=False: the posterior
    mean (the engine's choice: deterministic, so the background is reproducible). sample=True: mean + σ·z
    with z drawn from `generator` as a (B·repeats, ...) batch, b-major (diffusers' latent_dist.sample on the
    image repeated `repeats` times); returns (B·repeats, 4, h, w). 4-channel input is already latents:
    returned repeated, no VAE call and no draw (as the pipeline's prepare_image_latents does)."""
    if x.shape[1] == 4:
        return x.to(m.device, m.dtype).repeat_interleave(repeats, 0)
    mean, logvar = m.vae.encode((2 * x - 1).to(m.device, m.dtype))
    if not sample:
        return m.vae_scaling_factor * mean.repeat_interleave(repeats, 0)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    z = ddim.randn((mean.shape[0] * repeats, *mean.shape[1:]), generator, mean.device, mean.dtype)
    return m.vae_scaling_factor * (mean.repeat_interleave(repeats, 0) + std.repeat_interleave(repeats, 0) * z)


def decode_latents(m, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B,4,h,w) -> images (B,3,8h,8w) fp32 in [0,1]."""
    img = m.vae.decode(z / m.vae_scaling_factor)
    return (img.float() / 2 + 0.5).clamp(0, 1)


def run_unet(m, x: torch.Tensor, t, ctx: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """m.unet over a batch, split into chunks of at most max_batch samples (None: one call)."""
    if not max_batch or x.shape[0] <= max_batch:
        return m.unet(x, t, ctx)
    return torch.cat([m.unet(x[i:i + max_batch], t, ctx[i:i + max_batch]) for i in range(0, x.shape[0], max_batch)])


def unet_grid(m, x: torch.Tensor, t, ctx: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """UNet on every (latent, prompt) pair of x (B, K, C, h, w) and ctx (B, P, 77, D): one batch of B·K·P
    samples, b-major then k then p. Returns (B, K, P, C, h, w)."""
    B, K, P = x.shape[0], x.shape[1], ctx.shape[1]
    xs = x[:, :, None].expand(B, K, P, *x.shape[2:]).reshape(B * K * P, *x.shape[2:])
    cs = ctx[:, None].expand(B, K, P, *ctx.shape[2:]).reshape(B * K * P, *ctx.shape[2:])
    return run_unet(m, xs, t, cs, max_batch).view(B, K, P, *x.shape[2:])


def noised_latents(m, x: torch.Tensor, num_maps: int, encode_strength: float, steps: int,
                   generator=None, sample: bool = False):
    """The mask pass input: (B, n, 4, h, w) latents noised to the level `encode_strength` (DDPM Eq. 4) with
    n draws each, and the timestep t (0-d device tensor). The image is VAE-encoded once."""
    sched = ddim.schedule(m.scheduler, steps, encode_strength, device=m.device)
    if len(sched.t) == 0:
        raise ValueError(f"encode_strength {encode_strength} with {steps} steps selects no timestep")
    z0 = encode_image(m, x, generator, sample=sample, repeats=num_maps)  # (B·n, 4, h, w)
    noise = ddim.randn(z0.shape, generator, z0.device, z0.dtype)
    zt = ddim.add_noise(z0, noise, sched.alpha_from[0])
    return zt.view(x.shape[0], num_maps, *zt.shape[1:]), sched.t[0]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, h, w) maps, kernel 2·⌈2σ⌉+1 (5×5 at σ = 1), edges replicated."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, device=maps.device, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.pad(maps[:, None], (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    return F.conv2d(y, k.view(1, 1, -1, 1))[:, 0]


def mask_from_map(maps: torch.Tensor, threshold: str = "fixed:0.5", smooth: float = 0.0,
                  extremes: float = 0.01) -> torch.Tensor:
    """(B, h, w) difference maps -> masks, each image on its own (never across the batch).
    smooth: Gaussian σ in latent pixels (0 = off). Rules:
      "fixed:v"  the paper: clip the map to its [extremes, 1 − extremes] quantiles, rescale to [0, 1], > v;
      "clamp:k"  diffusers' rule per image: clamp to [0, k·mean], divide by k·mean, > 0.5;
      "soft"     the rescaled map itself, in [0, 1] (no threshold)."""
    maps = maps.float()
    if smooth > 0:
        maps = gaussian_blur(maps, smooth)
    rule, _, arg = threshold.partition(":")
    flat = maps.flatten(1)
    if rule == "clamp":
        cm = flat.mean(1).mul(float(arg or 3.0)).clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
        return (maps.clamp(min=0) / cm > 0.5).float()  # clamp(0, cm)/cm > 0.5  ⇔  map/cm > 0.5
    if rule not in ("fixed", "soft"):
        raise ValueError(f"unknown threshold rule {threshold!r} (fixed:v | clamp:k | soft)")
    q = torch.tensor([extremes, 1 - extremes], device=maps.device)
    lo, hi = torch.quantile(flat, q, dim=1)[:, :, None, None] if extremes > 0 else (
        flat.amin(1)[:, None, None], flat.amax(1)[:, None, None])
    soft = (maps.clamp(lo, hi) - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    return soft if rule == "soft" else (soft > float(arg or 0.5)).float()


def guided(e_u: torch.Tensor, e_c: torch.Tensor, g: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): e_u + g (e_c − e_u)."""
    return e_u + g * (e_c - e_u)


# ---- 1. mask ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_mask(m, image, source_prompt, target_prompt, *, num_maps: int = 10, encode_strength: float = 0.5,
                  guidance_scale: float = 7.5, steps: int = 50, generator=None, compat=None,
                  reduction: str = "l1", smooth: float = 0.0, threshold: str | None = None,
                  extremes: float = 0.01, source_negative_prompt: str = "", target_negative_prompt: str = "",
                  max_batch: int | None = None) -> torch.Tensor:
    """DiffEdit step 1 (paper §3.2): where Q (target) and R (source) disagree on the noise of the image
    noised to `encode_strength`. Returns an (h, w) fp32 mask in {0, 1} ((B, h, w) for an image batch).

    Paper mode: n = num_maps draws of x_r, one UNet batch of 2n samples per image ([R, Q] per draw); the
    map is mean over draws of |Δ| averaged over channels (reduction "l1") or its L2 norm over channels
    ("l2"); then mask_from_map(smooth, extremes, threshold="fixed:0.5" by default). Guidance does not
    enter: CFG with a shared ∅ sample makes Δ = g·(ε_Q − ε_R), a uniform scale that every rule divides out,
    so the ∅ samples are skipped; likewise Δv = Δε/√ᾱ for v-prediction models.
    compat="diffusers": the pipeline's computation (VAE posterior samples, its CFG combination, the mean
    over the whole batch, rule "clamp:3"), with the 4n-sample batch deduplicated to the distinct prompts."""
    x, _, batched = prepare_image(image)
    B = x.shape[0]
    src, tgt = _as_list(source_prompt, B, "source_prompt"), _as_list(target_prompt, B, "target_prompt")
    ddim.check_generators(generator, B)
    if compat == "diffusers":
        rule, _, ratio = (threshold or "clamp:3").partition(":")
        if rule != "clamp" or reduction != "l1" or smooth:
            raise ValueError("compat='diffusers' takes threshold='clamp:k' (its mask_thresholding_ratio) only, "
                             "with reduction='l1' and no smoothing")
        maps = _diffusers_map(m, x, src, tgt, source_negative_prompt, target_negative_prompt, num_maps,
                              encode_strength, guidance_scale, steps, generator, max_batch)
        cm = maps.mean() * float(ratio or 3.0)  # over the whole batch, as the pipeline does
        mask = (torch.minimum(maps.clamp(min=0), cm) / cm > 0.5).float()
    elif compat is None:
        if reduction not in ("l1", "l2"):
            raise ValueError(f"reduction must be 'l1' or 'l2', got {reduction!r}")
        zt, t = noised_latents(m, x, num_maps, encode_strength, steps, generator)
        ctx = encode_prompts(m, [p for pair in zip(src, tgt) for p in pair]).view(B, 2, 77, -1)
        eps = unet_grid(m, zt, t, ctx, max_batch).float()  # (B, n, 2, C, h, w)
        d = eps[:, :, 1] - eps[:, :, 0]
        maps = (d.abs().mean(2) if reduction == "l1" else d.square().sum(2).sqrt()).mean(1)
        mask = mask_from_map(maps, threshold or "fixed:0.5", smooth, extremes)
    else:
        raise ValueError(f"compat must be None or 'diffusers', got {compat!r}")
    return mask if batched else mask[0]


def _diffusers_map(m, x, src, tgt, src_neg, tgt_neg, n, strength, g, steps, generator, max_batch):
    """StableDiffusionDiffEditPipeline.generate_mask's map (B, h, w). Its encode_prompt results are unpacked
    in swapped order, so its four chunks are [src, src_neg, tgt, tgt_neg] while named [neg_src, src, neg_tgt,
    tgt]: the 'guided' source is src + g·(src_neg − src), likewise the target. Reproduced as such."""
    B = x.shape[0]
    zt, t = noised_latents(m, x, n, strength, steps, generator, sample=True)
    cfg_on = g > 1.0
    per_image = [[s, sn, q, qn] if cfg_on else [s, q] for s, sn, q, qn in
                 zip(src, [src_neg] * B, tgt, [tgt_neg] * B)]
    distinct = [list(dict.fromkeys(p)) for p in per_image]
    P = max(len(d) for d in distinct)
    # Each image runs its distinct prompts only (3n samples with the default equal negatives, not 4n).
    ctx = encode_prompts(m, [p for d in distinct for p in d + [d[0]] * (P - len(d))]).view(B, P, 77, -1)
    out = unet_grid(m, zt, t, ctx, max_batch)  # (B, n, P, C, h, w)
    pick = lambda j: torch.stack([out[b, :, distinct[b].index(per_image[b][j])] for b in range(B)])  # noqa: E731
    if cfg_on:
        e_src, e_tgt = guided(pick(0), pick(1), g), guided(pick(2), pick(3), g)
    else:
        e_src, e_tgt = pick(0), pick(1)
    return (e_tgt - e_src).abs().mean([1, 2])


# ---- 2. encoding -----------------------------------------------------------------------------------------


def invert_trajectory(m, z0: torch.Tensor, ctx: torch.Tensor, sched: ddim.Schedule, guidance_scale: float = 1.0,
                      max_batch: int | None = None) -> list:
    """DDIM encoding of z0 (B,4,h,w) along an inverse schedule (DDIM Eq. 12 with the levels swapped).
    ctx: (B, 1, 77, D) conditional only, or (B, 2, 77, D) = [uncond, cond] for CFG with guidance_scale.
    Returns [x at sched.t[0], ..., x at sched.t[-1]] (ascending noise)."""
    out, x = [], z0
    for i in range(len(sched.t)):
        e = unet_grid(m, x[:, None], sched.t[i], ctx, max_batch)[:, 0]  # (B, P, C, h, w)
        e = guided(e[:, 0], e[:, 1], guidance_scale) if ctx.shape[1] == 2 else e[:, 0]
        x = ddim.ddim_inverse_step(e, x, sched.alpha_from[i], sched.alpha_to[i], m.prediction_type)
        out.append(x)
    return out


@torch.no_grad()
def invert(m, image, prompt="", *, steps: int = 50, strength: float = 0.8, guidance_scale: float | None = None,
           generator=None, compat=None, negative_prompt: str = "", max_batch: int | None = None) -> torch.Tensor:
    """DiffEdit step 2 (paper §3.2): DDIM-encode the image to the level `strength`, keeping every x_t.
    guidance_scale None means 1.0 (the paper: ∅ prompt, one UNet sample per step), 7.5 in compat mode.
    Returns the latents in decoding order, noisiest first (S = int(steps·strength) levels):
      paper:  (S+1, 4, h, w) = [x_{t_S}, ..., x_{t_1}, x0] with x0 the clean posterior-mean latent;
      compat: (S, 4, h, w)   = [x_{t_S}, ..., x_{t_1}], x0 a posterior sample (the pipeline's `latents`).
    A (B,3,H,W) image gives a leading batch dim."""
    if compat not in (None, "diffusers"):
        raise ValueError(f"compat must be None or 'diffusers', got {compat!r}")
    x, _, batched = prepare_image(image)
    B = x.shape[0]
    ddim.check_generators(generator, B)
    g = guidance_scale if guidance_scale is not None else (7.5 if compat else 1.0)
    z0 = encode_image(m, x, generator, sample=compat == "diffusers")
    prompts = _as_list(prompt, B, "prompt")
    if g > 1.0:
        ctx = encode_prompts(m, [p for q in prompts for p in (negative_prompt, q)]).view(B, 2, 77, -1)
    else:
        ctx = encode_prompts(m, prompts).view(B, 1, 77, -1)
    sched = ddim.inverse_schedule(m.scheduler, steps, strength, device=z0.device)
    xs = invert_trajectory(m, z0, ctx, sched, g, max_batch)[::-1]
    if compat is None:
        xs.append(z0)
    inv = torch.stack(xs, 1)
    return inv if batched else inv[0]


# ---- 3. masked decoding ----------------------------------------------------------------------------------


def denoise_masked(m, inverted: torch.Tensor, weights: torch.Tensor, ctx: torch.Tensor, sched: ddim.Schedule,
                   guidance_scale: float, max_batch: int | None = None) -> torch.Tensor:
    """The paper's decoding loop: from inverted[:, 0], after each step to level t_{i+1} fuse with the
    encoded latent at that same level, inverted[:, i+1] (the last is x0), via kernels.fusion.fused_step.
    inverted (B, S+1, 4, h, w); weights (B, N, h, w); ctx (B, 1+N, 77, D) = [uncond, targets...]."""
    x = inverted[:, 0]
    for i in range(len(sched.t)):
        c = ctx if guidance_scale > 1.0 else ctx[:, 1:]
        eps = unet_grid(m, x[:, None], sched.t[i], c, max_batch)[:, 0]  # (B, P, C, h, w)
        if guidance_scale <= 1.0:  # no ∅ sample: e_u := e_t makes the guided ε exactly e_t
            eps, g = torch.cat([eps[:, :1], eps], 1), 1.0
        else:
            g = guidance_scale
        x = fused_step(eps, x, inverted[:, i + 1], weights, g, sched.alpha_from[i], sched.alpha_to[i],
                       m.prediction_type)
    return x


@torch.no_grad()
def edit(m, inverted: torch.Tensor, mask: torch.Tensor, target_prompt, *, steps: int = 50, strength: float = 0.8,
         guidance_scale: float = 7.5, negative_prompt: str = "", compat=None, output: str = "image",
         eta: float = 0.0, generator=None, size=None, max_batch: int | None = None) -> torch.Tensor:
    """DiffEdit step 3 (paper §3.2): decode from the encoded latent with the target prompt, keeping the
    encoded trajectory outside the mask. `inverted` and `mask` as returned by invert / generate_mask with
    the same steps/strength (unbatched or batched alike). Paper mode: after the step to level t the
    latent is M·y_t + (1−M)·x_t, x_t the encoded latent at level t, so it ends on x0 outside the mask; a soft
    mask in [0, 1] is allowed. compat="diffusers": the pipeline's loop (mask binarised at 0.5, blend with the
    encoded latent one level noisier, eta/generator passed to the DDIM step).
    output "image": (3, H, W) fp32 in [0, 1], cropped to `size` (H, W) when given; "latent": the final
    scaled latents (4, h, w). Batched inputs give a leading batch dim."""
    if compat not in (None, "diffusers"):
        raise ValueError(f"compat must be None or 'diffusers', got {compat!r}")
    batched = inverted.ndim == 5
    inv = inverted if batched else inverted[None]
    B = inv.shape[0]
    ddim.check_generators(generator, B)
    mk = mask.to(inv.device, torch.float32)
    mk = (mk if mk.ndim == 3 else mk[None])[:, None]  # (B, 1, h, w)
    if mk.shape[0] != B or mk.shape[-2:] != inv.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match latents {tuple(inverted.shape)}")
    sched = ddim.schedule(m.scheduler, steps, strength, device=inv.device)
    S = len(sched.t)
    expected = S if compat else S + 1
    if inv.shape[1] != expected:
        raise ValueError(f"inverted has {inv.shape[1]} latents; steps={steps}, strength={strength} needs "
                         f"{expected} ({'compat' if compat else 'paper'} layout, see invert)")
    ctx = encode_prompts(m, [p for q in _as_list(target_prompt, B, "target_prompt") for p in (negative_prompt, q)])
    ctx = ctx.view(B, 2, 77, -1)
    if compat is None:
        if eta != 0.0:
            raise ValueError("eta > 0 is only available with compat='diffusers'")
        z = denoise_masked(m, inv, mk, ctx, sched, guidance_scale, max_batch)
    else:
        z = _diffusers_denoise(m, inv, (mk >= 0.5).to(inv.dtype), ctx, sched, guidance_scale, eta, generator,
                               max_batch)
    if output == "latent":
        return z if batched else z[0]
    if output != "image":
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    img = decode_latents(m, z)
    if size is not None:
        img = crop_to(img, size)
    return img if batched else img[0]


def _diffusers_denoise(m, inv, mask, ctx, sched, g, eta, generator, max_batch):
    """StableDiffusionDiffEditPipeline.__call__'s loop: step from t_i, then blend with inv[:, i], the
    encoded latent at t_i (one level noisier than the new sample); the last blend uses the latent at t_1."""
    x = inv[:, 0].clone()
    for i in range(len(sched.t)):
        c = ctx if g > 1.0 else ctx[:, 1:]
        e = unet_grid(m, x[:, None], sched.t[i], c, max_batch)[:, 0]
        e = guided(e[:, 0], e[:, 1], g) if g > 1.0 else e[:, 0]
        x = ddim.ddim_step(e, x, sched.alpha_from[i], sched.alpha_to[i], m.prediction_type, eta=eta,
                           generator=generator)
        x = x * mask + inv[:, i] * (1 - mask)
    return x
