"""Stable Diffusion 1.x/2.x denoising UNet (diffusers' UNet2DConditionModel) as a plain nn.Module.

Attribute names equal the diffusers checkpoint keys, so a diffusers `unet/diffusion_pytorch_model.safetensors`
loads with a strict `load_state_dict(sd, strict=True, assign=True)` onto `UNet(cfg)` built on the meta device.
The model is pure eager PyTorch; compile, Triton swaps and fused q/k/v are applied from outside.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)  # None: no mid block

# Config keys we do not implement, each with the one value accepted (diffusers' default, used by SD 1.x/2.x).
_FIXED = dict(only_cross_attention=False, dual_cross_attention=False, class_embed_type=None, addition_embed_type=None,
              addition_time_embed_dim=None, num_class_embeds=None, resnet_time_scale_shift="default",
              resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
              time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
              projection_class_embeddings_input_dim=None, attention_type="default", class_embeddings_concat=False,
              mid_block_only_cross_attention=None, cross_attention_norm=None, encoder_hid_dim=None,
              encoder_hid_dim_type=None, reverse_transformer_layers_per_block=None)


@dataclass(frozen=True)
class UNetConfig:
    """Fields and defaults are diffusers' unet/config.json keys and defaults (SD 1.5's architecture)."""
    sample_size: int | tuple | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8  # the number of heads when num_attention_heads is null (diffusers quirk)
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: int | None = None

    @classmethod
    def from_json(cls, d: dict) -> "UNetConfig":
        """Build from a parsed config.json; bookkeeping (`_class_name`...) and unknown keys are ignored,
        options in _FIXED must hold their one supported value."""
        for k, ok in _FIXED.items():
            v = d.get(k, ok)
            # A per-block list of the default (only_cross_attention: [false, ...]) is the default; False = None.
            assert all(x == ok or (x is False and ok is None) for x in (v if isinstance(v, list) else [v])), (
                f"UNet config: {k}={v!r} is not supported (only {ok!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __post_init__(self):
        for f in fields(self):  # JSON gives lists; tuples keep the frozen config hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        n = len(self.down_block_types)
        for key, ok in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES),
                        ("mid_block_type", _MID_TYPES)):
            v = getattr(self, key)
            assert set(v if isinstance(v, tuple) else [v]) <= set(ok), (
                f"UNet config: {key}={v!r} not supported (only {list(ok)})")
        assert len(self.up_block_types) == n == len(self.block_out_channels), (
            "UNet config: down_block_types, up_block_types and block_out_channels need the same length")
        assert self.act_fn in ("silu", "swish"), f"UNet config: act_fn={self.act_fn!r} not supported (only silu)"
        assert self.norm_num_groups is not None, "UNet config: norm_num_groups=None is not supported"
        for name in ("layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                     "transformer_layers_per_block"):
            v = getattr(self, name)
            assert not isinstance(v, tuple) or (len(v) == n and all(isinstance(x, int) for x in v)), (
                f"UNet config: {name}={v!r} must be an int or one int per block ({n} blocks)")

    def per_block(self, name: str) -> tuple:
        """An int-or-per-block option as one value per down block."""
        v = getattr(self, name)
        return v if isinstance(v, tuple) else (v,) * len(self.down_block_types)

    def heads(self) -> tuple:
        """Attention heads per block: num_attention_heads if given, else attention_head_dim (diffusers quirk)."""
        return self.per_block("attention_head_dim" if self.num_attention_heads is None else "num_attention_heads")


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
    -> (B, out_channels, h, w). timestep: python number, 0-d tensor or (B,) tensor."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb = cfg.time_embedding_dim or 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        cins = (ch[0],) + tuple(ch[:-1])
        self.down_blocks = nn.ModuleList(DownBlock(cfg, i, cins[i], temb, _DOWN_TYPES[t])
                                         for i, t in enumerate(cfg.down_block_types))
        self.mid_block = MidBlock(cfg, temb) if cfg.mid_block_type else None
        self.up_blocks = nn.ModuleList(UpBlock(cfg, i, temb, _UP_TYPES[t]) for i, t in enumerate(cfg.up_block_types))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2)

    def forward(self, sample, timestep, encoder_hidden_states):
        cfg = self.config
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        # Every resnet applies SiLU to the embedding before its projection: do it once here.
        temb = F.silu(self.time_embedding(emb.to(sample.dtype)))
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
