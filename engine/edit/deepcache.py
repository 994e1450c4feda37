"""DeepCache (Ma, Fang, Wang 2023, arXiv 2312.00858): the UNet's deep features change little between adjacent
denoising steps, so the deep part runs every K-th step and is reused between (the uniform 1:N schedule, their
branch 0: the shallowest skip).

The UNet's forward is split in two from outside the model (engine/models/unet.py stays pure), calling its own
submodules in its forward's order:
  full    — the whole forward; also returns the cache, the input of the last up block (everything below the
            shallowest down block / up block, upsampled to full resolution);
  shallow — time embedding, conv_in and the first down block's resnets/attentions (their outputs are the last
            up block's skips; its downsampler only feeds the deep part, so it is skipped), then the last up
            block on the cached deep feature and the output head.
full's eps equals the plain forward bit for bit, and shallow on the x full saw equals it too
(tests/test_deepcache.py), so the split cannot drift from the model.

StepCache is the per-loop state (the inversion, the masked decoding): step i runs full when i % K == 0, else
shallow. The loop's batch composition is the same at every step, so the cache is positional: one per chunk of
the runner's memory split (UNetRunner.limit; the chunks are the same rows at every step), so a cached edit
uses the memory a plain one does plus the cached features. The cached path runs the eager module: an Editor's
compiled UNet (EditorOptions.compile, off by default on CPU) and its bucket padding are bypassed, because the
compiled graph is the whole forward and cannot return the deep feature.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import inpaint
from ..models.unet import timestep_embedding


def _temb(unet, sample, timestep, text_embeds=None, time_ids=None):
    """The time embedding after SiLU, as UNet.forward makes it (SD-XL's text_time conditioning included)."""
    cfg = unet.config
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
    emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = unet.time_embedding(emb.to(sample.dtype))
    if cfg.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("an SD-XL UNet needs text_embeds and time_ids")
        ids = time_ids.reshape(-1, time_ids.shape[-1]).expand(len(text_embeds), -1)  # (B, n_ids)
        tids = timestep_embedding(ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = emb + unet.add_embedding(torch.cat([text_embeds, tids.view(len(ids), -1)], -1).to(emb.dtype))
    return F.silu(emb)


def _conv_in(unet, sample):
    return unet.conv_in(2 * sample - 1.0 if unet.config.center_input_sample else sample)


def _head(unet, h, temb, ctx, skips: list):
    """The last up block on h (popping its skips) and the output head."""
    h = unet.up_blocks[-1](h, temb, ctx, skips)
    return unet.conv_out(F.silu(unet.conv_norm_out(h)))


def check(unet) -> None:
    """A UNet the split applies to: at least two resolution levels (a deep part below the first)."""
    if not hasattr(unet, "down_blocks") or len(unet.down_blocks) < 2:
        raise ValueError(f"cache_interval > 1 needs a UNet with at least two down blocks (a deep part to reuse); "
                         f"got {type(unet).__name__}")


def full(unet, x, t, ctx, text_embeds=None, time_ids=None):
    """(eps, cache): unet(x, t, ctx, ...) computed as its forward does, and the last up block's input."""
    temb = _temb(unet, x, t, text_embeds, time_ids)
    h = _conv_in(unet, x)
    skips = [h]
    for block in unet.down_blocks:
        h = block(h, temb, ctx, skips)
    if unet.mid_block is not None:
        h = unet.mid_block(h, temb, ctx)
    for block in unet.up_blocks[:-1]:
        h = block(h, temb, ctx, skips)
    return _head(unet, h, temb, ctx, skips), h


def shallow(unet, x, t, ctx, cache, text_embeds=None, time_ids=None):
    """eps of x with the deep part replaced by `cache` (full's second output at an earlier step)."""
    if cache.shape[0] != x.shape[0] or cache.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"the deep-feature cache {tuple(cache.shape)} does not match the batch {tuple(x.shape)}")
    temb = _temb(unet, x, t, text_embeds, time_ids)
    h = _conv_in(unet, x)
    skips = [h]
    first = unet.down_blocks[0]  # DownBlock.forward without its downsampler (it only feeds the deep part)
    for j, resnet in enumerate(first.resnets):
        h = resnet(h, temb)
        if first.attentions is not None:
            h = first.attentions[j](h, ctx)
        skips.append(h)
    return _head(unet, cache, temb, ctx, skips)


def _rows(v: torch.Tensor, sample: bool, s: int, n: int, B: int) -> torch.Tensor:
    """Rows s:s+n of a conditioning argument that has one row per sample (always for context and text_embeds;
    t and time_ids when they are (B, ...) with B > 1), else v as it is: the runner's own chunking rule."""
    return v[s:s + n] if sample or (v.ndim >= 1 and B > 1 and v.shape[0] == B) else v


def _all_repaint(fm, x):
    """x with an inpainting UNet's all-repaint conditioning appended, as inpaint._FullMaskUNet does."""
    c = fm.cond(x.shape[-2], x.shape[-1], x.device, x.dtype)
    return torch.cat([x, c.expand(x.shape[0], -1, -1, -1)], 1)


def _parts(denoiser):
    """(UNet module, runner or None, input prefix or None) behind m.unet: the bare UNet, the Editor's
    UNetRunner (its eager module and its memory split), or an inpainting model's all-repaint view
    (inpaint.text_model: the 5 conditioning channels appended to x)."""
    prefix = None
    if isinstance(denoiser, inpaint._FullMaskUNet):
        prefix, denoiser = functools.partial(_all_repaint, denoiser), denoiser.unet
    # the Editor's runner (engine.runtime.runners.UNetRunner, a layer above this one: recognised by what it has)
    runner = denoiser if hasattr(denoiser, "limit") and isinstance(getattr(denoiser, "module", None), nn.Module) \
        else None
    unet = denoiser.module if runner is not None else denoiser
    check(unet)
    return unet, runner, prefix


class StepCache:
    """One loop's DeepCache state over model m's UNet: `at(i)` is m.unet's callable for step i — the full
    forward when i % interval == 0 (keeping the deep feature of each chunk), else the shallow one on the kept
    features. Steps must start at 0 (the first call fills the cache)."""

    def __init__(self, m, interval: int):
        if int(interval) != interval or interval < 1:
            raise ValueError(f"cache_interval must be an integer >= 1, got {interval!r}")
        self.unet, self.runner, self.prefix = _parts(m.unet)
        self.interval = int(interval)
        self.caches: list = []
        self.full_steps = self.shallow_steps = 0

    def at(self, i: int):
        return functools.partial(self._call, i)

    def _call(self, i, x, t, ctx, text_embeds=None, time_ids=None):
        if self.prefix is not None:
            x = self.prefix(x)
        if self.runner is not None and self.runner.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        B = x.shape[0]
        n = (self.runner.limit(*x.shape[-2:]) if self.runner is not None else None) or B
        refresh = i % self.interval == 0
        if not refresh and not self.caches:
            raise ValueError(f"step {i} reuses the deep features, but no full step ran before it (start at 0)")
        starts = range(0, B, n)
        if not refresh and len(self.caches) != len(starts):
            raise ValueError(f"the batch splits into {len(starts)} chunks, the cache holds {len(self.caches)}: a "
                             "loop's batch must be the same at every step")
        outs, caches = [], []
        for k, s in enumerate(starts):
            conds = [None if v is None else _rows(v, sample, s, n, B)
                     for v, sample in ((t, False), (ctx, True), (text_embeds, True), (time_ids, False))]
            if refresh:
                eps, cache = full(self.unet, x[s:s + n], *conds)
                caches.append(cache)
            else:
                eps = shallow(self.unet, x[s:s + n], conds[0], conds[1], self.caches[k], *conds[2:])
            outs.append(eps)
        if refresh:
            self.caches = caches
        self.full_steps += refresh
        self.shallow_steps += not refresh
        return outs[0] if len(outs) == 1 else torch.cat(outs)

