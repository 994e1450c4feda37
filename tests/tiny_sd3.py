"""Tiny random-weight SD 3 / 3.5 / 3.5 Medium checkpoints: diffusers folders written by
StableDiffusion3Pipeline.save_pretrained, the same weights in Stability's single-file layout (the loader's key map,
weights/sd3_keys.py, inverted) and ComfyUI's separate encoder files. Nothing here runs at engine run time.

Sizes follow the conventions a single file's configs are inferred by (heads of 64 without QK norm, CLIP heads of
64, GroupNorm groups gcd(32, channels)), so a single file and its folder load to the same modules. CLIP-L's
projection is the identity, as in the released SD 3 folders.
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import single_file
import tiny
from diffedit_engine.weights import keys, sd3_keys
from diffedit_engine.weights.sd3 import ENCODER_FILES

# The MMDiT per variant; text encoders and VAE are shared. joint_attention_dim = T5's d_model (64) >= the CLIPs' 32 + 32.
VARIANTS = {
    "sd3": dict(num_layers=2, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128),
    "sd3.5": dict(num_layers=3, attention_head_dim=32, num_attention_heads=2, caption_projection_dim=64,
                  qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=3, attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                         qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, projection_dim=32)
T5 = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
           block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
           scaling_factor=1.5305, shift_factor=0.0609)
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "circle", "square", "on", "the", "white", "an", "astronaut"]


def t5_tokenizer():
    """A tiny T5 (Unigram) tokenizer: <pad> </s> <unk>, the space piece, whole words, then letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - i / 10) for i, w in enumerate(WORDS)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_folder(root: Path, variant: str = "sd3", seed: int = 0, t5: bool = True, fp16_variant: bool = False) -> Path:
    """Write a tiny random SD 3.x diffusers folder (t5=False: saved without text_encoder_3/tokenizer_3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from diffedit_engine.weights import vocab

    root = Path(root)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
                                        joint_attention_dim=T5["d_model"], pooled_projection_dim=2 * CLIP["projection_dim"],
                                        pos_embed_max_size=8, **VARIANTS[variant])
    vae = AutoencoderKL(sample_size=64, **VAE)
    # eos_token_id 2 as in the released SD 3 configs (transformers then pools at argmax(ids), as OpenCLIP does).
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, **CLIP)
    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common))
    te3 = T5EncoderModel(T5Config(**T5)) if t5 else None
    for i, mod in enumerate((transformer, vae, te, te2, te3)):
        if mod is not None:
            tiny._randomize(mod, seed * 10 + i)
    with torch.no_grad():
        te.text_projection.weight.copy_(torch.eye(CLIP["hidden_size"]))
    tok_dir = root / "_vocab"
    vocab_file, merges_file = vocab.write_hf_files(tok_dir)
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)
    tok_2 = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="!", model_max_length=77)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok_2,
                                    text_encoder_3=te3, tokenizer_3=t5_tokenizer() if t5 else None)
    if fp16_variant:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(root, variant="fp16" if fp16_variant else None)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return root


def reference(folder: Path, dtype=torch.float32, variant: str | None = None):
    """diffusers' StableDiffusion3Pipeline loaded from folder (CPU); variant="fp16" for an fp16-variant folder."""
    from diffusers import StableDiffusion3Pipeline

    kw = {} if (Path(folder) / "text_encoder_3").is_dir() else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, variant=variant, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _component(folder: Path, sub: str, stem: str) -> dict:
    out = {}
    for f in sorted((folder / sub).glob(f"{stem}*.safetensors")):
        out.update(load_file(str(f)))
    return out


def mmdit_to_sai(sd: dict) -> dict:
    """diffusers SD3Transformer2DModel keys -> Stability's (model.diffusion_model.*), inverting sd3_keys."""
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    out, swap = {}, lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731
    for new, (old_prefix, t) in [("pos_embed.pos_embed", ("pos_embed", keys.ID))] + [
            (n, (o, t)) for o, (n, t) in sd3_keys.MMDIT_FIXED.items()]:
        for k in [k for k in sd if k.startswith(new)]:
            out[old_prefix + k[len(new):]] = swap(sd[k]) if t == keys.SWAP else sd[k]
    for i in range(depth):
        blk = {k[len(f"transformer_blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"transformer_blocks.{i}.")}
        for old, targets in sd3_keys.MMDIT_BLOCK.items():
            for tail in ("weight", "bias"):
                parts = [blk.get(new + tail) for new, _ in targets]
                if parts[0] is None:
                    continue
                v = torch.cat(parts) if len(parts) == 3 else parts[0]
                last_ctx = i == depth - 1 and old == "context_block.adaLN_modulation.1."
                out[f"joint_blocks.{i}.{old}{tail}"] = swap(v) if last_ctx else v
    return {sd3_keys.MMDIT_PREFIX + k: v for k, v in out.items()}


def sai_state_dict(folder: Path, encoders=("clip_l", "clip_g", "t5xxl"), bare: bool = False) -> dict:
    """A tiny SD 3.x folder -> Stability's single-file layout, with the chosen text encoders bundled."""
    folder = Path(folder)
    mmdit = mmdit_to_sai(_component(folder, "transformer", "diffusion_pytorch_model"))
    if bare:
        mmdit = {k.removeprefix(sd3_keys.MMDIT_PREFIX): v for k, v in mmdit.items()}
    out = {**mmdit, **single_file.vae_to_ldm(_component(folder, "vae", "diffusion_pytorch_model"))}
    for name, short in ENCODER_FILES.items():
        if short in encoders and (folder / name).is_dir():
            out.update({sd3_keys.TEXT_PREFIXES[name] + k: v for k, v in encoder_file_dict(folder, name).items()})
    return out


def encoder_file_dict(folder: Path, name: str) -> dict:
    """One text encoder as ComfyUI keeps it (transformers names, no prefix): CLIP with text_model., CLIP-L without
    the projection (SAI's files omit it), T5 with shared.weight."""
    sd = _component(Path(folder), name, "model")
    if name == "text_encoder_3":
        return sd
    sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}
    if name == "text_encoder":
        sd.pop("text_projection.weight")
    return sd


def write_single_file(folder: Path, path: Path, **kw) -> Path:
    save_file({k: v.contiguous() for k, v in sai_state_dict(folder, **kw).items()}, str(path))
    return path


def write_encoder_files(folder: Path, out: Path, t5_name: str = "t5xxl_fp16.safetensors") -> Path:
    """ComfyUI's clip_l.safetensors, clip_g.safetensors and a t5xxl file for a tiny folder's encoders."""
    out.mkdir(parents=True, exist_ok=True)
    for name, short in ENCODER_FILES.items():
        if (Path(folder) / name).is_dir():
            sd = encoder_file_dict(folder, name)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out / (t5_name if short == "t5xxl" else f"{short}.safetensors")))
    return out


def model_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model_index.json").read_text())
