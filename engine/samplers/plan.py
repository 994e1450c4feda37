"""The interface every sampler's run offers (engine.samplers.ddim.Plan, engine.samplers.dpm.Plan), so the
algorithms (engine.edit) loop over any of them without asking which:

    x0 = None
    for i in range(len(plan)):
        x, x0 = plan.step(i, model(x, plan.t[i]), x, x0)

Written down as a Protocol (structural: the two dataclasses do not inherit from it) so that a new sampler
states what it must provide and the loops' annotations say what they rely on.
"""
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable  # isinstance checks the members' presence (the tests hold both plans to it)
class Plan(Protocol):
    """One sampling run as device tensors: step i evaluates the model at t[i] and moves x from level
    ᾱ = alpha_from[i] to alpha_to[i] (ᾱ, the level DDIM and add_noise speak in, whatever the solver). No
    host synchronisation in the loop: every per-step number is an (S,) device tensor indexed by i."""

    @property
    def t(self) -> torch.Tensor: ...            # (S,) long: the model's timestep at each step

    @property
    def alpha_from(self) -> torch.Tensor: ...   # (S,) fp32: ᾱ before step i

    @property
    def alpha_to(self) -> torch.Tensor: ...     # (S,) fp32: ᾱ after step i

    @property
    def prediction_type(self) -> str: ...       # "epsilon" | "v_prediction" | "sample"

    def __len__(self) -> int: ...

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor,
             x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x at alpha_to[i], x̂0 at t[i]) from the model output `out` at x; x0_prev: the x̂0 step i − 1
        returned (None on a run's first step; a multistep solver uses it, DDIM ignores it)."""
        ...
