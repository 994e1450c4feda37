"""SD-XL models and loading against diffusers' StableDiffusionXLPipeline on tiny random folders (CPU, fp32):
prompt encoding (both tokenizers, both encoders, pooled, ∅ zeros), the UNet's text_time conditioning, the VAE,
fp16 variant folders, single SGM files (bit-exact round trip), Turbo configs and the refused families."""
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import single_file
import tiny_sdxl
from tiny import one_thread  # noqa: F401  (autouse)
from diffedit_engine.engine.models import sdxl
from diffedit_engine.weights import CheckpointError, detect, keys, load_model

# The prompts here include over-long ones on purpose: the parity checks compare our truncation with diffusers'.
# That truncation warns (weights.tokenizer.PromptTruncatedWarning), which tests/test_prompt_truncation.py asserts;
# here it is expected and not what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::diffedit_engine.weights.tokenizer.PromptTruncatedWarning")

VARIANTS = list(tiny_sdxl.VARIANTS)
PROMPTS = ["a photo of a cat", "ünïcödé ☃ !!!", "word " * 100]
TOL = 1e-5


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def pair(tiny_sdxl_folder):
    """pair(variant) -> (load_model(folder), diffusers pipeline), loaded once."""
    cache = {}

    def get(variant):
        if variant not in cache:
            folder = tiny_sdxl_folder(variant)
            cache[variant] = load_model(folder), tiny_sdxl.reference(folder)
        return cache[variant]

    return get


@torch.inference_mode()
def outputs(m, seed=0):
    """Every module's output on fixed inputs: prompt encoding, UNet with added conditions, VAE encode/decode."""
    g = torch.Generator().manual_seed(seed)
    ctx, pooled = m.encode_prompt(PROMPTS + [""])
    x = torch.randn(2, 4, 8, 8, generator=g)
    tids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 3, 5, 40, 72]])
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mean, logvar = m.vae.encode(img)
    return {"ids": m.tokenizer(PROMPTS), "ids_2": m.tokenizer_2(PROMPTS), "ctx": ctx, "pooled": pooled,
            "unet": m.unet(x, torch.tensor([1, 999]), ctx[:2], text_embeds=pooled[:2], time_ids=tids),
            "mean": mean, "logvar": logvar, "decode": m.vae.decode(mean)}


def assert_identical(a: dict, b: dict):
    for k in a:
        assert torch.equal(a[k], b[k]), (k, rel(a[k], b[k]))


# ---- models against diffusers -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_prompt_matches_diffusers(pair, variant):
    m, pipe = pair(variant)
    assert m.kind == "sdxl" and m.force_zeros_for_empty_prompt and m.vae_scaling_factor == 0.13025
    with torch.inference_mode():
        pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        ctx, pooled = m.encode_prompt(PROMPTS)
        d = m.text_encoder.config.hidden_size + m.text_encoder_2.config.hidden_size
        assert ctx.shape == pe.shape == (3, 77, d) and pooled.shape == pp.shape
        assert rel(ctx, pe) <= TOL and rel(pooled, pp) <= TOL
        # ∅ with force_zeros_for_empty_prompt: zeros, as diffusers' negative embedding without a negative prompt.
        c0, p0 = m.encode_prompt(["", PROMPTS[0], ""])
        assert npe.abs().max() == 0 and torch.equal(c0[[0, 2]], npe[:2]) and torch.equal(p0[[0, 2]], npp[:2])
        assert rel(c0[1], ctx[0]) <= TOL and rel(p0[1], pooled[0]) <= TOL  # another batch size: not bit-equal
        # Without it, "" is encoded like any prompt (diffusers with negative_prompt="").
        m.force_zeros_for_empty_prompt = False
        try:
            c1, p1 = m.encode_prompt([""] * 3)
        finally:
            m.force_zeros_for_empty_prompt = True
        _, npe, _, npp = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                            negative_prompt=[""] * 3)
        assert rel(c1, npe) <= TOL and rel(p1, npp) <= TOL and c1.abs().max() > 0


def test_tokenizers_match_transformers(pair):
    m, pipe = pair("xl")
    prompts = PROMPTS + ["", "café 東京 🐱 !!!", "a!b! c"]
    for ours, ref, pad in ((m.tokenizer, pipe.tokenizer, 49407), (m.tokenizer_2, pipe.tokenizer_2, 0)):
        want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ours(prompts), want) and ours.pad_token_id == pad


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hw,timestep", [((8, 8), torch.tensor([10, 981])), ((9, 13), 500)])
def test_unet_matches_diffusers(pair, variant, hw, timestep):
    m, pipe = pair(variant)
    cfg = m.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(2, m.text_encoder_2.config.projection_dim, generator=g)
    tids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 576, 832]])
    with torch.inference_mode():
        want = pipe.unet(x, timestep, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
        got = m.unet(x, timestep, ctx, text_embeds=pooled, time_ids=tids)
        assert got.shape == want.shape == x.shape and rel(got, want) <= TOL
        # One (1, 6) row serves the whole batch, as engine.sdxl.time_ids gives it.
        one = sdxl.time_ids((1024, 1024))
        want = pipe.unet(x, timestep, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": one.expand(2, -1)})
        assert rel(m.unet(x, timestep, ctx, text_embeds=pooled, time_ids=one), want.sample) <= TOL
    with pytest.raises(AssertionError, match="text_embeds and time_ids"):
        m.unet(x, timestep, ctx)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vae_matches_diffusers(pair, variant):
    m, pipe = pair(variant)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    with torch.inference_mode():
        dist = pipe.vae.encode(img).latent_dist
        mean, logvar = m.vae.encode(img)
        assert rel(mean, dist.mean) <= TOL and rel(logvar, dist.logvar) <= TOL
        z = torch.randn(2, 4, 8, 6, generator=g)
        assert rel(m.vae.decode(z), pipe.vae.decode(z).sample) <= TOL
    assert m.vae.config.force_upcast and m.vae_scaling_factor == pipe.vae.config.scaling_factor == 0.13025


def test_time_ids():
    assert sdxl.time_ids((768, 512)).tolist() == [[768, 512, 0, 0, 768, 512]]
    assert sdxl.time_ids((768, 512), (4, 8), (1024, 1024)).tolist() == [[768, 512, 4, 8, 1024, 1024]]


def test_sd1_encode_prompt(tiny_folder):
    m = load_model(tiny_folder("sd1"))
    ctx, pooled = m.encode_prompt(PROMPTS)
    assert pooled is None and m.tokenizer_2 is None and m.text_encoder_2 is None
    with torch.inference_mode():
        assert torch.equal(ctx, m.text_encoder(m.tokenizer(PROMPTS)))
    assert m.encode_prompt("a cat")[0].shape == (1, 77, m.text_encoder.config.hidden_size)


# ---- folders: fp16 variants, Turbo -------------------------------------------------------------------------

def test_fp16_variant_folder(tiny_sdxl_folder, pair):
    folder = tiny_sdxl_folder("xl", fp16_variant=True)
    assert (folder / "text_encoder_2" / "model.fp16.safetensors").is_file()
    m16 = load_model(folder, dtype=torch.float16)
    assert m16.text_encoder_2.text_projection.weight.dtype == m16.unet.conv_in.weight.dtype == torch.float16
    # force_upcast: the SD-XL VAE overflows in fp16, so it loads in fp32 unless vae_dtype says otherwise.
    assert next(m16.vae.parameters()).dtype == torch.float32
    assert next(load_model(folder, dtype=torch.float16, vae_dtype=torch.float16).vae.parameters()).dtype == torch.float16
    # fp32 from an fp16-only folder: the stored halves, cast up.
    m32 = load_model(folder)
    ref = load_file(str(folder / "text_encoder_2" / "model.fp16.safetensors"))["text_projection.weight"]
    assert torch.equal(m32.text_encoder_2.text_projection.weight, ref.float())


def test_fp16_vae_without_force_upcast(tiny_sdxl_folder, tmp_path):
    folder = shutil.copytree(tiny_sdxl_folder("xl"), tmp_path / "fixed")
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))  # an fp16-fix VAE
    assert next(load_model(folder, dtype=torch.float16).vae.parameters()).dtype == torch.float16


def test_turbo_configs(tiny_sdxl_folder, tiny_folder, tmp_path):
    m = load_model(tiny_sdxl_folder("xl", turbo=True))
    assert m.kind == "sdxl" and m.scheduler.timestep_spacing == "trailing" and m.prediction_type == "epsilon"
    # SD-Turbo: SD 2.1 with an Euler scheduler at trailing spacing (epsilon).
    folder = shutil.copytree(tiny_folder("sd2"), tmp_path / "sd-turbo")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "steps_offset": 1, "timestep_spacing": "trailing"}))
    m = load_model(folder)
    assert m.kind == "sd2" and m.scheduler.timestep_spacing == "trailing" and m.prediction_type == "epsilon"


# ---- single files ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(tiny_sdxl_folder, tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tmp_path_factory.mktemp("single") / f"{variant}.safetensors"
            cache[variant] = single_file.write_single_file(tiny_sdxl_folder(variant), path)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def folder_outputs(pair):
    cache = {}
    return lambda v: cache[v] if v in cache else cache.setdefault(v, outputs(pair(v)[0]))


def test_single_file_layout_matches_diffusers_converters(tiny_sdxl_folder, single):
    """The helper writes what diffusers' own converters read back to the folder's tensors (the real SGM layout)."""
    from diffusers.loaders import single_file_utils as su

    folder = tiny_sdxl_folder("xl")
    ckpt = load_file(str(single("xl")))
    assert "model.diffusion_model.label_emb.0.0.weight" in ckpt
    assert f"{keys.SDXL_OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in ckpt
    # transformers 5 saves CLIPTextModel without the text_model. prefix the converters write.
    want = lambda sub, stem: {k if k.startswith(("text_model.", "text_projection.")) or sub == "unet" else  # noqa: E731
                              "text_model." + k: v for k, v in load_file(str(folder / sub / f"{stem}.safetensors")).items()}
    te2 = tiny_sdxl.reference(folder).text_encoder_2
    text = su.convert_ldm_clip_checkpoint(dict(ckpt))
    text.pop("text_model.embeddings.position_ids")
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    for got, ref in ((su.convert_ldm_unet_checkpoint(dict(ckpt), unet_cfg), want("unet", "diffusion_pytorch_model")),
                     (text, want("text_encoder", "model")),
                     (su.convert_open_clip_checkpoint(te2, dict(ckpt), prefix=keys.SDXL_OPENCLIP_PREFIX),
                      want("text_encoder_2", "model"))):
        assert set(got) == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_identical_to_folder(tiny_sdxl_folder, single, folder_outputs, variant):
    m = load_model(single(variant), config=tiny_sdxl_folder(variant))
    assert m.kind == "sdxl" and m.prediction_type == "epsilon" and m.force_zeros_for_empty_prompt
    assert_identical(outputs(m), folder_outputs(variant))


def test_single_file_detection(tiny_sdxl_folder, single, tmp_path):
    """No config: every shape-derived field is detected; heads and groups follow SD-XL's conventions (64-wide
    heads, GroupNorm groups dividing every width). The folder's weights with those conventions written into its
    configs give bit-equal outputs, tokenizers included."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no prediction-type warning: SD-XL is epsilon
        m = load_model(single("xl"))
    folder = tiny_sdxl_folder("xl")
    assert m.kind == "sdxl" and m.prediction_type == "epsilon" and m.force_zeros_for_empty_prompt
    assert m.vae_scaling_factor == 0.13025 and (m.tokenizer.pad_token_id, m.tokenizer_2.pad_token_id) == (49407, 0)
    cfg = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
    ucfg, vcfg, t1, t2 = cfg("unet"), cfg("vae"), cfg("text_encoder"), cfg("text_encoder_2")
    for name in ("transformer_layers_per_block", "block_out_channels", "down_block_types", "up_block_types",
                 "addition_time_embed_dim", "projection_class_embeddings_input_dim", "cross_attention_dim",
                 "addition_embed_type", "use_linear_projection", "layers_per_block"):
        got = getattr(m.unet.config, name)
        assert (list(got) if isinstance(got, tuple) else got) == ucfg[name], name
    for name in ("hidden_size", "num_hidden_layers", "projection_dim", "hidden_act", "intermediate_size"):
        assert getattr(m.text_encoder_2.config, name) == t2[name], name
        assert name == "projection_dim" or getattr(m.text_encoder.config, name) == t1[name], name

    conv = shutil.copytree(folder, tmp_path / "conventions")
    edit = lambda sub, **kw: (conv / sub / "config.json").write_text(json.dumps({**cfg(sub), **kw}))  # noqa: E731
    ch = ucfg["block_out_channels"]
    edit("unet", attention_head_dim=[max(1, c // 64) for c in ch], norm_num_groups=detect._groups(ch))
    edit("vae", norm_num_groups=detect._groups(vcfg["block_out_channels"]))
    edit("text_encoder", num_attention_heads=max(1, t1["hidden_size"] // 64))
    edit("text_encoder_2", num_attention_heads=max(1, t2["hidden_size"] // 64))
    assert_identical(outputs(m), outputs(load_model(conv)))


# ---- refused families --------------------------------------------------------------------------------------

def _fake_folder(root, index: dict, subdirs=()):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    for d in subdirs:
        (root / d).mkdir()
    return root


@pytest.mark.parametrize("index,subdirs,match", [
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
     ["transformer"], "transformer: missing config.json"),  # SD 3 loads now (tests/test_sd3_load.py): a broken folder names what it lacks
    ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, ["transformer"], "FLUX"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
      "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
     ["text_encoder_2", "unet"], "SD-XL refiner"),
])
def test_unsupported_folders(tmp_path, index, subdirs, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(_fake_folder(tmp_path / "m", index, subdirs))


@pytest.mark.parametrize("key,match", [
    # SD 3 files load now (tests/test_sd3_load.py); one mixed with SD UNet keys names the stray key
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "not part of an SD 3.x single-file checkpoint"),
    ("double_blocks.0.img_attn.qkv.weight", "FLUX"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "FLUX"),
    ("conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight", "SD-XL refiner"),
])
def test_unsupported_single_files(tmp_path, key, match):
    path = tmp_path / "x.safetensors"
    save_file({key: torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_detect_kind():
    assert detect.kind(False, 4, sdxl=True) == "sdxl" and detect.kind(False, 9, sdxl=True) == "sdxl-inpaint"


# ---- benchmarks/make_model.py --kind sdxl ------------------------------------------------------------------

def _make_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "make_model.py"
    spec = importlib.util.spec_from_file_location("make_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_model_sdxl_streams_a_loadable_folder(tmp_path):
    """The lazy SD-XL builder (real shapes in make_model.SDXL) on tiny configs: diffusers and the engine read the
    folder, and agree."""
    mm = _make_model()
    t = tiny_sdxl.VARIANTS["xl"]
    spec = dict(mm.SDXL, vae=dict(tiny_sdxl.VAE, sample_size=64),
                clip=dict(t["clip"], hidden_act="quick_gelu", projection_dim=32), clip_2=dict(t["clip_2"], hidden_act="gelu"),
                unet=dict(mm.SDXL_UNET, block_out_channels=(32, 64), down_block_types=t["unet"]["down_block_types"],
                          up_block_types=t["unet"]["up_block_types"], transformer_layers_per_block=(1, 2),
                          attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8,
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32))
    out = mm.build_sdxl(mm.Options(kind="sdxl", out=str(tmp_path / "xl"), dtype="float16"), spec)
    m = load_model(out)
    pipe = tiny_sdxl.reference(out)
    assert m.kind == "sdxl" and m.vae_scaling_factor == 0.13025
    ref = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in ref.values()) and set(ref) == set(m.unet.state_dict())
    with torch.inference_mode():
        pe, _, pp, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        ctx, pooled = m.encode_prompt(PROMPTS)
        assert rel(ctx, pe) <= TOL and rel(pooled, pp) <= TOL
        x, tids = torch.randn(1, 4, 8, 8), sdxl.time_ids((64, 64))
        want = pipe.unet(x, 500, ctx[:1], added_cond_kwargs={"text_embeds": pooled[:1], "time_ids": tids}).sample
        assert rel(m.unet(x, 500, ctx[:1], text_embeds=pooled[:1], time_ids=tids), want) <= TOL
    # Already complete: left alone.
    assert mm.build_sdxl(mm.Options(kind="sdxl", out=str(out), dtype="float16"), spec) == out
    with pytest.raises(SystemExit, match="GB of disk"):
        mm.check_resources(tmp_path / "big", 1 << 60)


def test_real_sdxl_shapes_and_detection():
    """The released SD-XL base architecture on the meta device (no memory): the engine's modules have diffusers'/
    transformers' keys and shapes, and a single-file header with those shapes is detected as the released configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffedit_engine.engine.models.clip import CLIPTextConfig as Cfg, CLIPTextModelWithProjection as Ours2
    from diffedit_engine.engine.models.unet import UNet, UNetConfig
    from diffedit_engine.weights.model import file_parts

    mm = _make_model()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**mm.SDXL_UNET)
        ours = UNet(UNetConfig.from_json(dict(unet.config)))
        te = CLIPTextModel(CLIPTextConfig(**common, **mm.SDXL_CLIP))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **mm.SDXL_CLIP_2))
        ours2 = Ours2(Cfg.from_json(te2.config.to_dict(), "CLIPTextModelWithProjection"))
        vae = AutoencoderKL(**mm.SDXL_VAE)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("position_ids")}  # noqa
    assert shapes(ours) == shapes(unet) and shapes(ours2) == shapes(te2)
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684  # SD-XL base's UNet

    sd = single_file.unet_to_ldm(unet.state_dict(), 2)
    sd.update(single_file.vae_to_ldm(vae.state_dict()))
    sd.update(single_file.clip_to_ldm(te.state_dict(), keys.SDXL_CLIP_PREFIX))
    sd.update(single_file.openclip_to_ldm(te2.state_dict(), full_tower=False, prefix=keys.SDXL_OPENCLIP_PREFIX))
    parts, sd2 = file_parts("sd_xl_base_1.0.safetensors", {k: ("F16", tuple(v.shape)) for k, v in sd.items()})
    assert not sd2 and set(parts) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    u = UNetConfig.from_json(parts["unet"].config)
    for name, want in mm.SDXL_UNET.items():
        if name != "addition_embed_type_num_heads":
            assert getattr(u, name) == want, name
    for name, want in mm.SDXL_CLIP_2.items():
        assert parts["text_encoder_2"].config[name] == want, name
    for name, want in mm.SDXL_CLIP.items():
        assert parts["text_encoder"].config[name] == want, name
    assert parts["vae"].config["scaling_factor"] == 0.13025
