"""Random-weight Stable Diffusion checkpoints with the REAL SD 1.5 / SD 2.1 (768-v) shapes, written as a
diffusers folder by diffusers'/transformers' own save_pretrained (benchmarks may use diffusers; the engine
may not). The configs are the ones the public checkpoints ship, so load paths, shapes and FLOPs are those
of the real models; only the weight values are random.

    python benchmarks/make_model.py --kind sd15 --out /tmp/diffedit-bench/sd15     # ~4.3 GB fp32
    python benchmarks/make_model.py --kind sd21 --device cuda --dtype float16

A folder that already holds a complete build (marker file `.complete` with the same spec) is left alone.
"""
import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_ROOT = Path(os.environ.get("DIFFEDIT_BENCH_DIR", "/tmp/diffedit-bench"))

# Values copied from the public checkpoints' config.json files (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1); every key not named takes the class default, as in those files.
UNET = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, act_fn="silu",
                 center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                 mid_block_scale_factor=1, norm_eps=1e-5),
    # SD 2.x: head dim 64 everywhere, expressed in diffusers' (mis)naming as per-block head counts.
    "sd21": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, norm_num_groups=32, act_fn="silu",
                 center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                 mid_block_scale_factor=1, norm_eps=1e-5, use_linear_projection=True, upcast_attention=True,
                 dual_cross_attention=False),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
           block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768),
    # OpenCLIP ViT-H text tower minus its last layer (SD 2 uses the penultimate layer), converted.
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512),
}
PAD = {"sd15": "<|endoftext|>", "sd21": "!"}  # SD2's tokenizer pads with "!" (id 0)
IMAGE_SIZE = {"sd15": 512, "sd21": 768}
SCHEDULER = {
    "sd15": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False},
    "sd21": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
}


@dataclass(frozen=True)
class Options:
    kind: str = "sd15"
    out: str = ""
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False


def _randomize(module: torch.nn.Module, seed: int, device: torch.device) -> None:
    """Fill every tensor with values of a sane scale: weights N(0, 1/fan_in) keep each layer's output
    variance near its input's, norm scales near 1, small biases. A fresh diffusers init would zero some
    tensors, which hides wiring errors and makes the model's output trivially small."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, device=device))
            elif "embedding" in name and p.ndim == 2 and "linear" not in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=device))  # token/position tables
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) / math.sqrt(p[0].numel()))


def _materialise(cls, device: torch.device, **cfg):
    """Build on the meta device and allocate uninitialised storage on `device`: skips the class's own
    (slow, soon overwritten) init of ~1e9 parameters. Only valid for modules without buffers."""
    with torch.device("meta"):
        m = cls(**cfg)
    assert not list(m.buffers()), f"{cls.__name__} has buffers; meta construction would lose them"
    return m.to_empty(device=device)


def build(opts: Options) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from weights import vocab

    kind = opts.kind
    out = Path(opts.out) if opts.out else DEFAULT_ROOT / kind
    dtype = getattr(torch, opts.dtype)
    device = torch.device(opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = {"kind": kind, "dtype": opts.dtype, "seed": opts.seed, "version": 1}
    marker = out / ".complete"
    if not opts.force and marker.exists() and json.loads(marker.read_text()) == spec:
        print(f"[make_model] {out}: already built ({opts.dtype}), skipping")
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()

    # One model alive at a time: the machine's memory is shared.
    unet = _materialise(UNet2DConditionModel, device, **UNET[kind])
    _randomize(unet, opts.seed * 10 + 0, device)
    unet.to(dtype).save_pretrained(out / "unet")
    del unet
    gc.collect()

    vae = _materialise(AutoencoderKL, device, sample_size=IMAGE_SIZE[kind], **VAE)
    _randomize(vae, opts.seed * 10 + 1, device)
    vae.to(dtype).save_pretrained(out / "vae")
    del vae
    gc.collect()

    # transformers' CLIP carries a position-id buffer, so it is built normally (123M/340M parameters: cheap).
    clip_cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                              pad_token_id=1, **CLIP[kind])
    with torch.device(device):
        clip = CLIPTextModel(clip_cfg)
    _randomize(clip, opts.seed * 10 + 2, device)
    clip.to(dtype).save_pretrained(out / "text_encoder")
    del clip
    gc.collect()

    tok_dir = out / "tokenizer"
    vocab_file, merges_file = vocab.write_hf_files(tok_dir)
    CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=PAD[kind], model_max_length=77).save_pretrained(tok_dir)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER[kind], indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", SCHEDULER[kind]["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=2))
    marker.write_text(json.dumps(spec))
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e9
    print(f"[make_model] {out}: {kind} {opts.dtype} built on {device} in {time.perf_counter() - t0:.1f} s, {size:.2f} GB")
    return out


def ensure(kind: str, out: str | Path | None = None, device: str = "auto", dtype: str = "float32") -> Path:
    """Build the folder if needed (in a child process, so its memory is returned to the OS at once)."""
    import subprocess

    out = Path(out) if out else DEFAULT_ROOT / kind
    marker = out / ".complete"
    spec = {"kind": kind, "dtype": dtype, "seed": 0, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    subprocess.run([sys.executable, __file__, "--kind", kind, "--out", str(out), "--device", device, "--dtype", dtype],
                   check=True)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=sorted(UNET), default="sd15")
    p.add_argument("--out", default="", help=f"folder (default {DEFAULT_ROOT}/KIND)")
    p.add_argument("--device", default="auto", help="where the random weights are drawn: auto|cpu|cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    return build(Options(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    main()
