"""The toolkit every algorithm shares (engine.diffedit, engine.compat, engine.regions, engine.inpaint,
engine.multidiffusion): image preparation, prompt and image encoding, decoding with the fp32 fallback, UNet
running, guidance, the one noise-difference map and the mask clean-up (blur, extremes, closing).

Model contract: `m` is weights.Model or anything with the same attributes (tokenizer, text_encoder, unet,
vae, vae_scaling_factor, scheduler, prediction_type, device, dtype; vae_dtype, schedulers and encode_prompt optional). The UNet runs in
m.dtype, the VAE in m.vae_dtype when set (an fp32 VAE beside an fp16 UNet); latents cross over in the
UNet's dtype. Batch splitting is not done here: m.unet is called with the whole batch, and the engine's
runner (engine.runtime.runners.UNetRunner) splits it where memory requires.
"""
import copy
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..files.images import as_tensor, pad_to_multiple
from ..models import sdxl
from ..samplers import ddim, dpm
from ..samplers.plan import Plan
from ...kernels import noise_diff
from ...weights import scheduler as wsched


class NonFiniteError(RuntimeError):
    """A decode that is not finite even in fp32 (the latents themselves overflowed): never a black image."""


# ---- images and prompts ----------------------------------------------------------------------------------


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


def as_list(prompt, n: int, name: str) -> list:
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{name}: {len(prompts)} prompts for {n} images")
    return prompts


@dataclass(frozen=True)
class Cond:
    """Prompt conditioning as the UNet takes it: context (..., 77, D) and, for SD-XL, the pooled text embedding
    (..., P) beside it (None for SD 1.x/2.x). The leading dims (prompts, or (images, prompts)) are the same for
    both; indexing, `grid` and `expand` act on them only, so the loops slice a Cond as they slice a tensor."""
    context: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.context.shape

    def map(self, fn) -> "Cond":
        """fn(tensor, number of trailing feature dims) applied to context (2) and pooled (1)."""
        return Cond(fn(self.context, 2), None if self.pooled is None else fn(self.pooled, 1))

    def __getitem__(self, index) -> "Cond":
        return self.map(lambda v, _: v[index])

    def grid(self, B: int, P: int) -> "Cond":
        """(B·P, ...) -> (B, P, ...): prompts listed image by image."""
        return self.map(lambda v, k: v.view(B, P, *v.shape[-k:]))

    def expand(self, B: int) -> "Cond":
        """(P, ...) -> (B, P, ...): the same prompts for every image (a broadcast, no copy)."""
        return self.map(lambda v, _: v[None].expand(B, *v.shape))


def encode_prompts(m, prompts) -> Cond:
    """Cond (len(prompts), ...) on m.device/m.dtype through m.encode_prompt (context, and SD-XL's pooled
    embedding); each distinct prompt is encoded once. A stand-in model without encode_prompt: its
    text_encoder(tokenizer(prompts)), no pooled embedding."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    distinct = list(dict.fromkeys(prompts))
    if hasattr(m, "encode_prompt"):
        ctx, pooled = m.encode_prompt(distinct)
    else:
        ctx, pooled = m.text_encoder(m.tokenizer(distinct).to(m.device)), None
    index = torch.tensor([distinct.index(p) for p in prompts], device=ctx.device)
    return Cond(ctx.to(m.dtype).index_select(0, index),
                None if pooled is None else pooled.to(m.dtype).index_select(0, index))


def encode_context(m, prompts, what: str) -> torch.Tensor:
    """The context alone (len(prompts), 77, D), for the algorithms that run SD 1.x/2.x only (`what` names the
    caller in the error an SD-XL model gets)."""
    c = encode_prompts(m, prompts)
    if c.pooled is not None:
        raise ValueError(f"{what} does not support SD-XL (model kind {getattr(m, 'kind', 'sdxl')!r}) yet; "
                         f"diffedit and regions.edit_many (editor='fused') do")
    return c.context


def vae_dtype(m) -> torch.dtype:
    return getattr(m, "vae_dtype", None) or m.dtype


def encode_image(m, x: torch.Tensor, generator=None, sample: bool = False, repeats: int = 1) -> torch.Tensor:
    """Scaled latents sf·z (in m.dtype) of a (B,3,H,W) [0,1] image batch, VAE-encoded once. sample=False: the
    posterior mean (the engine's choice: deterministic, so the background is reproducible). sample=True:
    mean + σ·z with z drawn from `generator` as a (B·repeats, ...) batch, b-major (diffusers' latent_dist.sample
    on the image repeated `repeats` times); returns (B·repeats, 4, h, w). 4-channel input is already latents:
    returned repeated, no VAE call and no draw (as the pipeline's prepare_image_latents does)."""
    if x.shape[1] == 4:
        return x.to(m.device, m.dtype).repeat_interleave(repeats, 0)
    mean, logvar = m.vae.encode((2 * x - 1).to(m.device, vae_dtype(m)))
    mean, logvar = mean.to(m.dtype), logvar.to(m.dtype)
    if not sample:
        return m.vae_scaling_factor * mean.repeat_interleave(repeats, 0)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    z = ddim.randn((mean.shape[0] * repeats, *mean.shape[1:]), generator, mean.device, mean.dtype)
    return m.vae_scaling_factor * (mean.repeat_interleave(repeats, 0) + std.repeat_interleave(repeats, 0) * z)


# ---- decoding: low precision made safe -------------------------------------------------------------------

_FP32_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FALLBACKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _param_dtype(module):
    """The dtype of a module's weights (None for a stand-in without parameters)."""
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return None if p is None else p.dtype


def decode_finite(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode(z) (z unscaled), redone by an fp32 copy of the VAE when a low-precision decode is not finite
    (the SD VAE overflows in fp16). A result that is still not finite raises NonFiniteError. One host check
    per decode, outside every sampling loop, and only where low precision is involved (an fp32 VAE decoding
    fp32 latents is not checked: no host sync); the fp32 copy is made on first need and kept."""
    dtype = _param_dtype(vae) or z.dtype
    out = vae.decode(z.to(dtype))
    if (dtype == torch.float32 and z.dtype == torch.float32) or bool(torch.isfinite(out).all()):
        return out
    if dtype != torch.float32:
        fp32 = _FP32_COPIES.get(vae)
        if fp32 is None:
            fp32 = copy.deepcopy(vae).float()
            _FP32_COPIES[vae] = fp32
        _FALLBACKS[vae] = _FALLBACKS.get(vae, 0) + 1
        out = fp32.decode(z.float())
        if bool(torch.isfinite(out).all()):
            return out
    raise NonFiniteError(f"the VAE decode is not finite (in {'fp32 after the ' + str(dtype) + ' decode' if dtype != torch.float32 else 'fp32'}): "
                         f"the latents overflowed; try --dtype float32 or --vae-dtype float32")


def fallback_count(vae) -> int:
    """How many decodes of `vae` were redone in fp32 so far (engine.runtime's Editor reports it per edit)."""
    try:
        return _FALLBACKS.get(vae, 0)
    except TypeError:
        return 0


def decode_latents(m, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B,4,h,w) -> images (B,3,8h,8w) fp32 in [0,1]; never a non-finite image."""
    img = decode_finite(m.vae, z / m.vae_scaling_factor)
    return (img.float() / 2 + 0.5).clamp(0, 1)


# ---- samplers -------------------------------------------------------------------------------------------

SCHEDULERS = ("ddim", "dpm++2m")


def schedulers(m, scheduler: str | None = "ddim"):
    """weights.scheduler.Schedulers of m run as `scheduler`: "ddim" | "dpm++2m" (built from the checkpoint's
    scheduler_config.json keys when it is of the other family, as diffusers' from_config), or None for the
    checkpoint's own. A model without `schedulers` (a stand-in with only m.scheduler) has that config for both
    directions."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS} (or None: the checkpoint's own), got {scheduler!r}")
    s = getattr(m, "schedulers", None)
    if s is None:
        cfg = m.scheduler
        fam = "dpm++2m" if isinstance(cfg, dpm.DPMSolverConfig) else "ddim"
        name = wsched.CLASSES[fam][0]
        s = wsched.Schedulers(fam, cfg, cfg, {"_class_name": name, **{k: getattr(cfg, k) for k in
                                                                     cfg.__dataclass_fields__}})
    return wsched.select(s, scheduler)


def family(s):
    """The engine module (engine.ddim or engine.dpm) that runs Schedulers `s`."""
    return dpm if s.family == "dpm++2m" else ddim


def plan(m, scheduler, steps: int, strength: float = 1.0, device=None) -> Plan:
    """The denoising run (samplers.ddim.Plan | samplers.dpm.Plan) of m's sampling scheduler run as `scheduler`."""
    s = schedulers(m, scheduler)
    return family(s).plan(s.scheduler, steps, strength, device=device)


def inverse_plan(m, scheduler, steps: int, strength: float = 1.0, device=None) -> Plan:
    """The inversion run of m's inverse scheduler (inverse_scheduler/ when the folder has one) as `scheduler`."""
    s = schedulers(m, scheduler)
    return family(s).inverse_plan(s.inverse_scheduler, steps, strength, device=device)


def is_plain_ddim(p: Plan) -> bool:
    """A DDIM plan without x̂0 clipping or thresholding: what kernels.fusion.fused_step computes (the fast path)."""
    return isinstance(p, ddim.Plan) and p.clip_sample_range is None and p.thresholding is None


# ---- the UNet ----------------------------------------------------------------------------------------------


_TIME_IDS: dict = {}


def grid_time_ids(x: torch.Tensor) -> torch.Tensor:
    """SD-XL's time_ids (1, 6) for latents x (..., h, w): original = target = (8h, 8w), crop (0, 0). The size
    is the image's as the UNet sees it (sides padded to multiples of 8, engine.images.pad_to_multiple): the
    real size for every SD-XL training size, at most 7 pixels more otherwise, and the same for the mask pass,
    the inversion and the decoding. Made once per size and device (no host copy inside the loops)."""
    key = (x.shape[-2], x.shape[-1], x.device, torch.is_inference_mode_enabled())
    if key not in _TIME_IDS:
        _TIME_IDS[key] = sdxl.time_ids((8 * x.shape[-2], 8 * x.shape[-1]), device=x.device)
    return _TIME_IDS[key]


def run_unet(m, x: torch.Tensor, t, c, unet=None) -> torch.Tensor:
    """m.unet over a batch (the engine's runner splits it to fit memory). c: Cond with x's batch (or a bare
    context tensor); SD 1.x/2.x call m.unet(x, t, context), SD-XL adds the pooled embedding and the
    micro-conditioning of x's size (grid_time_ids). unet: a callable with m.unet's signature to run instead
    (a DeepCache step, engine.edit.deepcache.StepCache.at)."""
    unet = m.unet if unet is None else unet
    if torch.is_tensor(c):
        return unet(x, t, c)
    if c.pooled is None:
        return unet(x, t, c.context)
    return unet(x, t, c.context, text_embeds=c.pooled, time_ids=grid_time_ids(x))


def unet_grid(m, x: torch.Tensor, t, c: Cond, unet=None) -> torch.Tensor:
    """UNet on every (latent, prompt) pair of x (B, K, C, h, w) and c (B, P, ...): one batch of B·K·P
    samples, b-major then k then p. Returns (B, K, P, C, h, w). unet: as run_unet's."""
    c = Cond(c) if torch.is_tensor(c) else c
    B, K, P = x.shape[0], x.shape[1], c.shape[1]
    xs = x[:, :, None].expand(B, K, P, *x.shape[2:]).reshape(B * K * P, *x.shape[2:])
    cs = c.map(lambda v, k: v[:, None].expand(B, K, P, *v.shape[-k:]).reshape(B * K * P, *v.shape[-k:]))
    return run_unet(m, xs, t, cs, unet).view(B, K, P, *x.shape[2:])


def guided(e_u: torch.Tensor, e_c: torch.Tensor, g: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): e_u + g (e_c − e_u)."""
    return e_u + g * (e_c - e_u)


def noised_latents(m, x: torch.Tensor, num_maps: int, encode_strength: float, steps: int,
                   generator=None, sample: bool = False, scheduler: str | None = "ddim"):
    """The mask pass input: (B, n, 4, h, w) latents noised to the level `encode_strength` (DDPM Eq. 4) with
    n draws each, and the timestep t (0-d device tensor): the first timestep of the `scheduler` run from
    that strength, and its level. The image is VAE-encoded once."""
    sched = plan(m, scheduler, steps, encode_strength, device=m.device)
    if len(sched.t) == 0:
        raise ValueError(f"encode_strength {encode_strength} with {steps} steps selects no timestep")
    z0 = encode_image(m, x, generator, sample=sample, repeats=num_maps)  # (B·n, 4, h, w)
    noise = ddim.randn(z0.shape, generator, z0.device, z0.dtype)
    zt = ddim.add_noise(z0, noise, sched.alpha_from[0]).to(z0.dtype)
    return zt.view(x.shape[0], num_maps, *zt.shape[1:]), sched.t[0]


# ---- maps ------------------------------------------------------------------------------------------------


def prompt_table(pairs):
    """Distinct prompts of the mask pass and each pair's source/target index into them. ∅ is listed only
    when a pair uses it (an empty source): with CFG sharing one ∅ sample, e_tgt − e_src = g·(ε_tgt − ε_src)
    exactly, so ∅ (and the negative prompt) cancels from every map."""
    prompts = list(dict.fromkeys([s for s, _ in pairs] + [t for _, t in pairs]))
    return prompts, [prompts.index(s) for s, _ in pairs], [prompts.index(t) for _, t in pairs]


def noise_maps(eps: torch.Tensor, src_idx, tgt_idx, guidance: float = 1.0, reduction: str = "l1") -> torch.Tensor:
    """The one noise-difference map (DiffEdit §3.2, kernels.noise_diff): eps (B, n, P, C, h, w) of the mask
    pass -> (B, N, h, w) fp32, mean over the n draws of |Δ| averaged over channels ("l1") or its L2 norm
    ("l2"), Δ the guided target minus the guided source prediction. With a shared ∅ sample Δ = g·(ε_tgt −
    ε_src): guidance scales every map uniformly, which every threshold rule divides out."""
    index = lambda v: torch.tensor(v, dtype=torch.long, device=eps.device)  # noqa: E731
    # uncond index: any serves (∅ cancels); the first source keeps it exact for "" -> q
    return noise_diff.noise_maps(eps, src_idx[0], index(src_idx), index(tgt_idx), guidance, reduction=reduction)


def gaussian_blur(maps: torch.Tensor, sigma: float, size: int | None = None) -> torch.Tensor:
    """The one Gaussian blur: separable, of (..., h, w) maps, kernel `size` (default 2·⌈2σ⌉+1: 5×5 at σ = 1,
    the fast.ai variant's), edges replicated (no dark border)."""
    k = size or 2 * max(1, math.ceil(2 * sigma)) + 1
    if k % 2 != 1 or sigma <= 0:
        raise ValueError(f"blur wants sigma > 0 and an odd kernel size, got sigma={sigma}, size={size}")
    r = torch.arange(k, device=maps.device, dtype=torch.float32) - k // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:]).float()
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
    x = F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))
    return x.reshape(shape).to(maps.dtype)


def _pair(v, default_second):
    return (v[0], v[1]) if isinstance(v, (tuple, list)) else (v, default_second)


def smooth_maps(maps: torch.Tensor, smooth) -> torch.Tensor:
    """toolkit.gaussian_blur of (..., h, w) maps: smooth = sigma or (sigma, kernel size)."""
    sigma, k = _pair(smooth, None)
    return gaussian_blur(maps, sigma, k)


def close_masks(masks: torch.Tensor, close) -> torch.Tensor:
    """Morphological closing of binary (..., h, w) masks: close = kernel size or (size, iterations); dilate
    `iterations` times then erode as many (scipy's binary_closing order). It runs on a canvas padded with
    background by the reach of the dilations, i.e. the closing of the mask in an unbounded plane cropped
    back: a region touching the border is not eaten from it, a background gap open to the border stays."""
    k, iters = _pair(close, 1)
    assert k % 2 == 1 and iters >= 1, f"close wants an odd kernel size and iterations >= 1, got {close}"
    r = k // 2 * iters
    shape = masks.shape
    x = F.pad(masks.reshape(-1, 1, *shape[-2:]).float(), (r, r, r, r))
    for _ in range(iters):
        x = F.max_pool2d(x, k, stride=1, padding=k // 2)   # max_pool pads with -inf: outside is background
    for _ in range(iters):
        x = -F.max_pool2d(-x, k, stride=1, padding=k // 2)  # erosion; its edge effects stay in the pad
    return x[..., r:r + shape[-2], r:r + shape[-1]].reshape(shape).to(masks.dtype)


def clip_extremes(maps: torch.Tensor, q: float) -> torch.Tensor:
    """The paper's removal of extremes: each (h, w) map of (..., h, w) clipped to its [q, 1 − q] quantiles."""
    flat = maps.flatten(-2).float()
    lo, hi = torch.quantile(flat, torch.tensor([q, 1 - q], device=maps.device), dim=-1)[..., None, None]
    return torch.minimum(torch.maximum(maps.float(), lo), hi).to(maps.dtype)


def keep_pixels(decoded: torch.Tensor, image: torch.Tensor, weights: torch.Tensor, margin: int = 8) -> torch.Tensor:
    """The input's own pixels wherever no mask reaches. Outside the masks the final latents are the encoded
    image's bit for bit, but the VAE decoder's GroupNorm statistics are taken over the whole image, so a large
    edit shifts the decoded colours of the untouched background too (a few levels on SD, ~20 on the small
    shapes model). The union of the masks (B, N, h, w), upsampled to (H, W), dilated by `margin` pixels and
    feathered over `margin` more, blends the decoded image (B, 3, H, W) into the input: beyond that the output
    is the input exactly."""
    k = 2 * margin + 1
    u = F.interpolate(weights.amax(1, keepdim=True).to(decoded.dtype), size=decoded.shape[-2:], mode="nearest")
    u = F.avg_pool2d(F.max_pool2d(u, k, stride=1, padding=margin), k, stride=1, padding=margin,
                     count_include_pad=False)
    return torch.where(u > 0, u * decoded + (1 - u) * image.to(decoded.dtype), image.to(decoded.dtype))
