"""What the CLI runs: the engine calls for one image or a batch of same-size images, and the output files.

`run_edit` / `run_masks` are the only places that call the editing engine, so switching the engine entry
point (regions.edit_many today, pipeline.Editor for compiled batches later) touches these two functions.
Both take a (B, 3, H, W) batch of same-size images with the same edits and a seed per image (one int: the
same seed for all): each image draws from its own CPU torch.Generator seeded by its job's seed, so a job's
output does not depend on whether, or where, it ran in a batch (up to the last bits of batched matmuls;
compat="diffusers" excepted: the pipeline thresholds its masks at the mean over the whole batch).

Output files for OUT.png: OUT.png (the edit, with an A1111 `parameters` text chunk), OUT.json (the sidecar,
written last: its "status": "ok" marks the output complete), and on request OUT.mask<i>.png (mask i at image
size, white = edited), OUT.overlay.png (the masks tinted over the input) and OUT.grid.png (input | masks |
result). Every file is written atomically; if writing any of them fails, the ones already written are removed.
"""
import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import atomic, images

COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (220, 64, 220), (0, 210, 210),
          (255, 128, 0), (160, 96, 255)]


@dataclass(frozen=True)
class EditSettings:
    steps: int = 50
    strength: float = 0.8
    guidance: float = 7.5
    maps: int = 10
    mask_strength: float = 0.5
    threshold: str = "clamp:3"
    overlap: str = "argmax"
    editor: str = "fused"
    compat: str | None = None
    negative_prompt: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Outcome:
    image: torch.Tensor | None  # (3, H, W) in [0, 1] at the input's exact size (None for masks only)
    masks: torch.Tensor         # (N, H, W) in [0, 1] at the input's exact size
    thresholds: list | None     # per mask, where the engine reports them
    seconds: float


def generators(seeds, n: int) -> list[torch.Generator]:
    """One CPU generator per image: seeds is an int (every image) or a list of n ints."""
    seeds = [seeds] * n if isinstance(seeds, int) else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for a batch of {n} images")
    return [torch.Generator().manual_seed(int(v)) for v in seeds]


def run_edit(m, batch: torch.Tensor, pairs, s: EditSettings, seeds, inpaint_model=None) -> list[Outcome]:
    """Edit a (B, 3, H, W) batch of same-size images in [0, 1] by the same pairs, one engine call.
    N pairs (and the paper's single pair): regions.edit_many; compat="diffusers" (one pair): the three
    diffedit calls that reproduce StableDiffusionDiffEditPipeline. inpaint_model: for editor "inpaint"."""
    t0 = time.perf_counter()
    size, B = tuple(batch.shape[-2:]), batch.shape[0]
    generator = generators(seeds, B)
    if s.compat is None:
        from engine import regions

        r = regions.edit_many(m, batch, list(pairs), threshold=s.threshold, overlap=s.overlap, editor=s.editor,
                              num_maps=s.maps, encode_strength=s.mask_strength, steps=s.steps, strength=s.strength,
                              guidance_scale=s.guidance, negative_prompt=s.negative_prompt, generator=generator,
                              inpaint_model=inpaint_model)
        imgs, masks, thr = r.image, r.masks, r.thresholds
    else:
        from engine import diffedit

        if len(pairs) != 1 or s.editor != "fused":
            raise ValueError("compat='diffusers' reproduces the single-pair pipeline: one edit, editor 'fused'")
        (src, tgt), = pairs
        mask = diffedit.generate_mask(m, batch, [src] * B, [tgt] * B, num_maps=s.maps, encode_strength=s.mask_strength,
                                      guidance_scale=s.guidance, steps=s.steps, generator=generator, compat=s.compat)
        inv = diffedit.invert(m, batch, [src] * B, steps=s.steps, strength=s.strength, generator=generator,
                              compat=s.compat)
        imgs = diffedit.edit(m, inv, mask, [tgt] * B, steps=s.steps, strength=s.strength, guidance_scale=s.guidance,
                             negative_prompt=s.negative_prompt, compat=s.compat, generator=generator, size=size)
        masks, thr = mask[:, None], None
    dt = (time.perf_counter() - t0) / B
    return [Outcome(images.crop_to(imgs[i].float(), size), masks_to_size(masks[i], size), _floats(thr, i), dt)
            for i in range(B)]


def run_masks(m, batch: torch.Tensor, pairs, s: EditSettings, seeds) -> list[Outcome]:
    """Only the masks of a (B, 3, H, W) batch (the `mask` command): regions.masks, the mask step of
    run_edit's regions.edit_many (same seed, same masks), without the inversion and decoding."""
    t0 = time.perf_counter()
    size, B = tuple(batch.shape[-2:]), batch.shape[0]
    generator = generators(seeds, B)
    if s.compat is None:
        from engine import regions

        r = regions.masks(m, batch, list(pairs), threshold=s.threshold, overlap=s.overlap, num_maps=s.maps,
                          encode_strength=s.mask_strength, steps=s.steps, guidance_scale=s.guidance,
                          generator=generator)
        masks, thr = r.weights, r.thresholds
    else:
        from engine import diffedit

        (src, tgt), = pairs
        masks = diffedit.generate_mask(m, batch, [src] * B, [tgt] * B, num_maps=s.maps, encode_strength=s.mask_strength,
                                       guidance_scale=s.guidance, steps=s.steps, generator=generator,
                                       compat=s.compat)[:, None]
        thr = None
    dt = (time.perf_counter() - t0) / B
    return [Outcome(None, masks_to_size(masks[i], size), _floats(thr, i), dt) for i in range(B)]


def _floats(thr, i):
    return None if thr is None else [float(v) for v in torch.as_tensor(thr[i]).flatten()]


@contextlib.contextmanager
def unet_progress(m, total: int, disable: bool = False, desc: str = "unet"):
    """A tqdm bar (with ETA) advanced by a forward hook on m.unet: the engine needs no callback argument,
    and the count is exact whatever the engine batches. total: the expected number of UNet calls."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", desc=desc, disable=disable, dynamic_ncols=True, leave=False)

    def tick(*_):
        bar.update(1)  # and return None: a forward hook's non-None return value would replace the output

    hook = m.unet.register_forward_hook(tick) if hasattr(m.unet, "register_forward_hook") else None
    try:
        yield bar
    finally:
        if hook is not None:
            hook.remove()
        bar.close()


def expected_unet_calls(s: EditSettings, masks_only: bool = False) -> int:
    """One batched mask-pass call, then int(steps·strength) inversion and as many decoding steps."""
    S = int(s.steps * s.strength)
    return 1 if masks_only else 1 + 2 * S


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

