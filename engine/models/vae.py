"""The KL autoencoder of latent diffusion (Rombach et al. 2022): image <-> latent at 1/2^(blocks-1) the size.
Pure module; attribute names equal diffusers' AutoencoderKL checkpoint keys, so a strict load with
assign=True fills it. Latents are unscaled here; scaling_factor (and SD 3.x's / FLUX's shift_factor) are the
caller's job. One module for SD 1.x/2.x/XL (4 latent channels, quant convs) and SD 3.x (16, none).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6  # every GroupNorm in the SD VAE uses 1e-6 (not the 1e-5 torch default)


@dataclass(frozen=True)
class VAEConfig:
    """Fields named as diffusers' vae/config.json keys; defaults are SD 1.x/2.x's VAE (a single-file checkpoint
    ships no config). Keys absent from older configs default as diffusers does."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    sample_size: int = 512
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # informational: the SD VAE overflows in fp16, callers decode in fp32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_json(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        cfg = cls(**kw)
        n = len(cfg.block_out_channels)
        assert d.get("_class_name", "AutoencoderKL") == "AutoencoderKL", d.get("_class_name")
        assert cfg.down_block_types == ("DownEncoderBlock2D",) * n, cfg.down_block_types
        assert cfg.up_block_types == ("UpDecoderBlock2D",) * n, cfg.up_block_types
        assert cfg.act_fn == "silu", cfg.act_fn
        # shift_factor / latents_mean / latents_std change what a sampler's latent is ((mean - shift) * scale
        # for SD 3.x and FLUX): the module ignores them, and each family's loader refuses what its sampler lacks.
        assert all(c % cfg.norm_num_groups == 0 for c in cfg.block_out_channels)
        return cfg


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=_EPS)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (1x1 conv where the channel count changes); no time embedding."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, residual; only in the lowest-resolution mid block."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = _norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # ".0": diffusers keeps a (dropped) dropout at index 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (p(h).unsqueeze(1) for p in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        # No attention -> no keys: an empty list keeps the checkpoint layout (diffusers stores None there).
        self.attentions = nn.ModuleList([Attention(c, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original LDM pads only right and bottom, then convolves unpadded: windows cover rows 2i..2i+2 as in
        # training ((H, W) -> (H/2, W/2) for even sizes); symmetric padding 1 would shift them by one input pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (*self.resnets, *self.downsamplers):
            x = m(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (*self.resnets, *self.upsamplers):
            x = m(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        # Every block but the last halves the resolution.
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1) for i in range(n))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        # The decoder mirrors the encoder with one extra resnet per block; every block but the last doubles.
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < n - 1) for i in range(n))
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # SD 3.x's and FLUX's VAEs have no 1x1 quant convs (use_quant_conv/use_post_quant_conv False): no keys.
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, in_channels, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, H/f, W/f), unscaled."""
        moments = self.encoder(img)
        mean, logvar = (moments if self.quant_conv is None else self.quant_conv(moments)).chunk(2, dim=1)
        # The clamp keeps exp(logvar) finite when sampling (same bounds as the LDM/diffusers posterior).
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) unscaled -> image (B, out_channels, h*f, w*f), nominally [-1, 1], unclamped."""
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))
