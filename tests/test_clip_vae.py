"""Parity of engine.clip.CLIPTextModel and engine.vae.VAE with transformers/diffusers on the tiny folders (CPU fp32)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from diffedit_engine.engine.models.clip import CLIPTextConfig, CLIPTextModel
from diffedit_engine.engine.models.vae import VAE, VAEConfig

VARIANTS = list(tiny.VARIANTS)
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _load(cls, cfg, weights: Path, fix_keys=lambda sd: sd):
    """Meta construction + strict assign load: what the real loader does, minus its key map."""
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(fix_keys(load_file(str(weights))), strict=True, assign=True)
    return model.eval()


def _clip_keys(sd: dict) -> dict:
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix that SD checkpoints carry.
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


def load_clip(folder: Path) -> CLIPTextModel:
    cfg = CLIPTextConfig.from_json(json.loads((folder / "text_encoder" / "config.json").read_text()))
    return _load(CLIPTextModel, cfg, folder / "text_encoder" / "model.safetensors", _clip_keys)


def load_vae(folder: Path) -> VAE:
    cfg = VAEConfig.from_json(json.loads((folder / "config.json").read_text()))
    return _load(VAE, cfg, folder / "diffusion_pytorch_model.safetensors")


def _no_meta(model: torch.nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"still on the meta device after loading: {left}"


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(folder):
        if folder not in cache:
            cache[folder] = tiny.reference(folder)
        return cache[folder]

    return get


def _ids(ref_tok) -> torch.Tensor:
    prompts = ["a photo of a cat riding a bicycle", "", " ".join(["long"] * 90), "café 東京 🐱 !!!"]
    ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    # Random ids too: every position and a wide spread of the vocabulary contribute.
    rand = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    return torch.cat([ids, rand])


@pytest.mark.parametrize("variant", VARIANTS)
def test_clip_matches_transformers(tiny_folder, refs, variant):
    folder = tiny_folder(variant)
    ref = refs(folder)
    ours = load_clip(folder)
    _no_meta(ours)
    ids = _ids(ref.tokenizer)
    with torch.no_grad():
        out = ref.text_encoder(ids, output_hidden_states=True)
        got = ours(ids)
        assert got.shape == out.last_hidden_state.shape == (len(ids), 77, ours.config.hidden_size)
        assert rel_err(got, out.last_hidden_state) <= TOL
        # Every selectable layer, including clip skip 2 (-2), the embeddings (0) and the last layer (-1).
        n = ours.config.num_hidden_layers
        for k in range(-(n + 1), n + 1):
            want = ref.text_encoder.final_layer_norm(out.hidden_states[k])
            assert rel_err(ours(ids, hidden_layer=k), want) <= TOL, k
        assert torch.equal(ours(ids, hidden_layer=-1), got)
    with pytest.raises(IndexError):
        ours(ids, hidden_layer=n + 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 64, 96)])
def test_vae_matches_diffusers(tiny_folder, refs, variant, shape):
    folder = tiny_folder(variant)
    ref = refs(folder).vae
    ours = load_vae(folder / "vae")
    _no_meta(ours)
    b, h, w = shape
    g = torch.Generator().manual_seed(1)
    img = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        mean, logvar = ours.encode(img)
        assert mean.shape == logvar.shape == (b, 4, h // 8, w // 8)
        assert rel_err(mean, dist.mean) <= TOL
        assert rel_err(logvar, dist.logvar) <= TOL
        z = torch.randn(b, 4, h // 8, w // 8, generator=g)
        dec = ours.decode(z)
        assert dec.shape == img.shape
        assert rel_err(dec, ref.decode(z).sample) <= TOL


def test_vae_other_configs(tmp_path):
    """Three blocks, two layers per block, no mid-block attention, other channel counts; from an old-style
    config without the keys newer diffusers versions added."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=2,
                        block_out_channels=(4, 8, 6), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False)
    tiny._randomize(ref, 5)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "shift_factor", "latents_mean", "latents_std"):
        cfg.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_vae(tmp_path)
    assert not ours.encoder.mid_block.attentions
    img = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = ref.eval().encode(img).latent_dist
        mean, logvar = ours.encode(img)
        assert mean.shape == (2, 4, 8, 6)
        assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
        assert rel_err(ours.decode(mean), ref.decode(dist.mean).sample) <= TOL


def test_vae_logvar_clamped():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 1e4  # logvar channels far beyond the clamp
        vae.quant_conv.bias[:4] = 0
        _, logvar = vae.encode(torch.zeros(1, 3, 16, 16))
    assert logvar.max().item() == 20.0


def test_configs_from_json():
    d = json.loads(json.dumps(dict(_name_or_path="x", architectures=["CLIPTextModel"], dropout=0.0, bos_token_id=0,
                                   hidden_size=64, num_attention_heads=4, hidden_act="gelu", torch_dtype="float16",
                                   some_future_key=1)))
    cfg = CLIPTextConfig.from_json(d)
    assert (cfg.hidden_size, cfg.hidden_act, cfg.num_hidden_layers) == (64, "gelu", 12)
    with pytest.raises(AssertionError):
        CLIPTextConfig.from_json({"hidden_act": "relu"})
    with pytest.raises(AssertionError):
        CLIPTextConfig.from_json({"architectures": ["CLIPTextModelWithProjection"]})
    v = VAEConfig.from_json({"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "block_out_channels": [128, 256, 512, 512]})
    assert v == VAEConfig() and isinstance(v.block_out_channels, tuple)
    # SD 3.x / FLUX VAEs: the config takes their shift (the SD loader refuses it: tests/test_sd3_load.py)
    assert VAEConfig.from_json({"shift_factor": 0.1159, "use_quant_conv": False}).shift_factor == 0.1159
    with pytest.raises(AssertionError):
        VAEConfig.from_json({"block_out_channels": [128, 256], "down_block_types": ["DownEncoderBlock2D"] * 2,
                             "up_block_types": ["AttnUpDecoderBlock2D"] * 2})


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_full_size_key_layout(preset):
    """The SD-sized modules build on the meta device with the checkpoint's key names and shapes."""
    with torch.device("meta"):
        clip = CLIPTextModel(getattr(CLIPTextConfig, preset)())
        vae = VAE(VAEConfig())
    sd = clip.state_dict()
    d = 768 if preset == "sd1" else 1024
    assert sd["text_model.embeddings.token_embedding.weight"].shape == (49408, d)
    assert sd["text_model.embeddings.position_embedding.weight"].shape == (77, d)
    assert "text_model.encoder.layers.11.self_attn.q_proj.weight" in sd and "text_model.final_layer_norm.bias" in sd
    assert not list(clip.buffers()) and not list(vae.buffers())
    v = vae.state_dict()
    assert v["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (256, 128, 1, 1)
    assert "decoder.up_blocks.2.upsamplers.0.conv.weight" in v and "decoder.up_blocks.3.upsamplers.0.conv.weight" not in v
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in v
    assert v["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (512, 512)
    assert v["quant_conv.weight"].shape == (8, 8, 1, 1) and v["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert len(v) == 248  # diffusers' AutoencoderKL for SD has 248 tensors
