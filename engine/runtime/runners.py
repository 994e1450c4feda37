"""The runners: m.unet (or a flow model's m.transformer) and m.vae as the engine calls them, the one place a
denoiser or VAE batch is split to fit memory (no algorithm takes a batch size). DenoiserRunner splits and pads
calls to compiled batch-size buckets, UNetRunner and TransformerRunner give it their model's signature;
VAERunner tiles large images and redoes a non-finite low-precision decode in fp32.
"""
import copy

import torch
import torch.nn as nn

from ..edit import toolkit


class SizeLimit:
    """The per-size batch limit both runners share: max_batch is None (one call), an int, or a function
    (h, w) -> int of the free memory at that size, evaluated once per size (cached in `limits`, which the
    Editor reports). The runner's __init__ sets both attributes."""

    max_batch: object
    limits: dict

    def limit(self, h: int, w: int) -> int | None:
        """Samples per call at size h×w (latent for the UNet, pixels for the VAE); None: no split."""
        if self.max_batch is None or isinstance(self.max_batch, int):
            return self.max_batch
        if (h, w) not in self.limits:
            self.limits[(h, w)] = int(self.max_batch(h, w))
        return self.limits[(h, w)]


# How a conditioning argument follows the batch when the runner splits or pads it:
SAMPLE = "sample"  # one row per sample (context, pooled, text_embeds): split with x, padded with zeros
SHARED = "shared"  # (B, ...) rows per sample when B > 1 (time_ids, guidance), else broadcast as it is: split
                   # when per sample, padded with its last row
TIME = "time"      # the timestep: as SHARED, and a (B,) t is padded even at B = 1 (one graph per bucket)


class DenoiserRunner(SizeLimit, nn.Module):
    """The one place a denoiser batch (UNet or flow transformer) is split and padded; UNetRunner and
    TransformerRunner only map their model's call signature onto `run`. max_batch: samples per call, an int,
    or a function (h, w) -> int evaluated once per latent shape (free memory at that shape); None: one call.
    buckets: with static-shape compilation every distinct batch size is a compile (about a minute for the SD
    UNet); a call's batch is padded up to the next bucket (zeros, the output sliced back), so a job's many
    batch sizes share a few graphs. With CUDA graphs the compiled function's outputs live in graph-owned
    memory that the next replay overwrites: they are cloned."""

    def __init__(self, module, fn=None, channels_last: bool = False, cudagraphs: bool = False,
                 buckets: tuple | None = None, max_batch=None):
        super().__init__()
        self.module = module
        self.fn = module if fn is None else fn
        self.channels_last, self.cudagraphs = channels_last, cudagraphs
        self.buckets = tuple(sorted(buckets)) if buckets else None
        self.max_batch = max_batch
        self.limits: dict = {}

    @property
    def config(self):
        return self.module.config

    def run(self, x, t, args: tuple = (), kwargs: dict | None = None):
        """fn(x, t, *args, **kwargs) in calls of at most limit(h, w) samples. args: ((tensor, policy), ...),
        kwargs: {name: (tensor, policy)}, policy SAMPLE or SHARED (module constants)."""
        if not torch.is_tensor(t):  # a python number would be baked into the graph: one recompile per value
            t = torch.tensor(t, device=x.device)
        kwargs = kwargs or {}
        conds = [(t, TIME), *args, *kwargs.values()]
        names = list(kwargs)
        B = x.shape[0]
        n = self.limit(*x.shape[-2:])
        if n and B > n:
            return torch.cat([self._call(x[i:i + n], [(_take(v, p, i, n, B), p) for v, p in conds], names, n)
                              for i in range(0, B, n)])
        return self._call(x, conds, names, n)

    def _call(self, x, conds: list, names: list, limit=None):
        B = x.shape[0]
        pad = 0
        if self.buckets and B <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= B)
            pad = bucket - B if limit is None or bucket <= limit else 0  # never pad past what memory allows
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            conds = [(_padded(v, p, pad, B), p) for v, p in conds]
        # Dense inputs: compiled graphs guard on strides, so an expanded (stride-0) batch from the callers'
        # broadcasts would be a recompile (a minute on the SD UNet) and, with CUDA graphs, a second graph.
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        t, *vals = [v.contiguous() for v, _ in conds]
        k = len(vals) - len(names)
        args, kwargs = vals[:k], dict(zip(names, vals[k:]))
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            out = self.fn(x, t, *args, **kwargs)
            return (out[:B] if pad else out).clone()
        out = self.fn(x, t, *args, **kwargs)
        return out[:B] if pad else out


class UNetRunner(DenoiserRunner):
    """m.unet's call signature over the optimised (possibly compiled) UNet. SD-XL's text_embeds (B, P) are
    split and padded as the context is; time_ids (1, 6) broadcast to every sample and stay (1, 6) (one graph
    per bucket), (B, 6) ones are split and padded with their last row. SD 1.x/2.x calls are fn(x, t, ctx)."""

    def forward(self, x, t, ctx, text_embeds=None, time_ids=None):
        added = () if text_embeds is None else ((text_embeds, SAMPLE), (time_ids, SHARED))
        return self.run(x, t, ((ctx, SAMPLE), *added))


class TransformerRunner(DenoiserRunner):
    """m.transformer's call signature (SD 3.x MMDiT, FLUX.1) over the optimised (possibly compiled) flow
    transformer: (x, t, context, pooled, guidance=None) -> velocity. context and pooled are split and padded
    per sample; FLUX.1-dev's guidance, a number or a (B,) tensor, becomes a tensor (a python float would be a
    graph constant: one compile per value) and follows the batch as the timestep does."""

    def forward(self, x, t, context, pooled, guidance=None):
        kw = {}
        if guidance is not None:
            g = guidance if torch.is_tensor(guidance) else torch.tensor(float(guidance), device=x.device)
            kw["guidance"] = (g.to(x.device, torch.float32), SHARED)
        return self.run(x, t, ((context, SAMPLE), (pooled, SAMPLE)), kw)


def _per_sample(v: torch.Tensor, B: int) -> bool:
    """v has one row per sample of a batch of B > 1 (t (B,), time_ids (B, 6)); else it broadcasts."""
    return v.ndim >= 1 and B > 1 and v.shape[0] == B


def _take(v: torch.Tensor, policy: str, i: int, n: int, B: int) -> torch.Tensor:
    """Rows i:i+n of a conditioning argument (policy SAMPLE, or per sample), else v as it is."""
    return v[i:i + n] if policy == SAMPLE or _per_sample(v, B) else v


def _padded(v: torch.Tensor, policy: str, pad: int, B: int) -> torch.Tensor:
    """v for a batch padded from B by `pad` samples: zeros (SAMPLE), the last row (per-sample SHARED / TIME),
    or v itself when it broadcasts."""
    if policy == SAMPLE:
        return torch.cat([v, v.new_zeros((pad, *v.shape[1:]))])
    if _per_sample(v, B) or (policy == TIME and v.ndim == 1 and v.shape[0] == B):
        return torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])
    return v


def _ramp(n: int, overlap: int, first: bool, last: bool, device) -> torch.Tensor:
    """Blend weights of one tile along one axis: linear ramps over the overlaps, 1 elsewhere."""
    w = torch.ones(n, device=device)
    r = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
    if not first and overlap:
        w[:overlap] = r
    if not last and overlap:
        w[-overlap:] = r.flip(0)
    return w


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """fn over overlapping tile×tile windows of x (B, C, H, W), blended linearly over the overlaps: the
    output (B, C', H·scale, W·scale) of a function that maps a window to its scaled window (VAE decode:
    scale 8; encode: 1/8). Memory is that of one tile; GroupNorm statistics become per tile, so this runs
    only above a size (VAERunner.tile_above)."""
    H, W = x.shape[-2:]
    step = tile - overlap

    def starts(n):
        s = list(range(0, max(n - tile, 0) + 1, step))
        return s + [n - tile] if s[-1] + tile < n else s

    out = wsum = None
    for i in starts(H):
        for j in starts(W):
            y = fn(x[..., i:i + tile, j:j + tile]).float()
            if out is None:
                out = y.new_zeros((*y.shape[:2], int(H * scale), int(W * scale)))
                wsum = y.new_zeros((1, 1, *out.shape[-2:]))
            th, tw = y.shape[-2:]
            oi, oj, ov = int(i * scale), int(j * scale), int(overlap * scale)
            w = _ramp(th, ov, i == 0, i + tile >= H, y.device)[:, None] * \
                _ramp(tw, ov, j == 0, j + tile >= W, y.device)
            out[..., oi:oi + th, oj:oj + tw] += y * w
            wsum[..., oi:oi + th, oj:oj + tw] += w
    return out / wsum


class VAERunner(SizeLimit, nn.Module):
    """m.vae for the engine: encode/decode split into batches that fit free memory (max_batch: an int or a
    function (H, W) -> int, once per image size), images above `tile_above` pixels encoded/decoded in
    overlapping tiles, and a low-precision encode or decode that is not finite redone in fp32 (decode:
    engine.edit.toolkit.decode_finite; encode: encode_finite here; still not finite: an error, never a black
    image or NaN latents). `fallbacks` counts the fp32 redos of both."""

    def __init__(self, vae, max_batch=None, tile_above: int | None = None, tile: int = 512, overlap: int = 64):
        super().__init__()
        self.vae = vae
        self.max_batch, self.tile_above, self.tile, self.overlap = max_batch, tile_above, tile, overlap
        self.limits: dict = {}
        self.encode_fallbacks = 0
        self._fp32 = None  # the fp32 copy for encode redos, made on first need

    def __getattr__(self, name):  # config etc. of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.vae, name)

    @property
    def fallbacks(self) -> int:
        return toolkit.fallback_count(self.vae) + self.encode_fallbacks

    def encode_finite(self, x):
        """vae.encode(x) -> (mean, logvar), redone by an fp32 copy of the VAE when a low-precision encode is not
        finite (the SD VAE's encoder overflows in fp16 as its decoder does; NaN latents would poison the mask
        pass and the whole trajectory). An fp32 VAE is not checked (no host sync); one check per call otherwise,
        outside every sampling loop. Still not finite in fp32: toolkit.NonFiniteError."""
        p = next(iter(self.vae.parameters()), None)
        dtype = x.dtype if p is None else p.dtype
        out = self.vae.encode(x.to(dtype))
        if dtype == torch.float32 or all(bool(torch.isfinite(v).all()) for v in out):
            return out
        if self._fp32 is None:
            self._fp32 = copy.deepcopy(self.vae).float()
        self.encode_fallbacks += 1
        mean, logvar = self._fp32.encode(x.float())
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(logvar).all())):
            raise toolkit.NonFiniteError("the VAE encode is not finite, in fp32 either: the input image overflowed "
                                         "the encoder")
        return mean, logvar  # fp32: the caller casts to the UNet's dtype (encode_image), past the overflow

    def _sliced(self, fn, x, H, W):
        n = self.limit(H, W) or x.shape[0]
        outs = [fn(x[i:i + n]) for i in range(0, x.shape[0], n)]
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs) if torch.is_tensor(outs[0]) else tuple(torch.cat(o) for o in zip(*outs))

    def _big(self, H, W) -> bool:
        return self.tile_above is not None and H * W > self.tile_above

    def encode(self, img):
        if img.is_cuda:
            img = img.to(memory_format=torch.channels_last)
        H, W = img.shape[-2:]

        def enc(x):
            if not self._big(H, W):
                return self.encode_finite(x)
            both = tiled(lambda t: torch.cat(self.encode_finite(t), 1), x, self.tile, self.overlap, 1 / 8)
            return tuple(v.to(x.dtype) for v in both.chunk(2, 1))
        return self._sliced(enc, img, H, W)

    def decode(self, z):
        H, W = 8 * z.shape[-2], 8 * z.shape[-1]

        def dec(x):
            if not self._big(H, W):
                return toolkit.decode_finite(self.vae, x)
            return tiled(lambda v: toolkit.decode_finite(self.vae, v), x, self.tile // 8, self.overlap // 8, 8)
        return self._sliced(dec, z, H, W)


def pow2_buckets(max_batch: int) -> tuple:
    """1, 2, 4, ... below max_batch, and max_batch: at most log2(max_batch) + 1 graphs, padding < 2x."""
    return tuple(2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch) + (max_batch,)
