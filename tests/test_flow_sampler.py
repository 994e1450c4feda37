"""engine.samplers.flow against diffusers' FlowMatchEulerDiscreteScheduler (the oracle is diffusers' own code on
the same config): the σ grid and timesteps bit for bit, the Euler step, the SD3 img2img strength rule, and the
inversion run's relation to the decoding run."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffedit_engine.engine.samplers import flow

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}


def _ref(d):
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in d.items() if not k.startswith("_")})


def test_config_from_json_keeps_known_keys_and_refuses_what_is_not_implemented():
    assert flow.FlowMatchConfig.from_json(SD3) == flow.FlowMatchConfig(shift=3.0)
    assert flow.FlowMatchConfig.from_json({"shift_terminal": None}).shift_terminal is None
    assert flow.FlowMatchConfig.from_json(FLUX).use_dynamic_shifting
    for bad in ({"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
                {"invert_sigmas": True}, {"stochastic_sampling": True}, {"time_shift_type": "cosine"},
                {"shift_terminal": 1.0}):
        with pytest.raises(AssertionError):
            flow.FlowMatchConfig.from_json(bad)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("shift_terminal", [None, 0.02])
def test_static_shift_grid_equals_diffusers(shift, shift_terminal):
    d = {**SD3, "shift": shift, "shift_terminal": shift_terminal}
    cfg, ref = flow.FlowMatchConfig.from_json(d), _ref(d)
    for steps in (1, 2, 7, 28, 50, 1000):
        if steps == 1 and shift_terminal:
            with pytest.raises(ValueError, match="shift_terminal"):
                flow.sigmas(cfg, steps)
            continue
        ref.set_timesteps(steps)
        g = flow.sigmas(cfg, steps)
        assert torch.equal(g, ref.sigmas), (shift, shift_terminal, steps)
        assert torch.equal(flow.timesteps(cfg, g), ref.timesteps), (shift, shift_terminal, steps)
        assert g[-1] == 0 and (g[:-1] > g[1:]).all()


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_dynamic_shift_grid_equals_diffusers(time_shift_type, seq_len):
    """FLUX: mu from the token count (the pipelines' calculate_shift), the pipeline's own base sigmas, or
    the scheduler's spacing when none are given."""
    d = {**FLUX, "time_shift_type": time_shift_type}
    cfg, ref = flow.FlowMatchConfig.from_json(d), _ref(d)
    mu = flow.calculate_mu(seq_len, cfg)
    assert mu == calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    for steps in (1, 4, 28, 50):
        base = np.linspace(1.0, 1 / steps, steps)
        ref.set_timesteps(sigmas=base, mu=mu)
        g = flow.sigmas(cfg, steps, mu=mu, base_sigmas=base)
        assert torch.equal(g, ref.sigmas) and torch.equal(flow.timesteps(cfg, g), ref.timesteps), steps
        ref.set_timesteps(steps, mu=mu)
        assert torch.equal(flow.sigmas(cfg, steps, mu=mu), ref.sigmas), steps
    with pytest.raises(ValueError, match="mu"):
        flow.sigmas(cfg, 10)


def test_dynamic_shift_with_terminal_equals_diffusers():
    d = {**FLUX, "shift_terminal": 0.1}
    cfg, ref = flow.FlowMatchConfig.from_json(d), _ref(d)
    ref.set_timesteps(20, mu=0.9)
    assert torch.equal(flow.sigmas(cfg, 20, mu=0.9), ref.sigmas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_steps_equal_scheduler_step(dtype):
    cfg = flow.FlowMatchConfig.from_json(SD3)
    ref = _ref(SD3)
    ref.set_timesteps(8)
    g = flow.sigmas(cfg, 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=gen).to(dtype)
    ours = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=gen).to(dtype)
        x = ref.step(v, t, x).prev_sample
        ours = flow.euler_step(v, ours, g[i], g[i + 1])
        assert ours.dtype == x.dtype and torch.equal(ours, x), i
    p = flow.plan(cfg, 8)
    assert torch.equal(p.t, ref.timesteps) and len(p) == 8


@pytest.mark.parametrize("steps", [1, 4, 10, 28])
@pytest.mark.parametrize("strength", [0.0, 0.3, 0.75, 0.95, 1.0])
def test_strength_follows_sd3_img2img(steps, strength):
    """StableDiffusion3Img2ImgPipeline.get_timesteps: t_start = int(max(steps − steps·strength, 0))."""
    ref = _ref(SD3)
    ref.set_timesteps(steps)
    init = min(steps * strength, steps)
    t_start = int(max(steps - init, 0))
    p = flow.plan(flow.FlowMatchConfig.from_json(SD3), steps, strength)
    assert torch.equal(p.t, ref.timesteps[t_start:])
    assert torch.equal(p.sigma_from, ref.sigmas[t_start:-1]) and torch.equal(p.sigma_to, ref.sigmas[t_start + 1:])


def test_inverse_plan_is_the_decoding_plan_reversed():
    cfg = flow.FlowMatchConfig.from_json(SD3)
    p, q = flow.plan(cfg, 10, 0.6), flow.inverse_plan(cfg, 10, 0.6)
    assert torch.equal(q.t, p.t.flip(0))
    assert torch.equal(q.sigma_from, p.sigma_to.flip(0)) and torch.equal(q.sigma_to, p.sigma_from.flip(0))
    assert q.sigma_from[0] == 0 and (q.sigma_to > q.sigma_from).all()


def test_inversion_then_decoding_is_exact_for_a_constant_velocity():
    """A model whose velocity does not depend on x (a straight path, ε − x0 fixed): Euler is exact both ways, so
    inversion followed by decoding returns x0 and inversion lands on the forward path's point."""
    cfg = flow.FlowMatchConfig.from_json(SD3)
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 16, 4, 4, generator=gen, dtype=torch.float64), torch.randn(1, 16, 4, 4, generator=gen,
                                                                                       dtype=torch.float64)
    v = eps - x0
    q, p = flow.inverse_plan(cfg, 12, 0.8), flow.plan(cfg, 12, 0.8)
    x = x0
    for i in range(len(q)):
        x = q.step(i, v, x)
    assert torch.allclose(x, flow.add_noise(x0, eps, q.sigma_to[-1].double()), atol=1e-6)
    for i in range(len(p)):
        x = p.step(i, v, x)
    assert torch.allclose(x, x0, atol=1e-6)
