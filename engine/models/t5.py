"""T5 encoder (Raffel et al. 2020; v1.1 as SD 3.x and FLUX.1 use it): token embeddings without absolute
positions, pre-RMSNorm blocks of self-attention with a bucketed relative-position bias and a (gated) feed-forward,
final RMSNorm. Pure modules; attribute names equal the keys of transformers' T5EncoderModel state dict
(shared.weight, encoder.block.{i}.layer.{0,1}.*, encoder.final_layer_norm.weight), so a strict
load_state_dict(assign=True) on a meta-device model fills them.

Embeddings: transformers ties `encoder.embed_tokens` to `shared`; the module holds ONE table, `shared`. Files differ
in which name they store (save_pretrained and SD 3's text_encoder_3 store `shared.weight`; some conversions hold
`encoder.embed_tokens.weight`, alone or beside it): `t5_key` maps a stored key to the engine's, or to None (drop).
fp16: transformers keeps every `wo` in fp32 when a T5 is loaded in fp16 (`_keep_in_fp32_modules`; the v1.1 XXL
feed-forward output overflows fp16), so the residual stream turns fp32 after the first block; `t5_dtype` names
the dtype a loader should give each tensor to reproduce that. bf16 keeps every tensor in bf16, as transformers does.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out in the input's dtype, as transformers computes it: F.gelu(approximate=
    "tanh") rounds differently in bf16/fp16 (about 1e-2 apart after a few blocks), the formula matches bit for bit."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTS = {"gelu_new": gelu_new,  # "gated-gelu" (v1.1, flan-t5)
         "gelu": F.gelu,  # exact erf GELU (feed_forward_proj "gelu"; "gated-gelu" means gelu_new)
         "relu": F.relu}  # T5 1.0


@dataclass(frozen=True)
class T5Config:
    """Fields named as transformers' T5 config.json keys; defaults are transformers' own (t5-small, T5 1.0).
    dense_act_fn and is_gated_act derive from feed_forward_proj, as transformers derives them."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # transformers' backwards-compatible special case: "gated-gelu" means the tanh GELU.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_json(cls, d: dict) -> "T5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        assert d.get("model_type", "t5") == "t5", f"unsupported model_type {d.get('model_type')!r} (T5 only)"
        assert not d.get("is_decoder", False), "a T5 decoder config: the engine runs the encoder only"
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        parts = cfg.feed_forward_proj.split("-")
        assert len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated"), \
            f"unsupported feed_forward_proj {cfg.feed_forward_proj!r}"
        assert cfg.dense_act_fn in _ACTS, f"unsupported activation {cfg.dense_act_fn!r} in {cfg.feed_forward_proj!r}"
        for key in ("dense_act_fn", "is_gated_act"):  # written by transformers: must agree with feed_forward_proj
            assert d.get(key, getattr(cfg, key)) == getattr(cfg, key), f"{key}={d[key]!r} contradicts feed_forward_proj"
        assert cfg.relative_attention_num_buckets % 4 == 0 and cfg.relative_attention_num_buckets >= 4
        return cfg


def t5_key(stored_key: str, stored_keys=()) -> str | None:
    """The engine key for a key of a stored T5 (encoder or full encoder-decoder) state dict; None: not used.
    `encoder.embed_tokens.weight` is the tied copy of `shared.weight`: it becomes `shared.weight` unless
    `stored_keys` (all the file's keys) holds `shared.weight` itself. Other keys pass unchanged, so a strict load
    names anything unexpected."""
    if stored_key == "encoder.embed_tokens.weight":
        return None if "shared.weight" in stored_keys else "shared.weight"
    if stored_key.startswith(("decoder.", "lm_head.")):  # a full T5: the engine needs the encoder only
        return None
    return stored_key


def t5_dtype(engine_key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a loader gives tensor `engine_key` of a model run in `dtype`: transformers' fp16 rule keeps the
    feed-forward output projections (`wo`) in fp32."""
    return torch.float32 if dtype == torch.float16 and engine_key.endswith(".DenseReluDense.wo.weight") else dtype


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half the buckets for keys after the query, half for keys before (or at) it;
    within a half, exact distances below a quarter of the buckets, then log-spaced bins up to max_distance,
    beyond which every distance shares the last bucket."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    n = relative_position.abs()
    exact = half // 2
    # Clamped below at `exact`: the log branch is only taken there, and log(0) would make a -inf to cast.
    log_bin = exact + (torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                       * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_bin.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """RMSNorm: no mean subtraction, no bias; the mean square in fp32 whatever the input dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # fp32 (x is promoted)
        return self.weight * h.to(self.weight.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads = cfg.num_heads
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:  # block 0 only: its bias is shared by every block
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        # (B, L, heads * d_kv) -> (B, heads, L, d_kv)
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        # No 1/sqrt(d_kv): T5 folds that scale into the initialisation of q. No padding mask: SD 3 and FLUX attend
        # to the pad tokens too.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class DenseReluDense(nn.Module):
    """Gated (v1.1): wo(act(wi_0 x) * wi_1 x); plain (1.0): wo(act(wi x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act, self.gated = _ACTS[cfg.dense_act_fn], cfg.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        # wo may be kept in fp32 under an fp16 model (t5_dtype): its input follows its weight.
        return self.wo(h.to(self.wo.weight.dtype))


class LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' fp16 guard after each residual add: an inf turns into ±(fp16 max − 1000), so the next RMSNorm
    sees finite values (without an inf the clamp to ±max changes nothing). A tensor test, no host sync."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big).to(x.dtype)
    return torch.clamp(x, -limit, limit)


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([LayerSelfAttention(cfg, has_relative_attention_bias), LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return clamp_fp16(self.layer[1](clamp_fp16(self.layer[0](x, bias))))


class Encoder(nn.Module):
    """The block stack; its token embedding is the model's `shared` (not a parameter of its own here)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.block = nn.ModuleList(Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """(1, heads, L, L) additive attention bias from block 0's table, for every block."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None],  # key position − query position
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (L, L, heads) -> (1, heads, L, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.position_bias(x.shape[1], x.device)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """ids (B, L) -> last_hidden_state (B, L, d_model), after the final RMSNorm; no attention mask."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.shared(input_ids))
