"""engine.unet against diffusers' UNet2DConditionModel on the tiny variants (CPU fp32)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from diffedit_engine.engine.models.unet import UNet, UNetConfig

VARIANTS = ["sd1", "sd2", "inpaint", "deep"]


def load_unet(folder):
    """Our UNet from a diffusers unet/ folder: built on meta, filled by a strict assign load."""
    cfg = UNetConfig.from_json(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        unet = UNet(cfg)
    unet.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True, assign=True)
    return unet.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def models(tiny_folder):
    cache = {}

    def get(variant):
        if variant not in cache:
            folder = tiny_folder(variant)
            cache[variant] = load_unet(folder / "unet"), tiny.reference(folder).unet
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hw,timestep", [((8, 8), torch.tensor([10, 981])),  # per-sample timesteps
                                         ((9, 13), 500),                       # odd latent, python int
                                         ((16, 8), torch.tensor(999.5))])      # 0-d fractional tensor
def test_matches_diffusers(models, variant, hw, timestep):
    ours, ref = models(variant)
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, *hw, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        out = ours(x, timestep, ctx)
        want = ref(x, timestep, encoder_hidden_states=ctx).sample
    assert out.shape == want.shape == (2, cfg.out_channels, *hw)
    assert rel_err(out, want) <= 1e-5


def test_state_dict_keys_match_diffusers(models):
    ours, ref = models("sd2")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_config_reads_diffusers_json(tiny_folder):
    d = json.loads((tiny_folder("sd2") / "unet" / "config.json").read_text())
    cfg = UNetConfig.from_json({**d, "some_future_key": 1})
    assert cfg.attention_head_dim == (2, 4) and cfg.heads() == (2, 4)
    assert cfg.use_linear_projection and cfg.upcast_attention and cfg.cross_attention_dim == 48
    heads = UNetConfig.from_json({"attention_head_dim": 8, "num_attention_heads": [5, 10, 20, 20]}).heads()
    assert heads == (5, 10, 20, 20)
    # Explicit defaults in other spellings are accepted.
    UNetConfig.from_json({"only_cross_attention": [False] * 4, "mid_block_only_cross_attention": False})


@pytest.mark.parametrize("kw", [dict(cross_attention_dim=768),
                                dict(cross_attention_dim=768, in_channels=9),
                                dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                                     use_linear_projection=True, upcast_attention=True)],
                         ids=["sd15", "sd15-inpaint", "sd21"])
def test_real_sd_configs_have_diffusers_keys_and_shapes(kw):
    """The real SD 1.5 / SD 2.1 architectures, both models built on meta (no memory, no compute)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**kw)
        ours = UNet(UNetConfig.from_json(dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_low_precision_keeps_dtype(tiny_folder):
    """bf16 runs end to end (attention upcast for sd2 returns to bf16) and stays close to fp32."""
    ours = load_unet(tiny_folder("sd2") / "unet")  # a private copy: the cast below would round shared weights
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 48)
    with torch.no_grad():
        want = ours(x, torch.tensor([1, 500]), ctx)
        low = ours.to(torch.bfloat16)(x.bfloat16(), torch.tensor([1, 500]), ctx.bfloat16())
    assert low.dtype == torch.bfloat16 and rel_err(low.float(), want) < 0.05


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_image"),
                                       ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", True),
                                       ("time_embedding_type", "fourier"),
                                       ("transformer_layers_per_block", [[1, 2]] * 4)])
def test_from_json_rejects_unsupported(key, value):
    with pytest.raises(AssertionError, match=f"UNet config: {key}=.*(not supported|must be an int)"):
        UNetConfig.from_json({key: value})


def test_rejects_unknown_block_type():
    with pytest.raises(AssertionError, match="down_block_types"):
        UNetConfig.from_json({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


def test_transformer_depth_and_per_block_layers():
    """Options the tiny variants do not cover (transformer depth 2, per-block layers, num_attention_heads)."""
    cfg = UNetConfig(block_out_channels=(16, 32), layers_per_block=(1, 2), norm_num_groups=8,
                     cross_attention_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=2,
                     num_attention_heads=4, attention_head_dim=3)
    unet = UNet(cfg)
    assert len(unet.down_blocks[0].attentions[0].transformer_blocks) == 2
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4
    assert len(unet.down_blocks[1].resnets) == 2 and len(unet.up_blocks[0].resnets) == 3
    assert unet(torch.randn(1, 4, 6, 10), 3, torch.randn(1, 5, 8)).shape == (1, 4, 6, 10)


def test_strict_load_rejects_wrong_shape(tiny_folder):
    folder = tiny_folder("sd1") / "unet"
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    sd["conv_in.weight"] = sd["conv_in.weight"][:, :3]
    with pytest.raises(RuntimeError, match="conv_in.weight"):
        load_unet_sd(folder, sd)
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    del sd["mid_block.attentions.0.proj_out.bias"]
    with pytest.raises(RuntimeError, match="proj_out.bias"):
        load_unet_sd(folder, sd)


def load_unet_sd(folder, sd):
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_json(json.loads((folder / "config.json").read_text())))
    unet.load_state_dict(sd, strict=True, assign=True)
