"""SD 3.x loading (issue 21, items 1-2): load_model of tiny SD 3 / 3.5 / 3.5 Medium diffusers folders and of the same
weights in Stability's single-file layout, against diffusers'/transformers' modules and
StableDiffusion3Pipeline.encode_prompt built from the same files.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import tiny
import tiny_sd3
from diffedit_engine.engine.models.clip import CLIPTextModelWithProjection
from diffedit_engine.engine.models.mmdit import SD3Transformer
from diffedit_engine.engine.models.t5 import T5EncoderModel
from diffedit_engine.engine.models.vae import VAE
from diffedit_engine.weights import CheckpointError, load_model
from diffedit_engine.weights.flow_model import FlowModel

TOL = 1e-5
PROMPTS = ["a photo of a cat", "", "an astronaut on the white square"]


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = {}

    def get(variant: str, t5: bool = True, fp16: bool = False) -> Path:
        key = (variant, t5, fp16)
        if key not in made:
            name = f"{variant}{'' if t5 else '-no-t5'}{'-fp16' if fp16 else ''}"
            made[key] = tiny_sd3.make_folder(tmp_path_factory.mktemp(name), variant, t5=t5, fp16_variant=fp16)
        return made[key]
    return get


@pytest.fixture(scope="module")
def ref():
    made = {}

    def get(path: Path):
        if path not in made:
            made[path] = tiny_sd3.reference(path)
        return made[path]
    return get


def _inputs(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = m.transformer.config
    x = torch.randn(2, 16, 8, 12, generator=g)
    ctx = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
    return x, torch.tensor([500.0, 873.0]), ctx, torch.randn(2, cfg.pooled_projection_dim, generator=g)


@pytest.mark.parametrize("variant", list(tiny_sd3.VARIANTS))
def test_folder_components_equal_diffusers(folder, ref, variant):
    path = folder(variant)
    m, pipe = load_model(path), ref(path)
    assert isinstance(m, FlowModel) and m.kind == "sd3" and m.source == str(path)
    assert isinstance(m.transformer, SD3Transformer) and isinstance(m.vae, VAE)
    assert isinstance(m.text_encoder, CLIPTextModelWithProjection) and isinstance(m.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(m.text_encoder_3, T5EncoderModel) and m.tokenizer_3 is not None and m.max_sequence_length == 256
    assert (m.vae_scaling_factor, m.vae_shift_factor, m.scheduler.shift) == (1.5305, 0.0609, 3.0)
    assert m.vae.config.latent_channels == 16 and m.vae.quant_conv is None and m.vae.post_quant_conv is None
    with torch.no_grad():
        x, t, ctx, pooled = _inputs(m)
        want = pipe.transformer(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        assert rel_err(m.transformer(x, t, ctx, pooled), want) <= TOL
        img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
        dist = pipe.vae.encode(img).latent_dist
        mean, logvar = m.vae.encode(img)
        assert mean.shape == (1, 16, 4, 6) and rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
        assert rel_err(m.vae.decode(mean), pipe.vae.decode(dist.mean).sample) <= TOL
        for ours, theirs, tok in ((m.text_encoder, pipe.text_encoder, m.tokenizer),
                                  (m.text_encoder_2, pipe.text_encoder_2, m.tokenizer_2)):
            ids = tok(PROMPTS)
            out = theirs(ids, output_hidden_states=True)
            h, p = ours(ids, -2)
            assert rel_err(h, out.hidden_states[-2]) <= TOL and rel_err(p, out.text_embeds) <= TOL
        ids = m.tokenizer_3(PROMPTS)
        assert torch.equal(ids, pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=256, truncation=True,
                                                 return_tensors="pt").input_ids)
        assert rel_err(m.text_encoder_3(ids), pipe.text_encoder_3(ids)[0]) <= TOL


def _pipeline_embeds(pipe, prompts, max_sequence_length=256):
    ctx, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False,
                                           max_sequence_length=max_sequence_length)
    return ctx, pooled


@pytest.mark.parametrize("variant,t5", [("sd3", True), ("sd3.5", True), ("sd3.5-medium", True), ("sd3.5", False)])
def test_encode_prompt_equals_pipeline(folder, ref, variant, t5):
    path = folder(variant, t5)
    m, pipe = load_model(path), ref(path)
    assert (m.text_encoder_3 is None) == (not t5) and (m.tokenizer_3 is None) == (not t5)
    with torch.no_grad():
        for prompts in (PROMPTS, [""], ["a red circle"]):
            ctx, pooled = m.encode_prompt(prompts)
            want_ctx, want_pooled = _pipeline_embeds(pipe, prompts)
            assert ctx.shape == (len(prompts), 77 + 256, 64) and pooled.shape == (len(prompts), 64)
            assert rel_err(ctx, want_ctx) <= TOL and rel_err(pooled, want_pooled) <= TOL
            if not t5:
                assert not ctx[:, 77:].any()
        m.max_sequence_length = 12  # the users' knob, as the pipeline's max_sequence_length
        ctx, pooled = m.encode_prompt(PROMPTS)
        want_ctx, want_pooled = _pipeline_embeds(pipe, PROMPTS, 12)
        assert ctx.shape == (3, 77 + 12, 64) and rel_err(ctx, want_ctx) <= TOL


def _same_modules(a, b):
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is not None:
            sa, sb = ma.state_dict(), mb.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("variant", list(tiny_sd3.VARIANTS))
def test_single_file_equals_folder(folder, tmp_path, variant):
    """Stability's layout with every encoder bundled; T5's tokenizer from tokenizer_3/ beside the file (SD 3.5's
    repository layout). Modules bit for bit, the prompt embedding exactly."""
    path = folder(variant)
    f = tiny_sd3.write_single_file(path, tmp_path / "sd3.5_large.safetensors")
    shutil.copytree(path / "tokenizer_3", tmp_path / "tokenizer_3")
    m, want = load_model(f), load_model(path)
    assert m.kind == "sd3" and m.transformer.config.dual_attention_layers == want.transformer.config.dual_attention_layers
    _same_modules(m, want)
    assert m.scheduler == want.scheduler and (m.vae_scaling_factor, m.vae_shift_factor) == (1.5305, 0.0609)
    with torch.no_grad():
        for a, b in zip(m.encode_prompt(PROMPTS), want.encode_prompt(PROMPTS)):
            assert torch.equal(a, b)


def test_single_file_matches_diffusers_from_single_file(folder, tmp_path):
    """diffusers' own SD3 single-file converter reads our Stability-layout file to the same transformer: the
    layout is SAI's, not only self-consistent."""
    from diffusers import SD3Transformer2DModel

    path = folder("sd3.5-medium")
    f = tiny_sd3.write_single_file(path, tmp_path / "sd3.5_medium.safetensors", encoders=())
    theirs = SD3Transformer2DModel.from_single_file(str(f), config=str(path), subfolder="transformer",
                                                    local_files_only=True).eval()
    m = load_model(f, text_encoders=path)
    with torch.no_grad():
        x, t, ctx, pooled = _inputs(m, 3)
        want = theirs(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        assert rel_err(m.transformer(x, t, ctx, pooled), want) <= TOL


def test_single_file_encoders_apart(folder, tmp_path):
    """sd3_medium.safetensors (MMDiT + VAE only) with ComfyUI's encoder files, or a diffusers folder, as
    text_encoders=; without T5 the model has none; an MMDiT saved without its prefix loads too."""
    path = folder("sd3")
    f = tiny_sd3.write_single_file(path, tmp_path / "sd3_medium.safetensors", encoders=(), bare=True)
    comfy = tiny_sd3.write_encoder_files(path, tmp_path / "text_encoders")
    (tmp_path / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors").write_bytes(b"")  # the fp16 file is preferred
    shutil.copytree(path / "tokenizer_3", comfy / "tokenizer_3")
    want = load_model(path)
    for te in (comfy, path):
        _same_modules(load_model(f, text_encoders=te), want)
    (comfy / "t5xxl_fp16.safetensors").unlink()
    (comfy / "t5xxl_fp8_e4m3fn.safetensors").unlink()
    m = load_model(f, text_encoders=comfy)
    assert m.text_encoder_3 is None and m.tokenizer_3 is None
    with pytest.raises(CheckpointError, match="CLIP-L text encoder"):
        load_model(f)


def test_single_file_t5_needs_a_tokenizer(folder, tmp_path):
    f = tiny_sd3.write_single_file(folder("sd3"), tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    with pytest.raises(CheckpointError, match="T5's tokenizer"):
        load_model(f)
    m = load_model(f, config=folder("sd3"))  # config= brings configs, scheduler and tokenizers
    _same_modules(m, load_model(folder("sd3")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(folder, dtype):
    """An fp16-variant folder (diffusion_pytorch_model.fp16.safetensors ...) in fp16 and bf16: the variant's
    tensors, cast; T5's wo kept in fp32 under fp16 as transformers does."""
    path = folder("sd3.5", fp16=True)
    assert (path / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    m = load_model(path, dtype=dtype)
    assert m.transformer.proj_out.weight.dtype == dtype and m.vae.decoder.conv_out.weight.dtype == dtype
    wo = m.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    ctx, pooled = m.encode_prompt(PROMPTS)
    assert ctx.dtype == pooled.dtype == dtype and torch.isfinite(ctx).all()
    want = tiny_sd3.reference(path, torch.float32, variant="fp16")
    with torch.no_grad():
        want_ctx, want_pooled = _pipeline_embeds(want, PROMPTS)
    assert rel_err(ctx, want_ctx) <= 0.05 and rel_err(pooled, want_pooled) <= 0.05


def test_refusals(folder, tmp_path, tiny_folder):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "x"]}))
    with pytest.raises(CheckpointError, match="FLUX"):
        load_model(flux)
    f = tiny_sd3.write_single_file(folder("sd3"), tmp_path / "sd3.safetensors", encoders=())
    data = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.safetensors")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(f))
    for extra, match in (("model.diffusion_model.joint_blocks.0.x_block.attn.mystery.weight", "unexpected key"),
                         ("controlnet_blocks.0.weight", "ControlNet")):
        save_file({**sd, extra: torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / "odd.safetensors", text_encoders=folder("sd3"))
    # The SD 1.x/2.x/XL loader refuses SD 3's VAE (a shifted latent) by name.
    sd1 = tmp_path / "sd1"
    shutil.copytree(tiny_folder("sd1"), sd1)
    cfg = json.loads((sd1 / "vae" / "config.json").read_text())
    (sd1 / "vae" / "config.json").write_text(json.dumps({**cfg, "shift_factor": 0.0609}))
    with pytest.raises(CheckpointError, match="shift_factor"):
        load_model(sd1)
