"""A small random-weight SD1-style checkpoint, built by the engine itself when no --model is given.

It exists so that every command (edit, mask, batch, info) runs end to end on a fresh machine with no
download: it proves the pipeline (loading, tokenizer, text encoder, mask pass, inversion, decoding, image
I/O), not the picture — with random weights the edit is noise-like by design.

The folder is a real diffusers layout written from the engine's own modules (engine.unet / engine.vae /
engine.clip state dicts, safetensors) plus the bundled CLIP vocabulary, so weights.load_model reads it like
any downloaded checkpoint. Weights are drawn from a fixed seed, so the folder (and its hash) is the same on
every machine. It is cached under $DIFFEDIT_CACHE_DIR or $XDG_CACHE_HOME/diffedit-engine (default
~/.cache/diffedit-engine) and built atomically (temp folder, then rename), so concurrent first runs are safe.
"""
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine.models.clip import CLIPTextConfig, CLIPTextModel
from ..engine.models.unet import UNet, UNetConfig
from ..engine.models.vae import VAE as VAEModel, VAEConfig
from . import vocab

NAME = "random-sd1-v1"  # bump when the recipe changes, so a stale cache is never reused
NOTE = ("no --model given: using a small random-weight model built by the engine; "
        "it proves the pipeline runs end to end, not the picture (the edit will look like noise)")

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
           block_out_channels=(8, 16, 16, 16), sample_size=64, scaling_factor=0.18215,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="epsilon", timestep_spacing="leading")


def cache_root() -> Path:
    if os.environ.get("DIFFEDIT_CACHE_DIR"):
        return Path(os.environ["DIFFEDIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffedit-engine"


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Default inits leave norms at 1 and some output convs at 0; random values of a sane scale exercise
    every weight instead (norm scales near 1, small biases, weights ~ N(0, 1/fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def _config_json(cfg, class_name: str, **extra) -> str:
    d = {"_class_name": class_name, **dataclasses.asdict(cfg), **extra}
    return json.dumps(d, indent=2, default=list)


def _save(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def write_folder(root: Path, seed: int = 0) -> Path:
    """Write the random checkpoint as a diffusers folder at root (which must not exist yet)."""
    root = Path(root)
    parts = {
        "unet": (UNet(UNetConfig(**UNET)), "UNet2DConditionModel", "diffusion_pytorch_model.safetensors"),
        "vae": (VAEModel(VAEConfig(**VAE)), "AutoencoderKL", "diffusion_pytorch_model.safetensors"),
        "text_encoder": (CLIPTextModel(CLIPTextConfig(**CLIP)), None, "model.safetensors"),
    }
    for i, (sub, (module, class_name, fname)) in enumerate(parts.items()):
        (root / sub).mkdir(parents=True)
        _randomize(module, seed * 10 + i)
        _save(module, root / sub / fname)
        if class_name:
            (root / sub / "config.json").write_text(_config_json(module.config, class_name))
        else:  # transformers layout
            d = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(module.config),
                 "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
            (root / sub / "config.json").write_text(json.dumps(d, indent=2))
    tok = root / "tokenizer"
    vocab.write_hf_files(tok)
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77}, indent=2))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffedit_note": "random weights built by weights/random_model.py",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2))
    return root


def random_model_path(cache: Path | None = None) -> Path:
    """Path of the cached random checkpoint, building it on first use."""
    cache = Path(cache) if cache else cache_root()
    final = cache / NAME
    if (final / "model_index.json").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=cache))
    try:
        write_folder(tmp / "m")
        try:
            os.replace(tmp / "m", final)
        except OSError:  # another process finished first (final exists, non-empty): use theirs
            if not (final / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
