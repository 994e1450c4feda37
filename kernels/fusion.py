"""One decode step of the fused N-region edit: CFG per region + DDIM step (eta 0) + MultiDiffusion fusion.

Given the UNet output for [uncond, target_1..target_N] at the shared latent x_t, every region i gets
  e_i = e_u + g (e_ti − e_u)                          (classifier-free guidance; on v for v-models)
  y_i = √ᾱ_prev x̂0_i + √(1−ᾱ_prev) ε̂_i               (DDIM Eq. 12, eta 0; x̂0, ε̂: kernels.prediction)
and the regions are fused with each other and with the background latent bg at the new level
(MultiDiffusion Eq. 5 / 8, the background being one more region of weight W_bg):
  x_prev = (Σ_i W_i y_i + W_bg bg) / (Σ_i W_i + W_bg),   W_bg = clamp(1 − Σ_i W_i, 0, 1).
Where Σ W ≤ 1 the denominator is exactly 1 mathematically, so both implementations skip the division
there and compute Σ W_i y_i + W_bg bg: a pixel with W = 0 is then bg bit for bit (0 + 1·bg) and N = 1 is
exactly W y + (1 − W) bg, the paper's masked blend. Terms with W_i = 0 contribute an exact 0 even if y_i
is not finite. Where Σ W > 1, W_bg = 0 and the division normalises the overlapping regions.

One Triton pass: a program per block of pixels of one image, looping over channels and regions, so
eps is read once, x/bg/out once per channel, the weights from cache. Math in fp32; out has x's dtype.
"""
import torch

from .dispatch import HAS_TRITON, check_launchable, launcher, run
from .prediction import PREDICTION_TYPES, predict_x0_eps

PRED_TYPES = {p: i for i, p in enumerate(PREDICTION_TYPES)}  # the kernel's PRED branches: 0 ε, 1 v, 2 x0

if HAS_TRITON:
    import triton
    import triton.language as tl

    # no FMA contraction: each op rounds like torch's separate IEEE kernels and NumPy (exact parity on GPU)
    _OPTS = dict(enable_fp_fusion=False)

    @triton.jit
    def _fused_step_kernel(eps_ptr, x_ptr, bg_ptr, w_ptr, out_ptr, g_ptr, at_ptr, ap_ptr, g_val,
                           N, C, HW, g_stride, a_stride,
                           PRED: tl.constexpr, G_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < HW

        a_t = tl.load(at_ptr + b * a_stride)
        a_p = tl.load(ap_ptr + b * a_stride)
        if G_IS_PTR:
            g = tl.load(g_ptr + b * g_stride)
        else:
            g = g_val
        # correctly rounded sqrt/div so the GPU agrees with torch's IEEE results, not just within 2 ulp
        sa = tl.sqrt_rn(a_t)
        sb = tl.sqrt_rn(1.0 - a_t)
        spa = tl.sqrt_rn(a_p)
        spb = tl.sqrt_rn(1.0 - a_p)

        w_base = w_ptr + b * N * HW
        den = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(N):
            den += tl.load(w_base + i * HW + offs, mask=m, other=0.0).to(tl.float32)
        w_bg = tl.minimum(tl.maximum(1.0 - den, 0.0), 1.0)

        e_base = eps_ptr + b * (N + 1) * C * HW
        for c in range(C):
            xo = (b * C + c) * HW + offs
            x = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32)
            bg = tl.load(bg_ptr + xo, mask=m, other=0.0).to(tl.float32)
            eu = tl.load(e_base + c * HW + offs, mask=m, other=0.0).to(tl.float32)
            num = tl.zeros([BLOCK], dtype=tl.float32)
            for i in range(N):
                w = tl.load(w_base + i * HW + offs, mask=m, other=0.0).to(tl.float32)
                et = tl.load(e_base + ((1 + i) * C + c) * HW + offs, mask=m, other=0.0).to(tl.float32)
                e = eu + g * (et - eu)
                if PRED == 0:  # epsilon
                    x0 = tl.div_rn(x - sb * e, sa)
                    ep = e
                elif PRED == 1:  # v_prediction
                    x0 = sa * x - sb * e
                    ep = sa * e + sb * x
                else:  # sample
                    x0 = e
                    ep = tl.div_rn(x - sa * e, sb)
                y = spa * x0 + spb * ep
                num += tl.where(w > 0, w * y, 0.0)
            res = tl.where(den > 1.0, tl.div_rn(num, tl.maximum(den, 1.0)), num + w_bg * bg)
            tl.store(out_ptr + xo, res.to(out_ptr.dtype.element_ty), mask=m)


def _coef(v, B: int, device) -> torch.Tensor:
    """A per-image coefficient as a flat fp32 device tensor of 1 or B entries (no host sync)."""
    t = torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() not in (1, B):
        raise ValueError(f"expected a scalar or ({B},) coefficient, got {tuple(t.shape)}")
    return t


def _check(eps, x, bg, weights, prediction_type):
    if prediction_type not in PRED_TYPES:
        raise ValueError(f"prediction_type must be one of {tuple(PRED_TYPES)}, got {prediction_type!r}")
    if x.dim() != 4 or eps.dim() != 5:
        raise ValueError(f"expected eps (B, 1+N, C, h, w) and x (B, C, h, w), got {tuple(eps.shape)}, "
                         f"{tuple(x.shape)}")
    B, C, h, w = x.shape
    N = eps.shape[1] - 1
    if N < 1 or eps.shape != (B, N + 1, C, h, w):
        raise ValueError(f"eps {tuple(eps.shape)} does not match x {tuple(x.shape)} with N >= 1 regions")
    if bg.shape != x.shape or weights.shape != (B, N, h, w):
        raise ValueError(f"bg {tuple(bg.shape)} must equal x's shape, weights {tuple(weights.shape)} "
                         f"must be {(B, N, h, w)}")
    return B, N, C, h, w


def fused_step_reference(eps, x, bg, weights, guidance, alpha_t, alpha_prev, prediction_type="epsilon"):
    """Torch reference of `fused_step` (same operation order, fp32 math)."""
    B, N, C, h, w = _check(eps, x, bg, weights, prediction_type)
    col = lambda v: _coef(v, B, x.device).reshape(-1, 1, 1, 1)  # noqa: E731  (1 or B, 1, 1, 1)
    a_t, a_p = col(alpha_t), col(alpha_prev)
    g = col(guidance) if isinstance(guidance, torch.Tensor) else float(guidance)
    e, xf = eps.float(), x.float()
    sa_p, sb_p = a_p ** 0.5, (1 - a_p) ** 0.5
    ys = []
    for i in range(N):
        e_i = e[:, 0] + g * (e[:, 1 + i] - e[:, 0])
        x0, ep = predict_x0_eps(e_i, xf, a_t, prediction_type)
        ys.append(sa_p * x0 + sb_p * ep)
    return fuse(torch.stack(ys, 1), bg, weights).to(x.dtype)


def fuse(y: torch.Tensor, bg: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The fusion half of fused_step in torch, for region results y (B, N, C, h, w) from any sampler step:
    (Σ_i W_i y_i + W_bg bg) / (Σ_i W_i + W_bg) as in the module docstring (no division where Σ W ≤ 1, so a
    pixel with W = 0 is bg bit for bit). bg (B, C, h, w), weights (B, N, h, w); fp32 math and result."""
    W, yf, bgf = weights.float(), y.float(), bg.float()
    num = torch.zeros_like(bgf)
    den = torch.zeros_like(W[:, :1])
    for i in range(y.shape[1]):
        w_i = W[:, i:i + 1]
        num = num + torch.where(w_i > 0, w_i * yf[:, i], 0.0)
        den = den + w_i
    w_bg = (1 - den).clamp(0, 1)
    return torch.where(den > 1, num / den.clamp(min=1), num + w_bg * bgf)


@launcher
def fused_step_triton(eps, x, bg, weights, guidance, alpha_t, alpha_prev, prediction_type="epsilon",
                      out=None, block: int | None = None):
    """Launcher of the Triton kernel; `out` (like x) may be given, e.g. pre-poisoned by tests."""
    B, N, C, h, w = _check(eps, x, bg, weights, prediction_type)
    check_launchable(_fused_step_kernel, x)
    eps, x, bg, weights = (t.contiguous() for t in (eps, x, bg, weights))
    a_t, a_p = _coef(alpha_t, B, x.device), _coef(alpha_prev, B, x.device)
    if a_t.numel() != a_p.numel():  # one stride serves both
        a_t, a_p = a_t.expand(B).contiguous(), a_p.expand(B).contiguous()
    if isinstance(guidance, torch.Tensor):
        g_t, g_val, g_is_ptr = _coef(guidance, B, x.device), 0.0, True
    else:
        g_t, g_val, g_is_ptr = a_t, float(guidance), False
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == x.dtype
    HW = h * w
    block = block or (512 if x.is_cuda else 4096)  # the interpreter's cost is per op, not per element
    grid = (triton.cdiv(HW, block), B)
    _fused_step_kernel[grid](eps, x, bg, weights, out, g_t, a_t, a_p, g_val, N, C, HW,
                             int(g_t.numel() > 1), int(a_t.numel() > 1),
                             PRED=PRED_TYPES[prediction_type], G_IS_PTR=g_is_ptr, BLOCK=block, **_OPTS)
    return out


def fused_step(eps, x, bg, weights, guidance, alpha_t, alpha_prev, prediction_type="epsilon", impl="auto",
               out=None):
    """x_prev (B, C, h, w), dtype of x, from eps (B, 1+N, C, h, w) = [uncond, targets] at x (B, C, h, w),
    the background bg (B, C, h, w) at the new level, weights (B, N, h, w) in [0, 1], guidance g (float or
    (B,) tensor), ᾱ_t and ᾱ_prev (0-d or (B,) fp32 device tensors). See the module docstring."""
    return run(impl, fused_step_triton, fused_step_reference,
               (eps, x, bg, weights, guidance, alpha_t, alpha_prev, prediction_type), out)
