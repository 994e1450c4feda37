"""Speed presets (issue 23): a named set of the levers that cut an edit's work, so a user picks a row of the
README's table instead of seven flags. Each preset is
  - EditSettings values (sampler and steps, mask draws, DeepCache interval, crop margin), applied over the
    model family's defaults and under anything the user sets explicitly (a flag, a keyword, a manifest field);
  - a precision: "exact" keeps the model's dtype rule (fp32 on a CPU); "fast"/"fastest" run bf16 on a CPU with
    native bf16 (AVX512_BF16 / AMX: runtime.cpu.cpu_has_native_bf16), fp32 on other CPUs (emulated bf16 is
    slower than fp32 there), and CUDA's own default (fp16) on a GPU. The dtype is a load-time choice: in a
    manifest a job's preset sets its settings, the run's --preset its precision.
The values are chosen from the shapes-world quality suite (benchmarks/shapes_quality.py, rows exact/fast/
fastest and one row per lever) and timed by benchmarks/presets_bench.py; benchmarks/RESULTS.md has both.
"exact" is today's computation and the default: what the parity tests and compat="diffusers" check.
Presets are measured on SD UNet models; on SD 3.x / FLUX.1 (no DeepCache, no crop, their own flow sampler)
only "exact" is offered.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cpu, family


@dataclass(frozen=True)
class Preset:
    settings: dict = field(default_factory=dict)  # EditSettings fields
    low_precision: bool = False                   # bf16 on a CPU with native bf16
    what: str = ""


PRESETS = {
    "exact": Preset({}, False, "today's computation: DDIM 50, 10 mask draws, full UNet, full frame, fp32 on a CPU"),
    "fast": Preset({"scheduler": "dpm++2m", "steps": 20, "cache_interval": 2}, True,
                   "DPM-Solver++(2M) 20 steps, DeepCache every 2nd step, bf16 on CPUs with native bf16"),
    "fastest": Preset({"scheduler": "dpm++2m", "steps": 10, "num_maps": 5, "cache_interval": 3, "crop_margin": 2},
                      True, "DPM-Solver++(2M) 10 steps, 5 mask draws, DeepCache every 3rd step, the UNet on a "
                            "crop of the masks + 2 latent cells, bf16 on CPUs with native bf16"),
}
# A UNet this narrow (widest block's channels) is bound by per-call overhead, not by its GEMMs: the shapes-world
# model (48-128 channels) measured a UNet call 10 % slower in bf16 than in fp32 on the native-bf16 CPU, where
# SD 1.5 (320-1280) runs 1.9x faster. Such a model keeps fp32 under every preset.
SMALL_UNET_CHANNELS = 512
NAMES = tuple(PRESETS)


def get(name: str) -> Preset:
    """The preset, or a one-line ValueError naming the choices."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: use one of {', '.join(NAMES)}")
    return PRESETS[name]


def settings(name: str, fam: str | None = None) -> dict:
    """The preset's EditSettings values; a ValueError for a speed preset on a flow model (fam from
    runtime.family: what the levers were measured on)."""
    p = get(name)
    if p.settings and family.is_flow(fam):
        raise ValueError(f"preset {name!r} is measured on SD UNet models (DPM-Solver++, DeepCache, crops); on "
                         f"{fam} use preset exact and --steps for speed")
    return dict(p.settings)


def small_unet(path) -> bool:
    """True for a diffusers folder whose UNet's widest block has fewer than SMALL_UNET_CHANNELS channels (read
    from unet/config.json; anything else, a single file or a hub id, is a real-size model: False)."""
    try:
        cfg = json.loads((Path(path) / "unet" / "config.json").read_text())
        return max(cfg["block_out_channels"]) < SMALL_UNET_CHANNELS
    except (OSError, TypeError, ValueError, KeyError):
        return False


def dtype(name: str, fam: str | None, device, path=None) -> torch.dtype:
    """The dtype a model loads in under this preset when the user gives none: the family's default
    (family.default_dtype), or bf16 for a low-precision preset on a CPU with native bf16, unless `path` is a
    small UNet (small_unet: bf16 does not pay there)."""
    base = family.default_dtype(fam, device)
    if path is not None and small_unet(path):
        return base
    if get(name).low_precision and torch.device(device).type == "cpu" and base == torch.float32:
        if cpu.cpu_has_native_bf16():
            return torch.bfloat16
    return base
