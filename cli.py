"""diffedit — the command line: argparse → engine.edit.settings.EditSettings + runtime options → engine.runtime.Editor.

  diffedit edit  [--model M] [--image IN] --edit "cat -> dog" [--edit ...] --out OUT.png [flags]
  diffedit mask  [--model M] [--image IN] --edit "cat -> dog" --out OUT.png        (masks + overlay only)
  diffedit batch [--model M] --manifest jobs.jsonl|jobs.csv --out-dir DIR [--shard K/N] [flags]
  diffedit info  [--model M]
  diffedit bench [args for benchmarks/compare.py]

No --model: the bundled shapes-world model (weights/data/shapes, trained by benchmarks/train_shapes.py on
synthetic scenes of circles, squares and triangles). No --image: with that model, its example scene
(engine.shapes.EXAMPLE, "a red circle and a yellow triangle on a white background"); with a --model, the bundled
CC0 sample photo (engine/data/chelsea.png).
Every bad input ends with one line `diffedit: error: ...` on stderr, a non-zero exit (2: bad input,
1: a job or the engine failed, 130: interrupted) and no output files. Every value is checked before any
work (engine/jobs/validate.py): the flags when parsed, then the output paths (never an input: same file, hard
link or symlink), the image's header, free disk space and the model's files, and only then is the model
loaded. Warnings (a prompt longer than CLIP's 77 tokens) are one line each, `diffedit: warning: ...`.
No model math in this file: every edit goes through the Editor, the engine object the Python API and the
benchmarks use.
"""
if not __package__:  # `python cli.py` from a checkout: this folder is the package diffedit_engine (pyproject.toml)
    import importlib.util
    import sys
    from pathlib import Path

    _root = str(Path(__file__).resolve().parent)
    _spec = importlib.util.spec_from_loader("diffedit_engine", loader=None, is_package=True)
    _spec.submodule_search_locations = [_root]
    sys.modules["diffedit_engine"] = importlib.util.module_from_spec(_spec)
    # the checkout's folders are subpackages, not top-level names: `kernels` must stay Hugging Face's package
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _root]
    from diffedit_engine.cli import main

    raise SystemExit(main())

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .engine.edit.settings import EditSettings
from .engine.files import images
from .engine.files.images import MAX_BYTES, MAX_PIXELS, ImageError
from .engine.jobs import batch, manifest, outputs, ray_batch, validate
from .engine.jobs.batch import BatchOptions
from .engine.jobs.console import Log, UsageError
from .engine.jobs.session import (DTYPES, Common, check_compat, check_family, check_steps, check_writable, engine_record,
                                  expected_unet_calls, family_defaults, hashing_note, load, load_editor, model_summary,
                                  models_record, pick_device, refuse_overwrites, resolve_model, shapes_example,
                                  unet_progress, write_error)
from .engine.runtime import family, presets
from .weights.hashing import model_hash

ROOT = Path(__file__).resolve().parent
DEFAULT = EditSettings()
SETTING_FLAGS = manifest.SETTING_FLAGS  # flag -> EditSettings field: one table for the flags and the manifests
FIELD_FLAGS = {f: flag for flag, f in SETTING_FLAGS.items()}
MANIFEST_HELP = """manifest fields (one job per JSONL line, a .json file holding one JSON array of jobs, or CSV
columns with a header row):
  image   (required) path of the input image; relative paths are relative to the manifest's folder
  edits   (required) a list of "SOURCE -> TARGET" strings (CSV: separated by ';' or a JSON list)
  seed    the job's seed (default: --seed); each job draws from its own generator
  out     output name inside --out-dir, ending in .png (default: <index:06d>-<image stem>.png)
  per-job overrides of the flags, under the flag's name or the setting's (the sidecar's) name:
          steps, strength, threshold, overlap, editor, compat, scheduler (the same in both),
          guidance = guidance_scale, maps = num_maps, mask_strength = encode_strength,
          negative_prompt (a '-' may stand for each '_': mask-strength, negative-prompt),
          crop_margin = crop-margin, cache_interval = cache-interval
  preset  exact | fast | fastest: the preset's settings for this job, under the job's own fields (the
          precision stays the run's: --preset, --dtype)
Example: {"image": "photos/1.jpg", "edits": ["cat -> dog"], "seed": 1, "out": "1.png", "steps": 30}
A job whose output is complete (PNG + sidecar of the same job, settings and model) is skipped: re-run the
same command to resume. A bad job is recorded in OUT_DIR/report.json and the others go on."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too: keep errors to one line
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---- options -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EditOptions:
    command: str                    # "edit" | "mask"
    image: Path
    pairs: tuple                    # ((source, target), ...)
    out: Path
    seed: int = 0
    settings: EditSettings = DEFAULT
    save_masks: bool = False
    inpaint_model: str | None = None
    common: Common = field(default_factory=Common)


@dataclass(frozen=True)
class InfoOptions:
    common: Common = field(default_factory=Common)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffedit", description="Text-driven image editing (DiffEdit, N edits in one pass) with "
                                            "Stable Diffusion 1.x/2.x/XL, SD 3.x and FLUX.1.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def runtime(sp, images: bool):
        g = sp.add_argument_group("model and runtime")
        g.add_argument("--model", help="diffusers folder, single .safetensors file, or hub id in the local cache "
                                        "(default: the bundled shapes-world model, trained on synthetic scenes "
                                        "of circles, squares and triangles)")
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda:$LOCAL_RANK or "
                                                        "cuda if available, else cpu)")
        g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 for the UNet (transformer) "
                                                       "and text encoders (auto: float32 on CPU; on CUDA float16, "
                                                       "bfloat16 for SD 3.x / FLUX.1)")
        g.add_argument("--text-encoders", metavar="FOLDER", help="SD 3.x / FLUX.1 single file without its text "
                       "encoders (and FLUX's ae): the folder holding them (clip_l, clip_g, t5xxl_*, ae .safetensors "
                       "files, or a diffusers folder of the same family)")
        g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                       help="override the checkpoint's (single SD2 files do not record it)")
        if images:
            g.add_argument("--vae-dtype", default="auto", help="auto | float32 | float16 | bfloat16 for the VAE "
                                                               "(auto: the model's own rule, as --dtype except that "
                                                               "SD-XL's VAE stays float32 under float16 unless it "
                                                               "is fp16-fixed; a non-finite low-precision encode or "
                                                               "decode is redone in float32 either way)")
            g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                           help="torch.compile the UNet (with CUDA graphs on CUDA). Default: on for CUDA, off "
                                "on CPU (compiling takes minutes there); --no-compile / --compile to choose")
            g.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                           help="refuse input images with more pixels, checked from the header before decoding "
                                "(default 4194304 = 2048²)")
            g.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                           help="refuse larger input image files, checked before reading (default 268435456 = "
                                "256 MiB); only regular files are read (no FIFO, device or folder)")
        if images:
            g.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's, one per core; on a "
                                                        "machine busy with other work fewer run faster, try 1 or 2; "
                                                        "with --ray, per worker; recorded in the sidecar)")
        g.add_argument("--quiet", action="store_true", help="no progress or info output (errors still go to stderr)")
        g.add_argument("--json", action="store_true", help="machine-readable JSON log lines on stdout")

    def edit_flags(sp, command: str):
        g = sp.add_argument_group("edit")
        g.add_argument("--seed", type=int, default=0,
                       help="CPU torch.Generator seed in 0..2**63-1 (default 0)" + ("; a manifest's seed wins" if command == "batch" else ""))
        g.add_argument("--preset", choices=presets.NAMES, default="exact",
                       help="speed preset: exact (default: the full computation), fast or fastest (fewer steps and "
                            "mask draws, DeepCache, a crop around the masks, bf16 on CPUs with native bf16; "
                            "quality and time of each in the README); any flag given explicitly wins over it"
                            + ("; a manifest's preset sets its job's settings" if command == "batch" else ""))
        g.add_argument("--steps", type=int, help=f"sampler steps (default {DEFAULT.steps}; SD 3.x and FLUX.1-dev 28, "
                                                    f"FLUX.1-schnell 4)")
        g.add_argument("--background", choices=["pixels", "latent"], default=DEFAULT.background,
                       help="pixels: the output keeps the input's pixels beyond the masks (dilated and feathered "
                            "8 px; the VAE decoder would shift them a little); latent: the decoded latent "
                            "everywhere, the paper's output (default pixels; --compat diffusers: latent)")
        g.add_argument("--scheduler", choices=["ddim", "dpm++2m"],
                       help=f"sampler of the mask pass's noise level, the inversion and the decoding: ddim or "
                            f"dpm++2m (DPM-Solver++(2M): the fast preset is --scheduler dpm++2m --steps 20; see "
                            f"README) (default {DEFAULT.scheduler}; --compat diffusers: the mask pass stays DDIM; "
                            f"SD 3.x / FLUX.1 sample with their own flow-matching Euler solver)")
        if command != "mask":
            g.add_argument("--strength", type=float, help=f"encoding strength in (0, 1] (default {DEFAULT.strength}; "
                                                          f"FLUX.1-schnell 0.75)")
            g.add_argument("--crop-margin", type=int, metavar="CELLS",
                           help="run the inversion and the decoding on a crop: the masks' bounding box plus this "
                                "many latent cells (8 px) of context (default: the full frame; the fused editor, "
                                "SD models)")
            g.add_argument("--cache-interval", type=int, metavar="K",
                           help="DeepCache: the UNet's deep blocks run every K-th step of the inversion and the "
                                "decoding and are reused between (default 1: every step, exact; the fused editor, "
                                "SD models)")
        g.add_argument("--guidance", type=float,
                       help=f"classifier-free guidance scale (default {DEFAULT.guidance_scale}; SD 3.x 7.0; "
                            f"FLUX.1-dev 3.5, an input of its transformer; FLUX.1-schnell has none)")
        g.add_argument("--maps", type=int,
                       help=f"noise draws per mask (default {DEFAULT.num_maps})")
        g.add_argument("--mask-strength", type=float,
                       help=f"noise level of the mask pass in (0, 1] (default {DEFAULT.encode_strength})")
        g.add_argument("--threshold", default=DEFAULT.threshold,
                       help="mask threshold rule: clamp:r | fixed:v | mean[:k] | median | otsu | quantile:q "
                            f"(default {DEFAULT.threshold}; --compat diffusers: clamp:r only)")
        g.add_argument("--overlap", default=DEFAULT.overlap,
                       help=f"overlapping masks: argmax | average | subtract | soft (default {DEFAULT.overlap})")
        if command != "mask":
            g.add_argument("--editor", choices=["fused", "inpaint", "flowedit"], default=DEFAULT.editor,
                           help="fused: one fused trajectory for all edits (default); inpaint: one inpainting "
                                "pass per edit (SD); flowedit: FlowEdit inside the masks, no inversion (SD 3.x, "
                                "FLUX.1)")
            g.add_argument("--inpaint-model", help="inpainting checkpoint (9-channel UNet) for --editor inpaint "
                                                   "when --model is not one")
            g.add_argument("--negative-prompt", default=DEFAULT.negative_prompt,
                           help="negative prompt of the decoding's classifier-free guidance (default empty)")
            g.add_argument("--save-masks", action="store_true",
                           help="also write OUT.mask<i>.png, OUT.overlay.png, OUT.grid.png")
        g.add_argument("--compat", choices=["diffusers"],
                       help="reproduce diffusers' StableDiffusionDiffEditPipeline (one edit, clamp:r threshold)")
        if command != "batch":
            g.add_argument("--image", help="input image (default: the shapes model's example scene, \"a red circle and "
                                           "a yellow triangle on a white background\"; with --model, the bundled photo)")
            g.add_argument("--edit", action="append", required=True, metavar='"SOURCE -> TARGET"',
                           help="an edit; repeat for several (empty source = ∅)")
            g.add_argument("--out", required=True, help="output .png (a .json sidecar is written next to it)")

    for name, helptext in (("edit", "edit one image"), ("mask", "compute the edit masks and an overlay only")):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        edit_flags(sp, name)
        runtime(sp, True)
    sp = sub.add_parser("batch", help="run a manifest of jobs (resumable, shardable)", epilog=MANIFEST_HELP,
                        description="Run a manifest of jobs through one engine: same-size images with the same "
                                    "edits and settings are batched.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = sp.add_argument_group("batch")
    g.add_argument("--manifest", required=True, help="jobs.jsonl or jobs.csv (fields below)")
    g.add_argument("--out-dir", required=True, help="folder for the outputs and report.json")
    g.add_argument("--shard", help="K/N: this process does the jobs with index %% N == K "
                                   "(default: RANK/WORLD_SIZE, else all)")
    g.add_argument("--batch-size", type=int, help="at most this many images per engine call (default: as many as "
                                                  "fit in free memory)")
    g = sp.add_argument_group("Ray (scale-out across processes, GPUs and nodes; needs pip install 'ray[data]')")
    g.add_argument("--ray", action="store_true", help="run the jobs on Ray Data: a pool of workers, each holding the model")
    g.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")
    g.add_argument("--workers", type=int, help="workers (default: one per GPU / --gpus-per-worker, or 1 on CPU)")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs per worker, fractions allowed (default: 1 with GPUs, else 0)")
    g.add_argument("--cpus-per-worker", type=float, help="CPUs per worker, also its torch threads on CPU (default 1)")
    g.add_argument("--verbose", action="store_true", help="Ray's own logs as Ray prints them (its progress lines, its "
                                                         "core's warnings, the workers' output); default: only ours")
    edit_flags(sp, "batch")
    runtime(sp, True)
    runtime(sub.add_parser("info", help="architecture, prediction type, dtype and parameter counts of a model"), False)
    sub.add_parser("bench", help="run benchmarks/compare.py (arguments are passed through)", add_help=False)
    return p


def _settings(a, n_pairs: int | None, fam: str | None = None) -> EditSettings:
    """The EditSettings of the flags over the model family's defaults (session.family_defaults), every check that
    needs no file or model (engine.manifest.check_settings: finite, in range), errors naming the flag and the value."""
    values = {f: getattr(a, flag[2:].replace("-", "_")) for flag, f in SETTING_FLAGS.items()
              if hasattr(a, flag[2:].replace("-", "_"))}
    try:
        own = presets.settings(getattr(a, "preset", "exact"), fam)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    values = {**own, **{f: v for f, v in values.items() if v is not None}}
    try:
        return manifest.check_settings(EditSettings(**family_defaults(values, fam)), n_pairs, FIELD_FLAGS.get)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _device_and_dtypes(a):
    """Check --device / --dtype / --vae-dtype now, before any work (a missing GPU is a one-line error)."""
    for flag, v in (("--dtype", a.dtype), ("--vae-dtype", getattr(a, "vae_dtype", "auto"))):
        if v != "auto" and v not in DTYPES:
            raise UsageError(f"{flag} {v}: use auto, float32, float16 or bfloat16")
    try:
        validate.device(a.device)
    except validate.ValidationError as e:
        raise UsageError(str(e)) from None
    pick_device(a.device)


def options_from_args(a):
    """argparse namespace -> options dataclass, with every check that needs no file or model."""
    try:
        return _options(a)
    except validate.ValidationError as e:
        raise UsageError(str(e)) from None


def ray_options(a) -> ray_batch.RayOptions | None:
    """The --ray flags of an argparse namespace, checked (ValueError: a usage error); None without --ray."""
    if not a.ray:
        given = [f for f, v in (("--ray-address", a.ray_address), ("--workers", a.workers),
                                ("--gpus-per-worker", a.gpus_per_worker), ("--cpus-per-worker", a.cpus_per_worker),
                                ("--verbose", getattr(a, "verbose", False) or None)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} is used only with --ray")
        return None
    if a.shard:
        raise ValueError("--shard and --ray do not mix: Ray balances the jobs across its workers itself")
    device = str(getattr(a, "device", "auto"))
    if device.startswith("cuda:"):  # inside an actor CUDA_VISIBLE_DEVICES holds only its own GPU(s): cuda:0
        raise ValueError(f"--device {device} with --ray: Ray gives each worker its GPU, so a worker's device is "
                         "cuda; use --device cuda (or auto), and --gpus-per-worker to size the share")
    if a.workers is not None and a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    if a.gpus_per_worker is not None and not 0 <= a.gpus_per_worker:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {a.gpus_per_worker}")
    cpus = 1.0 if a.cpus_per_worker is None else a.cpus_per_worker
    if not cpus > 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {cpus}")
    return ray_batch.RayOptions(address=a.ray_address, workers=a.workers, gpus_per_worker=a.gpus_per_worker,
                                cpus_per_worker=cpus, verbose=getattr(a, "verbose", False))


def _options(a):

    _device_and_dtypes(a)
    common = Common(model=a.model, device=a.device, dtype=a.dtype, vae_dtype=getattr(a, "vae_dtype", "auto"),
                    compile=getattr(a, "compile", None), prediction_type=a.prediction_type,
                    max_pixels=validate.integer("--max-pixels", getattr(a, "max_pixels", MAX_PIXELS), 1),
                    max_bytes=validate.integer("--max-bytes", getattr(a, "max_bytes", MAX_BYTES), 1),
                    quiet=a.quiet, json=a.json,
                    threads=None if getattr(a, "threads", None) is None else validate.integer("--threads", a.threads, 1, 4096),
                    text_encoders=a.text_encoders, preset=getattr(a, "preset", "exact"))
    fam = family.family(a.model) if a.model else None  # names and header only: per-family defaults and refusals
    given = {f for flag, f in SETTING_FLAGS.items() if getattr(a, flag[2:].replace("-", "_"), None) is not None}
    if a.command == "info":
        check_family(fam, EditSettings(), common, set())
        return InfoOptions(common)
    seed = validate.seed(a.seed)
    inpaint_model = getattr(a, "inpaint_model", None)
    if inpaint_model and a.editor != "inpaint":
        raise UsageError("--inpaint-model is used only with --editor inpaint")
    if a.command == "batch":
        settings = _settings(a, None, fam)
        check_family(fam, settings, common, given, inpaint_model)
        if a.batch_size is not None and a.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {a.batch_size}")
        try:
            shard = manifest.parse_shard(a.shard) if a.shard else None
        except ValueError as e:
            raise UsageError(str(e)) from None
        out_dir = Path(a.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out-dir {a.out_dir}: exists and is not a folder")
        validate.output_path(out_dir / "report.json", "--out-dir", suffix=None)
        try:
            ray = ray_options(a)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return BatchOptions(manifest=Path(a.manifest), out_dir=out_dir, shard=shard, batch_size=a.batch_size,
                            seed=seed, settings=settings, save_masks=a.save_masks, inpaint_model=inpaint_model,
                            common=common, ray=ray)
    pairs = []
    for e in a.edit:
        try:
            pairs.append(manifest.parse_edit(e))
        except ValueError as err:
            raise UsageError(f"--edit: {err}") from None
    settings = _settings(a, len(pairs), fam)
    check_family(fam, settings, common, given, inpaint_model)
    save_masks = getattr(a, "save_masks", False)
    if a.out and "\0" not in a.out and Path(a.out).suffix.lower() == ".png":
        also = outputs.files(outputs.output_paths(Path(a.out), len(pairs), save_masks, a.command == "mask"))
    else:
        also = ()
    out = validate.output_path(a.out, "--out", also=also)
    if a.image is not None and (a.image == "" or "\0" in a.image):
        raise UsageError(f"--image {a.image!r}: not a file path")
    image = Path(a.image) if a.image else shapes_example() if a.model is None else sample_image()
    return EditOptions(command=a.command, image=image, pairs=tuple(pairs),
                       out=out, seed=seed, settings=settings, save_masks=save_masks,
                       inpaint_model=inpaint_model, common=common)


# ---- helpers -----------------------------------------------------------------------------------------------

def sample_image() -> Path:
    """The bundled CC0 photo: the example image for a Stable Diffusion --model given without --image."""
    return ROOT / "engine" / "data" / "chelsea.png"


def cmd_edit(o: EditOptions, log: Log) -> int:
    c = o.common
    masks_only = o.command == "mask"
    paths = outputs.output_paths(o.out, len(o.pairs), o.save_masks, masks_only)
    model_files = [Path(m) for m in (c.model, o.inpaint_model) if m and Path(m).is_file()]
    refuse_overwrites(outputs.files(paths), [o.image, *model_files])
    check_writable(o.out.parent, "output folder")
    t0 = time.perf_counter()
    pil = images.load_image(o.image, c.max_pixels, c.max_bytes)
    x = images.to_tensor(pil)
    t_img = time.perf_counter() - t0
    try:
        validate.free_space(o.out.parent, outputs.need_bytes(paths, tuple(x.shape[-2:])))
    except validate.ValidationError as e:
        raise UsageError(str(e)) from None
    path, is_random = resolve_model(c.model, log)
    ipath = resolve_model(o.inpaint_model, log, "--inpaint-model")[0] if o.inpaint_model else None
    check_steps(o.settings, path)
    check_compat(o.settings, path)
    hashes = model_hash(path, on_miss=lambda p: hashing_note(p, log))
    ed, t_load = load_editor(path, ipath, o.settings, c, log)
    log.event("start", f"{o.command}: {o.image} ({x.shape[2]}x{x.shape[1]}) with "
              + "; ".join(f"{a or '∅'} -> {b}" for a, b in o.pairs), image=str(o.image))
    calls = expected_unet_calls(o.settings, masks_only, ed.info["denoiser"] == "transformer")
    with unet_progress(ed, calls, disable=c.quiet or c.json, desc=o.command):
        run = ed.masks if masks_only else ed.edit
        r = run(x, o.pairs, settings=o.settings, seed=o.seed)
    size = tuple(x.shape[-2:])
    out = outputs.outcome(r, size)
    model = models_record(ed, path, ipath, is_random, hashes)
    rec = outputs.Record(o.command, o.image, o.pairs, o.seed, o.settings, size)
    meta = outputs.sidecar(rec, model, out, {"load_image_s": t_img, "model_load_s": t_load, "engine_s": out.seconds},
                           engine_record(ed))
    for warning in outputs.empty_masks(o.pairs, meta["mask_coverage"]):
        log.warning(warning, "empty_mask")
    refuse_overwrites(outputs.files(paths), [o.image, *model_files])  # still true after the work
    try:
        paths = outputs.write_outputs(o.out, x, out, meta,
                                      outputs.parameters_text(rec, model),
                                      extras=o.save_masks, masks_only=masks_only)
    except OSError as e:
        raise OSError(write_error(o.out, e)) from None
    written = [str(p) for p in outputs.files(paths)]
    note = f"; the VAE overflowed in {ed.info['vae_dtype']} and was redone in float32" if out.vae_fallbacks else ""
    log.event("done", f"wrote {', '.join(written)} (engine {out.seconds:.1f} s{note})", outputs=written,
              seconds=round(out.seconds, 3), mask_coverage=meta["mask_coverage"], vae_fp32_fallbacks=out.vae_fallbacks)
    if not c.quiet and not c.json:
        log.result(str(o.out))
    return 0


def cmd_info(o: InfoOptions, log: Log) -> int:
    path, is_random = resolve_model(o.common.model, log)
    m, _ = load(path, o.common, log)
    info, text = model_summary(path, m, is_random, model_hash(path, on_miss=lambda p: hashing_note(p, log)))
    log.result(json.dumps({"event": "info", **info}, default=str) if o.common.json else text)
    return 0


def cmd_bench(args: list[str], log: Log) -> int:
    """benchmarks/compare.py; its results table (the tracked benchmarks/RESULTS.md) is rewritten only with
    --write: a user's trial run must not leave the checkout modified."""
    script = ROOT / "benchmarks" / "compare.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: `diffedit bench` runs from a source checkout")
    write = "--write" in args
    args = [a for a in args if a != "--write"]
    if not write and "--no-write" not in args:
        log.event("bench", "bench: results are printed, benchmarks/RESULTS.md is left as it is (--write to update it)")
        args.append("--no-write")
    return subprocess.call([sys.executable, str(script), *args])


# ---- entry point -------------------------------------------------------------------------------------------

def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, torchrun, schedulers) unwinds like ^C: temp files removed, report written


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log = Log(quiet="--quiet" in argv, json_lines="--json" in argv)
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(argv[1:], log)
        except UsageError as e:
            log.error(e)
            return 2


    state = {"log": log}

    def show(message, category, filename, lineno, file=None, line=None):  # one line, never a traceback-like pair
        state["log"].python_warning(message, category, filename)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once (the tokenizer warns once per prompt)
            warnings.showwarning = show
            a = build_parser().parse_args(argv)
            o = options_from_args(a)
            log = state["log"] = Log(o.common.quiet, o.common.json)
            if threading_main():
                signal.signal(signal.SIGTERM, _terminate)
            if isinstance(o, InfoOptions):
                return cmd_info(o, log)
            if isinstance(o, BatchOptions):
                if o.ray:
                    return ray_batch.run(o, o.ray, log)
                return batch.run(o, log)
            return cmd_edit(o, log)
    except (UsageError, ImageError, validate.ValidationError) as e:
        log.error(e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:  # the engine failed: still one line (DIFFEDIT_DEBUG=1 for the traceback)
        if os.environ.get("DIFFEDIT_DEBUG"):
            raise
        log.error(f"{type(e).__name__}: {e}")
        return 1


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
