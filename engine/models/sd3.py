"""Stable Diffusion 3.x's prompt embedding (Esser et al. 2024, arXiv 2403.03206, §5.2): two CLIP encoders and
T5-XXL. A plain function over the engine's modules, as diffusers' StableDiffusion3Pipeline.encode_prompt computes it.
"""
import torch
import torch.nn.functional as F


def encode_prompt(m, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (context (B, 77 + L, D_t5), pooled (B, P1 + P2)) on m.device / m.dtype; L = m.max_sequence_length.

    context: CLIP-L's and CLIP-G's penultimate hidden states (no final LayerNorm; clip_skip None) concatenated
    along features (768 + 1280), zero-padded to T5's width (4096), then T5's last hidden state appended along the
    sequence. Without T5 (m.text_encoder_3 None) its part is zeros of the transformer's joint_attention_dim, as
    the pipeline makes it. pooled: both CLIPs' projected pooled outputs concatenated. SD 3 encodes the empty prompt
    like any other (no zeroed ∅). Each distinct prompt is encoded once."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    distinct = list(dict.fromkeys(prompts))
    h1, p1 = m.text_encoder(m.tokenizer(distinct).to(m.device), -2)
    h2, p2 = m.text_encoder_2(m.tokenizer_2(distinct).to(m.device), -2)
    clip = torch.cat([h1, h2.to(h1.dtype)], dim=-1).to(m.dtype)  # (B, 77, D1 + D2)
    if m.text_encoder_3 is None:
        width = m.transformer.config.joint_attention_dim
        t5 = torch.zeros(len(distinct), m.max_sequence_length, width, device=m.device, dtype=m.dtype)
    else:
        t5 = m.text_encoder_3(m.tokenizer_3(distinct).to(m.device)).to(m.dtype)
    context = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)
    pooled = torch.cat([p1, p2.to(p1.dtype)], dim=-1).to(m.dtype)
    index = torch.tensor([distinct.index(p) for p in prompts], device=context.device)
    return context.index_select(0, index), pooled.index_select(0, index)
