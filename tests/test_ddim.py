"""engine.ddim against diffusers' DDIMScheduler / DDIMInverseScheduler and the DiffEdit pipeline's
strength truncation (the oracle is diffusers' own code, called on the same configs)."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import (
    StableDiffusionDiffEditPipeline as Pipe,
)

from diffedit_engine.engine.samplers import ddim
from diffedit_engine.kernels.prediction import predict_x0_eps

STEPS = [1, 2, 5, 10, 50]
STRENGTHS = [round(0.1 * i, 1) for i in range(1, 11)]


def _sched(cls, cfg: ddim.SchedulerConfig, **over):
    kw = dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
              beta_schedule=cfg.beta_schedule, clip_sample=cfg.clip_sample, set_alpha_to_one=cfg.set_alpha_to_one,
              steps_offset=cfg.steps_offset, prediction_type=cfg.prediction_type,
              timestep_spacing=cfg.timestep_spacing, rescale_betas_zero_snr=cfg.rescale_betas_zero_snr)
    kw.update(over)
    return cls(**kw)


def test_config_from_json_ignores_unknown_keys_and_defaults_to_sd():
    pndm = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    cfg = ddim.SchedulerConfig.from_json(pndm)
    assert cfg == ddim.SchedulerConfig()
    assert ddim.SchedulerConfig.from_json({"prediction_type": "v_prediction"}).prediction_type == "v_prediction"
    assert ddim.SchedulerConfig.from_json({"thresholding": True}).thresholding
    for bad in ({"beta_schedule": "cosine"}, {"prediction_type": "flow_prediction"}, {"timestep_spacing": "karras"},
                {"clip_sample_range": 0.0}, {"dynamic_thresholding_ratio": 1.5}):
        with pytest.raises(AssertionError):
            ddim.SchedulerConfig.from_json(bad)


@pytest.mark.parametrize("kw", [{}, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
                                {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True},
                                {"set_alpha_to_one": True}])
def test_alphas_cumprod_match_diffusers(kw):
    cfg = ddim.SchedulerConfig(**kw)
    ref = _sched(DDIMScheduler, cfg)
    assert torch.equal(ddim.alphas_cumprod(cfg), ref.alphas_cumprod)
    assert torch.equal(ddim.final_alpha_cumprod(cfg), ref.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    cfg = ddim.SchedulerConfig(timestep_spacing=spacing)
    ref = _sched(DDIMScheduler, cfg)
    for steps in STEPS + [3, 7, 999, 1000]:
        ref.set_timesteps(steps)
        assert torch.equal(ddim.timesteps(cfg, steps), ref.timesteps), (spacing, steps)
    if spacing != "linspace":  # DDIMInverseScheduler has no linspace spacing
        inv = _sched(DDIMInverseScheduler, cfg)
        for steps in STEPS + [3, 7]:
            inv.set_timesteps(steps)
            assert torch.equal(ddim.inverse_timesteps(cfg, steps), inv.timesteps), (spacing, steps)


@pytest.mark.parametrize("steps", STEPS)
def test_strength_truncation_matches_diffedit_pipeline(steps):
    cfg = ddim.SchedulerConfig()
    fwd, inv = _sched(DDIMScheduler, cfg), _sched(DDIMInverseScheduler, cfg)
    fwd.set_timesteps(steps)
    inv.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=fwd, inverse_scheduler=inv)
    for s in STRENGTHS + [0.25, 0.33, 0.0]:
        assert torch.equal(ddim.timesteps(cfg, steps, s), Pipe.get_timesteps(pipe, steps, s, "cpu")[0]), (steps, s)
        assert torch.equal(ddim.inverse_timesteps(cfg, steps, s),
                           Pipe.get_inverse_timesteps(pipe, steps, s, "cpu")[0]), (steps, s)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", STEPS)
def test_step_matches_ddim_scheduler(pred, steps):
    cfg = ddim.SchedulerConfig(prediction_type=pred)
    ref = _sched(DDIMScheduler, cfg)
    ref.set_timesteps(steps)
    sch = ddim.schedule(cfg, steps)
    assert torch.equal(sch.t, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ref.timesteps):
        x, out = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 4, 5, 3, generator=g)
        want = ref.step(out, t, x).prev_sample
        got = ddim.ddim_step(out, x, sch.alpha_from[i], sch.alpha_to[i], pred)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        x0, _ = predict_x0_eps(out, x, sch.alpha_from[i], pred)
        torch.testing.assert_close(x0, ref.step(out, t, x).pred_original_sample, atol=1e-6, rtol=0)
        # eta > 0: the same noise from the same generator state
        want = ref.step(out, t, x, eta=0.7, generator=torch.Generator().manual_seed(i)).prev_sample
        got = ddim.ddim_step(out, x, sch.alpha_from[i], sch.alpha_to[i], pred, eta=0.7,
                             generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_clip_sample_matches():
    cfg = ddim.SchedulerConfig(clip_sample=True, clip_sample_range=0.5)
    ref = _sched(DDIMScheduler, cfg, clip_sample_range=0.5)
    ref.set_timesteps(5)
    sch = ddim.schedule(cfg, 5)
    x, out = 3 * torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    got = ddim.ddim_step(out, x, sch.alpha_from[1], sch.alpha_to[1], clip_sample_range=cfg.clip_sample_range)
    torch.testing.assert_close(got, ref.step(out, ref.timesteps[1], x).prev_sample, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", STEPS)
def test_inverse_step_matches_ddim_inverse_scheduler(pred, steps):
    cfg = ddim.SchedulerConfig(prediction_type=pred)
    ref = _sched(DDIMInverseScheduler, cfg)
    ref.set_timesteps(steps)
    sch = ddim.inverse_schedule(cfg, steps)
    assert torch.equal(sch.t, ref.timesteps)
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(ref.timesteps):
        x, out = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 4, 5, 3, generator=g)
        got = ddim.ddim_inverse_step(out, x, sch.alpha_from[i], sch.alpha_to[i], pred)
        torch.testing.assert_close(got, ref.step(out, t, x).prev_sample, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_inverse_schedule_reverses_schedule(strength):
    cfg = ddim.SchedulerConfig()
    fwd, inv = ddim.schedule(cfg, 10, strength), ddim.inverse_schedule(cfg, 10, strength)
    assert torch.equal(inv.t, fwd.t.flip(0))
    assert torch.equal(inv.alpha_from, fwd.alpha_to.flip(0)) and torch.equal(inv.alpha_to, fwd.alpha_from.flip(0))
    # eta-0 DDIM is invertible given the same ε: inverse step undoes the step exactly (up to rounding)
    x, eps = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    y = ddim.ddim_step(eps, x, fwd.alpha_from[0], fwd.alpha_to[0])
    torch.testing.assert_close(ddim.ddim_inverse_step(eps, y, inv.alpha_from[-1], inv.alpha_to[-1]), x)


def test_add_noise_matches_diffusers():
    cfg = ddim.SchedulerConfig()
    ref = _sched(DDIMScheduler, cfg)
    x0, n = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor(481)
    torch.testing.assert_close(ddim.add_noise(x0, n, ddim.alphas_cumprod(cfg)[t]), ref.add_noise(x0, n, t),
                               atol=1e-6, rtol=0)


def test_schedule_is_on_device_and_fp32():
    sch = ddim.schedule(ddim.SchedulerConfig(), 4, 0.5, device="cpu")
    assert sch.t.dtype == torch.long and sch.alpha_from.dtype == torch.float32 and len(sch.t) == 2
    with pytest.raises(AssertionError):
        ddim.timesteps(ddim.SchedulerConfig(), 1001)


PLAN_STEPS = [1, 2, 5, 10, 20, 25, 50]
CLIPS = [dict(clip_sample=True, clip_sample_range=0.5),
         dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
         dict(thresholding=True, clip_sample=True, sample_max_value=1.5)]  # thresholding wins over clip_sample


def _ref_kw(cfg: ddim.SchedulerConfig) -> dict:
    return {f: getattr(cfg, f) for f in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                         "clip_sample", "set_alpha_to_one", "steps_offset", "prediction_type",
                                         "timestep_spacing", "rescale_betas_zero_snr", "clip_sample_range")}


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", CLIPS)
def test_plan_clips_and_thresholds_as_ddim_scheduler(pred, clip):
    """ddim.Plan.step = DDIMScheduler.step (prev_sample and pred_original_sample) with clip_sample / dynamic
    thresholding, along whole runs of every length; the x̂0 feeds the next step's history unchanged."""
    cfg = ddim.SchedulerConfig(prediction_type=pred, **clip)
    ref = DDIMScheduler(**_ref_kw(cfg), thresholding=cfg.thresholding,
                        dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                        sample_max_value=cfg.sample_max_value)
    g = torch.Generator().manual_seed(2)
    for steps in PLAN_STEPS:
        ref.set_timesteps(steps)
        plan = ddim.plan(cfg, steps)
        assert torch.equal(plan.t, ref.timesteps) and len(plan) == steps
        x = y = 3 * torch.randn(2, 4, 6, 5, generator=g)
        x0 = None
        for i, t in enumerate(ref.timesteps):
            out = 2 * torch.randn(2, 4, 6, 5, generator=g)
            r = ref.step(out, t, y)
            x, x0 = plan.step(i, out, x, x0)
            y = r.prev_sample
            torch.testing.assert_close(x0, r.pred_original_sample, atol=1e-6, rtol=0)
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-6)


def test_dynamic_threshold_is_per_image_in_a_grid():
    """A (B, P, C, h, w) grid thresholds each sample as diffusers thresholds a (B·P, C, h, w) batch."""
    cfg = ddim.SchedulerConfig(thresholding=True, sample_max_value=3.0)
    ref = DDIMScheduler(**_ref_kw(cfg), thresholding=True, sample_max_value=3.0)
    x0 = 4 * torch.randn(2, 3, 4, 5, 5)
    want = ref._threshold_sample(x0.flatten(0, 1)).view(x0.shape)
    torch.testing.assert_close(ddim.dynamic_threshold(x0, 0.995, 3.0), want, atol=0, rtol=0)
    assert ddim.dynamic_threshold(x0.half(), 0.995, 3.0).dtype == torch.float16


@pytest.mark.parametrize("inv_kw", [dict(steps_offset=0, set_alpha_to_one=True),
                                    dict(steps_offset=3, set_alpha_to_one=False, clip_sample=True,
                                         clip_sample_range=2.0),
                                    dict(steps_offset=1, set_alpha_to_one=True, timestep_spacing="trailing")])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_inverse_plan_from_an_inverse_scheduler_folder(tmp_path, inv_kw, pred):
    """A folder's inverse_scheduler/ (its own steps_offset / set_alpha_to_one / clip_sample) is read and
    inverted with exactly as DDIMInverseScheduler.from_pretrained(folder, subfolder="inverse_scheduler")."""
    import json

    from diffusers import DDIMInverseScheduler as Inv

    from diffedit_engine.weights import scheduler

    fwd = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=pred)
    inv = dict(dict(_class_name="DDIMInverseScheduler", beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", clip_sample=False, prediction_type=pred), **inv_kw)
    for sub, d in (("scheduler", fwd), ("inverse_scheduler", inv)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "scheduler_config.json").write_text(json.dumps(d))
    s = scheduler.read(tmp_path)
    assert s.family == "ddim" and s.scheduler.steps_offset == 1 and not s.scheduler.set_alpha_to_one
    ref = Inv.from_pretrained(tmp_path, subfolder="inverse_scheduler")
    g = torch.Generator().manual_seed(3)
    for steps in PLAN_STEPS:
        ref.set_timesteps(steps)
        plan = ddim.inverse_plan(s.inverse_scheduler, steps)
        assert torch.equal(plan.t, ref.timesteps), steps
        x = y = torch.randn(1, 4, 4, 4, generator=g)
        for i, t in enumerate(ref.timesteps):
            out = torch.randn(1, 4, 4, 4, generator=g)
            y = ref.step(out, t, y).prev_sample
            x, _ = plan.step(i, out, x)
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-6)
    # strength: the pipeline's get_inverse_timesteps slices the inverse scheduler's own timesteps
    ref.set_timesteps(10)
    pipe = SimpleNamespace(inverse_scheduler=ref)
    for st in (0.3, 0.8):
        assert torch.equal(ddim.inverse_plan(s.inverse_scheduler, 10, st).t, Pipe.get_inverse_timesteps(pipe, 10, st, "cpu")[0])


def test_plan_refuses_other_configs():
    from diffedit_engine.engine.samplers import dpm

    for f in (ddim.plan, ddim.inverse_plan, ddim.schedule, ddim.inverse_schedule):
        with pytest.raises(TypeError, match="DPM"):
            f(dpm.DPMSolverConfig(), 10)
