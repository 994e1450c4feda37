"""Flow matching (Lipman et al. 2023, arXiv 2210.02747) on the rectified-flow path of SD 3.x and FLUX.1:
the sigma grid, the Euler step of the ODE dx/dσ = v, and its inversion.

The path (Esser et al. 2024, arXiv 2403.03206, §2 Eq. 1-3, rectified flow): x_σ = (1 − σ) x0 + σ ε, σ ∈ [0, 1],
so the model's velocity target is v = ε − x0 and dx/dσ = v. Sampling walks σ from 1 down to 0; inversion walks
the same grid up. The grid is built exactly as diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps builds
it (same operations in the same precision, on the host with NumPy, then fp32), so runs are comparable bit for
bit; the model's timestep is σ · num_train_timesteps (a float, not an index).
"""
import math
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass(frozen=True)
class FlowMatchConfig:
    """scheduler/scheduler_config.json of a FlowMatchEulerDiscreteScheduler. Defaults are diffusers' class
    defaults (a folder's missing keys take them, as diffusers' from_config does)."""
    num_train_timesteps: int = 1000
    shift: float = 1.0                   # SD3: 3.0 (static shift, Esser et al. §3.1 / Eq. 23)
    use_dynamic_shifting: bool = False   # FLUX: True (shift from the image's token count, via mu)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None  # SD3.5 large turbo-style schedules end at this σ instead of ~0
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"  # "exponential" | "linear" (the dynamic shift's form)
    stochastic_sampling: bool = False

    def __post_init__(self):
        assert self.time_shift_type in ("exponential", "linear"), self.time_shift_type
        assert self.num_train_timesteps >= 1 and self.shift > 0, (self.num_train_timesteps, self.shift)
        assert self.shift_terminal is None or 0 <= self.shift_terminal < 1, self.shift_terminal

    @classmethod
    def from_json(cls, d: dict) -> "FlowMatchConfig":
        """Known keys only (configs carry _class_name, _diffusers_version). What the engine does not
        implement is refused here rather than silently sampled differently."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            assert not getattr(cfg, key), f"FlowMatchConfig: {key}=True is not supported (the grid would differ)"
        assert not cfg.invert_sigmas, "FlowMatchConfig: invert_sigmas=True is not supported"
        assert not cfg.stochastic_sampling, "FlowMatchConfig: stochastic_sampling=True is not supported"
        return cfg


def shift_sigmas(sigma, shift: float):
    """The resolution shift of Esser et al. 2024 Eq. 23 with α = shift: σ' = α σ / (1 + (α − 1) σ). It maps
    the same signal-to-noise ratio to a larger σ (more noise), which higher resolutions need."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_shift(mu: float, sigma, time_shift_type: str = "exponential"):
    """FLUX's dynamic shift: σ' = e^μ / (e^μ + (1/σ − 1)) ("exponential", i.e. Eq. 23 with α = e^μ) or
    μ / (μ + (1/σ − 1)) ("linear"). σ = 0 is not allowed (1/σ)."""
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    return mu / (mu + (1 / sigma - 1))


def calculate_mu(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """μ for the dynamic shift: linear in the image's token count, base_shift at base_image_seq_len and
    max_shift at max_image_seq_len (extrapolated beyond), as FLUX's pipelines compute it."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def stretch_to_terminal(sigma, shift_terminal: float):
    """Rescale 1 − σ so that the grid's last σ equals shift_terminal (its first stays where it was)."""
    one_minus = 1 - sigma
    return 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))


def _training_sigma_range(cfg: FlowMatchConfig) -> tuple[float, float]:
    """(σ_max, σ_min) of the training grid σ = t/T, t = 1..T, shifted statically in fp32 unless the shift is
    dynamic: the grid's end points that set_timesteps spaces its steps between."""
    s = torch.tensor([cfg.num_train_timesteps, 1], dtype=torch.float32) / cfg.num_train_timesteps
    if not cfg.use_dynamic_shifting:
        s = shift_sigmas(s, cfg.shift)
    return s[0].item(), s[1].item()


def sigmas(cfg: FlowMatchConfig, steps: int, mu: float | None = None, base_sigmas=None,
           device=None) -> torch.Tensor:
    """The (steps + 1,) fp32 σ grid of a sampling run, descending, ending in 0 (FlowMatchEulerDiscreteScheduler
    .set_timesteps). base_sigmas: the unshifted σ per step when the pipeline chooses them (FLUX passes
    linspace(1, 1/steps, steps)); else steps equal spacings of the training range. mu: required with
    use_dynamic_shifting (see calculate_mu)."""
    assert steps >= 1, f"steps must be >= 1, got {steps}"
    if cfg.use_dynamic_shifting and mu is None:
        raise ValueError("this flow scheduler shifts dynamically: pass mu (calculate_mu of the image's token count)")
    if base_sigmas is None:
        hi, lo = _training_sigma_range(cfg)
        T = cfg.num_train_timesteps
        s = np.linspace(hi * T, lo * T, steps) / T  # float64, as the scheduler does
    else:
        s = np.asarray(base_sigmas).astype(np.float32)
        assert len(s) == steps, f"{len(s)} base sigmas for {steps} steps"
    s = time_shift(mu, s, cfg.time_shift_type) if cfg.use_dynamic_shifting else shift_sigmas(s, cfg.shift)
    if cfg.shift_terminal:
        if steps == 1:  # the one level is σ = 1: 1 − σ is 0 and cannot be stretched (diffusers returns NaN)
            raise ValueError("a flow schedule with shift_terminal needs at least 2 steps")
        s = stretch_to_terminal(s, cfg.shift_terminal)
    s = torch.from_numpy(np.asarray(s)).to(torch.float32)
    return torch.cat([s, torch.zeros(1)]).to(device)


def timesteps(cfg: FlowMatchConfig, grid: torch.Tensor) -> torch.Tensor:
    """The model's timestep at each step of a σ grid: σ · num_train_timesteps (the last level, σ = 0, has none)."""
    return grid[:-1] * cfg.num_train_timesteps


def strength_skip(steps: int, strength: float) -> int:
    """How many of the noisiest steps a run from noise level `strength` skips: SD3's img2img rule
    t_start = int(max(steps − steps·strength, 0)) (the product is not truncated first, unlike SD's)."""
    assert 0.0 <= strength <= 1.0, f"strength must be in [0, 1], got {strength}"
    return int(max(steps - min(steps * strength, steps), 0))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_σ = (1 − σ) x0 + σ ε: the rectified-flow forward path (Esser et al. Eq. 3 with a_t = 1 − t, b_t = t)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    return sigma * noise + (1.0 - sigma) * x0


def euler_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of dx/dσ = v (Lipman et al. 2023 §3's ODE, here in σ): x + (σ_next − σ) v, computed in
    fp32 and returned in v's dtype (FlowMatchEulerDiscreteScheduler.step, deterministic)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    return (x.float() + (sigma_next - sigma) * v).to(v.dtype)


def euler_inverse_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_up) -> torch.Tensor:
    """One step of the ODE run forward in σ (deterministic inversion), σ → σ_up > σ: x + (σ_up − σ) v.
    The caller evaluates v at the current x with the timestep of σ_up (the level whose decoding step it
    reverses), as DDIM inversion does: the decoder's step σ_up → σ used v(x_σ_up, σ_up), and x_σ is the best
    available stand-in for x_σ_up, so inversion and decoding meet the model at the same timesteps."""
    return euler_step(v, x, sigma, sigma_up)


@dataclass(frozen=True, eq=False)
class FlowPlan:
    """A flow run ready for a loop (the role engine.samplers.plan.Plan plays for SD, in σ instead of ᾱ):

        for i in range(len(plan)):
            x = plan.step(i, model(x, plan.t[i]), x)

    step i moves x from sigma_from[i] to sigma_to[i] with the model evaluated at timestep t[i]; all are
    device tensors (no host synchronisation in the loop)."""
    t: torch.Tensor           # (S,) fp32: the model's timestep (σ · T) at each step
    sigma_from: torch.Tensor  # (S,) fp32
    sigma_to: torch.Tensor    # (S,) fp32

    def __len__(self) -> int:
        return len(self.t)

    def step(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return euler_step(v, x, self.sigma_from[i], self.sigma_to[i])


def plan(cfg: FlowMatchConfig, steps: int, strength: float = 1.0, mu: float | None = None, base_sigmas=None,
         device=None) -> FlowPlan:
    """The denoising run from noise level `strength` (1 = pure noise) down to σ = 0: the grid's last
    steps − strength_skip steps."""
    g = sigmas(cfg, steps, mu, base_sigmas, device)
    k = strength_skip(steps, strength)
    return FlowPlan(timesteps(cfg, g)[k:], g[k:-1], g[k + 1:])


def inverse_plan(cfg: FlowMatchConfig, steps: int, strength: float = 1.0, mu: float | None = None,
                 base_sigmas=None, device=None) -> FlowPlan:
    """The inversion run: plan(...)'s steps reversed, σ from 0 up to the decoder's starting level, each with
    the timestep of the level it climbs to (see euler_inverse_step)."""
    p = plan(cfg, steps, strength, mu, base_sigmas, device)
    return FlowPlan(p.t.flip(0), p.sigma_to.flip(0), p.sigma_from.flip(0))
