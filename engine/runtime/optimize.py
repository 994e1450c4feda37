"""Optimisation from outside the model code: EditorOptions, and `optimize`, which turns a loaded model into the
engine's view of it (fused projections, memory format, torch.compile with its on-disk cache and freezing,
the runners with memory-sized batches). Every optimisation is applied to a loaded model here, never inside a
module's forward:
  - dtype: fp16 on CUDA (the VAE decode falls back to an fp32 copy when an fp16 decode is not finite — the
    SD VAE is known to overflow); SD2's attention upcast stays where its config asks (engine.models.unet);
  - fused projections (runtime.fuse): one GEMM for q/k/v, the attention math the model's own;
  - channels_last for the convolutions (CUDA + compile: cuDNN's NHWC kernels; Transformer2D's flatten is free);
  - attention through F.scaled_dot_product_attention (the model's own; flash / mem-efficient on CUDA);
  - the Triton kernels: kernels.dispatch picks them for CUDA tensors by itself;
  - fp32 linears on CPU through oneDNN's packed inner product (runtime.onednn), compiled by default (eager on
    request): freezing would pack them for MKL, 7 % more CPU time per compiled SD 1.5 UNet call on this AMD EPYC
    (RESULTS.md unet_cpu_onednn);
  - torch.compile of the UNet, fullgraph=True, static shapes (one graph per batch size; a job has three:
    mask pass, inversion, decoding), CUDA graphs through mode="reduce-overhead" on CUDA only; on CPU with
    inductor's freezing (weights prepacked for oneDNN: the compiled UNet is 1.5x eager there, slower without);
  - a compile cache that survives the process (inductor's FX-graph cache and Triton's kernel cache in
    ~/.cache/diffedit-engine), so a second run pays the tracing but not the code generation.
Flow models (SD 3.x, FLUX.1: weights.flow_model.FlowModel) take the same path with m.transformer in the UNet's
place: compiled with the same options (fullgraph, static shapes, buckets, CUDA graphs), split by
TransformerRunner from a per-sample estimate of its own (runtime.memory.transformer_sample_bytes); fused q/k/v
and channels_last are the UNet's only (the info says so); the VAE runner is the same (16 latent channels, the
shift applied by engine.edit.flow).
The sampling loops (engine.edit) keep timesteps and coefficients on the device, and nothing added here syncs
with the host inside them.

Memory (runtime.runners, runtime.memory): UNetRunner splits any UNet batch into calls of at most
max_batch_size samples, computed from free memory for each new latent size (CUDA: 60 % of free memory over a
per-sample estimate, at most 64; CPU: a quarter of available RAM, at most 8); VAERunner encodes and decodes at
most vae_batch_size images per call, likewise per image size (at most 16 / 4), and above vae_tile_above pixels
(1024² by default) in 512² tiles with 64-pixel linear blends. The mask pass (B·n·P samples, e.g. 240) therefore
runs in chunks.
"""
import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..edit import toolkit
from .fuse import fuse_qkv
from .memory import keep_heap_buffers, max_batch_size, vae_batch_size
from .onednn import onednn_skip_reason, use_onednn_linears
from .runners import TransformerRunner, UNetRunner, VAERunner, pow2_buckets

CACHE_DIR = Path(os.environ.get("DIFFEDIT_CACHE_DIR", Path.home() / ".cache" / "diffedit-engine"))


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
    # torch's intra-op CPU threads (process-wide); None: torch's default, one per core. On a machine busy with
    # other work that default oversubscribes the cores: a CPU edit ran 9x slower than with one thread
    threads: int | None = None
    # fp32 linears through oneDNN's packed inner product (runtime.onednn); None: compiled with freezing on CPU in
    # fp32, where freezing's MKL linears took 7 % more CPU time per SD 1.5 UNet call on this AMD EPYC. Eager keeps
    # aten's linears unless True (also faster here, but the eager path stays bit-exact with engine.edit on the plain
    # model: tests/test_end_to_end.py's same-pixels invariant)
    onednn_linear: bool | None = None


def _is_default_inductor_dir(path: str) -> bool:
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


def optimize(m, opts: EditorOptions = EditorOptions()):
    """A shallow copy of model m whose unet (a flow model's transformer) and vae are the engine's runners
    (runtime.runners.UNetRunner / TransformerRunner, VAERunner); m's modules are changed in place (fused
    projections, memory format). Returns (model, info)."""
    cuda = torch.device(m.device).type == "cuda"
    flow = getattr(m, "transformer", None) is not None  # SD 3.x, FLUX.1 (weights.flow_model.FlowModel)
    unet = m.transformer if flow else m.unet  # the denoiser: what is compiled, split and padded
    if opts.threads is not None:
        if opts.threads < 1:
            raise ValueError(f"threads must be >= 1, got {opts.threads}")
        torch.set_num_threads(opts.threads)
    info = {"device": str(m.device), "dtype": str(m.dtype).replace("torch.", ""),
            "vae_dtype": str(toolkit.vae_dtype(m)).replace("torch.", ""), "threads": torch.get_num_threads()}
    compile_on = cuda if opts.compile is None else opts.compile
    fuse = (cuda or compile_on) if opts.fuse_qkv is None else opts.fuse_qkv
    heap = (not cuda) if opts.heap_buffers is None else opts.heap_buffers
    info["heap_buffers"] = keep_heap_buffers() if heap else False
    # runtime.fuse knows the UNet's attention modules only; the flow transformers' q/k/v stay three GEMMs
    info["fused_attention_modules"] = fuse_qkv(unet) if fuse and not flow else 0
    if fuse and flow:
        info["fuse_qkv"] = "not applied: not implemented for flow transformers (q/k/v stay separate)"
    # NHWC pays with cuDNN and inductor's own kernels; in eager CPU mode the SD1.5 UNet ran 6x slower with it
    # (oneDNN reorders around GroupNorm/interpolate), so the default is CUDA + compile only. A flow transformer
    # works on tokens (one patchify at its input): NHWC is for its VAE only.
    channels_last = (cuda and compile_on) if opts.channels_last is None else opts.channels_last
    if channels_last:
        if not flow:
            unet.to(memory_format=torch.channels_last)
        if cuda:
            m.vae.to(memory_format=torch.channels_last)
    skip = onednn_skip_reason(m.device, m.dtype)
    if skip is None and compile_on and not ((not cuda) if opts.freeze is None else opts.freeze):
        # inductor lowers oneDNN's packed linear for frozen (constant) weights only: it fails to compile otherwise
        skip = "compiled without freezing"
    if (compile_on if opts.onednn_linear is None else opts.onednn_linear) and skip is None:
        info["onednn_linears"] = use_onednn_linears(unet)  # after fuse_qkv, which reads the plain weights
    elif opts.onednn_linear:
        info["onednn_linears"] = f"not applied: {skip}"
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
                buckets=buckets if compile_on else None, denoiser="transformer" if flow else "unet")
    out = copy.copy(m)
    runner = (TransformerRunner if flow else UNetRunner)(
        unet, fn, channels_last and not flow, cudagraphs, buckets if compile_on else None,
        max_batch=max_batch or (lambda h, w: max_batch_size(m, h, w)))
    setattr(out, "transformer" if flow else "unet", runner)
    out.vae = VAERunner(m.vae, max_batch=opts.vae_batch or (lambda H, W: vae_batch_size(m, H, W)),
                        tile_above=opts.vae_tile_above)
    return out, info
