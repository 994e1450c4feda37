"""Fused attention projections: a model transform applied from outside the model code (engine.models.unet's
Attention stays the plain one). Self-attention's to_q/to_k/to_v become one Linear, cross-attention's to_k/to_v
one: one GEMM instead of three; the attention math is the model's own `Attention.attend`.
"""
import torch
import torch.nn as nn

from ..models.unet import Attention


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
    """engine.models.unet.Attention for self-attention with q, k, v from one GEMM: (B, N, 3·inner) split in three."""

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
    """engine.models.unet.Attention for cross-attention with k, v of the text from one GEMM."""

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
