"""DiffEdit on rectified-flow models (SD 3.x, FLUX.1): the paper's three steps (engine/edit/paper.py) with the
flow-matching sampler (engine/samplers/flow.py) in place of DDIM, and the building blocks regions.edit_many
runs N pairs with. diffedit.generate_mask / invert / edit and regions.edit_many / masks send flow models here.

Model contract (nothing else is used, so FLUX reuses it): m.kind in FLOW_KINDS, m.transformer(x, t, context,
pooled) -> velocity like x (t = σ · num_train_timesteps), m.encode_prompt(prompts) -> (context, pooled),
m.vae.encode(img) -> (mean, logvar), m.vae.decode(z), m.vae_scaling_factor, m.vae_shift_factor, m.scheduler
(a samplers.flow.FlowMatchConfig), m.device, m.dtype (m.vae_dtype optional). Latents are z0 = (mean − shift) ·
scale of the VAE posterior mean, (B, C, h, w) with C the VAE's latent channels (16).

1. mask: the DiffEdit construction on velocities. x_r = (1 − r) z0 + r ε (ε from the generator, n draws), r the
   σ where the run from encode_strength starts; the map is mean over draws of |v_Q(x_r) − v_R(x_r)| over
   channels (toolkit.noise_maps). With a shared unconditional sample CFG scales the difference by g, which every
   threshold rule divides out (as on SD), so only the prompts' own samples run: one transformer batch of n·P.
2. invert: the flow ODE dx/dσ = v run from z0 up the σ grid the decoder walks down (samplers.flow.inverse_plan),
   ∅ and no guidance by default, every level kept: (S+1, C, h, w) = [x_{σ_S}, ..., x_{σ_1}, z0].
3. edit: Euler steps with CFG on the target prompt; after each step the latent outside the mask is the
   inverted one at the same level (kernels.fusion.fuse), so the last level outside the mask is z0 bit for bit.

FLUX.1 is distilled (distilled(m)): one sample per prompt per step, never an unconditional one, so there is no
CFG batch, no negative prompt and no shared ∅ sample. dev is guidance-distilled: the guidance scale is an input
of the transformer (m.guidance_embeds; FluxPipeline's default 3.5), given to every sample of a step (the mask
pass's sources and targets, the decoding's targets); schnell (timestep-distilled, 1-4 steps) takes none. The
inversion runs ∅ with the decoding's guidance input (DEV_INVERSION_GUIDANCE when the call names none): see
invert_guidance for why. Latents are (B, 16, h, w) unpacked, h and w even (the transformer packs 2x2 itself).

Few steps (schnell; runtime/family.EDIT_DEFAULTS holds the chosen defaults). Measured on the tiny models, 128²:
the mask is one transformer pass at the noise level r of the first step from encode_strength, so steps only
place r on the grid: at encode_strength 0.5 (r on every even-step grid) the masks at 2, 4 and 8 steps equal the
28-step ones (IoU 1.0, dev and schnell); 1 step moves r to 1 (IoU 0.73 dev, 0.44 schnell); encode_strength 0.6
gives r = 0.75 at 4 steps (IoU 0.79 dev, 0.63 schnell). invert -> decode with ∅ and no mask, relative rms error
at 28/8/4/2/1 steps: schnell 0.26/0.91/1.63/2.30/4.93, dev (guidance 3.5 both ways) 0.21/0.85/1.66/2.55/5.02 (a
random model's field is far from straight: on the released schnell, distilled for straight few-step paths, it
should be much lower; the background is z0 bit for bit at any step count). Hence 4 steps, encode_strength 0.5
and strength 0.75 (3 decoding steps; 0.8 would round to a run from pure noise: strength_skip(4, 0.8) = 0).
"""
import numpy as np
import torch

from ..files.images import as_tensor, crop_to, pad_to_multiple
from ..samplers import ddim, flow
from . import toolkit
from .paper import PAPER, mask_from_map
from .settings import EditSettings, MaskSpec, unexpected, with_options
from .toolkit import Cond, as_list, encode_prompts, guided, noise_maps, prompt_table
from ...kernels.fusion import fuse

FLOW_KINDS = ("sd3", "flux")
EDIT_FIELDS = ("steps", "strength", "guidance_scale", "negative_prompt", "compat", "scheduler")
DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale for FLUX.1-dev


def is_flow(m) -> bool:
    return getattr(m, "kind", None) in FLOW_KINDS


def distilled(m) -> bool:
    """FLUX.1 (dev: guidance-distilled, schnell: timestep-distilled): one sample per prompt, no CFG batch."""
    return getattr(m, "kind", None) == "flux"


def uses_cfg(m, guidance_scale: float) -> bool:
    """Whether a step runs the unconditional sample beside the prompts' (CFG models guiding above 1)."""
    return guidance_scale > 1.0 and not distilled(m)


def guidance_input(m, guidance_scale: float):
    """The transformer's guidance argument: the scale itself on a guidance-distilled model (FLUX.1-dev), else
    None (CFG models guide by combining samples; schnell has no guidance embedding)."""
    return float(guidance_scale) if getattr(m, "guidance_embeds", False) else None


def check_negative_prompt(m, negative_prompt) -> None:
    if distilled(m) and any([negative_prompt] if isinstance(negative_prompt, str) else negative_prompt):
        raise ValueError("negative_prompt: FLUX.1 is distilled (one sample per prompt, no unconditional sample), "
                         "so a negative prompt has nothing to act on; leave it empty")


def check_supported(what: str, compat=None, scheduler="ddim", editor: str = "fused", cache_interval: int = 1) -> None:
    """One-line refusals, before any work, of what has no meaning on a flow model."""
    if cache_interval != 1:
        raise ValueError(f"{what}: cache_interval {cache_interval} (DeepCache) reuses a UNet's deep skip features; "
                         f"the flow models' transformer (SD 3.x, FLUX) has none (leave it at 1)")
    if compat is not None:
        raise ValueError(f"{what}: compat={compat!r} reproduces diffusers' SD DiffEdit pipeline; flow models "
                         f"(SD 3.x, FLUX) have none (leave compat unset)")
    if scheduler not in ("ddim", None):  # "ddim" is every call's default: on a flow model it means its own sampler
        raise ValueError(f"{what}: scheduler {scheduler!r} does not apply to flow models (SD 3.x, FLUX), which "
                         f"sample with the flow-matching Euler solver (leave scheduler unset)")
    if editor not in ("fused", "flowedit"):
        raise ValueError(f"{what}: editor {editor!r} does not apply to flow models (SD 3.x, FLUX): use fused or "
                         f"flowedit (there is no flow inpainting model)")


# ---- images, prompts, the transformer ----------------------------------------------------------------------


def patch_size(m) -> int:
    """The transformer's patch side in latent pixels (2 for SD3 and FLUX): latents must be multiples of it.
    FLUX's config says 1: its 2x2 packing happens before diffusers' own patchify."""
    if getattr(m, "kind", None) == "flux":
        return 2
    return getattr(getattr(m.transformer, "config", None), "patch_size", 2)


def latent_channels(m) -> int:
    """The latent's channel count (16): the transformer's input, which counts packed features (4 x) on FLUX."""
    c = getattr(getattr(m.transformer, "config", None), "in_channels", 16)
    return c // 4 if getattr(m, "kind", None) == "flux" else c


def prepare_image(m, image):
    """PIL / (3,H,W) / (B,3,H,W) in [0,1] -> ((B,3,H',W') fp32 padded right/bottom to multiples of 8 · patch, (H, W),
    batched). A tensor with the VAE's latent channel count (not 3) is taken as latents and passed through."""
    batched = torch.is_tensor(image) and image.ndim == 4
    x = image if batched else as_tensor(image)[None]
    if x.ndim != 4:
        raise ValueError(f"image must be (3,H,W) or (B,3,H,W) (or latents), got {tuple(x.shape)}")
    if x.shape[1] != 3:
        return x, (8 * x.shape[2], 8 * x.shape[3]), batched
    x, size = pad_to_multiple(x.float(), 8 * patch_size(m))
    return x, size, batched


def encode_image(m, x: torch.Tensor) -> torch.Tensor:
    """z0 = (μ − shift) · scale (m.dtype) of a (B,3,H,W) [0,1] batch, μ the VAE posterior mean; latents pass."""
    if x.shape[1] != 3:
        return x.to(m.device, m.dtype)
    mean, _ = m.vae.encode((2 * x - 1).to(m.device, toolkit.vae_dtype(m)))
    return ((mean.float() - m.vae_shift_factor) * m.vae_scaling_factor).to(m.dtype)


def decode_latents(m, z: torch.Tensor) -> torch.Tensor:
    """Latents (B,C,h,w) -> images (B,3,8h,8w) fp32 in [0,1] (toolkit.decode_finite's fp32 fallback applies)."""
    img = toolkit.decode_finite(m.vae, z.float() / m.vae_scaling_factor + m.vae_shift_factor)
    return (img.float() / 2 + 0.5).clamp(0, 1)


def velocity(m, x: torch.Tensor, t, c: Cond, guidance=None) -> torch.Tensor:
    """m.transformer(x, t, context, pooled), with the guidance input only when there is one (guidance_input)."""
    if guidance is None:
        return m.transformer(x, t, c.context, c.pooled)
    return m.transformer(x, t, c.context, c.pooled, guidance=guidance)


def velocity_grid(m, x: torch.Tensor, t, c: Cond, guidance=None) -> torch.Tensor:
    """m.transformer on every (latent, prompt) pair of x (B, K, C, h, w) and c (B, P, ...): one batch of B·K·P
    samples, b-major then k then p; guidance: the transformer's guidance input for all (guidance_input). Returns
    (B, K, P, C, h, w)."""
    B, K, P = x.shape[0], x.shape[1], c.shape[1]
    xs = x[:, :, None].expand(B, K, P, *x.shape[2:]).reshape(B * K * P, *x.shape[2:])
    cs = c.map(lambda v, k: v[:, None].expand(B, K, P, *v.shape[-k:]).reshape(B * K * P, *v.shape[-k:]))
    return velocity(m, xs, t, cs, guidance).view(B, K, P, *x.shape[2:])


def grid_options(m, h: int, w: int, steps: int) -> dict:
    """mu and base_sigmas of samplers.flow.sigmas for latents h×w: the dynamic shift's μ from the image's token
    count when the config shifts dynamically (FLUX, SD3.5 with use_dynamic_shifting), and FLUX's own
    linspace(1, 1/steps) base grid (its pipeline passes it; SD3's uses the scheduler's spacing)."""
    cfg = m.scheduler
    if not isinstance(cfg, flow.FlowMatchConfig):
        raise TypeError(f"a flow model needs a samplers.flow.FlowMatchConfig scheduler, got {type(cfg).__name__}")
    p = patch_size(m)
    mu = flow.calculate_mu((h // p) * (w // p), cfg) if cfg.use_dynamic_shifting else None
    base = np.linspace(1.0, 1 / steps, steps) if m.kind == "flux" else None
    return {"mu": mu, "base_sigmas": base}


def plan(m, steps: int, strength: float, shape, device=None) -> flow.FlowPlan:
    """The decoding run from `strength` for latents of `shape` (..., h, w)."""
    return flow.plan(m.scheduler, steps, strength, device=device, **grid_options(m, *shape[-2:], steps))


def inverse_plan(m, steps: int, strength: float, shape, device=None) -> flow.FlowPlan:
    return flow.inverse_plan(m.scheduler, steps, strength, device=device, **grid_options(m, *shape[-2:], steps))


# ---- text to image -------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(m, prompt, *, negative_prompt="", steps: int = 28, guidance_scale: float = 7.0, latents=None,
             size=(64, 64), generator=None, output: str = "image") -> torch.Tensor:
    """Text-to-image as StableDiffusion3Pipeline / FluxPipeline sample it: from `latents` (B, C, h, w) (or noise
    drawn from `generator` for an image of `size` (H, W)), Euler steps down the σ grid. SD3: CFG ([uncond, cond]
    in one transformer batch when guidance_scale > 1). FLUX (distilled): one sample per prompt, guidance_scale the
    transformer's guidance input on dev, unused on schnell, as FluxPipeline(latents=the packed noise).
    output "latent": the final latents; "image": (B, 3, H, W) in [0, 1]."""
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    check_negative_prompt(m, negative_prompt)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    B = len(prompts)
    if latents is None:
        f = 8 * patch_size(m)
        if size[0] % f or size[1] % f:
            raise ValueError(f"size {size[0]}x{size[1]}: the sides must be multiples of {f}")
        latents = ddim.randn((B, latent_channels(m), size[0] // 8, size[1] // 8), generator, m.device, m.dtype)
    x = latents.to(m.device, m.dtype)
    g, cfg = guidance_scale, uses_cfg(m, guidance_scale)
    negs = as_list(negative_prompt, B, "negative_prompt")
    ctx = encode_prompts(m, [p for q in zip(negs, prompts) for p in q] if cfg else prompts).grid(B, 2 if cfg else 1)
    p = plan(m, steps, 1.0, x.shape, device=x.device)
    for i in range(len(p)):
        v = velocity_grid(m, x[:, None], p.t[i], ctx, guidance_input(m, g))[:, 0]  # (B, P, C, h, w)
        v = guided(v[:, 0], v[:, 1], g) if cfg else v[:, 0]
        x = p.step(i, v, x)
    return x if output == "latent" else decode_latents(m, x)


# ---- 1. mask --------------------------------------------------------------------------------------------------


def noised_latents(m, z0: torch.Tensor, num_maps: int, encode_strength: float, steps: int, generator=None):
    """(B, n, C, h, w) latents x_r = (1 − r) z0 + r ε with n draws of ε each (ddim.randn's order: b-major), and
    the timestep of r: the first step of the run from encode_strength (r = its σ)."""
    p = plan(m, steps, encode_strength, z0.shape, device=z0.device)
    if len(p) == 0:
        raise ValueError(f"encode_strength {encode_strength} with {steps} steps selects no timestep")
    z = z0.repeat_interleave(num_maps, 0)
    noise = ddim.randn(z.shape, generator, z.device, z.dtype)
    zr = flow.add_noise(z, noise, p.sigma_from[0]).to(z.dtype)
    return zr.view(z0.shape[0], num_maps, *z0.shape[1:]), p.t[0]


@torch.no_grad()
def mask_pass(m, z0: torch.Tensor, pairs, spec: MaskSpec = MaskSpec(), *, steps: int = 50, generator=None,
              scheduler=None):
    """(maps (B, N, h, w) fp32, transformer samples): velocity-difference maps for every pair, all pairs and draws
    in one transformer batch of B·n·P samples (P distinct prompts among sources and targets; on FLUX.1-dev each
    with spec.guidance_scale as the guidance input). z0 (B, C, h, w)."""
    B, n, g = z0.shape[0], spec.num_maps, spec.guidance_scale
    ddim.check_generators(generator, B)
    prompts, src, tgt = prompt_table(pairs)
    zr, t = noised_latents(m, z0, n, spec.encode_strength, steps, generator)
    v = velocity_grid(m, zr, t, encode_prompts(m, prompts).expand(B), guidance_input(m, g))  # (B, n, P, C, h, w)
    return noise_maps(v, src, tgt, map_scale(m, g), spec.reduction), B * n * len(prompts)


def map_scale(m, guidance_scale: float) -> float:
    """The uniform factor of the maps: CFG with a shared ∅ sample scales the velocity difference by g (which the
    thresholds divide out); a distilled model's samples are the guided velocities already (1)."""
    return 1.0 if distilled(m) or guidance_scale <= 0 else guidance_scale


@torch.no_grad()
def generate_mask(m, image, source_prompt, target_prompt, mask: MaskSpec | None = None, *, steps: int = 50,
                  generator=None, compat=None, scheduler="ddim", **options) -> torch.Tensor:
    """diffedit.generate_mask on a flow model: an (h, w) mask ((B, h, w) for a batch) from the velocity
    difference (module docstring), cleaned up by paper.mask_from_map with the spec (default paper.PAPER)."""
    check_supported("generate_mask", compat, scheduler)
    spec = with_options(mask or PAPER, options)
    unexpected("generate_mask", options)
    if spec.overlap != "argmax":
        raise ValueError(f"overlap {spec.overlap!r} applies between the masks of several pairs; generate_mask "
                         "makes one (use regions.masks)")
    x, _, batched = prepare_image(m, image)
    B = x.shape[0]
    src, tgt = as_list(source_prompt, B, "source_prompt"), as_list(target_prompt, B, "target_prompt")
    ddim.check_generators(generator, B)
    zr, t = noised_latents(m, encode_image(m, x), spec.num_maps, spec.encode_strength, steps, generator)
    v = velocity_grid(m, zr, t, encode_prompts(m, [p for pair in zip(src, tgt) for p in pair]).grid(B, 2),
                      guidance_input(m, spec.guidance_scale))
    out = mask_from_map(noise_maps(v, [0], [1], 1.0, spec.reduction)[:, 0], spec)
    return out if batched else out[0]


# ---- 2. inversion ---------------------------------------------------------------------------------------------


def invert_guidance(m, decode_guidance_scale: float | None = None) -> float:
    """The inversion's guidance for a decoding at decode_guidance_scale. CFG models invert without guidance (1,
    as DiffEdit does). A guidance-distilled model (FLUX.1-dev) inverts with the decoding's own guidance input
    (DEV_GUIDANCE when none is given): the embedding changes the velocity field itself, and the ODE run back
    down only retraces the run up when both see the same field. Measured on the tiny dev model (invert -> decode
    with ∅ and no mask, 28 steps, rms error / rms z0): 0.17 at guidance 1 both ways, 0.21 at 3.5 both ways, but
    2.94 inverting at 1 and decoding at 3.5, 3.85 inverting at 0 (RF-Inversion's choice) and decoding at 3.5.
    RF-Solver-Edit / FireFlow invert at 1 with the source prompt and edit at a higher scale; RF-Inversion at 0
    with ∅ - both then steer the decoding with their own corrections, which DiffEdit's masked decoding has not."""
    if not getattr(m, "guidance_embeds", False):
        return 1.0
    return DEV_GUIDANCE if decode_guidance_scale is None else decode_guidance_scale


def invert_trajectory(m, z0: torch.Tensor, ctx: Cond, p: flow.FlowPlan, guidance_scale: float = 1.0) -> list:
    """z0 (B, C, h, w) carried up the inverse plan (samplers.flow.euler_inverse_step at each step). ctx (B, 1, ...)
    conditional only, or (B, 2, ...) = [uncond, cond] for CFG; guidance_scale: the CFG scale, or the guidance
    input of a guidance-distilled model. Returns [x after step 0, ...] (ascending σ)."""
    out, x = [], z0
    for i in range(len(p)):
        v = velocity_grid(m, x[:, None], p.t[i], ctx, guidance_input(m, guidance_scale))[:, 0]
        v = guided(v[:, 0], v[:, 1], guidance_scale) if ctx.shape[1] == 2 else v[:, 0]
        x = flow.euler_inverse_step(v, x, p.sigma_from[i], p.sigma_to[i])
        out.append(x)
    return out


def inverted_latents(m, z0, prompts: list, negative_prompt: str, guidance_scale: float, steps: int,
                     strength: float) -> torch.Tensor:
    """(B, S+1, C, h, w) = [x_{σ_S}, ..., x_{σ_1}, z0], noisiest first (the layout edit takes)."""
    B = z0.shape[0]
    if uses_cfg(m, guidance_scale):
        ctx = encode_prompts(m, [p for q in prompts for p in (negative_prompt, q)]).grid(B, 2)
    else:
        ctx = encode_prompts(m, prompts).grid(B, 1)
    ip = inverse_plan(m, steps, strength, z0.shape, device=z0.device)
    return torch.stack(invert_trajectory(m, z0, ctx, ip, guidance_scale)[::-1] + [z0], 1)


@torch.no_grad()
def invert(m, image, prompt="", *, steps: int = 50, strength: float = 0.8, guidance_scale: float | None = None,
           generator=None, compat=None, negative_prompt: str = "", scheduler="ddim") -> torch.Tensor:
    """diffedit.invert on a flow model: (S+1, C, h, w) latents in decoding order (a batch: a leading dim), S the
    number of decoding steps from `strength` (samplers.flow.strength_skip). guidance_scale None: invert_guidance
    (1, no CFG; FLUX.1-dev: DEV_GUIDANCE as its guidance input, the decoding's default: see there)."""
    check_supported("invert", compat, scheduler)
    check_negative_prompt(m, negative_prompt)
    x, _, batched = prepare_image(m, image)
    B = x.shape[0]
    ddim.check_generators(generator, B)  # the encoding draws nothing, but a wrong list is a mistake
    g = invert_guidance(m) if guidance_scale is None else guidance_scale
    inv = inverted_latents(m, encode_image(m, x), as_list(prompt, B, "prompt"), negative_prompt, g, steps, strength)
    return inv if batched else inv[0]


@torch.no_grad()
def invert_shared(m, z0: torch.Tensor, *, steps: int = 50, strength: float = 0.8, scheduler=None,
                  decode_guidance_scale: float | None = None):
    """regions' shared inversion of z0 (B, C, h, w) for a decoding at decode_guidance_scale: ∅ (the one prompt
    N pairs with N sources share), no CFG, on FLUX.1-dev the decoding's guidance input (invert_guidance).
    (B, S+1, C, h, w)."""
    g = invert_guidance(m, decode_guidance_scale)
    return inverted_latents(m, z0, [""] * z0.shape[0], "", g, steps, strength)


# ---- 3. masked decoding ---------------------------------------------------------------------------------------


def decode_prompts(m, negative_prompt, targets: list, guidance_scale: float) -> list:
    """The prompts of one image's decoding batch: [∅, target_1..N] under CFG, else [target_1..N]."""
    return ([negative_prompt] if uses_cfg(m, guidance_scale) else []) + list(targets)


def denoise_masked(m, inverted: torch.Tensor, weights: torch.Tensor, ctx: Cond, p: flow.FlowPlan,
                   guidance_scale: float) -> torch.Tensor:
    """From inverted[:, 0], per step one transformer batch at the shared x, ctx (B, P, ...) as decode_prompts
    lays it out: [uncond, target_1..N] under CFG (N+1 samples per image), else the N targets (with the guidance
    input on FLUX.1-dev); each region's Euler step, fused by the weights (B, N, h, w) with the inverted latent at
    the new level (kernels.fusion.fuse: where every weight is 0 it is that latent bit for bit)."""
    x, cfg = inverted[:, 0], uses_cfg(m, guidance_scale)
    for i in range(len(p)):
        v = velocity_grid(m, x[:, None], p.t[i], ctx, guidance_input(m, guidance_scale))[:, 0]  # (B, P, C, h, w)
        v = guided(v[:, :1], v[:, 1:], guidance_scale) if cfg else v
        y = flow.euler_step(v, x[:, None], p.sigma_from[i], p.sigma_to[i])          # (B, N, C, h, w)
        x = fuse(y, inverted[:, i + 1], weights).to(x.dtype)
    return x


def check_edit_inputs(m, inverted, mask, steps, strength):
    """(inverted (B, S+1, C, h, w), mask (B, 1, h, w) fp32, plan, batched)."""
    batched = inverted.ndim == 5
    inv = inverted if batched else inverted[None]
    mk = mask.to(inv.device, torch.float32)
    mk = (mk if mk.ndim == 3 else mk[None])[:, None]
    if mk.shape[0] != inv.shape[0] or mk.shape[-2:] != inv.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match latents {tuple(inverted.shape)}")
    p = plan(m, steps, strength, inv.shape, device=inv.device)
    if inv.shape[1] != len(p) + 1:
        raise ValueError(f"inverted has {inv.shape[1]} latents; steps={steps}, strength={strength} needs "
                         f"{len(p) + 1} (see invert)")
    return inv, mk, p, batched


@torch.no_grad()
def edit(m, inverted: torch.Tensor, mask: torch.Tensor, target_prompt, settings: EditSettings | None = None, *,
         output: str = "image", size=None, **options) -> torch.Tensor:
    """diffedit.edit on a flow model: decode from the inverted latents with CFG on the target prompt, keeping
    the inverted trajectory outside the mask (ending on z0 there, bit for bit). settings/options: steps,
    strength, guidance_scale, negative_prompt (compat and scheduler refused). output "image": (3, H, W) in [0, 1]
    cropped to `size`; "latent": the final latents (C, h, w). Batched inputs give a leading batch dim."""
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    s = with_options(settings or EditSettings(), options, EDIT_FIELDS)
    check_supported("edit", s.compat, s.scheduler)
    if options.pop("eta", 0.0) != 0.0:
        raise ValueError("eta > 0 does not apply to flow models (their decoding is the deterministic ODE)")
    options.pop("generator", None)  # the decoding draws nothing
    unexpected("edit", options)
    check_negative_prompt(m, s.negative_prompt)
    inv, mk, p, batched = check_edit_inputs(m, inverted, mask, s.steps, s.strength)
    B = inv.shape[0]
    prompts = [decode_prompts(m, s.negative_prompt, [t], s.guidance_scale)
               for t in as_list(target_prompt, B, "target_prompt")]
    ctx = encode_prompts(m, [q for row in prompts for q in row])
    z = denoise_masked(m, inv, mk, ctx.grid(B, len(prompts[0])), p, s.guidance_scale)
    if output == "latent":
        return z if batched else z[0]
    img = decode_latents(m, z)
    img = crop_to(img, size) if size is not None else img
    return img if batched else img[0]


@torch.no_grad()
def fused_edit(m, inverted: torch.Tensor, masks: torch.Tensor, targets, *, steps: int = 50, strength: float = 0.8,
               guidance_scale: float = 7.5, negative_prompt: str = "", scheduler=None):
    """regions' fused decoding on a flow model: final latents (B, C, h, w) of one trajectory for N targets."""
    B = inverted.shape[0]
    p = plan(m, steps, strength, inverted.shape, device=inverted.device)
    if inverted.shape[1] != len(p) + 1:
        raise ValueError(f"inverted has {inverted.shape[1]} latents; steps={steps}, strength={strength} needs "
                         f"{len(p) + 1}")
    check_negative_prompt(m, negative_prompt)
    ctx = encode_prompts(m, decode_prompts(m, negative_prompt, targets, guidance_scale)).expand(B)
    return denoise_masked(m, inverted, masks.to(inverted.device, torch.float32), ctx, p, guidance_scale)
