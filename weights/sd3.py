"""load_sd3: Stable Diffusion 3 / 3.5 / 3.5 Medium, from a diffusers folder (StableDiffusion3Pipeline) or one of
Stability's single files (sd3_medium*.safetensors, sd3.5_large.safetensors, sd3.5_medium.safetensors) -> FlowModel.

Same machinery as weights/model.py (parts.Part / materialize: meta-device modules, strict loads, tensors straight
from safetensors onto the device). A folder gives every config; a single file's configs are read from its shapes
(depth = joint_blocks, width = x_embedder's, heads = width / 64 or / the QK norm's width, MMDiT-X blocks = those
with attn2), unless `config=` names a diffusers SD3 folder. Text encoders a single file lacks come from
`text_encoders=`: a folder of ComfyUI-style files (clip_l.safetensors, clip_g.safetensors, t5xxl_*.safetensors)
or a diffusers SD3 folder. T5 is optional (users drop it to save 9 GB): without it the prompt's T5 part is zeros.
"""
import math
import re
from pathlib import Path

import torch

from ..engine.models.clip import CLIPTextConfig, CLIPTextModelWithProjection
from ..engine.models.mmdit import SD3Transformer, SD3TransformerConfig
from ..engine.models.t5 import T5Config, T5EncoderModel, t5_dtype, t5_key
from ..engine.models.vae import VAE, VAEConfig
from ..engine.samplers.flow import FlowMatchConfig
from . import detect, files, keys, sd3_keys
from .files import CheckpointError
from .flow_model import FlowModel
from .parts import Part, materialize, read_json
from .t5_tokenizer import T5Tokenizer
from .tokenizer import Tokenizer

# component -> (folder, weights file stem) in a diffusers SD3 folder
COMPONENTS = {"transformer": ("transformer", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
              "text_encoder": ("text_encoder", "model"), "text_encoder_2": ("text_encoder_2", "model"),
              "text_encoder_3": ("text_encoder_3", "model")}
TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
ENCODER_FILES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}  # ComfyUI names
# What a single file does not record, as every SD 3.x release sets it (diffusers' SD3 configs).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR = 1.5305, 0.0609
SAMPLE_SIZE = 128  # the transformer's training latent (1024 px)
HEAD_DIM = 64  # every SD 3.x MMDiT; a model with QK norm shows its own in the norm's width


def is_sd3_folder(index: dict) -> bool:
    return "StableDiffusion3" in (index.get("_class_name") or "")


def is_sd3_file(names) -> bool:
    """Stability's MMDiT naming (with or without model.diffusion_model.)."""
    return any(k.startswith(("joint_blocks.", sd3_keys.MMDIT_PREFIX + "joint_blocks.")) for k in names)


def unsupported_folder(index: dict) -> str | None:
    """The SD3-family pipelines the engine does not run (ControlNets), by name."""
    name = index.get("_class_name") or ""
    if "ControlNet" in name or (index.get("controlnet") or [None])[0] is not None:
        return f"an SD3 ControlNet pipeline ({name})"
    return None


def unsupported_file(names) -> str | None:
    if any("controlnet" in k or "pos_embed_input." in k for k in names):
        return "an SD3 ControlNet (controlnet_blocks / pos_embed_input keys)"
    return None


def _build(name: str, config: dict) -> torch.nn.Module:
    if name == "transformer":
        return SD3Transformer(SD3TransformerConfig.from_json(config))
    if name == "vae":
        return VAE(VAEConfig.from_json(config))
    if name == "text_encoder_3":
        return T5EncoderModel(T5Config.from_json(config))
    return CLIPTextModelWithProjection(CLIPTextConfig.from_json(config, "CLIPTextModelWithProjection"))


def _engine_key(name: str, src: str, stored) -> tuple[str | None, tuple]:
    """A diffusers/transformers component key -> (engine key or None, transform)."""
    if name == "vae":
        return keys.vae_folder_key(src)
    if name == "text_encoder_3":
        return t5_key(src, stored), keys.ID
    if name.startswith("text_encoder"):
        return (None if src == "logit_scale" else keys.text_folder_key(src)), keys.ID
    return src, keys.ID


def _add(part: Part, name: str, entries: list, prefix: str = "") -> None:
    """(file, stored key, shape) entries of one component in diffusers/transformers naming (after prefix) -> part's
    tensors."""
    stored = {src.removeprefix(prefix) for _, src, _ in entries}
    for path, src, shape in entries:
        k, t = _engine_key(name, src.removeprefix(prefix), stored)
        if k is not None:
            part.tensors[k], part.shapes[k] = (path, src, t), keys.transform_shape(shape, t)


def has_t5(root: Path, index: dict) -> bool:
    """A folder saved without T5 says text_encoder_3: [null, null] (or lacks the folder)."""
    return (root / "text_encoder_3").is_dir() and (index.get("text_encoder_3") or [None])[0] is not None


def folder_parts(root: Path, prefer_fp16: bool, names=tuple(COMPONENTS)) -> dict[str, Part]:
    parts = {}
    for name in names:
        sub, stem = COMPONENTS[name]
        parts[name] = Part(read_json(root / sub / "config.json"), {}, {})
        _add(parts[name], name, list(files.folder_tensors(root / sub, stem, prefer_fp16)))
    return parts


def _count(shapes: dict, pattern: str) -> int:
    return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})


def transformer_config(s: dict) -> dict:
    """diffusers transformer/config.json fields from the converted MMDiT's key -> shape map."""
    width, cin, p, _ = s["pos_embed.proj.weight"]
    depth = _count(s, r"transformer_blocks\.(\d+)\.")
    qk = s.get("transformer_blocks.0.attn.norm_q.weight")
    head = qk[0] if qk else HEAD_DIM
    return {"_class_name": "SD3Transformer2DModel", "sample_size": SAMPLE_SIZE, "patch_size": p, "in_channels": cin,
            "num_layers": depth, "attention_head_dim": head, "num_attention_heads": width // head,
            "joint_attention_dim": s["context_embedder.weight"][1], "caption_projection_dim": s["context_embedder.weight"][0],
            "pooled_projection_dim": s["time_text_embed.text_embedder.linear_1.weight"][1],
            "out_channels": s["proj_out.weight"][0] // (p * p), "pos_embed_max_size": math.isqrt(s["pos_embed.pos_embed"][1]),
            "dual_attention_layers": [i for i in range(depth) if f"transformer_blocks.{i}.attn2.to_q.weight" in s],
            "qk_norm": "rms_norm" if qk else None}


def vae_config(s: dict) -> dict:
    """diffusers vae/config.json fields from the converted VAE's key -> shape map (SD 3's scale and shift)."""
    n = _count(s, r"encoder\.down_blocks\.(\d+)\.")
    channels = [s[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(n)]
    return {"_class_name": "AutoencoderKL", "in_channels": s["encoder.conv_in.weight"][1],
            "out_channels": s["decoder.conv_out.weight"][0], "latent_channels": s["decoder.conv_in.weight"][1],
            "block_out_channels": channels, "layers_per_block": _count(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "norm_num_groups": math.gcd(32, *channels), "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in s,
            "use_quant_conv": "quant_conv.weight" in s, "use_post_quant_conv": "post_quant_conv.weight" in s,
            "scaling_factor": VAE_SCALING_FACTOR, "shift_factor": VAE_SHIFT_FACTOR}


def t5_config(s: dict) -> dict:
    """transformers T5 config.json fields from the encoder's key -> shape map (T5 v1.1: gated GELU)."""
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = s[attn + "relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    ff = s["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    return {"model_type": "t5", "vocab_size": s["shared.weight"][0], "d_model": s["shared.weight"][1],
            "d_kv": s[attn + "q.weight"][0] // heads, "d_ff": ff[0], "num_heads": heads,
            "num_layers": _count(s, r"encoder\.block\.(\d+)\."), "relative_attention_num_buckets": buckets,
            "feed_forward_proj": "gated-gelu" if gated else "relu"}


def _identity_projection(part: Part) -> None:
    """SD 3 pools CLIP-L unprojected: the (hidden, hidden) identity diffusers converts its projection to."""
    d = part.shapes["text_model.final_layer_norm.weight"][0]
    part.tensors["text_projection.weight"], part.shapes["text_projection.weight"] = (None, torch.eye(d), keys.ID), (d, d)


def _encoder_file(folder: Path, name: str) -> Path | None:
    """ComfyUI's clip_l / clip_g / t5xxl_* file in folder; the widest dtype first (t5xxl_fp16 over t5xxl_fp8)."""
    found = sorted(folder.glob(ENCODER_FILES[name] + "*.safetensors"), key=lambda p: ("fp8" in p.name, p.name))
    return found[0] if found else None


def encoder_parts(source: Path, prefer_fp16: bool, names) -> dict[str, Part]:
    """The text encoders `names` from text_encoders= (a diffusers SD3 folder, or a folder of ComfyUI files)."""
    if (source / "model_index.json").is_file():
        index = read_json(source / "model_index.json")
        return folder_parts(source, prefer_fp16, [n for n in names if n != "text_encoder_3" or has_t5(source, index)])
    if not source.is_dir():
        raise CheckpointError(f"{source}: text_encoders= must be a folder (clip_l.safetensors, clip_g.safetensors, "
                              f"t5xxl_*.safetensors) or a diffusers SD3 folder")
    parts = {}
    for name in names:
        path = _encoder_file(source, name)
        if path is not None:
            header = files.read_header(path)
            prefix = sd3_keys.TEXT_PREFIXES[name]  # files cut out of an SD3 checkpoint keep the prefix
            parts[name] = Part({}, {}, {})
            _add(parts[name], name, [(path, k, shape) for k, (_, shape) in header.items()],
                 prefix if any(k.startswith(prefix) for k in header) else "")
            if name == "text_encoder":  # OpenAI's projection in ComfyUI's clip_l: SD 3 does not use it
                parts[name].tensors.pop("text_projection.weight", None)
                parts[name].shapes.pop("text_projection.weight", None)
    return parts


def file_parts(path: Path, header: dict, prefer_fp16: bool, text_encoders=None) -> dict[str, Part]:
    """The components of a Stability single file (+ the encoders it lacks from text_encoders), configs empty."""
    bare = not any(k.startswith(sd3_keys.MMDIT_PREFIX) for k in header)  # an MMDiT saved without its prefix
    known = (sd3_keys.VAE_PREFIX, *sd3_keys.TEXT_PREFIXES.values())
    name_of = {k: (sd3_keys.MMDIT_PREFIX + k if bare and not k.startswith(known) else k) for k in header}
    depth = sd3_keys.num_blocks(name_of.values())
    vae_blocks = len({m.group(1) for k in header if (m := re.match(r"first_stage_model\.encoder\.down\.(\d+)\.", k))})
    t5_names = {k.removeprefix(sd3_keys.TEXT_PREFIXES["text_encoder_3"]) for k in header}
    parts = {name: Part({}, {}, {}) for name in COMPONENTS}
    unknown = []
    for src, (_, shape) in header.items():
        out = sd3_keys.convert(name_of[src], depth, vae_blocks, lambda k: t5_key(k, t5_names))
        if out is None:
            unknown.append(src)
        for name, k, t in out or ():
            parts[name].tensors[k], parts[name].shapes[k] = (path, src, t), keys.transform_shape(shape, t)
    if unknown:
        raise CheckpointError(f"{path}: unexpected key {unknown[0]!r} (shape {header[unknown[0]][1]}), not part of an "
                              f"SD 3.x single-file checkpoint; {len(unknown)} unknown: {unknown[:8]}")
    for name, prefix in (("transformer", sd3_keys.MMDIT_PREFIX), ("vae", sd3_keys.VAE_PREFIX)):
        if not parts[name].tensors:
            raise CheckpointError(f"{path}: no {name} weights (no {prefix}* keys); not an SD 3.x checkpoint")
    missing = [n for n in TEXT if not parts[n].tensors]
    if missing and text_encoders is not None:
        parts.update(encoder_parts(files.resolve(text_encoders), prefer_fp16, missing))
    for name in ("text_encoder", "text_encoder_2"):
        if not parts[name].tensors:
            raise CheckpointError(
                f"{path}: no {ENCODER_FILES[name].upper().replace('_', '-')} text encoder in the file"
                + (f" nor a {ENCODER_FILES[name]}*.safetensors in {text_encoders}" if text_encoders else "")
                + "; pass text_encoders=<a folder with clip_l.safetensors, clip_g.safetensors [, t5xxl_*.safetensors] "
                  "or a diffusers SD3 folder>")
    if not parts["text_encoder_3"].tensors:
        del parts["text_encoder_3"]
    if "text_projection.weight" not in parts["text_encoder"].tensors:
        _identity_projection(parts["text_encoder"])
    return parts


def _infer_configs(path: Path, parts: dict) -> None:
    try:
        for name, part in parts.items():
            if part.config:  # from a diffusers text_encoders= folder
                continue
            s = part.shapes
            part.config = (transformer_config(s) if name == "transformer" else vae_config(s) if name == "vae"
                           else t5_config(s) if name == "text_encoder_3"
                           else detect.text_config(s, sd2=name == "text_encoder_2"))  # CLIP-G: OpenCLIP's gelu
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} needed to infer the architecture") from None


def _t5_tokenizer_folder(candidates) -> Path | None:
    for c in candidates:
        if c is not None and ((c / "tokenizer.json").is_file() or (c / "spiece.model").is_file()):
            return c
    return None


def load_sd3(root: Path, device, dtype, config=None, text_encoders=None, revision="main", vae_dtype=None) -> FlowModel:
    """An SD 3.x diffusers folder or Stability single file (root, already resolved) -> FlowModel; see the module
    docstring. config / text_encoders: for a single file only."""
    device, fp16 = torch.device(device), dtype == torch.float16
    if root.is_dir():
        index = read_json(root / "model_index.json")
        why = unsupported_folder(index)
        if why:
            raise CheckpointError(f"{root}: {why} is not supported (only the SD 3.x text-to-image models)")
        t5 = has_t5(root, index)
        parts = folder_parts(root, fp16, [n for n in COMPONENTS if n != "text_encoder_3" or t5])
        sched = read_json(root / "scheduler" / "scheduler_config.json")
        tok_root, t5_tok = root, root / "tokenizer_3"
    else:
        header = files.read_header(root)
        why = unsupported_file(header)
        if why:
            raise CheckpointError(f"{root}: {why} is not supported (only the SD 3.x text-to-image models)")
        parts = file_parts(root, header, fp16, text_encoders)
        t5 = "text_encoder_3" in parts
        te = files.resolve(text_encoders) if text_encoders is not None else None
        croot = files.resolve(config, revision=revision) if config is not None else None
        if croot is not None:
            for name, part in parts.items():
                part.config = read_json(croot / COMPONENTS[name][0] / "config.json")
            sched, tok_root = read_json(croot / "scheduler" / "scheduler_config.json"), croot
        else:
            _infer_configs(root, parts)
            sched, tok_root = SCHEDULER, None
        # T5's tokenizer: a single file has none (SD 3.5's repository keeps one in tokenizer_3/ beside the file)
        t5_tok = _t5_tokenizer_folder([croot and croot / "tokenizer_3", te and te / "tokenizer_3", te,
                                       te and te.parent / "tokenizer_3", root.parent / "tokenizer_3"])
        if t5 and t5_tok is None:
            raise CheckpointError(f"{root}: T5's tokenizer is needed (the checkpoint has T5-XXL weights) and no "
                                  f"tokenizer_3/ was found; pass config=<a diffusers SD3 folder> or text_encoders=<a "
                                  f"folder holding tokenizer_3/ or T5's tokenizer.json / spiece.model>")
    odd = [k for k in ("latents_mean", "latents_std") if parts["vae"].config.get(k) is not None]
    if odd:
        raise CheckpointError(f"{root}: the VAE has {', '.join(odd)}, which SD 3.x's VAE does not use")
    try:
        scheduler = FlowMatchConfig.from_json(sched)
    except AssertionError as e:
        raise CheckpointError(f"{root}: unsupported scheduler configuration: {e}") from None
    if tok_root is not None:
        tokenizers = [Tokenizer.from_folder(tok_root / "tokenizer"), Tokenizer.from_folder(tok_root / "tokenizer_2")]
    else:  # SD 3's CLIP-L pads with <|endoftext|>, CLIP-G with "!" (id 0), as SD-XL's pair
        tokenizers = [Tokenizer.bundled(pad="sd1"), Tokenizer.bundled(pad="sd2")]
    modules = {name: materialize(name, part, device, (vae_dtype or dtype) if name == "vae" else dtype, _build,
                                 t5_dtype if name == "text_encoder_3" else None)
               for name, part in parts.items()}
    vae = parts["vae"].config
    return FlowModel(
        kind="sd3", transformer=modules["transformer"], vae=modules["vae"],
        vae_scaling_factor=float(vae.get("scaling_factor", VAE_SCALING_FACTOR)),
        vae_shift_factor=float(vae.get("shift_factor") or 0.0), scheduler=scheduler, device=device, dtype=dtype,
        source=str(root), tokenizer=tokenizers[0], text_encoder=modules["text_encoder"], tokenizer_2=tokenizers[1],
        text_encoder_2=modules["text_encoder_2"], text_encoder_3=modules.get("text_encoder_3"),
        tokenizer_3=T5Tokenizer.from_folder(t5_tok) if t5 else None,
        vae_dtype=vae_dtype if vae_dtype not in (None, dtype) else None)
