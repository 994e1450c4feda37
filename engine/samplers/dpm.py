"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): the multistep second-order solver of the diffusion ODE
in data-prediction form, as diffusers' DPMSolverMultistepScheduler (algorithm_type "dpmsolver++") and, run
backwards for inversion, DPMSolverMultistepInverseScheduler.

With λ = log(α/σ), h = λ_t − λ_s and D0 = x̂0(x_s), one step is (Alg. 2, "multistep"):
  first order (= DDIM):  x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D0
  second order:          … − ½ α_t (e^{−h} − 1) D1,  D1 = (D0 − x̂0 of the step before) / r0,  r0 = h_prev / h
("midpoint"; "heun" weighs D1 by α_t ((e^{−h} − 1)/h + 1)). Which steps are first order depends only on the
step index, so every coefficient is computed once on the host when the plan is built and kept as fp32
device tensors: a sampling loop indexes them and never synchronises. The levels are diffusers' σ = √((1−ᾱ)/ᾱ)
at the sampling timesteps with α = 1/√(σ²+1) and σ_t = σ·α, computed the way diffusers computes them so the
steps agree with it to rounding.
"""
import logging
import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from . import ddim

log = logging.getLogger(__name__)

# options diffusers offers that this engine does not implement, with the value that turns each off
_UNSUPPORTED_AT = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None}


@dataclass(frozen=True)
class DPMSolverConfig:
    """scheduler_config.json of a DPMSolverMultistepScheduler / DPMSolverMultistepInverseScheduler; the
    defaults are diffusers' (from_json(d) builds what DPMSolverMultistepScheduler.from_config(d) builds)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    trained_betas: tuple | None = None
    solver_order: int = 2  # 1 (DDIM) or 2 (2M); 3 is refused
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"  # "midpoint" | "heun"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    final_sigmas_type: str = "zero"  # "zero" | "sigma_min"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"  # "linspace" | "leading" | "trailing"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        def refuse(key, why):
            raise ValueError(f"DPM-Solver config: {key}={getattr(self, key)!r} is not supported ({why})")
        for key, off in _UNSUPPORTED_AT.items():
            if getattr(self, key) != off:
                refuse(key, f"the engine implements the plain σ schedule only; use {key}={off!r}")
        if self.algorithm_type != "dpmsolver++":
            refuse("algorithm_type", "the engine implements 'dpmsolver++' (DPM-Solver++(2M)) only")
        if self.solver_order not in (1, 2):
            refuse("solver_order", "the engine implements orders 1 and 2 (DPM-Solver++(2M))")
        if self.solver_type not in ("midpoint", "heun"):
            refuse("solver_type", "'midpoint' or 'heun'")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            refuse("prediction_type", "'epsilon', 'v_prediction' or 'sample'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            refuse("final_sigmas_type", "'zero' or 'sigma_min'")
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            refuse("timestep_spacing", "'linspace', 'leading' or 'trailing'")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            refuse("beta_schedule", "'linear', 'scaled_linear' or 'squaredcos_cap_v2'")

    @classmethod
    def from_json(cls, d: dict) -> "DPMSolverConfig":
        """Known keys over the defaults; diffusers' own renames (algorithm_type "deis" → "dpmsolver++",
        solver_type "logrho"/"bh1"/"bh2" → "midpoint") are applied and logged; other keys are ignored, as
        diffusers ignores them (flow_shift, use_dynamic_shifting and time_shift_type act only with flow sigmas
        or a shift the DiffEdit pipeline never passes)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        if kw.get("lambda_min_clipped") is None:
            kw.pop("lambda_min_clipped", None)
        for key, old, new in (("algorithm_type", ("deis",), "dpmsolver++"),
                              ("solver_type", ("logrho", "bh1", "bh2"), "midpoint")):
            if kw.get(key) in old:
                log.info("DPM-Solver config: %s=%r runs as %r (diffusers' mapping)", key, kw[key], new)
                kw[key] = new
        return cls(**kw)


def alphas_cumprod(cfg: DPMSolverConfig) -> torch.Tensor:
    """ᾱ_t (fp32) as DPMSolverMultistepScheduler keeps it: with rescale_betas_zero_snr the last one is 2⁻²⁴,
    not 0, so that σ and λ stay finite."""
    ac = ddim.alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2 ** -24
    return ac


def _lambda_clip_index(ac: torch.Tensor, lambda_min_clipped: float) -> int:
    """How many of the noisiest training timesteps lambda_min_clipped removes (diffusers' clipped_idx)."""
    lam = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    return int(torch.searchsorted(torch.flip(lam, [0]), lambda_min_clipped))


def full_timesteps(cfg: DPMSolverConfig, steps: int) -> tuple[list, list]:
    """(timesteps descending, σ levels: one per timestep then the final σ) of DPMSolverMultistepScheduler's
    set_timesteps (its own spacing rules: e.g. "leading" divides by steps + 1)."""
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in 1..{n}, got {steps}")
    ac = alphas_cumprod(cfg)
    last = n - _lambda_clip_index(ac, cfg.lambda_min_clipped)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1].astype(np.int64)
        ts = ts + cfg.steps_offset
    else:
        ts = np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
    sig = (((1 - ac) / ac) ** 0.5).numpy()
    final = float(sig[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    return ts.tolist(), np.interp(ts, np.arange(len(sig)), sig).tolist() + [final]


def full_inverse_timesteps(cfg: DPMSolverConfig, steps: int) -> tuple[list, list]:
    """(timesteps ascending, σ levels: one per timestep then σ at the noisiest timestep) of
    DPMSolverMultistepInverseScheduler's set_timesteps (repeated timesteps dropped, σ levels kept, as there)."""
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in 1..{n}, got {steps}")
    if cfg.rescale_betas_zero_snr:
        raise ValueError("DPMSolverMultistepInverseScheduler has no rescale_betas_zero_snr (diffusers drops it "
                         "and inverts along another schedule than it samples); invert with DDIM instead")
    ac = ddim.alphas_cumprod(cfg)
    noisiest = n - 1 - _lambda_clip_index(ac, cfg.lambda_min_clipped)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, noisiest, steps + 1).round()[:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps + 1) * ((noisiest + 1) // (steps + 1))).round()[:-1].astype(np.int64)
        ts = ts + cfg.steps_offset
    else:
        ts = np.arange(noisiest + 1, 0, -n / steps).round()[::-1].astype(np.int64) - 1
    sig = (((1 - ac) / ac) ** 0.5).numpy()
    sigmas = np.interp(ts, np.arange(len(sig)), sig).tolist() + [float(sig[noisiest])]
    _, first = np.unique(ts, return_index=True)
    return ts[np.sort(first)].tolist(), sigmas


@dataclass(frozen=True, eq=False)
class Plan:
    """A DPM-Solver++ run with the samplers.plan.Plan interface (as ddim.Plan):

        x0 = None
        for i in range(len(plan)):
            x, x0 = plan.step(i, model(x, plan.t[i]), x, x0)

    step i evaluates the model at t[i] and moves x from level ᾱ = alpha_from[i] to alpha_to[i] (ᾱ = α²,
    the levels DDIM and add_noise speak in). All per-step numbers are (S,) device tensors."""
    t: torch.Tensor           # (S,) long
    alpha_s: torch.Tensor     # (S,) α at t[i] (x̂0 from the model output)
    sigma_s: torch.Tensor     # (S,) σ_t at t[i]
    ratio: torch.Tensor       # (S,) σ_next / σ_s
    phi: torch.Tensor         # (S,) α_next (e^{−h} − 1)
    inv_r0: torch.Tensor      # (S,) 1 / r0; 0 on first-order steps
    d1: torch.Tensor          # (S,) weight of D1: −½ phi (midpoint) or α_next ((e^{−h} − 1)/h + 1) (heun); 0 on first-order steps
    alpha_from: torch.Tensor  # (S,) ᾱ before step i
    alpha_to: torch.Tensor    # (S,) ᾱ after step i
    prediction_type: str = "epsilon"
    thresholding: tuple | None = None  # (dynamic_thresholding_ratio, sample_max_value) when on
    upcast: bool = True  # the forward scheduler updates in fp32 and returns the model output's dtype

    def __len__(self) -> int:
        return len(self.t)

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None = None):
        """(x at alpha_to[i], x̂0 at t[i]): DPM-Solver++ Alg. 2, first or second order as the plan says;
        x0_prev is the x̂0 step i−1 returned (None on the first step of a run)."""
        x0 = data_prediction(out, x, self.alpha_s[i], self.sigma_s[i], self.prediction_type)
        if self.thresholding is not None:
            x0 = ddim.dynamic_threshold(x0, *self.thresholding)
        x_next = dpmpp_2m_update(x.float() if self.upcast else x, x0, x0 if x0_prev is None else x0_prev,
                                 self.ratio[i], self.phi[i], self.inv_r0[i], self.d1[i])
        return (x_next.to(out.dtype) if self.upcast else x_next), x0


def data_prediction(out, x, alpha, sigma, prediction_type: str = "epsilon") -> torch.Tensor:
    """x̂0 from the model output at level (α, σ): (x − σ ε)/α, α x − σ v, or the output ("sample")
    (DPM-Solver++ §3.2 with Salimans & Ho's v)."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def dpmpp_2m_update(x, x0, x0_prev, ratio, phi, inv_r0, d1) -> torch.Tensor:
    """x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) D0 + w D1, D1 = (D0 − x̂0_prev)/r0 (DPM-Solver++ Alg. 2; the
    first-order step, = DDIM, has inv_r0 = w = 0)."""
    return ratio * x - phi * x0 + d1 * (inv_r0 * (x0 - x0_prev))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar) -> torch.Tensor:
    """x_t = √ᾱ x0 + √(1−ᾱ) ε at a plan level ᾱ (e.g. plan.alpha_from[0]), as ddim.add_noise."""
    return ddim.add_noise(x0, noise, alpha_bar)


def _coefficients(sigmas: list, first_order: list, solver_type: str):
    """Per-step (α_s, σ_s, ratio, phi, inv_r0, d1, ᾱ_s, ᾱ_next) for steps j (σ_j → σ_{j+1}), computed with
    0-d fp32 tensors in diffusers' operation order (its multistep_dpm_solver_*_update)."""
    sig = torch.tensor(sigmas, dtype=torch.float32)
    rows = []
    for j, first in enumerate(first_order):
        a = [None] * 3
        s = [None] * 3
        for k, idx in enumerate((j + 1, j, j - 1)):
            if idx >= 0:
                sg = sig[idx]
                a[k] = 1 / ((sg ** 2 + 1) ** 0.5)
                s[k] = sg * a[k]
        lam = [torch.log(a[k]) - torch.log(s[k]) if a[k] is not None else None for k in range(3)]
        h = lam[0] - lam[1]
        phi = a[0] * (torch.exp(-h) - 1.0)
        zero = torch.zeros((), dtype=torch.float32)
        if first:
            inv_r0, d1 = zero, zero
        else:
            inv_r0 = 1.0 / ((lam[1] - lam[2]) / h)
            d1 = -(0.5 * phi) if solver_type == "midpoint" else a[0] * ((torch.exp(-h) - 1.0) / h + 1.0)
        rows.append((a[1], s[1], s[0] / s[1], phi, inv_r0, d1, a[1] ** 2, a[0] ** 2))
    return [torch.stack(col) for col in zip(*rows)] if rows else [torch.zeros(0)] * 8


def _begin(ts: list, t) -> int:
    """diffusers' index_for_timestep: the second match when t repeats, the last index when it is absent."""
    hits = [j for j, v in enumerate(ts) if v == t]
    return hits[1] if len(hits) > 1 else hits[0] if hits else len(ts) - 1


def _plan(cfg, ts, sigmas, begin, run, final_rule, device, upcast) -> Plan:
    N = len(ts)
    first = [k == 0 or cfg.solver_order == 1 or (j == N - 1 and final_rule)
             for k, j in enumerate(range(begin, begin + run))]
    cols = _coefficients(sigmas[begin:begin + run + 1], first, cfg.solver_type)
    thr = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
    return Plan(torch.tensor(ts[begin:begin + run], dtype=torch.long, device=device),
                *(c.to(device) for c in cols), prediction_type=cfg.prediction_type, thresholding=thr, upcast=upcast)


def plan(cfg: DPMSolverConfig, steps: int, strength: float = 1.0, device=None) -> Plan:
    """DPMSolverMultistepScheduler's denoising run from noise level `strength`: the last int(steps·strength)
    timesteps (the img2img truncation of the DiffEdit pipeline's get_timesteps), entered at the step index
    diffusers finds for the first of them; the multistep history starts empty, so the run's first step is
    first order."""
    _check_config(cfg)
    ts, sigmas = full_timesteps(cfg, steps)
    skip = ddim.strength_skip(steps, strength)
    begin = _begin(ts, ts[skip]) if skip < len(ts) else len(ts)
    final_rule = cfg.euler_at_final or (cfg.lower_order_final and len(ts) < 15) or cfg.final_sigmas_type == "zero"
    return _plan(cfg, ts, sigmas, begin, len(ts) - max(begin, min(skip, len(ts))), final_rule, device, True)


def inverse_plan(cfg: DPMSolverConfig, steps: int, strength: float = 1.0, device=None) -> Plan:
    """DPMSolverMultistepInverseScheduler's run up to noise level `strength`: its first timesteps (the
    DiffEdit pipeline's get_inverse_timesteps), from the clean latent taken as level t = 0 up to the level
    of the next timestep (σ at the noisiest timestep after the last one)."""
    _check_config(cfg)
    ts, sigmas = full_inverse_timesteps(cfg, steps)
    skip = ddim.strength_skip(steps, strength)
    run = len(ts[:-skip]) if skip else len(ts)
    final_rule = cfg.euler_at_final or (cfg.lower_order_final and len(ts) < 15)
    return _plan(cfg, ts, sigmas, 0, run, final_rule, device, False)


def _check_config(cfg):
    if not isinstance(cfg, DPMSolverConfig):
        raise TypeError(f"DPM-Solver++ needs an engine.dpm.DPMSolverConfig, got {type(cfg).__name__} "
                        f"(see weights.scheduler.select)")
