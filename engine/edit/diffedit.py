"""DiffEdit's public functions (the contract in docs/design.md): generate_mask, invert, edit.

compat=None runs the paper's algorithm (engine/edit/paper.py); compat="diffusers" runs the reproduction of
diffusers' StableDiffusionDiffEditPipeline (engine/edit/compat.py). The two are separate modules, each
reading as its own algorithm; this front only chooses between them, so neither imports the other's switch
(compat reuses pieces of paper, never the reverse). Rectified-flow models (m.kind "sd3" / "flux") go to
engine/edit/flow.py, the same three steps on the flow-matching sampler. The paper's helpers are re-exported
under their names (PAPER, mask_from_map, invert_trajectory, denoise_masked, encode_image, ...) for the callers
that compose them.
"""
import torch

from . import compat as diffusers_compat
from . import flow, paper
from .paper import (EDIT_FIELDS, PAPER, check_edit_inputs, decode_latents, denoise_masked,  # noqa: F401
                    encode_image, encode_prompts, invert_trajectory, inverted_latents, mask_from_map,
                    noised_latents)
from .settings import EditSettings, MaskSpec, with_options

COMPATS = (None, "diffusers")


def _check_compat(compat) -> bool:
    if compat not in COMPATS:
        raise ValueError(f"compat must be None or 'diffusers', got {compat!r}")
    return compat == "diffusers"


def generate_mask(m, image, source_prompt, target_prompt, mask: MaskSpec | None = None, *, steps: int = 50,
                  generator=None, compat=None, scheduler: str | None = "ddim", **options) -> torch.Tensor:
    """DiffEdit step 1: an (h, w) mask in {0, 1} ((B, h, w) for an image batch); paper.generate_mask.
    compat="diffusers": compat.generate_mask (default spec MaskSpec(): threshold "clamp:3"; source/
    target_negative_prompt go there); its mask pass is DDIM whatever `scheduler` says, as the pipeline's.
    A flow model: flow.generate_mask (velocity differences; compat and dpm++2m refused)."""
    if flow.is_flow(m):
        return flow.generate_mask(m, image, source_prompt, target_prompt, mask, steps=steps, generator=generator,
                                  compat=compat, scheduler=scheduler, **options)
    if _check_compat(compat):
        return diffusers_compat.generate_mask(m, image, source_prompt, target_prompt, mask, steps=steps,
                                              generator=generator, **options)
    return paper.generate_mask(m, image, source_prompt, target_prompt, mask, steps=steps, generator=generator,
                               scheduler=scheduler, **options)


def invert(m, image, prompt="", *, steps: int = 50, strength: float = 0.8, guidance_scale: float | None = None,
           generator=None, compat=None, negative_prompt: str = "", scheduler: str | None = "ddim") -> torch.Tensor:
    """DiffEdit step 2: the latents in decoding order, noisiest first, (S+1, 4, h, w) = [x_{t_S}, ..., x_{t_1},
    x0] in either mode; x0 is the clean posterior-mean latent (paper.invert, guidance_scale None = 1.0) or the
    posterior sample the pipeline inverts from (compat.invert, guidance_scale None = 7.5). A flow model:
    flow.invert (the flow ODE up the decoder's σ grid), (S+1, C, h, w)."""
    if flow.is_flow(m):
        return flow.invert(m, image, prompt, steps=steps, strength=strength, guidance_scale=guidance_scale,
                           generator=generator, compat=compat, negative_prompt=negative_prompt, scheduler=scheduler)
    if _check_compat(compat):
        return diffusers_compat.invert(m, image, prompt, steps=steps, strength=strength, generator=generator,
                                       guidance_scale=7.5 if guidance_scale is None else guidance_scale,
                                       negative_prompt=negative_prompt, scheduler=scheduler)
    return paper.invert(m, image, prompt, steps=steps, strength=strength, guidance_scale=guidance_scale,
                        generator=generator, negative_prompt=negative_prompt, scheduler=scheduler)


def edit(m, inverted: torch.Tensor, mask: torch.Tensor, target_prompt, settings: EditSettings | None = None, *,
         output: str = "image", size=None, **options) -> torch.Tensor:
    """DiffEdit step 3: decode with the target prompt keeping the encoded trajectory outside the mask;
    paper.edit, or compat.edit when the settings (or options) say compat="diffusers" (eta and generator go
    there). output "image": (3, H, W) in [0, 1], cropped to `size`; "latent": the final scaled latents."""
    s = with_options(settings or EditSettings(), options, EDIT_FIELDS)
    if flow.is_flow(m):  # flow.edit: Euler steps with CFG, the inverted latent outside the mask
        return flow.edit(m, inverted, mask, target_prompt, s, output=output, size=size, **options)
    impl = diffusers_compat if _check_compat(s.compat) else paper
    return impl.edit(m, inverted, mask, target_prompt, s, output=output, size=size, **options)
