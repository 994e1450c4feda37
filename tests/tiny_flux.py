"""Tiny random-weight FLUX.1 dev / schnell checkpoints: diffusers folders written by FluxPipeline.save_pretrained,
the same transformer in Black Forest Labs' single-file layout (flux1-dev.safetensors: double_blocks / single_blocks,
written here from diffusers' convert_flux_transformer_checkpoint_to_diffusers read backwards, so the loader's map
is checked against an independent inverse), BFL's autoencoder file (ae.safetensors: LDM VAE names, no prefix) and
ComfyUI's encoder files (clip_l.safetensors, t5xxl_fp16.safetensors). Nothing here runs at engine run time.

dev has the guidance embedding, schnell not; the rest is shared. Sizes follow what a single file's config is
inferred from: FLUX.1's heads of 128 (the QK norm's width; one head here) with its rotary axes (16, 56, 56), CLIP
heads of 64 (one head of 32 here).
"""
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import single_file
import tiny
import tiny_sd3
from diffedit_engine.weights import keys

VARIANTS = ("dev", "schnell")
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                   num_attention_heads=1, axes_dims_rope=(16, 56, 56))
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1)
T5 = tiny_sd3.T5
VAE = {**tiny_sd3.VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# The released scheduler configs (black-forest-labs/FLUX.1-{dev,schnell}/scheduler/scheduler_config.json).
SCHEDULERS = {"dev": dict(shift=3.0, use_dynamic_shifting=True),
              "schnell": dict(shift=1.0, use_dynamic_shifting=False)}
SCHEDULER_COMMON = dict(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def make_folder(root: Path, variant: str = "dev", seed: int = 0, fp16_variant: bool = False) -> Path:
    """Write a tiny random FLUX.1 diffusers folder (variant "dev": with the guidance embedding)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from diffedit_engine.weights import vocab

    root = Path(root)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(joint_attention_dim=T5["d_model"], pooled_projection_dim=CLIP["hidden_size"],
                                         guidance_embeds=variant == "dev", **TRANSFORMER)
    vae = AutoencoderKL(sample_size=1024, **VAE)  # as FLUX.1's vae/config.json
    # eos_token_id 2 as in FLUX's text_encoder/config.json (transformers pools at argmax(ids)).
    te = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1, **CLIP))
    te2 = T5EncoderModel(T5Config(**T5))
    for i, mod in enumerate((transformer, vae, te, te2)):
        tiny._randomize(mod, seed * 10 + i)
    tok_dir = root / "_vocab"
    vocab_file, merges_file = vocab.write_hf_files(tok_dir)
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant], **SCHEDULER_COMMON)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tiny_sd3.t5_tokenizer())
    if fp16_variant:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(root, variant="fp16" if fp16_variant else None)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return root


def reference(folder: Path, dtype=torch.float32, variant: str | None = None):
    """diffusers' FluxPipeline loaded from folder (CPU)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, variant=variant)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component(folder: Path, sub: str, stem: str = "diffusion_pytorch_model") -> dict:
    out = {}
    for f in sorted((Path(folder) / sub).glob(f"{stem}*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _swap(x: torch.Tensor) -> torch.Tensor:
    """(scale, shift) rows <-> (shift, scale): diffusers' AdaLayerNormContinuous vs BFL's final layer."""
    return torch.cat(x.chunk(2)[::-1])


# diffusers name (under transformer_blocks.N.) -> BFL name (under double_blocks.N.), one-to-one parts.
DOUBLE = {"norm1.linear.": "img_mod.lin.", "norm1_context.linear.": "txt_mod.lin.",
          "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
          "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
          "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
          "ff.net.0.proj.": "img_mlp.0.", "ff.net.2.": "img_mlp.2.", "ff_context.net.0.proj.": "txt_mlp.0.",
          "ff_context.net.2.": "txt_mlp.2.", "attn.to_out.0.": "img_attn.proj.", "attn.to_add_out.": "txt_attn.proj."}
SINGLE = {"norm.linear.": "modulation.lin.", "attn.norm_q.weight": "norm.query_norm.scale",
          "attn.norm_k.weight": "norm.key_norm.scale", "proj_out.": "linear2."}
FIXED = {"time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
         "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
         "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
         "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
         "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
         "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
         "context_embedder.": "txt_in.", "x_embedder.": "img_in.", "proj_out.": "final_layer.linear.",
         "norm_out.linear.": "final_layer.adaLN_modulation.1."}


def _rename(rest: str, table: dict) -> str | None:
    for new, old in table.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    return None


def transformer_to_bfl(sd: dict) -> dict:
    """diffusers FluxTransformer2DModel keys -> BFL's flux1-*.safetensors keys (no prefix): fused q/k/v per stream,
    single blocks' linear1 = [q; k; v; proj_mlp], the final adaLN rows as (shift, scale)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$", k)
        if m is None:
            out[_rename(k, FIXED)] = _swap(v) if k.startswith("norm_out.linear.") else v
            continue
        double, i, rest = m.group(1) == "transformer_blocks", m.group(2), m.group(3)
        pre = f"{'double' if double else 'single'}_blocks.{i}."
        name = _rename(rest, DOUBLE if double else SINGLE)
        if name is not None:
            out[pre + name] = v
    blocks = {(m.group(1), m.group(2)) for k in sd if (m := re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", k))}
    for kind, i in blocks:
        b = f"{kind}.{i}."
        for tail in ("weight", "bias"):
            if kind == "transformer_blocks":
                out[f"double_blocks.{i}.img_attn.qkv.{tail}"] = torch.cat([sd[f"{b}attn.to_{c}.{tail}"] for c in "qkv"])
                out[f"double_blocks.{i}.txt_attn.qkv.{tail}"] = torch.cat([sd[f"{b}attn.add_{c}_proj.{tail}"] for c in "qkv"])
            else:
                out[f"single_blocks.{i}.linear1.{tail}"] = torch.cat([sd[f"{b}attn.to_{c}.{tail}"] for c in "qkv"]
                                                                     + [sd[f"{b}proj_mlp.{tail}"]])
    return out


def ae_state_dict(folder: Path) -> dict:
    """BFL's ae.safetensors: the VAE in LDM names without a prefix."""
    return {k.removeprefix(keys.VAE_PREFIX): v for k, v in single_file.vae_to_ldm(component(folder, "vae")).items()}


def encoder_state_dicts(folder: Path, seed: int = 0) -> dict:
    """ComfyUI's clip_l.safetensors (transformers names with text_model., plus OpenAI's projection, which FLUX does
    not use) and t5xxl_fp16.safetensors (T5EncoderModel names)."""
    clip = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in component(folder, "text_encoder", "model").items()}
    d = CLIP["hidden_size"]
    clip["text_projection.weight"] = torch.randn(d, d, generator=torch.Generator().manual_seed(seed))
    return {"clip_l": clip, "t5xxl": component(folder, "text_encoder_2", "model")}


def write_bfl(folder: Path, out: Path, name: str = "flux1-dev.safetensors", prefix: str = "",
              bundle: bool = False) -> Path:
    """The transformer as BFL's single file (prefix "model.diffusion_model." as ComfyUI saves it); bundle: also the
    VAE (vae.*) and encoders (text_encoders.{clip_l,t5xxl}.transformer.*), as ComfyUI's all-in-one checkpoints."""
    sd = {prefix + k: v for k, v in transformer_to_bfl(component(folder, "transformer")).items()}
    if bundle:
        sd.update({"vae." + k: v for k, v in ae_state_dict(folder).items()})
        for short, enc in encoder_state_dicts(folder).items():
            sd.update({f"text_encoders.{short}.transformer.{k}": v for k, v in enc.items()})
    target = out / name if out.suffix == "" else out
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(target))
    return target


def write_separate(folder: Path, out: Path, t5_name: str = "t5xxl_fp16.safetensors", ae: bool = True) -> Path:
    """ComfyUI's text encoder files (and BFL's ae.safetensors) for a tiny folder, in out/."""
    out.mkdir(parents=True, exist_ok=True)
    enc = encoder_state_dicts(folder)
    save_file({k: v.contiguous() for k, v in enc["clip_l"].items()}, str(out / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in enc["t5xxl"].items()}, str(out / t5_name))
    if ae:
        save_file({k: v.contiguous() for k, v in ae_state_dict(folder).items()}, str(out / "ae.safetensors"))
    return out
