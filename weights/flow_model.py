"""FlowModel: a loaded rectified-flow model (SD 3.x, FLUX.1) on unpacked latents (B, 16, h, w).

The flow families share what the editing side reads: a transformer that predicts the velocity v = ε − x0 at
diffusers' timestep σ·1000, the 16-channel VAE whose sampler latent is (vae_mean − shift) · scale, a
FlowMatchEuler scheduler config and a prompt encoder that returns (context, pooled).
"""
from dataclasses import dataclass, field

import torch

from ..engine.models import flux_prompt, sd3
from .t5_tokenizer import T5Tokenizer


@dataclass
class FlowModel:
    kind: str  # "sd3" | "flux"
    # SD3: engine.models.mmdit.SD3Transformer, FLUX: engine.models.flux.FluxTransformer;
    # (x, t, context, pooled, guidance=None) -> v like x
    transformer: torch.nn.Module
    vae: torch.nn.Module  # engine.models.vae.VAE, 16 latent channels, no quant convs
    vae_scaling_factor: float  # SD 3.x: 1.5305, FLUX.1: 0.3611
    vae_shift_factor: float  # SD 3.x: 0.0609, FLUX.1: 0.1159; latents = (vae_mean - shift) * scale
    scheduler: object  # engine.samplers.flow.FlowMatchConfig (scheduler/scheduler_config.json)
    device: torch.device
    dtype: torch.dtype
    source: str
    # SD 3.x: CLIP-L and CLIP-G, both engine.models.clip.CLIPTextModelWithProjection (penultimate states and
    # projected pooled outputs), and T5-XXL (engine.models.t5.T5EncoderModel), None when the checkpoint has none.
    # FLUX.1: CLIP-L as engine.models.clip.CLIPTextModel (its pooled output only) and T5-XXL as text_encoder_2 /
    # tokenizer_2 (a weights.t5_tokenizer.T5Tokenizer); both None after sequential loading (see prompt_cache).
    tokenizer: object = None  # weights.tokenizer.Tokenizer: list[str] -> LongTensor (B, 77)
    text_encoder: torch.nn.Module | None = None
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_3: object = None  # weights.t5_tokenizer.T5Tokenizer: list[str] -> LongTensor (B, max_length)
    text_encoder_3: torch.nn.Module | None = None
    max_sequence_length: int = 256  # T5 tokens of the context (SD3's pipelines: 256; FLUX.1-dev 512, schnell 256)
    vae_dtype: torch.dtype | None = None  # the VAE's own dtype when it differs from dtype
    # FLUX.1-dev is guidance-distilled: the transformer takes the guidance scale as an input (one sample per prompt,
    # no CFG batch); schnell (timestep-distilled, 1-4 steps) has no guidance embedding.
    guidance_embeds: bool = False
    # (prompt, max_sequence_length) -> (context (1, ...), pooled (1, ...)) encoded before the text encoders were freed
    # (weights.flux.load_flux(prompts=...), sequential loading): encode_prompt serves these when the encoders are gone.
    prompt_cache: dict = field(default_factory=dict, repr=False)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context, pooled) on self.device / self.dtype. SD3: (B, 77 + max_sequence_length, 4096),
        (B, 2048) for the released models (engine.models.sd3.encode_prompt); FLUX.1: (B, max_sequence_length, 4096),
        (B, 768) (engine.models.flux_prompt.encode_prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.text_encoder is None:
            return self._cached(prompts)
        t5 = "tokenizer_2" if self.kind == "flux" else "tokenizer_3"
        tok = getattr(self, t5)
        if tok is not None and tok.max_length != self.max_sequence_length:
            # max_sequence_length was changed: T5's ids are padded/truncated to it (the pipelines' argument)
            setattr(self, t5, T5Tokenizer.from_folder(tok.source, self.max_sequence_length))
        if self.kind == "sd3":
            return sd3.encode_prompt(self, prompts)
        if self.kind == "flux":
            return flux_prompt.encode_prompt(self, prompts)
        raise ValueError(f"no prompt encoder for model kind {self.kind!r}")

    def _cached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.max_sequence_length
        missing = [p for p in prompts if (p, L) not in self.prompt_cache]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} was not encoded before the text encoders were freed (sequential "
                             f"loading encodes the prompts given at load time, max_sequence_length {L}); load with it")
        context, pooled = zip(*(self.prompt_cache[(p, L)] for p in prompts))
        return torch.cat(context), torch.cat(pooled)

    def keep_prompts(self, prompts: list[str]) -> None:
        """Encode prompts now into prompt_cache (before the text encoders are freed)."""
        prompts = list(dict.fromkeys(prompts))
        context, pooled = self.encode_prompt(prompts)
        for i, p in enumerate(prompts):
            self.prompt_cache[(p, self.max_sequence_length)] = context[i:i + 1], pooled[i:i + 1]
