"""The SD 3 benchmark's code paths on a tiny SD 3.5 Medium folder without T5 (tests/tiny_sd3.py), seconds: the
diffusers reference loop of sd3_bench.py does engine/edit/flow.py's work (same transformer calls, same mask, the
same final latents), the parity and cold-start children compute the same things on both sides, and the command's
quick mode runs end to end. The real-shape runs (13.5 GB folder) are for the benchmark command, never CI."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd3_bench  # noqa: E402
import tiny_sd3  # noqa: E402
from tiny import one_thread  # noqa: E402,F401  (autouse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd3.make_folder(tmp_path_factory.mktemp("sd3-bench"), "sd3.5-medium", t5=False)


def counted(system, folder, work):
    """(edit, calls, step) with every transformer call's batch size recorded."""
    edit, transformer, step, _ = system(folder, work)
    calls = []
    transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    return edit, calls, step


@torch.no_grad()
def test_reference_loop_does_the_engines_work(folder):
    work = sd3_bench.Work(size=64, num_maps=3, steps=4)
    S = work.decode_steps()
    assert S == 4  # SD 3's rule: 4 − int(4 − 3.2); SD's int(4 · 0.8) would give 3
    image = sd3_bench.load_image(work.size)
    engine, e_calls, e_step = counted(sd3_bench.engine_system, folder, work)
    ref, d_calls, d_step = counted(sd3_bench.diffusers_system, folder, work)
    a, b = engine(image, work.steps), ref(image, work.steps)
    # the same transformer work, call by call: one mask batch of 2n, S unguided inversion calls, S CFG calls of 2
    assert d_calls == [2 * work.num_maps] + [1] * S + [2] * S
    assert sum(e_calls) == sum(d_calls) == work.samples()
    c = sd3_bench.compare_outputs(a, b)
    assert c["mask_agreement"] == 1.0 and 0 < c["mask_fraction"] < 1  # a real mask, the same one
    assert c["latent_max_rel_diff"] < 1e-5 and c["image_max_abs_diff"] < 1e-4
    assert a["image"].shape == (3, 64, 64) and a["latents"].shape == (16, 8, 8)
    # the guided-step rows time the same call: "" + target at batch 2
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(e_step(x, torch.tensor(500.0)), d_step(x, torch.tensor(500.0)), rtol=0, atol=1e-5)


@torch.no_grad()
def test_parity_sides_compute_the_same(folder, tmp_path):
    work = sd3_bench.Work(parity_latent=16)
    sd3_bench.child_parity_diffusers(folder, work, tmp_path / "parity-diffusers.json")
    sd3_bench.child_parity_engine(folder, work, tmp_path / "parity-engine.json")
    ref, eng = torch.load(tmp_path / "parity-diffusers.pt"), torch.load(tmp_path / "parity-engine.pt")
    assert torch.equal(eng["ids"], ref["ids"]) and torch.equal(eng["ids_2"], ref["ids_2"])
    assert not torch.equal(ref["ids"], ref["ids_2"])  # the two tokenizers pad differently: both are checked
    assert ref["context"].shape == (2, 77 + 256, 64)  # T5's 256 tokens are zeros, as the pipeline's without T5
    for k in ("context", "pooled", "velocity"):
        assert sd3_bench.rel_err(eng[k], ref[k]) <= 1e-5, k
    assert eng["velocity"].shape == (2, 16, 16, 16)


@torch.no_grad()
def test_cold_start_scripts_do_the_same_work(folder, monkeypatch):
    outs = {}
    for name, fn in sd3_bench.COLD_FNS.items():
        marks = {}
        outs[name] = fn(folder, sd3_bench.Work(cold_latent=8), marks)["out_abs_mean"]
        assert list(marks) == ["imported", "loaded", "encoded", "forward"], name
    assert outs["engine"] == pytest.approx(outs["diffusers"], rel=1e-5)
    assert outs["diffusers-pipeline"] == pytest.approx(outs["diffusers"], rel=1e-5)


def test_quick_mode_end_to_end(folder, tmp_path):
    """The command on the tiny folder (each system in its own process), its JSON and its report."""
    out = tmp_path / "sd3.json"
    full = sd3_bench.main(["--folder", str(folder), "--size", "64", "--steps", "2", "--no-write", "--parts", "edit",
                           "--step-repeats", "1", "--json", str(out)])
    e = full["edit"]
    assert all(r["status"] == "ok" for r in e["systems"].values()), e
    assert e["summary"]["same_work"] and e["summary"]["mask_agreement"] == 1.0
    assert e["systems"]["engine"]["samples"] == [sd3_bench.Work(steps=2).samples()]
    assert not out.exists()  # --no-write
    md = sd3_bench.report(json.loads(json.dumps(full)))
    assert "Same-work edit: 64x64" in md and "| diffusers | ok |" in md


def test_make_model_sd35m_streams_a_loadable_folder(tmp_path):
    """The lazy SD 3.5 Medium builder (real configs in make_model.SD35M) on tiny configs: diffusers' pipeline and the
    engine read the folder and agree; the position table is the sin-cos table, CLIP-L's projection the identity."""
    import make_model as mm
    from safetensors.torch import load_file

    from diffedit_engine.weights import load_model

    t = dict(mm.SD35M_TRANSFORMER, num_layers=3, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
             caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=8, sample_size=16,
             dual_attention_layers=(0, 1))
    spec = dict(mm.SD35M, transformer=t, vae=dict(tiny_sd3.VAE, sample_size=64),
                clip=dict(tiny_sd3.CLIP, hidden_act="quick_gelu"), clip_2=dict(tiny_sd3.CLIP, hidden_act="gelu"))
    out = mm.build_sd35m(mm.Options(kind="sd35m", out=str(tmp_path / "m"), dtype="bfloat16"), spec)
    m = load_model(out, dtype=torch.float32)
    pipe = tiny_sd3.reference(out)
    assert m.kind == "sd3" and m.text_encoder_3 is None and (m.vae_scaling_factor, m.vae_shift_factor) == (1.5305, 0.0609)
    assert m.scheduler.shift == 3.0 and pipe.text_encoder_3 is None
    sd = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values()) and set(sd) == set(m.transformer.state_dict())
    assert torch.equal(sd["pos_embed.pos_embed"].float(), pipe.transformer.pos_embed.pos_embed.float())
    te = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert torch.equal(te["text_projection.weight"].float(), torch.eye(32))
    prompts = ["a cat", ""]
    with torch.inference_mode():
        pe, _, pp, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu", do_classifier_free_guidance=False)
        ctx, pooled = m.encode_prompt(prompts)
        assert sd3_bench.rel_err(ctx, pe) <= 1e-5 and sd3_bench.rel_err(pooled, pp) <= 1e-5
        x, tt = torch.randn(2, 16, 8, 8), torch.tensor([1000.0, 400.0])
        want = pipe.transformer(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=tt).sample
        assert sd3_bench.rel_err(m.transformer(x, tt, ctx, pooled), want) <= 1e-5
    # Already complete: left alone.
    assert mm.build_sd35m(mm.Options(kind="sd35m", out=str(out), dtype="bfloat16"), spec) == out


def test_real_sd35m_shapes():
    """The released SD 3.5 Medium architecture on the meta device (no memory): the engine's modules have diffusers'/
    transformers' keys and shapes, and the transformer has the release's parameter count."""
    import make_model as mm
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from diffedit_engine.engine.models.mmdit import SD3Transformer, SD3TransformerConfig
    from diffedit_engine.engine.models.vae import VAE, VAEConfig

    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**mm.SD35M_TRANSFORMER)
        ours = SD3Transformer(SD3TransformerConfig.from_json(dict(theirs.config, _class_name="SD3Transformer2DModel")))
        vae = AutoencoderKL(**mm.SD35M_VAE)
        our_vae = VAE(VAEConfig.from_json(dict(vae.config, _class_name="AutoencoderKL")))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert sum(v.numel() for v in our_vae.state_dict().values()) == sum(v.numel() for v in vae.state_dict().values())
    # 2.47e9 with the 384² position table (0.23e9): SD 3.5 Medium's published 2.5 B
    assert sum(p.numel() for p in theirs.state_dict().values()) == 2_469_663_936
