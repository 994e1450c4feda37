"""SD3Transformer2DModel's config (Stable Diffusion 3 / 3.5 / 3.5 Medium) as a frozen dataclass whose fields are
diffusers' transformer/config.json keys, with the options the engine does not implement asserted. Kept apart from
engine/models/mmdit.py (the model) so each stays a short file.
"""
from dataclasses import dataclass, fields

CLASS_NAME = "SD3Transformer2DModel"
_QK_NORMS = (None, "rms_norm")  # SD 3.0: none; SD 3.5 (Large, Medium): RMSNorm over each head's q and k


@dataclass(frozen=True)
class SD3TransformerConfig:
    """Fields and defaults are diffusers' SD3Transformer2DModel arguments (the defaults: the paper's depth-18
    MMDiT; released configs set every field, e.g. pos_embed_max_size 192 for SD 3 / 3.5 Large, 384 for 3.5 Medium)."""
    sample_size: int = 128  # the training latent size; it sets the position table's frequency scale (base size)
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text encoders' context
    caption_projection_dim: int = 1152  # width of the text stream; the blocks need it equal to the image stream's
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16  # None: in_channels (diffusers' rule)
    pos_embed_max_size: int = 96  # the stored position table is pos_embed_max_size x pos_embed_max_size patches
    dual_attention_layers: tuple = ()  # MMDiT-X (3.5 Medium): blocks with a second, image-only self-attention
    qk_norm: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "SD3TransformerConfig":
        """Build from a parsed transformer/config.json; other bookkeeping (`_diffusers_version`...) is ignored."""
        assert d.get("_class_name") == CLASS_NAME, (
            f"SD3 transformer config: _class_name={d.get('_class_name')!r} is not {CLASS_NAME!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __post_init__(self):
        # JSON gives a list; a tuple keeps the frozen config hashable.
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers or ()))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        assert self.qk_norm in _QK_NORMS, (
            f"SD3 transformer config: qk_norm={self.qk_norm!r} is not supported (only {list(_QK_NORMS)})")
        # Without a maximum size diffusers builds a non-stored table at sample_size; no SD3 checkpoint does that.
        assert self.pos_embed_max_size, "SD3 transformer config: pos_embed_max_size=None is not supported"
        assert self.caption_projection_dim == self.inner_dim, (
            f"SD3 transformer config: caption_projection_dim={self.caption_projection_dim} must equal "
            f"num_attention_heads * attention_head_dim = {self.inner_dim}")
        assert all(0 <= i < self.num_layers for i in self.dual_attention_layers), (
            f"SD3 transformer config: dual_attention_layers={list(self.dual_attention_layers)} must be block "
            f"indices below num_layers={self.num_layers}")

    @property
    def inner_dim(self) -> int:
        """Width of both token streams inside the blocks."""
        return self.num_attention_heads * self.attention_head_dim
