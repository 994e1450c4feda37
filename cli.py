"""diffedit — the command line: argparse → engine.settings.EditSettings + runtime options → engine.pipeline.Editor.

  diffedit edit  [--model M] [--image IN] --edit "cat -> dog" [--edit ...] --out OUT.png [flags]
  diffedit mask  [--model M] [--image IN] --edit "cat -> dog" --out OUT.png        (masks + overlay only)
  diffedit batch [--model M] --manifest jobs.jsonl|jobs.csv --out-dir DIR [--shard K/N] [flags]
  diffedit info  [--model M]
  diffedit bench [args for benchmarks/compare.py]

No --model: the engine builds a small random-weight model (weights/random_model.py) — it proves the pipeline,
not the picture. No --image: the bundled CC0 sample photo (engine/data/chelsea.png).
Every bad input ends with one line `diffedit: error: ...` on stderr, a non-zero exit (2: bad input,
1: a job or the engine failed, 130: interrupted) and no output files. Every value is checked before any
work (engine/validate.py): the flags when parsed, then the output paths (never an input: same file, hard
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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .engine.jobs import validate
from .engine.edit.settings import EditSettings

ROOT = Path(__file__).resolve().parent
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT = EditSettings()
MAX_PIXELS, MAX_BYTES = 2048 * 2048, 256 << 20  # engine.images' defaults (not imported: it pulls in torch)
# flag -> EditSettings field, and the commands that take it
SETTING_FLAGS = {"--steps": "steps", "--strength": "strength", "--guidance": "guidance_scale", "--maps": "num_maps",
                 "--mask-strength": "encode_strength", "--threshold": "threshold", "--overlap": "overlap",
                 "--editor": "editor", "--compat": "compat", "--negative-prompt": "negative_prompt",
                 "--scheduler": "scheduler"}
FIELD_FLAGS = {f: flag for flag, f in SETTING_FLAGS.items()}
MANIFEST_HELP = """manifest fields (one job per JSONL line, or CSV columns with a header row):
  image   (required) path of the input image; relative paths are relative to the manifest's folder
  edits   (required) a list of "SOURCE -> TARGET" strings (CSV: separated by ';' or a JSON list)
  seed    the job's seed (default: --seed); each job draws from its own generator
  out     output name inside --out-dir, ending in .png (default: <index:06d>-<image stem>.png)
  steps, strength, guidance_scale, num_maps, encode_strength, threshold, overlap, editor, compat,
  negative_prompt, scheduler
          per-job overrides of the matching flags (--steps, --strength, --guidance, --maps, --mask-strength,
          --threshold, --overlap, --editor, --compat, --negative-prompt, --scheduler)
Example: {"image": "photos/1.jpg", "edits": ["cat -> dog"], "seed": 1, "out": "1.png", "steps": 30}
A job whose output is complete (PNG + sidecar of the same job, settings and model) is skipped: re-run the
same command to resume. A bad job is recorded in OUT_DIR/report.json and the others go on."""


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any work is done."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too: keep errors to one line
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---- options -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Common:
    model: str | None = None        # None: the engine's random-weight model
    device: str = "auto"
    dtype: str = "auto"
    vae_dtype: str = "auto"
    compile: bool | None = None     # None: on CUDA, off on CPU
    prediction_type: str | None = None
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES
    quiet: bool = False
    json: bool = False


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
class BatchOptions:
    manifest: Path
    out_dir: Path
    shard: tuple | None = None      # (K, N); None: RANK/WORLD_SIZE from the environment, else (0, 1)
    batch_size: int | None = None   # images per engine call; None: from free memory
    seed: int = 0
    settings: EditSettings = DEFAULT
    save_masks: bool = False
    inpaint_model: str | None = None
    common: Common = field(default_factory=Common)
    ray: object = None              # engine.ray_batch.RayOptions with --ray


@dataclass(frozen=True)
class InfoOptions:
    common: Common = field(default_factory=Common)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffedit", description="Text-driven image editing (DiffEdit, N edits in one pass) with "
                                            "Stable Diffusion.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def runtime(sp, images: bool):
        g = sp.add_argument_group("model and runtime")
        g.add_argument("--model", help="diffusers folder, single .safetensors file, or hub id in the local cache "
                                        "(default: a small random-weight model the engine builds: proves the "
                                        "pipeline, not the picture)")
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda:$LOCAL_RANK or "
                                                        "cuda if available, else cpu)")
        g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 for the UNet and text "
                                                       "encoder (auto: float16 on CUDA, float32 on CPU)")
        g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                       help="override the checkpoint's (single SD2 files do not record it)")
        if images:
            g.add_argument("--vae-dtype", default="auto", help="auto | float32 | float16 | bfloat16 for the VAE "
                                                               "(auto: as --dtype; a non-finite low-precision "
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
        g.add_argument("--quiet", action="store_true", help="no progress or info output (errors still go to stderr)")
        g.add_argument("--json", action="store_true", help="machine-readable JSON log lines on stdout")

    def edit_flags(sp, command: str):
        g = sp.add_argument_group("edit")
        g.add_argument("--seed", type=int, default=0,
                       help="CPU torch.Generator seed in 0..2**63-1 (default 0)" + ("; a manifest's seed wins" if command == "batch" else ""))
        g.add_argument("--steps", type=int, default=DEFAULT.steps, help=f"sampler steps (default {DEFAULT.steps})")
        g.add_argument("--scheduler", choices=["ddim", "dpm++2m"], default=DEFAULT.scheduler,
                       help=f"sampler of the mask pass's noise level, the inversion and the decoding: ddim or "
                            f"dpm++2m (DPM-Solver++(2M): the fast preset is --scheduler dpm++2m --steps 20; see "
                            f"README) (default {DEFAULT.scheduler}; --compat diffusers: the mask pass stays DDIM)")
        if command != "mask":
            g.add_argument("--strength", type=float, default=DEFAULT.strength,
                           help=f"encoding strength in (0, 1] (default {DEFAULT.strength})")
        g.add_argument("--guidance", type=float, default=DEFAULT.guidance_scale,
                       help=f"classifier-free guidance scale (default {DEFAULT.guidance_scale})")
        g.add_argument("--maps", type=int, default=DEFAULT.num_maps,
                       help=f"noise draws per mask (default {DEFAULT.num_maps})")
        g.add_argument("--mask-strength", type=float, default=DEFAULT.encode_strength,
                       help=f"noise level of the mask pass in (0, 1] (default {DEFAULT.encode_strength})")
        g.add_argument("--threshold", default=DEFAULT.threshold,
                       help="mask threshold rule: clamp:r | fixed:v | mean[:k] | median | otsu | quantile:q "
                            f"(default {DEFAULT.threshold}; --compat diffusers: clamp:r only)")
        g.add_argument("--overlap", default=DEFAULT.overlap,
                       help=f"overlapping masks: argmax | average | subtract | soft (default {DEFAULT.overlap})")
        if command != "mask":
            g.add_argument("--editor", choices=["fused", "inpaint"], default=DEFAULT.editor,
                           help="fused: one fused trajectory for all edits (default); inpaint: one inpainting "
                                "pass per edit")
            g.add_argument("--inpaint-model", help="inpainting checkpoint (9-channel UNet) for --editor inpaint "
                                                   "when --model is not one")
            g.add_argument("--negative-prompt", default=DEFAULT.negative_prompt,
                           help="negative prompt of the decoding's classifier-free guidance (default empty)")
            g.add_argument("--save-masks", action="store_true",
                           help="also write OUT.mask<i>.png, OUT.overlay.png, OUT.grid.png")
        g.add_argument("--compat", choices=["diffusers"],
                       help="reproduce diffusers' StableDiffusionDiffEditPipeline (one edit, clamp:r threshold)")
        if command != "batch":
            g.add_argument("--image", help="input image (default: the bundled sample photo)")
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
    g = sp.add_argument_group("Ray (scale-out across processes, GPUs and nodes; pip install 'diffedit-engine[ray]')")
    g.add_argument("--ray", action="store_true", help="run the jobs on Ray Data: a pool of workers, each holding the model")
    g.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")
    g.add_argument("--workers", type=int, help="workers (default: one per GPU / --gpus-per-worker, or 1 on CPU)")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs per worker, fractions allowed (default: 1 with GPUs, else 0)")
    g.add_argument("--cpus-per-worker", type=float, help="CPUs per worker, also its torch threads on CPU (default 1)")
    edit_flags(sp, "batch")
    runtime(sp, True)
    runtime(sub.add_parser("info", help="architecture, prediction type, dtype and parameter counts of a model"), False)
    sub.add_parser("bench", help="run benchmarks/compare.py (arguments are passed through)", add_help=False)
    return p


def _settings(a, n_pairs: int | None) -> EditSettings:
    """The EditSettings of the flags, every check that needs no file or model (engine.manifest.check_settings:
    finite, in range), errors naming the flag and the value."""
    from .engine.jobs import manifest

    values = {f: getattr(a, flag[2:].replace("-", "_")) for flag, f in SETTING_FLAGS.items()
              if hasattr(a, flag[2:].replace("-", "_"))}
    try:
        return manifest.check_settings(EditSettings(**values), n_pairs, FIELD_FLAGS.get)
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


def _options(a):
    from .engine.jobs import manifest, outputs

    _device_and_dtypes(a)
    common = Common(model=a.model, device=a.device, dtype=a.dtype, vae_dtype=getattr(a, "vae_dtype", "auto"),
                    compile=getattr(a, "compile", None), prediction_type=a.prediction_type,
                    max_pixels=validate.integer("--max-pixels", getattr(a, "max_pixels", MAX_PIXELS), 1),
                    max_bytes=validate.integer("--max-bytes", getattr(a, "max_bytes", MAX_BYTES), 1),
                    quiet=a.quiet, json=a.json)
    if a.command == "info":
        return InfoOptions(common)
    seed = validate.seed(a.seed)
    inpaint_model = getattr(a, "inpaint_model", None)
    if inpaint_model and a.editor != "inpaint":
        raise UsageError("--inpaint-model is used only with --editor inpaint")
    if a.command == "batch":
        settings = _settings(a, None)
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
        from .engine.jobs import ray_batch

        try:
            ray = ray_batch.options(a)
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
    settings = _settings(a, len(pairs))
    save_masks = getattr(a, "save_masks", False)
    if a.out and "\0" not in a.out and Path(a.out).suffix.lower() == ".png":
        also = outputs.files(outputs.output_paths(Path(a.out), len(pairs), save_masks, a.command == "mask"))
    else:
        also = ()
    out = validate.output_path(a.out, "--out", also=also)
    if a.image is not None and (a.image == "" or "\0" in a.image):
        raise UsageError(f"--image {a.image!r}: not a file path")
    return EditOptions(command=a.command, image=Path(a.image) if a.image else sample_image(), pairs=tuple(pairs),
                       out=out, seed=seed, settings=settings, save_masks=save_masks,
                       inpaint_model=inpaint_model, common=common)


# ---- helpers -----------------------------------------------------------------------------------------------

class Log:
    """Human lines on stderr, or JSON lines on stdout (--json); nothing but errors with --quiet."""

    def __init__(self, quiet=False, json_lines=False):
        self.quiet, self.json = quiet, json_lines

    def event(self, name: str, message: str = "", **fields):
        if self.json:
            print(json.dumps({"event": name, "time": round(time.time(), 3), **({"message": message} if message else {}),
                              **fields}, default=str), flush=True)
        elif not self.quiet and message:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)  # keeps an active progress bar intact

    def warning(self, message: str, category: str = "warning"):
        """One line `diffedit: warning: ...` on stderr (a `warning` event with --json), even with --quiet."""
        message = " ".join(str(message).split())
        if self.json:
            print(json.dumps({"event": "warning", "category": category, "message": message}), flush=True)
        else:
            from tqdm import tqdm

            tqdm.write(f"diffedit: warning: {message}", file=sys.stderr)

    def error(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever the exception text held
        if self.json:
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"diffedit: error: {message}", file=sys.stderr, flush=True)


def sample_image() -> Path:
    from . import engine

    return Path(engine.__file__).resolve().parent / "data" / "chelsea.png"


def check_writable(folder: Path, what: str) -> None:
    """Fail now, not after the work, if outputs cannot be written into `folder` (created later if missing)."""
    folder = Path(folder).absolute()
    q = folder
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise UsageError(f"{what} {folder} cannot be created: {q} is a file, not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {folder} is not writable ({q}: permission denied)")
    try:  # os.access says nothing about read-only mounts or full quotas: really write something
        with tempfile.TemporaryFile(dir=q):
            pass
    except OSError as e:
        raise UsageError(f"{what} {folder} is not writable ({q}: {e.strerror or e})") from None


def resolve_model(spec: str | None, log: Log, flag: str = "--model") -> tuple[Path, bool]:
    """(local checkpoint path, random?) with the input errors a user can make caught before any work."""
    from .weights import files

    if spec is None:
        from .weights import random_model

        log.event("random_model", f"note: {random_model.NOTE}", note=random_model.NOTE)
        return random_model.random_model_path(), True
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            pickles = sorted(q.name for q in p.rglob("*") if q.suffix.lower() in files.PICKLE_SUFFIXES)
            has_st = any(p.rglob("*.safetensors"))
            if pickles and not has_st:
                raise UsageError(f"{flag} {p}: only pickle checkpoints inside ({pickles[0]}); refusing to unpickle "
                                 f"(arbitrary code) — use a .safetensors release")
            raise UsageError(f"{flag} {p}: not a checkpoint folder (no model_index.json); pass a diffusers folder "
                             f"or a single .safetensors file")
        return p, False
    if p.is_file():
        if p.suffix.lower() in files.PICKLE_SUFFIXES:
            raise UsageError(f"{flag} {p}: refusing to load a pickle checkpoint ({p.suffix}); unpickling can run "
                             f"arbitrary code — convert it to .safetensors or use the .safetensors release")
        if p.suffix.lower() != ".safetensors":
            raise UsageError(f"{flag} {p}: not a .safetensors file or a diffusers folder")
        try:  # the header alone tells a renamed pickle or a truncated download, before any work
            files.read_header(p)
        except files.CheckpointError as e:
            raise UsageError(f"{flag} {e}") from None
        return p, False
    if files.HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        try:
            return files.resolve(spec), False
        except FileNotFoundError as e:
            raise UsageError(f"{flag} {e}") from None
    raise UsageError(f"{flag} {spec}: no such file or folder")


def hashing_note(path, log: Log) -> None:
    log.event("hashing", f"hashing {path} for the output metadata (first use only; cached by size and mtime) ...")


def pick_device(spec: str):
    """The device, made current for CUDA (so Triton launches and allocations go to it, not GPU 0)."""
    import torch

    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")
    else:
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise UsageError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
        if dev.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {spec!r}: use cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(dev)
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def pick_dtype(spec: str, device, default=None):
    import torch

    if spec == "auto":
        return default or (torch.float16 if device.type == "cuda" else torch.float32)
    return getattr(torch, DTYPES[spec])


def load(path: Path, c: Common, log: Log, flag: str = "--model"):
    """The model, once: (model, seconds)."""
    from .weights import CheckpointError, load_model

    device = pick_device(c.device)
    dtype = pick_dtype(c.dtype, device)
    vae_dtype = pick_dtype(c.vae_dtype, device, dtype)
    t0 = time.perf_counter()
    log.event("load_model", f"loading {path} on {device} as {str(dtype).replace('torch.', '')}"
              + (f" (VAE {str(vae_dtype).replace('torch.', '')})" if vae_dtype != dtype else "") + " ...",
              model=str(path))
    try:
        m = load_model(str(path), device=device, dtype=dtype, prediction_type=c.prediction_type, vae_dtype=vae_dtype)
    except (CheckpointError, FileNotFoundError, AssertionError, KeyError) as e:
        msg = str(e)
        raise UsageError(f"{flag} {msg}" if msg.startswith(str(path)) else f"{flag} {path}: {msg}") from None
    dt = time.perf_counter() - t0
    log.event("model_loaded", f"loaded {m.kind} ({m.prediction_type}) in {dt:.1f} s", kind=m.kind,
              prediction_type=m.prediction_type, seconds=round(dt, 3))
    return m, dt


def load_editor(path: Path, inpaint_path: Path | None, settings: EditSettings, c: Common, log: Log,
                max_images: int | None = None):
    """(Editor, model info, seconds): the engine, with an inpainting model for --editor inpaint."""
    from .engine.jobs import outputs
    from .engine.runtime.pipeline import Editor, EditorOptions
    from .weights.hashing import model_hash

    m, dt = load(path, c, log)
    im = None
    if inpaint_path is not None:
        im, dt2 = load(inpaint_path, c, log, "--inpaint-model")
        dt += dt2
        if not im.kind.endswith("-inpaint"):
            raise UsageError(f"--inpaint-model {inpaint_path}: a {im.kind} model, not an inpainting one (9-channel UNet)")
    elif settings.editor == "inpaint" and not m.kind.endswith("-inpaint"):
        raise UsageError(f"--editor inpaint needs an inpainting model: --model {path} is {m.kind}; "
                         f"pass --inpaint-model PATH or an inpainting --model")
    t0 = time.perf_counter()
    ed = Editor(m, EditorOptions(compile=c.compile, max_images=max_images), inpaint_model=im)
    log.event("engine", "engine: " + ", ".join(f"{k} {ed.info[k]}" for k in ("dtype", "vae_dtype", "compiled",
                                                                              "cuda_graphs")), **ed.info)
    return ed, dt + time.perf_counter() - t0


def engine_record(ed) -> dict:
    """What the engine applied, for the sidecar. unet_max_batch: UNet samples per call by latent size ("hxw"), as
    the runner chose them from free memory (a fixed int when set): a run that chose batch 1 on a CPU with a full
    page cache was 0.91x diffusers, and nothing in its outputs said why."""
    mb = ed.max_batch
    return {**{k: ed.info.get(k) for k in ("device", "dtype", "vae_dtype", "compiled", "cuda_graphs", "channels_last",
                                           "fused_attention_modules", "heap_buffers")},
            "unet_max_batch": mb if not isinstance(mb, dict) else {f"{h}x{w}": n for (h, w), n in mb.items()}}


def models_record(ed, path, ipath, is_random, hashes) -> dict:
    from .engine.jobs import outputs
    from .weights.hashing import model_hash

    model = outputs.model_info(path, ed.base, is_random, hashes)
    if ipath is not None:
        model["inpaint_model"] = outputs.model_info(ipath, ed.inpaint_model, False, model_hash(ipath))
    return model


class unet_progress:
    """A tqdm bar (with ETA) advanced by a forward hook on the engine's UNet runner: the engine needs no
    callback argument, and the count is exact whatever the runner splits. total: expected UNet calls."""

    def __init__(self, ed, total: int, disable: bool = False, desc: str = "unet"):
        self.ed, self.total, self.disable, self.desc = ed, total, disable, desc

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="step", desc=self.desc, disable=self.disable, dynamic_ncols=True,
                        leave=False)
        self.hook = self.ed.model.unet.register_forward_hook(lambda *_: self.bar.update(1) and None)
        return self.bar

    def __exit__(self, *exc):
        self.hook.remove()
        self.bar.close()


def expected_unet_calls(s: EditSettings, masks_only: bool = False) -> int:
    """One batched mask-pass call, then int(steps·strength) inversion and as many decoding steps."""
    S = int(s.steps * s.strength)
    return 1 if masks_only else 1 + 2 * S


# ---- commands ----------------------------------------------------------------------------------------------

def refuse_overwrites(outputs_, inputs, flag: str = "--out") -> None:
    """UsageError when an output path resolves to an input (same file, hard link, symlink), or names an
    existing file the engine did not write (a user's file is never overwritten)."""
    from .engine.files import atomic
    from .engine.jobs import outputs

    hits = atomic.find_overwrites(outputs_, [p for p in inputs if p is not None])
    if hits:
        out, inp = hits[0]
        raise UsageError(f"{flag} {out}: is the input {inp} (same file); refusing to overwrite an input")
    foreign = outputs.foreign_files({"files": [Path(p) for p in outputs_]})
    if foreign:
        raise UsageError(f"{flag} {foreign[0]}: exists and was not written by diffedit; refusing to overwrite it "
                         f"(choose another name or move the file)")


def schedule_length(path: Path) -> int:
    """num_train_timesteps of a diffusers folder's scheduler_config.json (1000, SD's, when not recorded)."""
    try:
        n = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text()).get("num_train_timesteps")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1000
    except (OSError, ValueError, AttributeError):
        return 1000


def check_steps(s: EditSettings, path: Path, flag: str = "--steps") -> None:
    t = schedule_length(path)
    if s.steps > t:
        raise UsageError(f"{flag} {s.steps}: must be <= {t}, the model's schedule length (num_train_timesteps)")


def cmd_edit(o: EditOptions, log: Log) -> int:
    from .engine.files import images
    from .engine.jobs import outputs
    from .weights.hashing import model_hash

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
    hashes = model_hash(path, on_miss=lambda p: hashing_note(p, log))
    ed, t_load = load_editor(path, ipath, o.settings, c, log)
    log.event("start", f"{o.command}: {o.image} ({x.shape[2]}x{x.shape[1]}) with "
              + "; ".join(f"{a or '∅'} -> {b}" for a, b in o.pairs), image=str(o.image))
    with unet_progress(ed, expected_unet_calls(o.settings, masks_only), disable=c.quiet or c.json, desc=o.command):
        run = ed.masks if masks_only else ed.edit
        r = run(x, o.pairs, settings=o.settings, seed=o.seed)
    size = tuple(x.shape[-2:])
    out = outputs.outcome(r, size)
    model = models_record(ed, path, ipath, is_random, hashes)
    rec = outputs.Record(o.command, o.image, o.pairs, o.seed, o.settings, size)
    meta = outputs.sidecar(rec, model, out, {"load_image_s": t_img, "model_load_s": t_load, "engine_s": out.seconds},
                           engine_record(ed))
    refuse_overwrites(outputs.files(paths), [o.image, *model_files])  # still true after the work
    try:
        paths = outputs.write_outputs(o.out, x, out, meta,
                                      outputs.parameters_text(rec, model),
                                      extras=o.save_masks, masks_only=masks_only)
    except OSError as e:
        raise OSError(write_error(o.out, e)) from None
    written = [str(p) for p in outputs.files(paths)]
    note = f"; the VAE decode overflowed in {ed.info['vae_dtype']} and was redone in float32" if out.vae_fallbacks else ""
    log.event("done", f"wrote {', '.join(written)} (engine {out.seconds:.1f} s{note})", outputs=written,
              seconds=round(out.seconds, 3), mask_coverage=meta["mask_coverage"], vae_fp32_fallbacks=out.vae_fallbacks)
    if not c.quiet and not c.json:
        print(o.out)
    return 0


def write_error(out: Path, e: OSError) -> str:
    from .engine.files import atomic

    what = "disk full" if atomic.is_disk_full(e) else (e.strerror or str(e))
    return f"writing {out}: {what}; nothing written (an older complete output there is kept)"


@dataclass
class BatchPlan:
    jobs: list                      # every job of the manifest
    mine: list                      # this shard's
    shard: tuple                    # (K, N)
    pending: list                   # [(job, fingerprint, settings)] to run
    records: dict                   # job index -> report record (failed / skipped so far)
    model_path: Path
    inpaint_path: Path | None
    is_random: bool
    hashes: dict
    model_id: dict | None = None    # what identifies the model in a job's job_key


TEMP_MIN_AGE_S = 600  # leftover temp files older than this are a killed run's (a live writer's are seconds old)


def image_size(path, c: Common):
    """(H, W) from the image's header, or None when it cannot be read (loading it reports why)."""
    from PIL import Image

    from .engine.files import images

    try:
        f, _ = images.open_regular(path, c.max_bytes)
        with f, Image.open(f, formats=images._formats()) as im:
            return im.size[1], im.size[0]
    except Exception:
        return None


def plan_jobs(all_jobs: list, mine: list, out_dir: Path, base: EditSettings, save_masks: bool, model_id: dict,
              n_shards: int = 1, inputs=(), num_train_timesteps: int = 1000):
    """The local batch's and the Ray batch's planner, before any work: each job's settings checked, output
    names checked against each other, the run's own files and the inputs (manifest.check_outputs: every job of
    the manifest, so all shards agree), leftover temp files of killed runs removed, complete outputs of the
    same input content, settings and model skipped. Returns (pending [(job, fingerprint, settings)],
    records {index: failed/skipped record})."""
    from .engine.files import atomic
    from .engine.jobs import manifest

    settings = {}
    for job in all_jobs:
        if job.error is None:
            try:
                settings[job.index] = manifest.check_settings(base.updated(**job.settings), len(job.pairs),
                                                          num_train_timesteps=num_train_timesteps)
            except ValueError as e:
                job.error = str(e)
    manifest.check_outputs(all_jobs, out_dir, n_shards, inputs)
    for folder in sorted({(out_dir / j.out).parent for j in mine if j.error is None} | {out_dir}):
        atomic.clean_temps(folder, min_age_s=TEMP_MIN_AGE_S)
    records, pending = {}, []
    for job in mine:
        status, item = _job_status(job, settings.get(job.index), out_dir, save_masks, model_id)
        if status == "pending":
            pending.append(item)
        else:
            records[job.index] = item
    return pending, records


def _job_status(job, s, out_dir: Path, save_masks: bool, model_id: dict):
    if job.error:
        return "failed", {**job.record(), "status": "failed", "error": job.error}
    from .engine.jobs import manifest

    if manifest.is_complete_job(out_dir / job.out, job, s, save_masks, model_id):
        return "skipped", {**job.record(), "status": "skipped", "reason": "complete output exists"}
    fp = manifest.fingerprint(job.record(), {**s.to_dict(), "save_masks": save_masks}, model_id["sha256"])
    return "pending", (job, fp, s)


def batch_models(o: BatchOptions, log: Log):
    """(model path, inpainting model path or None, random?, hashes, model id for the job keys); the steps are
    checked against the model's schedule here, before any work."""
    from .weights.hashing import model_hash

    path, is_random = resolve_model(o.common.model, log)
    ipath = resolve_model(o.inpaint_model, log, "--inpaint-model")[0] if o.inpaint_model else None
    check_steps(o.settings, path)
    hashes = model_hash(path, on_miss=lambda p: hashing_note(p, log))
    model_id = {"sha256": hashes["sha256"], **({"inpaint_sha256": model_hash(ipath)["sha256"]} if ipath else {})}
    return path, ipath, is_random, hashes, model_id


def job_status(o: BatchOptions, job, model_id: dict, num_train_timesteps: int = 1000):
    """("failed" | "skipped", report record) or ("pending", (job, fingerprint, settings)): a bad job, a
    complete output of the same input content, settings and model (resume), or work. The one completeness
    rule of every batch runner (local, shard, Ray); plan_jobs applies it after the checks across jobs."""
    from .engine.jobs import manifest

    s = None
    if job.error is None:
        try:
            s = manifest.check_settings(o.settings.updated(**job.settings), len(job.pairs),
                                    num_train_timesteps=num_train_timesteps)
        except ValueError as e:
            job.error = str(e)
    return _job_status(job, s, o.out_dir, o.save_masks, model_id)


def plan_batch(o: BatchOptions, log: Log) -> BatchPlan:
    """Read the manifest, take this shard, check every job and value (plan_jobs), the free disk space; no
    model yet."""
    from .engine.jobs import manifest, outputs

    try:
        all_jobs = manifest.read_manifest(o.manifest, o.seed)
    except manifest.ManifestError as e:
        raise UsageError(str(e)) from None
    try:
        k, n = o.shard or manifest.shard_from_env()
    except ValueError as e:
        raise UsageError(f"RANK/WORLD_SIZE: {e}") from None
    mine = manifest.select_shard(all_jobs, k, n)
    check_writable(o.out_dir, "--out-dir")
    path, ipath, is_random, hashes, model_id = batch_models(o, log)
    c = o.common
    model_files = [Path(m) for m in (c.model, o.inpaint_model) if m and Path(m).is_file()]
    pending, records = plan_jobs(all_jobs, mine, o.out_dir, o.settings, o.save_masks, model_id, n,
                                 [o.manifest, *model_files], schedule_length(path))
    needs = []
    for job, _, s in pending:
        size = image_size(job.image, c)
        if size is not None:
            needs.append(outputs.need_bytes(outputs.output_paths(o.out_dir / job.out, len(job.pairs), o.save_masks),
                                            size))
    try:  # staging needs one whole set beside the old one: refuse when not even the largest fits
        validate.free_space(o.out_dir, max(needs, default=0), "--out-dir")
    except validate.ValidationError as e:
        raise UsageError(str(e)) from None
    try:
        validate.free_space(o.out_dir, sum(needs), "--out-dir")
    except validate.ValidationError as e:
        log.event("warning", f"warning: {e} (upper bound; the jobs that do not fit fail with 'disk full')")
    log.event("plan", f"manifest {o.manifest}: {len(all_jobs)} jobs; shard {k}/{n}: {len(mine)}, "
              f"{sum(r['status'] == 'skipped' for r in records.values())} already complete, "
              f"{sum(r['status'] == 'failed' for r in records.values())} refused, {len(pending)} to run",
              jobs=len(all_jobs), shard=[k, n], in_shard=len(mine), pending=len(pending))
    return BatchPlan(all_jobs, mine, (k, n), pending, records, path, ipath, is_random, hashes, model_id)


WINDOW = 64  # jobs whose images are loaded at once; the engine batches within it


def load_job_images(o: BatchOptions, items, model_id: dict, finish) -> list:
    """items [(job, fingerprint, settings)] -> [(job, (fingerprint, job key), settings, image (3, H, W), load
    seconds)]: each image read within the run's limits and its content keyed for resume; an unreadable or
    invalid image is finish(job, "failed", error=...) and left out."""
    from .engine.files import images
    from .engine.jobs import manifest

    c, loaded = o.common, []
    for job, fp, s in items:
        t0 = time.perf_counter()
        try:
            x = images.to_tensor(images.load_image(job.image, c.max_pixels, c.max_bytes))
            key = manifest.job_key(job, s, o.save_masks, model_id, c.max_bytes)
        except (images.ImageError, OSError) as e:
            finish(job, "failed", error=str(e))
            continue
        loaded.append((job, (fp, key), s, x, time.perf_counter() - t0))
    return loaded


def run_jobs(ed, model: dict, o: BatchOptions, loaded: list, finish, on_disk_full=None) -> None:
    """Run loaded jobs (load_job_images' items) through the Editor, which batches same-size jobs with the same
    edits and settings (each job with its own seed's generator), and write each job's output set as its engine
    call completes; finish(job, "done" | "failed", **fields) once per job. model: models_record's.
    on_disk_full(): called when a write fails for lack of space (the caller stops starting jobs)."""
    from .engine.files import atomic
    from .engine.jobs import outputs
    from .engine.runtime import pipeline

    engine_jobs = [pipeline.Job(x, job.pairs, {"seed": job.seed, **job.settings}) for job, _, _, x, _ in loaded]
    for i, r in ed.run_batch(engine_jobs, o.settings):
        job, (fp, key), s, x, t_img = loaded[i]
        if isinstance(r, Exception):
            finish(job, "failed", error=f"engine: {type(r).__name__}: {r}")
            continue
        size = tuple(x.shape[-2:])
        out = outputs.outcome(r, size)
        rec = outputs.Record("batch", job.image, job.pairs, job.seed, s, size)
        meta = outputs.sidecar(rec, model, out, {"load_image_s": t_img, "engine_s": out.seconds}, engine_record(ed),
                               fp=fp, job_key=key)
        try:
            outputs.write_outputs(o.out_dir / job.out, x, out, meta,
                                  outputs.parameters_text(rec, model), extras=o.save_masks)
        except (OSError, ValueError) as e:
            if atomic.is_disk_full(e) and on_disk_full:
                on_disk_full()
            finish(job, "failed", error=write_error(o.out_dir / job.out, e) if isinstance(e, OSError)
                   else f"writing {job.out}: {e}")
            continue
        finish(job, "done", seconds=round(out.seconds, 3))


def run_batch(o: BatchOptions, plan: BatchPlan, log: Log):
    """Run the pending jobs through one Editor (loaded on first need), writing each job's outputs as its engine
    call completes. Returns (model record or None, interrupted)."""
    from tqdm import tqdm

    c = o.common
    state = {"ed": None, "model": None, "disk_full": None}
    bar = tqdm(total=len(plan.pending), unit="job", desc="batch", disable=c.quiet or c.json or not plan.pending,
               dynamic_ncols=True, mininterval=1.0)

    def finish(job, status, **kw):
        plan.records[job.index] = {**job.record(), "status": status, **kw}
        log.event("job", "" if status == "done" else f"job {job.index} ({job.image}): {status}: {kw.get('error', '')}",
                  index=job.index, status=status, out=job.out, **kw)
        bar.update(1)

    def window(items):
        if state["disk_full"]:
            for job, _, _ in items:
                finish(job, "failed", error=f"not run: the disk is full ({state['disk_full']})")
            return
        loaded = load_job_images(o, items, plan.model_id or {"sha256": plan.hashes["sha256"]}, finish)
        if not loaded:
            return
        if state["ed"] is None:  # loaded on first use: a re-run with nothing left to compute never loads it
            state["ed"], _ = load_editor(plan.model_path, plan.inpaint_path, o.settings, c, log, o.batch_size)
            state["model"] = models_record(state["ed"], plan.model_path, plan.inpaint_path, plan.is_random,
                                           plan.hashes)
        run_jobs(state["ed"], state["model"], o, loaded, finish,
                 on_disk_full=lambda: state.update(disk_full=o.out_dir))

    interrupted = False
    try:
        for w in range(0, len(plan.pending), WINDOW):
            window(plan.pending[w:w + WINDOW])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return state["model"], interrupted


def report_batch(o: BatchOptions, plan: BatchPlan, model, interrupted: bool, started: str, log: Log) -> int:
    """Write report.json (report.K-of-N.json for a shard); the exit status."""
    from .engine.files import atomic
    from .engine.jobs import outputs

    k, n = plan.shard
    records, mine = plan.records, plan.mine
    report_path = o.out_dir / ("report.json" if n == 1 else f"report.{k}-of-{n}.json")
    failed = sorted(i for i, r in records.items() if r["status"] == "failed")
    counts = {s: sum(r["status"] == s for r in records.values()) for s in ("done", "skipped", "failed")}
    report = {"manifest": str(o.manifest), "out_dir": str(o.out_dir), "shard": [k, n],
              "jobs_in_manifest": len(plan.jobs), "jobs_in_shard": len(mine), **counts,
              "not_run": len(mine) - len(records), "interrupted": interrupted,
              "model": model or {"source": str(plan.model_path), "sha256": plan.hashes["sha256"],
                                 "random_weights": plan.is_random},
              "settings": {**o.settings.to_dict(), "save_masks": o.save_masks}, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "jobs": [records[i] for i in sorted(records)]}
    o.out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(report_path, outputs.finite(report), strict=True)  # a bad line's NaN is reported as null
    log.event("report", f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
              + (f" (jobs {failed[:20]})" if failed else "") + f"; report: {report_path}", report=str(report_path), **counts)
    if interrupted:
        log.error(f"interrupted; {len(mine) - len(records)} jobs not run (re-run to resume)")
        return 130
    return 1 if failed else 0


def cmd_batch(o: BatchOptions, log: Log) -> int:
    plan = plan_batch(o, log)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    model, interrupted = run_batch(o, plan, log)
    return report_batch(o, plan, model, interrupted, started, log)


def cmd_info(o: InfoOptions, log: Log) -> int:
    from .engine.jobs.outputs import model_info
    from .weights.hashing import model_hash

    path, is_random = resolve_model(o.common.model, log)
    m, _ = load(path, o.common, log)
    counts = {name: sum(p.numel() for p in getattr(m, name).parameters()) for name in ("unet", "text_encoder", "vae")}
    ucfg = getattr(m.unet, "config", None)
    info = {**model_info(path, m, is_random, model_hash(path, on_miss=lambda p: hashing_note(p, log))),
            "unet": {"in_channels": getattr(ucfg, "in_channels", None), "block_out_channels": getattr(ucfg, "block_out_channels", None),
                     "cross_attention_dim": getattr(ucfg, "cross_attention_dim", None)},
            "vae_scaling_factor": m.vae_scaling_factor,
            "parameters": {**counts, "total": sum(counts.values())}}
    if o.common.json:
        print(json.dumps({"event": "info", **info}, default=str))
    else:
        fmt = lambda v: f"{v / 1e6:.2f}M"  # noqa: E731
        print(f"model:            {info['source']}{'  (random weights: proves the pipeline, not the picture)' if is_random else ''}\n"
              f"architecture:     {info['kind']} (UNet in_channels {info['unet']['in_channels']}, "
              f"cross-attention {info['unet']['cross_attention_dim']}, blocks {info['unet']['block_out_channels']})\n"
              f"prediction type:  {info['prediction_type']}\n"
              f"dtype / device:   {info['dtype']} / {info['device']}\n"
              f"parameters:       unet {fmt(counts['unet'])}, text_encoder {fmt(counts['text_encoder'])}, "
              f"vae {fmt(counts['vae'])}, total {fmt(info['parameters']['total'])}\n"
              f"hash ({info['hash_scheme']}): {info['sha256']} (short {info['short_hash']})")
    return 0


def cmd_bench(args: list[str], log: Log) -> int:
    import subprocess

    script = ROOT / "benchmarks" / "compare.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: `diffedit bench` runs from a source checkout")
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
    import warnings

    from .engine.files.images import ImageError

    state = {"log": log}

    def show(message, category, filename, lineno, file=None, line=None):  # one line, never a traceback-like pair
        state["log"].warning(message, category.__name__)

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
                    from .engine.jobs import ray_batch

                    return ray_batch.run(o, o.ray, log)
                return cmd_batch(o, log)
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
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
