"""A checkpoint's family from its names and safetensors header alone, before any weight is read: what the
runtime and the command line decide before loading — the default dtype, the per-family edit defaults, the
options a family refuses.

Families: "sd" (SD 1.x / 2.x / XL and their inpainting models), "sd3" (SD 3 / 3.5 / 3.5 Medium), "flux-dev"
(FLUX.1-dev, guidance-distilled: a guidance embedding) and "flux-schnell" (FLUX.1-schnell, timestep-distilled:
none). The loader (weights.load_model) decides for itself; these only read what it would read first.
"""
import json
from pathlib import Path

import torch

from ...weights import files, flux_keys, sd3

FLOW_FAMILIES = ("sd3", "flux-dev", "flux-schnell")

# Edit defaults where the user set none, as each family's own pipeline runs it:
#   SD 3.x: StableDiffusion3Pipeline's num_inference_steps 28 and guidance_scale 7.0;
#   FLUX.1-dev: FluxPipeline's 28 steps and guidance 3.5 (an input of the transformer, not CFG);
#   FLUX.1-schnell: 4 steps as released (timestep-distilled, 1-4 steps) and strength 0.75 (3 decoding steps
#   from σ = 0.75: 0.8 would start from pure noise, samplers.flow.strength_skip(4, 0.8) = 0), the numbers measured
#   in engine/edit/flow.py's docstring (Few steps); guidance is unused (no embedding, no CFG) and recorded as 0,
#   FluxPipeline's value for schnell.
# SD keeps EditSettings' own (50 steps, guidance 7.5).
EDIT_DEFAULTS = {"sd3": {"steps": 28, "guidance_scale": 7.0},
                 "flux-dev": {"steps": 28, "guidance_scale": 3.5},
                 "flux-schnell": {"steps": 4, "strength": 0.75, "guidance_scale": 0.0}}


def family(path) -> str | None:
    """The family of a local diffusers folder or single .safetensors file; None when it cannot be told from
    names and header (a hub id, a missing or broken file: the loader names the problem)."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            index = json.loads((p / "model_index.json").read_text())
            name = str(index.get("_class_name") or "")
            if "StableDiffusion3" in name:
                return "sd3"
            if "Flux" in name:
                cfg = json.loads((p / "transformer" / "config.json").read_text())
                return "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"
            return "sd"
        if p.is_file() and p.suffix.lower() == ".safetensors":
            header = files.read_header(p)
            if flux_keys.is_flux_file(header):
                return "flux-dev" if any("guidance_in." in k or "guidance_embedder." in k for k in header) \
                    else "flux-schnell"
            return "sd3" if sd3.is_sd3_file(header) else "sd"
    except (OSError, ValueError, files.CheckpointError):
        return None
    return None


def of_model(m) -> str:
    """The family of a loaded model (weights.Model or FlowModel)."""
    kind = getattr(m, "kind", None)
    if kind == "flux":
        return "flux-dev" if getattr(m, "guidance_embeds", False) else "flux-schnell"
    return kind if kind == "sd3" else "sd"


def is_flow(fam: str | None) -> bool:
    return fam in FLOW_FAMILIES


def default_dtype(fam: str | None, device) -> torch.dtype:
    """float32 on a CPU; on CUDA bfloat16 for the flow models (FLUX.1 and SD 3.5 are released and run in bf16;
    T5-XXL's activations overflow fp16), float16 for SD. The CPU default stays fp32 (the exact computation) even
    where bf16 is native and ~1.9x faster (runtime.cpu.cpu_has_native_bf16: the presets' choice, not this one)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if is_flow(fam) else torch.float16
