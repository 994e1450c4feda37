"""DiffEdit masks for N prompt pairs: noise-difference maps, per-map thresholds, overlap policies.

Stage 1, `noise_maps` (one Triton pass). From the raw UNet output of the mask pass, eps (B, n, P, C, h, w)
(n noise draws, P prompt embeddings: one shared uncond, the sources, the targets), for every pair i:
  e_s = e_u + g (e_src_i − e_u),  e_t = e_u + g (e_tgt_i − e_u),  Δ = e_t − e_s   (CFG as in the decode)
  map_i = mean over n of  l1: mean_C |Δ|   |   l2: sqrt(Σ_C Δ²)          -> (B, N, h, w) fp32
Δ is g (e_tgt − e_src) mathematically; it is computed through the guided predictions, as diffusers does.

Stage 2, `masks_from_maps` (Triton: one program per map for the statistics, one pass over pixels across
the N maps for the overlap policy). Per map: a normalised score s in [0, 1] and a threshold t, `rule`:
  fixed:v      s = min–max normalised map, t = v
  clamp:r      diffusers' rule per map: c = r·mean(map), s = clamp(map, 0, c) / c, t = 0.5
  mean[:k]     min–max, t = k·mean(s) (k = 1 by default)
  median       min–max, t = np.median(s) (mean of the two middle values for an even count)
  otsu         min–max, Otsu's threshold over a 256-bin histogram of s (definition below)
  quantile:q   min–max, t = np.quantile(s, q) (NumPy's default "linear" method, its exact arithmetic)
Binary b = s > t. A constant map (max = min; also under clamp:r) has s = 0 everywhere, never NaN.
Otsu: bin j holds the scores in (j/256, (j+1)/256] (bin 0 also holds 0), i.e. j = clamp(ceil(256 s) − 1, 0, 255);
the split "bins ≤ k | bins > k" maximising the between-class variance, computed exactly from integer
counts as (n0·S − S0·n)² / (n0·(n − n0)) (n0, S0: count and Σ bin index up to k; n, S: totals) in fp64,
first maximum on ties, gives t = (k + 1)/256, so s > t is exactly "bin > k". No valid split: t = 1/256.
Means are accumulated in fp64 and rounded to fp32 (so the Triton and torch sums agree). Order statistics
are exact for any map size: a 31-pass bitwise search over the fp32 bit patterns of s (non-negative floats
order like their bit patterns), one program per map, no sort or size limit.

`overlap`:
  argmax    a pixel where any b_i is set goes to the set map with the highest score (ties: lower index);
            binary disjoint weights.
  subtract  the Technion DiffEdit project's rule (Bar & Gelvan, github.com/Technion-Nitzan-Bar-Tuval-Gelvan/
            DiffEdit-Project, code/multi_mask_diff_edit.py, `with_subtract`), on [0, 1] scores instead of
            their uint8 images: for each map i, d = s_i; for j = i+1 .. N−1 in order:
                d = minmax(d − s_j);  d[s_i < 0.5] = s_i[s_i < 0.5]
            (their `below_threshold` is pixel < 128 of 255); the last map is unchanged. The rule's
            threshold statistic is then taken on these scores s' (clamp:r → 0.5); binary weights s' > t.
  average   binary weights b_i; the fusion divides by Σ W, so overlaps average (MultiDiffusion's equal weights).
  soft      weights b_i·s_i: the scores themselves inside the mask.
Returns Masks(weights (B, N, h, w) fp32 in [0, 1], thresholds (B, N) fp32, scores (B, N, h, w) fp32).
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from .dispatch import HAS_TRITON, check_launchable, launcher, run

REDUCTIONS = ("l1", "l2")
OVERLAPS = {"argmax": 0, "average": 1, "subtract": 1, "soft": 2}
NORMS = {"minmax": 0, "clamp": 1, "identity": 2}
STATS = {"fixed": 0, "mean": 1, "quantile": 2, "median": 3, "otsu": 4}
OTSU_BINS = 256
SUBTRACT_LOW = 0.5  # the Technion rule keeps a map's own score where it is below this


class Masks(NamedTuple):
    weights: torch.Tensor     # (B, N, h, w) fp32
    thresholds: torch.Tensor  # (B, N) fp32
    scores: torch.Tensor      # (B, N, h, w) fp32, the normalised maps that were thresholded


class Rule(NamedTuple):
    norm: str
    norm_param: float
    stat: str
    stat_param: float


def parse_rule(rule: str) -> Rule:
    """'fixed:v' | 'clamp:r' | 'mean' | 'mean:k' | 'median' | 'otsu' | 'quantile:q' -> Rule."""
    name, _, arg = str(rule).strip().partition(":")
    try:
        val = float(arg) if arg else None
    except ValueError:
        raise ValueError(f"bad threshold rule {rule!r}: {arg!r} is not a number") from None
    if name in ("median", "otsu") and val is None:
        return Rule("minmax", 0.0, name, 0.0)
    if name == "mean":
        return Rule("minmax", 0.0, "mean", 1.0 if val is None else val)
    if name == "fixed" and val is not None:
        return Rule("minmax", 0.0, "fixed", val)
    if name == "clamp" and val is not None and val > 0:
        return Rule("clamp", val, "fixed", 0.5)
    if name == "quantile" and val is not None and 0.0 <= val <= 1.0:
        return Rule("minmax", 0.0, "quantile", val)
    raise ValueError(f"bad threshold rule {rule!r}: expected fixed:v, clamp:r (r > 0), mean[:k], median, otsu "
                     f"or quantile:q (0 <= q <= 1)")


def _order_params(hw: int, rule: Rule):
    """(k_lo, k_hi, gamma, 1 − gamma, gamma >= 0.5) of the rule's order statistic on hw values, with
    NumPy's float64 index arithmetic and its fp32 rounding of the weights (np.quantile 'linear', np.median)."""
    if rule.stat == "median":
        return (hw - 1) // 2, hw // 2, 0.0, 0.0, False
    if rule.stat != "quantile":
        return 0, 0, 0.0, 0.0, False
    q = rule.stat_param
    v = hw * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index with alpha = beta = 1
    prev = math.floor(v)
    gamma = v - prev
    if v >= hw - 1:
        lo = hi = hw - 1
    elif v < 0:
        lo = hi = 0
    else:
        lo, hi = prev, prev + 1
    return lo, hi, float(np.float32(gamma)), float(np.float32(1 - gamma)), gamma >= 0.5


# ---------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    # no FMA contraction: each op rounds like torch's separate IEEE kernels and NumPy (exact parity on GPU)
    _OPTS = dict(enable_fp_fusion=False)

    @triton.jit
    def _noise_maps_kernel(eps_ptr, src_ptr, tgt_ptr, out_ptr, g_ptr, g_val, uncond, n, P, C, HW, N, g_stride, n_f, C_f,
                           L2: tl.constexpr, G_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        i = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < HW
        if G_IS_PTR:
            g = tl.load(g_ptr + b * g_stride)
        else:
            g = g_val
        si = tl.load(src_ptr + i).to(tl.int64)
        ti = tl.load(tgt_ptr + i).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(n):
            base = eps_ptr + (b * n + k) * P * C * HW
            part = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(C):
                eu = tl.load(base + (uncond * C + c) * HW + offs, mask=m, other=0.0).to(tl.float32)
                es = tl.load(base + (si * C + c) * HW + offs, mask=m, other=0.0).to(tl.float32)
                et = tl.load(base + (ti * C + c) * HW + offs, mask=m, other=0.0).to(tl.float32)
                d = (eu + g * (et - eu)) - (eu + g * (es - eu))
                if L2:
                    part += d * d
                else:
                    part += tl.abs(d)
            if L2:
                part = tl.sqrt_rn(part)
            else:
                part = tl.div_rn(part, C_f)
            acc += part
        acc = tl.div_rn(acc, n_f)
        tl.store(out_ptr + (b * N + i) * HW + offs, acc, mask=m)

    @triton.jit
    def _score(x, lo, c, NORM: tl.constexpr):
        """The normalised score of raw values x: (x − lo)/c (min–max), clamp(x, 0, c)/c, or x itself."""
        if NORM == 0:
            s = tl.where(c > 0, tl.div_rn(x - lo, tl.where(c > 0, c, 1.0)), 0.0)
        elif NORM == 1:
            s = tl.where(c > 0, tl.div_rn(tl.minimum(tl.maximum(x, 0.0), c), tl.where(c > 0, c, 1.0)), 0.0)
        else:
            s = x
        return tl.where(s == 0, 0.0, s)  # −0 → +0 so bit patterns order like the values

    @triton.jit
    def _kth_key(row_ptr, HW, lo, c, k, NORM: tl.constexpr, BLOCK: tl.constexpr):
        """Bit pattern of the k-th smallest score (0-based): the largest v with #(key < v) ≤ k, bit by bit."""
        ar = tl.arange(0, BLOCK)
        prefix = tl.full([], 0, tl.int32)
        for j in range(31):
            cand = prefix | (1 << (30 - j))
            cnt = tl.full([], 0, tl.int32)
            for start in range(0, HW, BLOCK):
                offs = start + ar
                m = offs < HW
                s = _score(tl.load(row_ptr + offs, mask=m, other=0.0), lo, c, NORM)
                key = s.to(tl.int32, bitcast=True)
                cnt += tl.sum((m & (key < cand)).to(tl.int32), 0)
            prefix = tl.where(cnt <= k, cand, prefix)
        return prefix

    @triton.jit
    def _map_stats_kernel(x_ptr, s_ptr, t_ptr, HW, norm_param, t_param, k_lo, k_hi, q_g, q_g1, q_ge,
                          NORM: tl.constexpr, STAT: tl.constexpr, WRITE_S: tl.constexpr,
                          BLOCK: tl.constexpr, HBLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * HW
        ar = tl.arange(0, BLOCK)
        # pass 1: the normalisation's statistics of the raw map
        mn = tl.full([], float("inf"), tl.float32)
        mx = tl.full([], float("-inf"), tl.float32)
        sm = tl.full([], 0.0, tl.float64)
        for start in range(0, HW, BLOCK):
            offs = start + ar
            m = offs < HW
            x = tl.load(x_row + offs, mask=m, other=0.0)
            mn = tl.minimum(mn, tl.min(tl.where(m, x, float("inf")), 0))
            mx = tl.maximum(mx, tl.max(tl.where(m, x, float("-inf")), 0))
            sm += tl.sum(tl.where(m, x, 0.0).to(tl.float64), 0)
        if NORM == 0:
            lo = mn
            c = mx - mn
        else:
            lo = mn * 0.0
            c = (sm / HW).to(tl.float32) * norm_param
            c = tl.where(mx > mn, c, 0.0)  # a constant map scores 0, as under min–max
        if WRITE_S:
            for start in range(0, HW, BLOCK):
                offs = start + ar
                m = offs < HW
                s = _score(tl.load(x_row + offs, mask=m, other=0.0), lo, c, NORM)
                tl.store(s_ptr + row * HW + offs, s, mask=m)
        # the threshold
        if STAT == 0:
            t = tl.full([], 0.0, tl.float32) + t_param
        elif STAT == 1:
            ss = tl.full([], 0.0, tl.float64)
            for start in range(0, HW, BLOCK):
                offs = start + ar
                m = offs < HW
                s = _score(tl.load(x_row + offs, mask=m, other=0.0), lo, c, NORM)
                ss += tl.sum(tl.where(m, s, 0.0).to(tl.float64), 0)
            t = (ss / HW).to(tl.float32) * t_param
        elif STAT == 4:
            bins = tl.arange(0, 256)
            hb = tl.arange(0, HBLOCK)
            counts = tl.zeros([256], dtype=tl.int32)
            for start in range(0, HW, HBLOCK):
                offs = start + hb
                m = offs < HW
                s = _score(tl.load(x_row + offs, mask=m, other=0.0), lo, c, NORM)
                idx = tl.minimum(tl.maximum(tl.ceil(s * 256.0).to(tl.int32) - 1, 0), 255)
                idx = tl.where(m, idx, -1)
                counts += tl.sum((idx[:, None] == bins[None, :]).to(tl.int32), 0)
            cnt = counts.to(tl.int64)
            n0 = tl.cumsum(cnt, 0)
            s0 = tl.cumsum(cnt * bins.to(tl.int64), 0)
            n_tot = tl.sum(cnt, 0)
            s_tot = tl.sum(cnt * bins.to(tl.int64), 0)
            num = (n0 * s_tot - s0 * n_tot).to(tl.float64)
            valid = (n0 > 0) & (n0 < n_tot)
            den = tl.where(valid, n0 * (n_tot - n0), 1).to(tl.float64)
            crit = tl.where(valid, num * num / den, -1.0)
            best = tl.argmax(crit, 0, tie_break_left=True)
            t = (best + 1).to(tl.float32) / 256.0
        else:  # order statistics: median (STAT 3) or quantile (STAT 2)
            ka = _kth_key(x_row, HW, lo, c, k_lo, NORM, BLOCK)
            # the next order statistic: ka itself if more than k_hi values are <= it, else the next key above
            le = tl.full([], 0, tl.int32)
            nxt = tl.full([], 0x7FFFFFFF, tl.int32)
            for start in range(0, HW, BLOCK):
                offs = start + ar
                m = offs < HW
                key = _score(tl.load(x_row + offs, mask=m, other=0.0), lo, c, NORM).to(tl.int32, bitcast=True)
                le += tl.sum((m & (key <= ka)).to(tl.int32), 0)
                nxt = tl.minimum(nxt, tl.min(tl.where(m & (key > ka), key, 0x7FFFFFFF), 0))
            kb = tl.where(le > k_hi, ka, nxt)
            a = ka.to(tl.float32, bitcast=True)
            b = kb.to(tl.float32, bitcast=True)
            if STAT == 3:
                t = (a + b) * 0.5
            else:
                diff = b - a
                t = tl.where(q_ge != 0, b - diff * q_g1, a + diff * q_g)
        tl.store(t_ptr + row, t)

    @triton.jit
    def _subtract_kernel(s_ptr, sp_ptr, N, HW, LOW: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        i = pid % N  # int32 like N: the loop bounds below share one type
        row = pid.to(tl.int64)
        s_row = s_ptr + row * HW
        sp_row = sp_ptr + row * HW
        ar = tl.arange(0, BLOCK)
        for start in range(0, HW, BLOCK):
            offs = start + ar
            m = offs < HW
            tl.store(sp_row + offs, tl.load(s_row + offs, mask=m, other=0.0), mask=m)
        for jj in range(i + 1, N):
            tl.debug_barrier()
            sj_row = s_row + (jj - i) * HW
            mn = tl.full([], float("inf"), tl.float32)
            mx = tl.full([], float("-inf"), tl.float32)
            for start in range(0, HW, BLOCK):
                offs = start + ar
                m = offs < HW
                e = tl.load(sp_row + offs, mask=m, other=0.0) - tl.load(sj_row + offs, mask=m, other=0.0)
                mn = tl.minimum(mn, tl.min(tl.where(m, e, float("inf")), 0))
                mx = tl.maximum(mx, tl.max(tl.where(m, e, float("-inf")), 0))
            rng = mx - mn
            tl.debug_barrier()
            for start in range(0, HW, BLOCK):
                offs = start + ar
                m = offs < HW
                si = tl.load(s_row + offs, mask=m, other=0.0)
                e = tl.load(sp_row + offs, mask=m, other=0.0) - tl.load(sj_row + offs, mask=m, other=0.0)
                d = tl.where(rng > 0, tl.div_rn(e - mn, tl.where(rng > 0, rng, 1.0)), 0.0)
                tl.store(sp_row + offs, tl.where(si < LOW, si, d), mask=m)

    @triton.jit
    def _overlap_kernel(s_ptr, t_ptr, w_ptr, N, HW, POLICY: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < HW
        base = b * N * HW
        if POLICY == 0:  # argmax among the set maps, ties to the lower index
            best = tl.full([BLOCK], -1.0, tl.float32)
            best_i = tl.full([BLOCK], -1, tl.int32)
            for i in range(N):
                s = tl.load(s_ptr + base + i * HW + offs, mask=m, other=0.0)
                t = tl.load(t_ptr + b * N + i)
                sel = (s > t) & (s > best)
                best = tl.where(sel, s, best)
                best_i = tl.where(sel, i, best_i)
            for i in range(N):
                tl.store(w_ptr + base + i * HW + offs, (best_i == i).to(tl.float32), mask=m)
        else:
            for i in range(N):
                s = tl.load(s_ptr + base + i * HW + offs, mask=m, other=0.0)
                t = tl.load(t_ptr + b * N + i)
                if POLICY == 1:
                    w = (s > t).to(tl.float32)
                else:
                    w = tl.where(s > t, s, 0.0)
                tl.store(w_ptr + base + i * HW + offs, w, mask=m)
else:
    _noise_maps_kernel = _map_stats_kernel = _subtract_kernel = _overlap_kernel = None


# ---------------------------------------------------------------------------------------------- checks
def _check_eps(eps, uncond_idx, src_idx, tgt_idx, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if eps.dim() != 6:
        raise ValueError(f"eps must be (B, n, P, C, h, w), got {tuple(eps.shape)}")
    P = eps.shape[2]
    src = torch.as_tensor(src_idx, dtype=torch.long).reshape(-1).cpu()  # indices are host data anyway
    tgt = torch.as_tensor(tgt_idx, dtype=torch.long).reshape(-1).cpu()
    if src.numel() != tgt.numel() or src.numel() == 0:
        raise ValueError(f"src_idx and tgt_idx must be (N,) with N >= 1, got {src.numel()} and {tgt.numel()}")
    for v in [int(uncond_idx), *src.tolist(), *tgt.tolist()]:
        if not 0 <= v < P:
            raise ValueError(f"prompt index {v} out of range for P = {P}")
    return src, tgt


def _check_maps(maps, overlap):
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {tuple(OVERLAPS)}, got {overlap!r}")
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, N, h, w), got {tuple(maps.shape)}")


# ---------------------------------------------------------------------------------------------- torch references
def noise_maps_reference(eps, uncond_idx, src_idx, tgt_idx, guidance, reduction="l1"):
    """Torch reference of `noise_maps`."""
    src, tgt = _check_eps(eps, uncond_idx, src_idx, tgt_idx, reduction)
    e = eps.float()
    B = e.shape[0]
    g = guidance.float().reshape(-1, 1, 1, 1, 1, 1) if isinstance(guidance, torch.Tensor) else float(guidance)
    if isinstance(g, torch.Tensor) and g.numel() not in (1, B):
        raise ValueError(f"guidance must be a scalar or ({B},)")
    eu = e[:, :, int(uncond_idx)].unsqueeze(2)  # (B, n, 1, C, h, w)
    es, et = e[:, :, src.to(e.device)], e[:, :, tgt.to(e.device)]  # (B, n, N, C, h, w)
    d = (eu + g * (et - eu)) - (eu + g * (es - eu))
    per_draw = d.abs().sum(3) / e.shape[3] if reduction == "l1" else d.mul(d).sum(3).sqrt()
    return per_draw.sum(1) / e.shape[1]


def _normalise_reference(m, norm, norm_param):
    """(R, HW) raw maps -> scores, as `_score` in the kernel."""
    if norm == "minmax":
        lo = m.amin(1, keepdim=True)
        c = m.amax(1, keepdim=True) - lo
        s = torch.where(c > 0, (m - lo) / torch.where(c > 0, c, 1.0), 0.0)
    elif norm == "clamp":
        c = (m.double().sum(1, keepdim=True) / m.shape[1]).float() * np.float32(norm_param)
        c = torch.where(m.amax(1, keepdim=True) > m.amin(1, keepdim=True), c, 0.0)  # constant map -> 0
        s = torch.where(c > 0, torch.minimum(torch.maximum(m, torch.zeros_like(m)), c) / torch.where(c > 0, c, 1.0),
                        0.0)
    else:
        s = m
    return torch.where(s == 0, 0.0, s)


def _threshold_reference(s, rule):
    """(R, HW) scores -> (R,) thresholds by the rule's statistic."""
    R, HW = s.shape
    if rule.stat == "fixed":
        return torch.full((R,), np.float32(rule.stat_param), device=s.device)
    if rule.stat == "mean":
        return (s.double().sum(1) / HW).float() * np.float32(rule.stat_param)
    if rule.stat == "otsu":
        idx = (s * 256.0).ceil().long().sub(1).clamp(0, OTSU_BINS - 1)
        cnt = torch.zeros(R, OTSU_BINS, dtype=torch.long, device=s.device).scatter_add_(1, idx, torch.ones_like(idx))
        bins = torch.arange(OTSU_BINS, device=s.device)
        n0, s0 = cnt.cumsum(1), (cnt * bins).cumsum(1)
        n_tot, s_tot = cnt.sum(1, keepdim=True), (cnt * bins).sum(1, keepdim=True)
        num = (n0 * s_tot - s0 * n_tot).double()
        valid = (n0 > 0) & (n0 < n_tot)
        crit = torch.where(valid, num * num / torch.where(valid, n0 * (n_tot - n0), 1).double(), -1.0)
        return (crit.argmax(1) + 1).float() / 256.0
    k_lo, k_hi, g, g1, ge = _order_params(HW, rule)
    srt = s.sort(1).values
    a, b = srt[:, k_lo], srt[:, k_hi]
    if rule.stat == "median":
        return (a + b) * 0.5
    diff = b - a
    return b - diff * np.float32(g1) if ge else a + diff * np.float32(g)


def _subtract_reference(s):
    """(B, N, HW) scores -> the Technion subtract-and-renormalise scores (module docstring)."""
    out = s.clone()
    N = s.shape[1]
    for i in range(N):
        si = s[:, i]
        d = si
        for j in range(i + 1, N):
            e = d - s[:, j]
            mn = e.amin(1, keepdim=True)
            rng = e.amax(1, keepdim=True) - mn
            d = torch.where(si < SUBTRACT_LOW, si, torch.where(rng > 0, (e - mn) / torch.where(rng > 0, rng, 1.0), 0.0))
        out[:, i] = d
    return out


def resolve_overlaps(on, s, overlap):
    """Overlap policy on given binary masks: on (B, N, ...) bool, s (B, N, ...) scores -> weights. argmax: each
    set pixel to the set mask with the highest score (ties: lower index); average / subtract: the binary masks
    (subtract's scores were subtracted before the threshold); soft: the scores inside the masks. The torch
    reference of the overlap kernel, and engine.regions' policy after a morphological closing."""
    if overlap == "soft":
        return torch.where(on, s, 0.0)
    if overlap in ("average", "subtract"):
        return on.float()
    if overlap != "argmax":
        raise ValueError(f"unknown overlap policy {overlap!r}")
    best = torch.full_like(s[:, 0], -1.0)
    best_i = torch.full_like(s[:, 0], -1, dtype=torch.long)
    for i in range(s.shape[1]):
        sel = on[:, i] & (s[:, i] > best)
        best = torch.where(sel, s[:, i], best)
        best_i = torch.where(sel, i, best_i)
    index = torch.arange(s.shape[1], device=s.device).view(1, -1, *[1] * (s.ndim - 2))
    return (best_i[:, None] == index).float()


def _overlap_reference(s, t, overlap):
    """(B, N, HW) scores, (B, N) thresholds -> weights."""
    return resolve_overlaps(s > t[..., None], s, overlap)


def masks_from_maps_reference(maps, rule="clamp:3", overlap="argmax") -> Masks:
    """Torch reference of `masks_from_maps`."""
    _check_maps(maps, overlap)
    r = parse_rule(rule) if isinstance(rule, str) else rule
    B, N, h, w = maps.shape
    m = maps.float().reshape(B * N, h * w)
    s = _normalise_reference(m, r.norm, r.norm_param)
    if overlap == "subtract":
        s = _subtract_reference(s.reshape(B, N, h * w)).reshape(B * N, h * w)
    t = _threshold_reference(s, r).reshape(B, N)
    wts = _overlap_reference(s.reshape(B, N, h * w), t, overlap)
    return Masks(wts.reshape(B, N, h, w), t, s.reshape(B, N, h, w))


# ---------------------------------------------------------------------------------------------- launchers
@launcher
def noise_maps_triton(eps, uncond_idx, src_idx, tgt_idx, guidance, reduction="l1", out=None, block=None):
    """Launcher of the noise-difference kernel; `out` (B, N, h, w) fp32 may be given (e.g. poisoned)."""
    src, tgt = _check_eps(eps, uncond_idx, src_idx, tgt_idx, reduction)
    check_launchable(_noise_maps_kernel, eps)
    eps = eps.contiguous()
    B, n, P, C, h, w = eps.shape
    N, HW = src.numel(), h * w
    src, tgt = src.to(eps.device, torch.int32), tgt.to(eps.device, torch.int32)
    if isinstance(guidance, torch.Tensor):
        g_t = guidance.to(eps.device, torch.float32).reshape(-1)
        if g_t.numel() not in (1, B):
            raise ValueError(f"guidance must be a scalar or ({B},)")
        g_val, g_ptr = 0.0, True
    else:
        g_t, g_val, g_ptr = src, float(guidance), False
    if out is None:
        out = torch.empty(B, N, h, w, device=eps.device, dtype=torch.float32)
    assert out.shape == (B, N, h, w) and out.dtype == torch.float32 and out.is_contiguous()
    block = block or (256 if eps.is_cuda else 4096)  # the interpreter's cost is per op, not per element
    grid = (triton.cdiv(HW, block), N, B)
    _noise_maps_kernel[grid](eps, src, tgt, out, g_t, g_val, int(uncond_idx), n, P, C, HW, N,
                             int(g_ptr and g_t.numel() > 1), float(n), float(C),
                             L2=reduction == "l2", G_IS_PTR=g_ptr, BLOCK=block, **_OPTS)
    return out


def _stats_launch(x, s_out, t_out, rule: Rule, norm: str, write_s: bool, block: int):
    R, HW = x.shape
    hblock = 64 if x.is_cuda else 256  # the one-hot histogram tile is (hblock, 256)
    k_lo, k_hi, g, g1, ge = _order_params(HW, rule)
    _map_stats_kernel[(R,)](x, s_out, t_out, HW, float(rule.norm_param), float(rule.stat_param), k_lo, k_hi,
                            g, g1, int(ge), NORM=NORMS[norm], STAT=STATS[rule.stat], WRITE_S=write_s,
                            BLOCK=block, HBLOCK=hblock, **_OPTS)


@launcher
def masks_from_maps_triton(maps, rule="clamp:3", overlap="argmax", out=None, block=None) -> Masks:
    """Launcher of the mask kernels; `out` = (weights, thresholds, scores) buffers may be given."""
    _check_maps(maps, overlap)
    check_launchable(_map_stats_kernel, maps)
    r = parse_rule(rule) if isinstance(rule, str) else rule
    B, N, h, w = maps.shape
    HW = h * w
    x = maps.float().contiguous().reshape(B * N, HW)
    block = block or (1024 if maps.is_cuda else 4096)
    if out is None:
        out = Masks(torch.empty_like(maps, dtype=torch.float32),
                    torch.empty(B, N, device=maps.device, dtype=torch.float32),
                    torch.empty_like(maps, dtype=torch.float32))
    wts, t, s = out
    assert wts.shape == s.shape == (B, N, h, w) and t.shape == (B, N)
    assert all(o.is_contiguous() and o.dtype == torch.float32 for o in out)
    if overlap == "subtract":
        s0 = torch.empty_like(x)
        _stats_launch(x, s0, t, r._replace(stat="fixed"), r.norm, True, block)
        _subtract_kernel[(B * N,)](s0, s, N, HW, LOW=SUBTRACT_LOW, BLOCK=block, **_OPTS)
        _stats_launch(s.reshape(B * N, HW), s0, t, r, "identity", False, block)
    else:
        _stats_launch(x, s, t, r, r.norm, True, block)
    _overlap_kernel[(triton.cdiv(HW, block), B)](s, t, wts, N, HW, POLICY=OVERLAPS[overlap], BLOCK=block,
                                                  **_OPTS)
    return Masks(wts, t, s)


# ---------------------------------------------------------------------------------------------- public
def noise_maps(eps, uncond_idx, src_idx, tgt_idx, guidance, reduction="l1", impl="auto", out=None):
    """(B, N, h, w) fp32 noise-difference maps of N (src, tgt) pairs from the mask pass's eps
    (B, n, P, C, h, w); uncond_idx int, src_idx/tgt_idx (N,) indices into P; guidance float or (B,)."""
    return run(impl, noise_maps_triton, noise_maps_reference, (eps, uncond_idx, src_idx, tgt_idx, guidance, reduction),
               out)


def masks_from_maps(maps, rule="clamp:3", overlap="argmax", impl="auto", out=None) -> Masks:
    """Masks(weights, thresholds, scores) of (B, N, h, w) maps by a threshold `rule` and an `overlap`
    policy (module docstring)."""
    return run(impl, masks_from_maps_triton, masks_from_maps_reference, (maps, rule, overlap), out)
