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

Batching across jobs (`edit_batch`): jobs with the same image size and options are stacked into one
image batch (one UNet call per step for all of them), up to a batch size chosen from free memory.
"""
import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from engine.images import as_tensor, crop_to
from engine.unet import Attention

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


class SafeVAE:
    """m.vae with an fp32 fallback: a low-precision decode that is not finite is redone in fp32 (one host
    check per decode, outside the sampling loop). The fp32 copy is made on first need."""

    def __init__(self, vae: nn.Module):
        self.vae, self._fp32 = vae, None
        self.fallbacks = 0

    def __getattr__(self, name):  # config etc. of the wrapped module
        return getattr(self.vae, name)

    def encode(self, img):
        return self.vae.encode(img.to(memory_format=torch.channels_last) if img.is_cuda else img)

    def decode(self, z):
        out = self.vae.decode(z)
        if out.dtype == torch.float32 or bool(torch.isfinite(out).all()):
            return out
        if self._fp32 is None:
            self._fp32 = copy.deepcopy(self.vae).float()
        self.fallbacks += 1
        return self._fp32.decode(z.float())


class UNetRunner(nn.Module):
    """m.unet's call signature over the optimised (possibly compiled) UNet.
    buckets: with static-shape compilation every distinct batch size is a compile (about a minute for the SD
    UNet); a call's batch is padded up to the next bucket (zeros, the output sliced back), so a job's many
    batch sizes (mask pass, chunk remainders, inversion, decoding, cross-job batches) share a few graphs.
    With CUDA graphs the compiled function's outputs live in graph-owned memory that the next replay
    overwrites: they are cloned (a (B, 4, h, w) copy) so callers may hold several, e.g. run_unet's chunks."""

    def __init__(self, unet: nn.Module, fn=None, channels_last: bool = False, cudagraphs: bool = False,
                 buckets: tuple | None = None):
        super().__init__()
        self.module = unet
        self.fn = unet if fn is None else fn
        self.channels_last, self.cudagraphs = channels_last, cudagraphs
        self.buckets = tuple(sorted(buckets)) if buckets else None

    @property
    def config(self):
        return self.module.config

    def forward(self, x, t, ctx):
        if not torch.is_tensor(t):  # a python number would be baked into the graph: one recompile per value
            t = torch.tensor(t, device=x.device)
        B = x.shape[0]
        pad = 0
        if self.buckets and B <= self.buckets[-1]:
            pad = next(b for b in self.buckets if b >= B) - B
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            ctx = torch.cat([ctx, ctx.new_zeros((pad, *ctx.shape[1:]))])
            if t.ndim == 1 and t.shape[0] == B:
                t = torch.cat([t, t[-1:].expand(pad)])
        # Dense inputs: compiled graphs guard on strides, so an expanded (stride-0) batch from the callers'
        # broadcasts would be a recompile (a minute on the SD UNet) and, with CUDA graphs, a second graph.
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        ctx = ctx.contiguous()
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            out = self.fn(x, t, ctx)
            return (out[:B] if pad else out).clone()
        out = self.fn(x, t, ctx)
        return out[:B] if pad else out


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


def max_batch_size(m, h: int, w: int, cap: int | None = None) -> int:
    """UNet samples per call that fit in free memory: CUDA's free memory (torch.cuda.mem_get_info) × 0.6,
    or on CPU a quarter of the free RAM, capped at 8 (CPU throughput does not grow with batch)."""
    per = per_sample_bytes(m, h, w)
    dev = torch.device(m.device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget, cap = 0.6 * free, cap or 64
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 2 << 30
        budget, cap = 0.25 * free, cap or 8
    return int(max(1, min(cap, budget // per)))


# ---- options, optimisation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditorOptions:
    compile: bool | None = None      # None: on CUDA only (compiling the full UNet on a CPU takes minutes)
    cuda_graphs: bool = True         # CUDA only, with compile (mode="reduce-overhead")
    channels_last: bool | None = None  # None: on CUDA with compile only (eager CPU: 6x slower, measured)
    fuse_qkv: bool = True
    compile_mode: str | None = None  # override torch.compile's mode
    freeze: bool | None = None       # inductor freezing (weights as constants, oneDNN prepacking); None: CPU only
    max_batch: int | None = None     # UNet samples per call; None: from free memory at the first job's size
    buckets: tuple | None = None     # compiled: batch sizes calls are padded to; None: CUDA 1,2,4,...,max_batch
    cache_dir: str | None = None


def optimize(m, opts: EditorOptions = EditorOptions()):
    """A shallow copy of model m whose unet (and vae) are the optimised ones; m's modules are changed in place
    (fused projections, memory format). Returns (model, info dict)."""
    cuda = torch.device(m.device).type == "cuda"
    unet = m.unet
    info = {"device": str(m.device), "dtype": str(m.dtype).replace("torch.", "")}
    info["fused_attention_modules"] = fuse_qkv(unet) if opts.fuse_qkv else 0
    compile_on = cuda if opts.compile is None else opts.compile
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
    buckets = opts.buckets
    if compile_on and buckets is None and cuda and opts.max_batch:
        buckets = pow2_buckets(opts.max_batch)
    info.update(channels_last=channels_last, compiled=bool(compile_on), cuda_graphs=cudagraphs, buckets=buckets)
    out = copy.copy(m)
    out.unet = UNetRunner(unet, fn, channels_last, cudagraphs, buckets if compile_on else None)
    if m.dtype != torch.float32:
        out.vae = SafeVAE(m.vae)
    return out, info


# ---- the editor ------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    image: torch.Tensor | None          # (3, H, W) in [0, 1] ((B, 3, H, W) for a batch)
    masks: torch.Tensor                 # (N, h, w) at latent resolution ((B, N, h, w))
    thresholds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    seconds: float = 0.0


@dataclass
class Job:
    image: object                       # PIL image or (3, H, W) float tensor in [0, 1]
    pairs: list                         # [(source, target), ...]
    options: dict = field(default_factory=dict)  # Editor.edit keyword options (seed, steps, ...)


EDIT_DEFAULTS = dict(threshold="clamp:3", overlap="argmax", editor="fused", num_maps=10, encode_strength=0.5,
                     steps=50, strength=0.8, guidance_scale=7.5, negative_prompt="", compat=None, seed=0)


class Editor:
    """Loads once; edit(...) / edit_batch(...) run DiffEdit (engine.regions for N pairs, engine.diffedit in
    compat="diffusers" mode) on the optimised model."""

    def __init__(self, model, options: EditorOptions = EditorOptions()):
        self.base = model
        self.options = options
        self.model, self.info = optimize(model, options)
        self.max_batch = options.max_batch
        self.timings: dict = {}
        # compiled on CUDA without given buckets: they follow max_batch once it is known (at the first job)
        self._bucket_when_sized = (self.model.unet.buckets is None and self.info["compiled"]
                                   and self.info["device"].startswith("cuda"))

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **options) -> "Editor":
        from weights import load_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        t0 = time.perf_counter()
        m = load_model(path, device=device, dtype=dtype)
        ed = cls(m, EditorOptions(**options))
        ed.timings["load_s"] = time.perf_counter() - t0
        return ed

    def _batch_limit(self, h: int, w: int) -> int:
        if self.max_batch is None:
            self.max_batch = max_batch_size(self.base, h // 8, w // 8)
            self.info["max_batch"] = self.max_batch
        if self._bucket_when_sized:
            self.model.unet.buckets = self.info["buckets"] = pow2_buckets(self.max_batch)
            self._bucket_when_sized = False
        return self.max_batch

    @torch.inference_mode()
    def edit(self, image, pairs, **opts) -> EditResult:
        """Edit a PIL image, a (3, H, W) or a (B, 3, H, W) tensor in [0, 1] by every (source, target) pair.
        Options: EDIT_DEFAULTS' keys (seed → a CPU torch.Generator; generator= overrides), output="latent"."""
        from engine import diffedit

        o = {**EDIT_DEFAULTS, **opts}
        gen = o.pop("generator", None) or torch.Generator().manual_seed(int(o.pop("seed")))
        o.pop("seed", None)
        output = o.pop("output", "image")
        pairs = [tuple(p) for p in pairs]
        x, size, batched = diffedit.prepare_image(image)
        mb = self._batch_limit(*x.shape[-2:])
        t0 = time.perf_counter()
        if o["compat"] == "diffusers":
            if len(pairs) != 1:
                raise ValueError("compat='diffusers' reproduces the single-pair pipeline: give one pair")
            r = self._compat(x, size, pairs[0], o, gen, output, mb)
        elif o["compat"] is not None:
            raise ValueError(f"compat must be None or 'diffusers', got {o['compat']!r}")
        else:
            from engine import regions

            o.pop("compat")
            rr = regions.edit_many(self.model, x, pairs, generator=gen, output=output, max_batch=mb, **o)
            img = rr.image if rr.image is None else crop_to(rr.image, size)
            r = EditResult(img, rr.masks, rr.thresholds, rr.latents)
        if torch.device(self.base.device).type == "cuda":
            torch.cuda.synchronize()
        r.seconds = time.perf_counter() - t0
        if not batched:
            r = EditResult(*(v[0] if torch.is_tensor(v) else v for v in (r.image, r.masks, r.thresholds, r.latents)),
                           seconds=r.seconds)
        return r

    def _compat(self, x, size, pair, o, gen, output, mb) -> EditResult:
        """StableDiffusionDiffEditPipeline's three calls (engine.diffedit, compat='diffusers')."""
        from engine import diffedit

        B, (src, tgt), m = x.shape[0], pair, self.model
        mask = diffedit.generate_mask(m, x, [src] * B, [tgt] * B, num_maps=o["num_maps"],
                                      encode_strength=o["encode_strength"], guidance_scale=o["guidance_scale"],
                                      steps=o["steps"], generator=gen, compat="diffusers", max_batch=mb)
        inv = diffedit.invert(m, x, [src] * B, steps=o["steps"], strength=o["strength"], generator=gen,
                              compat="diffusers", max_batch=mb)
        out = diffedit.edit(m, inv, mask, [tgt] * B, steps=o["steps"], strength=o["strength"],
                            guidance_scale=o["guidance_scale"], negative_prompt=o["negative_prompt"],
                            compat="diffusers", generator=gen, size=size, output=output, max_batch=mb)
        return EditResult(out if output == "image" else None, mask[:, None], None,
                          out if output == "latent" else None)

    def edit_batch(self, jobs: list) -> list[EditResult]:
        """Run Jobs (or dicts with image/pairs/options), stacking jobs that share the image size, the pairs and
        the options (the seed aside) into one image batch of at most max_batch // (1 + N) images (so a decoding
        step is one UNet call). Each job draws its noise from its own generator, seeded by its seed, so a
        batched job gets the numbers of the same job run alone. Results come back in the jobs' order."""
        from engine import diffedit

        jobs = [j if isinstance(j, Job) else Job(**j) for j in jobs]
        tensors = [diffedit.prepare_image(j.image)[0][0] for j in jobs]  # padded (3, H8, W8)
        sizes = [tuple(as_tensor(j.image).shape[-2:]) for j in jobs]
        groups: dict = {}
        for i, j in enumerate(jobs):
            key = (tuple(tensors[i].shape), tuple(map(tuple, j.pairs)),
                   tuple(sorted((k, v) for k, v in j.options.items() if k != "seed")))
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(jobs)
        for (shape, pairs, _), idx in groups.items():
            per = max(1, self._batch_limit(*shape[-2:]) // (1 + len(pairs)))
            for s in range(0, len(idx), per):
                chunk = idx[s:s + per]
                gens = [torch.Generator().manual_seed(int(jobs[i].options.get("seed", EDIT_DEFAULTS["seed"])))
                        for i in chunk]
                opts = {k: v for k, v in jobs[chunk[0]].options.items() if k != "seed"}
                r = self.edit(torch.stack([tensors[i] for i in chunk]), list(pairs), generator=gens, **opts)
                for b, i in enumerate(chunk):
                    img = None if r.image is None else crop_to(r.image[b], sizes[i])
                    results[i] = EditResult(img, r.masks[b], None if r.thresholds is None else r.thresholds[b],
                                            None if r.latents is None else r.latents[b], r.seconds / len(chunk))
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
