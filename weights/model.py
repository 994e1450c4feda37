"""load_model: a diffusers folder, a single CompVis/A1111 .safetensors file or a cached hub id -> Model.

Modules are built on the meta device (no memory, no init) and filled by a strict load_state_dict(assign=True)
with tensors read straight from the safetensors files onto the target device, cast per tensor: the weights
exist once in memory. Key sets and shapes are checked against the module before any tensor is read.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.models import sdxl
from ..engine.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ..engine.models.unet import UNet, UNetConfig
from ..engine.models.vae import VAE, VAEConfig
from . import detect, files, flux, flux_keys, keys, sd3
from . import scheduler as schedulers
from .files import CheckpointError
from .flow_model import FlowModel
from .parts import Part, check  # noqa: F401  (check: re-exported, the loaders' shared key/shape check)
from .parts import materialize as fill
from .parts import read_json as _json
from .tokenizer import Tokenizer

# component -> (folder, weights file stem) in a diffusers folder
COMPONENTS = {"unet": ("unet", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
              "text_encoder": ("text_encoder", "model")}
SDXL_COMPONENTS = {**COMPONENTS, "text_encoder_2": ("text_encoder_2", "model")}


@dataclass
class Model:
    kind: str  # "sd1" | "sd2" | "sdxl" | "sd1-inpaint" | "sd2-inpaint" | "sdxl-inpaint"
    prediction_type: str  # "epsilon" | "v_prediction"
    tokenizer: object  # weights.tokenizer.Tokenizer: list[str] -> LongTensor (B, 77)
    text_encoder: torch.nn.Module  # engine.clip.CLIPTextModel
    unet: torch.nn.Module  # engine.unet.UNet
    vae: torch.nn.Module  # engine.vae.VAE
    vae_scaling_factor: float
    scheduler: object  # engine.ddim.SchedulerConfig | engine.dpm.DPMSolverConfig (= schedulers.scheduler)
    device: torch.device
    dtype: torch.dtype
    source: str
    vae_dtype: torch.dtype | None = None  # the VAE's own dtype when it differs from dtype (fp32 VAE, fp16 UNet)
    schedulers: object = None  # weights.scheduler.Schedulers: scheduler + inverse_scheduler, select(family)
    # SD-XL only: the second tokenizer (pads with "!") and OpenCLIP bigG with its projection.
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None  # engine.clip.CLIPTextModelWithProjection
    force_zeros_for_empty_prompt: bool = False  # SD-XL: the empty prompt's embeddings are zeros

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prompts -> (context (B, 77, D), pooled (B, P) or None) on self.device / self.dtype. SD 1.x/2.x: the
        text encoder's last hidden state, no pooled embedding; SD-XL: see engine.sdxl.encode_prompt."""
        if self.text_encoder_2 is not None:
            return sdxl.encode_prompt(self, prompts)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.text_encoder(self.tokenizer(prompts).to(self.device)).to(self.dtype), None


def _build(name: str, config: dict) -> torch.nn.Module:
    if name == "unet":
        return UNet(UNetConfig.from_json(config))
    if name == "vae":
        return VAE(VAEConfig.from_json(config))
    if name == "text_encoder_2":
        return CLIPTextModelWithProjection(CLIPTextConfig.from_json(config, "CLIPTextModelWithProjection"))
    return CLIPTextModel(CLIPTextConfig.from_json(config))


def materialize(name: str, part: Part, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Stable Diffusion 1.x/2.x/XL component: parts.materialize with this family's modules."""
    return fill(name, part, device, dtype, _build)


def sd_vae(root: Path, config: dict) -> None:
    """Refuse a VAE that is not Stable Diffusion 1.x/2.x/XL's: a shift or per-channel statistics would change what
    the sampler's latent is (SD 3.x's and FLUX's (mean - shift) * scale), and those VAEs drop the quant convs."""
    odd = [k for k in ("shift_factor", "latents_mean", "latents_std") if config.get(k) is not None]
    odd += [f"{k}=False" for k in ("use_quant_conv", "use_post_quant_conv") if config.get(k, True) is False]
    if odd:
        raise CheckpointError(f"{root}: the VAE is not a Stable Diffusion 1.x/2.x/XL VAE ({', '.join(odd)}; an SD 3.x "
                              f"or FLUX VAE?)")


def folder_parts(root: Path, prefer_fp16: bool, components: dict = COMPONENTS) -> dict[str, Part]:
    """The model components of a diffusers folder."""
    parts = {}
    for name, (sub, stem) in components.items():
        tensors, shapes = {}, {}
        for path, src, shape in files.folder_tensors(root / sub, stem, prefer_fp16):
            k, t = src, keys.ID
            if name == "vae":
                k, t = keys.vae_folder_key(src)
            elif name.startswith("text_encoder"):
                k = keys.text_folder_key(src)
            if k is None:
                continue
            tensors[k], shapes[k] = (path, src, t), keys.transform_shape(shape, t)
        parts[name] = Part(_json(root / sub / "config.json"), tensors, shapes)
    return parts


def file_parts(path: Path, header: dict | None = None) -> tuple[dict[str, Part], bool]:
    """The components of a single CompVis/A1111/SGM file, keys converted, configs inferred; and whether it is
    SD2. header (key -> (dtype, shape)) defaults to the file's."""
    header = files.read_header(path) if header is None else header
    family = detect.unsupported_file(header)
    if family:
        raise CheckpointError(f"{path}: {family} checkpoints are not supported (only Stable Diffusion 1.x/2.x/XL)")
    lay = keys.layout(header)
    parts = {name: Part({}, {}, {}) for name in (SDXL_COMPONENTS if lay.sdxl else COMPONENTS)}
    unknown = []
    for src, (_, shape) in header.items():
        out = keys.convert(src, lay)
        if out is None:
            unknown.append(src)
        for name, k, t in out or ():
            parts[name].tensors[k], parts[name].shapes[k] = (path, src, t), keys.transform_shape(shape, t)
    if unknown:
        raise CheckpointError(f"{path}: unexpected key {unknown[0]!r} (shape {header[unknown[0]][1]}), not part of "
                              f"an SD 1.x/2.x/XL single-file checkpoint; {len(unknown)} unknown: {unknown[:8]}")
    text = (("text_encoder", keys.SDXL_CLIP_PREFIX), ("text_encoder_2", keys.SDXL_OPENCLIP_PREFIX)) if lay.sdxl \
        else (("text_encoder", "cond_stage_model."),)
    for name, prefix in (("unet", keys.UNET_PREFIX), ("vae", keys.VAE_PREFIX), *text):
        if not parts[name].tensors:
            raise CheckpointError(f"{path}: no {name} weights (no {prefix}* keys); not an SD 1.x/2.x/XL checkpoint")
    openclip = any(k.startswith(keys.OPENCLIP_PREFIX) for k in header)
    try:
        sd2 = not lay.sdxl and detect.is_sd2(parts["unet"].shapes, openclip)
        pooled = parts["text_encoder_2"].shapes["text_projection.weight"][0] if lay.sdxl else None
        parts["unet"].config = detect.unet_config(parts["unet"].shapes, lay.layers_per_block, sd2, pooled)
        parts["vae"].config = detect.vae_config(parts["vae"].shapes, lay.sdxl)
        parts["text_encoder"].config = detect.text_config(parts["text_encoder"].shapes, sd2)
        if lay.sdxl:
            parts["text_encoder_2"].config = detect.text_config(parts["text_encoder_2"].shapes, True)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} needed to infer the architecture") from None
    return parts, sd2


def is_sdxl(path) -> bool:
    """Whether a local checkpoint (a diffusers folder or a single .safetensors file) is SD-XL, from its file
    names or its safetensors header only: what a caller checks before loading (e.g. compat="diffusers", which
    has no SD-XL pipeline to reproduce)."""
    p = Path(path)
    if p.is_dir():
        return (p / "text_encoder_2").is_dir()
    return p.suffix.lower() == ".safetensors" and keys.layout(files.read_header(p)).sdxl


def _flow_only(prediction_type, config=None, text_encoders=None) -> None:
    """Arguments an SD 3.x / FLUX checkpoint cannot take: it predicts a velocity; a folder brings its own configs."""
    if prediction_type is not None:
        raise ValueError(f"prediction_type={prediction_type!r}: SD 3.x / FLUX predict the flow velocity, nothing to "
                         f"choose")
    if config is not None or text_encoders is not None:
        raise ValueError("config= and text_encoders= apply to single-file SD 3.x / FLUX checkpoints, not to a folder")


def load_model(path, device="cpu", dtype=torch.float32, prediction_type=None, config=None,
               revision="main", vae_dtype=None, text_encoders=None) -> Model | FlowModel:
    """Load a Stable Diffusion 1.x/2.x/XL checkpoint into the engine's modules.

    path: a diffusers folder, a single CompVis/A1111/SGM .safetensors file, or a hub id ("org/name") in the local
    Hugging Face cache. prediction_type overrides the checkpoint's ("epsilon" | "v_prediction"); a single file
    does not record it (see detect.default_prediction_type). config: for a single file, a diffusers folder or
    hub id whose config.json files, scheduler and tokenizers replace the inferred ones (as diffusers'
    from_single_file(config=...)); only the weights come from the file. vae_dtype: the VAE's dtype when it
    should differ from dtype (the SD VAE can overflow in fp16; torch.float32 keeps it exact). SD-XL's VAE says
    so itself (force_upcast, true unless it is an fp16-fixed VAE): with dtype float16 and no vae_dtype it loads
    in float32. Turbo models load as their base family (SD-Turbo: sd2, SDXL-Turbo: sdxl) with their scheduler's
    trailing timestep spacing. SD 3 / 3.5 / 3.5 Medium folders and Stability's single files load as a FlowModel
    (weights/sd3.py; text_encoders= names the encoders a single file lacks), FLUX.1 dev / schnell folders and BFL
    transformer files likewise (weights/flux.py; its load_flux also takes the memory options). Refiner-only SD-XL,
    SD3 ControlNet and FLUX Fill/Depth/FLUX.2 checkpoints are refused, naming the family."""
    device, fp16 = torch.device(device), dtype == torch.float16
    root = files.resolve(path, prefer_fp16=fp16, revision=revision)
    force_zeros = False
    if root.is_dir():
        if not (root / "model_index.json").is_file():
            found = sorted(p.name for p in root.iterdir())[:8]
            raise CheckpointError(f"{root}: not a diffusers checkpoint folder (no model_index.json; found {found}). "
                                  f"Pass the folder that holds model_index.json, or a single .safetensors file.")
        index = _json(root / "model_index.json")
        if detect.is_flux_folder(index):
            _flow_only(prediction_type, config, text_encoders)
            return flux.load_flux(root, device, dtype, vae_dtype=vae_dtype)
        if sd3.is_sd3_folder(index):
            _flow_only(prediction_type, config, text_encoders)
            return sd3.load_sd3(root, device, dtype, vae_dtype=vae_dtype)
        family = detect.unsupported_folder(root, index)
        if family:
            raise CheckpointError(f"{root}: {family} checkpoints are not supported "
                                  f"(only Stable Diffusion 1.x/2.x/XL)")
        sdxl = (root / "text_encoder_2").is_dir()
        parts = folder_parts(root, fp16, SDXL_COMPONENTS if sdxl else COMPONENTS)
        sched, sched_root = _json(root / "scheduler" / "scheduler_config.json"), root
        tokenizers = [Tokenizer.from_folder(root / "tokenizer")]
        if sdxl:
            tokenizers.append(Tokenizer.from_folder(root / "tokenizer_2"))
            force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))  # the SD-XL pipelines' default
        sd2 = not sdxl and (parts["unet"].config.get("cross_attention_dim") == detect.SD2_CONTEXT_DIM or
                            parts["text_encoder"].config.get("hidden_act") == "gelu")  # OpenCLIP's activation: SD2
        kind = detect.kind(sd2, parts["unet"].config.get("in_channels", 4), sdxl)
        pred = prediction_type or sched.get("prediction_type", "epsilon")
    else:
        if root.suffix.lower() in files.PICKLE_SUFFIXES:
            files.refuse_pickle(root)
        header = files.read_header(root)
        if flux_keys.is_flux_file(header):
            _flow_only(prediction_type)
            return flux.load_flux(root, device, dtype, config=config, text_encoders=text_encoders, revision=revision,
                                  vae_dtype=vae_dtype)
        if sd3.is_sd3_file(header):
            _flow_only(prediction_type)
            return sd3.load_sd3(root, device, dtype, config=config, text_encoders=text_encoders, revision=revision,
                                vae_dtype=vae_dtype)
        if text_encoders is not None:
            raise ValueError("text_encoders= applies to SD 3.x / FLUX single files only")
        parts, sd2 = file_parts(root, header)
        sdxl = "text_encoder_2" in parts
        force_zeros = sdxl
        kind = detect.kind(sd2, parts["unet"].config["in_channels"], sdxl)
        if config is not None:
            croot = files.resolve(config, revision=revision)
            for name, (sub, _) in (SDXL_COMPONENTS if sdxl else COMPONENTS).items():
                parts[name].config = _json(croot / sub / "config.json")
            sched, tokenizers = _json(croot / "scheduler" / "scheduler_config.json"), [Tokenizer.from_folder(croot)]
            sched_root = croot
            if sdxl:
                tokenizers.append(Tokenizer.from_folder(croot / "tokenizer_2"))
                force_zeros = bool(_json(croot / "model_index.json").get("force_zeros_for_empty_prompt", True))
            pred = prediction_type or sched.get("prediction_type", "epsilon")
        else:
            sched, sched_root, tokenizers = {}, None, [Tokenizer.bundled(pad="sd2" if sd2 else "sd1")]
            if sdxl:  # SD-XL's second tokenizer pads with "!" as SD2's does
                tokenizers.append(Tokenizer.bundled(pad="sd2"))
            pred = prediction_type or detect.default_prediction_type(kind)
            if kind == "sd2" and prediction_type is None:
                warnings.warn(f"{root.name}: an SD2 single file does not record its prediction type; assuming "
                              f"v_prediction (SD 2.x 768-v). For SD2-base (512) checkpoints pass "
                              f"prediction_type='epsilon' (CLI: --prediction-type epsilon).", stacklevel=2)
    sd_vae(root, parts["vae"].config)
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {pred!r}")
    scheds = schedulers.read(sched_root, pred) if sched_root is not None else schedulers.from_json({}, None, pred)
    if vae_dtype is None and sdxl and fp16 and parts["vae"].config.get("force_upcast", True):
        vae_dtype = torch.float32  # SD-XL's VAE overflows in fp16 (NaN/black images) unless it is a fixed one
    modules = {name: materialize(name, part, device, (vae_dtype or dtype) if name == "vae" else dtype)
               for name, part in parts.items()}
    return Model(
        kind=kind, prediction_type=pred, tokenizer=tokenizers[0],
        text_encoder=modules["text_encoder"], unet=modules["unet"], vae=modules["vae"],
        vae_scaling_factor=float(parts["vae"].config.get("scaling_factor", detect.DEFAULT_SCALING_FACTOR)),
        scheduler=scheds.scheduler, device=device, dtype=dtype, source=str(root), schedulers=scheds,
        vae_dtype=vae_dtype if vae_dtype not in (None, dtype) else None,
        tokenizer_2=tokenizers[1] if sdxl else None, text_encoder_2=modules.get("text_encoder_2"),
        force_zeros_for_empty_prompt=force_zeros)
