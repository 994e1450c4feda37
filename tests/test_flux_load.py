"""FLUX.1 loading (issue 22, items 1-2, 5): load_model of tiny dev / schnell diffusers folders and of the same
weights in BFL's single-file layout (+ ComfyUI's encoder files, BFL's ae.safetensors), against diffusers' /
transformers' modules and FluxPipeline.encode_prompt built from the same files; the memory modes (sequential
loading, fp8 weight storage) and their peak resident weights, measured on the tiny model and estimated for FLUX.1's
real shapes.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_flux
import tiny_sd3
from diffedit_engine.engine.models.clip import CLIPTextConfig, CLIPTextModel
from diffedit_engine.engine.models.flux import FluxTransformer, FluxTransformerConfig
from diffedit_engine.engine.models.t5 import T5Config, T5EncoderModel
from diffedit_engine.engine.models.vae import VAE, VAEConfig
from diffedit_engine.weights import CheckpointError, files, flux, load_model
from diffedit_engine.weights.flow_model import FlowModel

TOL = 1e-5
FP8_TOL = 0.05  # fp8 e4m3 keeps 3 mantissa bits (relative step 1/16): measured 3.4e-2 on the tiny dev model
PROMPTS = ["a photo of a cat", "", "an astronaut on the white square"]


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = tiny_flux.make_folder(tmp_path_factory.mktemp(f"flux-{variant}"), variant)
        return made[variant]
    return get


@pytest.fixture(scope="module")
def ref():
    made = {}

    def get(path: Path):
        if path not in made:
            made[path] = tiny_flux.reference(path)
        return made[path]
    return get


def _inputs(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = m.transformer.config
    x = torch.randn(2, 16, 8, 12, generator=g)
    ctx = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
    return x, torch.tensor([500.0, 873.0]), ctx, torch.randn(2, cfg.pooled_projection_dim, generator=g)


def _diffusers_velocity(pipe, x, t, ctx, pooled, guidance):
    """FluxPipeline's transformer call on the packed latent, unpacked back to (B, 16, h, w)."""
    b, c, h, w = x.shape
    packed = pipe._pack_latents(x, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    g = None if guidance is None else torch.full([b], guidance, dtype=torch.float32)
    out = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=g, pooled_projections=pooled,
                           encoder_hidden_states=ctx, txt_ids=torch.zeros(ctx.shape[1], 3), img_ids=img_ids).sample
    scale = pipe.vae_scale_factor
    return pipe._unpack_latents(out, h * scale, w * scale, scale)


@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_folder_components_equal_diffusers(folder, ref, variant):
    path = folder(variant)
    m, pipe = load_model(path), ref(path)
    dev = variant == "dev"
    assert isinstance(m, FlowModel) and m.kind == "flux" and m.source == str(path) and m.guidance_embeds == dev
    assert isinstance(m.transformer, FluxTransformer) and isinstance(m.vae, VAE)
    assert isinstance(m.text_encoder, CLIPTextModel) and isinstance(m.text_encoder_2, T5EncoderModel)
    assert m.max_sequence_length == m.tokenizer_2.max_length == (512 if dev else 256)
    assert (m.vae_scaling_factor, m.vae_shift_factor) == (0.3611, 0.1159)
    assert m.scheduler.use_dynamic_shifting == dev and m.scheduler.shift == (3.0 if dev else 1.0)
    assert (m.scheduler.base_shift, m.scheduler.max_shift, m.scheduler.max_image_seq_len) == (0.5, 1.15, 4096)
    assert m.vae.config.latent_channels == 16 and m.vae.quant_conv is None and m.vae.post_quant_conv is None
    with torch.no_grad():
        x, t, ctx, pooled = _inputs(m)
        guidance = 3.5 if dev else None
        want = _diffusers_velocity(pipe, x, t, ctx, pooled, guidance)
        assert rel_err(m.transformer(x, t, ctx, pooled, guidance), want) <= TOL
        img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
        dist = pipe.vae.encode(img).latent_dist
        mean, logvar = m.vae.encode(img)
        assert mean.shape == (1, 16, 4, 6) and rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
        assert rel_err(m.vae.decode(mean), pipe.vae.decode(dist.mean).sample) <= TOL
        ids = m.tokenizer(PROMPTS)
        assert torch.equal(ids, pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                               return_tensors="pt").input_ids)
        hidden = m.text_encoder(ids)
        out = pipe.text_encoder(ids)
        assert rel_err(hidden, out.last_hidden_state) <= TOL
        ids = m.tokenizer_2(PROMPTS)
        assert torch.equal(ids, pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=m.max_sequence_length,
                                                 truncation=True, return_tensors="pt").input_ids)
        assert rel_err(m.text_encoder_2(ids), pipe.text_encoder_2(ids)[0]) <= TOL


def _pipeline_embeds(pipe, prompts, max_sequence_length):
    ctx, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=max_sequence_length)
    return ctx, pooled


@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_encode_prompt_equals_pipeline(folder, ref, variant):
    path = folder(variant)
    m, pipe = load_model(path), ref(path)
    with torch.no_grad():
        for prompts in (PROMPTS, [""], ["a red circle"], ["a photo of a cat", "a dog", "a photo of a cat"]):
            ctx, pooled = m.encode_prompt(prompts)
            want_ctx, want_pooled = _pipeline_embeds(pipe, prompts, m.max_sequence_length)
            assert ctx.shape == (len(prompts), m.max_sequence_length, 64) and pooled.shape == (len(prompts), 32)
            assert rel_err(ctx, want_ctx) <= TOL and rel_err(pooled, want_pooled) <= TOL
        m.max_sequence_length = 12  # the users' knob, as the pipeline's max_sequence_length
        ctx, _ = m.encode_prompt(PROMPTS)
        assert ctx.shape == (3, 12, 64) and rel_err(ctx, _pipeline_embeds(pipe, PROMPTS, 12)[0]) <= TOL


def _same_modules(a, b):
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("variant", tiny_flux.VARIANTS)
def test_bfl_file_equals_folder(folder, tmp_path, variant):
    """flux1-{dev,schnell}.safetensors (bare BFL names, config inferred) with ComfyUI's clip_l / t5xxl files and
    BFL's ae.safetensors beside it, or with a diffusers folder as text_encoders=: modules bit for bit, the same
    configs, scheduler, dev/schnell and prompt embedding."""
    path = folder(variant)
    want = load_model(path)
    f = tiny_flux.write_bfl(path, tmp_path / "repo", f"flux1-{variant}.safetensors")
    comfy = tiny_flux.write_separate(path, tmp_path / "text_encoders", ae=False)
    tiny_flux.write_separate(path, tmp_path / "ae_src")
    shutil.copy(tmp_path / "ae_src" / "ae.safetensors", tmp_path / "repo" / "ae.safetensors")  # BFL's repo layout
    shutil.copytree(path / "tokenizer_2", comfy / "tokenizer_2")
    (comfy / "t5xxl_fp8_e4m3fn.safetensors").write_bytes(b"")  # the fp16 file is preferred
    for te in (comfy, path):
        m = load_model(f, text_encoders=te)
        assert m.kind == "flux" and m.guidance_embeds == want.guidance_embeds
        assert m.transformer.config == want.transformer.config and m.vae.config == want.vae.config
        assert m.scheduler == want.scheduler and m.max_sequence_length == want.max_sequence_length
        assert (m.vae_scaling_factor, m.vae_shift_factor) == (want.vae_scaling_factor, want.vae_shift_factor)
        _same_modules(m, want)
        with torch.no_grad():
            for a, b in zip(m.encode_prompt(PROMPTS), want.encode_prompt(PROMPTS)):
                assert torch.equal(a, b)
    _same_modules(load_model(f, config=path, text_encoders=comfy), want)


def test_comfy_all_in_one_and_fp8_t5(folder, tmp_path):
    """ComfyUI's all-in-one checkpoint (model.diffusion_model.*, vae.*, text_encoders.*.transformer.*) loads as the
    folder; a t5xxl_fp8_e4m3fn file alone loads, cast from fp8 (its values are the fp8-rounded ones)."""
    path = folder("schnell")
    want = load_model(path)
    f = tiny_flux.write_bfl(path, tmp_path / "flux1-schnell-aio.safetensors", prefix="model.diffusion_model.",
                            bundle=True)
    _same_modules(load_model(f, config=path), want)
    comfy = tiny_flux.write_separate(path, tmp_path / "enc")
    t5 = load_file(str(comfy / "t5xxl_fp16.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in t5.items()}, str(comfy / "t5xxl_fp8_e4m3fn.safetensors"))
    (comfy / "t5xxl_fp16.safetensors").unlink()
    shutil.copytree(path / "tokenizer_2", comfy / "tokenizer_2")
    m = load_model(tiny_flux.write_bfl(path, tmp_path / "flux1-schnell.safetensors"), text_encoders=comfy)
    w = m.text_encoder_2.shared.weight
    assert torch.equal(w, want.text_encoder_2.shared.weight.to(torch.float8_e4m3fn).float())


def test_fp8_storage(folder):
    """storage=float8_e4m3fn: the blocks' Linear weights are fp8 with a per-tensor scale, the embedders exact, the
    state-dict keys unchanged. In fp32 compute the velocity stays within FP8_TOL of the full-precision model's; in
    bf16 it runs (the tiny random model is too sensitive for a bf16 bound: bf16 alone moves it by ~0.5)."""
    path = folder("dev")
    want = load_model(path)
    x, t, ctx, pooled = _inputs(want, 5)
    for dtype in (torch.float32, torch.bfloat16):
        m = flux.load_flux(files.resolve(path), "cpu", dtype, storage=torch.float8_e4m3fn)
        tr = m.transformer
        assert tr.state_dict().keys() == want.transformer.state_dict().keys()
        assert tr.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        assert tr.single_transformer_blocks[1].proj_out.weight.dtype == torch.float8_e4m3fn
        assert tr.x_embedder.weight.dtype == tr.proj_out.weight.dtype == dtype
        with torch.no_grad():
            v = tr(x.to(dtype), t, ctx.to(dtype), pooled.to(dtype), 3.5)
            err = rel_err(v, want.transformer(x, t, ctx, pooled, 3.5))
        print(f"fp8 storage, {dtype} compute: velocity rel. error {err:.2e} vs the fp32 model")
        assert v.dtype == dtype and torch.isfinite(v).all()
        if dtype == torch.float32:
            assert err <= FP8_TOL
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        flux.load_flux(files.resolve(path), "cpu", torch.float32, storage=torch.float16)


def test_sequential_loading(folder):
    """prompts=: encoders loaded, prompts encoded, encoders freed, then transformer + VAE; the model serves those
    prompts exactly and refuses others in one line."""
    path = folder("dev")
    want = load_model(path)
    m = flux.load_flux(files.resolve(path), "cpu", torch.float32, prompts=PROMPTS)
    assert m.text_encoder is None and m.text_encoder_2 is None
    for name in ("transformer", "vae"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(m, name).state_dict().values(),
                                                     getattr(want, name).state_dict().values()))
    with torch.no_grad():
        for prompts in (PROMPTS, PROMPTS[::-1], [PROMPTS[1]] * 2):
            for a, b in zip(m.encode_prompt(prompts), want.encode_prompt(prompts)):
                assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not encoded before the text encoders were freed"):
        m.encode_prompt(["a dog"])


def test_refusals(folder, tmp_path):
    dev = folder("dev")
    f = tiny_flux.write_bfl(dev, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(CheckpointError, match="no CLIP-L text encoder, T5-XXL text encoder, autoencoder in the file; "
                                              "pass text_encoders="):
        load_model(f)
    sd3 = tiny_sd3.make_folder(tmp_path / "sd3")
    with pytest.raises(CheckpointError, match="StableDiffusion3Pipeline folder, not a FLUX one"):
        load_model(f, text_encoders=sd3)
    sd3_file = tiny_sd3.write_single_file(sd3, tmp_path / "sd3.safetensors", encoders=())
    with pytest.raises(CheckpointError, match="not part of a FLUX.1 single-file checkpoint"):
        flux.load_flux(sd3_file, "cpu", torch.float32, text_encoders=dev)  # an SD3 file given as FLUX
    with pytest.raises(CheckpointError, match="T5's tokenizer is needed"):
        load_model(f, text_encoders=tiny_flux.write_separate(dev, tmp_path / "no_tok"))
    sd = load_file(str(f))
    for edit, match in ((lambda d: d.update({"double_blocks.0.img_attn.mystery.weight": torch.zeros(2)}), "unexpected key"),
                        (lambda d: d.update({"img_in.weight": torch.zeros(d["img_in.weight"].shape[0], 384)}),
                         "Fill / Depth / Canny"),
                        (lambda d: d.update({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2)}), "LoRA")):
        edit(sd)
        save_file(sd, str(tmp_path / "odd.safetensors"))
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / "odd.safetensors", text_encoders=dev)
        sd = load_file(str(f))
    fill = tmp_path / "fill"
    shutil.copytree(dev, fill)
    index = json.loads((fill / "model_index.json").read_text())
    (fill / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    with pytest.raises(CheckpointError, match=r"FLUX pipeline other than FLUX.1 text-to-image \(FluxFillPipeline\)"):
        load_model(fill)
    cfg = json.loads((fill / "transformer" / "config.json").read_text())
    (fill / "model_index.json").write_text(json.dumps(index))
    (fill / "transformer" / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": False}))
    with pytest.raises(CheckpointError, match="guidance_embeds=False but the weights have the guidance embedding"):
        load_model(fill)
    with pytest.raises(ValueError, match="apply to single-file"):
        load_model(dev, text_encoders=dev)


# ---- memory: peak resident weights per mode -------------------------------------------------------------------

GIB = 2 ** 30


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _peaks(enc: int, transformer: int, vae: int) -> dict:
    """Peak resident weight bytes: everything at once, or encoders first and then transformer + VAE."""
    return {"all": enc + transformer + vae, "sequential": max(enc, transformer + vae)}


def _real_modules():
    """FLUX.1-dev's components at their released shapes, on the meta device (no memory)."""
    with torch.device("meta"):
        tr = FluxTransformer(FluxTransformerConfig(guidance_embeds=True))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12))
        vae = VAE(VAEConfig.from_json(dict(latent_channels=16, block_out_channels=[128, 256, 512, 512],
                                           layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                                           up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False,
                                           use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)))
    return tr, t5, clip, vae


def _fp8_bytes(tr, element_size: int) -> int:
    """A transformer's bytes with its blocks' Linear weights at 1 byte (store_float8's choice) and the rest at
    element_size."""
    blocks = [lin.weight.numel() for prefix in ("transformer_blocks", "single_transformer_blocks")
              for lin in tr.get_submodule(prefix).modules() if type(lin) is torch.nn.Linear]
    total = sum(p.numel() for p in tr.parameters())
    return sum(blocks) + (total - sum(blocks)) * element_size


def memory_table(tiny_path: Path) -> list[tuple]:
    """(model, mode, peak resident weight bytes) for all-at-once / sequential loading, bf16 / fp8 transformer: the
    tiny model measured from the modules load_flux leaves resident, FLUX.1-dev estimated from its parameter counts
    (activations not included: at 1024², batch 1, bf16 they are well under 1 GiB with SDPA)."""
    rows = []
    root = files.resolve(tiny_path)
    full = flux.load_flux(root, "cpu", torch.bfloat16)
    enc = _bytes(full.text_encoder) + _bytes(full.text_encoder_2)
    for storage in (None, torch.float8_e4m3fn):
        seq = flux.load_flux(root, "cpu", torch.bfloat16, prompts=["a cat"], storage=storage)
        assert seq.text_encoder is None
        label = "fp8" if storage else "bf16"
        for mode, peak in _peaks(enc, _bytes(seq.transformer), _bytes(seq.vae)).items():
            rows.append(("tiny (measured)", f"{mode}, transformer {label}", peak))
    tr, t5, clip, vae = _real_modules()
    enc_real = 2 * (sum(p.numel() for p in t5.parameters()) + sum(p.numel() for p in clip.parameters()))
    vae_real = 2 * sum(p.numel() for p in vae.parameters())
    for label, tr_bytes in (("bf16", 2 * sum(p.numel() for p in tr.parameters())), ("fp8", _fp8_bytes(tr, 2))):
        for mode, peak in _peaks(enc_real, tr_bytes, vae_real).items():
            rows.append(("FLUX.1-dev (estimated)", f"{mode}, transformer {label}", peak))
    return rows


def test_memory_modes(folder, capsys):
    rows = memory_table(folder("dev"))
    with capsys.disabled():
        print("\nmodel                   mode                          peak resident weights")
        for model, mode, peak in rows:
            print(f"{model:23s} {mode:29s} {peak / GIB:8.3f} GiB  ({peak:,} B)")
    real = {mode: peak for model, mode, peak in rows if model.startswith("FLUX")}
    tiny = {mode: peak for model, mode, peak in rows if model.startswith("tiny")}
    for table in (real, tiny):
        assert table["sequential, transformer bf16"] < table["all, transformer bf16"]
        assert table["sequential, transformer fp8"] < table["sequential, transformer bf16"]
    # what issue 22 asks: a 24 GB GPU edits FLUX.1 (weights + activations, a few GiB to spare)
    assert real["sequential, transformer fp8"] < 16 * GIB < 22 * GIB < real["sequential, transformer bf16"]
