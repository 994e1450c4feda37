"""Stability AI's single-file SD 3.x names -> the engine's (diffusers' SD3Transformer2DModel, AutoencoderKL,
transformers' CLIP and T5 names), as (component, engine key, transform) like keys.convert.

The files (sd3_medium*.safetensors, sd3.5_large.safetensors, sd3.5_medium.safetensors) hold
  model.diffusion_model.*                  the MMDiT in SAI naming (joint_blocks.N.{x_block,context_block}.*)
  first_stage_model.*                      the 16-channel VAE in LDM naming, no quant convs (keys.vae_key)
  text_encoders.{clip_l,clip_g,t5xxl}.transformer.*   transformers naming inside, when the encoders are bundled
ComfyUI's separate encoder files (clip_l.safetensors, clip_g.safetensors, t5xxl_*.safetensors) hold the same
transformers names without a prefix. The facts are diffusers' convert_sd3_transformer_checkpoint_to_diffusers:
fused qkv rows are q, k, v; the last block's context stream is "pre-only" (adaLN shift and scale, no attention
output or MLP); that block's context adaLN and final_layer's adaLN are stored (shift, scale), diffusers'
AdaLayerNormContinuous reads (scale, shift).
"""
import re

from . import keys
from .keys import ID, SWAP

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                 "text_encoder_2": "text_encoders.clip_g.transformer.",
                 "text_encoder_3": "text_encoders.t5xxl.transformer."}
QKV = tuple(("chunk", i, 3) for i in range(3))

# Outside the blocks: SAI name prefix -> (diffusers prefix, transform).
MMDIT_FIXED = {
    "x_embedder.proj.": ("pos_embed.proj.", ID),
    "t_embedder.mlp.0.": ("time_text_embed.timestep_embedder.linear_1.", ID),
    "t_embedder.mlp.2.": ("time_text_embed.timestep_embedder.linear_2.", ID),
    "y_embedder.mlp.0.": ("time_text_embed.text_embedder.linear_1.", ID),
    "y_embedder.mlp.2.": ("time_text_embed.text_embedder.linear_2.", ID),
    "context_embedder.": ("context_embedder.", ID),
    "final_layer.linear.": ("proj_out.", ID),
    "final_layer.adaLN_modulation.1.": ("norm_out.linear.", SWAP),
}
# Inside joint_blocks.N: SAI name prefix -> [(diffusers prefix under transformer_blocks.N, transform)].
MMDIT_BLOCK = {
    "x_block.attn.qkv.": [("attn.to_q.", QKV[0]), ("attn.to_k.", QKV[1]), ("attn.to_v.", QKV[2])],
    "x_block.attn.proj.": [("attn.to_out.0.", ID)],
    "x_block.attn.ln_q.": [("attn.norm_q.", ID)],
    "x_block.attn.ln_k.": [("attn.norm_k.", ID)],
    "x_block.attn2.qkv.": [("attn2.to_q.", QKV[0]), ("attn2.to_k.", QKV[1]), ("attn2.to_v.", QKV[2])],
    "x_block.attn2.proj.": [("attn2.to_out.0.", ID)],
    "x_block.attn2.ln_q.": [("attn2.norm_q.", ID)],
    "x_block.attn2.ln_k.": [("attn2.norm_k.", ID)],
    "x_block.adaLN_modulation.1.": [("norm1.linear.", ID)],
    "x_block.mlp.fc1.": [("ff.net.0.proj.", ID)],
    "x_block.mlp.fc2.": [("ff.net.2.", ID)],
    "context_block.attn.qkv.": [("attn.add_q_proj.", QKV[0]), ("attn.add_k_proj.", QKV[1]),
                                ("attn.add_v_proj.", QKV[2])],
    "context_block.attn.proj.": [("attn.to_add_out.", ID)],
    "context_block.attn.ln_q.": [("attn.norm_added_q.", ID)],
    "context_block.attn.ln_k.": [("attn.norm_added_k.", ID)],
    "context_block.adaLN_modulation.1.": [("norm1_context.linear.", ID)],  # SWAP in the last block (pre-only)
    "context_block.mlp.fc1.": [("ff_context.net.0.proj.", ID)],
    "context_block.mlp.fc2.": [("ff_context.net.2.", ID)],
}
BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.*)$")


def num_blocks(names) -> int:
    """The MMDiT depth: joint_blocks indices in SAI names (with or without model.diffusion_model.)."""
    found = {int(m.group(1)) for k in names if (m := BLOCK.match(k.removeprefix(MMDIT_PREFIX)))}
    return max(found) + 1 if found else 0


def mmdit_key(k: str, depth: int) -> list[tuple[str, tuple]] | None:
    """An SAI MMDiT key (after model.diffusion_model.) -> [(diffusers key, transform)]; None = unknown."""
    if k == "pos_embed":
        return [("pos_embed.pos_embed", ID)]
    for old, (new, t) in MMDIT_FIXED.items():
        if k.startswith(old):
            return [(new + k[len(old):], t)]
    m = BLOCK.match(k)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    for old, targets in MMDIT_BLOCK.items():
        if rest.startswith(old):
            tail = rest[len(old):]
            swap = i == depth - 1 and old == "context_block.adaLN_modulation.1."
            return [(f"transformer_blocks.{i}.{new}{tail}", SWAP if swap else t) for new, t in targets]
    return None


def text_key(name: str, k: str, t5_key) -> str | None:
    """A transformers-named text encoder key -> the engine's (None: not used). t5_key: engine.models.t5.t5_key
    bound to the file's keys. CLIP-L's text_projection is dropped: SD 3 pools CLIP-L unprojected (diffusers
    converts it to an identity, ComfyUI does not project; SAI's files omit it, ComfyUI's clip_l.safetensors
    carries OpenAI's), so the loader supplies the identity."""
    if name == "text_encoder_3":
        return t5_key(k)
    if k == "logit_scale" or (name == "text_encoder" and k == "text_projection.weight"):
        return None
    return keys.text_folder_key(k)


def convert(k: str, depth: int, vae_blocks: int, t5_key) -> list[tuple[str, str, tuple]] | None:
    """A single-file key -> [(component, engine key, transform)]; [] = not used; None = unknown."""
    if k.startswith(MMDIT_PREFIX):
        out = mmdit_key(k[len(MMDIT_PREFIX):], depth)
        return None if out is None else [("transformer", new, t) for new, t in out]
    if k.startswith(VAE_PREFIX):
        out = keys.vae_key(k[len(VAE_PREFIX):], vae_blocks)
        return None if out is None else [("vae", out[0], out[1])]
    for name, prefix in TEXT_PREFIXES.items():
        if k.startswith(prefix):
            new = text_key(name, k[len(prefix):], t5_key)
            return [] if new is None else [(name, new, ID)]
    return None
