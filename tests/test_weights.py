"""weights.load_model: diffusers folders, single CompVis/A1111 files, hub-cache ids, and every bad input's error.
Tiny random checkpoints from tests/tiny.py; the references are diffusers/transformers (CPU, fp32)."""
import json
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import single_file
import tiny
from tiny import one_thread  # noqa: F401  (autouse)
from diffedit_engine.weights import CheckpointError, Model, detect, files, keys, load_model
from diffedit_engine.weights.tokenizer import PromptTruncatedWarning, Tokenizer

VARIANTS = ["sd1", "sd2", "inpaint", "deep"]
PROMPTS = ["a photo of a cat", "", "ünïcödé ☃ !!!", "word " * 100]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.inference_mode()
def outputs(m, in_channels=None, seed=0):
    """Every module's output on fixed inputs: text encoder, UNet, VAE encode (mean, logvar) and decode."""
    g = torch.Generator().manual_seed(seed)
    ours = isinstance(m.tokenizer, Tokenizer)  # the reference (transformers') does not warn
    with pytest.warns(PromptTruncatedWarning, match="tokens were dropped") if ours else nullcontext():
        ids = m.tokenizer(PROMPTS)  # PROMPTS' long prompt is truncated
    ctx = m.text_encoder(ids)
    x = torch.randn(2, in_channels or m.unet.config.in_channels, 8, 8, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mean, logvar = m.vae.encode(img)
    return {"ids": ids, "text": ctx, "unet": m.unet(x, torch.tensor([1, 999]), ctx[:2]),
            "mean": mean, "logvar": logvar, "decode": m.vae.decode(mean)}


def assert_identical(a: dict, b: dict):
    for k in a:
        assert torch.equal(a[k], b[k]), (k, rel(a[k], b[k]))


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **kw):
    d = json.loads(path.read_text())
    d.update(kw)
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def folder_outputs(tiny_folder):
    """folder_outputs(variant) -> outputs(load_model(tiny folder)), computed once."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = outputs(load_model(tiny_folder(variant)))
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def single(tiny_folder, tmp_path_factory):
    """single(variant) -> a single-file checkpoint with the tiny folder's weights."""
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tmp_path_factory.mktemp("single") / f"{variant}.safetensors"
            cache[variant] = single_file.write_single_file(tiny_folder(variant), path)
        return cache[variant]

    return get


# ---- diffusers folders against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_matches_reference(tiny_folder, variant):
    folder = tiny_folder(variant)
    m = load_model(folder)
    assert isinstance(m, Model) and m.source == str(folder)
    assert m.kind == {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1-inpaint", "deep": "sd1"}[variant]
    assert m.prediction_type == m.scheduler.prediction_type == tiny.VARIANTS[variant]["prediction_type"]
    assert m.vae_scaling_factor == 0.18215 and m.device == torch.device("cpu") and m.dtype == torch.float32
    for mod in (m.unet, m.vae, m.text_encoder):
        assert not mod.training and all(p.dtype == torch.float32 and not p.requires_grad for p in mod.parameters())
        assert not any(t.is_meta for t in mod.state_dict().values())

    ref = tiny.reference_model(folder)
    got, want = outputs(m), outputs(ref, m.unet.config.in_channels)
    assert torch.equal(got["ids"], want["ids"])
    for k in ("text", "unet", "mean", "logvar", "decode"):
        assert rel(got[k], want[k]) <= 1e-5, (k, rel(got[k], want[k]))


def test_prediction_type_override(tiny_folder):
    m = load_model(tiny_folder("sd2"), prediction_type="epsilon")
    assert m.kind == "sd2" and m.prediction_type == m.scheduler.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        load_model(tiny_folder("sd1"), prediction_type="x0")


def test_fp16_variant_folder(tiny_folder):
    folder = tiny_folder("sd1", fp16_variant=True)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    stored = load_file(str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    m32 = load_model(folder)  # no fp32 file: falls back to the fp16 one, cast up
    sd = m32.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert all(torch.equal(sd[k], v.float()) for k, v in stored.items())
    assert torch.isfinite(outputs(m32)["unet"]).all()
    m16 = load_model(folder, dtype=torch.float16)
    assert m16.dtype == torch.float16
    assert all(p.dtype == torch.float16 for mod in (m16.unet, m16.vae, m16.text_encoder) for p in mod.parameters())
    assert all(torch.equal(m16.unet.state_dict()[k], v) for k, v in stored.items())


def test_variant_file_preference(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "both")
    fp16 = tiny_folder("sd1", fp16_variant=True)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        shutil.copy(fp16 / sub / f"{stem}.fp16.safetensors", folder / sub)
    unet = folder / "unet"
    assert files.weights_file(unet, "diffusion_pytorch_model", prefer_fp16=True).name.endswith(".fp16.safetensors")
    assert files.weights_file(unet, "diffusion_pytorch_model", prefer_fp16=False).name == "diffusion_pytorch_model.safetensors"
    m = load_model(folder, dtype=torch.float16)
    stored = load_file(str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    assert all(torch.equal(m.unet.state_dict()[k], v) for k, v in stored.items())


def test_sharded_folder_and_vae_dtype(tiny_folder, folder_outputs, tmp_path):
    """Sharded weights (an index json naming the shards) load like the single file; vae_dtype sets the VAE's."""
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "sharded")
    unet = folder / "unet"
    sd = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(unet / shard))
        weight_map.update({k: shard for k in part})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_identical(outputs(load_model(folder)), folder_outputs("sd1"))
    m = load_model(folder, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert next(m.unet.parameters()).dtype == torch.bfloat16 and next(m.vae.parameters()).dtype == torch.float32
    (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors.*missing"):
        load_model(folder)


def test_tokenizer_json_folder(tiny_folder, tmp_path):
    """A tokenizer folder with only tokenizer.json (the fast-tokenizer file) loads the same ids."""
    folder = copy_folder(tiny_folder("sd2"), tmp_path / "tj")
    tok = folder / "tokenizer"
    from transformers import CLIPTokenizerFast
    CLIPTokenizerFast.from_pretrained(str(tok)).save_pretrained(str(tok))
    (tok / "vocab.json").unlink()
    (tok / "merges.txt").unlink()
    assert (tok / "tokenizer.json").is_file()
    with pytest.warns(PromptTruncatedWarning, match="tokens were dropped"):  # PROMPTS' long prompt
        assert torch.equal(load_model(folder).tokenizer(PROMPTS), load_model(tiny_folder("sd2")).tokenizer(PROMPTS))


def test_legacy_folder_names(tiny_folder, folder_outputs, tmp_path):
    """Pre-0.14 diffusers VAE attention names and a text encoder saved with text_model. prefix + position_ids."""
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "legacy")
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {v: k for k, v in keys.VAE_ATTN_LEGACY.items()}
    sd = {}
    for k, v in load_file(str(vae)).items():
        head, sep, tail = k.partition(".attentions.0.")
        sd[head + sep + next((legacy[n] + tail[len(n):] for n in legacy if tail.startswith(n)), tail) if sep else k] = v
    assert any(".query.weight" in k for k in sd) and not any("to_q" in k for k in sd)
    save_file(sd, str(vae))
    te = folder / "text_encoder" / "model.safetensors"
    sd = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in load_file(str(te)).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(te))
    assert_identical(outputs(load_model(folder)), folder_outputs("sd1"))


# ---- single files --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_layout_matches_diffusers_converters(tiny_folder, single, variant):
    """The test helper writes what diffusers' own single-file converters read back to the folder's tensors, so
    the layout (and the key map it inverts) is the real CompVis/A1111 one."""
    from types import SimpleNamespace

    from diffusers.loaders import single_file_utils as su

    folder = tiny_folder(variant)
    ckpt = load_file(str(single(variant)))
    cfg = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
    want = lambda sub, stem: load_file(str(folder / sub / f"{stem}.safetensors"))  # noqa: E731
    got_text = {}
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in want("text_encoder", "model").items()}
    if cfg("text_encoder")["hidden_act"] == "gelu":
        n = cfg("text_encoder")["num_hidden_layers"]
        assert f"cond_stage_model.model.transformer.resblocks.{n}.attn.in_proj_weight" in ckpt  # the unused last layer
        hidden = SimpleNamespace(config=SimpleNamespace(hidden_size=cfg("text_encoder")["hidden_size"]))
        # diffusers drops resblocks.23 by name (real SD2 has 24); drop the tiny model's last one the same way.
        got_text = {k: v for k, v in su.convert_open_clip_checkpoint(hidden, dict(ckpt)).items() if f".layers.{n}." not in k}
    else:
        got_text = su.convert_ldm_clip_checkpoint(dict(ckpt))
        got_text.pop("text_model.embeddings.position_ids")
    for got, ref in ((su.convert_ldm_unet_checkpoint(dict(ckpt), cfg("unet")), want("unet", "diffusion_pytorch_model")),
                     (su.convert_ldm_vae_checkpoint(dict(ckpt), cfg("vae")), want("vae", "diffusion_pytorch_model")),
                     (got_text, text)):
        assert set(got) == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_identical_to_folder(tiny_folder, folder_outputs, single, variant):
    """config= takes the folder's config.json files (heads and groups are not in any shape): bit-equal outputs."""
    folder = tiny_folder(variant)
    m = load_model(single(variant), config=folder)
    assert m.kind == detect.kind(variant == "sd2", 9 if variant == "inpaint" else 4)
    assert m.source == str(single(variant))
    assert m.prediction_type == tiny.VARIANTS[variant]["prediction_type"]
    assert_identical(outputs(m), folder_outputs(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_detection(tiny_folder, single, tmp_path, variant):
    """No config: every shape-derived field is detected; heads/groups follow SD's conventions. A copy of the folder
    whose configs state those conventions gives bit-equal outputs (same weights), tokenizer included."""
    folder = tiny_folder(variant)
    sd2 = variant == "sd2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_model(single(variant))
    assert any("prediction_type='epsilon'" in str(w.message) for w in caught) == sd2
    assert m.kind == {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1-inpaint", "deep": "sd1"}[variant]
    assert m.prediction_type == m.scheduler.prediction_type == ("v_prediction" if sd2 else "epsilon")
    assert m.tokenizer.pad_token_id == (0 if sd2 else 49407)

    ucfg = json.loads((folder / "unet" / "config.json").read_text())
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    tcfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    u, v, t = m.unet.config, m.vae.config, m.text_encoder.config
    for name in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection"):
        assert getattr(u, name) == ucfg[name], name
    for name in ("block_out_channels", "down_block_types", "up_block_types"):
        assert list(getattr(u, name)) == list(ucfg[name]), name
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "scaling_factor"):
        assert getattr(v, name) == vcfg[name], name
    assert list(v.block_out_channels) == list(vcfg["block_out_channels"])
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
                 "hidden_act"):
        assert getattr(t, name) == tcfg[name], name
    assert u.upcast_attention == sd2

    # The same weights with the conventions written into the configs.
    conv = copy_folder(folder, tmp_path / "conventions")
    channels = ucfg["block_out_channels"]
    edit_json(conv / "unet" / "config.json", attention_head_dim=[max(1, c // 64) for c in channels] if sd2 else 8,
              upcast_attention=sd2, norm_num_groups=detect._groups(channels))
    edit_json(conv / "vae" / "config.json", norm_num_groups=detect._groups(vcfg["block_out_channels"]))
    edit_json(conv / "text_encoder" / "config.json", num_attention_heads=max(1, tcfg["hidden_size"] // 64))
    assert_identical(outputs(m), outputs(load_model(conv)))


SD_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, norm_num_groups=32, out_channels=4,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
REAL = {  # the released models' diffusers configs (the fields that matter for the graph)
    "sd1": (dict(SD_UNET, in_channels=4, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
                 upcast_attention=False),
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu")),
    "sd2": (dict(SD_UNET, in_channels=4, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True),
            dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu")),
    "sd1-inpaint": (dict(SD_UNET, in_channels=9, cross_attention_dim=768, attention_head_dim=8,
                         use_linear_projection=False, upcast_attention=False),
                    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu")),
    "sd2-inpaint": (dict(SD_UNET, in_channels=9, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                         use_linear_projection=True, upcast_attention=True),
                    dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                         hidden_act="gelu")),
}


@pytest.mark.parametrize("kind", list(REAL))
def test_detection_at_real_sd_sizes(kind):
    """Full-size SD 1.5 / 2.1 / inpainting layouts (shapes only, on the meta device): the configs inferred from a
    single file's keys equal the released diffusers configs, and the engine's modules accept every shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffedit_engine.weights import model as wm

    ucfg, tcfg = REAL[kind]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg).state_dict()
        vae = AutoencoderKL(**SD_VAE).state_dict()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **tcfg)).state_dict()
    sd = single_file.ldm_state_dict(unet, 2, vae, text, openclip=tcfg["hidden_act"] == "gelu")
    if tcfg["hidden_act"] == "gelu":  # the released SD2 layout: ViT-H's 24 resblocks
        assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" in sd
    assert sd["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape[-1] == \
        ucfg["cross_attention_dim"]
    parts, sd2 = wm.file_parts(Path("real.safetensors"), {k: ("F32", tuple(v.shape)) for k, v in sd.items()})
    assert detect.kind(sd2, parts["unet"].config["in_channels"]) == kind
    for want, got in ((ucfg, parts["unet"].config), (SD_VAE, parts["vae"].config), (tcfg, parts["text_encoder"].config)):
        assert {k: got[k] for k in want} == want
    for name, part in parts.items():
        with torch.device("meta"):
            module = wm._build(name, part.config)
        wm.check(name, part, {k: v.shape for k, v in module.state_dict().items()})


def test_sd2_detection_rules():
    """SD2 = OpenCLIP text layout, or 1024-wide cross attention (real SD2; the tiny model is 48 wide)."""
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert detect.is_sd2({k: (640, 1024)}, openclip=False)
    assert not detect.is_sd2({k: (640, 768)}, openclip=False)
    assert detect.is_sd2({k: (64, 48)}, openclip=True)
    assert detect.kind(True, 9) == "sd2-inpaint" and detect.kind(False, 4) == "sd1"
    assert detect.default_prediction_type("sd2-inpaint") == "epsilon"
    assert detect.default_prediction_type("sd1") == "epsilon"


def test_sd2_inpaint_single_file(tiny_folder, tmp_path):
    """A 9-channel UNet with an OpenCLIP text encoder: sd2-inpaint, epsilon by default (no warning)."""
    folder = tiny_folder("sd2")
    w = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"]
    nine = torch.cat([w, w, w[:, :1]], dim=1)
    path = single_file.write_single_file(folder, tmp_path / "sd2in.safetensors",
                                         {"model.diffusion_model.input_blocks.0.0.weight": nine})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = load_model(path)
    assert m.kind == "sd2-inpaint" and m.prediction_type == "epsilon" and m.unet.config.in_channels == 9
    assert load_model(path, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_sd2_file_converted_from_diffusers(tiny_folder, folder_outputs, tmp_path):
    """An SD2 file written back from a diffusers folder holds only the used layers and no text_projection:
    nothing is dropped. (The VAE's training-loss weights some files carry are ignored too.)"""
    path = single_file.write_single_file(tiny_folder("sd2"), tmp_path / "back.safetensors", full_tower=False,
                                         edit={"first_stage_model.loss.logvar": torch.zeros(())})
    assert "cond_stage_model.model.text_projection" not in load_file(str(path))
    m = load_model(path, config=tiny_folder("sd2"))
    assert_identical(outputs(m), folder_outputs("sd2"))


def test_sd2_override_silences_warning(single):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = load_model(single("sd2"), prediction_type="epsilon")
    assert m.prediction_type == m.scheduler.prediction_type == "epsilon"
    # OpenCLIP's fused in_proj is read once: q, k and v are views of one tensor, not three copies.
    attn = m.text_encoder.text_model.encoder.layers[0].self_attn
    ptrs = {p.untyped_storage().data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)}
    assert len(ptrs) == 1


def test_single_file_dtype_and_old_clip_names(tiny_folder, single, tmp_path):
    """fp16 weights in the file, fp32 requested: cast per tensor. SD1 CLIP keys without text_model. (old files)."""
    sd = load_file(str(single("sd1")))
    sd = {(k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")): v.half()
          if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "old.safetensors"))
    m = load_model(tmp_path / "old.safetensors", config=tiny_folder("sd1"))
    assert all(p.dtype == torch.float32 for p in m.unet.parameters())
    ref = load_model(single("sd1"), config=tiny_folder("sd1"))
    got, want = outputs(m), outputs(ref, m.unet.config.in_channels)
    assert rel(got["unet"], want["unet"]) < 1e-2 and rel(got["text"], want["text"]) < 1e-2


# ---- errors --------------------------------------------------------------------------------------------------

def test_missing_path():
    with pytest.raises(FileNotFoundError, match="nowhere/model.safetensors"):
        load_model("/nowhere/model.safetensors")


def test_truncated_safetensors(single, tmp_path):
    data = single("sd1").read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors.*truncated"):
        load_model(bad)
    bad.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_model(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model(bad)
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="garbage.safetensors.*malformed"):
        load_model(bad)


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "model.pth"])
def test_pickles_refused(tmp_path, name, monkeypatch):
    path = tmp_path / name
    torch.save({"state_dict": {}}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CheckpointError, match="refusing.*pickle"):
        load_model(path)


def test_pickle_named_safetensors_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="sneaky.safetensors.*pickle"):
        load_model(path)


def test_folder_pickle_weights_refused(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "bin")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin.*pickle"):
        load_model(folder)


def test_folder_without_model_index(tiny_folder, tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_model(tiny_folder("sd1") / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*not a diffusers"):
        load_model(tmp_path / "empty")


def test_not_a_stable_diffusion_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="encoder.weight"):
        load_model(path)
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(2)}, str(path))  # a text encoder alone
    with pytest.raises(CheckpointError, match="no unet weights"):
        load_model(path)


def test_unsupported_config(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "cfg")
    edit_json(folder / "unet" / "config.json", addition_embed_type="text_image")
    with pytest.raises(CheckpointError, match="unet: unsupported configuration.*addition_embed_type"):
        load_model(folder)


def _rewrite(path: Path, fn):
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_missing_key(tiny_folder, single, tmp_path):
    key = "model.diffusion_model.output_blocks.2.0.in_layers.2.weight"
    path = single_file.write_single_file(tiny_folder("sd1"), tmp_path / "m.safetensors", {key: None})
    with pytest.raises(CheckpointError, match=r"missing.*up_blocks\.0\.resnets\.2\.conv1\.weight"):
        load_model(path)
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "mf")
    _rewrite(folder / "vae" / "diffusion_pytorch_model.safetensors", lambda sd: sd.pop("decoder.conv_in.bias"))
    with pytest.raises(CheckpointError, match=r"vae.*missing.*decoder\.conv_in\.bias"):
        load_model(folder)


def test_unexpected_key(tiny_folder, tmp_path):
    key = "model.diffusion_model.input_blocks.1.0.extra.weight"
    path = single_file.write_single_file(tiny_folder("sd1"), tmp_path / "u.safetensors", {key: torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected.*down_blocks\.0\.resnets\.0\.extra\.weight"):
        load_model(path)
    path = single_file.write_single_file(tiny_folder("sd1"), tmp_path / "u2.safetensors", {"lora_unet.x.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'lora_unet\.x\.weight'"):
        load_model(path)
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "uf")
    _rewrite(folder / "text_encoder" / "model.safetensors", lambda sd: sd.update({"text_projection.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"text_encoder.*unexpected.*text_projection\.weight"):
        load_model(folder)


def test_shape_mismatch_names_both_shapes(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder("sd1"), tmp_path / "s")
    key = "down_blocks.0.resnets.0.conv1.weight"
    _rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", lambda sd: sd.update({key: torch.zeros(32, 32, 1, 1)}))
    with pytest.raises(CheckpointError, match=r"unet.*shape mismatch.*down_blocks\.0\.resnets\.0\.conv1\.weight.*"
                                              r"\(32, 32, 1, 1\).*\(32, 32, 3, 3\)"):
        load_model(folder)
    # In a single file the configs come from the shapes, so a shape that disagrees with its neighbours is caught.
    sk = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    path = single_file.write_single_file(tiny_folder("sd1"), tmp_path / "s.safetensors", {sk: torch.zeros(32, 32, 1, 1)})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*down_blocks\.0\.resnets\.0\.conv1\.weight.*"
                                              r"\(32, 32, 1, 1\).*\(32, 32, 3, 3\)"):
        load_model(path)


# ---- hub ids in the local cache ------------------------------------------------------------------------------

def fake_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub cache layout: blobs/ hold the files, snapshots/<commit>/ relative symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for i, f in enumerate(p for p in sorted(folder.rglob("*")) if p.is_file()):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copy(f, blob)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(f.relative_to(folder).parts) + 1)) / "blobs" / blob.name)
    return snap


def test_hub_id_from_cache(tiny_folder, folder_outputs, tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snap = fake_hub_cache(cache, "tiny-org/tiny-sd", tiny_folder("sd1"))
    assert (snap / "unet" / "config.json").is_symlink()
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_model("tiny-org/tiny-sd")
    assert m.source == str(snap)
    assert_identical(outputs(m), folder_outputs("sd1"))
    # HF_HUB_CACHE wins over HF_HOME.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="tiny-org/tiny-sd.*not in the Hugging Face cache"):
        load_model("tiny-org/tiny-sd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert load_model("tiny-org/tiny-sd").source == str(snap)
    with pytest.raises(FileNotFoundError, match="tiny-org/absent.*HF_HUB_OFFLINE"):
        load_model("tiny-org/absent")


def test_hub_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    assert files.hub_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert files.hub_cache_dir() == tmp_path / "b" / "hub"
    monkeypatch.delenv("HF_HOME")
    assert files.hub_cache_dir() == Path("~/.cache/huggingface/hub").expanduser()


def test_hub_download_patterns(tiny_folder, tmp_path, monkeypatch):
    """Not cached, online, huggingface_hub importable: snapshot_download is asked for configs, tokenizer files and
    one precision of safetensors weights per component; never pickles or root-level single files."""
    import sys
    import types

    repo_files = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "unet/config.json",
                  "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                  "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
                  "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                  "scheduler/scheduler_config.json", "safety_checker/model.safetensors"]
    calls = []

    def snapshot_download(repo_id, revision, allow_patterns):
        calls.append(allow_patterns)
        return str(tiny_folder("sd1"))

    hub = types.SimpleNamespace(list_repo_files=lambda repo_id, revision: repo_files,
                                snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(files, "probe", lambda host, port, timeout=None: None)  # the hub "answers"
    assert load_model("org/remote").source == str(tiny_folder("sd1"))
    patterns = calls[-1]
    weights = sorted(p for p in patterns if p.endswith(".safetensors"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert all(p.endswith((".json", ".txt", ".safetensors")) for p in patterns)
    load_model("org/remote", dtype=torch.float16)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[-1]
    assert "unet/diffusion_pytorch_model.safetensors" not in calls[-1]


def test_load_skips_random_init(tiny_folder, monkeypatch):
    """Modules are built on the meta device without running their initialisers: the weights come from the file,
    and normal_ on a meta tensor imports torch._dynamo (seconds of cold start)."""
    folder, calls = tiny_folder("sd1"), []
    for name in ("normal_", "uniform_"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, **k: calls.append(_n) or self)
    load_model(folder)
    assert calls == []
