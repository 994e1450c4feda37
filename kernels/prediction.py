"""The model-output parameterisations: (x̂0, ε̂) from an ε-, v- or x0-prediction at level ᾱ_t.

It lives in the lowest layer because two places must compute exactly this formula: the DDIM step
(engine.samplers.ddim) and the torch reference of the fused decode kernel (kernels.fusion, whose Triton
kernel restates it per pixel). Kernels may not import the engine, so the formula sits here and ddim imports it:
one definition, and a reference that cannot drift from the sampler it stands for.
"""
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def predict_x0_eps(out: torch.Tensor, x: torch.Tensor, alpha_t, prediction_type: str = "epsilon"):
    """(x̂0, ε̂) from the model output at level ᾱ_t: ε (DDIM Eq. 9/12), v (Salimans & Ho 2022, §4 & App. D:
    x̂0 = √ᾱ x − √(1−ᾱ) v, ε̂ = √ᾱ v + √(1−ᾱ) x) or x0 ("sample")."""
    a = torch.as_tensor(alpha_t, dtype=torch.float32, device=x.device)
    sa, sb = a ** 0.5, (1 - a) ** 0.5
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
