"""Random-weight Stable Diffusion checkpoints with the REAL SD 1.5 / SD 2.1 (768-v) / SD-XL base shapes, written
as a diffusers folder (benchmarks may use diffusers; the engine may not). The configs are the ones the public
checkpoints ship, so load paths, shapes and FLOPs are those of the real models; only the weight values are random.

    python benchmarks/make_model.py --kind sd15 --out /tmp/diffedit-bench/sd15     # ~4.3 GB fp32
    python benchmarks/make_model.py --kind sd21 --device cuda --dtype float16
    python benchmarks/make_model.py --kind sdxl --dtype float16                    # ~7 GB (fp32: ~14 GB)
    python benchmarks/make_model.py --kind sd35m                                   # SD 3.5 Medium, no T5, ~13 GB fp32
    python benchmarks/make_model.py --kind fluxdev --dtype bfloat16                # FLUX.1-dev, reduced T5, ~25 GB

SD 1.5/2.1 use diffusers'/transformers' save_pretrained. SD-XL (3.5e9 parameters), SD 3.5 Medium (3.4e9
without T5) and FLUX.1-dev (1.2e10 in its transformer; T5 REDUCED to 2 layers, see build_flux) are built lazily: the modules exist only on the meta device (for their configs and key/shape lists)
and each tensor is drawn from its own seeded generator and streamed into the safetensors file, so memory stays
at one tensor; free disk and memory are checked first.

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
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

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

# stabilityai/stable-diffusion-xl-base-1.0's configs (unet/, text_encoder/, text_encoder_2/, vae/, scheduler/).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, upcast_attention=False, norm_num_groups=32, act_fn="silu",
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0)
SDXL_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
SDXL_CLIP_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type":
                  "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}
SDXL = dict(unet=SDXL_UNET, vae=SDXL_VAE, clip=SDXL_CLIP, clip_2=SDXL_CLIP_2, scheduler=SDXL_SCHEDULER)
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
    if opts.kind == "sdxl":
        return build_sdxl(opts)
    if opts.kind == "sd35m":
        return build_sd35m(opts)
    if opts.kind == "fluxdev":
        return build_flux(opts)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffedit_engine.weights import vocab

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


_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _random_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """One tensor of _randomize's distributions, from a generator seeded by (seed, name): any order, any subset."""
    import zlib

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=g)
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        return x.mul_(0.1).add_(1)
    if len(shape) == 1:
        return x.mul_(0.05)
    if "embedding" in name and len(shape) == 2 and "linear" not in name:
        return x.mul_(0.02)
    return x.div_(math.sqrt(math.prod(shape[1:])))


def stream_safetensors(path: Path, shapes: dict, dtype: torch.dtype, seed: int, fixed: dict | None = None) -> int:
    """Write a safetensors file of random tensors (key -> shape) one tensor at a time; returns its size.
    fixed: key -> function returning that tensor's value (made when it is written) instead of a random one."""
    fixed = fixed or {}
    header, offset = {}, 0
    size = torch.tensor([], dtype=dtype).element_size()
    for k in sorted(shapes):
        n = math.prod(shapes[k]) * size
        header[k] = {"dtype": _ST_DTYPE[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in sorted(shapes):
            v = fixed[k]() if k in fixed else _random_tensor(k, tuple(shapes[k]), seed)
            assert tuple(v.shape) == tuple(shapes[k]), (k, v.shape, shapes[k])
            f.write(v.to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def _meta_shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in ("text_model.embeddings.position_ids",)}


def check_resources(out: Path, need_disk: int, need_mem: int = 2 << 30) -> None:
    """A clear error before any byte is written when the disk or memory cannot hold the build."""
    import shutil

    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_disk + (1 << 30):
        raise SystemExit(f"[make_model] {out}: needs {need_disk / 1e9:.1f} GB of disk (+1 GB spare), "
                         f"{free / 1e9:.1f} GB free; pass --out on a larger disk or --dtype float16")
    try:
        avail = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return
    if avail < need_mem:
        raise SystemExit(f"[make_model] needs ~{need_mem / 1e9:.1f} GB of free memory, {avail / 1e9:.1f} GB available")


def build_sdxl(opts: Options, spec: dict = SDXL) -> Path:
    """An SD-XL base folder (StableDiffusionXLPipeline layout) with random weights, written tensor by tensor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffedit_engine.weights import vocab

    out = Path(opts.out) if opts.out else DEFAULT_ROOT / (opts.kind + ("" if opts.dtype == "float32" else "-fp16"))
    dtype = getattr(torch, opts.dtype)
    marker = out / ".complete"
    stamp = {"kind": opts.kind, "dtype": opts.dtype, "seed": opts.seed, "version": 1}
    if not opts.force and marker.exists() and json.loads(marker.read_text()) == stamp:
        print(f"[make_model] {out}: already built ({opts.dtype}), skipping")
        return out
    t0 = time.perf_counter()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        te = CLIPTextModel(CLIPTextConfig(**common, **spec["clip"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **spec["clip_2"]))
    parts = {"unet": (unet, "diffusion_pytorch_model"), "vae": (vae, "diffusion_pytorch_model"),
             "text_encoder": (te, "model"), "text_encoder_2": (te2, "model")}
    shapes = {sub: _meta_shapes(m) for sub, (m, _) in parts.items()}
    need = sum(math.prod(s) for d in shapes.values() for s in d.values()) * torch.tensor([], dtype=dtype).element_size()
    check_resources(out, need)
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for i, (sub, (module, stem)) in enumerate(parts.items()):
        (out / sub).mkdir(exist_ok=True)
        if sub.startswith("text_encoder"):
            module.config.dtype, module.config.architectures = opts.dtype, [type(module).__name__]
            module.config.save_pretrained(out / sub)
        else:
            module.save_config(out / sub)
        stream_safetensors(out / sub / f"{stem}.safetensors", shapes[sub], dtype, opts.seed * 10 + i)
        print(f"[make_model] {sub}: {sum(math.prod(s) for s in shapes[sub].values()) / 1e6:.0f} M parameters "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    vocab_file, merges_file = vocab.write_hf_files(out / "_vocab")
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad, model_max_length=77).save_pretrained(out / sub)
    for f in (vocab_file, merges_file):
        f.unlink()
    (out / "_vocab").rmdir()
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", spec["scheduler"]["_class_name"]], "feature_extractor": [None, None],
        "image_encoder": [None, None]}, indent=2))
    marker.write_text(json.dumps(stamp))
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e9
    print(f"[make_model] {out}: sdxl {opts.dtype} built in {time.perf_counter() - t0:.1f} s, {size:.2f} GB")
    return out


# stabilityai/stable-diffusion-3.5-medium's configs (transformer/, text_encoder/, text_encoder_2/, vae/, scheduler/).
# T5-XXL (text_encoder_3, 4.7e9 parameters: 19 GB fp32, 9.5 GB bf16) is left out: the folder says text_encoder_3
# null, as users save it to spare the memory, and both the engine and diffusers put zeros in T5's place.
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_CLIP = dict(SDXL_CLIP, hidden_act="quick_gelu")  # CLIP-L with its projection (768)
SD35M_CLIP_2 = dict(SDXL_CLIP_2)                        # OpenCLIP bigG with its projection (1280)
SD35M_VAE = dict(VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
SD35M_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0.dev0",
                   "num_train_timesteps": 1000, "shift": 3.0}
SD35M = dict(transformer=SD35M_TRANSFORMER, vae=SD35M_VAE, clip=SD35M_CLIP, clip_2=SD35M_CLIP_2, scheduler=SD35M_SCHEDULER)


def build_sd35m(opts: Options, spec: dict = SD35M) -> Path:
    """An SD 3.5 Medium folder (StableDiffusion3Pipeline layout, no T5) with random weights, tensor by tensor.
    The transformer's position table is the sin-cos table it is initialised with (a checkpoint key, learned in the
    release: random values would not be positions at all); CLIP-L's projection is the identity, as SD 3 uses it."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from diffedit_engine.engine.models.mmdit import sincos_table
    from diffedit_engine.weights import vocab

    out = Path(opts.out) if opts.out else DEFAULT_ROOT / (opts.kind + ("" if opts.dtype == "float32" else "-" + opts.dtype))
    dtype = getattr(torch, opts.dtype)
    marker = out / ".complete"
    stamp = {"kind": opts.kind, "dtype": opts.dtype, "seed": opts.seed, "version": 1}
    if not opts.force and marker.exists() and json.loads(marker.read_text()) == stamp:
        print(f"[make_model] {out}: already built ({opts.dtype}), skipping")
        return out
    t0 = time.perf_counter()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**spec["transformer"])
        vae = AutoencoderKL(**spec["vae"])
        te = CLIPTextModelWithProjection(CLIPTextConfig(**common, **spec["clip"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **spec["clip_2"]))
    parts = {"transformer": (transformer, "diffusion_pytorch_model"), "vae": (vae, "diffusion_pytorch_model"),
             "text_encoder": (te, "model"), "text_encoder_2": (te2, "model")}
    shapes = {sub: _meta_shapes(m) for sub, (m, _) in parts.items()}
    cfg = spec["transformer"]
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    fixed = {"transformer": {"pos_embed.pos_embed": lambda: sincos_table(
                 dim, cfg["pos_embed_max_size"], cfg["sample_size"] // cfg["patch_size"])[None]},
             "text_encoder": {"text_projection.weight": lambda: torch.eye(spec["clip"]["hidden_size"])}}
    need = sum(math.prod(s) for d in shapes.values() for s in d.values()) * torch.tensor([], dtype=dtype).element_size()
    check_resources(out, need)
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for i, (sub, (module, stem)) in enumerate(parts.items()):
        (out / sub).mkdir(exist_ok=True)
        if sub.startswith("text_encoder"):
            module.config.dtype, module.config.architectures = opts.dtype, [type(module).__name__]
            module.config.save_pretrained(out / sub)
        else:
            module.save_config(out / sub)
        stream_safetensors(out / sub / f"{stem}.safetensors", shapes[sub], dtype, opts.seed * 10 + i, fixed.get(sub))
        print(f"[make_model] {sub}: {sum(math.prod(s) for s in shapes[sub].values()) / 1e6:.0f} M parameters "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    vocab_file, merges_file = vocab.write_hf_files(out / "_vocab")
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad, model_max_length=77).save_pretrained(out / sub)
    for f in (vocab_file, merges_file):
        f.unlink()
    (out / "_vocab").rmdir()
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "image_encoder": [None, None], "feature_extractor": [None, None]}, indent=2))
    marker.write_text(json.dumps(stamp))
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e9
    print(f"[make_model] {out}: sd35m {opts.dtype} built in {time.perf_counter() - t0:.1f} s, {size:.2f} GB")
    return out


# black-forest-labs/FLUX.1-dev's configs (transformer/, vae/, text_encoder/, text_encoder_2/, scheduler/), except T5.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_VAE = dict(VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
FLUX_DEV_CLIP = dict(SDXL_CLIP, hidden_act="quick_gelu")  # CLIP-L as CLIPTextModel (FLUX uses its pooled output)
# REDUCED T5: the released T5-XXL v1.1 encoder has num_layers 24 and vocab_size 32128 (4.7e9 parameters). It runs
# once per prompt, never per step, so only its output width (d_model 4096 = joint_attention_dim) matters to the
# timings here: 2 layers of the real widths and a 128-entry vocabulary read by a small tokenizer (tests/tiny_sd3).
FLUX_DEV_T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=2, vocab_size=128,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
FLUX_DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                      "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_DEV = dict(transformer=FLUX_DEV_TRANSFORMER, vae=FLUX_DEV_VAE, clip=FLUX_DEV_CLIP, t5=FLUX_DEV_T5,
                scheduler=FLUX_DEV_SCHEDULER)


def build_flux(opts: Options, spec: dict = FLUX_DEV) -> Path:
    """A FLUX.1-dev folder (FluxPipeline layout) with random weights, tensor by tensor: the real transformer (19 double
    + 38 single blocks, heads 24 x 128, guidance embedding), FLUX's VAE (16 latent channels, no quant convs) and the
    real CLIP-L, but a REDUCED T5: 2 layers instead of 24 and a 128-token vocabulary (tokenizer_2 is the small test
    tokenizer of tests/tiny_sd3.py), with the real d_model 4096, so the context has the real width (B, 512, 4096).
    Prompt encodings therefore differ from FLUX.1-dev's in cost (one encode per prompt, not per step) and meaning
    (random weights) only. The folder loads with weights.load_model (kind "flux", guidance_embeds True)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    import tiny_sd3
    from diffedit_engine.weights import vocab

    out = Path(opts.out) if opts.out else DEFAULT_ROOT / (opts.kind + ("" if opts.dtype == "float32" else "-" + opts.dtype))
    dtype = getattr(torch, opts.dtype)
    marker = out / ".complete"
    stamp = {"kind": opts.kind, "dtype": opts.dtype, "seed": opts.seed, "version": 1}
    if not opts.force and marker.exists() and json.loads(marker.read_text()) == stamp:
        print(f"[make_model] {out}: already built ({opts.dtype}), skipping")
        return out
    t0 = time.perf_counter()
    # eos_token_id 2 as in FLUX.1's text_encoder/config.json (transformers pools at argmax(ids))
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**spec["transformer"])
        vae = AutoencoderKL(**spec["vae"])
        te = CLIPTextModel(CLIPTextConfig(**common, **spec["clip"]))
        te2 = T5EncoderModel(T5Config(**spec["t5"]))
    parts = {"transformer": (transformer, "diffusion_pytorch_model"), "vae": (vae, "diffusion_pytorch_model"),
             "text_encoder": (te, "model"), "text_encoder_2": (te2, "model")}
    shapes = {sub: _meta_shapes(m) for sub, (m, _) in parts.items()}
    # T5's token table is one tensor (shared.weight) that encoder.embed_tokens ties to; save_pretrained writes it once
    shapes["text_encoder_2"].pop("encoder.embed_tokens.weight", None)
    need = sum(math.prod(s) for d in shapes.values() for s in d.values()) * torch.tensor([], dtype=dtype).element_size()
    check_resources(out, need)
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for i, (sub, (module, stem)) in enumerate(parts.items()):
        (out / sub).mkdir(exist_ok=True)
        if sub.startswith("text_encoder"):
            module.config.dtype, module.config.architectures = opts.dtype, [type(module).__name__]
            module.config.save_pretrained(out / sub)
        else:
            module.save_config(out / sub)
        stream_safetensors(out / sub / f"{stem}.safetensors", shapes[sub], dtype, opts.seed * 10 + i)
        print(f"[make_model] {sub}: {sum(math.prod(s) for s in shapes[sub].values()) / 1e6:.0f} M parameters "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    vocab_file, merges_file = vocab.write_hf_files(out / "_vocab")
    CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77).save_pretrained(
        out / "tokenizer")
    for f in (vocab_file, merges_file):
        f.unlink()
    (out / "_vocab").rmdir()
    tiny_sd3.t5_tokenizer().save_pretrained(out / "tokenizer_2")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None], "feature_extractor": [None, None]}, indent=2))
    marker.write_text(json.dumps(stamp))
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e9
    print(f"[make_model] {out}: fluxdev (reduced T5) {opts.dtype} built in {time.perf_counter() - t0:.1f} s, "
          f"{size:.2f} GB")
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
    p.add_argument("--kind", choices=sorted(UNET) + ["sdxl", "sd35m", "fluxdev"], default="sd15")
    p.add_argument("--out", default="", help=f"folder (default {DEFAULT_ROOT}/KIND)")
    p.add_argument("--device", default="auto", help="where the random weights are drawn: auto|cpu|cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    return build(Options(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    main()
