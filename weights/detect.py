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
SDXL_SCALING_FACTOR = 0.13025  # SD-XL's VAE (a retrained decoder, same architecture)
SD2_CONTEXT_DIM = 1024
SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w); the refiner's 5 replace target by aesthetics


def _count(shapes: dict, pattern: str) -> int:
    """Number of distinct indices n for keys matching pattern (with one (\\d+) group)."""
    return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})


def _groups(channels) -> int:
    return math.gcd(32, *channels)


def is_sd2(unet_shapes: dict, openclip: bool) -> bool:
    """SD2: an OpenCLIP text encoder (the reliable sign: SD1 used OpenAI CLIP), or 1024-wide cross attention
    (the usual test, docs/design.md §Checkpoints; it cannot fire for small test models)."""
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # = input_blocks.2.1...
    k = k if k in unet_shapes else "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    return openclip or (k in unet_shapes and unet_shapes[k][-1] == SD2_CONTEXT_DIM)


def unet_config(s: dict, layers_per_block: int, sd2: bool, pooled_dim: int | None = None) -> dict:
    """diffusers unet/config.json fields from the converted UNet's key -> shape map. pooled_dim: SD-XL's pooled
    text width (text_encoder_2's projection), which with the add_embedding input width fixes the time-id width."""
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
    } | (_sdxl_unet(s, n, channels, pooled_dim) if pooled_dim else {})


def _sdxl_unet(s: dict, n: int, channels: list, pooled_dim: int) -> dict:
    """SD-XL's UNet fields: a transformer depth per block ([1, 2, 10]; 1 where a block has no attention),
    64-wide heads, no fp32 attention upcast, and the text_time added embedding."""
    depth = [max(1, _count(s, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for b in range(n)]
    add_in = s["add_embedding.linear_1.weight"][1]
    return {"sample_size": 128, "transformer_layers_per_block": depth,
            "attention_head_dim": [max(1, c // 64) for c in channels], "upcast_attention": False,
            "addition_embed_type": "text_time", "addition_time_embed_dim": (add_in - pooled_dim) // SDXL_TIME_IDS,
            "projection_class_embeddings_input_dim": add_in}


def vae_config(s: dict, sdxl: bool = False) -> dict:
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
        "scaling_factor": SDXL_SCALING_FACTOR if sdxl else DEFAULT_SCALING_FACTOR,
    }


def text_config(s: dict, sd2: bool) -> dict:
    """transformers text_encoder/config.json fields from the converted text encoder's key -> shape map. sd2: an
    OpenCLIP tower (SD2's, or SD-XL's second encoder, the one with a text_projection)."""
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    proj = s.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModel" if proj is None else "CLIPTextModelWithProjection"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(s, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64),  # 64-wide heads: ViT-L 12, ViT-H 16
        "max_position_embeddings": s["text_model.embeddings.position_embedding.weight"][0],
        "hidden_act": "gelu" if sd2 else "quick_gelu",  # OpenCLIP (SD2) uses exact GELU, OpenAI CLIP its sigmoid fit
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden if proj is None else proj[0],
    }


def kind(sd2: bool, in_channels: int, sdxl: bool = False) -> str:
    """"sd1" | "sd2" | "sdxl" and their "-inpaint" forms (inpainting UNets take 4 latent + 1 mask + 4 masked)."""
    return ("sdxl" if sdxl else "sd2" if sd2 else "sd1") + ("-inpaint" if in_channels == 9 else "")


def unsupported_folder(root, index: dict) -> str | None:
    """The family of a diffusers folder the engine does not run (None if it is SD 1.x/2.x/XL)."""
    name = index.get("_class_name") or ""
    if "StableDiffusion3" in name:
        return f"Stable Diffusion 3 ({name}: an MMDiT transformer, not a UNet)"
    have = lambda c: (index.get(c) or [None])[0] is not None or (root / c).is_dir()  # noqa: E731
    if have("transformer") and not have("unet"):
        return f"a transformer-based model ({name or 'no _class_name'}), not a UNet"
    if have("text_encoder_2") and not have("text_encoder") or index.get("requires_aesthetics_score"):
        return ("the SD-XL refiner (only text_encoder_2, aesthetic-score conditioning); load the SD-XL base "
                "model instead")
    return None


def unsupported_file(keys) -> str | None:
    """The family of a single-file checkpoint the engine does not run, from its key names (None: not detected)."""
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "Stable Diffusion 3 (MMDiT joint_blocks)"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "the SD-XL refiner (OpenCLIP bigG only, aesthetic-score conditioning); load the SD-XL base model instead"
    return None


FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")  # one set of weights, text-to-image
FLUX_LATENT_FEATURES = 64  # img_in's input: the 16-channel latent packed 2x2


def is_flux_folder(index: dict) -> bool:
    """Any FLUX pipeline by name (the loader refuses the kinds it does not run, naming them)."""
    return "Flux" in (index.get("_class_name") or "")


def unsupported_flux_folder(index: dict) -> str | None:
    name = index.get("_class_name") or ""
    return None if name in FLUX_PIPELINES else f"a FLUX pipeline other than FLUX.1 text-to-image ({name})"


def unsupported_flux_file(header: dict) -> str | None:
    """The FLUX-family files the engine does not run, from key names and img_in's width (header: key -> (dtype,
    shape))."""
    names = [k.removeprefix("model.diffusion_model.") for k in header]
    if any("lora" in k.lower() for k in names):
        return "a LoRA (lora_* keys), not a model"
    if any(k.startswith(("double_stream_modulation", "single_stream_modulation")) for k in names):
        return "FLUX.2 (shared stream modulations)"
    if any(k.startswith("distilled_guidance_layer.") for k in names):
        return "Chroma (distilled_guidance_layer)"
    key = next((k for k in header if k.endswith("img_in.weight")), None)
    shape = header[key][1] if key is not None else None
    if shape is not None and shape[1] != FLUX_LATENT_FEATURES:
        return (f"a FLUX.1 Fill / Depth / Canny model (img_in takes {shape[1]} features, text-to-image FLUX.1 "
                f"{FLUX_LATENT_FEATURES})")
    return None


def default_prediction_type(kind: str) -> str:
    """A single file does not say what its UNet predicts. SD1, SD-XL and the inpainting models are epsilon; for SD2 we
    follow diffusers' from_single_file: v_prediction (SD 2.0-v / 2.1 at 768), since SD2-base (epsilon) files are
    indistinguishable. The loader warns and `prediction_type=` overrides."""
    return "v_prediction" if kind == "sd2" else "epsilon"
