"""load_flux: FLUX.1 dev / schnell from a diffusers folder (FluxPipeline) or Black Forest Labs' transformer file
(flux1-dev.safetensors, flux1-schnell.safetensors: double_blocks / single_blocks) -> FlowModel (kind "flux").

Same machinery as weights/sd3.py (parts.Part / materialize: meta-device modules, strict loads, tensors straight from
safetensors onto the device). A folder gives every config. A transformer file's config is read from its shapes
(weights/flux_keys.py) unless `config=` names a diffusers FLUX folder (configs, scheduler, tokenizers). What the file
lacks comes from `text_encoders=`: a folder of ComfyUI-style files (clip_l.safetensors, t5xxl_*.safetensors,
ae.safetensors) or a diffusers FLUX folder; BFL's ae.safetensors beside the transformer file is found by itself.
ComfyUI's all-in-one files (model.diffusion_model.*, vae.*, text_encoders.{clip_l,t5xxl}.transformer.*) load too.
dev vs schnell is read from the weights: dev has the guidance embedding (guidance-distilled).

Memory (issue 22 item 5): `prompts=` encodes those prompts with only the text encoders loaded, frees them, then
loads the transformer and the VAE (the prompts are served from FlowModel.prompt_cache; T5-XXL and the transformer
are never resident together); `storage=torch.float8_e4m3fn` keeps the transformer blocks' Linear weights in fp8 with
a per-tensor scale, upcast to the compute dtype one layer at a time (Float8Linear, applied from outside the model).
"""
import gc
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.models.clip import CLIPTextConfig, CLIPTextModel
from ..engine.models.flux import FluxTransformer, FluxTransformerConfig
from ..engine.models.t5 import T5Config, T5EncoderModel, t5_dtype, t5_key
from ..engine.models.vae import VAE, VAEConfig
from ..engine.samplers.flow import FlowMatchConfig
from . import detect, files, flux_keys, keys, sd3
from .files import CheckpointError
from .flow_model import FlowModel
from .parts import Part, materialize, read_json
from .t5_tokenizer import T5Tokenizer
from .tokenizer import Tokenizer

# component -> (folder, weights file stem) in a diffusers FLUX folder
COMPONENTS = {"transformer": ("transformer", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
              "text_encoder": ("text_encoder", "model"), "text_encoder_2": ("text_encoder_2", "model")}
APART = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl", "vae": "ae"}  # ComfyUI / BFL file names
WHAT = {"text_encoder": "CLIP-L text encoder", "text_encoder_2": "T5-XXL text encoder", "vae": "autoencoder"}
TRANSFORMER_PREFIX = "model.diffusion_model."
BUNDLED = {"vae": ("vae.", "first_stage_model."), "text_encoder": ("text_encoders.clip_l.transformer.",),
           "text_encoder_2": ("text_encoders.t5xxl.transformer.",)}  # ComfyUI's all-in-one checkpoints
# What a single file does not record, as the released FLUX.1 folders set it (scheduler/scheduler_config.json,
# vae/config.json). schnell is timestep-distilled on a static shift of 1.
COMMON_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "base_shift": 0.5,
                    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHEDULER = {True: {**COMMON_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True},
             False: {**COMMON_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}}
VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR, VAE_SAMPLE_SIZE = 0.3611, 0.1159, 1024
# T5 tokens of the context: FluxPipeline's max_sequence_length default (512) for dev; schnell was trained on 256
# (BFL's reference code: max_length 256 for flux-schnell, and its model card passes max_sequence_length=256).
MAX_SEQUENCE_LENGTH = {True: 512, False: 256}
GUIDANCE_KEY = "time_text_embed.guidance_embedder.linear_1.weight"


def _build(name: str, config: dict) -> torch.nn.Module:
    if name == "transformer":
        return FluxTransformer(FluxTransformerConfig.from_json(config))
    if name == "vae":
        return VAE(VAEConfig.from_json(config))
    if name == "text_encoder_2":
        return T5EncoderModel(T5Config.from_json(config))
    return CLIPTextModel(CLIPTextConfig.from_json(config))


def _text_key(name: str, k: str, stored) -> str | None:
    """A transformers-named text encoder key -> the engine's (None: not used). FLUX pools CLIP-L unprojected:
    ComfyUI's clip_l.safetensors carries OpenAI's projection, which CLIPTextModel has no place for."""
    if name == "text_encoder_2":
        return t5_key(k, stored)
    return None if k in ("logit_scale", "text_projection.weight") else keys.text_folder_key(k)


def _add(part: Part, name: str, entries: list, prefix: str = "", vae_blocks: int = 0) -> None:
    """(file, stored key, shape) entries of one component (diffusers folder names, or BFL's LDM names for an ae
    file when vae_blocks is set) after prefix -> part's tensors."""
    stored = {src.removeprefix(prefix) for _, src, _ in entries}
    for path, src, shape in entries:
        k = src.removeprefix(prefix)
        if name == "vae":
            out = keys.vae_key(k, vae_blocks) if vae_blocks else keys.vae_folder_key(k)
            if out is None:
                raise CheckpointError(f"{path}: unexpected key {src!r} in a FLUX autoencoder")
            k, t = out
        else:
            k, t = (_text_key(name, k, stored) if name.startswith("text_encoder") else k), keys.ID
        if k is not None:
            part.tensors[k], part.shapes[k] = (path, src, t), keys.transform_shape(shape, t)


def _vae_blocks(names) -> int:
    return len({m.group(1) for k in names if (m := re.search(r"encoder\.down\.(\d+)\.", k))})


def folder_parts(root: Path, prefer_fp16: bool, names=tuple(COMPONENTS)) -> dict[str, Part]:
    parts = {}
    for name in names:
        sub, stem = COMPONENTS[name]
        if not (root / sub / "config.json").is_file():
            raise CheckpointError(f"{root}: a FLUX folder without {sub}/config.json")
        parts[name] = Part(read_json(root / sub / "config.json"), {}, {})
        _add(parts[name], name, list(files.folder_tensors(root / sub, stem, prefer_fp16)))
    return parts


def _apart_file(folder: Path, name: str) -> Path | None:
    """ComfyUI's clip_l / t5xxl_* or BFL's ae file in folder; the widest dtype first (t5xxl_fp16 over t5xxl_fp8)."""
    found = sorted(folder.glob(APART[name] + "*.safetensors"), key=lambda p: ("fp8" in p.name, p.name))
    return found[0] if found else None


def _file_part(path: Path, name: str) -> Part:
    """One component from its own file (clip_l, t5xxl_*, ae), with or without the all-in-one prefix."""
    header = files.read_header(path)
    prefix = next((p for p in BUNDLED[name] if any(k.startswith(p) for k in header)), "")
    part = Part({}, {}, {})
    _add(part, name, [(path, k, shape) for k, (_, shape) in header.items()], prefix,
         _vae_blocks(header) if name == "vae" else 0)
    return part


def apart_parts(source: Path, prefer_fp16: bool, names) -> dict[str, Part]:
    """The components `names` from text_encoders= (a diffusers FLUX folder, or a folder of separate files)."""
    if (source / "model_index.json").is_file():
        index = read_json(source / "model_index.json")
        if not detect.is_flux_folder(index):
            raise CheckpointError(f"{source}: text_encoders= is a {index.get('_class_name')} folder, not a FLUX one")
        return folder_parts(source, prefer_fp16, [n for n in names if (source / COMPONENTS[n][0]).is_dir()])
    if not source.is_dir():
        raise CheckpointError(f"{source}: text_encoders= must be a folder (clip_l.safetensors, t5xxl_*.safetensors, "
                              f"ae.safetensors) or a diffusers FLUX folder")
    return {name: _file_part(path, name) for name in names if (path := _apart_file(source, name)) is not None}


def file_parts(path: Path, header: dict, prefer_fp16: bool, text_encoders=None) -> dict[str, Part]:
    """The components of a BFL transformer file or a ComfyUI all-in-one file (+ what it lacks from text_encoders
    and an ae.safetensors beside it), configs empty."""
    prefixed = any(k.startswith(TRANSFORMER_PREFIX) for k in header)
    parts = {name: Part({}, {}, {}) for name in COMPONENTS}
    bundled, unknown = {name: [] for name in BUNDLED}, []
    for src, (_, shape) in header.items():
        name = next((n for n, ps in BUNDLED.items() if src.startswith(ps)), None)
        if name is not None:
            bundled[name].append((path, src, shape))
            continue
        if prefixed and not src.startswith(TRANSFORMER_PREFIX):
            unknown.append(src)
            continue
        out = flux_keys.transformer_key(src.removeprefix(TRANSFORMER_PREFIX))
        if out is None:
            unknown.append(src)
        for k, t in out or ():
            parts["transformer"].tensors[k], parts["transformer"].shapes[k] = (path, src, t), keys.transform_shape(shape, t)
    for name, entries in bundled.items():
        if entries:
            prefix = next(p for p in BUNDLED[name] if entries[0][1].startswith(p))
            _add(parts[name], name, entries, prefix, _vae_blocks(e[1] for e in entries) if name == "vae" else 0)
    if unknown:
        raise CheckpointError(f"{path}: unexpected key {unknown[0]!r} (shape {header[unknown[0]][1]}), not part of a "
                              f"FLUX.1 single-file checkpoint; {len(unknown)} unknown: {unknown[:8]}")
    if not parts["transformer"].tensors:
        raise CheckpointError(f"{path}: no FLUX transformer weights (no double_blocks.* keys)")
    te = files.resolve(text_encoders) if text_encoders is not None else None
    missing = [n for n in APART if not parts[n].tensors]
    if missing and te is not None:
        parts.update(apart_parts(te, prefer_fp16, missing))
    if not parts["vae"].tensors and (path.parent / "ae.safetensors").is_file():  # BFL's repository layout
        parts["vae"] = _file_part(path.parent / "ae.safetensors", "vae")
    missing = [n for n in APART if not parts[n].tensors]
    if missing:
        where = f" nor in {text_encoders}" if te is not None else ""
        raise CheckpointError(
            f"{path}: no {', '.join(WHAT[n] for n in missing)} in the file{where}; pass text_encoders=<a folder with "
            f"clip_l.safetensors, t5xxl_*.safetensors and ae.safetensors, or a diffusers FLUX folder>")
    return parts


def _infer_configs(path: Path, parts: dict) -> None:
    try:
        for name, part in parts.items():
            if part.config:  # from a diffusers text_encoders= folder
                continue
            s = part.shapes
            if name == "transformer":
                part.config = flux_keys.transformer_config(s, path)
            elif name == "vae":
                part.config = {**sd3.vae_config(s), "sample_size": VAE_SAMPLE_SIZE, "scaling_factor": VAE_SCALING_FACTOR,
                               "shift_factor": VAE_SHIFT_FACTOR}
            else:
                part.config = sd3.t5_config(s) if name == "text_encoder_2" else detect.text_config(s, sd2=False)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} needed to infer the architecture") from None


def _tokenizer_folder(candidates, t5: bool) -> Path | None:
    for c in candidates:
        if c is not None and (((c / "tokenizer.json").is_file() or (c / "spiece.model").is_file()) if t5
                              else (c / "vocab.json").is_file() or (c / "tokenizer.json").is_file()):
            return c
    return None


class Float8Linear(nn.Module):
    """A Linear whose weight is stored in float8 (e4m3fn: 448 at most) with one fp32 scale per tensor (amax / 448,
    so the largest weight uses the whole range), upcast to the input's dtype at each call: half the bf16 bytes at
    rest, one layer's full-precision weight alive at a time. State-dict keys stay the Linear's (weight, bias)."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = (w.abs().amax().float() / torch.finfo(storage).max).clamp(min=torch.finfo(torch.float32).tiny)
        self.weight = nn.Parameter((w.float() / scale).to(storage), requires_grad=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype).mul_(self.scale.to(x.dtype)), self.bias)


def store_float8(model: nn.Module, storage=torch.float8_e4m3fn, device=None,
                 under=("transformer_blocks", "single_transformer_blocks")) -> nn.Module:
    """Replace the Linear layers inside the blocks `under` (99 % of FLUX's parameters; the embedders and the output
    projection stay exact) by Float8Linear, moving each to `device` as it is converted (so a transformer read on the
    CPU never exists on the device in full precision)."""
    for prefix in under:
        for name, mod in list(model.get_submodule(prefix).named_modules()):
            for child, lin in list(mod.named_children()):
                if type(lin) is nn.Linear:
                    setattr(mod, child, Float8Linear(lin, storage).to(device or lin.weight.device))
    return model.to(device) if device is not None else model


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_flux(root: Path, device, dtype, config=None, text_encoders=None, revision="main", vae_dtype=None,
              prompts=None, storage=None) -> FlowModel:
    """A FLUX.1 diffusers folder or BFL transformer file (root, already resolved) -> FlowModel; see the module
    docstring. config / text_encoders: for a single file only. prompts: sequential loading (encode, free the text
    encoders, then load the transformer); the model then encodes only those prompts. storage: torch.float8_e4m3fn
    for fp8 transformer weights (compute stays in dtype)."""
    device, fp16 = torch.device(device), dtype == torch.float16
    if storage not in (None, torch.float8_e4m3fn):
        raise ValueError(f"storage={storage}: only torch.float8_e4m3fn (or None: the compute dtype) is supported")
    te = croot = None
    if root.is_dir():
        index = read_json(root / "model_index.json")
        why = detect.unsupported_flux_folder(index)
        if why:
            raise CheckpointError(f"{root}: {why} is not supported (only the FLUX.1 dev / schnell text-to-image models)")
        parts = folder_parts(root, fp16)
        sched, tok_root, t5_tok = read_json(root / "scheduler" / "scheduler_config.json"), root, root / "tokenizer_2"
    else:
        header = files.read_header(root)
        why = detect.unsupported_flux_file(header)
        if why:
            raise CheckpointError(f"{root}: {why} is not supported (only the FLUX.1 dev / schnell text-to-image models)")
        parts = file_parts(root, header, fp16, text_encoders)
        te = files.resolve(text_encoders) if text_encoders is not None else None
        croot = files.resolve(config, revision=revision) if config is not None else None
        if croot is not None:
            for name, part in parts.items():
                part.config = read_json(croot / COMPONENTS[name][0] / "config.json")
        _infer_configs(root, parts)
        sched = read_json(croot / "scheduler" / "scheduler_config.json") if croot is not None else None
        te_folder = te if te is not None and (te / "model_index.json").is_file() else None
        tok_root = croot or te_folder
        t5_tok = _tokenizer_folder([croot and croot / "tokenizer_2", te and te / "tokenizer_2", te,
                                    root.parent / "tokenizer_2"], t5=True)
        if t5_tok is None:
            raise CheckpointError(f"{root}: T5's tokenizer is needed and no tokenizer_2/ was found; pass config=<a "
                                  f"diffusers FLUX folder> or text_encoders=<a folder holding tokenizer_2/ or T5's "
                                  f"tokenizer.json / spiece.model>")
    dev = GUIDANCE_KEY in parts["transformer"].tensors
    declared = parts["transformer"].config.get("guidance_embeds")
    if declared is not None and bool(declared) != dev:
        raise CheckpointError(f"{root}: the transformer config says guidance_embeds={declared} but the weights "
                              f"{'have' if dev else 'lack'} the guidance embedding (dev has it, schnell not)")
    parts["transformer"].config = {**parts["transformer"].config, "guidance_embeds": dev}
    odd = [k for k in ("latents_mean", "latents_std") if parts["vae"].config.get(k) is not None]
    if odd:
        raise CheckpointError(f"{root}: the VAE has {', '.join(odd)}, which FLUX.1's VAE does not use")
    try:
        scheduler = FlowMatchConfig.from_json(sched if sched is not None else SCHEDULER[dev])
    except AssertionError as e:
        raise CheckpointError(f"{root}: unsupported scheduler configuration: {e}") from None
    # FLUX's CLIP-L tokenizer is OpenAI's, padding with <|endoftext|>
    tokenizer = Tokenizer.from_folder(tok_root / "tokenizer") if tok_root is not None else Tokenizer.bundled(pad="sd1")
    vae = parts["vae"].config
    m = FlowModel(
        kind="flux", transformer=None, vae=None, scheduler=scheduler, device=device, dtype=dtype, source=str(root),
        vae_scaling_factor=float(vae.get("scaling_factor", VAE_SCALING_FACTOR)),
        vae_shift_factor=float(vae.get("shift_factor") or 0.0), tokenizer=tokenizer,
        tokenizer_2=T5Tokenizer.from_folder(t5_tok, MAX_SEQUENCE_LENGTH[dev]), max_sequence_length=MAX_SEQUENCE_LENGTH[dev],
        guidance_embeds=dev, vae_dtype=vae_dtype if vae_dtype not in (None, dtype) else None)
    m.text_encoder = materialize("text_encoder", parts["text_encoder"], device, dtype, _build)
    m.text_encoder_2 = materialize("text_encoder_2", parts["text_encoder_2"], device, dtype, _build, t5_dtype)
    if prompts is not None:  # sequential: T5-XXL (9.5 GB in bf16) leaves before the transformer (24 GB) arrives
        with torch.no_grad():
            m.keep_prompts(list(prompts))
        m.text_encoder = m.text_encoder_2 = None
        _free(device)
    m.vae = materialize("vae", parts["vae"], device, vae_dtype or dtype, _build)
    if storage is None:
        m.transformer = materialize("transformer", parts["transformer"], device, dtype, _build)
    else:  # read on the CPU, converted layer by layer onto the device: never resident there in full precision
        cpu = materialize("transformer", parts["transformer"], torch.device("cpu"), dtype, _build)
        m.transformer = store_float8(cpu, storage, device)
    return m
