"""FlowEdit (Kulikov et al. 2024, arXiv 2412.08629, Algorithm 1): inversion-free editing on rectified-flow
models, restricted to DiffEdit's automatic masks, for N (source → target) pairs at once.

FlowEdit builds a direct path from the source image to the edit instead of inverting to noise: starting from
z_FE = z0 at the level n_max, each step draws fresh noise ε, forms the noisy source z_src = (1 − σ) z0 + σ ε and
the target point sharing its noise, z_tar = z_FE + z_src − z0, and moves z_FE by the difference of the two
velocities: z_FE += (σ_next − σ) (v_tar(z_tar) − v_src(z_src)), both with CFG (its own scale each; the paper's
SD3 defaults: source 3.5, target 13.5, 50 steps, n_max 33, n_avg 1). The noise averages out of the difference
over the steps, so no inversion is needed and the result stays close to the source.

Here pair i's update uses its own source and target prompts and is applied only inside its mask: after each
step z_FE = fuse(z_FE + dσ Δ_i, z0, W) (kernels.fusion.fuse), so outside every mask z_FE stays z0 bit for bit.
n_max is expressed as the edit's `strength` (the run from strength takes the grid's last steps −
samplers.flow.strength_skip(steps, strength) steps: 50 steps at 0.66 is the paper's n_max = 33). The paper's
n_min phase (plain sampling of the last steps) is not implemented: its defaults (SD3 and FLUX) set n_min = 0.

On FLUX.1 (flow.distilled) there is no ∅ sample: each velocity is one sample, and on dev the two scales are the
transformer's guidance inputs (a per-sample tensor: the source scale for the z_src samples, the target scale for
the z_tar ones, in the same batch); the paper's FLUX defaults: source 1.5, target 5.5, 28 steps, n_max 24.
"""
from dataclasses import dataclass

import torch

from ..samplers import ddim, flow as flow_sampler
from . import flow
from .toolkit import encode_prompts, guided
from ...kernels.fusion import fuse

SOURCE_GUIDANCE = 3.5  # the paper's SD3 source CFG scale (its target scale, 13.5, comes from the settings)
FLUX_SOURCE_GUIDANCE = 1.5  # the paper's FLUX.1-dev source guidance (target 5.5)


def source_guidance(m) -> float:
    """The paper's source scale for m's family: FLUX 1.5 (a guidance input), SD3 3.5 (CFG)."""
    return FLUX_SOURCE_GUIDANCE if flow.distilled(m) else SOURCE_GUIDANCE


def samples_per_step(n_pairs: int, n_sources: int, target_cfg: bool, source_cfg: bool, n_avg: int = 1) -> int:
    """Transformer samples per image and step: [∅, distinct sources] at z_src and [∅, targets] at z_tar per
    noise draw (each ∅ only when its side runs CFG: flow.uses_cfg)."""
    return n_avg * (source_cfg + n_sources + target_cfg + n_pairs)


@dataclass(frozen=True)
class FlowEditSpec:
    """FlowEdit's own knobs beyond an edit's settings: the source side's guidance (None: source_guidance(m)) and
    n_avg, the paper's number of noise draws averaged per step."""
    source_guidance_scale: float | None = None
    n_avg: int = 1


@torch.no_grad()
def flowedit(m, z0: torch.Tensor, masks: torch.Tensor, pairs, *, steps: int = 50, strength: float = 0.66,
             guidance_scale: float = 13.5, negative_prompt: str = "", spec: FlowEditSpec = FlowEditSpec(),
             generator=None):
    """(final latents (B, C, h, w), transformer samples) of FlowEdit from z0 (B, C, h, w) with masks (B, N, h, w)
    and N (source, target) pairs; spec: FlowEditSpec. Random draws: one ε (B, C, h, w) per step and per n_avg
    (ddim.randn: a list of generators gives image b its own)."""
    source_guidance_scale, n_avg = spec.source_guidance_scale, spec.n_avg
    if n_avg < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg}")
    flow.check_negative_prompt(m, negative_prompt)
    if source_guidance_scale is None:
        source_guidance_scale = source_guidance(m)
    B, N = z0.shape[0], len(pairs)
    ddim.check_generators(generator, B)
    sources = list(dict.fromkeys(s for s, _ in pairs))
    src_of = torch.tensor([sources.index(s) for s, _ in pairs], device=z0.device)
    gs, gt = source_guidance_scale, guidance_scale
    cs, ct = flow.uses_cfg(m, gs), flow.uses_cfg(m, gt)
    src_prompts = ([negative_prompt] if cs else []) + sources
    tar_prompts = ([negative_prompt] if ct else []) + [t for _, t in pairs]
    ctx = encode_prompts(m, src_prompts + tar_prompts)
    Ps = len(src_prompts)
    ctx_b = ctx.map(lambda v, _: v.repeat(B, *[1] * (v.ndim - 1)))                # (B·P, ...), b-major
    # FLUX.1-dev: each sample's own guidance input, the source scale at z_src and the target scale at z_tar
    guidance = None if flow.guidance_input(m, gs) is None else torch.tensor(
        [gs] * Ps + [gt] * len(tar_prompts), dtype=torch.float32, device=z0.device).repeat(B)
    W = masks.to(z0.device, torch.float32)
    p = flow.plan(m, steps, strength, z0.shape, device=z0.device)
    z = z0
    for i in range(len(p)):
        delta = torch.zeros((B, N, *z0.shape[1:]), device=z0.device)
        for _ in range(n_avg):
            eps = ddim.randn(z0.shape, generator, z0.device, z0.dtype)
            z_src = flow_sampler.add_noise(z0, eps, p.sigma_from[i]).to(z0.dtype)
            z_tar = (z_src + (z - z0)).to(z0.dtype)  # this order: z_tar is z_src exactly while z_FE = z0
            # one transformer batch: per image [z_src × source prompts, z_tar × target prompts]
            xs = torch.cat([z_src[:, None].expand(B, Ps, *z0.shape[1:]),
                            z_tar[:, None].expand(B, len(tar_prompts), *z0.shape[1:])], 1)
            v = flow.velocity(m, xs.reshape(-1, *z0.shape[1:]), p.t[i], ctx_b, guidance)
            v = v.view(B, -1, *z0.shape[1:]).float()
            v_src, v_tar = v[:, :Ps], v[:, Ps:]
            v_src = guided(v_src[:, :1], v_src[:, 1:], gs) if cs else v_src        # (B, sources, ...)
            v_tar = guided(v_tar[:, :1], v_tar[:, 1:], gt) if ct else v_tar        # (B, N, ...)
            delta += (v_tar - v_src.index_select(1, src_of)) / n_avg
        y = z[:, None].float() + (p.sigma_to[i] - p.sigma_from[i]) * delta
        z = fuse(y, z0, W).to(z0.dtype)
    return z, B * len(p) * samples_per_step(N, len(sources), ct, cs, n_avg)
