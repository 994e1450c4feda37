"""engine.models.mmdit (the SD 3 / 3.5 / 3.5 Medium transformer) against diffusers' SD3Transformer2DModel: tiny
random models written by save_pretrained, loaded into ours from the safetensors file (strict, assign=True on the
meta device), outputs compared on CPU."""
import json

import pytest
import torch
from safetensors.torch import load_file

from diffedit_engine.engine.models.mmdit import SD3Transformer, SD3TransformerConfig

# Tiny configs over the SD3 family: width 32 (4 heads of 8), text width 24 -> 32, pooled 16, 8 latent channels,
# a 16 x 16 patch position table (latents up to 32 x 32) trained at sample_size 16 (base 8 patches).
TINY = dict(sample_size=16, patch_size=2, in_channels=8, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, out_channels=8,
            pos_embed_max_size=16)
VARIANTS = {
    "sd3": dict(),                                                             # SD 3.0: no qk norm, no MMDiT-X
    "sd35-large": dict(qk_norm="rms_norm"),
    "sd35-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),     # MMDiT-X in the first blocks
    "dual-last": dict(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0, 1)),  # the last block dual too
}
# SD 3.5 Medium's released transformer/config.json.
SD35_MEDIUM = dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=list(range(13)), qk_norm="rms_norm")


def randomize(model, seed):
    """Weights of the default scale (std 1/sqrt(fan_in)) but every bias and norm weight away from its init, so
    the gates and shifts (zero-ish at init in real training) and the RMSNorm weights all shape the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def load_ours(folder, dtype=torch.float32):
    cfg = SD3TransformerConfig.from_json(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = SD3Transformer(cfg)
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True, assign=True)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(variant) -> (ours, diffusers' reference, folder), built once per module."""
    from diffusers import SD3Transformer2DModel

    cache = {}

    def get(variant):
        if variant not in cache:
            torch.manual_seed(0)
            ref = randomize(SD3Transformer2DModel(**{**TINY, **VARIANTS[variant]}), seed=1)
            folder = tmp_path_factory.mktemp(variant)
            ref.save_pretrained(folder)
            cache[variant] = load_ours(folder), ref, folder
        return cache[variant]

    return get


def inputs(cfg, hw, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, *hw, generator=g),
            torch.randn(batch, 7, cfg.joint_attention_dim, generator=g),
            torch.randn(batch, cfg.pooled_projection_dim, generator=g))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hw,t", [((8, 8), torch.tensor([10.0, 981.5])),  # per-sample timesteps
                                  ((6, 10), 500.0),                        # non-square, odd patch counts, a float
                                  ((32, 4), torch.tensor(999.0))])         # the table's full height, 0-d tensor
def test_matches_diffusers(models, variant, hw, t):
    ours, ref, _ = models(variant)
    x, ctx, pooled = inputs(ours.config, hw)
    with torch.no_grad():
        out = ours(x, t, ctx, pooled)
        want = ref(x, ctx, pooled, torch.as_tensor(t).reshape(-1).expand(2)).sample
    assert out.shape == want.shape == (2, ours.config.out_channels, *hw)
    assert want.abs().max() > 1.0  # the comparison is not between two near-zero outputs
    assert (out - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["sd3", "sd35-medium"])
def test_bf16_close_to_diffusers(models, variant):
    """bf16 weights and activations: ours within 3 % of the output's range of diffusers' bf16 run, and no further
    from the fp32 answer than diffusers' bf16 run is (plus 1 %)."""
    from diffusers import SD3Transformer2DModel

    _, ref32, folder = models(variant)
    ours = load_ours(folder, torch.bfloat16)  # private copies: the casts round the weights
    ref = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    x, ctx, pooled = inputs(ours.config, (6, 10))
    t = torch.tensor([10.0, 981.5])
    with torch.no_grad():
        want32 = ref32(x, ctx, pooled, t).sample
        out = ours(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
        want = ref(x.bfloat16(), ctx.bfloat16(), pooled.bfloat16(), t).sample
    assert out.dtype == torch.bfloat16
    scale = want32.abs().max().item()
    assert (out.float() - want.float()).abs().max().item() <= 0.03 * scale
    assert (out.float() - want32).abs().max().item() <= (want.float() - want32).abs().max().item() + 0.01 * scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_match_diffusers(models, variant):
    ours, ref, _ = models(variant)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_built_position_table_matches_diffusers(models):
    """A model built without a checkpoint computes the same sin-cos table diffusers stores (incl. its base-size
    scaling and [column | row] layout)."""
    ours, ref, _ = models("sd3")
    fresh = SD3Transformer(ours.config)
    torch.testing.assert_close(fresh.pos_embed.pos_embed, ref.pos_embed.pos_embed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw,msg", [((7, 8), r"SD3 transformer: latent 7x8 is not a multiple of the patch size 2 "
                                              r"\(the image must be a multiple of 16 px\)"),
                                    ((8, 9), "latent 8x9 is not a multiple of the patch size 2"),
                                    ((34, 8), r"latent 34x8 is larger than the position table \(32x32 latent")])
def test_bad_latent_size_is_one_line_error(models, hw, msg):
    ours, _, _ = models("sd3")
    x, ctx, pooled = inputs(ours.config, hw, batch=1)
    with pytest.raises(ValueError, match=msg) as err:
        ours(x, 1.0, ctx, pooled)
    assert "\n" not in str(err.value)


def test_guidance_refused(models):
    """The flow models share forward(x, t, context, pooled, guidance=None); SD 3 has no guidance embedding."""
    ours, _, _ = models("sd3")
    x, ctx, pooled = inputs(ours.config, (4, 4), batch=1)
    assert ours(x, 1.0, ctx, pooled, guidance=None).shape == x.shape
    with pytest.raises(ValueError, match="SD3 transformer: it has no guidance embedding"):
        ours(x, 1.0, ctx, pooled, guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("change,msg", [(dict(_class_name="FluxTransformer2DModel"), "_class_name="),
                                        (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not supported"),
                                        (dict(pos_embed_max_size=None), "pos_embed_max_size=None"),
                                        (dict(caption_projection_dim=64), "caption_projection_dim=64 must equal"),
                                        (dict(dual_attention_layers=[3]), "dual_attention_layers=")])
def test_from_json_rejects_unsupported(change, msg):
    with pytest.raises(AssertionError, match=msg):
        SD3TransformerConfig.from_json({"_class_name": "SD3Transformer2DModel", **TINY, **change})


def test_from_json_reads_diffusers_json(models):
    _, ref, folder = models("sd35-medium")
    d = json.loads((folder / "config.json").read_text())
    cfg = SD3TransformerConfig.from_json({**d, "some_future_key": 1})
    assert cfg.dual_attention_layers == (0, 1) and cfg.qk_norm == "rms_norm" and cfg.inner_dim == 32
    assert SD3TransformerConfig.from_json({**d, "out_channels": None}).out_channels == d["in_channels"]


def test_real_sd35_medium_on_meta():
    """SD 3.5 Medium's real architecture, both models built on meta (no memory, no compute): the same keys and
    shapes, and its parameter count."""
    from diffusers import SD3Transformer2DModel

    cfg = SD3TransformerConfig.from_json(SD35_MEDIUM)
    with torch.device("meta"):
        ours = SD3Transformer(cfg)
        ref = SD3Transformer2DModel(**{k: v for k, v in SD35_MEDIUM.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 2_243_171_520
