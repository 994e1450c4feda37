"""engine.dpm against diffusers' DPMSolverMultistepScheduler / DPMSolverMultistepInverseScheduler (the oracle
is diffusers' own code on the same configs): timesteps, every step of whole and strength-truncated runs, options
and refusals. Pure scheduler math on small tensors."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DPMSolverMultistepInverseScheduler as Inv
from diffusers import DPMSolverMultistepScheduler as Fwd
from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import (
    StableDiffusionDiffEditPipeline as Pipe,
)

from diffedit_engine.engine.samplers import ddim, dpm
from diffedit_engine.engine.samplers.plan import Plan

STEPS = [1, 2, 5, 10, 20, 25, 50]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SHAPE = (2, 4, 5, 3)


def _ref(cls, cfg: dpm.DPMSolverConfig):
    """diffusers' scheduler with the same keys (the inverse class has no final_sigmas_type / zero-SNR)."""
    kw = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if cls is Inv:
        for k in ("final_sigmas_type", "rescale_betas_zero_snr", "use_lu_lambdas"):
            kw.pop(k)
    return cls(**kw)


def _run(plan, ref, timesteps, x, g, out_scale=1.0):
    """Step the plan and the reference side by side; return the largest relative difference."""
    y, x0, worst = x.clone(), None, 0.0
    for i, t in enumerate(timesteps):
        out = out_scale * torch.randn(x.shape, generator=g)
        y = ref.step(out, t, y).prev_sample
        x, x0 = plan.step(i, out, x, x0)
        assert x.dtype == y.dtype
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp(min=1)).item())
    return worst


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_forward_and_inverse_runs_match_diffusers(spacing, pred, final):
    cfg = dpm.DPMSolverConfig(**SD, timestep_spacing=spacing, prediction_type=pred, final_sigmas_type=final)
    g = torch.Generator().manual_seed(0)
    for steps in STEPS:
        for cls, make in ((Fwd, dpm.plan), (Inv, dpm.inverse_plan)):
            ref = _ref(cls, cfg)
            ref.set_timesteps(steps)
            plan = make(cfg, steps)
            assert torch.equal(plan.t, ref.timesteps), (cls.__name__, steps)
            assert plan.t.dtype == torch.long and plan.phi.dtype == torch.float32
            assert _run(plan, ref, ref.timesteps, torch.randn(SHAPE, generator=g), g) < 1e-6, (cls.__name__, steps)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_strength_runs_match_the_diffedit_pipeline(spacing, steps):
    """plan(strength) / inverse_plan(strength) = the pipeline's get_timesteps / get_inverse_timesteps, stepped
    by a fresh scheduler that finds its step index from the first timestep (multistep history empty)."""
    cfg = dpm.DPMSolverConfig(**SD, timestep_spacing=spacing, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    for s in (0.1, 0.3, 0.5, 0.8, 1.0):
        fwd, inv = _ref(Fwd, cfg), _ref(Inv, cfg)
        fwd.set_timesteps(steps)
        inv.set_timesteps(steps)
        pipe = SimpleNamespace(scheduler=fwd, inverse_scheduler=inv)
        for make, get in ((dpm.plan, Pipe.get_timesteps), (dpm.inverse_plan, Pipe.get_inverse_timesteps)):
            ts = get(pipe, steps, s, "cpu")[0]
            plan = make(cfg, steps, s)
            assert torch.equal(plan.t, ts), (make.__name__, s)
            ref = fwd if make is dpm.plan else inv
            assert _run(plan, ref, ts, torch.randn(SHAPE, generator=g), g) < 1e-6, (make.__name__, s)
    assert len(dpm.plan(cfg, steps, 0.0)) == 0


@pytest.mark.parametrize("kw", [dict(solver_type="heun"), dict(euler_at_final=True), dict(lower_order_final=False),
                                dict(lower_order_final=False, final_sigmas_type="sigma_min"), dict(solver_order=1),
                                dict(thresholding=True, sample_max_value=2.0, prediction_type="sample"),
                                dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                     prediction_type="v_prediction"),
                                dict(lambda_min_clipped=-5.1), dict(beta_schedule="squaredcos_cap_v2"),
                                dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)])
def test_options_match_diffusers(kw):
    cfg = dpm.DPMSolverConfig(**{**SD, **kw})
    g = torch.Generator().manual_seed(2)
    makers = ((Fwd, dpm.plan),) if cfg.rescale_betas_zero_snr else ((Fwd, dpm.plan), (Inv, dpm.inverse_plan))
    for steps in (2, 10, 20):
        for cls, make in makers:
            ref = _ref(cls, cfg)
            ref.set_timesteps(steps)
            plan = make(cfg, steps)
            assert torch.equal(plan.t, ref.timesteps), (cls.__name__, steps)
            assert _run(plan, ref, ref.timesteps, torch.randn(SHAPE, generator=g), g, 3.0) < 1e-6, (cls.__name__, steps)


def test_first_order_is_ddim_and_the_run_ends_on_x0():
    """DPM-Solver++'s first-order step is DDIM (Lu et al. 2022, §3.2); with final σ = 0 the last step returns
    the data prediction itself."""
    cfg = dpm.DPMSolverConfig(**SD)
    plan = dpm.plan(cfg, 10)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    got, _ = plan.step(0, out, x)
    want = ddim.ddim_step(out, x, plan.alpha_from[0], plan.alpha_to[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    last, x0 = plan.step(len(plan) - 1, out, x, torch.randn(SHAPE))
    assert torch.equal(last, x0) and plan.alpha_to[-1] == 1


def test_levels_chain_and_inverse_reaches_the_forward_start():
    """alpha_to[i] = alpha_from[i+1]; the inversion to strength s ends at the level where the truncated
    forward run starts (linspace spacing, the default)."""
    cfg = dpm.DPMSolverConfig(**SD)
    for s in (0.5, 0.8, 1.0):
        fwd, inv = dpm.plan(cfg, 20, s), dpm.inverse_plan(cfg, 20, s)
        assert torch.equal(fwd.alpha_to[:-1], fwd.alpha_from[1:]) and torch.equal(inv.alpha_to[:-1], inv.alpha_from[1:])
        torch.testing.assert_close(inv.alpha_to[-1], fwd.alpha_from[0], atol=1e-6, rtol=0)


def test_step_keeps_dtype_and_never_syncs(monkeypatch):
    """The loop indexes device tensors only: no .item() / host conversion inside step (a sync on a GPU)."""
    plan = dpm.plan(dpm.DPMSolverConfig(**SD), 5)
    x, out = torch.randn(SHAPE).half(), torch.randn(SHAPE).half()

    def boom(*a, **k):
        raise AssertionError("host sync in the sampling loop")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    x0 = None
    for i in range(len(plan)):
        x, x0 = plan.step(i, out, x, x0)
    monkeypatch.undo()
    assert x.dtype == torch.float16 and torch.isfinite(x).all()
    inv = dpm.inverse_plan(dpm.DPMSolverConfig(**SD), 5)
    assert inv.step(0, out.float(), x.float())[0].dtype == torch.float32


@pytest.mark.parametrize("kw, match", [
    (dict(use_karras_sigmas=True), "use_karras_sigmas"), (dict(use_lu_lambdas=True), "use_lu_lambdas"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas"), (dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"), (dict(algorithm_type="dpmsolver"), "algorithm_type"),
    (dict(solver_order=3), "solver_order"), (dict(variance_type="learned_range"), "variance_type"),
    (dict(prediction_type="flow_prediction"), "prediction_type"), (dict(final_sigmas_type="max"), "final_sigmas"),
    (dict(timestep_spacing="karras"), "timestep_spacing"), (dict(beta_schedule="cosine"), "beta_schedule")])
def test_unsupported_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        dpm.DPMSolverConfig.from_json(kw)


def test_diffusers_renames_and_other_refusals(caplog):
    with caplog.at_level("INFO"):
        cfg = dpm.DPMSolverConfig.from_json({"algorithm_type": "deis", "solver_type": "bh2", "flow_shift": 3.0,
                                             "trained_betas": None, "lambda_min_clipped": None})
    assert (cfg.algorithm_type, cfg.solver_type) == ("dpmsolver++", "midpoint") and "deis" in caplog.text
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        dpm.inverse_plan(dpm.DPMSolverConfig(rescale_betas_zero_snr=True), 10)
    with pytest.raises(ValueError, match="steps"):
        dpm.plan(dpm.DPMSolverConfig(), 0)
    with pytest.raises(TypeError, match="DPMSolverConfig"):
        dpm.plan(ddim.SchedulerConfig(), 10)


def test_both_plans_have_the_plan_interface():
    """ddim.Plan and dpm.Plan (forward and inverse) offer samplers.plan.Plan, which the edit loops rely on."""
    cfg = ddim.SchedulerConfig()
    dcfg = dpm.DPMSolverConfig()
    for p in (ddim.plan(cfg, 5), ddim.inverse_plan(cfg, 5), dpm.plan(dcfg, 5), dpm.inverse_plan(dcfg, 5)):
        assert isinstance(p, Plan) and len(p) == len(p.t) == len(p.alpha_from) == len(p.alpha_to)
