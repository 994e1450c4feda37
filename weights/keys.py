"""The one key map: checkpoint names -> the engine's module names (which are diffusers'/transformers' names).

Every rename the loader applies lives here: CompVis/A1111 single-file keys (UNet, VAE, SD1 CLIP, SD2 OpenCLIP,
SD-XL's two conditioner embedders) and legacy names found in older diffusers folders. tests/single_file.py
inverts these tables to write single-file checkpoints. A conversion is (component, engine key, transform) where
transform reshapes the stored tensor: ("id",), ("squeeze",) for 1x1-conv attention weights stored as
(C, C, 1, 1), ("chunk", i, 3) for one third of OpenCLIP's (or SD3's) fused q/k/v projection (("chunk", i, n, k):
k consecutive pieces of n from piece i, FLUX's linear1 = q, k, v, 4x MLP rows), ("t",) for
OpenCLIP's text_projection, stored as the (in, out) matrix x @ P rather than a Linear weight, or ("swap",) for
SD3's final adaLN projections, whose (shift, scale) halves diffusers stores as (scale, shift). SD3's single-file
names are in sd3_keys.py.
"""
import re
from dataclasses import dataclass

import torch

ID, SQUEEZE, TRANSPOSE = ("id",), ("squeeze",), ("t",)
SWAP = ("swap",)  # the two halves of dim 0 exchanged: SD3's (shift, scale) adaLN rows -> diffusers' (scale, shift)

# Single-file prefix -> what follows it.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: transformers' CLIPTextModel inside
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP's text tower
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SD-XL: CLIP ViT-L (transformers naming inside)
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SD-XL: OpenCLIP ViT-bigG, every layer used

# UNet: whole-module renames, and resnet sub-module renames (LDM ResBlock -> diffusers ResnetBlock2D).
UNET_FIXED = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
              # SD-XL's text_time embedding (the pooled text + size/crop ids), an nn.Sequential in LDM
              "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
UNET_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
               "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
UNET_MID = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}

# VAE (encoder/decoder): LDM names -> diffusers names. Decoder up blocks are numbered in reverse.
VAE_FIXED = {"norm_out.": "conv_norm_out.", "mid.block_1.": "mid_block.resnets.0.",
             "mid.block_2.": "mid_block.resnets.1."}
VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
# Attention inside the VAE mid block: LDM single-file names, and the names diffusers used before 0.14.
VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
VAE_ATTN_LEGACY = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}

# OpenCLIP text tower -> transformers CLIPTextModel.
OPENCLIP_FIXED = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias"}
OPENCLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                  "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.", "attn.in_proj_": "self_attn.*_proj."}
# Parts of an SD2 file the text encoder does not use: the CLIP-space projection, the contrastive temperature,
# the causal mask buffer (rebuilt in forward).
OPENCLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}

OPENCLIP_LAYERS = 24  # ViT-H/14's text tower as released

# Position ids are a buffer older transformers versions saved; the engine builds them in forward.
TEXT_UNUSED = {"text_model.embeddings.position_ids"}


@dataclass(frozen=True)
class Layout:
    """The structure counts a single file's key map depends on."""
    layers_per_block: int  # UNet resnets per down block
    vae_blocks: int  # VAE resolution levels
    text_layers: int  # transformer layers stored in the file
    # OpenCLIP only: the file holds the whole tower (the released SD2 files: 24 resblocks and text_projection),
    # whose last layer SD2 does not use; files converted back from diffusers hold the 23 used layers only.
    full_tower: bool = True
    sdxl: bool = False  # SD-XL's conditioner.embedders.* text encoders


def layout(keys) -> Layout:
    """Read the structure counts from single-file key names."""
    inputs = {int(m.group(1)) for k in keys if (m := re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.", k))}
    down = sorted(int(m.group(1)) for k in keys
                  if (m := re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    # The first downsampler sits after the first block's resnets: input_blocks.0 is conv_in.
    lpb = down[0] - 1 if down else max(inputs, default=1)
    vae = {int(m.group(1)) for k in keys if (m := re.match(re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\.", k))}
    text = {int(m.group(1)) for k in keys
            if (m := re.match(r"cond_stage_model\.(?:model\.transformer\.resblocks|transformer\.(?:text_model\.)?"
                              r"encoder\.layers)\.(\d+)\.", k))}
    full = OPENCLIP_PREFIX + "text_projection" in keys or len(text) == OPENCLIP_LAYERS
    return Layout(lpb, len(vae), len(text), full, any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in keys))


def _rename(s: str, table: dict) -> str:
    for old, new in table.items():
        if s.startswith(old):
            return new + s[len(old):]
    return s


def unet_key(k: str, lpb: int) -> str | None:
    """An LDM UNet key (after model.diffusion_model.) -> diffusers UNet2DConditionModel key."""
    for old, new in UNET_FIXED.items():
        if k.startswith(old):
            return new + k[len(old):]
    parts = k.split(".")
    if parts[0] == "middle_block" and len(parts) > 2 and parts[1] in UNET_MID:
        rest = ".".join(parts[2:])
        return UNET_MID[parts[1]] + (_rename(rest, UNET_RESNET) if parts[1] != "1" else rest)
    if len(parts) < 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    where, i, j, rest = parts[0], int(parts[1]), parts[2], ".".join(parts[3:])
    if where == "input_blocks" and i >= 1:
        b, layer = divmod(i - 1, lpb + 1)  # each down block: lpb (resnet, attention) entries then a downsampler
        if j == "0" and rest.startswith("op."):
            return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
        if j == "0":
            return f"down_blocks.{b}.resnets.{layer}.{_rename(rest, UNET_RESNET)}"
        if j == "1":
            return f"down_blocks.{b}.attentions.{layer}.{rest}"
    if where == "output_blocks":
        b, layer = divmod(i, lpb + 1)  # each up block: lpb + 1 entries, the last one ends with the upsampler
        if j == "0":
            return f"up_blocks.{b}.resnets.{layer}.{_rename(rest, UNET_RESNET)}"
        if rest.startswith("conv."):  # index 1 without attention, 2 with
            return f"up_blocks.{b}.upsamplers.0.{rest}"
        if j == "1":
            return f"up_blocks.{b}.attentions.{layer}.{rest}"
    return None


def vae_key(k: str, n_blocks: int) -> tuple[str, tuple] | None:
    """An LDM VAE key (after first_stage_model.) -> (diffusers AutoencoderKL key, transform)."""
    side, _, rest = k.partition(".")
    if side not in ("encoder", "decoder"):
        return (k, ID) if k.split(".")[0] in ("quant_conv", "post_quant_conv") else None
    if rest.startswith("mid.attn_1."):
        return f"{side}.mid_block.attentions.0.{_rename(rest[len('mid.attn_1.'):], VAE_ATTN)}", SQUEEZE
    m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)$", rest)
    if m:
        kind, b, sub, layer, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if kind == "up":
            b = n_blocks - 1 - b  # LDM numbers decoder levels from the lowest resolution, diffusers from the top
        if layer is not None:
            return f"{side}.{kind}_blocks.{b}.resnets.{layer}.{_rename(tail, VAE_RESNET)}", ID
        return f"{side}.{kind}_blocks.{b}.{sub}rs.0.{tail}", ID
    rest = _rename(rest, VAE_FIXED)
    if rest.startswith("mid_block.resnets."):
        head, _, tail = rest.partition(".resnets.")
        idx, _, tail = tail.partition(".")
        rest = f"{head}.resnets.{idx}.{_rename(tail, VAE_RESNET)}"
    return f"{side}.{rest}", ID


def vae_folder_key(k: str) -> tuple[str, tuple]:
    """A diffusers VAE key, with the pre-0.14 attention names (query/key/value/proj_attn) renamed."""
    m = re.match(r"(.*\.attentions\.\d+\.)(.*)$", k)
    if m:
        return m.group(1) + _rename(m.group(2), VAE_ATTN_LEGACY), SQUEEZE
    return k, ID


def text_folder_key(k: str) -> str | None:
    """A transformers CLIPTextModel key: transformers 5 saves them without the text_model. prefix (as very old
    SD1 single files do), transformers 4 and the SD hub repos with it."""
    k = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
    return None if k in TEXT_UNUSED else k


def clip_key(k: str) -> str | None:
    """An SD1 key after cond_stage_model.transformer. (transformers naming inside)."""
    return text_folder_key(k)


def openclip_key(k: str, n_layers: int, full_tower: bool = True) -> list[tuple[str, tuple]] | None:
    """An SD2 OpenCLIP key (after cond_stage_model.model.) -> [(transformers key, transform)]; [] = unused.

    SD2 conditions on the penultimate layer of OpenCLIP (its FrozenOpenCLIPEmbedder runs layers 0..n-2, then
    ln_final), so a full tower's last resblock is dropped and the text encoder has n_layers - 1 layers, as in
    diffusers' converted SD2 text encoders (23 of 24); the final layer norm then gives the same output."""
    if k in OPENCLIP_FIXED:
        return [(OPENCLIP_FIXED[k], ID)]
    if k in OPENCLIP_UNUSED:
        return []
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", k)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if full_tower and i == n_layers - 1:
        return []
    new = _rename(rest, OPENCLIP_LAYER)
    if new == rest:
        return None
    base = f"text_model.encoder.layers.{i}."
    if "*" in new:  # fused (3D, D) in_proj: rows are q, then k, then v
        return [(base + new.replace("*", qkv), ("chunk", n, 3)) for n, qkv in enumerate("qkv")]
    return [(base + new, ID)]


def ignored(k: str) -> bool:
    """Single-file keys that belong to training, not to the model: the DDPM schedule buffers stored at the top
    level (betas, alphas_cumprod, ...), EMA copies and their counters, an autoencoder's training loss, SGM's
    denoiser buffers (SD-XL files: denoiser.sigmas)."""
    return "." not in k or k.startswith(("model_ema.", VAE_PREFIX + "loss.", "denoiser."))


def convert(k: str, lay: Layout) -> list[tuple[str, str, tuple]] | None:
    """A single-file key -> [(component, engine key, transform)]; [] = not used by the engine; None = unknown."""
    if ignored(k):
        return []
    if k.startswith(UNET_PREFIX):
        new = unet_key(k[len(UNET_PREFIX):], lay.layers_per_block)
        return None if new is None else [("unet", new, ID)]
    if k.startswith(VAE_PREFIX):
        out = vae_key(k[len(VAE_PREFIX):], lay.vae_blocks)
        return None if out is None else [("vae", out[0], out[1])]
    if k.startswith(CLIP_PREFIX):
        new = clip_key(k[len(CLIP_PREFIX):])
        return [] if new is None else [("text_encoder", new, ID)]
    if k.startswith(OPENCLIP_PREFIX):
        out = openclip_key(k[len(OPENCLIP_PREFIX):], lay.text_layers, lay.full_tower)
        return None if out is None else [("text_encoder", new, t) for new, t in out]
    if k.startswith(SDXL_CLIP_PREFIX):
        new = clip_key(k[len(SDXL_CLIP_PREFIX):])
        return [] if new is None else [("text_encoder", new, ID)]
    if k.startswith(SDXL_OPENCLIP_PREFIX):
        rest = k[len(SDXL_OPENCLIP_PREFIX):]
        if rest == "text_projection":  # SD-XL's pooled output is projected (CLIPTextModelWithProjection)
            return [("text_encoder_2", "text_projection.weight", TRANSPOSE)]
        out = openclip_key(rest, 0, full_tower=False)  # SD-XL uses the last layer too (its pooled output)
        return None if out is None else [("text_encoder_2", new, t) for new, t in out]
    return None


def transform_shape(shape: tuple, t: tuple) -> tuple:
    """The shape a stored tensor has after transform t (for checking shapes before reading any data)."""
    if t[0] == "squeeze" and len(shape) > 2 and all(s == 1 for s in shape[2:]):
        return tuple(shape[:2])
    if t[0] == "chunk":
        return (shape[0] // t[2] * (t[3] if len(t) > 3 else 1),) + tuple(shape[1:])
    if t[0] == "t":
        return tuple(shape[::-1])
    return tuple(shape)


def apply(x, t: tuple):
    """Transform t applied to a tensor (views, no copy, except the transpose)."""
    if t[0] == "squeeze" and x.ndim > 2 and all(s == 1 for s in x.shape[2:]):
        return x.reshape(x.shape[:2])
    if t[0] == "chunk":
        n = x.shape[0] // t[2]
        return x.narrow(0, t[1] * n, n * (t[3] if len(t) > 3 else 1))
    if t[0] == "t":
        return x.t().contiguous()  # a copy: one small matrix, and the Linear then sees a row-major weight
    if t[0] == "swap":
        return torch.cat(x.chunk(2, dim=0)[::-1])  # a copy: one adaLN projection per model
    return x
