"""Stable Diffusion 3 / 3.5 / 3.5 Medium denoiser: the MMDiT transformer (Esser et al. 2024, arXiv 2403.03206;
diffusers' SD3Transformer2DModel) as a plain nn.Module.

Image patches and text tokens are two streams of the same width; every block modulates both from one conditioning
vector (timestep + pooled text), attends jointly over [image tokens, text tokens] with separate projections per
stream, and runs a separate MLP per stream. SD 3.5 normalises each head's q and k (RMSNorm); 3.5 Medium's MMDiT-X
adds, in its first blocks, a second self-attention over the image tokens alone. Attribute names equal the diffusers
checkpoint keys, so transformer/diffusion_pytorch_model.safetensors loads with a strict
`load_state_dict(sd, strict=True, assign=True)` onto `SD3Transformer(cfg)` built on the meta device.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .mmdit_config import SD3TransformerConfig  # noqa: F401 (re-exported)
from .unet import TimestepEmbedding, timestep_embedding

EPS = 1e-6  # every norm in the model (LayerNorms, RMSNorms) uses it


def layer_norm(x):
    """LayerNorm without affine parameters: every one in the model is followed by an adaptive scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def modulate(x, shift, scale):
    return layer_norm(x) * (1 + scale) + shift


def sincos_table(dim: int, grid: int, base: int) -> torch.Tensor:
    """The (grid*grid, dim) 2-D sin-cos position table of a grid x grid patch grid, positions scaled so that `base`
    patches span [0, base) (the training size): [1-D code of the column | 1-D code of the row] per patch, each
    1-D code [sin(p*w_k) | cos(p*w_k)] with w_k = 10000^(-k/(dim/4)). Computed in float64, stored in float32."""
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base)  # float32 first, as diffusers rounds it
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    code = torch.outer(pos.double(), omega)  # (grid, dim/4)
    code = torch.cat([code.sin(), code.cos()], -1).float()  # (grid, dim/2); float32 before the big table
    rows, cols = code[:, None].expand(grid, grid, -1), code[None, :].expand(grid, grid, -1)  # (grid, grid, dim/2)
    return torch.cat([cols, rows], -1).reshape(grid * grid, dim)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, plus the stored position table's centre crop of the latent's size (so a latent
    smaller than the table sees the positions around the table's middle, as in training)."""

    def __init__(self, cfg: SD3TransformerConfig):
        super().__init__()
        self.patch, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        table = sincos_table(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", table[None])  # (1, max_size^2, dim), a checkpoint key

    def forward(self, x):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.view(self.max_size, self.max_size, -1)[top:top + h, left:left + w].reshape(h * w, -1)
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, dim, h, w) -> (B, h*w, dim), row-major patches
        return (tokens + pos).to(tokens.dtype)


class TimeTextEmbed(nn.Module):
    """The conditioning vector: MLP(sinusoidal(t), 256 channels) + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # the same Linear-SiLU-Linear shape and keys

    def forward(self, t, pooled):
        emb = timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(emb.to(pooled.dtype)) + self.text_embedder(pooled)


class Modulation(nn.Module):
    """adaLN: n (B, 1, dim) shift/scale/gate vectors from SiLU(conditioning). Chunk order (the checkpoint's):
    6 = shift, scale, gate of the attention, then of the MLP; 9 = those + shift, scale, gate of the second
    attention (MMDiT-X); 2 = scale, shift (AdaLayerNormContinuous: the last block's text stream, the output)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, cond):
        return self.linear(F.silu(cond))[:, None].chunk(self.n, dim=-1)


class RMSNorm(nn.Module):
    """Per-head RMSNorm of q or k (SD 3.5), the mean square taken in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Self-attention over the image tokens, joined (joint=True) by the text tokens with their own projections
    (add_*_proj, to_add_out). to_add_out is absent where the text output is dropped (the last block)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, joint: bool, text_out: bool):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm else (None, None)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # checkpoint index 1 is a parameterless dropout
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm else (None,) * 2
            self.to_add_out = nn.Linear(inner, dim) if text_out else None

    def project(self, x, q, k, v, norm_q, norm_k, need_q=True):
        """(B, N, dim) -> q, k, v as (B, heads, N, head_dim), q and k normalised per head when configured."""
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        qs = split(q(x)) if need_q else None
        ks, vs = split(k(x)), split(v(x))
        if norm_q is not None:
            ks = norm_k(ks)
            qs = None if qs is None else norm_q(qs)
        return qs, ks, vs

    def forward(self, x, text=None):
        """x (B, N, dim), text (B, L, dim) or None -> (x out, text out or None)."""
        q, k, v = self.project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        n = x.shape[1]
        if text is not None:
            # Where the text output is dropped, only its keys and values matter: image queries alone.
            text_out = self.to_add_out is not None
            tq, tk, tv = self.project(text, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                      self.norm_added_q, self.norm_added_k, need_q=text_out)
            q = torch.cat([q, tq], 2) if text_out else q
            k, v = torch.cat([k, tk], 2), torch.cat([v, tv], 2)  # (B, heads, N + L, head_dim)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N (+ L), inner)
        out_text = self.to_add_out(o[:, n:]) if text is not None and self.to_add_out is not None else None
        return self.to_out[0](o[:, :n]), out_text


class GELU(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' GELU module: the Linear is its `proj`)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Index 1 is diffusers' dropout; an Identity keeps the Linear at the checkpoint's `net.2`.
        self.net = nn.ModuleList([GELU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class JointBlock(nn.Module):
    """One MMDiT block (diffusers' JointTransformerBlock): adaLN-Zero on both streams, joint attention, per-stream
    MLPs; `dual`: MMDiT-X's second image-only attention; `last` (context_pre_only): the text stream only feeds
    keys and values, its output is not computed."""

    def __init__(self, cfg: SD3TransformerConfig, dual: bool, last: bool):
        super().__init__()
        dim, heads, hd, qk = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm is not None
        self.last = last
        self.norm1 = Modulation(dim, 9 if dual else 6)
        self.norm1_context = Modulation(dim, 2 if last else 6)
        self.attn = Attention(dim, heads, hd, qk, joint=True, text_out=not last)
        self.attn2 = Attention(dim, heads, hd, qk, joint=False, text_out=False) if dual else None
        self.ff = FeedForward(dim)
        self.ff_context = None if last else FeedForward(dim)

    def forward(self, x, text, cond):
        """x (B, N, dim) image tokens, text (B, L, dim), cond (B, dim) -> (x, text or None)."""
        shift, scale, gate, shift_m, scale_m, gate_m, *second = self.norm1(cond)
        if self.last:
            t_scale, t_shift = self.norm1_context(cond)
        else:
            t_shift, t_scale, t_gate, t_shift_m, t_scale_m, t_gate_m = self.norm1_context(cond)
        normed = layer_norm(x)  # both attentions read the block's input (the second not the first one's update)
        a, ta = self.attn(normed * (1 + scale) + shift, modulate(text, t_shift, t_scale))
        x = x + gate * a
        if self.attn2 is not None:
            shift2, scale2, gate2 = second
            x = x + gate2 * self.attn2(normed * (1 + scale2) + shift2)[0]
        x = x + gate_m * self.ff(modulate(x, shift_m, scale_m))
        if self.last:
            return x, None
        text = text + t_gate * ta
        text = text + t_gate_m * self.ff_context(modulate(text, t_shift_m, t_scale_m))
        return x, text


class SD3Transformer(nn.Module):
    """forward(x (B, in_channels, h, w) latent, t, context (B, L, joint_attention_dim), pooled (B,
    pooled_projection_dim)) -> velocity (B, out_channels, h, w). t: diffusers' timestep (sigma * 1000), a python
    number, 0-d or (B,) tensor. h and w must be multiples of patch_size and at most pos_embed_max_size patches.
    guidance: the flow models' shared signature (FLUX-dev's distilled guidance); SD 3 has none, so only None."""

    def __init__(self, cfg: SD3TransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(dim, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(cfg, dual=i in cfg.dual_attention_layers, last=i == cfg.num_layers - 1)
            for i in range(cfg.num_layers))
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)

    def check_size(self, h: int, w: int):
        """One-line errors for latents the patch grid or the position table cannot take."""
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        if h % p or w % p:
            raise ValueError(f"SD3 transformer: latent {h}x{w} is not a multiple of the patch size {p} "
                             f"(the image must be a multiple of {8 * p} px)")
        if h > m * p or w > m * p:
            raise ValueError(f"SD3 transformer: latent {h}x{w} is larger than the position table "
                             f"({m * p}x{m * p} latent, {8 * m * p} px images)")

    def forward(self, x, t, context, pooled, guidance=None):
        cfg = self.config
        b, _, h, w = x.shape
        if guidance is not None:
            raise ValueError("SD3 transformer: it has no guidance embedding (guidance= is for FLUX.1-dev); "
                             "use classifier-free guidance")
        self.check_size(h, w)
        p, c = cfg.patch_size, cfg.out_channels
        tokens = self.pos_embed(x)
        cond = self.time_text_embed(torch.as_tensor(t, device=x.device).reshape(-1).expand(b), pooled)  # (B, dim)
        text = self.context_embedder(context)
        for block in self.transformer_blocks:
            tokens, text = block(tokens, text, cond)
        scale, shift = self.norm_out(cond)
        out = self.proj_out(modulate(tokens, shift, scale))  # (B, h/p * w/p, p*p*c), features ordered (p_row, p_col, c)
        # (B, h/p, w/p, p, p, c) -> (B, c, h/p, p, w/p, p) -> (B, c, h, w)
        return out.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
