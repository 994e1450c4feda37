"""engine.models.flux (the FLUX.1 transformer) against diffusers' FluxTransformer2DModel, and weights.flux_keys (Black
Forest Labs' single-file layout) against diffusers' own converter: tiny random dev / schnell models written by
save_pretrained, loaded into ours strictly on the meta device, outputs compared on CPU. diffusers' side gets what
FluxPipeline hands its transformer: 2x2-packed latents (its _pack_latents), its image / text ids, timestep / 1000 and
the guidance scale as a float32 tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit_engine.engine.models.flux import FluxTransformer, FluxTransformerConfig
from diffedit_engine.weights import files, flux_keys, keys
from diffedit_engine.weights.files import CheckpointError
from diffedit_engine.weights.parts import materialize

# Tiny configs: 64 packed features (16 latent channels), text width 24, pooled 12.
VARIANTS = {
    "dev": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "schnell": dict(num_layers=1, num_single_layers=2, attention_head_dim=24, num_attention_heads=2,
                    guidance_embeds=False, axes_dims_rope=(8, 8, 8)),
}
COMMON = dict(patch_size=1, in_channels=64, joint_attention_dim=24, pooled_projection_dim=12)
# FLUX.1-dev's released transformer/config.json (schnell: guidance_embeds false).
FLUX1_DEV = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19,
                 num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def randomize(model, seed):
    """Weights of the default scale (std 1/sqrt(fan_in)) but every bias and norm weight away from its init, so the
    gates and shifts (zero at init in real training) and the RMSNorm weights all shape the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(name, config):
    return FluxTransformer(FluxTransformerConfig.from_json(config))


def load_ours(folder, dtype=torch.float32):
    sub = folder / "transformer"
    with torch.device("meta"):
        model = build("transformer", json.loads((sub / "config.json").read_text()))
    model.load_state_dict(load_file(sub / "diffusion_pytorch_model.safetensors"), strict=True, assign=True)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(variant) -> (ours, diffusers' reference, folder holding transformer/), built once per module."""
    from diffusers import FluxTransformer2DModel

    cache = {}

    def get(variant):
        if variant not in cache:
            torch.manual_seed(0)
            ref = randomize(FluxTransformer2DModel(**COMMON, **VARIANTS[variant]), seed=1)
            folder = tmp_path_factory.mktemp(variant)
            ref.save_pretrained(folder / "transformer")
            cache[variant] = load_ours(folder), ref, folder
        return cache[variant]

    return get


def inputs(hw, seed=0, batch=2, text_len=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(x.to(dtype) for x in (torch.randn(batch, 16, *hw, generator=g),
                                       torch.randn(batch, text_len, COMMON["joint_attention_dim"], generator=g),
                                       torch.randn(batch, COMMON["pooled_projection_dim"], generator=g)))


def reference(ref, x, t, ctx, pooled, guidance):
    """diffusers' transformer called as FluxPipeline calls it, its packed output unpacked as FluxPipeline does."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(b).to(x.dtype)  # pipeline: t.to(latents.dtype)
    g = None if guidance is None else torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(b)
    out = ref(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=ctx,
              pooled_projections=pooled, timestep=t / 1000, guidance=g,
              img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
              txt_ids=torch.zeros(ctx.shape[1], 3, dtype=x.dtype)).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # (height, width) in pixels, VAE factor 8


CASES = [((8, 8), torch.tensor([10.0, 981.5]), torch.tensor([3.5, 5.0])),  # per-sample timesteps and guidance
         ((6, 10), 500.0, 3.5),                                             # non-square, python floats
         ((12, 4), torch.tensor(999.0), torch.tensor(1.0))]                 # 0-d tensors


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hw,t,guidance", CASES)
def test_matches_diffusers(models, variant, hw, t, guidance):
    ours, ref, _ = models(variant)
    guidance = guidance if ours.config.guidance_embeds else None
    x, ctx, pooled = inputs(hw)
    with torch.no_grad():
        out = ours(x, t, ctx, pooled, guidance)
        want = reference(ref, x, t, ctx, pooled, guidance)
    assert out.shape == want.shape == x.shape
    assert want.abs().max() > 1.0  # the comparison is not between two near-zero outputs
    assert (out - want).abs().max().item() <= 1e-5


def test_guidance_and_timestep_matter(models):
    """The dev model's guidance embedding and the per-sample timesteps reach the output (a model ignoring either
    would still match the reference at one value)."""
    ours, _, _ = models("dev")
    x, ctx, pooled = inputs((4, 4))
    with torch.no_grad():
        base = ours(x, 500.0, ctx, pooled, 3.5)
        assert (ours(x, 500.0, ctx, pooled, 5.0) - base).abs().max() > 1e-3
        assert (ours(x, 400.0, ctx, pooled, 3.5) - base).abs().max() > 1e-3
        per_sample = ours(x, torch.tensor([500.0, 400.0]), ctx, pooled, torch.tensor([3.5, 5.0]))
        torch.testing.assert_close(per_sample[0], base[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_close_to_diffusers(models, variant):
    """bf16 weights and activations: ours within 2 % of the output's range of diffusers' bf16 run, and no further
    from the fp32 answer than diffusers' bf16 run is (+1 %). The timestep and guidance are rounded as FluxPipeline
    rounds them in bf16 (981.5 -> 980, guidance 3.5 -> 3504 / 1000): ours must do the same to pass the first bound
    (they move the output by ~20-30 % of its range on these random weights), and the fp32 answer is computed at the
    rounded values so that the second bound measures the arithmetic alone."""
    from diffusers import FluxTransformer2DModel

    _, ref32, folder = models(variant)
    ours = load_ours(folder, torch.bfloat16)  # private copies: the casts round the weights
    ref = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16).eval()
    guidance = torch.tensor([3.5, 5.0]) if ours.config.guidance_embeds else None
    x, ctx, pooled = inputs((6, 10))
    t = torch.tensor([10.0, 981.5])
    t16 = ((t.bfloat16() / 1000).bfloat16() * 1000).float()
    g16 = None if guidance is None else (guidance.bfloat16() * 1000).bfloat16().float() / 1000
    with torch.no_grad():
        want32 = reference(ref32, x, t16, ctx, pooled, g16)
        out = ours(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16(), guidance)
        want = reference(ref, x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16(), guidance)
    assert out.dtype == torch.bfloat16
    scale = want32.abs().max().item()
    assert (out.float() - want.float()).abs().max().item() <= 0.02 * scale
    assert (out.float() - want32).abs().max().item() <= (want.float() - want32).abs().max().item() + 0.01 * scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_match_diffusers(models, variant):
    ours, ref, _ = models(variant)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("variant,hw,guidance,msg", [
    ("dev", (7, 8), 3.5, r"FLUX transformer: latent 7x8 is not a multiple of 2 \(2x2 packing; the image must be a "
                         r"multiple of 16 px\)"),
    ("dev", (8, 9), 3.5, "latent 8x9 is not a multiple of 2"),
    ("dev", (8, 8), None, r"FLUX transformer: guidance= is required: this model \(dev\) is guidance-distilled"),
    ("schnell", (8, 8), 3.5, r"FLUX transformer: this model \(schnell\) has no guidance embedding"),
    ("schnell", (8, 8), torch.tensor([3.5]), r"this model \(schnell\) has no guidance embedding")])
def test_bad_inputs_are_one_line_errors(models, variant, hw, guidance, msg):
    ours, _, _ = models(variant)
    x, ctx, pooled = inputs(hw, batch=1)
    with pytest.raises(ValueError, match=msg) as err:
        ours(x, 500.0, ctx, pooled, guidance)
    assert "\n" not in str(err.value)


def test_wrong_latent_channels_is_one_line_error(models):
    ours, _, _ = models("schnell")
    _, ctx, pooled = inputs((8, 8), batch=1)
    with pytest.raises(ValueError, match=r"the latent has 64 channels, the model takes 16 \(unpacked latents"):
        ours(torch.zeros(1, 64, 8, 8), 500.0, ctx, pooled)


@pytest.mark.parametrize("change,msg", [
    (dict(_class_name="SD3Transformer2DModel"), "_class_name="),
    (dict(patch_size=2), "patch_size=2 is not supported"),
    (dict(in_channels=384, out_channels=64), "in_channels=384, out_channels=64 is not supported"),  # FLUX.1 Fill
    (dict(in_channels=128, out_channels=64), "in_channels=128, out_channels=64"),  # FLUX.1 Canny / Depth
    (dict(axes_dims_rope=[16, 56, 48]), r"axes_dims_rope=\[16, 56, 48\] must be three even sizes summing to "
                                        r"attention_head_dim=128"),
    (dict(axes_dims_rope=[15, 57, 56]), "must be three even sizes")])
def test_from_json_rejects_unsupported(change, msg):
    with pytest.raises(AssertionError, match=msg):
        FluxTransformerConfig.from_json({**FLUX1_DEV, **change})


def test_from_json_reads_diffusers_json(models):
    _, _, folder = models("dev")
    d = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = FluxTransformerConfig.from_json({**d, "some_future_key": 1})
    assert cfg.guidance_embeds and cfg.axes_dims_rope == (4, 6, 6) and cfg.out_channels == 64 and cfg.inner_dim == 32
    assert FluxTransformerConfig.from_json(FLUX1_DEV).out_channels == 64  # the released json has no out_channels


@pytest.mark.parametrize("guidance", [True, False])
def test_real_flux1_on_meta(guidance):
    """FLUX.1-dev's and schnell's real architecture, both models built on meta: the same keys, shapes and
    parameter count as diffusers'."""
    from diffusers import FluxTransformer2DModel

    d = {**FLUX1_DEV, "guidance_embeds": guidance}
    with torch.device("meta"):
        ours = build("transformer", d)
        ref = FluxTransformer2DModel(**{k: v for k, v in d.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == (11_901_408_320 if guidance else 11_891_178_560)


# --- Black Forest Labs' single-file layout --------------------------------------------------------------------


def to_bfl(sd: dict, prefix: str = "") -> dict:
    """diffusers FluxTransformer2DModel keys -> BFL's, inverting flux_keys (fused rows concatenated in the map's
    order, the final adaLN's halves swapped back); every diffusers key must be used exactly once."""
    out, used = {}, set()
    swap = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731
    for old, (new, t) in flux_keys.FIXED.items():
        for k in [k for k in sd if k.startswith(new)]:
            out[old + k[len(new):]] = swap(sd[k]) if t == keys.SWAP else sd[k]
            used.add(k)
    for kind, table, under in (("double", flux_keys.DOUBLE, "transformer_blocks"),
                               ("single", flux_keys.SINGLE, "single_transformer_blocks")):
        depth = len({k.split(".")[1] for k in sd if k.startswith(under + ".")})
        for i in range(depth):
            for old, targets in table.items():
                for suffix in (("weight", "bias") if old.endswith(".") else ("",)):
                    names = [f"{under}.{i}.{new}{suffix}" for new, _ in targets]
                    out[f"{kind}_blocks.{i}.{old}{suffix}"] = torch.cat([sd[n] for n in names])
                    used.update(names)
    assert used == set(sd), sorted(set(sd) - used)
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_bfl(folder, path, prefix="", extra=None):
    sd = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file({**to_bfl(sd, prefix), **(extra or {})}, str(path))
    return path


def load_bfl(path, config=None, dtype=torch.float32):
    """The loader's path: header -> flux_keys.part -> parts.materialize (meta build, strict assign load)."""
    part = flux_keys.part(path, files.read_header(path), config)
    return materialize("transformer", part, torch.device("cpu"), dtype, build)


def test_bfl_key_names(models):
    """The file uses exactly the names of BFL's FLUX.1 checkpoints (flux1-dev.safetensors), dev with guidance_in."""
    _, _, folder = models("dev")
    names = set(to_bfl(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")))
    block = {"img_attn.norm.key_norm.scale", "img_attn.norm.query_norm.scale", "img_attn.proj.bias",
             "img_attn.proj.weight", "img_attn.qkv.bias", "img_attn.qkv.weight", "img_mlp.0.bias", "img_mlp.0.weight",
             "img_mlp.2.bias", "img_mlp.2.weight", "img_mod.lin.bias", "img_mod.lin.weight"}
    block |= {k.replace("img_", "txt_") for k in block}
    single = {"linear1.bias", "linear1.weight", "linear2.bias", "linear2.weight", "modulation.lin.bias",
              "modulation.lin.weight", "norm.key_norm.scale", "norm.query_norm.scale"}
    top = {f"{m}.{p}" for m in ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1")
           for p in ("weight", "bias")}
    top |= {f"{m}.{layer}.{p}" for m in ("time_in", "vector_in", "guidance_in") for layer in ("in_layer", "out_layer")
            for p in ("weight", "bias")}
    assert names == top | {f"double_blocks.{i}.{k}" for i in range(2) for k in block} | {
        f"single_blocks.{i}.{k}" for i in range(2) for k in single}


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfl_file_loads_to_the_same_model(models, variant, tmp_path):
    """A BFL file, bare and under model.diffusion_model. beside other components' keys, read by the loader's
    path: bit for bit the folder's weights, and the same outputs."""
    ours, _, folder = models(variant)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    bare = load_bfl(write_bfl(folder, tmp_path / "flux1.safetensors"), config)
    extra = {"vae.decoder.conv_in.weight": torch.zeros(2, 2), "text_encoders.clip_l.transformer.x": torch.zeros(1)}
    comfy = load_bfl(write_bfl(folder, tmp_path / "comfy.safetensors", flux_keys.PREFIX, extra), config)
    for m in (bare, comfy):
        assert m.state_dict().keys() == ours.state_dict().keys()
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in m.state_dict().items())
    x, ctx, pooled = inputs((6, 8))
    g = 3.5 if ours.config.guidance_embeds else None
    with torch.no_grad():
        assert torch.equal(comfy(x, 700.0, ctx, pooled, g), ours(x, 700.0, ctx, pooled, g))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfl_file_read_by_diffusers_from_single_file(models, variant, tmp_path, monkeypatch):
    """diffusers' own converter reads our BFL-layout file to the same outputs: the layout is BFL's, not only
    self-consistent. Its converter hard-codes FLUX.1's width (inner_dim = 3072) to split linear1; that one constant
    is set to the tiny model's width for the call."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils

    ours, _, folder = models(variant)
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    consts = fn.__code__.co_consts
    assert consts.count(3072) == 1
    monkeypatch.setattr(fn, "__code__", fn.__code__.replace(
        co_consts=tuple(ours.config.inner_dim if c == 3072 and type(c) is int else c for c in consts)))
    path = write_bfl(folder, tmp_path / "flux1.safetensors", flux_keys.PREFIX)
    theirs = FluxTransformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                     local_files_only=True, torch_dtype=torch.float32).eval()
    x, ctx, pooled = inputs((8, 6))
    g = torch.tensor([3.5, 2.0]) if ours.config.guidance_embeds else None
    with torch.no_grad():
        want = reference(theirs, x, torch.tensor([300.0, 20.0]), ctx, pooled, g)
        mine = load_bfl(path, json.loads((folder / "transformer" / "config.json").read_text()))
        assert (mine(x, torch.tensor([300.0, 20.0]), ctx, pooled, g) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("guidance", [True, False])
def test_config_inferred_from_real_shapes(guidance):
    """FLUX.1-dev's / schnell's config from the BFL file's shapes alone (a header of diffusers' real model, built
    on meta, inverted to BFL names): depth, single depth, heads of 128, dev = guidance_in present."""
    from diffusers import FluxTransformer2DModel

    d = {**FLUX1_DEV, "guidance_embeds": guidance}
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**{k: v for k, v in d.items() if not k.startswith("_")})
    header = {k: ("BF16", tuple(v.shape)) for k, v in to_bfl(ref.state_dict()).items()}
    tensors, config = flux_keys.convert(header, "flux1.safetensors")
    assert config == {**d, "out_channels": 64}
    with torch.device("meta"):
        assert {k: tuple(v.shape) for k, v in build("transformer", config).state_dict().items()} == {
            k: keys.transform_shape(header[src][1], t) for k, (_, src, t) in tensors.items()}


def test_config_inferred_from_tiny_shapes(models, tmp_path, monkeypatch):
    """A tiny file's config from its shapes equals the one diffusers saved, once its rotary axes are known (they
    are not in the weights); a head width FLUX.1 does not use asks for config= in one line."""
    _, _, folder = models("dev")
    path = write_bfl(folder, tmp_path / "tiny.safetensors")
    header = files.read_header(path)
    with pytest.raises(CheckpointError, match=r"attention head dim 16 \(FLUX.1 uses 128\): its rotary axes are "
                                              r"unknown; pass config=") as err:
        flux_keys.convert(header, path)
    assert "\n" not in str(err.value)
    monkeypatch.setitem(flux_keys.AXES_DIMS_ROPE, 16, [4, 6, 6])
    saved = json.loads((folder / "transformer" / "config.json").read_text())
    _, config = flux_keys.convert(header, path)
    assert config == {k: v for k, v in saved.items() if not k.startswith("_diffusers")} | {"out_channels": 64}


@pytest.mark.parametrize("edit,msg", [
    ({"model.diffusion_model.double_blocks.0.img_attn.lora_up.weight": torch.zeros(2)},
     r"unexpected key 'model.diffusion_model.double_blocks.0.img_attn.lora_up.weight' \(shape \(2,\)\), not part "
     r"of a FLUX.1 transformer"),
    ({"model.diffusion_model.foo": torch.zeros(1)}, "unexpected key 'model.diffusion_model.foo'")])
def test_bfl_unknown_key_is_one_line_error(models, tmp_path, edit, msg):
    _, _, folder = models("schnell")
    path = write_bfl(folder, tmp_path / "f.safetensors", flux_keys.PREFIX, edit)
    with pytest.raises(CheckpointError, match=msg) as err:
        flux_keys.convert(files.read_header(path), path)
    assert "\n" not in str(err.value)


def test_not_a_flux_file_is_one_line_error(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(path))
    header = files.read_header(path)
    assert not flux_keys.is_flux_file(header)
    with pytest.raises(CheckpointError, match="unexpected key 'decoder.conv_in.weight'"):
        flux_keys.convert(header, path)
    with pytest.raises(CheckpointError, match=r"no FLUX transformer weights \(no double_blocks"):
        flux_keys.convert({}, path)
