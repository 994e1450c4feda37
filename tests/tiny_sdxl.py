"""Tiny random-weight SD-XL checkpoints, written by diffusers' StableDiffusionXLPipeline.save_pretrained, and the
diffusers pipeline loaded back from them (the test oracle). Nothing here runs at engine run time.
"""
import json
from pathlib import Path

import torch

import tiny

# Config variants over the SD-XL config space: transformer depth per block, head counts, attention in the first
# block or not, layers per block, time-id embedding width, text encoder widths (context = their sum).
VARIANTS = {
    # The released layout, scaled down: no attention in the first block, depths [1, 2], per-block head counts.
    "xl": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), addition_time_embed_dim=8),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        clip_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32),
    ),
    # Attention in every block (the first one too), the deeper transformer first, other head counts and widths.
    "xl-attn": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  transformer_layers_per_block=(3, 1), attention_head_dim=(4, 2), addition_time_embed_dim=4),
        clip=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
        clip_2=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=4, num_attention_heads=5, projection_dim=16),
    ),
    # Three blocks as the real model, depths [1, 2, 3] (the mid block takes the last), one head per block.
    "xl-deep": dict(
        unet=dict(block_out_channels=(16, 32, 64), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 1, 1), addition_time_embed_dim=8),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        clip_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, projection_dim=24),
    ),
}

VAE = dict(tiny.TINY_VAE, scaling_factor=0.13025, force_upcast=True)
# SD-XL base ships EulerDiscreteScheduler with these values; SDXL-Turbo EulerAncestral with trailing spacing.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def make_folder(root: Path, variant: str = "xl", seed: int = 0, fp16_variant: bool = False,
                turbo: bool = False) -> Path:
    """Write a tiny random SD-XL diffusers folder with StableDiffusionXLPipeline.save_pretrained."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffedit_engine.weights import vocab

    spec = VARIANTS[variant]
    root = Path(root)
    torch.manual_seed(seed)
    c1, c2 = spec["clip"], spec["clip_2"]
    u = spec["unet"]
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, use_linear_projection=True,
        cross_attention_dim=c1["hidden_size"] + c2["hidden_size"], addition_embed_type="text_time",
        projection_class_embeddings_input_dim=6 * u["addition_time_embed_dim"] + c2["projection_dim"], **u)
    vae = AutoencoderKL(sample_size=128, **VAE)
    # eos_token_id 2 as in the released SD-XL configs (transformers then pools at argmax(ids), as OpenCLIP does).
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", projection_dim=c1["hidden_size"], **common, **c1))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common, **c2))
    for i, mod in enumerate((unet, vae, te, te2)):
        tiny._randomize(mod, seed * 10 + i)
    tok_dir = root / "_vocab"
    vocab_file, merges_file = vocab.write_hf_files(tok_dir)
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)
    tok_2 = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="!", model_max_length=77)
    sched = (EulerAncestralDiscreteScheduler(**{**SCHEDULER, "timestep_spacing": "trailing"}) if turbo
             else EulerDiscreteScheduler(**SCHEDULER))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok_2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    if fp16_variant:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(root, variant="fp16" if fp16_variant else None)
    # SD-XL base's scheduler_config.json also carries DDIM's keys, both off (Euler ignores them); without
    # them a DDIM run takes DDIMScheduler's class defaults, clip_sample and set_alpha_to_one on
    cfg = root / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "clip_sample": False, "set_alpha_to_one": False}))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return root


def reference(folder: Path, dtype=torch.float32):
    """diffusers' StableDiffusionXLPipeline loaded from folder (CPU)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model_index.json").read_text())
