"""Black Forest Labs' single-file FLUX.1 transformer names -> the engine's (diffusers' FluxTransformer2DModel).

flux1-dev.safetensors / flux1-schnell.safetensors hold the transformer alone in BFL naming, bare; ComfyUI / Forge
files that bundle the encoders and autoencoder put it under model.diffusion_model. The facts are diffusers'
convert_flux_transformer_checkpoint_to_diffusers: the double blocks' fused qkv rows are q, k, v; a single block's
linear1 rows are q, k, v (hidden each) then the MLP's first layer (4 x hidden), its linear2 is the projection of
[attention | MLP] back; final_layer's adaLN is stored (shift, scale), diffusers' AdaLayerNormContinuous reads
(scale, shift). A guidance_in embedder is what makes a file FLUX.1-dev (schnell has none).

convert(header) gives the loader a transformer Part's tensor map and the config.json the shapes imply.
"""
import re

from . import keys
from .files import CheckpointError
from .keys import ID, SWAP
from .parts import Part

PREFIX = "model.diffusion_model."
QKV = tuple(("chunk", i, 3) for i in range(3))
# linear1 = [q | k | v | mlp] with mlp 4x as wide: sevenths 0, 1, 2 and 3-6 (no widths needed).
LINEAR1 = tuple(("chunk", i, 7) for i in range(3)) + (("chunk", 3, 7, 4),)
HEAD_DIM = 128  # every FLUX.1 release (24 heads of 128 = 3072); the file shows it in the QK norms' width
AXES_DIMS_ROPE = {128: [16, 56, 56]}  # not stored in the file: BFL's FluxParams for head dim 128

# Outside the blocks: BFL name prefix -> (diffusers prefix, transform).
FIXED = {
    "img_in.": ("x_embedder.", ID),
    "txt_in.": ("context_embedder.", ID),
    "time_in.in_layer.": ("time_text_embed.timestep_embedder.linear_1.", ID),
    "time_in.out_layer.": ("time_text_embed.timestep_embedder.linear_2.", ID),
    "vector_in.in_layer.": ("time_text_embed.text_embedder.linear_1.", ID),
    "vector_in.out_layer.": ("time_text_embed.text_embedder.linear_2.", ID),
    "guidance_in.in_layer.": ("time_text_embed.guidance_embedder.linear_1.", ID),  # dev only
    "guidance_in.out_layer.": ("time_text_embed.guidance_embedder.linear_2.", ID),
    "final_layer.linear.": ("proj_out.", ID),
    "final_layer.adaLN_modulation.1.": ("norm_out.linear.", SWAP),
}
# Inside double_blocks.N: BFL name -> [(diffusers name under transformer_blocks.N, transform)]; the stream prefix
# (img_ / txt_) picks the image or text weights.
DOUBLE = {
    "img_mod.lin.": [("norm1.linear.", ID)],
    "img_attn.qkv.": [("attn.to_q.", QKV[0]), ("attn.to_k.", QKV[1]), ("attn.to_v.", QKV[2])],
    "img_attn.norm.query_norm.scale": [("attn.norm_q.weight", ID)],
    "img_attn.norm.key_norm.scale": [("attn.norm_k.weight", ID)],
    "img_attn.proj.": [("attn.to_out.0.", ID)],
    "img_mlp.0.": [("ff.net.0.proj.", ID)],
    "img_mlp.2.": [("ff.net.2.", ID)],
    "txt_mod.lin.": [("norm1_context.linear.", ID)],
    "txt_attn.qkv.": [("attn.add_q_proj.", QKV[0]), ("attn.add_k_proj.", QKV[1]), ("attn.add_v_proj.", QKV[2])],
    "txt_attn.norm.query_norm.scale": [("attn.norm_added_q.weight", ID)],
    "txt_attn.norm.key_norm.scale": [("attn.norm_added_k.weight", ID)],
    "txt_attn.proj.": [("attn.to_add_out.", ID)],
    "txt_mlp.0.": [("ff_context.net.0.proj.", ID)],
    "txt_mlp.2.": [("ff_context.net.2.", ID)],
}
# Inside single_blocks.N -> under single_transformer_blocks.N.
SINGLE = {
    "modulation.lin.": [("norm.linear.", ID)],
    "linear1.": [("attn.to_q.", LINEAR1[0]), ("attn.to_k.", LINEAR1[1]), ("attn.to_v.", LINEAR1[2]),
                 ("proj_mlp.", LINEAR1[3])],
    "linear2.": [("proj_out.", ID)],
    "norm.query_norm.scale": [("attn.norm_q.weight", ID)],
    "norm.key_norm.scale": [("attn.norm_k.weight", ID)],
}
BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.*)$")


def is_flux_file(names) -> bool:
    """BFL's transformer naming (with or without model.diffusion_model.)."""
    return any(k.removeprefix(PREFIX).startswith(("double_blocks.", "single_blocks.")) for k in names)


def transformer_key(k: str) -> list[tuple[str, tuple]] | None:
    """A BFL transformer key (after model.diffusion_model.) -> [(diffusers key, transform)]; None = unknown."""
    for old, (new, t) in FIXED.items():
        if k.startswith(old):
            return [(new + k[len(old):], t)]
    m = BLOCK.match(k)
    if not m:
        return None
    kind, i, rest = m.groups()
    table, under = (DOUBLE, "transformer_blocks") if kind == "double" else (SINGLE, "single_transformer_blocks")
    for old, targets in table.items():
        # a name ending in a dot is a Linear's prefix (.weight / .bias follow); otherwise the whole tensor name
        if rest.startswith(old) if old.endswith(".") else rest == old:
            tail = rest[len(old):]
            return [(f"{under}.{i}.{new}{tail}", t) for new, t in targets]
    return None


def _count(shapes: dict, pattern: str) -> int:
    return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})


def transformer_config(shapes: dict, source="the file") -> dict:
    """diffusers transformer/config.json fields from the converted transformer's key -> shape map: widths from the
    embedders, depths from the block indices, the head width from the QK norms, dev = a guidance embedder."""
    try:
        hidden, cin = shapes["x_embedder.weight"]
        head = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if "transformer_blocks.0.attn.norm_q.weight" in \
            shapes else shapes["single_transformer_blocks.0.attn.norm_q.weight"][0]
        mlp = [k for k in shapes if k.endswith(".proj_mlp.weight")]
        config = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cin,
                  "out_channels": shapes["proj_out.weight"][0],
                  "num_layers": _count(shapes, r"transformer_blocks\.(\d+)\."),
                  "num_single_layers": _count(shapes, r"single_transformer_blocks\.(\d+)\."),
                  "attention_head_dim": head, "num_attention_heads": hidden // head,
                  "joint_attention_dim": shapes["context_embedder.weight"][1],
                  "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
                  "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes}
    except KeyError as e:
        raise CheckpointError(f"{source}: missing FLUX transformer key {e.args[0]!r} (as converted) needed to infer "
                              f"the architecture") from None
    if hidden % head or any(shapes[k][0] != 4 * hidden for k in mlp):
        raise CheckpointError(f"{source}: a FLUX transformer of width {hidden} with QK norms of width {head} and "
                              f"single-block MLPs of {sorted({shapes[k][0] for k in mlp})} rows is not FLUX.1's "
                              f"layout (heads of equal width, MLP 4 x width)")
    if head not in AXES_DIMS_ROPE:
        raise CheckpointError(f"{source}: FLUX transformer with attention head dim {head} (FLUX.1 uses "
                              f"{HEAD_DIM}): its rotary axes are unknown; pass config=<a diffusers FLUX folder>")
    config["axes_dims_rope"] = AXES_DIMS_ROPE[head]
    return config


def convert(header: dict, path=None, config: dict | None = None) -> tuple[dict, dict]:
    """A safetensors header (key -> (dtype, shape)) of a BFL-layout file -> (tensors, config): tensors is a
    weights.parts.Part tensor map, engine key -> (path, stored key, transform), of the transformer's keys (those
    under model.diffusion_model. when the file has that prefix, else every key); config the diffusers config.json
    its shapes imply, or `config` when given (a diffusers folder's transformer/config.json). Keys of other
    components (the bundled autoencoder, text encoders) are left to the caller; an unknown transformer key fails."""
    prefixed = any(k.startswith(PREFIX) for k in header)
    tensors, shapes, unknown = {}, {}, []
    for src, (_, shape) in header.items():
        if prefixed and not src.startswith(PREFIX):
            continue
        out = transformer_key(src.removeprefix(PREFIX))
        if out is None:
            unknown.append(src)
        for k, t in out or ():
            tensors[k], shapes[k] = (path, src, t), keys.transform_shape(shape, t)
    where = path or "the file"
    if unknown:
        raise CheckpointError(f"{where}: unexpected key {unknown[0]!r} (shape {header[unknown[0]][1]}), not part of a "
                              f"FLUX.1 transformer; {len(unknown)} unknown: {unknown[:8]}")
    if not tensors:
        raise CheckpointError(f"{where}: no FLUX transformer weights (no double_blocks.* / single_blocks.* keys)")
    return tensors, dict(config) if config is not None else transformer_config(shapes, where)


def part(path, header: dict, config: dict | None = None) -> Part:
    """convert's result as the transformer's weights.parts.Part (config, tensors, shapes after the transforms)."""
    tensors, cfg = convert(header, path, config)
    return Part(cfg, tensors, {k: keys.transform_shape(header[src][1], t) for k, (_, src, t) in tensors.items()})
