"""Tiny random-weight Stable Diffusion checkpoints in the diffusers folder layout, written with
diffusers'/transformers' own save_pretrained, and the reference (diffusers/transformers) models built
from the same files. Tests use these as fixtures and as oracles; nothing here runs at engine run time.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Four config variants covering the SD 1.x/2.x config space (issue 2).
VARIANTS = {
    # SD1-like: quick_gelu CLIP, conv proj_in, one head count for all blocks, epsilon.
    "sd1": dict(
        unet=dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
        pad_token="<|endoftext|>", prediction_type="epsilon",
    ),
    # SD2-like: gelu CLIP, linear proj_in/out, per-block head counts, attention upcast, v-prediction.
    "sd2": dict(
        unet=dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4), cross_attention_dim=48, norm_num_groups=8,
                  use_linear_projection=True, upcast_attention=True),
        clip=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu"),
        pad_token="!", prediction_type="v_prediction",
    ),
    # Inpainting: 9 input channels (4 latent + 1 mask + 4 masked-image latent).
    "inpaint": dict(
        unet=dict(in_channels=9, block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
        pad_token="<|endoftext|>", prediction_type="epsilon",
    ),
    # Deeper: three blocks, one layer per block.
    "deep": dict(
        unet=dict(in_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu"),
        pad_token="<|endoftext|>", prediction_type="epsilon",
    ),
}

# A 4-block VAE keeps SD's 8x spatial factor, so a 64x64 image has an 8x8 latent as in the real model.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=(8, 16, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Fresh inits leave some tensors at 0/1 (norm scales, zero-initialised out convs), which would hide
    wrong wiring; give every tensor random values of a sane scale instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def make_folder(root: Path, variant: str = "sd1", seed: int = 0, fp16_variant: bool = False) -> Path:
    """Write a tiny random diffusers folder for `variant` under root and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffedit_engine.weights import vocab

    spec = VARIANTS[variant]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(sample_size=64, **TINY_VAE)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, projection_dim=spec["clip"]["hidden_size"],
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **spec["clip"]))
    for i, mod in enumerate((unet, vae, clip)):
        _randomize(mod, seed * 10 + i)
    variant_kw = dict(variant="fp16") if fp16_variant else {}
    if fp16_variant:
        unet, vae, clip = unet.half(), vae.half(), clip.half()
    unet.save_pretrained(root / "unet", **variant_kw)
    vae.save_pretrained(root / "vae", **variant_kw)
    clip.save_pretrained(root / "text_encoder", **variant_kw)
    tok_dir = root / "tokenizer"
    vocab_file, merges_file = vocab.write_hf_files(tok_dir)
    CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=spec["pad_token"]).save_pretrained(tok_dir)
    DDIMScheduler(prediction_type=spec["prediction_type"], **SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
    }, indent=2))
    return root


def reference(folder: Path, dtype=torch.float32):
    """The diffusers/transformers modules loaded from `folder` (the test oracle)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    return SimpleNamespace(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
    )


class _RefVAE:
    def __init__(self, vae):
        self.vae = vae

    def encode(self, img):
        d = self.vae.encode(img).latent_dist
        return d.mean, d.logvar

    def decode(self, z):
        return self.vae.decode(z).sample


def reference_model(folder: Path, dtype=torch.float32):
    """The reference modules behind the engine's public model contract (docs/design.md §Public contract), so that engine
    algorithms can be run on the reference models too (and developed before the engine's models exist)."""
    from diffedit_engine.engine.samplers.ddim import SchedulerConfig

    ref = reference(folder, dtype)
    cfg = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    in_ch = ref.unet.config.in_channels
    sd2 = ref.unet.config.cross_attention_dim == 1024 or ref.tokenizer.pad_token == "!"
    tok = ref.tokenizer
    return SimpleNamespace(
        kind=("sd2" if sd2 else "sd1") + ("-inpaint" if in_ch == 9 else ""),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        tokenizer=lambda prompts: tok(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids,
        text_encoder=lambda ids: ref.text_encoder(ids).last_hidden_state,
        unet=lambda x, t, ctx: ref.unet(x, t, encoder_hidden_states=ctx).sample,
        vae=_RefVAE(ref.vae),
        vae_scaling_factor=ref.vae.config.scaling_factor,
        scheduler=SchedulerConfig.from_json(cfg),
        device=torch.device("cpu"), dtype=dtype, ref=ref,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU the thread hand-offs cost 4-10x. A test
    module opts in with `from tiny import one_thread` (an autouse fixture applies where it is imported)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
