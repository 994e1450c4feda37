"""SD-XL's conditioning (Podell et al. 2023, arXiv 2307.01952, §2.1-2.2): the prompt embedding from two text
encoders and the size/crop micro-conditioning ids. Plain functions over the engine's modules.
"""
import torch


def encode_prompt(m, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (context (B, 77, D1 + D2), pooled (B, P)) on m.device / m.dtype.

    context concatenates both encoders' penultimate hidden states (no final LayerNorm: CLIP ViT-L's 768 and
    OpenCLIP bigG's 1280 for the released model); pooled is bigG's projected end-of-text state. Each encoder
    reads its own tokenizer's ids (SD-XL pads with <|endoftext|> for the first, "!" for the second). With
    m.force_zeros_for_empty_prompt (SD-XL's default), the empty prompt ∅ is all zeros, context and pooled, as
    diffusers' StableDiffusionXLPipeline makes its unconditional embedding; other prompts are encoded once each."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    zero = {""} if m.force_zeros_for_empty_prompt else set()
    distinct = [p for p in dict.fromkeys(prompts) if p not in zero]
    d1, d2 = m.text_encoder.config.hidden_size, m.text_encoder_2.config.hidden_size
    ctx = torch.zeros(len(distinct) + 1, 77, d1 + d2, device=m.device, dtype=m.dtype)  # row 0: ∅
    pooled = torch.zeros(len(distinct) + 1, m.text_encoder_2.config.projection_dim, device=m.device, dtype=m.dtype)
    if distinct:
        h1 = m.text_encoder.hidden_state(m.tokenizer(distinct).to(m.device), -2)
        h2, pool = m.text_encoder_2(m.tokenizer_2(distinct).to(m.device), -2)
        ctx[1:] = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        pooled[1:] = pool
    index = torch.tensor([distinct.index(p) + 1 if p not in zero else 0 for p in prompts], device=ctx.device)
    return ctx.index_select(0, index), pooled.index_select(0, index)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
             target_size: tuple[int, int] | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """The UNet's time_ids (1, 6): original image size (h, w), crop top-left (top, left), target size (h, w)
    (diffusers' _get_add_time_ids). SD-XL is told the image was not cropped and is shown at its real size:
    original = target = the image's pixel size."""
    target = original_size if target_size is None else target_size
    return torch.tensor([[*original_size, *crop_top_left, *target]], device=device, dtype=dtype)


class ResolutionWarning(UserWarning):
    """An SD-XL edit below the model's training resolution: allowed, stated."""


def native_size(m) -> int:
    """The side SD-XL was trained at: 1024, or 512 for SDXL-Turbo (recognised by its trailing timestep spacing)."""
    return 512 if getattr(getattr(m, "scheduler", None), "timestep_spacing", None) == "trailing" else 1024


def resolution_note(m, size: tuple[int, int]) -> str | None:
    """A note when an SD-XL model edits an image whose shorter side is below 3/4 of its training side (768 for
    SD-XL): the edit runs at the image's own size (time_ids say so), but SD-XL's results degrade well below
    its training size. None for other families and for images at or above it."""
    if not str(getattr(m, "kind", "")).startswith("sdxl"):
        return None
    native = native_size(m)
    if min(size) >= 0.75 * native:
        return None
    return (f"SD-XL at {size[1]}x{size[0]}: the model was trained at {native}x{native} and edits below "
            f"~{int(0.75 * native)} px lose detail; the edit runs at the image's size (resize the image up for "
            f"SD-XL's native quality)")
