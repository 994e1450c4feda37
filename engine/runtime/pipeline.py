"""Editor: load once, optimise from outside the model code, edit many images.

Every optimisation is applied to a loaded model by `optimize`, never inside a module's forward:
  - dtype: fp16 on CUDA (the VAE decode falls back to an fp32 copy when an fp16 decode is not finite — the
    SD VAE is known to overflow); SD2's attention upcast stays where its config asks (engine.unet does it);
  - fused projections: self-attention's to_q/to_k/to_v become one Linear, cross-attention's to_k/to_v one
    (one GEMM instead of three; the attention math is the model's own `Attention.attend`);
  - channels_last for the convolutions (CUDA + compile: cuDNN's NHWC kernels; Transformer2D's flatten is free);
  - attention through F.scaled_dot_product_attention (the model's own; flash / mem-efficient on CUDA);
  - the Triton kernels: kernels.dispatch picks them for CUDA tensors by itself;
  - torch.compile of the UNet, fullgraph=True, static shapes (one graph per batch size; a job has three:
    mask pass, inversion, decoding), CUDA graphs through mode="reduce-overhead" on CUDA only; on CPU with
    inductor's freezing (weights prepacked for oneDNN: the compiled UNet is 1.5x eager there, slower without);
  - a compile cache that survives the process (inductor's FX-graph cache and Triton's kernel cache in
    ~/.cache/diffedit-engine), so a second run pays the tracing but not the code generation;
  - warm-up: one short edit at the job's shapes compiles every graph before the timed work.
The sampling loops (engine.diffedit / engine.regions) keep timesteps and coefficients on the device, and
nothing added here syncs with the host inside them.

Memory (the runners own it, no algorithm takes a batch size): UNetRunner splits any UNet batch into calls of
at most max_batch_size samples, computed from free memory for each new latent size (CUDA: 60 % of free
memory over a per-sample estimate, at most 64; CPU: a quarter of available RAM, at most 8); VAERunner encodes and
decodes at most vae_batch_size images per call, likewise per image size (at most 16 / 4), and above
vae_tile_above pixels (1024² by default) in 512² tiles with 64-pixel linear blends. The mask pass (B·n·P
samples, e.g. 240) therefore runs in chunks.

Batching across jobs (`run_batch` / `edit_batch`): jobs with the same image size, pairs and settings are
stacked into one image batch (one UNet call per step for all of them, split by the runner as needed).
"""
import copy
import ctypes
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..edit import toolkit
from ..edit.settings import EditSettings
from ..files.images import as_tensor, crop_to
from ..models.unet import Attention

CACHE_DIR = Path(os.environ.get("DIFFEDIT_CACHE_DIR", Path.home() / ".cache" / "diffedit-engine"))


# ---- model transforms ------------------------------------------------------------------------------------


def _fused_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the given Linears (same input) side by side: weights stacked on the output dim."""
    w = torch.cat([lin.weight for lin in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


class FusedSelfAttention(nn.Module):
    """engine.unet.Attention for self-attention with q, k, v from one GEMM: (B, N, 3·inner) split in three."""

    attend = Attention.attend  # the model's attention math (heads split, upcast, SDPA), unchanged

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads, self.upcast = attn.heads, attn.upcast
        self.to_qkv = _fused_linear([attn.to_q, attn.to_k, attn.to_v])
        self.to_out = attn.to_out

    def forward(self, x, ctx=None):
        assert ctx is None, "self-attention takes no context"
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out[0](self.attend(q, k, v))


class FusedCrossAttention(nn.Module):
    """engine.unet.Attention for cross-attention with k, v of the text from one GEMM."""

    attend = Attention.attend

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads, self.upcast = attn.heads, attn.upcast
        self.to_q = attn.to_q
        self.to_kv = _fused_linear([attn.to_k, attn.to_v])
        self.to_out = attn.to_out

    def forward(self, x, ctx):
        k, v = self.to_kv(ctx).chunk(2, dim=-1)
        return self.to_out[0](self.attend(self.to_q(x), k, v))


def fuse_qkv(unet: nn.Module) -> int:
    """Replace, in place, every transformer block's attn1 (self) and attn2 (cross) by the fused modules
    (the diffusers names: attn1 is always self-attention). Returns the number of modules replaced."""
    n = 0
    for block in unet.modules():
        for name, cls in (("attn1", FusedSelfAttention), ("attn2", FusedCrossAttention)):
            attn = getattr(block, name, None)
            if type(attn) is Attention:
                setattr(block, name, cls(attn))
                n += 1
    return n


class UNetRunner(nn.Module):
    """m.unet's call signature over the optimised (possibly compiled) UNet; the one place a UNet batch is
    split. max_batch: samples per call, an int, or a function (h, w) -> int evaluated once per latent shape
    (free memory at that shape); None: one call. buckets: with static-shape compilation every distinct batch
    size is a compile (about a minute for the SD UNet); a call's batch is padded up to the next bucket (zeros,
    the output sliced back), so a job's many batch sizes share a few graphs. With CUDA graphs the compiled
    function's outputs live in graph-owned memory that the next replay overwrites: they are cloned.
    SD-XL's text_embeds (B, P) are split and padded as the context is; time_ids (1, 6) broadcast to every
    sample and stay (1, 6) (one graph per bucket), (B, 6) ones are split and padded with their last row.
    SD 1.x/2.x calls are fn(x, t, ctx), exactly as before."""

    def __init__(self, unet, fn=None, channels_last: bool = False, cudagraphs: bool = False,
                 buckets: tuple | None = None, max_batch=None):
        super().__init__()
        self.module = unet
        self.fn = unet if fn is None else fn
        self.channels_last, self.cudagraphs = channels_last, cudagraphs
        self.buckets = tuple(sorted(buckets)) if buckets else None
        self.max_batch = max_batch
        self.limits: dict = {}  # (h, w) -> samples per call

    @property
    def config(self):
        return self.module.config

    def limit(self, h: int, w: int) -> int | None:
        if self.max_batch is None or isinstance(self.max_batch, int):
            return self.max_batch
        if (h, w) not in self.limits:
            self.limits[(h, w)] = int(self.max_batch(h, w))
        return self.limits[(h, w)]

    def forward(self, x, t, ctx, text_embeds=None, time_ids=None):
        if not torch.is_tensor(t):  # a python number would be baked into the graph: one recompile per value
            t = torch.tensor(t, device=x.device)
        added = () if text_embeds is None else (text_embeds, time_ids)
        B = x.shape[0]
        n = self.limit(*x.shape[-2:])
        if n and B > n:
            return torch.cat([self._call(x[i:i + n], _rows(t, i, n, B), ctx[i:i + n],
                                         tuple(_rows(v, i, n, B) for v in added), n) for i in range(0, B, n)])
        return self._call(x, t, ctx, added, n)

    def _call(self, x, t, ctx, added=(), limit=None):
        B = x.shape[0]
        pad = 0
        if self.buckets and B <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= B)
            pad = bucket - B if limit is None or bucket <= limit else 0  # never pad past what memory allows
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            ctx = torch.cat([ctx, ctx.new_zeros((pad, *ctx.shape[1:]))])
            if t.ndim == 1 and t.shape[0] == B:
                t = torch.cat([t, t[-1:].expand(pad)])
            if added:  # text_embeds: zeros as the context; time_ids: (1, 6) as they are, or the last row
                emb, ids = added
                if _per_sample(ids, B):
                    ids = torch.cat([ids, ids[-1:].expand(pad, *ids.shape[1:])])
                added = (torch.cat([emb, emb.new_zeros((pad, *emb.shape[1:]))]), ids)
        # Dense inputs: compiled graphs guard on strides, so an expanded (stride-0) batch from the callers'
        # broadcasts would be a recompile (a minute on the SD UNet) and, with CUDA graphs, a second graph.
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        ctx = ctx.contiguous()
        added = tuple(v.contiguous() for v in added)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            out = self.fn(x, t, ctx, *added)
            return (out[:B] if pad else out).clone()
        out = self.fn(x, t, ctx, *added)
        return out[:B] if pad else out


def _per_sample(v: torch.Tensor, B: int) -> bool:
    """v has one row per sample of a batch of B > 1 (t (B,), time_ids (B, 6)); else it broadcasts."""
    return v.ndim >= 1 and B > 1 and v.shape[0] == B


def _rows(v: torch.Tensor, i: int, n: int, B: int) -> torch.Tensor:
    return v[i:i + n] if _per_sample(v, B) else v



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


class VAERunner(nn.Module):
    """m.vae for the engine: encode/decode split into batches that fit free memory (max_batch: an int or a
    function (H, W) -> int, once per image size), images above `tile_above` pixels encoded/decoded in
    overlapping tiles, and a low-precision decode that is not finite redone in fp32 (engine.toolkit.
    decode_finite; still not finite: an error, never a black image). `fallbacks` counts the fp32 redos."""

    def __init__(self, vae, max_batch=None, tile_above: int | None = None, tile: int = 512, overlap: int = 64):
        super().__init__()
        self.vae = vae
        self.max_batch, self.tile_above, self.tile, self.overlap = max_batch, tile_above, tile, overlap
        self.limits: dict = {}

    def __getattr__(self, name):  # config etc. of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.vae, name)

    @property
    def fallbacks(self) -> int:
        return toolkit.fallback_count(self.vae)

    def limit(self, H: int, W: int) -> int | None:
        if self.max_batch is None or isinstance(self.max_batch, int):
            return self.max_batch
        if (H, W) not in self.limits:
            self.limits[(H, W)] = int(self.max_batch(H, W))
        return self.limits[(H, W)]

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
                return self.vae.encode(x)
            both = tiled(lambda t: torch.cat(self.vae.encode(t), 1), x, self.tile, self.overlap, 1 / 8)
            return tuple(v.to(x.dtype) for v in both.chunk(2, 1))
        return self._sliced(enc, img, H, W)

    def decode(self, z):
        H, W = 8 * z.shape[-2], 8 * z.shape[-1]

        def dec(x):
            if not self._big(H, W):
                return toolkit.decode_finite(self.vae, x)
            return tiled(lambda v: toolkit.decode_finite(self.vae, v), x, self.tile // 8, self.overlap // 8, 8)
        return self._sliced(dec, z, H, W)


SafeVAE = VAERunner  # the fp32 fallback's older name


def pow2_buckets(max_batch: int) -> tuple:
    """1, 2, 4, ... below max_batch, and max_batch: at most log2(max_batch) + 1 graphs, padding < 2x."""
    return tuple(2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch) + (max_batch,)


def _is_default_inductor_dir(path: str) -> bool:
    import tempfile

    return Path(path).resolve().parent == Path(tempfile.gettempdir()).resolve() and \
        Path(path).name.startswith("torchinductor_")


def enable_compile_cache(cache_dir: Path | str | None = None) -> Path:
    """Point inductor's and Triton's on-disk caches at a stable folder so a later process reuses the
    generated code (the FX-graph cache key covers the graph, shapes, torch version and config)."""
    root = Path(cache_dir or CACHE_DIR)
    # inductor writes its default (/tmp/torchinductor_USER) into the environment the first time it looks, so
    # that value means "not chosen by the user" and is replaced; any other value set by the user is kept.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir is not None or current is None or _is_default_inductor_dir(current):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    import torch._dynamo.config as dynamo_config

    # Static shapes: one graph per distinct batch size; allow a job's handful (and a batch run's) of them.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def set_freezing(on: bool = True) -> None:
    """inductor's freezing: parameters become constants, so on CPU the convolution and linear weights are
    prepacked for oneDNN and folded. Measured on the SD1.5 UNet (2-core CPU, 32x32, batch 2): compiled 1.32 s
    vs eager 2.0 s with freezing; compiled without it was slower than eager. Freezing is a process-wide
    inductor setting and bypasses the FX-graph cache (the C++ kernel cache still applies: a second process
    compiled in 36 s instead of 58 s); on CUDA it is left off so the cache applies in full."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = on


# ---- memory -> batch size --------------------------------------------------------------------------------


def per_sample_bytes(m, h: int, w: int) -> int:
    """A conservative estimate of one UNet sample's peak activation memory at latent h×w: ~64 tensors of the
    first block's size (skips, GEGLU, norms), plus the full attention matrix when attention is upcast to fp32
    (the math path may materialise it)."""
    c0 = m.unet.config.block_out_channels[0]
    item = torch.finfo(m.dtype).bits // 8
    act = 64 * c0 * h * w * item
    if m.unet.config.upcast_attention:
        act += 10 * (h * w) ** 2 * 4
    return act


def vae_bytes(m, H: int, W: int) -> int:
    """A conservative estimate of one image's peak VAE decoder memory at H×W pixels: ~40 tensors of the last
    (full-resolution) block's size in the VAE's dtype."""
    cfg = getattr(m.vae, "config", None)
    c = min(getattr(cfg, "block_out_channels", (128,)))
    item = torch.finfo(toolkit.vae_dtype(m)).bits // 8
    return 40 * c * H * W * item


def available_ram(meminfo: str) -> float | None:
    """Bytes of RAM available to new allocations from /proc/meminfo's text: MemAvailable (free pages plus the
    page cache and other memory the kernel reclaims on demand), or None when the kernel does not report it."""
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            value, *unit = rest.split()
            return float(value) * (1024 if unit == ["kB"] else 1)
    return None


def free_bytes(device) -> tuple[float, str]:
    """(free bytes, "cuda" | "cpu") of the device: CUDA's free memory, or the RAM available (available_ram).
    Not MemFree (sysconf's SC_AVPHYS_PAGES, used before): once a machine has read a few model folders the page
    cache holds most of its RAM and MemFree sits at the kernel's watermark, 0.2 GB of 23.5 here while 23 GB
    were available, so the CPU runner chose batch 1: every guided step in two UNet calls and the compat mask
    pass in six, 18 % more CPU time per sample than batch 2 (2.72 vs 2.29 s on SD 1.5 at 32x32), and the
    CLI's eager batch ran at 0.91x diffusers (benchmarks/RESULTS.md, compare_cpu_cli)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return float(torch.cuda.mem_get_info(dev)[0]), "cuda"
    try:
        avail = available_ram(Path("/proc/meminfo").read_text())
    except OSError:
        avail = None
    if avail is not None:
        return avail, "cpu"
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "cpu"
    except (ValueError, OSError):
        return float(2 << 30), "cpu"


def max_batch_size(m, h: int, w: int, cap: int | None = None) -> int:
    """UNet samples per call that fit in free memory at latent h×w: CUDA's free memory × 0.6, or on CPU a
    quarter of the available RAM, capped at 64 (CUDA) / 8 (CPU). On CPU a larger batch still pays: SD 1.5 at
    32x32 took 2.72 / 2.29 / 1.73 CPU s per sample at batch 1 / 2 / 6 (2 cores, interleaved)."""
    free, kind = free_bytes(m.device)
    budget, cap = (0.6 * free, cap or 64) if kind == "cuda" else (0.25 * free, cap or 8)
    return int(max(1, min(cap, budget // per_sample_bytes(m, h, w))))


def vae_batch_size(m, H: int, W: int, cap: int | None = None) -> int:
    """Images per VAE call at H×W pixels from free memory (the same shares as max_batch_size; cap 16 / 4)."""
    free, kind = free_bytes(m.device)
    budget, cap = (0.6 * free, cap or 16) if kind == "cuda" else (0.25 * free, cap or 4)
    return int(max(1, min(cap, budget // vae_bytes(m, H, W))))


# ---- options, optimisation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditorOptions:
    compile: bool | None = None      # None: on CUDA only (compiling the full UNet on a CPU takes minutes)
    cuda_graphs: bool = True         # CUDA only, with compile (mode="reduce-overhead")
    channels_last: bool | None = None  # None: on CUDA with compile only (eager CPU: 6x slower, measured)
    # None: on CUDA, or when compiling. Eager on a CPU the fused projections bought nothing and cost memory
    # (SD-XL, benchmarks/RESULTS.md sdxl_cpu: 0.98x vs 0.92x diffusers' CPU time unfused/fused, +2.4 GB peak RSS:
    # new private tensors beside the file-mapped originals, which are paged in to be concatenated)
    fuse_qkv: bool | None = None
    compile_mode: str | None = None  # override torch.compile's mode
    freeze: bool | None = None       # inductor freezing (weights as constants, oneDNN prepacking); None: CPU only
    max_batch: int | None = None     # UNet samples per call; None: from free memory, for each latent size
    max_images: int | None = None    # images per engine call in edit_batch; None: from the UNet batch size
    vae_batch: int | None = None     # images per VAE call; None: from free memory, for each image size
    vae_tile_above: int | None = 1024 * 1024  # pixels above which the VAE runs in 512² tiles (None: never)
    buckets: tuple | None = None     # compiled: batch sizes calls are padded to; None: CUDA 1, 2, 4, ...; CPU 2
    cache_dir: str | None = None
    heap_buffers: bool | None = None  # None: on CPU (keep_heap_buffers; process-wide, glibc only)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_heap_buffers() -> bool:
    """Make glibc serve large blocks from the heap and keep freed memory there (process-wide): no mmap per
    block, no trim. Eager CPU inference allocates and frees the same 50-100 MB activation and oneDNN buffers on
    every UNet call; with glibc's defaults each is a fresh mmap, faulted in page by page and unmapped on free:
    690 k page faults and 1.3 of 5.0 CPU s per SD 1.5 UNet call (batch 2, 32x32 latent, 2 cores), against 0 and
    3.3 s with this (interleaved in one process, benchmarks/RESULTS.md). The cost: the process keeps its peak
    heap instead of returning it to the OS. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def optimize(m, opts: EditorOptions = EditorOptions()):
    """A shallow copy of model m whose unet and vae are the engine's runners (engine.pipeline.UNetRunner,
    VAERunner); m's modules are changed in place (fused projections, memory format). Returns (model, info)."""
    cuda = torch.device(m.device).type == "cuda"
    unet = m.unet
    info = {"device": str(m.device), "dtype": str(m.dtype).replace("torch.", ""),
            "vae_dtype": str(toolkit.vae_dtype(m)).replace("torch.", "")}
    compile_on = cuda if opts.compile is None else opts.compile
    fuse = (cuda or compile_on) if opts.fuse_qkv is None else opts.fuse_qkv
    heap = (not cuda) if opts.heap_buffers is None else opts.heap_buffers
    info["heap_buffers"] = keep_heap_buffers() if heap else False
    info["fused_attention_modules"] = fuse_qkv(unet) if fuse else 0
    # NHWC pays with cuDNN and inductor's own kernels; in eager CPU mode the SD1.5 UNet ran 6x slower with it
    # (oneDNN reorders around GroupNorm/interpolate), so the default is CUDA + compile only.
    channels_last = (cuda and compile_on) if opts.channels_last is None else opts.channels_last
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        if cuda:
            m.vae.to(memory_format=torch.channels_last)
    cudagraphs = bool(cuda and compile_on and opts.cuda_graphs)
    fn = None
    if compile_on:
        info["compile_cache"] = str(enable_compile_cache(opts.cache_dir))
        info["freezing"] = (not cuda) if opts.freeze is None else opts.freeze
        set_freezing(info["freezing"])
        mode = opts.compile_mode or ("reduce-overhead" if cudagraphs else None)
        fn = torch.compile(unet, fullgraph=True, dynamic=False, mode=mode)
        info["compile_mode"] = mode or "default"
    buckets, max_batch = opts.buckets, opts.max_batch
    if compile_on and buckets is None and cuda:
        buckets = pow2_buckets(max_batch or 64)
    elif compile_on and buckets is None:
        # CPU: inductor compiles one graph per batch size (about a minute each on the SD UNet here, each with its
        # own frozen weight copy), more than larger batches save (eager SD 1.5 at 32x32: 2.29 CPU s per sample at
        # batch 2, 1.73 at 6): every call is chunked to 2 and padded to 2, one graph (compare.py's CPU mode, 1.57x
        # diffusers eager; unbucketed, the CLI's first --compile job compiled a graph per mask-pass chunk size and
        # took 1223 s)
        buckets, max_batch = (2,), max_batch or 2
    info.update(channels_last=channels_last, compiled=bool(compile_on), cuda_graphs=cudagraphs,
                buckets=buckets if compile_on else None)
    out = copy.copy(m)
    out.unet = UNetRunner(unet, fn, channels_last, cudagraphs, buckets if compile_on else None,
                          max_batch=max_batch or (lambda h, w: max_batch_size(m, h, w)))
    out.vae = VAERunner(m.vae, max_batch=opts.vae_batch or (lambda H, W: vae_batch_size(m, H, W)),
                        tile_above=opts.vae_tile_above)
    return out, info


# ---- the editor ------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    image: torch.Tensor | None          # (3, H, W) in [0, 1] ((B, 3, H, W) for a batch); None for masks only
    masks: torch.Tensor                 # (N, h, w) at latent resolution ((B, N, h, w))
    thresholds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    seconds: float = 0.0
    vae_fallbacks: int = 0              # decodes of this call redone in fp32 (a low-precision VAE overflowed)
    batch: int = 1                      # images in the engine call this result came from


@dataclass
class Job:
    image: object                       # PIL image or (3, H, W) float tensor in [0, 1]
    pairs: list                         # [(source, target), ...]
    options: dict = field(default_factory=dict)  # seed and EditSettings overrides by name


EDIT_DEFAULTS = {**EditSettings().to_dict(), "seed": 0}


class Editor:
    """The engine: loads once, optimises from outside the model code, and runs every edit — the command line
    (edit, mask, batch), the Python API and the benchmarks all come through here. edit / masks / edit_batch
    take EditSettings (or its fields as keywords); N pairs go through engine.regions, compat="diffusers"
    through engine.compat. Memory is the runners' business (UNetRunner, VAERunner)."""

    def __init__(self, model, options: EditorOptions = EditorOptions(), inpaint_model=None):
        self.base = model
        self.options = options
        self.model, self.info = optimize(model, options)
        self.inpaint_model = inpaint_model
        self.timings: dict = {}

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, vae_dtype=None, prediction_type=None,
                        **options) -> "Editor":
        from ...weights import load_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        t0 = time.perf_counter()
        m = load_model(path, device=device, dtype=dtype, vae_dtype=vae_dtype, prediction_type=prediction_type)
        ed = cls(m, EditorOptions(**options))
        ed.timings["load_s"] = time.perf_counter() - t0
        return ed

    @property
    def max_batch(self):
        """UNet samples per call at the sizes seen so far ({(h, w): n}), or the fixed option."""
        fixed = self.model.unet.max_batch
        return fixed if isinstance(fixed, int) else dict(self.model.unet.limits)

    def _settings(self, settings, opts, n_pairs) -> EditSettings:
        s = settings or EditSettings()
        return s.updated(**opts).checked(n_pairs)

    def _generator(self, seed, generator):
        return generator if generator is not None else torch.Generator().manual_seed(int(seed))

    @torch.inference_mode()
    def edit(self, image, pairs, settings: EditSettings | None = None, *, seed: int = 0, generator=None,
             output: str = "image", **opts) -> EditResult:
        """Edit a PIL image, a (3, H, W) or a (B, 3, H, W) tensor in [0, 1] by every (source, target) pair.
        settings: EditSettings, or its fields as keywords (opts); seed → a CPU torch.Generator (generator=
        one, or a list with one per image, overrides it); output="latent" also returns the final latents."""
        pairs = [tuple(p) for p in pairs]
        s = self._settings(settings, opts, len(pairs))
        gen = self._generator(seed, generator)
        x, size, batched = toolkit.prepare_image(image)
        self._resolution_note(size)
        fell = self.model.vae.fallbacks
        t0 = time.perf_counter()
        if s.compat == "diffusers":
            r = self._compat(x, size, pairs[0], s, gen, output)
        else:
            from ..edit import regions

            rr = regions.edit_many(self.model, x, pairs, s, generator=gen, output=output,
                                   inpaint_model=self.inpaint_model)
            img = rr.image if rr.image is None else crop_to(rr.image, size)
            r = EditResult(img, rr.masks, rr.thresholds, rr.latents)
        return self._finish(r, t0, fell, batched)

    @torch.inference_mode()
    def masks(self, image, pairs, settings: EditSettings | None = None, *, seed: int = 0, generator=None,
              **opts) -> EditResult:
        """Only the masks of edit(...) with the same settings and seed (the same masks): no inversion, no
        decoding. EditResult with image None."""
        pairs = [tuple(p) for p in pairs]
        s = self._settings(settings, opts, len(pairs))
        gen = self._generator(seed, generator)
        x, size, batched = toolkit.prepare_image(image)
        self._resolution_note(size)
        t0 = time.perf_counter()
        if s.compat == "diffusers":
            from ..edit import compat

            (src, tgt), B = pairs[0], x.shape[0]
            mk = compat.generate_mask(self.model, x, [src] * B, [tgt] * B, s.mask(), steps=s.steps, generator=gen)
            r = EditResult(None, mk[:, None])
        else:
            from ..edit import regions

            mr = regions.masks(self.model, x, pairs, s.mask(), steps=s.steps, generator=gen, scheduler=s.scheduler)
            r = EditResult(None, mr.weights, mr.thresholds)
        return self._finish(r, t0, self.model.vae.fallbacks, batched)

    def _resolution_note(self, size) -> None:
        """SD-XL below its training size is allowed and stated: a sdxl.ResolutionWarning."""
        from ..models import sdxl

        note = sdxl.resolution_note(self.base, size)
        if note:
            warnings.warn(note, sdxl.ResolutionWarning, stacklevel=4)

    def _finish(self, r: EditResult, t0: float, fell: int, batched: bool) -> EditResult:
        if torch.device(self.base.device).type == "cuda":
            torch.cuda.synchronize(self.base.device)
        r.seconds = time.perf_counter() - t0
        r.vae_fallbacks = self.model.vae.fallbacks - fell
        if not batched:
            r.image, r.masks, r.thresholds, r.latents = (v[0] if torch.is_tensor(v) else v for v in
                                                         (r.image, r.masks, r.thresholds, r.latents))
        return r

    def _compat(self, x, size, pair, s: EditSettings, gen, output) -> EditResult:
        """StableDiffusionDiffEditPipeline's three calls (engine.compat; the mask pass is DDIM, as there)."""
        from ..edit import compat

        B, (src, tgt), m = x.shape[0], pair, self.model
        mask = compat.generate_mask(m, x, [src] * B, [tgt] * B, s.mask(), steps=s.steps, generator=gen)
        inv = compat.invert(m, x, [src] * B, steps=s.steps, strength=s.strength, generator=gen,
                            scheduler=s.scheduler)
        out = compat.edit(m, inv, mask, [tgt] * B, s, generator=gen, size=size, output=output)
        return EditResult(out if output == "image" else None, mask[:, None], None,
                          out if output == "latent" else None)

    def run_batch(self, jobs: list, settings: EditSettings | None = None, masks_only: bool = False):
        """Yield (job index, EditResult or the exception that failed it) as engine calls complete. Jobs (or dicts
        with image/pairs/options) that share the image size, the pairs and the settings (the seed aside) are
        stacked into one image batch of at most max_images images (default: the UNet batch at that size over
        the 1 + N samples of a decoding step). Each job draws its noise from its own generator, seeded by its
        seed, so a batched job gets the numbers of the same job run alone. A failed batch is retried job by
        job, so that one bad job cannot fail the others."""
        jobs = [j if isinstance(j, Job) else Job(**j) for j in jobs]
        base = settings or EditSettings()
        prepared, groups = {}, {}
        for i, j in enumerate(jobs):
            try:
                opts = {k: v for k, v in j.options.items() if k != "seed"}
                s = base.updated(**opts).checked(len(j.pairs))
                x = toolkit.prepare_image(j.image)[0][0]  # padded (3, H8, W8)
            except Exception as e:  # a bad job is reported, the others go on
                yield i, e
                continue
            prepared[i] = (x, tuple(as_tensor(j.image).shape[-2:]), s)
            groups.setdefault((tuple(x.shape), tuple(map(tuple, j.pairs)), s), []).append(i)
        for (shape, pairs, s), idx in groups.items():
            per = self.options.max_images or max(1, (self.model.unet.limit(shape[-2] // 8, shape[-1] // 8) or 8)
                                                 // (1 + len(pairs)))
            for c in range(0, len(idx), per):
                yield from self._run_group(jobs, prepared, idx[c:c + per], list(pairs), s, masks_only)

    def _run_group(self, jobs, prepared, chunk, pairs, s, masks_only):
        gens = [torch.Generator().manual_seed(int(jobs[i].options.get("seed", 0))) for i in chunk]
        x = torch.stack([prepared[i][0] for i in chunk])
        try:
            r = (self.masks if masks_only else self.edit)(x, pairs, settings=s, generator=gens)
        except Exception as e:
            if len(chunk) == 1:
                yield chunk[0], e
                return
            for i in chunk:
                yield from self._run_group(jobs, prepared, [i], pairs, s, masks_only)
            return
        for b, i in enumerate(chunk):
            img = None if r.image is None else crop_to(r.image[b], prepared[i][1])
            yield i, EditResult(img, r.masks[b], None if r.thresholds is None else r.thresholds[b],
                                None if r.latents is None else r.latents[b], r.seconds / len(chunk),
                                r.vae_fallbacks, len(chunk))

    def edit_batch(self, jobs: list, settings: EditSettings | None = None) -> list[EditResult]:
        """run_batch's results in the jobs' order; the first failure is raised."""
        results: list = [None] * len(jobs)
        for i, r in self.run_batch(jobs, settings):
            if isinstance(r, Exception):
                raise r
            results[i] = r
        return results

    def warmup(self, size=(512, 512), n_pairs: int = 1, batch: int = 1, **opts) -> float:
        """Compile every graph a job of this shape needs (mask pass, inversion, decoding, VAE) with a 2-step
        edit; returns its seconds. Same shapes as the real job: steps only changes the loop length."""
        t0 = time.perf_counter()
        img = torch.full((batch, 3, *size), 0.5)
        pairs = [(f"a photo of thing {i}", f"a photo of other thing {i}") for i in range(n_pairs)]
        self.edit(img, pairs, **{**opts, "steps": 2, "strength": 1.0, "encode_strength": 0.5})
        dt = time.perf_counter() - t0
        self.timings.setdefault("warmup_s", []).append(dt)
        return dt
