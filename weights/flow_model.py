"""FlowModel: a loaded rectified-flow model (SD 3.x now, FLUX.1 later) on unpacked latents (B, 16, h, w).

The flow families share what the editing side reads: a transformer that predicts the velocity v = ε − x0 at
diffusers' timestep σ·1000, the 16-channel VAE whose sampler latent is (vae_mean − shift) · scale, a
FlowMatchEuler scheduler config and a prompt encoder that returns (context, pooled).
"""
from dataclasses import dataclass

import torch

from ..engine.models import sd3
from .t5_tokenizer import T5Tokenizer


@dataclass
class FlowModel:
    kind: str  # "sd3" | "flux"
    transformer: torch.nn.Module  # SD3: engine.models.mmdit.SD3Transformer: (x, t, context, pooled) -> v like x
    vae: torch.nn.Module  # engine.models.vae.VAE, 16 latent channels, no quant convs
    vae_scaling_factor: float  # SD 3.x: 1.5305
    vae_shift_factor: float  # SD 3.x: 0.0609; latents = (vae_mean - shift) * scale
    scheduler: object  # engine.samplers.flow.FlowMatchConfig (scheduler/scheduler_config.json)
    device: torch.device
    dtype: torch.dtype
    source: str
    # SD 3.x: CLIP-L and CLIP-G, both engine.models.clip.CLIPTextModelWithProjection (penultimate states and
    # projected pooled outputs), and T5-XXL (engine.models.t5.T5EncoderModel), None when the checkpoint has none.
    tokenizer: object = None  # weights.tokenizer.Tokenizer: list[str] -> LongTensor (B, 77)
    text_encoder: torch.nn.Module | None = None
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_3: object = None  # weights.t5_tokenizer.T5Tokenizer: list[str] -> LongTensor (B, max_length)
    text_encoder_3: torch.nn.Module | None = None
    max_sequence_length: int = 256  # T5 tokens of the context (SD3's pipelines default to 256)
    vae_dtype: torch.dtype | None = None  # the VAE's own dtype when it differs from dtype

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context, pooled) on self.device / self.dtype. SD3: (B, 77 + max_sequence_length, 4096),
        (B, 2048) for the released models (engine.models.sd3.encode_prompt)."""
        if self.tokenizer_3 is not None and self.tokenizer_3.max_length != self.max_sequence_length:
            # max_sequence_length was changed: T5's ids are padded/truncated to it (the pipelines' argument)
            self.tokenizer_3 = T5Tokenizer.from_folder(self.tokenizer_3.source, self.max_sequence_length)
        if self.kind == "sd3":
            return sd3.encode_prompt(self, prompts)
        raise ValueError(f"no prompt encoder for model kind {self.kind!r}")
