"""FLUX.1's prompt embedding: T5-XXL's last hidden state as the context (the only sequence the transformer attends
to) and CLIP-L's pooled output as the global conditioning vector. A plain function over the engine's modules, as
diffusers' FluxPipeline.encode_prompt computes it.
"""
import torch


def encode_prompt(m, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (context (B, L, D_t5), pooled (B, D_clip)) on m.device / m.dtype; L = m.max_sequence_length
    (m.tokenizer_2's length): (B, 512, 4096), (B, 768) for FLUX.1-dev.

    context: T5's last hidden state over the prompt padded/truncated to L tokens (</s> kept last), no attention mask
    (the pipeline passes none: pad tokens are part of the context). pooled: CLIPTextModel's pooler output, the
    final-LayerNorm state at the first <|endoftext|> of the 77 ids (it has the largest id, so argmax finds it, as
    transformers pools for these configs); CLIP's projection is not used. Each distinct prompt is encoded once."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    distinct = list(dict.fromkeys(prompts))
    ids = m.tokenizer(distinct).to(m.device)  # (B, 77)
    hidden = m.text_encoder(ids)  # (B, 77, D_clip) after the final LayerNorm
    pooled = hidden[torch.arange(len(distinct), device=ids.device), ids.argmax(-1)].to(m.dtype)
    context = m.text_encoder_2(m.tokenizer_2(distinct).to(m.device)).to(m.dtype)  # (B, L, D_t5)
    index = torch.tensor([distinct.index(p) for p in prompts], device=context.device)
    return context.index_select(0, index), pooled.index_select(0, index)
