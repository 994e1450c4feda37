"""Every file a job writes, and what goes into them: output paths, the pictures (masks at image size, overlay,
grid), the A1111 `parameters` text, the JSON sidecar, and the all-or-nothing writer.

Output files for OUT.png: OUT.png (the edit, with an A1111 `parameters` text chunk), OUT.json (the sidecar,
written last: its "status": "ok" marks the output complete), and on request OUT.mask<i>.png (mask i at image
size, white = edited), OUT.overlay.png (the masks tinted over the input) and OUT.grid.png (input | masks |
result). Every file is written atomically; if writing any of them fails, the ones already written are removed.
"""
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import atomic, images

COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (220, 64, 220), (0, 210, 210),
          (255, 128, 0), (160, 96, 255)]


@dataclass
class Outcome:
    image: torch.Tensor | None  # (3, H, W) in [0, 1] at the input's exact size (None for masks only)
    masks: torch.Tensor         # (N, H, W) in [0, 1] at the input's exact size
    thresholds: list | None     # per mask, where the engine reports them
    seconds: float
    vae_fallbacks: int = 0      # decodes redone in fp32 (the low-precision VAE overflowed)
    batch: int = 1              # images in the engine call


def outcome(r, size) -> Outcome:
    """engine.pipeline.EditResult of one image -> Outcome at the image's exact size (H, W)."""
    thr = None if r.thresholds is None else [float(v) for v in torch.as_tensor(r.thresholds).flatten()]
    img = None if r.image is None else images.crop_to(r.image.float().cpu(), size)
    return Outcome(img, masks_to_size(r.masks, size), thr, r.seconds, r.vae_fallbacks, r.batch)


def masks_to_size(masks: torch.Tensor, size) -> torch.Tensor:
    """(N, h, w) masks on the padded latent grid -> (N, H, W) at image size: nearest upsampling to the padded
    image (each latent pixel covers an 8×8 block), then the crop that undoes the padding."""
    masks = masks.detach().float().cpu()
    h, w = size
    ph, pw = -(-h // 8) * 8, -(-w // 8) * 8
    if masks.shape[-2:] != (ph, pw):
        masks = F.interpolate(masks[None], size=(ph, pw), mode="nearest")[0]
    return images.crop_to(masks, size).clamp(0, 1)


# ---- pictures ---------------------------------------------------------------------------------------------

def overlay(original: torch.Tensor, masks: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The input with mask i tinted in COLORS[i] (weight alpha·mask), (3, H, W) in [0, 1]."""
    out = original.clone()
    for i, mk in enumerate(masks):
        c = torch.tensor(COLORS[i % len(COLORS)], dtype=torch.float32)[:, None, None] / 255
        a = alpha * mk[None]
        out = out * (1 - a) + c * a
    return out


def grid(panels: list[torch.Tensor], gap: int = 4) -> torch.Tensor:
    """Panels (3, H, W) or (H, W) side by side with white gaps: input | masks | result."""
    panels = [p.expand(3, *p.shape[-2:]) if p.ndim == 2 or p.shape[0] == 1 else p for p in panels]
    h = panels[0].shape[-2]
    white = torch.ones(3, h, gap)
    parts = []
    for p in panels:
        parts += [p, white]
    return torch.cat(parts[:-1], dim=-1)


# ---- output files -----------------------------------------------------------------------------------------

def output_paths(out_png: Path, n_masks: int, extras: bool, masks_only: bool = False) -> dict:
    """{kind: path} of one job's files. masks_only (the `mask` command): OUT.png is the overlay."""
    out_png = Path(out_png)
    stem = out_png.with_suffix("")
    paths = {"image": out_png}
    if extras or masks_only:
        paths["masks"] = [Path(f"{stem}.mask{i}.png") for i in range(n_masks)]
        if not masks_only:
            paths["overlay"] = Path(f"{stem}.overlay.png")
            paths["grid"] = Path(f"{stem}.grid.png")
    paths["sidecar"] = out_png.with_suffix(".json")
    return paths


def write_outputs(out_png: Path, original: torch.Tensor, outcome: Outcome, meta: dict, parameters: str,
                  extras: bool, masks_only: bool = False) -> dict:
    """Write the files of one job, the sidecar last; all or nothing. Returns {kind: path}."""
    paths = output_paths(out_png, outcome.masks.shape[0], extras, masks_only)
    written = []
    try:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for p, mk in zip(paths.get("masks", []), outcome.masks):
            written.append(images.save_png(mk, p))
        if masks_only:
            written.append(images.save_png(overlay(original, outcome.masks), paths["image"], parameters))
        else:
            if "overlay" in paths:
                written.append(images.save_png(overlay(original, outcome.masks), paths["overlay"]))
                written.append(images.save_png(grid([original, *outcome.masks, outcome.image]), paths["grid"]))
            written.append(images.save_png(outcome.image, paths["image"], parameters))
        files = {k: ([p.name for p in v] if isinstance(v, list) else Path(v).name) for k, v in paths.items()}
        meta = {**meta, "files": files}
        meta["timings"] = {**meta.get("timings", {}), "write_s": round(time.perf_counter() - t0, 4)}
        atomic.write_json(paths["sidecar"], meta)
        written.append(paths["sidecar"])
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                Path(p).unlink()
        raise
    return paths


def mask_stats(masks: torch.Tensor) -> list[float]:
    """Fraction of the image each mask covers (mean weight)."""
    return [round(float(mk.mean()), 4) for mk in masks]



# ---- metadata ---------------------------------------------------------------------------------------------

def model_info(path: Path, m, is_random: bool, hashes: dict) -> dict:
    return {"source": str(path), "name": Path(path).stem if Path(path).is_file() else Path(path).name,
            "random_weights": is_random, "kind": getattr(m, "kind", None),
            "prediction_type": getattr(m, "prediction_type", None),
            "dtype": str(getattr(m, "dtype", "")).replace("torch.", ""), "device": str(getattr(m, "device", "")),
            "sha256": hashes["sha256"], "short_hash": hashes["short"], "hash_scheme": hashes["scheme"]}


def parameters_text(pairs, seed: int, s, size, model: dict) -> str:
    """A1111-style `parameters`: target prompt(s), negative prompt, then the settings line."""
    return images.format_parameters(" | ".join(t for _, t in pairs), s.negative_prompt, {
        "Steps": s.steps, "Sampler": "DDIM", "CFG scale": s.guidance_scale, "Seed": seed,
        "Size": f"{size[1]}x{size[0]}", "Model hash": model["short_hash"], "Model": model["name"],
        "Denoising strength": s.strength, "DiffEdit": " | ".join(f"{src or '∅'} -> {tgt}" for src, tgt in pairs),
        "Mask maps": s.num_maps, "Mask threshold": s.threshold, "Mask overlap": s.overlap, "Editor": s.editor,
        "Compat": s.compat, "Version": "diffedit-engine 0.1.0"})


def sidecar(command, image_path, pairs, seed, s, size, model, out: Outcome, timings, engine: dict,
            fp=None) -> dict:
    """The JSON sidecar: the job, its settings (engine.settings.EditSettings names), what the engine applied
    (dtype, VAE dtype, compile, CUDA graphs, fp32 VAE fallbacks), the results' statistics and timings."""
    return {"status": "ok", "command": command, "fingerprint": fp, "image": str(image_path),
            "size": [size[1], size[0]], "edits": [{"source": a, "target": b} for a, b in pairs], "seed": seed,
            "settings": s.to_dict(), "thresholds": out.thresholds, "mask_coverage": mask_stats(out.masks),
            "model": model, "engine": {**engine, "vae_fp32_fallbacks": out.vae_fallbacks},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "batch": {"size": out.batch} if out.batch > 1 else None,
            "note": "random-weight model: proves the pipeline, not the picture" if model["random_weights"] else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
