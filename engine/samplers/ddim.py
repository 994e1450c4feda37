"""DDIM (Song et al. 2020, arXiv 2010.02502): the SD noise schedule, timesteps, the step, the inverse step.

Plain functions on tensors. Coefficients are ᾱ ("alphas_cumprod") values kept as fp32 device tensors so a
sampling loop indexes them without host synchronisation. Equation numbers refer to the DDIM paper.
"""
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from ...kernels.prediction import PREDICTION_TYPES, predict_x0_eps


@dataclass(frozen=True)
class SchedulerConfig:
    """scheduler/scheduler_config.json of a DDIMScheduler / DDIMInverseScheduler. The defaults are Stable
    Diffusion's (a single file carries no config); weights.scheduler fills a folder's missing keys with
    diffusers' class defaults instead, as diffusers' from_config does."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear" | "squaredcos_cap_v2"
    trained_betas: tuple | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False  # Imagen's dynamic thresholding of x̂0 (takes precedence over clip_sample)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        assert self.beta_schedule in ("scaled_linear", "linear", "squaredcos_cap_v2"), self.beta_schedule
        assert self.prediction_type in PREDICTION_TYPES, self.prediction_type
        assert self.timestep_spacing in ("leading", "trailing", "linspace"), self.timestep_spacing
        assert self.clip_sample_range > 0 and self.sample_max_value > 0, (self.clip_sample_range, self.sample_max_value)
        assert 0 < self.dynamic_thresholding_ratio <= 1, self.dynamic_thresholding_ratio

    @classmethod
    def from_json(cls, d: dict) -> "SchedulerConfig":
        """Known keys only: PNDM/DDIM/Euler configs carry extras (skip_prk_steps, _class_name, ...)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        return cls(**kw)


def betas(cfg: SchedulerConfig) -> torch.Tensor:
    """β_1..β_T (fp32), computed the way the checkpoints were trained (LDM's scaled_linear: linear in √β)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        b = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        b = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021 Eq. 17, β capped at 0.999
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    if cfg.rescale_betas_zero_snr:
        b = _zero_terminal_snr(b)
    return b


def _zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891) Algorithm 1: shift and scale √ᾱ so that ᾱ_T = 0, ᾱ_1 unchanged."""
    s = torch.cumprod(1 - b, 0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    abar = s ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) (DDPM Eq. 4), fp32, indexed by the training timestep 0..T−1."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def final_alpha_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """ᾱ of the level below the last timestep: 1 (x0 exactly) or ᾱ_0 (SD's set_alpha_to_one=False)."""
    return torch.tensor(1.0) if cfg.set_alpha_to_one else alphas_cumprod(cfg)[0]


def full_timesteps(cfg: SchedulerConfig, steps: int) -> torch.Tensor:
    """The `steps` sampling timesteps, descending (spacings of Lin et al. 2023, Table 2)."""
    n = cfg.num_train_timesteps
    assert 1 <= steps <= n, f"steps must be in 1..{n}, got {steps}"
    if cfg.timestep_spacing == "leading":
        ts = [i * (n // steps) + cfg.steps_offset for i in range(steps)][::-1]
    elif cfg.timestep_spacing == "trailing":
        ratio = n / steps
        ts = [round(n - i * ratio) - 1 for i in range(steps) if n - i * ratio > 0]
    else:  # linspace
        step = (n - 1) / (steps - 1) if steps > 1 else 0.0
        ts = [round(i * step) for i in range(steps - 1)] + [n - 1 if steps > 1 else 0]
        ts = ts[::-1]
    return torch.tensor(ts, dtype=torch.long)


def strength_skip(steps: int, strength: float) -> int:
    """How many of the noisiest timesteps img2img skips: a strength s runs the last int(steps·s) steps."""
    assert 0.0 <= strength <= 1.0, f"strength must be in [0, 1], got {strength}"
    return steps - min(int(steps * strength), steps)


def timesteps(cfg: SchedulerConfig, steps: int, strength: float = 1.0) -> torch.Tensor:
    """Descending timesteps of a denoising run that starts from noise level `strength` (1 = pure noise)."""
    return full_timesteps(cfg, steps)[strength_skip(steps, strength):]


def inverse_timesteps(cfg: SchedulerConfig, steps: int, strength: float = 1.0) -> torch.Tensor:
    """Ascending timesteps of an inversion up to noise level `strength`: timesteps(...) reversed."""
    return timesteps(cfg, steps, strength).flip(0)


class Schedule(NamedTuple):
    """One sampling run as device tensors: step i moves x from level alpha_from[i] to alpha_to[i] with the
    model evaluated at timestep t[i]. Decoding: alpha_from = ᾱ_t, alpha_to = ᾱ_prev; inversion: swapped."""
    t: torch.Tensor           # (S,) long
    alpha_from: torch.Tensor  # (S,) fp32
    alpha_to: torch.Tensor    # (S,) fp32


def _prev_alphas(cfg: SchedulerConfig, ts: torch.Tensor, steps: int) -> torch.Tensor:
    """ᾱ of the level one step below each t: t − T//steps (DDIM's τ_{i−1}; the next timestep for leading
    spacing), or the final ᾱ below 0. This is diffusers' rule, kept for every spacing."""
    ac = alphas_cumprod(cfg)
    prev = (ts - cfg.num_train_timesteps // steps).clamp(max=cfg.num_train_timesteps - 1)
    return torch.where(prev >= 0, ac[prev.clamp(min=0)], final_alpha_cumprod(cfg))


def schedule(cfg: SchedulerConfig, steps: int, strength: float = 1.0, device=None) -> Schedule:
    """The denoising run (DDIM Eq. 12 at each t[i]): ᾱ_t → ᾱ_prev, on `device`."""
    _check_config(cfg)
    ts = timesteps(cfg, steps, strength)
    a_t = alphas_cumprod(cfg)[ts]
    return Schedule(ts.to(device), a_t.to(device), _prev_alphas(cfg, ts, steps).to(device))


def inverse_schedule(cfg: SchedulerConfig, steps: int, strength: float = 1.0, device=None) -> Schedule:
    """The inversion run (DDIM Eq. 12 run backwards, Eq. 13's ODE): ᾱ_prev → ᾱ_t with the model at t, the
    exact reverse of `schedule`'s steps (DDIMInverseScheduler semantics)."""
    _check_config(cfg)
    ts = inverse_timesteps(cfg, steps, strength)
    a_to = alphas_cumprod(cfg)[ts]
    return Schedule(ts.to(device), _prev_alphas(cfg, ts, steps).to(device), a_to.to(device))


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): s = the `ratio` quantile of |x̂0| per image,
    clamped to [1, max_value]; x̂0 ← clamp(x̂0, −s, s) / s. An image is the last three dims (C, h, w), so a
    (B, C, h, w) batch matches diffusers' _threshold_sample and a (B, P, C, h, w) grid thresholds per sample."""
    flat = x0.float().flatten(-3)  # (..., C·h·w)
    s = torch.quantile(flat.abs(), ratio, dim=-1, keepdim=True).clamp(min=1, max=max_value)
    return (flat.clamp(-s, s) / s).view(x0.shape).to(x0.dtype)


def clip_x0(x0: torch.Tensor, clip_sample_range: float | None = None, thresholding=None) -> torch.Tensor:
    """x̂0 as the DDIM scheduler keeps it: dynamically thresholded when `thresholding` = (ratio, max) is given,
    else clamped to ±clip_sample_range when that is given (diffusers' precedence), else unchanged."""
    if thresholding is not None:
        return dynamic_threshold(x0, *thresholding)
    if clip_sample_range is not None:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def ddim_sigma(alpha_t, alpha_prev, eta: float):
    """σ_t(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (DDIM Eq. 16)."""
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5


def ddim_step(out, x, alpha_t, alpha_prev, prediction_type: str = "epsilon", eta: float = 0.0,
              generator=None, noise: torch.Tensor | None = None,
              clip_sample_range: float | None = None, thresholding=None) -> torch.Tensor:
    """x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z (DDIM Eq. 12); eta = 0 is deterministic DDIM.
    x̂0 is clipped as clip_x0 says (ε̂ is not recomputed from the clipped x̂0, as in diffusers).
    z is `noise` or drawn from `generator` (one, or one per image: see randn) with x's shape/dtype on x's
    device (diffusers' randn_tensor order)."""
    return _ddim(out, x, alpha_t, alpha_prev, prediction_type, eta, generator, noise, clip_sample_range,
                 thresholding)[0]


def _ddim(out, x, alpha_t, alpha_prev, prediction_type="epsilon", eta=0.0, generator=None, noise=None,
          clip_sample_range=None, thresholding=None):
    """(x_prev, x̂0) of ddim_step."""
    alpha_t = torch.as_tensor(alpha_t, dtype=torch.float32, device=x.device)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=torch.float32, device=x.device)
    x0, eps = predict_x0_eps(out, x, alpha_t, prediction_type)
    x0 = clip_x0(x0, clip_sample_range, thresholding)
    if eta == 0:
        return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps, x0
    sigma = ddim_sigma(alpha_t, alpha_prev, eta)
    x_prev = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - sigma ** 2) ** 0.5 * eps
    if noise is None:
        noise = randn(out.shape, generator, out.device, out.dtype)
    return x_prev + sigma * noise, x0


def ddim_inverse_step(out, x, alpha_t, alpha_next, prediction_type: str = "epsilon",
                      clip_sample_range: float | None = None) -> torch.Tensor:
    """x_next = √ᾱ_next x̂0 + √(1−ᾱ_next) ε̂: DDIM Eq. 12 with the levels swapped (the Eq. 13 ODE run forward).
    DDIMInverseScheduler clips x̂0 with clip_sample but has no dynamic thresholding."""
    return ddim_step(out, x, alpha_t, alpha_next, prediction_type, clip_sample_range=clip_sample_range)


@dataclass(frozen=True, eq=False)
class Plan:
    """A DDIM run ready for a scheduler-agnostic loop (the samplers.plan.Plan interface, as dpm.Plan):

        x0 = None
        for i in range(len(plan)):
            x, x0 = plan.step(i, model(x, plan.t[i]), x, x0)

    step i moves x from level ᾱ = alpha_from[i] to alpha_to[i] with the model evaluated at t[i]; all three
    are device tensors (no host synchronisation in the loop). The x̂0 of the previous step (x0_prev) is
    what a multistep solver needs; DDIM ignores it."""
    schedule: Schedule
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None  # clip_sample on
    thresholding: tuple | None = None       # (dynamic_thresholding_ratio, sample_max_value) when on

    @property
    def t(self) -> torch.Tensor:
        return self.schedule.t

    @property
    def alpha_from(self) -> torch.Tensor:
        return self.schedule.alpha_from

    @property
    def alpha_to(self) -> torch.Tensor:
        return self.schedule.alpha_to

    def __len__(self) -> int:
        return len(self.schedule.t)

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None = None):
        """(x at alpha_to[i], x̂0): DDIM Eq. 12 (eta 0) from the model output at t[i]."""
        return _ddim(out, x, self.schedule.alpha_from[i], self.schedule.alpha_to[i], self.prediction_type,
                     clip_sample_range=self.clip_sample_range, thresholding=self.thresholding)


def plan(cfg: SchedulerConfig, steps: int, strength: float = 1.0, device=None) -> Plan:
    """DDIMScheduler's denoising run (set_timesteps + step with the config's clip_sample / thresholding)."""
    _check_config(cfg)
    thr = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
    return Plan(schedule(cfg, steps, strength, device), cfg.prediction_type,
                cfg.clip_sample_range if cfg.clip_sample else None, thr)


def inverse_plan(cfg: SchedulerConfig, steps: int, strength: float = 1.0, device=None) -> Plan:
    """DDIMInverseScheduler's run for `cfg` (the inverse_scheduler/ config when the folder has one): its own
    steps_offset and set_alpha_to_one, clip_sample, no thresholding (the inverse scheduler has none)."""
    _check_config(cfg)
    return Plan(inverse_schedule(cfg, steps, strength, device), cfg.prediction_type,
                cfg.clip_sample_range if cfg.clip_sample else None, None)


def _check_config(cfg):
    if not isinstance(cfg, SchedulerConfig):
        raise TypeError(f"DDIM needs an engine.ddim.SchedulerConfig, got {type(cfg).__name__} (a DPM-Solver "
                        f"config runs with engine.dpm; see weights.scheduler.select)")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_t) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM Eq. 4, q(x_t | x0))."""
    a = torch.as_tensor(alpha_t, dtype=torch.float32, device=x0.device)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device then moved (a CPU generator gives the same numbers
    on every device, and the same ones as diffusers' randn_tensor for a single generator). generator: one
    torch.Generator (or None) for the whole tensor, or a list of them, one per image: dim 0 is split into
    len(list) equal b-major chunks and chunk b is drawn from generator[b], so image b gets the numbers an
    unbatched run with generator[b] would get, wherever it sits in the batch."""
    if isinstance(generator, (list, tuple)):
        if shape[0] % len(generator):
            raise ValueError(f"{len(generator)} generators cannot split a batch of {shape[0]}")
        chunk = (shape[0] // len(generator), *shape[1:])
        return torch.cat([randn(chunk, g, device, dtype) for g in generator])
    gdev = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def check_generators(generator, batch: int):
    """Raise unless `generator` is None, one generator, or a list of exactly one per image (randn alone
    cannot tell: a wrong-length list may still divide B·n samples evenly)."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch} images (pass one, or one per image)")
