"""Stable Diffusion 1.x/2.x/XL denoising UNet (diffusers' UNet2DConditionModel) as a plain nn.Module.

Attribute names equal the diffusers checkpoint keys, so a diffusers `unet/diffusion_pytorch_model.safetensors`
loads with a strict `load_state_dict(sd, strict=True, assign=True)` onto `UNet(cfg)` built on the meta device.
The model is pure eager PyTorch; compile, Triton swaps and fused q/k/v are applied from outside.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet_config import _DOWN_TYPES, _UP_TYPES, UNetConfig  # noqa: F401 (UNetConfig: re-exported)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim) fp32 (DDPM / Transformer positional encoding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, out_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # diffusers' shortcut is a 1x1 conv, present only when the channel count changes.
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.out_scale = out_scale

    def forward(self, x, temb):
        """temb: the time embedding after SiLU (B, temb); the UNet applies the SiLU once for all blocks."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        x = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return x + h if self.out_scale == 1.0 else (x + h) / self.out_scale


class Attention(nn.Module):
    """Multi-head (self or cross) attention. to_q/to_k/to_v stay separate modules so that fusing them is a
    transform applied from outside; `attend` takes already projected q, k, v for such a transform to reuse."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, head_dim: int, upcast: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        # SD2 overflows fp16 in q·k; diffusers' config asks for fp32 attention there. A plain attribute, so a
        # pipeline may turn it off when its attention kernel already accumulates in fp32.
        self.upcast = upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(ctx_dim, inner, bias=False)
        self.to_v = nn.Linear(ctx_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # checkpoint index 1 is a parameterless dropout

    def attend(self, q, k, v):
        dtype = q.dtype
        # (B, N, heads*d) -> (B, heads, N, d)
        q, k, v = (x.unflatten(-1, (self.heads, -1)).transpose(1, 2) for x in (q, k, v))
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        o = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N, d) -> (B, N, heads*d)
        return o.transpose(1, 2).flatten(2).to(dtype)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        return self.to_out[0](self.attend(self.to_q(x), self.to_k(ctx), self.to_v(ctx)))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Index 1 is diffusers' dropout; an Identity keeps the Linear at the checkpoint's `net.2`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: pre-norm self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, dim // heads, upcast)
        self.attn2 = Attention(dim, ctx_dim, heads, dim // heads, upcast)
        self.ff = FeedForward(dim)

    def forward(self, x, ctx):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel (continuous input): GroupNorm, proj_in, transformer blocks, proj_out, residual."""

    def __init__(self, cfg: UNetConfig, channels: int, i: int):
        """i: the down block index the per-block options are read at (up blocks mirror it, the mid block is -1)."""
        super().__init__()
        heads, ctx_dim = cfg.heads()[i], cfg.per_block("cross_attention_dim")[i]
        depth = cfg.per_block("transformer_layers_per_block")[i]
        inner = heads * (channels // heads)
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)  # diffusers fixes 1e-6 here, not norm_eps
        proj = nn.Linear if self.linear else (lambda a, b: nn.Conv2d(a, b, 1))  # SD2: Linear; SD1: 1x1 conv
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, ctx_dim, heads, cfg.upcast_attention) for _ in range(depth))
        self.proj_out = proj(inner, channels)

    def forward(self, x, ctx):
        h, w = x.shape[-2:]
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, ctx)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).unflatten(2, (h, w))  # (B, H*W, C) -> (B, C, H, W)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        # padding 0 (old LDM configs) pads right/bottom only, as the original implementation did.
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        # Nearest to the skip's size rather than x2, so latents that are not multiples of 8 work.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (attn=True) or DownBlock2D; appends every output to `skips` for the up path."""

    def __init__(self, cfg: UNetConfig, i: int, cin: int, temb: int, attn: bool):
        super().__init__()
        cout, n = cfg.block_out_channels[i], cfg.per_block("layers_per_block")[i]
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, temb, g, eps) for j in range(n))
        self.attentions = nn.ModuleList(Transformer2D(cfg, cout, i) for _ in range(n)) if attn else None
        last = i == len(cfg.block_out_channels) - 1
        self.downsamplers = None if last else nn.ModuleList([Downsample(cout, cfg.downsample_padding)])

    def forward(self, x, temb, ctx, skips: list):
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, ctx)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet)."""

    def __init__(self, cfg: UNetConfig, temb: int):
        super().__init__()
        c, g, eps, s = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(ResnetBlock(c, c, temb, g, eps, s) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2D(cfg, c, -1)])

    def forward(self, x, temb, ctx):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, ctx), temb)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (attn=True) or UpBlock2D; `i` counts up blocks (deepest first). Pops its skips."""

    def __init__(self, cfg: UNetConfig, i: int, temb: int, attn: bool):
        super().__init__()
        chs, down = cfg.block_out_channels[::-1], len(cfg.block_out_channels) - 1 - i  # the mirrored down block
        cprev, cout, cin = chs[max(i - 1, 0)], chs[i], chs[min(i + 1, len(chs) - 1)]
        n = cfg.per_block("layers_per_block")[down] + 1  # one resnet more than the down block: the downsample's skip
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        # Input channels: previous output (or this block's for j > 0) + the skip (the lower block's for the last).
        self.resnets = nn.ModuleList(ResnetBlock((cprev if j == 0 else cout) + (cin if j == n - 1 else cout),
                                                 cout, temb, g, eps) for j in range(n))
        self.attentions = nn.ModuleList(Transformer2D(cfg, cout, down) for _ in range(n)) if attn else None
        self.upsamplers = None if i == len(chs) - 1 else nn.ModuleList([Upsample(cout)])

    def forward(self, x, temb, ctx, skips: list):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, ctx)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])  # the next block's first skip fixes the size
        return x


class UNet(nn.Module):
    """forward(sample (B, in_channels, h, w), timestep, encoder_hidden_states (B, L, cross_attention_dim))
    -> (B, out_channels, h, w). timestep: python number, 0-d tensor or (B,) tensor. SD-XL (text_time) also takes
    text_embeds (B, P), the pooled prompt embedding, and time_ids (B or 1, 6): original (h, w), crop (top, left),
    target (h, w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb = cfg.time_embedding_dim or 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        cins = (ch[0],) + tuple(ch[:-1])
        self.down_blocks = nn.ModuleList(DownBlock(cfg, i, cins[i], temb, _DOWN_TYPES[t])
                                         for i, t in enumerate(cfg.down_block_types))
        self.mid_block = MidBlock(cfg, temb) if cfg.mid_block_type else None
        self.up_blocks = nn.ModuleList(UpBlock(cfg, i, temb, _UP_TYPES[t]) for i, t in enumerate(cfg.up_block_types))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        cfg = self.config
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(emb.to(sample.dtype))
        if cfg.addition_embed_type == "text_time":
            assert text_embeds is not None and time_ids is not None, "an SD-XL UNet needs text_embeds and time_ids"
            ids = time_ids.reshape(-1, time_ids.shape[-1]).expand(len(text_embeds), -1)  # (B, n_ids)
            # (B * n_ids,) -> (B * n_ids, dim) -> (B, n_ids * dim)
            tids = timestep_embedding(ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            emb = emb + self.add_embedding(torch.cat([text_embeds, tids.view(len(ids), -1)], -1).to(emb.dtype))
        # Every resnet applies SiLU to the embedding before its projection: do it once here.
        temb = F.silu(emb)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, temb, encoder_hidden_states, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
