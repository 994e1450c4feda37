"""CLIP text encoder (Radford et al. 2021) as Stable Diffusion uses it: token + learned position embeddings,
pre-LayerNorm transformer with a causal mask, final LayerNorm. Pure modules; attribute names equal the
transformers CLIPTextModel / CLIPTextModelWithProjection checkpoint keys (text_model.*, text_projection.*), so
a strict load with assign=True fills them. SD-XL's second encoder (OpenCLIP bigG) is the one with the projection.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# config.json keys that describe training, tokenizer ids or provenance, not the inference graph.
_IGNORED = {"_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
            "attention_dropout", "dropout", "initializer_range", "initializer_factor",
            "bos_token_id", "eos_token_id", "pad_token_id"}
_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid GELU approximation (SD1)
         "gelu": F.gelu}  # exact erf GELU (OpenCLIP, SD2)


@dataclass(frozen=True)
class CLIPTextConfig:
    """Fields named as transformers' text_encoder/config.json keys; defaults are transformers' own."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # the projection head's width (CLIPTextModelWithProjection only)

    @classmethod
    def from_json(cls, d: dict, architecture: str = "CLIPTextModel") -> "CLIPTextConfig":
        """architecture: the class the config must name (a projection head is a different key set)."""
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(d.get("architectures") or [architecture]) == {architecture}, d.get("architectures")
        assert d.get("model_type", "clip_text_model") == "clip_text_model", d.get("model_type")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        assert cfg.hidden_act in _ACTS, f"unsupported hidden_act {cfg.hidden_act!r}"
        assert cfg.hidden_size % cfg.num_attention_heads == 0
        return cfg

    @classmethod
    def sd1(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text tower, as in SD 1.x (for checkpoints that ship no config)."""
        return cls(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)

    @classmethod
    def sd2(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14 text tower as SD 2.x ships it: 23 of 24 layers (SD2 conditions on the penultimate)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512)


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions built here rather than kept as a buffer: a non-persistent buffer would stay on the meta device.
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(pos)  # (B, T, D)


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, D) -> (B, heads, T, D/heads)
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # CLIP's text tower is causal: each token sees itself and earlier tokens only (padding needs no mask).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, hidden_layer: int) -> torch.Tensor:
        """hidden_states[hidden_layer] of [embeddings, layer 1, ..., layer N] (IndexError if out of range),
        before the final LayerNorm; layers past the chosen one cannot affect it and are skipped."""
        layers = self.encoder.layers
        x = self.embeddings(input_ids)
        for layer in layers[:range(len(layers) + 1)[hidden_layer]]:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """ids (B, T ≤ max_position_embeddings) -> hidden states (B, T, hidden_size)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor, hidden_layer: int | None = None) -> torch.Tensor:
        """hidden_layer=None: last layer's output; an int k indexes the states [embeddings, layer 1, ...,
        layer N] as transformers' hidden_states[k] does (k=-2 is A1111's "clip skip 2"). The final LayerNorm is
        applied either way, as A1111 and diffusers' clip_skip do."""
        tm = self.text_model
        return tm.final_layer_norm(tm(input_ids, len(tm.encoder.layers) if hidden_layer is None else hidden_layer))

    def hidden_state(self, input_ids: torch.Tensor, hidden_layer: int = -2) -> torch.Tensor:
        """transformers' hidden_states[hidden_layer] as is, without the final LayerNorm (SD-XL's context)."""
        return self.text_model(input_ids, hidden_layer)


class CLIPTextModelWithProjection(nn.Module):
    """ids (B, T) -> (hidden_states[hidden_layer] (B, T, hidden_size) without the final LayerNorm,
    text_embeds (B, projection_dim)): SD-XL's second encoder gives its penultimate state and its pooled output
    (the final-LayerNorm state at the end-of-text token, projected)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, hidden_layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
        tm = self.text_model
        n = range(len(tm.encoder.layers) + 1)[hidden_layer]
        hidden = x = tm(input_ids, n)
        for layer in tm.encoder.layers[n:]:
            x = layer(x)
        # <|endoftext|> has the largest id in CLIP's vocabulary: argmax finds the first one (OpenCLIP's pooling,
        # and transformers' for these configs).
        pooled = tm.final_layer_norm(x)[torch.arange(len(x), device=x.device), input_ids.argmax(-1)]
        return hidden, self.text_projection(pooled)
