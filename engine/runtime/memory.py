"""Memory: how many denoiser samples (UNet, flow transformer) / VAE images fit in one call (from the device's
free memory and a conservative per-sample estimate), and the CPU allocator setting that keeps large buffers in the heap.
The runners (engine.runtime.runners) take these as their max_batch functions; optimize sets the heap policy.
"""
import ctypes
import os
from pathlib import Path

import torch

from ..edit import toolkit


def flow_tokens(m, h: int, w: int) -> int:
    """Tokens of one flow-transformer sample at latent h×w: the image's 2×2 patches (h·w/4) and the text's
    (SD 3.x: CLIP's 77 + T5's max_sequence_length; FLUX.1: T5's max_sequence_length)."""
    text = m.max_sequence_length + (77 if m.kind == "sd3" else 0)
    return (h // 2) * (w // 2) + text


def transformer_sample_bytes(m, h: int, w: int) -> int:
    """A conservative estimate of one flow-transformer sample's peak activation memory (SD 3.x MMDiT, FLUX.1) at
    latent h×w, N = flow_tokens tokens of width D = heads·head_dim: ~24 tensors of N×D in the model's dtype
    alive inside a block (the residual streams, q/k/v, the attention output, the 4·D MLP hidden and its GELU,
    the modulated norms), plus the attention matrix heads·N² in fp32 where the math path may materialise it
    (CPU, or fp32 on CUDA; CUDA's half-precision SDPA runs flash / memory-efficient kernels, which do not).
    FLUX.1 at 1024² in bf16 (N = 4096 + 512, D = 3072): 0.68 GB per sample without the matrix, 2.7 GB with it."""
    cfg = m.transformer.config
    n, d = flow_tokens(m, h, w), cfg.num_attention_heads * cfg.attention_head_dim
    item = torch.finfo(m.dtype).bits // 8
    act = 24 * n * d * item
    if torch.device(m.device).type != "cuda" or m.dtype == torch.float32:
        act += cfg.num_attention_heads * n * n * 4
    return act


def per_sample_bytes(m, h: int, w: int) -> int:
    """A conservative estimate of one denoiser sample's peak activation memory at latent h×w. A flow model:
    transformer_sample_bytes. The UNet: ~64 tensors of the first block's size (skips, GEGLU, norms), plus the
    full attention matrix when attention is upcast to fp32 (the math path may materialise it)."""
    if getattr(m, "transformer", None) is not None:
        return transformer_sample_bytes(m, h, w)
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
    """Denoiser (UNet or flow transformer) samples per call that fit in free memory at latent h×w: CUDA's free memory × 0.6, or on CPU a
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
