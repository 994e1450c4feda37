"""Architecture detection and config inference for single-file checkpoints, which ship no config.

Everything that changes a weight shape is read from the shapes. What does not (attention head counts,
GroupNorm group counts, activation) follows Stable Diffusion's conventions:
  SD1: UNet 8 heads per block, CLIP ViT-L (quick_gelu);  SD2: head dim 64 in UNet and OpenCLIP (gelu).
  GroupNorm: 32 groups (reduced to a divisor of the narrowest block so small test models stay valid).
A checkpoint that breaks these conventions needs `config=` (a diffusers folder with the configs).
"""
import math
import re

DEFAULT_SCALING_FACTOR = 0.18215  # SD 1.x/2.x VAE latent scale (the LDM configs' scale_factor)
SD2_CONTEXT_DIM = 1024


def _count(shapes: dict, pattern: str) -> int:
    """Number of distinct indices n for keys matching pattern (with one (\\d+) group)."""
    return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})


def _groups(channels) -> int:
    return math.gcd(32, *channels)


def is_sd2(unet_shapes: dict, openclip: bool) -> bool:
    """SD2: an OpenCLIP text encoder (the reliable sign: SD1 used OpenAI CLIP), or 1024-wide cross attention
    (the usual test, DESIGN.md §5; it cannot fire for small test models)."""
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # = input_blocks.2.1...
    k = k if k in unet_shapes else "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    return openclip or (k in unet_shapes and unet_shapes[k][-1] == SD2_CONTEXT_DIM)


def unet_config(s: dict, layers_per_block: int, sd2: bool) -> dict:
    """diffusers unet/config.json fields from the converted UNet's key -> shape map."""
    n = _count(s, r"down_blocks\.(\d+)\.")
    channels = [s[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(n)]
    attn_down = [f"down_blocks.{b}.attentions.0.proj_in.weight" in s for b in range(n)]
    attn_up = [f"up_blocks.{b}.attentions.0.proj_in.weight" in s for b in range(n)]
    mid = "mid_block.attentions.0."
    depth = _count(s, re.escape(mid) + r"transformer_blocks\.(\d+)\.")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if sd2 else 64,
        "in_channels": s["conv_in.weight"][1],
        "out_channels": s["conv_out.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
        "cross_attention_dim": s[mid + "transformer_blocks.0.attn2.to_k.weight"][1],
        "transformer_layers_per_block": depth,
        # Heads do not show in any shape: SD2 uses 64-wide heads ([5, 10, 20, 20]), SD1 8 heads everywhere.
        "attention_head_dim": [max(1, c // 64) for c in channels] if sd2 else 8,
        "use_linear_projection": len(s[mid + "proj_in.weight"]) == 2,
        # SD2.1-768 overflows in fp16 attention without it; in fp32 it changes nothing.
        "upcast_attention": sd2,
        "norm_num_groups": _groups(channels),
    }


def vae_config(s: dict) -> dict:
    """diffusers vae/config.json fields from the converted VAE's key -> shape map."""
    n = _count(s, r"encoder\.down_blocks\.(\d+)\.")
    channels = [s[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(n)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "latent_channels": s["post_quant_conv.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": _count(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": _groups(channels),
        "scaling_factor": DEFAULT_SCALING_FACTOR,
    }


def text_config(s: dict, sd2: bool) -> dict:
    """transformers text_encoder/config.json fields from the converted text encoder's key -> shape map."""
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    return {
        "architectures": ["CLIPTextModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(s, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64),  # 64-wide heads: ViT-L 12, ViT-H 16
        "max_position_embeddings": s["text_model.embeddings.position_embedding.weight"][0],
        "hidden_act": "gelu" if sd2 else "quick_gelu",  # OpenCLIP (SD2) uses exact GELU, OpenAI CLIP its sigmoid fit
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
    }


def kind(sd2: bool, in_channels: int) -> str:
    """"sd1" | "sd2" | "sd1-inpaint" | "sd2-inpaint" (inpainting UNets take 4 latent + 1 mask + 4 masked)."""
    return ("sd2" if sd2 else "sd1") + ("-inpaint" if in_channels == 9 else "")


def default_prediction_type(kind: str) -> str:
    """A single file does not say what its UNet predicts. SD1 and both inpainting models are epsilon; for SD2 we
    follow diffusers' from_single_file: v_prediction (SD 2.0-v / 2.1 at 768), since SD2-base (epsilon) files are
    indistinguishable. The loader warns and `prediction_type=` overrides."""
    return "v_prediction" if kind == "sd2" else "epsilon"
