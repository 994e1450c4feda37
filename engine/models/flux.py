"""FLUX.1 denoiser (dev and schnell; Black Forest Labs 2024; diffusers' FluxTransformer2DModel) as a plain nn.Module.

The latent (B, 16, h, w) is packed into 2x2 patches (64 features per token, row-major). Text and image tokens
share one width. The first `num_layers` double-stream blocks keep separate weights per stream (adaLN modulation,
q/k/v, MLP) and attend jointly over [text tokens, image tokens]; the `num_single_layers` single-stream blocks then
run one set of weights over the concatenated sequence, attention and MLP in parallel from the same normalised
input. Positions enter only through a 3-axis rotary embedding of q and k over (text, row, column) ids (text ids
all zero, image ids (0, row, col)); one conditioning vector (timestep + pooled CLIP, + the distilled guidance scale
on dev) modulates every block. Attribute names equal the diffusers checkpoint keys, so
transformer/diffusion_pytorch_model.safetensors loads with a strict `load_state_dict(sd, strict=True, assign=True)`
onto `FluxTransformer(cfg)` built on the meta device.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mmdit import FeedForward, Modulation, RMSNorm, layer_norm, modulate
from .unet import TimestepEmbedding, timestep_embedding

CLASS_NAME = "FluxTransformer2DModel"
ROPE_THETA = 10000  # FluxPosEmbed(theta=10000) in every FLUX.1 release
PACK = 2  # the latent is packed 2x2 into tokens outside diffusers' transformer (FluxPipeline._pack_latents)


@dataclass(frozen=True)
class FluxTransformerConfig:
    """Fields and defaults are diffusers' FluxTransformer2DModel arguments (the defaults: FLUX.1-schnell; dev sets
    guidance_embeds). in_channels counts packed features: 4 x the latent's 16 channels."""
    patch_size: int = 1  # diffusers' own patchify on the packed tokens; every FLUX.1 sets 1
    in_channels: int = 64
    out_channels: int | None = None  # None: in_channels (diffusers' rule)
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5-XXL's width
    pooled_projection_dim: int = 768  # CLIP-L's pooled output
    guidance_embeds: bool = False  # dev (guidance-distilled): True
    axes_dims_rope: tuple = (16, 56, 56)  # rotary dims per id axis (text, row, column); they sum to the head dim

    @classmethod
    def from_json(cls, d: dict) -> "FluxTransformerConfig":
        """Build from a parsed transformer/config.json; other bookkeeping (`_diffusers_version`...) is ignored."""
        assert d.get("_class_name") == CLASS_NAME, (
            f"FLUX transformer config: _class_name={d.get('_class_name')!r} is not {CLASS_NAME!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))  # JSON list -> hashable tuple
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        assert self.patch_size == 1, f"FLUX transformer config: patch_size={self.patch_size} is not supported (only 1)"
        # Fill / Canny / Depth take extra image channels beside the noisy latent: not text-to-image models.
        assert self.out_channels == self.in_channels and self.in_channels % (PACK * PACK) == 0, (
            f"FLUX transformer config: in_channels={self.in_channels}, out_channels={self.out_channels} is not "
            f"supported (only text-to-image models: out = in = 4 x the latent channels, e.g. 64)")
        assert len(self.axes_dims_rope) == 3 and all(d % 2 == 0 for d in self.axes_dims_rope) and (
            sum(self.axes_dims_rope) == self.attention_head_dim), (
            f"FLUX transformer config: axes_dims_rope={list(self.axes_dims_rope)} must be three even sizes summing "
            f"to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        """Width of both token streams."""
        return self.num_attention_heads * self.attention_head_dim


def rope_angles(ids: torch.Tensor, axes_dims: tuple) -> torch.Tensor:
    """ids (S, 3) positions -> (S, head_dim / 2) rotation angles: per axis i, position * theta^(-2k / d_i) for
    k < d_i / 2, axes concatenated. In float64 as FLUX computes its frequencies (large row/col positions times the
    fastest frequencies lose digits in float32)."""
    pos = ids.to(torch.float64)
    return torch.cat([torch.outer(pos[:, i], ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float64,
                                                                          device=ids.device) / d))
                      for i, d in enumerate(axes_dims)], dim=-1)


def rope_ids(text_len: int, rows: int, cols: int, device) -> torch.Tensor:
    """The (text_len + rows * cols, 3) ids of [text tokens, image tokens]: text all zero, image (0, row, col)."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    image = torch.stack([torch.zeros_like(r), r, c], -1).reshape(rows * cols, 3)  # row-major, as the tokens
    return torch.cat([torch.zeros(text_len, 3, dtype=image.dtype, device=device), image])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: each adjacent pair (x[2j], x[2j+1]) of a head's features rotated by angle j of its token.
    x (B, heads, S, head_dim), cos/sin (S, head_dim / 2) float32; rotated in float32, returned in x's dtype."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, S, head_dim / 2) each
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2).to(x.dtype)


def attention(q, k, v, rope):
    """q, k, v (B, heads, S, head_dim) already normalised; rope = (cos, sin) of the same S tokens -> (B, S, inner)."""
    q, k = rotate(q, *rope), rotate(k, *rope)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class QKV(nn.Module):
    """One stream's q/k/v projections and per-head RMSNorm of q and k (diffusers' to_q/to_k/to_v, norm_q/norm_k;
    the text stream's add_*_proj / norm_added_* are the same shapes under other names)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x):
        """(B, N, dim) -> q, k, v as (B, heads, N, head_dim)."""
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        return self.norm_q(split(self.to_q(x))), self.norm_k(split(self.to_k(x))), split(self.to_v(x))


class JointAttention(QKV):
    """The double-stream attention: the image stream's projections (inherited), the text stream's own
    (add_*_proj, norm_added_*), one attention over [text, image], each stream's own output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__(dim, heads, head_dim)
        inner = heads * head_dim
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # checkpoint index 1 is a parameterless dropout
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, x, text, rope):
        """x (B, N, dim), text (B, L, dim), rope over the L + N tokens -> (x out, text out)."""
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = super().forward(x)
        tq, tk = self.norm_added_q(split(self.add_q_proj(text))), self.norm_added_k(split(self.add_k_proj(text)))
        tv = split(self.add_v_proj(text))
        cat = lambda a, b: torch.cat([a, b], 2)  # noqa: E731  (B, heads, L + N, head_dim): text first, as FLUX
        o = attention(cat(tq, q), cat(tk, k), cat(tv, v), rope)
        n_text = text.shape[1]
        return self.to_out[0](o[:, n_text:]), self.to_add_out(o[:, :n_text])


def fp16_clip(x):
    """FLUX's residual streams overflow fp16's range on real weights; diffusers clips them to it (+-65504)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleBlock(nn.Module):
    """diffusers' FluxTransformerBlock: adaLN-Zero on both streams (6 vectors each: shift, scale, gate of the
    attention, then of the MLP), joint attention, a tanh-GELU MLP per stream."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1, self.norm1_context = Modulation(dim, 6), Modulation(dim, 6)
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.ff, self.ff_context = FeedForward(dim), FeedForward(dim)

    def forward(self, x, text, cond, rope):
        shift, scale, gate, shift_m, scale_m, gate_m = self.norm1(cond)
        t_shift, t_scale, t_gate, t_shift_m, t_scale_m, t_gate_m = self.norm1_context(cond)
        a, ta = self.attn(modulate(x, shift, scale), modulate(text, t_shift, t_scale), rope)
        x = x + gate * a
        x = x + gate_m * self.ff(modulate(x, shift_m, scale_m))
        text = text + t_gate * ta
        text = fp16_clip(text + t_gate_m * self.ff_context(modulate(text, t_shift_m, t_scale_m)))
        return x, text


class SingleAttention(QKV):
    """The single-stream blocks' attention: q/k/v and the QK norms only; the output projection is the block's
    proj_out, shared with the MLP branch."""

    def forward(self, x, rope):
        return attention(*super().forward(x), rope)


class SingleBlock(nn.Module):
    """diffusers' FluxSingleTransformerBlock over the joint sequence: one adaLN (shift, scale, gate), attention and
    a 4x tanh-GELU MLP side by side on the same modulated input, one projection of [attention | MLP] back."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm = Modulation(dim, 3)
        self.attn = SingleAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(dim + 4 * dim, dim)

    def forward(self, x, cond, rope):
        shift, scale, gate = self.norm(cond)
        h = modulate(x, shift, scale)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return fp16_clip(x + gate * self.proj_out(torch.cat([self.attn(h, rope), mlp], -1)))


class TimeTextEmbed(nn.Module):
    """The conditioning vector: MLP(sinusoidal(t)) [+ MLP(sinusoidal(guidance)) on dev] + MLP(pooled CLIP)
    (diffusers' CombinedTimestep[Guidance]TextProjEmbeddings; the pooled MLP has the same Linear-SiLU-Linear keys)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t, guidance, pooled):
        sinus = lambda v: timestep_embedding(v, 256, flip_sin_to_cos=True, freq_shift=0).to(pooled.dtype)  # noqa: E731
        emb = self.timestep_embedder(sinus(t))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(sinus(guidance))
        return emb + self.text_embedder(pooled)


def pack(x):
    """(B, C, h, w) latent -> (B, h/2 * w/2, 4C) tokens, row-major, features ordered (channel, row, column) in
    each 2x2 patch (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h, w):
    """pack's inverse: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, f = tokens.shape
    return tokens.view(b, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, h, w)


class FluxTransformer(nn.Module):
    """forward(x (B, in_channels/4, h, w) unpacked latent, t, context (B, L, joint_attention_dim), pooled (B,
    pooled_projection_dim), guidance=None) -> velocity like x. t: diffusers' timestep (sigma * 1000), a python number,
    0-d or (B,) tensor. guidance: dev only, and required there: the guidance scale itself (e.g. 3.5), a number or
    (B,) tensor. h and w must be even (2x2 packing)."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.time_text_embed = TimeTextEmbed(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.num_single_layers))
        self.norm_out = Modulation(dim, 2)  # (scale, shift), diffusers' AdaLayerNormContinuous order
        self.proj_out = nn.Linear(dim, cfg.out_channels)

    def check(self, x, guidance):
        """One-line errors for inputs the model cannot take."""
        cfg, (_, c, h, w) = self.config, x.shape
        if c * PACK * PACK != cfg.in_channels:
            raise ValueError(f"FLUX transformer: the latent has {c} channels, the model takes "
                             f"{cfg.in_channels // (PACK * PACK)} (unpacked latents, (B, C, h, w))")
        if h % PACK or w % PACK:
            raise ValueError(f"FLUX transformer: latent {h}x{w} is not a multiple of 2 (2x2 packing; the image must "
                             f"be a multiple of 16 px)")
        if guidance is not None and not cfg.guidance_embeds:
            raise ValueError("FLUX transformer: this model (schnell) has no guidance embedding; guidance= is for "
                             "FLUX.1-dev (use None)")
        if guidance is None and cfg.guidance_embeds:
            raise ValueError("FLUX transformer: guidance= is required: this model (dev) is guidance-distilled; pass "
                             "the guidance scale, e.g. 3.5")

    def forward(self, x, t, context, pooled, guidance=None):
        self.check(x, guidance)
        b, _, h, w = x.shape
        tokens = self.x_embedder(pack(x))
        dtype = tokens.dtype
        # FluxPipeline hands the transformer timestep / 1000 in the latent's dtype and the transformer multiplies
        # by 1000 in its own: the same roundings give the same numbers in bf16/fp16.
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(x.dtype)
        t = (t / 1000).to(dtype) * 1000
        if guidance is not None:  # FluxPipeline: a float32 tensor of the scale, x 1000 in the model's dtype
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
            guidance = guidance.to(dtype) * 1000
        cond = self.time_text_embed(t, guidance, pooled)  # (B, dim)
        text = self.context_embedder(context)
        n_text = text.shape[1]
        angles = rope_angles(rope_ids(n_text, h // PACK, w // PACK, x.device), self.config.axes_dims_rope)
        rope = angles.cos().float(), angles.sin().float()  # (L + N, head_dim / 2) each
        for block in self.transformer_blocks:
            tokens, text = block(tokens, text, cond, rope)
        joint = torch.cat([text, tokens], 1)  # (B, L + N, dim)
        for block in self.single_transformer_blocks:
            joint = block(joint, cond, rope)
        scale, shift = self.norm_out(cond)
        return unpack(self.proj_out(modulate(joint[:, n_text:], shift, scale)), h, w)
