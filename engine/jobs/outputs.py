"""Every file a job writes, and what goes into them: output paths, the pictures (masks at image size, overlay,
grid), the A1111 `parameters` text, the JSON sidecar, and the all-or-nothing writer.

Output files for OUT.png: OUT.png (the edit, with an A1111 `parameters` text chunk), OUT.json (the sidecar,
written last: its "status": "ok" marks the output complete), and on request OUT.mask<i>.png (mask i at image
size, white = edited), OUT.overlay.png (the masks tinted over the input) and OUT.grid.png (input | masks |
result). The set is replaced as a unit (engine.atomic.replace_set): the new files are staged beside the old
ones and swapped in, the sidecar last, only when all are complete; a failure (disk full, an exception, a
kill) leaves the old set intact and consistent with its sidecar; files of an older set that the new one
does not have (masks no longer requested) are removed when it lands.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic, images
from ..runtime import family

COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (220, 64, 220), (0, 210, 210),
          (255, 128, 0), (160, 96, 255)]


@dataclass(frozen=True)
class Record:
    """What a job was, as its outputs record it (the sidecar, the `parameters` text)."""
    command: str                # edit | mask | batch
    image: object               # the input image's path
    pairs: list                 # [(source, target), ...]
    seed: int
    settings: object            # engine.settings.EditSettings
    size: tuple                 # (H, W) of the input


SAMPLERS = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", None: "the checkpoint's"}  # A1111's sampler names


@dataclass
class Outcome:
    image: torch.Tensor | None  # (3, H, W) in [0, 1] at the input's exact size (None for masks only)
    masks: torch.Tensor         # (N, H, W) in [0, 1] at the input's exact size
    thresholds: list | None     # per mask, where the engine reports them
    seconds: float
    vae_fallbacks: int = 0      # decodes redone in fp32 (the low-precision VAE overflowed)
    batch: int = 1              # images in the engine call


def outcome(r, size) -> Outcome:
    """engine.runtime.EditResult of one image -> Outcome at the image's exact size (H, W)."""
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


def files(paths: dict) -> list[Path]:
    """output_paths' {kind: path or [paths]} as a flat list."""
    return [Path(p) for v in paths.values() for p in (v if isinstance(v, list) else [v])]


SIDECAR_BOUND = 1 << 20  # bytes; a sidecar is a few KiB


def need_bytes(paths: dict, size, parameters: str = "") -> int:
    """An upper bound on the bytes one output set takes (for the free-space check before any work): every
    PNG at its incompressible size (atomic.png_bound), the grid as wide as its panels, and the sidecar."""
    h, w = size
    n = len(paths.get("masks", []))
    total = atomic.png_bound(w, h, 3, len(parameters.encode("utf-8")) * 2) + SIDECAR_BOUND
    total += n * atomic.png_bound(w, h, 1)
    if "overlay" in paths:
        total += atomic.png_bound(w, h, 3) + atomic.png_bound((n + 2) * (w + 4), h, 3)
    return total


def _ours(path: Path) -> bool:
    """Whether an existing output-set file was written by the engine: a PNG tagged Software=diffedit-engine,
    or a sidecar (a JSON object with the sidecar's "status" key and its "files" or "command")."""
    try:
        if path.suffix.lower() == ".json":
            with open(path, "rb") as f:
                d = json.loads(f.read(1 << 22))
            return isinstance(d, dict) and "status" in d and ("files" in d or "command" in d)
        from PIL import Image

        with Image.open(path) as im:
            return getattr(im, "text", {}).get("Software") == images.SOFTWARE
    except (OSError, ValueError, SyntaxError):  # unreadable / not JSON / not an image: not provably ours
        return False


def foreign_files(paths: dict) -> list[Path]:
    """The existing files of an output set (output_paths' dict) that the engine did not write: a user's photo
    or notes under an output name. They are never overwritten or removed. A sidecar that does not read as ours
    (truncated or corrupted after it landed) beside a PNG that is ours is the engine's own broken sidecar, not
    a user's file: that output is simply not complete, and the job is redone instead of blocked. Only a sidecar
    that is not JSON at all counts (a user's well-formed JSON under that name stays theirs)."""
    return [p for p in files(paths) if _exists(Path(p)) and not _ours(Path(p)) and not _our_broken_sidecar(Path(p))]


def _our_broken_sidecar(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not (_exists(path.with_suffix(".png")) and _ours(path.with_suffix(".png"))):
        return False
    try:
        with open(path, "rb") as f:
            json.loads(f.read(1 << 22))
        return False
    except ValueError:  # not JSON (UnicodeDecodeError included): a sidecar cut short or scribbled over
        return True
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long or with a NUL byte: nothing there (validation says why)
        return False


def write_outputs(out_png: Path, original: torch.Tensor, outcome: Outcome, meta: dict, parameters: str,
                  extras: bool, masks_only: bool = False) -> dict:
    """Write the files of one job as one set (see the module docstring). Returns {kind: path}.
    Raises OSError (the old set kept) when writing fails, ValueError when meta holds NaN/Infinity."""
    paths = output_paths(out_png, outcome.masks.shape[0], extras, masks_only)
    new = set(files(paths))
    foreign = foreign_files(paths)
    if foreign:
        raise atomic.OutputError(f"{foreign[0]}: exists and was not written by diffedit; refusing to overwrite "
                                 f"it (choose another output name or move the file)")
    # an older run's files that this set does not write (the older sidecar lists its own, too); only the
    # engine's own files are ever removed
    stale = [p for p in files(output_paths(out_png, outcome.masks.shape[0], True))
             if p not in new and _exists(Path(p)) and _ours(Path(p))]
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with atomic.replace_set(paths["sidecar"], stale=stale) as s:
        for p, mk in zip(paths.get("masks", []), outcome.masks):
            s.write_bytes(p, images.png_bytes(mk))
        if masks_only:
            s.write_bytes(paths["image"], images.png_bytes(overlay(original, outcome.masks), parameters))
        else:
            if "overlay" in paths:
                s.write_bytes(paths["overlay"], images.png_bytes(overlay(original, outcome.masks)))
                s.write_bytes(paths["grid"], images.png_bytes(grid([original, *outcome.masks, outcome.image])))
            s.write_bytes(paths["image"], images.png_bytes(outcome.image, parameters))
        names = {k: ([p.name for p in v] if isinstance(v, list) else Path(v).name) for k, v in paths.items()}
        meta = {**meta, "files": names}
        meta["timings"] = {**meta.get("timings", {}), "write_s": round(time.perf_counter() - t0, 4)}
        s.write_json(paths["sidecar"], meta, strict=True)
    return paths


def finite(obj):
    """obj with every non-finite float replaced by None (JSON has no NaN/Infinity; readers reject them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def mask_stats(masks: torch.Tensor) -> list[float]:
    """Fraction of the image each mask covers (mean weight)."""
    return [round(float(mk.mean()), 4) for mk in masks]


EMPTY_COVERAGE = 0.005  # a mask under 0.5 % of the image (under one latent cell of a 128² image) changes ~nothing


def empty_masks(pairs, coverage: list) -> list[str]:
    """One line for each edit whose mask is empty or nearly so, with its coverage: its source names nothing the
    model found in the image, or it repeats an earlier edit (its map is the same, and the overlap policy gives
    every tie to the first), so the edit leaves the picture as it was."""
    pairs = [tuple(p) for p in pairs]
    lines = []
    for i, (pair, c) in enumerate(zip(pairs, coverage)):
        if c is None or c >= EMPTY_COVERAGE:
            continue
        src, tgt = pair
        why = (f"it repeats edit {pairs.index(pair) + 1}, which took the region" if pairs.index(pair) < i
               else "does the source name something in the image?")
        lines.append(f"edit {i + 1} '{src or '∅'} -> {tgt}': its mask covers {c:.1%} of the image, so it changes "
                     f"nothing ({why})")
    return lines



# ---- metadata ---------------------------------------------------------------------------------------------

def model_info(path: Path, m, is_random: bool, hashes: dict) -> dict:
    flow = getattr(m, "transformer", None) is not None  # a FlowModel predicts the flow velocity
    return {"source": str(path), "name": Path(path).stem if Path(path).is_file() else Path(path).name,
            "random_weights": is_random, "kind": getattr(m, "kind", None), "family": family.of_model(m),
            "prediction_type": getattr(m, "prediction_type", "flow" if flow else None),
            "dtype": str(getattr(m, "dtype", "")).replace("torch.", ""), "device": str(getattr(m, "device", "")),
            "sha256": hashes["sha256"], "short_hash": hashes["short"], "hash_scheme": hashes["scheme"]}


def parameters_text(r: Record, model: dict) -> str:
    """A1111-style `parameters`: target prompt(s), negative prompt, then the settings line."""
    s, pairs = r.settings, r.pairs
    return images.format_parameters(" | ".join(t for _, t in pairs), s.negative_prompt, {
        "Steps": s.steps, "Sampler": SAMPLERS.get(s.scheduler, s.scheduler), "CFG scale": s.guidance_scale,
        "Seed": r.seed, "Size": f"{r.size[1]}x{r.size[0]}", "Model hash": model["short_hash"], "Model": model["name"],
        "Denoising strength": s.strength, "DiffEdit": " | ".join(f"{src or '∅'} -> {tgt}" for src, tgt in pairs),
        "Mask maps": s.num_maps, "Mask threshold": s.threshold, "Mask overlap": s.overlap, "Editor": s.editor,
        "Compat": s.compat, "Version": "diffedit-engine 0.1.0"})


def sidecar(r: Record, model: dict, out: Outcome, timings: dict, engine: dict, fp=None,
            job_key: dict | None = None) -> dict:
    """The JSON sidecar: the job, its settings (engine.settings.EditSettings names), what the engine applied
    (dtype, VAE dtype, compile, CUDA graphs, fp32 VAE fallbacks), the results' statistics and timings.
    job_key (engine.manifest.job_key): what a resumed batch checks before skipping the job. Non-finite numbers
    (a degenerate mask's threshold) are written as null."""
    return finite({"status": "ok", "command": r.command, "fingerprint": fp, "job_key": job_key, "image": str(r.image),
            "size": [r.size[1], r.size[0]], "edits": [{"source": a, "target": b} for a, b in r.pairs], "seed": r.seed,
            "settings": r.settings.to_dict(), "thresholds": out.thresholds, "mask_coverage": mask_stats(out.masks),
            "empty_masks": [i for i, c in enumerate(mask_stats(out.masks)) if c < EMPTY_COVERAGE],
            "warnings": empty_masks(r.pairs, mask_stats(out.masks)),
            "model": model, "engine": {**engine, "vae_fp32_fallbacks": out.vae_fallbacks},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "batch": {"size": out.batch} if out.batch > 1 else None,
            "note": "random-weight model: proves the pipeline, not the picture" if model["random_weights"] else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
