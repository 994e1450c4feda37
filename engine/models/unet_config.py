"""UNet2DConditionModel's config as a frozen dataclass (fields = diffusers' unet/config.json keys), with the
options the engine does not implement asserted at their one supported value. Kept apart from engine/unet.py
(the model) so each stays a short file.
"""
from dataclasses import dataclass, fields

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)  # None: no mid block

# Config keys we do not implement, each with the one value accepted (diffusers' default, used by SD 1.x/2.x).
_FIXED = dict(only_cross_attention=False, dual_cross_attention=False, class_embed_type=None, num_class_embeds=None,
              resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
              time_embedding_type="positional", time_embedding_act_fn=None, timestep_post_act=None,
              time_cond_proj_dim=None, attention_type="default", class_embeddings_concat=False,
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
    # SD-XL's micro-conditioning: sinusoidal embeddings of the add_time_ids, concatenated with the pooled text
    # embedding (projection_class_embeddings_input_dim = n_ids * addition_time_embed_dim + pooled width).
    addition_embed_type: str | None = None  # None | "text_time"
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

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
        assert self.addition_embed_type in (None, "text_time"), (
            f"UNet config: addition_embed_type={self.addition_embed_type!r} not supported (only None, 'text_time')")
        assert self.addition_embed_type is None or (self.addition_time_embed_dim and
                                                    self.projection_class_embeddings_input_dim), (
            "UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
            "projection_class_embeddings_input_dim")
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
