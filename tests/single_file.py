"""Test helper: rewrite a diffusers folder's weights as a single CompVis/A1111 .safetensors checkpoint, by
inverting the loader's key map (weights/keys.py). SD1 folders get the OpenAI-CLIP layout
(cond_stage_model.transformer.*), SD2 folders (gelu text encoder) the OpenCLIP layout (cond_stage_model.model.*:
fused in_proj q/k/v, resblocks, positional_embedding, token_embedding, ln_final, text_projection, plus the
unused last resblock that SD2 files carry because SD2 conditions on OpenCLIP's penultimate layer). SD-XL folders
(text_encoder_2) get the SGM layout: conditioner.embedders.0.transformer.* (CLIP ViT-L) and
conditioner.embedders.1.model.* (OpenCLIP bigG, every layer, text_projection stored as the (in, out) matrix). VAE
attention projections are stored as 1x1 convs (C, C, 1, 1) and the DDPM buffers sit at the top level, as in
the released files. tests/test_weights.py checks this layout against diffusers' own single-file converters.
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffedit_engine.weights import keys


def _inverse(table: dict) -> dict:
    return {new: old for old, new in table.items()}


def _rename(s: str, table: dict) -> str:
    for old, new in table.items():
        if s.startswith(old):
            return new + s[len(old):]
    return s


def _load(folder: Path, sub: str, stem: str) -> dict:
    return load_file(str(folder / sub / f"{stem}.safetensors"))


def unet_to_ldm(sd: dict, lpb: int) -> dict:
    fixed, resnet = _inverse(keys.UNET_FIXED), _inverse(keys.UNET_RESNET)
    mid = _inverse(keys.UNET_MID)
    attn_up = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k, v in sd.items():
        new = _rename(k, fixed)
        if new == k:
            m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$", k)
            if m:
                side, b, what, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
                if what.endswith("samplers"):
                    layer = lpb  # the last entry of the block
                i = 1 + b * (lpb + 1) + layer if side == "down" else b * (lpb + 1) + layer
                where = "input_blocks" if side == "down" else "output_blocks"
                if what == "resnets":
                    new = f"{where}.{i}.0.{_rename(rest, resnet)}"
                elif what == "attentions":
                    new = f"{where}.{i}.1.{rest}"
                elif what == "downsamplers":
                    new = f"{where}.{i}.0.op.{rest[len('conv.'):]}"
                else:
                    new = f"{where}.{i}.{2 if b in attn_up else 1}.{rest}"
            else:
                for d, ldm in mid.items():
                    if k.startswith(d):
                        rest = k[len(d):]
                        new = f"middle_block.{ldm}." + (rest if "attentions" in d else _rename(rest, resnet))
        assert new != k or k.startswith(("conv_in", "conv_out", "time_embedding")), k
        out[keys.UNET_PREFIX + new] = v
    return out


def vae_to_ldm(sd: dict) -> dict:
    n = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    fixed, resnet, attn = _inverse(keys.VAE_FIXED), _inverse(keys.VAE_RESNET), _inverse(keys.VAE_ATTN)
    out = {}
    for k, v in sd.items():
        side, _, rest = k.partition(".")
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)$", rest)
        if m:
            kind, b, sub, layer, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
            b = n - 1 - b if kind == "up" else b
            sub = f"block.{layer}" if layer is not None else sub.split("rs.")[0]
            tail = _rename(tail, resnet) if layer is not None else tail
            rest = f"{kind}.{b}.{sub}.{tail}"
        elif rest.startswith("mid_block.attentions.0."):
            rest = "mid.attn_1." + _rename(rest[len("mid_block.attentions.0."):], attn)
            if v.ndim == 2:  # LDM's AttnBlock uses 1x1 convs
                v = v[:, :, None, None]
        else:
            rest = _rename(rest, fixed)
            mm = re.match(r"mid\.block_(\d)\.(.*)$", rest)
            if mm:
                rest = f"mid.block_{mm.group(1)}.{_rename(mm.group(2), resnet)}"
        out[keys.VAE_PREFIX + f"{side}.{rest}" if side in ("encoder", "decoder") else keys.VAE_PREFIX + k] = v
    return out


def clip_to_ldm(sd: dict, prefix: str = keys.CLIP_PREFIX) -> dict:
    out = {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    # Released SD1 files carry the position-ids buffer; the loader must drop it.
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def openclip_to_ldm(sd: dict, seed: int = 0, full_tower: bool = True, prefix: str = keys.OPENCLIP_PREFIX) -> dict:
    sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}
    fixed, layer_map = _inverse(keys.OPENCLIP_FIXED), _inverse(keys.OPENCLIP_LAYER)
    n = len({m.group(1) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[prefix + fixed[k]] = v
            continue
        if k == "text_projection.weight":  # SD-XL's bigG: OpenCLIP applies it as x @ P
            out[prefix + "text_projection"] = v.t().contiguous()
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)$", k)
        assert m, k
        i, rest = m.group(1), m.group(2)
        if re.match(r"self_attn\.[qkv]_proj\.", rest):
            if rest.startswith("self_attn.q_proj."):
                what = rest.split(".")[-1]
                fused = torch.cat([sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{what}"] for p in "qkv"])
                out[prefix + f"transformer.resblocks.{i}.attn.in_proj_{what}"] = fused
            continue
        out[prefix + f"transformer.resblocks.{i}.{_rename(rest, layer_map)}"] = v
    # SD2 files hold OpenCLIP's full tower: one more resblock (unused: SD2 takes the penultimate layer), the
    # projection into CLIP space and the contrastive temperature. Random values: they must not matter.
    # (Files converted back from a diffusers folder hold only the used layers: full_tower=False.)
    if not full_tower:
        return out
    g = torch.Generator().manual_seed(seed)
    meta = next(iter(sd.values())).is_meta  # shapes only (detection tests at full SD size)
    rand = lambda *shape: torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g)  # noqa: E731
    for k in [k for k in out if ".resblocks.0." in k]:
        out[k.replace(".resblocks.0.", f".resblocks.{n}.")] = rand(*out[k].shape)
    hidden = sd["text_model.embeddings.token_embedding.weight"].shape[1]
    out[keys.OPENCLIP_PREFIX + "text_projection"] = rand(hidden, hidden)
    out[keys.OPENCLIP_PREFIX + "logit_scale"] = rand()
    return out


def to_single_file(folder: Path, full_tower: bool = True) -> dict:
    """The single-file state dict (CompVis/A1111 key names) holding a diffusers folder's weights."""
    folder = Path(folder)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    if (folder / "text_encoder_2").is_dir():
        return sdxl_state_dict(folder, unet_cfg["layers_per_block"])
    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    return ldm_state_dict(_load(folder, "unet", "diffusion_pytorch_model"), unet_cfg["layers_per_block"],
                          _load(folder, "vae", "diffusion_pytorch_model"), _load(folder, "text_encoder", "model"),
                          openclip=text_cfg["hidden_act"] == "gelu", full_tower=full_tower)


def ldm_state_dict(unet: dict, layers_per_block: int, vae: dict, text: dict, openclip: bool,
                   full_tower: bool = True) -> dict:
    """diffusers/transformers state dicts -> one single-file state dict."""
    sd = unet_to_ldm(unet, layers_per_block)
    sd.update(vae_to_ldm(vae))
    sd.update(openclip_to_ldm(text, full_tower=full_tower) if openclip else clip_to_ldm(text))
    # Training leftovers stored at the top level of LDM checkpoints.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd["betas"], sd["alphas_cumprod"] = betas, torch.cumprod(1 - betas, 0)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return sd


def sdxl_state_dict(folder: Path, layers_per_block: int) -> dict:
    """An SD-XL folder -> the SGM single-file layout (sd_xl_base_1.0.safetensors's key names)."""
    sd = unet_to_ldm(_load(folder, "unet", "diffusion_pytorch_model"), layers_per_block)
    sd.update(vae_to_ldm(_load(folder, "vae", "diffusion_pytorch_model")))
    sd.update(clip_to_ldm(_load(folder, "text_encoder", "model"), keys.SDXL_CLIP_PREFIX))
    sd.update(openclip_to_ldm(_load(folder, "text_encoder_2", "model"), full_tower=False,
                              prefix=keys.SDXL_OPENCLIP_PREFIX))
    sd[keys.SDXL_OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)  # unused by the engine
    sd["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)  # SGM's training buffer
    return sd


def write_single_file(folder: Path, path: Path, edit: dict | None = None, full_tower: bool = True) -> Path:
    """Write folder's weights to path in single-file layout; edit: key -> tensor (None deletes the key)."""
    sd = to_single_file(folder, full_tower)
    for k, v in (edit or {}).items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return Path(path)
