"""Quality suite on the synthetic shapes world (issue 18, item 3): DiffEdit with the shipped shapes model
(weights/data/shapes/) on held-out scenes, scored exactly against the world's ground truth (engine/shapes.py).

    python benchmarks/shapes_quality.py                                   # every row, 200 scenes per task
    python benchmarks/shapes_quality.py --rows paper,sequential --scenes 200 --workers 2
    python benchmarks/shapes_quality.py --rows otsu,median --scenes 50     # more rows, fewer scenes
    python benchmarks/shapes_quality.py --report --write                  # table from every cached result

Every edit runs through the engine's one run path, `engine.runtime.Editor` (what the CLI runs), with
`EditSettings()` (the CLI's defaults) changed only by the row's fields. Per-scene results are cached in
runs/shapes_quality/<model id>.jsonl (model id = sha256 of the folder's weight files), so a run can be stopped
and resumed, and rows run at different scene counts are reported together, each with its own n.

TASKS (the edit is drawn deterministically from the scene's held-out seed; the generator of the edit is seeded
with the same number):
- colour: scenes heldout_scene(s) for s = 0, 1, 2, ... (1-3 objects, the stream's own distribution). One object
  is picked uniformly among those whose phrase is unique in the scene (an edit "a red circle -> ..." cannot
  say which of two red circles it means) and that have an admissible target, then a target colour uniformly
  among the other colours whose phrase no object of the scene has ("a red circle -> a blue circle" next to a
  blue circle would name two objects); a scene with no such edit is skipped.
- shape: the same scenes and rule, a shape among the others.
- two: scenes heldout_scene(s) for s = 5000, 5001, ... that have 2-3 objects, at least two of them uniquely
  named; two distinct such objects, each edited in colour or in shape (a fair coin; the other kind when the
  coin's has no admissible target), as two pairs at once. Admissible as above, and the second target is not
  the first's: no target is any pair's source or the other pair's target (no chains, swaps or merges).
  Edit rng: numpy default_rng([18, task code, seed]). Tests (tests/test_shapes_edits.py) use seeds >= 9000,
  the training run's midway checks 9500+ (one-object scenes): disjoint from the suite's ranges. No held-out
  scene is ever seen in training (shapes.train_scene and heldout_scene are disjoint SeedSequence streams).
  Prompts are the short phrases ("a red circle -> a blue circle"); row `caption` uses the full captions
  (the scene's caption -> the caption of the edited scene).

METRICS (image: the engine's output in [0, 1] rounded to uint8; 128x128 px; latent cell = 8x8 px, 16x16 cells):
- mask IoU: the engine's mask for the pair (latent resolution; > 0.5 counts as inside, for the soft policies
  too) against the edited object's BOX at latent resolution: the cells with >= 50 % of their 64 pixels inside
  the box. IoU = |mask ∩ box cells| / |mask ∪ box cells|. The box, not the shape: DiffEdit's mask is meant to
  cover the region that changes, and a shape edit changes pixels anywhere in the box.
- object colour: the per-channel median RGB of the object's INTERIOR, named by the nearest (Euclidean RGB)
  of the four object colours and the scene's background colour ("background": the object is gone). Interior =
  the pixels where the object's ground-truth coverage (shapes.coverage, anti-aliased) is >= 0.9, eroded by 2 px
  (kept when every pixel of the 5x5 square around it is >= 0.9). For the edited object the ground truth is the
  EXPECTED object (Scene.replace: the target shape in the same box).
- object shape: the object's FOREGROUND is the pixels inside its box whose nearest colour among the scene's
  background and the four object colours is not the background; its shape is the template (circle, square,
  triangle drawn in the box, coverage > 0.5, as shapes.classify_shape) of best IoU with the foreground, or
  "none" when that best IoU is < 0.5 (no recognisable shape: classify_shape would still name one).
- edit success: every edited object reads as its target's colour AND shape (both, for colour and shape edits).
  Two edits: the scene succeeds when both do; "IoU >= 0.5" is the share of scenes where both masks have
  IoU >= 0.5 (single edits: where the mask has), and the issue's "success with each mask's IoU >= 0.5" (in the
  targets table) counts a scene when both hold.
- preservation: over scenes with at least one object not edited: every such object reads as its own colour
  and shape.
- background PSNR: over the pixels outside every edited object's box dilated by 8 px (clipped to the canvas),
  all three channels, against the input render: 10·log10(255² / MSE); identical pixels give inf, capped at
  100 dB (PSNR_CAP) before averaging. Row `vae` is the ceiling: the input through the VAE (encode, decode),
  no edit.
- s / edit: wall seconds of the Editor call(s) for one scene's edit (two edits: the whole scene; sequential:
  both edits), one image per call, each worker process on its own torch threads (--threads).

STATISTICS: means with their standard error (sd / sqrt(n)); rates with a Wilson 95 % interval. Fused against
sequential is paired on the same scenes: the success difference with its paired standard error, and the time
ratio of the means.

ROWS: paper (the engine's defaults: DDIM 50, strength 0.8, guidance 7.5, 10 maps, clamp:3, argmax), compat
(--compat diffusers), otsu / median (thresholds; clamp:3 is the default), subtract / average / soft (overlap
policies, two edits; argmax is the default), dpm10 / dpm15 / dpm20 / dpm25 (DPM-Solver++(2M) at that many
steps), sequential (two edits as two single Editor edits, the second on the first's output rounded to 8 bits,
as the CLI run twice), caption (full-caption prompts), vae (the reference above), oracle (a diagnostic, not an
engine setting: the fused decoding with the true box cells as masks; its IoU is 1 by construction). No
inpainting row: no inpainting UNet was trained for the shapes world.
"""
import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

from diffedit_engine.engine import shapes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_md  # noqa: E402

MODEL = ROOT / "weights" / "data" / "shapes"
CACHE = ROOT / "runs" / "shapes_quality"
JSON_OUT = ROOT / "benchmarks" / "results" / "shapes_quality.json"
SECTION = "shapes_quality"
VERSION = 2  # of the metric definitions and the edit sampling: part of every cache key
SALT = 18
CELL = 8
PSNR_CAP = 100.0
DILATE = 8
ERODE = 2
SHAPE_MIN_IOU = 0.5
TASKS = ("colour", "shape", "two")
TASK_CODE = {"colour": 1, "shape": 2, "two": 3}
FIRST_SEED = {"colour": 0, "shape": 0, "two": 5000}


def preset_rows() -> dict:
    """The speed presets (runtime.presets) as rows: their settings, and dtype bfloat16 where the preset's
    precision applies on this CPU (what `diffedit --preset NAME` runs here)."""
    import torch

    from diffedit_engine.engine.runtime import presets

    rows = {}
    for name in ("fast", "fastest"):
        dt = presets.dtype(name, None, "cpu", MODEL)
        rows[name] = {**presets.settings(name), **({"dtype": str(dt).replace("torch.", "")} if dt != torch.float32 else {})}
    return rows


PRESET_ROWS = preset_rows()

# name -> (tasks, EditSettings fields, mode, what)
ROWS = {
    "paper": (TASKS, {}, "edit", "defaults (paper mode): DDIM 50, clamp:3, argmax"),
    "compat": (("colour", "shape"), {"compat": "diffusers"}, "edit", "--compat diffusers"),
    "otsu": (TASKS, {"threshold": "otsu"}, "edit", "--threshold otsu"),
    "median": (TASKS, {"threshold": "median"}, "edit", "--threshold median"),
    "subtract": (("two",), {"overlap": "subtract"}, "edit", "--overlap subtract"),
    "average": (("two",), {"overlap": "average"}, "edit", "--overlap average"),
    "soft": (("two",), {"overlap": "soft"}, "edit", "--overlap soft"),
    "dpm10": (TASKS, {"scheduler": "dpm++2m", "steps": 10}, "edit", "--scheduler dpm++2m --steps 10"),
    "dpm15": (TASKS, {"scheduler": "dpm++2m", "steps": 15}, "edit", "--scheduler dpm++2m --steps 15"),
    "dpm20": (TASKS, {"scheduler": "dpm++2m", "steps": 20}, "edit", "--scheduler dpm++2m --steps 20"),
    "dpm25": (TASKS, {"scheduler": "dpm++2m", "steps": 25}, "edit", "--scheduler dpm++2m --steps 25"),
    # issue 23's levers (EditSettings fields; "dtype" is the model's, loaded once per worker and dtype)
    "crop0": (TASKS, {"crop_margin": 0}, "edit", "--crop-margin 0"),
    "crop1": (TASKS, {"crop_margin": 1}, "edit", "--crop-margin 1"),
    "crop2": (TASKS, {"crop_margin": 2}, "edit", "--crop-margin 2"),
    "crop4": (TASKS, {"crop_margin": 4}, "edit", "--crop-margin 4"),
    "cache2": (TASKS, {"cache_interval": 2}, "edit", "--cache-interval 2"),
    "cache3": (TASKS, {"cache_interval": 3}, "edit", "--cache-interval 3"),
    "cache5": (TASKS, {"cache_interval": 5}, "edit", "--cache-interval 5"),
    "maps5": (TASKS, {"num_maps": 5}, "edit", "--maps 5"),
    "maps3": (TASKS, {"num_maps": 3}, "edit", "--maps 3"),
    "maps2": (TASKS, {"num_maps": 2}, "edit", "--maps 2"),
    "bf16": (TASKS, {"dtype": "bfloat16"}, "edit", "--dtype bfloat16"),
    **{name: (TASKS, fields, "edit", f"--preset {name}") for name, fields in PRESET_ROWS.items()},
    "sequential": (("two",), {}, "sequential", "two single edits in sequence (defaults)"),
    "caption": (("colour", "shape"), {}, "caption", "full-caption prompts (defaults)"),
    "vae": (TASKS, {}, "vae", "reference: the input through the VAE, no edit"),
    "oracle": (TASKS, {}, "oracle", "diagnostic: the engine's inversion and fused decoding (defaults) with the "
               "ground-truth box cells as the masks, no mask pass: the decoder's share of the failures"),
}


# ---------------------------------------------------------------- the cases


def edit_rng(task: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([SALT, TASK_CODE[task], seed])


def unique_objects(sc: shapes.Scene) -> list[int]:
    """Indices (caption order) of the objects whose phrase no other object of the scene has."""
    phrases = [o.phrase for o in sc.objects]
    return [i for i, p in enumerate(phrases) if phrases.count(p) == 1]


def make_case(task: str, seed: int):
    """(scene, edits) for a held-out seed, or None when the seed's scene does not qualify for the task.
    edits: [(object index, new shape, new colour)], by the rule of the module docstring: the edited objects are
    uniquely named, and no target phrase is the phrase of an object of the input scene or of the other edit."""
    sc = shapes.heldout_scene(seed)
    ok = unique_objects(sc)
    taken = {o.phrase for o in sc.objects}
    rng = edit_rng(task, seed)

    def targets(o, kind):
        if kind == "colour":
            new = [shapes.Obj(o.shape, c, o.box) for c in shapes.COLOURS if c != o.colour]
        else:
            new = [shapes.Obj(s, o.colour, o.box) for s in shapes.SHAPES if s != o.shape]
        return [n for n in new if n.phrase not in taken]

    if task == "two":
        if len(sc.objects) < 2 or len(ok) < 2:
            return None
        picks = sorted(int(i) for i in rng.choice(ok, size=2, replace=False))
        kinds = ["colour" if rng.random() < 0.5 else "shape" for _ in picks]
    else:
        cands = [i for i in ok if targets(sc.objects[i], task)]
        if not cands:
            return None
        picks, kinds = [cands[int(rng.integers(len(cands)))]], [task]
    edits = []
    for i, kind in zip(picks, kinds):
        o = sc.objects[i]
        new = targets(o, kind) or targets(o, "shape" if kind == "colour" else "colour")  # two: the other kind
        if not new:
            return None
        n = new[int(rng.integers(len(new)))]
        taken.add(n.phrase)
        edits.append((i, n.shape, n.colour))
    return sc, edits


def cases(task: str, n: int, first: int | None = None) -> list[int]:
    """The first n qualifying held-out seeds of the task, from its first seed."""
    out, s = [], FIRST_SEED[task] if first is None else first
    while len(out) < n:
        if make_case(task, s) is not None:
            out.append(s)
        s += 1
    return out


def expected_scene(sc: shapes.Scene, edits) -> shapes.Scene:
    for i, shape, colour in edits:
        sc = sc.replace(i, shape=shape, colour=colour)
    return sc


def pairs_for(sc: shapes.Scene, edits, prompts: str = "phrase") -> list[tuple[str, str]]:
    if prompts == "caption":
        assert len(edits) == 1, "caption prompts are for single edits"
        return [(sc.caption, expected_scene(sc, edits).caption)]
    return [(sc.objects[i].phrase, shapes.Obj(shape, colour, sc.objects[i].box).phrase) for i, shape, colour in edits]


# ---------------------------------------------------------------- the metrics (exact; module docstring)


def box_cells(box, size: int = shapes.SIZE, cell: int = CELL) -> np.ndarray:
    """(size/cell, size/cell) bool: the latent cells with >= 50 % of their pixels inside the box."""
    x0, y0, x1, y1 = box
    px = np.zeros((size, size), np.float32)
    px[y0:y1, x0:x1] = 1
    frac = px.reshape(size // cell, cell, size // cell, cell).mean(axis=(1, 3))
    return frac >= 0.5


def mask_iou(mask, box) -> float:
    """IoU of a latent-resolution mask (weights; > 0.5 is inside) with box_cells(box)."""
    m = np.asarray(mask, np.float32) > 0.5
    b = box_cells(box, cell=shapes.SIZE // m.shape[-1])
    union = np.logical_or(m, b).sum()
    return float(np.logical_and(m, b).sum() / union) if union else 1.0


def erode(mask: np.ndarray, r: int = ERODE) -> np.ndarray:
    """Binary erosion by a (2r+1)x(2r+1) square; outside the canvas counts as False."""
    p = np.pad(mask, r, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask, bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= p[dy:dy + h, dx:dx + w]
    return out


def interior(obj: shapes.Obj) -> np.ndarray:
    return erode(obj.coverage() >= 0.9)


def read_colour(img: np.ndarray, obj: shapes.Obj, background: str) -> str:
    """Name of the median colour of obj's interior: an object colour, or "background"."""
    rgb = np.median(img[interior(obj)].astype(np.float32), axis=0)
    palette = {**shapes.COLOURS, "background": shapes.BACKGROUNDS[background]}
    return shapes.nearest_colour(rgb, palette)


def foreground(img: np.ndarray, box, background: str) -> np.ndarray:
    """(SIZE, SIZE) bool: pixels inside box nearer (RGB) to an object colour than to the background."""
    x0, y0, x1, y1 = box
    crop = img[y0:y1, x0:x1].astype(np.float32)
    bg = np.linalg.norm(crop - np.asarray(shapes.BACKGROUNDS[background], np.float32), axis=-1)
    obj = np.min([np.linalg.norm(crop - np.asarray(c, np.float32), axis=-1) for c in shapes.COLOURS.values()], 0)
    out = np.zeros(img.shape[:2], bool)
    out[y0:y1, x0:x1] = obj < bg
    return out


def template_ious(fg: np.ndarray, box) -> dict:
    out = {}
    for s in shapes.SHAPES:
        t = shapes.coverage(s, box) > 0.5
        union = np.logical_or(fg, t).sum()
        out[s] = float(np.logical_and(fg, t).sum() / union) if union else 0.0
    return out


def read_shape(img: np.ndarray, box, background: str) -> str:
    """The best-IoU template's shape, or "none" when the best IoU is below SHAPE_MIN_IOU."""
    ious = template_ious(foreground(img, box, background), box)
    best = max(shapes.SHAPES, key=lambda s: ious[s])  # ties: SHAPES order, as classify_shape's argmax
    return best if ious[best] >= SHAPE_MIN_IOU else "none"


def outside_boxes(boxes, dilate: int = DILATE, size: int = shapes.SIZE) -> np.ndarray:
    keep = np.ones((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        keep[max(0, y0 - dilate):min(size, y1 + dilate), max(0, x0 - dilate):min(size, x1 + dilate)] = False
    return keep


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None, cap: float = PSNR_CAP) -> float:
    """PSNR in dB of uint8 images over region's pixels (all channels), capped at `cap` (identical: cap)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    if region is not None:
        d = d[region]
    mse = float(np.mean(d ** 2)) if d.size else 0.0
    return cap if mse == 0 else min(cap, 10 * math.log10(255.0 ** 2 / mse))


def score(sc: shapes.Scene, edits, out: np.ndarray, masks=None) -> dict:
    """Every metric of one edited scene. out: (SIZE, SIZE, 3) uint8; masks: one (h, w) mask per edit, or None."""
    want = expected_scene(sc, edits)
    edited = [i for i, _, _ in edits]
    rec = {"colour": [], "shape": [], "colour_ok": [], "shape_ok": [], "preserved": []}
    for i, _, _ in edits:
        o = want.objects[i]
        c, s = read_colour(out, o, sc.background), read_shape(out, o.box, sc.background)
        rec["colour"].append(c)
        rec["shape"].append(s)
        rec["colour_ok"].append(c == o.colour)
        rec["shape_ok"].append(s == o.shape)
    for i, o in enumerate(sc.objects):
        if i not in edited:
            rec["preserved"].append(read_colour(out, o, sc.background) == o.colour and
                                    read_shape(out, o.box, sc.background) == o.shape)
    rec["success"] = all(a and b for a, b in zip(rec["colour_ok"], rec["shape_ok"]))
    rec["all_preserved"] = all(rec["preserved"]) if rec["preserved"] else None
    rec["psnr"] = psnr(out, sc.render(), outside_boxes([sc.objects[i].box for i in edited]))
    if masks is not None:
        rec["iou"] = [mask_iou(np.asarray(m), sc.objects[i].box) for m, (i, _, _) in zip(masks, edits)]
        rec["mask_cells"] = [int((np.asarray(m) > 0.5).sum()) for m in masks]
    return rec


# ---------------------------------------------------------------- running the engine

_W: dict = {}


def to_uint8(x) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (rounded)."""
    return np.rint(np.clip(x.detach().float().numpy().transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)


def to_tensor(img: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float() / 255.0


def init_worker(model: str, threads: int) -> None:
    from diffedit_engine.engine.edit.settings import EditSettings
    from diffedit_engine.engine.runtime import Editor, EditorOptions
    from diffedit_engine.weights import load_model

    _W["editor"] = Editor(load_model(model), EditorOptions(threads=threads))
    _W["settings"] = EditSettings()
    _W["model"], _W["threads"] = model, threads


def editor_for(dtype: str | None):
    """The worker's Editor in `dtype` (a row's "dtype" field; None: float32, loaded by init_worker), loaded once."""
    if dtype is None:
        return _W["editor"]
    if dtype not in _W:
        import torch

        from diffedit_engine.engine.runtime import Editor, EditorOptions
        from diffedit_engine.weights import load_model

        _W[dtype] = Editor(load_model(_W["model"], dtype=getattr(torch, dtype)), EditorOptions(threads=_W["threads"]))
    return _W[dtype]


def run_case(job: tuple) -> dict:
    """One (row, task, seed) through the Editor; the scored record."""
    import torch

    row, task, seed = job
    _, fields, mode, _ = ROWS[row]
    fields = dict(fields)
    ed = editor_for(fields.pop("dtype", None))
    s = _W["settings"].updated(**fields)
    sc, edits = make_case(task, seed)
    x = to_tensor(sc.render())
    masks = None
    t0 = time.perf_counter()
    if mode == "vae":
        from diffedit_engine.engine.edit import toolkit

        with torch.inference_mode():
            out = toolkit.decode_latents(ed.model, toolkit.encode_image(ed.model, x[None]))[0]
    elif mode == "oracle":  # regions.edit_many's fused route with given masks (the Editor has no mask input)
        from diffedit_engine.engine.edit import regions, toolkit

        pairs = pairs_for(sc, edits)
        w = torch.from_numpy(np.stack([box_cells(sc.objects[i].box) for i, _, _ in edits]).astype(np.float32))
        kw = dict(steps=s.steps, strength=s.strength, scheduler=s.scheduler)
        with torch.inference_mode():
            z0 = toolkit.encode_image(ed.model, x[None])
            inv = regions.invert_shared(ed.model, z0, **kw)
            z = regions.fused_edit(ed.model, inv, w[None], [t for _, t in pairs], guidance_scale=s.guidance_scale,
                                   negative_prompt=s.negative_prompt, **kw)
            out = toolkit.decode_latents(ed.model, z)[0]
        masks = list(w)
    elif mode == "sequential":
        out, masks = x, []
        for pair in pairs_for(sc, edits):
            r = ed.edit(out, [pair], s, seed=seed)
            out = to_tensor(to_uint8(r.image))  # as the CLI run twice: the PNG in between
            masks.append(r.masks[0])
    else:
        pairs = pairs_for(sc, edits, "caption" if mode == "caption" else "phrase")
        r = ed.edit(x, pairs, s, seed=seed)
        out, masks = r.image, list(r.masks)
    dt = time.perf_counter() - t0
    rec = score(sc, edits, to_uint8(out), None if masks is None else [m.float().numpy() for m in masks])
    rec.update(row=row, fields=ROWS[row][1], task=task, seed=seed, seconds=dt, edits=[list(e) for e in edits], version=VERSION,
               pairs=pairs_for(sc, edits, "caption" if mode == "caption" else "phrase"), load=os.getloadavg()[0])
    return rec


# ---------------------------------------------------------------- statistics and the table


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray([x for x in xs if x is not None], np.float64)
    if not len(xs):
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(k/n, lower, upper) of the Wilson score interval (95 % by default)."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


def fmt_mean(xs, digits: int = 2) -> str:
    m, se = mean_se(xs)
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{m:.{digits}f}"


def fmt_rate(bools) -> str:
    b = [bool(v) for v in bools if v is not None]
    if not b:
        return "—"
    p, lo, hi = wilson(sum(b), len(b))
    return f"{100 * p:.1f} % ({100 * lo:.0f}–{100 * hi:.0f})"


def summarise(recs: list[dict]) -> dict:
    """The figures of one (row, task) group, as numbers (for the JSON) and strings (for the table)."""
    ious = [float(np.mean(r["iou"])) for r in recs if "iou" in r]
    iou_ok = [all(v >= 0.5 for v in r["iou"]) for r in recs if "iou" in r]
    out = {"n": len(recs)}
    for name, vals in (("iou", ious), ("psnr", [r["psnr"] for r in recs]), ("seconds", [r["seconds"] for r in recs])):
        out[name] = mean_se(vals)
    for name, vals in (("success", [r["success"] for r in recs]), ("iou_ok", iou_ok),
                       ("preserved", [r["all_preserved"] for r in recs if r["all_preserved"] is not None]),
                       ("success_iou", [r["success"] and all(v >= 0.5 for v in r["iou"]) for r in recs if "iou" in r]),
                       ("colour_ok", [all(r["colour_ok"]) for r in recs]),
                       ("shape_ok", [all(r["shape_ok"]) for r in recs])):
        b = [bool(v) for v in vals]
        out[name] = (wilson(sum(b), len(b)) + (len(b),)) if b else None
    out["text"] = {"iou": fmt_mean(ious), "iou_ok": fmt_rate(iou_ok), "success": fmt_rate([r["success"] for r in recs]),
                   "preserved": fmt_rate([r["all_preserved"] for r in recs]),
                   "psnr": fmt_mean([r["psnr"] for r in recs], 1), "seconds": fmt_mean([r["seconds"] for r in recs])}
    return out


def paired(a: list[dict], b: list[dict]) -> dict | None:
    """Row a against row b on the scenes both have (the same seeds, so the same edits): the success difference
    a − b in points with its paired standard error, the mean-IoU difference, and the ratio of mean wall times."""
    bs = {r["seed"]: r for r in b}
    common = [(r, bs[r["seed"]]) for r in a if r["seed"] in bs]
    if not common:
        return None
    m, se = mean_se([100.0 * (int(x["success"]) - int(y["success"])) for x, y in common])
    di = mean_se([float(np.mean(x["iou"]) - np.mean(y["iou"])) for x, y in common if "iou" in x and "iou" in y])
    ta, tb = np.mean([x["seconds"] for x, _ in common]), np.mean([y["seconds"] for _, y in common])
    return {"n": len(common), "success_diff_points": m, "se": se, "iou_diff": di[0], "iou_diff_se": di[1],
            "time_ratio": float(ta / tb), "a_s": float(ta), "b_s": float(tb),
            "a_success": float(np.mean([x["success"] for x, _ in common])),
            "b_success": float(np.mean([y["success"] for _, y in common]))}


def fmt_diff(c: dict | None) -> str:
    if not c:
        return "—"
    se = "" if math.isnan(c["se"]) else f" ± {c['se']:.1f}"
    return f"{c['success_diff_points']:+.1f}{se} (n {c['n']})"


def rate(summary: dict, key: str, name: str) -> float:
    v = summary.get(key, {}).get(name)
    return float("nan") if not v else v[0]


def targets(summary: dict) -> list[list]:
    """The issue's targets against the measured figures: [what, target, measured, met / short by]."""
    out = []

    def add(what, target, value, lo_ok, unit="", scale=1.0):
        if value is None or math.isnan(value):
            return
        v = value * scale
        met = v >= lo_ok * scale if lo_ok is not None else None
        gap = f"{lo_ok * scale - v:.1f} points" if unit == " %" else f"{lo_ok * scale - v:.2f}{unit}"
        short = "met" if met else f"short by {gap}"
        out.append([what, target, f"{v:.3g}{unit}", short])

    for task in ("colour", "shape"):
        k = f"paper/{task}"
        if k in summary:
            add(f"{task} edit: mean mask IoU", "≥ 0.6", summary[k]["iou"][0], 0.6)
            add(f"{task} edit: success", "≥ 90 %" if task == "colour" else "≥ 75 %", rate(summary, k, "success"),
                0.9 if task == "colour" else 0.75, " %", 100)
            add(f"{task} edit: preservation", "≥ 98 %", rate(summary, k, "preserved"), 0.98, " %", 100)
            add(f"{task} edit: background PSNR", "≥ 32 dB", summary[k]["psnr"][0], 32.0, " dB")
    k = "paper/two"
    if k in summary:
        add("two edits: success", "≥ 80 %", rate(summary, k, "success"), 0.8, " %", 100)
        add("two edits: success with each mask's IoU ≥ 0.5", "≥ 80 %", rate(summary, k, "success_iou"), 0.8, " %",
            100)
        add("two edits: mean mask IoU", "≥ 0.5", summary[k]["iou"][0], 0.5)
    c = summary.get("fused_vs_sequential")
    if c:
        d = c["success_diff_points"]
        out.append(["fused vs sequential: success", "within 2 points", f"{d:+.1f} ± {c['se']:.1f} points",
                    "met" if d >= -2 else f"short by {-2 - d:.1f} points"])
        out.append(["fused vs sequential: time", "≤ 0.6×", f"{c['time_ratio']:.2f}×",
                    "met" if c["time_ratio"] <= 0.6 else f"over by {c['time_ratio'] - 0.6:.2f}×"])
    return out


def report(recs: list[dict], meta: dict, rows: list[str]) -> tuple[str, dict]:
    groups = {}
    for r in recs:
        groups.setdefault((r["row"], r["task"]), []).append(r)
    header = ["row", "edit", "n", "mask IoU", "IoU ≥ 0.5", "success", "Δ success vs paper, same scenes (points)",
              "preservation", "bg PSNR (dB)", "s / scene"]
    lines, summary, ns = [], {}, set()
    for row in rows:
        for task in ROWS[row][0]:
            g = sorted(groups.get((row, task), []), key=lambda r: r["seed"])
            if not g:
                continue
            s = summarise(g)
            ns.add(s["n"])
            summary[f"{row}/{task}"] = {k: v for k, v in s.items() if k != "text"}
            t = s["text"]
            d = "—" if row in ("paper", "vae") else fmt_diff(paired(g, groups.get(("paper", task), [])))
            if row == "vae":
                t = {**t, "iou": "—", "iou_ok": "—", "success": "—"}
            lines.append([row, task, s["n"], t["iou"], t["iou_ok"], t["success"], d, t["preserved"], t["psnr"],
                          t["seconds"]])
    cmp_ = paired(groups.get(("paper", "two"), []), groups.get(("sequential", "two"), []))
    summary["fused_vs_sequential"] = cmp_
    md = ["## Shapes-world edit quality (issue 18, item 3)" + (f" — {meta['title']}" if meta.get("title") else ""), "",
          f"Command: `{meta['command']}`" + ("" if meta.get("runs", [meta["command"]]) == [meta["command"]] else
                                              "; the edits ran as " + ", ".join(f"`{c}`" for c in meta["runs"])) + "  ",
          f"Date: {meta['date']}; model `{meta['model']}` (id {meta['model_id']}; {meta['model_note']})  ",
          f"Machine: {meta['machine']}; {meta['workers']} worker process(es) × {meta['threads']} torch thread(s); "
          f"1-min load average during the edits {meta['load']} (the machine is shared: times are indicative)", "",
          "Held-out scenes (engine/shapes.py's held-out stream, never seen in training); metric definitions, "
          "edit sampling and seeds in benchmarks/shapes_quality.py's docstring. Means ± standard error; rates with "
          "a Wilson 95 % interval; Δ vs paper is paired on the same scenes (± paired standard error). Single "
          "edits: colour and shape; two: two objects of a 2–3-object scene edited at once (s / scene: both).",
          "", results_md.table(header, lines), ""]
    if len(ns) > 1:
        md += ["Rows have different n: each row ran on the first n scenes of the same seed list (the prefix), so "
               "the Δ column compares like with like.", ""]
    if cmp_:
        md.append(f"Fused against sequential (two edits, the same {cmp_['n']} scenes): success "
                  f"{100 * cmp_['a_success']:.1f} % vs {100 * cmp_['b_success']:.1f} %, "
                  f"{cmp_['success_diff_points']:+.1f} ± {cmp_['se']:.1f} points (fused − sequential, paired SE); "
                  f"mean mask IoU {cmp_['iou_diff']:+.3f} ± {cmp_['iou_diff_se']:.3f}; time {cmp_['a_s']:.2f} s vs "
                  f"{cmp_['b_s']:.2f} s per scene = {cmp_['time_ratio']:.2f}×.")
        md.append("")
    tg = targets(summary)
    if tg:
        md += ["Targets (issue 18; single edits and two edits with the defaults, row `paper`):", "",
               results_md.table(["figure", "target", "measured", ""], tg), ""]
    what = "; ".join(f"`{r}`: {ROWS[r][3]}" for r in rows if any(k[0] == r for k in groups))
    md.append(f"Rows: {what}.")
    return "\n".join(md), summary


# ---------------------------------------------------------------- the run


def model_id(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".json")):
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def model_note(folder: Path) -> str:
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_diffedit_note", "no note")
    except (OSError, ValueError):
        return "no model_index.json"


def load_cache(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            # a row whose fields changed since (a preset retuned) is not the same row: its old results are stale
            if r.get("version") == VERSION and r["row"] in ROWS and r.get("fields", {}) == ROWS[r["row"]][1]:
                out[(r["row"], r["task"], r["seed"])] = r
    return out


def _from_cmds(recs, flag: str, default) -> str:
    """The values of `flag` in the commands that ran the records ("2", or "1/2" when they differ)."""
    import re

    vals = sorted({(re.search(rf"{flag}[ =](\d+)", r.get("cmd", "")) or [None, str(default if r.get("cmd") is None
                    else 1)])[1] for r in recs}) or [str(default)]
    return "/".join(vals)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes per task (default 200)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of colour, shape, two")
    p.add_argument("--workers", type=int, default=1, help="processes, each with --threads torch threads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="per-scene results (default runs/shapes_quality/<id>.jsonl)")
    p.add_argument("--json", type=Path, default=None,
                   help=f"write the figures here (e.g. {JSON_OUT.relative_to(ROOT)}), the records to OUT.records.jsonl.gz")
    p.add_argument("--write", action="store_true", help=f"merge the section into {results_md.RESULTS.relative_to(ROOT)}")
    p.add_argument("--section", default=SECTION, help=f"the RESULTS.md section --write replaces (default {SECTION})")
    p.add_argument("--title", default="", help="words added to the section's heading (e.g. which checkpoint)")
    p.add_argument("--notes", type=Path, default=None, help="a markdown file appended to the section (findings)")
    p.add_argument("--order", choices=("row", "scene"), default="row",
                   help="row: each row's scenes in turn (default); scene: scene k of every row, then k + 1")
    p.add_argument("--until", default=None, metavar="HH:MM", help="stop starting edits at this UTC time (same day)")
    p.add_argument("--stop-file", type=Path, default=None, help="stop starting edits once this file exists")
    p.add_argument("--estimate", action="store_true", help="run one scene per row and task, print the expected time, stop")
    p.add_argument("--report", action="store_true", help="no new edits: the table from the cached results")
    p.add_argument("--yes", action="store_true", help="do not ask before a run estimated at over 30 minutes")
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [r for r in rows if r not in ROWS] + [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f"unknown row(s) or task(s): {bad}")
    if not (a.model / "model_index.json").exists():
        p.error(f"--model {a.model}: not a diffusers folder (the shapes model is exported by "
                "benchmarks/train_shapes.py --export)")
    mid = model_id(a.model)
    cache_path = a.cache or CACHE / f"{mid}.jsonl"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_cache(cache_path)
    seeds = {t: cases(t, a.scenes) for t in TASKS}
    jobs = [(r, t, s) for r in rows for t in ROWS[r][0] if t in tasks for s in seeds[t]]
    if a.order == "scene":  # scene k of every row before scene k + 1: stopped early, the rows have equal n
        rank = {(t, s): k for t in TASKS for k, s in enumerate(seeds[t])}
        jobs.sort(key=lambda j: rank[j[1:]])
    todo = [j for j in jobs if j not in done]
    print(f"model {a.model} (id {mid}; {model_note(a.model)}); {len(jobs)} edits, {len(jobs) - len(todo)} cached; "
          f"cache {cache_path}", flush=True)
    command = "python benchmarks/shapes_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = results_md.LoadSampler()
    if todo and not a.report:
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.workers, initializer=init_worker, initargs=(str(a.model), a.threads)) as pool, \
                cache_path.open("a") as f:
            def take(batch):
                for rec in pool.imap(run_case, batch):
                    rec["cmd"] = command
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    done[(rec["row"], rec["task"], rec["seed"])] = rec
                    yield rec
            # the first scene of each (row, task): its time, for the estimate
            firsts = {}
            for j in todo:
                firsts.setdefault(j[:2], j)
            probe = list(firsts.values())
            times = {(r["row"], r["task"]): r["seconds"] for r in take(probe)}
            for (row, task), rec in ((k[:2], v) for k, v in done.items() if k in set(jobs)):
                times.setdefault((row, task), rec["seconds"])
            rest = [j for j in todo if j not in set(probe)]
            est = sum(times.get(j[:2], 0) for j in rest) / a.workers
            print(f"expected: {len(rest)} more edits, about {est / 60:.1f} min with {a.workers} worker(s) "
                  f"(per edit: " + ", ".join(f"{r}/{t} {s:.1f}s" for (r, t), s in sorted(times.items())) + ")",
                  flush=True)
            if a.estimate:
                rest = []
            elif est > 1800 and not a.yes and sys.stdin.isatty():
                if input("continue? [y/N] ").strip().lower() != "y":
                    rest = []
            t0, n = time.perf_counter(), 0
            for rec in take(rest):
                n += 1
                if (a.until and datetime.now(timezone.utc).strftime("%H:%M") >= a.until or
                        a.stop_file and a.stop_file.exists()):
                    print(f"  --until {a.until} UTC / --stop-file reached after {n} edits: stopping (the rest stays "
                          "to do)", flush=True)
                    pool.terminate()
                    break
                if n % 20 == 0 or n == len(rest):
                    el = time.perf_counter() - t0
                    print(f"  {n}/{len(rest)} edits, {el / 60:.1f} min, about {el / n * (len(rest) - n) / 60:.1f} "
                          f"min left (last: {rec['row']}/{rec['task']} seed {rec['seed']})", flush=True)
    ld = load.stop()
    recs = [done[j] for j in jobs if j in done]
    m = results_md.machine()
    meta = {"command": command, "runs": sorted({r.get("cmd", "?") for r in recs}),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": str(a.model),
            "model_id": mid, "model_note": model_note(a.model), "machine": results_md.machine_line(m),
            "workers": _from_cmds(recs, "--workers", a.workers), "threads": _from_cmds(recs, "--threads", a.threads),
            "load": f"{min(r['load'] for r in recs):.1f}–{max(r['load'] for r in recs):.1f}" if recs else "?",
            "load_this_run": ld, "title": a.title, "scenes": a.scenes, "seeds": seeds}
    md, summary = report(recs, meta, rows)
    if a.notes:
        md += "\n\n" + a.notes.read_text().strip()
    print(md)
    if a.json:  # the figures as JSON; every per-scene record beside it, gzipped JSON lines (OUT.records.jsonl.gz)
        import gzip

        results_md.dump_json({"meta": {k: v for k, v in meta.items() if k != "seeds"}, "summary": summary}, a.json)
        with gzip.open(a.json.with_suffix(".records.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in recs)
    if a.write:
        results_md.write_section(a.section, md)
        print(f"wrote section {a.section} of {results_md.RESULTS}")


if __name__ == "__main__":
    main()
