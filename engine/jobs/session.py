"""One run's model and engine, shared by `diffedit edit`, the local batch and the Ray workers: the checkpoint
resolved (with the errors a user can make caught before any work), device and dtypes picked, the model
loaded once into an Editor, what was loaded recorded for the sidecars, and the checks on outputs that every
runner makes (no input overwritten, no foreign file replaced, the schedule long enough, the folder writable).
"""
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .. import shapes
from ..edit.settings import EditSettings
from ..files import atomic, images
from ..files.images import MAX_BYTES, MAX_PIXELS
from ..runtime import Editor, EditorOptions, family, presets
from ...weights import CheckpointError, files, load_model, random_model
from ...weights.model import is_sdxl as model_is_sdxl
from ...weights.hashing import model_hash
from . import outputs
from .console import Log, UsageError

SHAPES_MODEL = Path(__file__).resolve().parents[2] / "weights" / "data" / "shapes"  # the shipped default model
SHAPES_NOTE = ("no --model given: using the bundled shapes-world model (trained here on synthetic scenes of circles, "
               "squares and triangles; see the README); give --model for a Stable Diffusion checkpoint")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Common:
    """What every command shares: the model, where and how it runs, the input limits, the console."""
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
    threads: int | None = None      # torch's CPU threads (None: torch's default, one per core)
    text_encoders: str | None = None  # SD 3.x / FLUX single files: the folder of the encoders the file lacks
    preset: str = "exact"             # runtime.presets: its precision picks the dtype when --dtype is auto


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
    """(local checkpoint path, random?) with the input errors a user can make caught before any work. No
    spec: the shipped shapes model (weights/random_model.py's random-weight folder is for tests only)."""
    if spec is None:
        if not (SHAPES_MODEL / "model_index.json").is_file():
            raise UsageError(f"the bundled shapes model is missing ({SHAPES_MODEL}: a broken install?); "
                             f"give --model PATH")
        log.event("default_model", f"note: {SHAPES_NOTE}", note=SHAPES_NOTE)
        return SHAPES_MODEL, False
    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "model_index.json").is_file():
        raise UsageError(f"{flag} {not_a_model_folder(p)}")
    if p.exists():
        try:
            files.check_local(p)
        except CheckpointError as e:
            raise UsageError(f"{flag} {e}") from None
        return p, False
    if files.HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        try:
            return files.resolve(spec), False
        except FileNotFoundError as e:
            raise UsageError(f"{flag} {e}") from None
    raise UsageError(f"{flag} {spec}: no such file or folder")


PICKLE_MAGIC = (b"PK", b"\x80")  # torch.save's zip archive, a raw pickle's protocol byte


def not_a_model_folder(folder: Path) -> str:
    """Why a folder without model_index.json is not a model, from a look at its top two levels only (`--model .`
    in a checkout must not walk the venv): a pickle checkpoint named only when the file really is one (a
    site-packages `.pth` path file is text, not a checkpoint)."""
    found = [q for q in (*folder.glob("*"), *folder.glob("*/*")) if q.suffix.lower() in files.PICKLE_SUFFIXES]
    pickles = []
    for q in found:
        try:
            with open(q, "rb") as f:
                if f.read(2).startswith(PICKLE_MAGIC):
                    pickles.append(q.name)
        except OSError:
            continue
    if pickles and not any(folder.glob("*.safetensors")) and not any(folder.glob("*/*.safetensors")):
        return (f"{folder}: only pickle checkpoints inside ({sorted(pickles)[0]}); refusing to unpickle (arbitrary "
                f"code) — use a .safetensors release")
    return (f"{folder}: not a checkpoint folder (no model_index.json); pass a diffusers folder (the one holding "
            f"model_index.json) or a single .safetensors file")


def shapes_example() -> Path:
    """The shapes world's example scene (engine.shapes.EXAMPLE), the image `diffedit edit` edits when neither
    --model nor --image is given: rendered once into the cache as a PNG (nothing generated ships in the
    package), atomically, so concurrent first runs agree."""
    path = random_model.cache_root() / "shapes-example-v2.png"  # bump the name when EXAMPLE changes
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, images.png_bytes(Image.fromarray(shapes.EXAMPLE.render())))
    return path


def hashing_note(path, log: Log) -> None:
    log.event("hashing", f"hashing {path} for the output metadata (first use only; cached by size and mtime) ...")


def pick_device(spec: str):
    """The device, made current for CUDA (so Triton launches and allocations go to it, not GPU 0)."""
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
    if spec == "auto":
        return default or (torch.float16 if device.type == "cuda" else torch.float32)
    return getattr(torch, DTYPES[spec])


def family_defaults(values: dict, fam: str | None) -> dict:
    """The settings' values (field -> value, None where the user set nothing) over the family's own defaults
    (runtime.family.EDIT_DEFAULTS: SD 3.x 28 steps / guidance 7.0, FLUX.1-dev 28 / 3.5, schnell 4 steps from
    strength 0.75 / unused) and the sampler family: DDIM for SD, None (the checkpoint's own flow-matching Euler)
    for a flow model. What neither sets is EditSettings' default."""
    own = {**family.EDIT_DEFAULTS.get(fam, {}), "scheduler": None if family.is_flow(fam) else "ddim"}
    return {**own, **{k: v for k, v in values.items() if v is not None}}


FAMILY_NAMES = {"sd3": "an SD 3.x model", "flux-dev": "a FLUX.1-dev model", "flux-schnell": "a FLUX.1-schnell model"}


def check_family(fam: str | None, s: EditSettings, c: Common, given: set, inpaint_model=None) -> None:
    """UsageError, before any file is read past the model's header, for what the checkpoint's family cannot take
    (fam: runtime.family.family of --model; None: not known before loading, the engine refuses it then). given:
    the settings fields the user set (a family default is never refused)."""
    what = f"--model {c.model} is {FAMILY_NAMES.get(fam, 'a Stable Diffusion 1.x/2.x/XL model')}"
    if c.text_encoders is not None and (not family.is_flow(fam) or Path(c.model).is_dir()):
        raise UsageError(f"--text-encoders applies to SD 3.x / FLUX.1 single files without their text encoders: "
                         f"{what}" + (" folder (it brings its own)" if c.model and Path(c.model).is_dir() else ""))
    if not family.is_flow(fam):
        if s.editor == "flowedit":
            raise UsageError(f"--editor flowedit runs on rectified-flow models (SD 3.x, FLUX.1): {what}; use fused "
                             f"or inpaint")
        return
    flow_ = "rectified-flow models (SD 3.x, FLUX.1)"
    if c.prediction_type is not None:
        raise UsageError(f"--prediction-type {c.prediction_type}: {what}, which predicts the flow velocity; "
                         f"nothing to choose (leave it out)")
    if s.compat is not None:
        raise UsageError(f"--compat {s.compat}: {what}; it reproduces diffusers' SD DiffEdit pipeline, which "
                         f"{flow_} have none of (leave it out)")
    if s.scheduler not in (None, "ddim") and "scheduler" in given:
        raise UsageError(f"--scheduler {s.scheduler}: {what}, which samples with its flow-matching Euler solver "
                         f"(leave --scheduler out)")
    if s.editor == "inpaint" or inpaint_model:
        raise UsageError(f"--editor inpaint: {what}; {flow_} have no inpainting model here (use fused or "
                         f"flowedit)")
    for field_, flag, lever in (("crop_margin", "--crop-margin", "a crop of the UNet's convolutions"),
                                ("cache_interval", "--cache-interval", "DeepCache of the UNet's deep blocks")):
        if getattr(s, field_) != getattr(EditSettings, field_):
            raise UsageError(f"{flag} {getattr(s, field_)}: {what}; the lever is {lever}, which a transformer "
                             f"with global attention and no U-shaped skip has no counterpart of (leave it out)")
    if fam.startswith("flux") and s.negative_prompt:
        raise UsageError(f"--negative-prompt: {what}, which is distilled (one sample per prompt, no unconditional "
                         f"sample): a negative prompt has nothing to act on")
    if fam == "flux-schnell" and "guidance_scale" in given:
        raise UsageError(f"--guidance: {what}, which has no guidance (timestep-distilled: no guidance embedding, "
                         f"no CFG); leave --guidance out")


def load(path: Path, c: Common, log: Log, flag: str = "--model"):
    """The model, once: (model, seconds)."""
    device = pick_device(c.device)
    dtype = pick_dtype(c.dtype, device, presets.dtype(c.preset, family.family(path), device, path))
    # --vae-dtype auto is the model's own rule, decided by load_model as for a Python caller: as dtype, except
    # an SD-XL VAE under float16 stays float32 unless its config says it is fp16-safe (force_upcast false)
    vae_dtype = None if c.vae_dtype == "auto" else pick_dtype(c.vae_dtype, device)
    t0 = time.perf_counter()
    log.event("load_model", f"loading {path} on {device} as {str(dtype).replace('torch.', '')}"
              + (f" (VAE {str(vae_dtype).replace('torch.', '')})" if vae_dtype not in (None, dtype) else "")
              + " ...", model=str(path))
    try:
        extra = {} if c.text_encoders is None else {"text_encoders": c.text_encoders}
        m = load_model(str(path), device=device, dtype=dtype, prediction_type=c.prediction_type, vae_dtype=vae_dtype,
                       **extra)
    except (CheckpointError, FileNotFoundError, AssertionError, KeyError) as e:
        msg = str(e).replace("pass text_encoders=", "pass --text-encoders ")  # the loader's argument is our flag
        raise UsageError(f"{flag} {msg}" if msg.startswith(str(path)) else f"{flag} {path}: {msg}") from None
    dt = time.perf_counter() - t0
    vae = str(m.vae_dtype or m.dtype).replace("torch.", "")
    pred = getattr(m, "prediction_type", "flow")  # a FlowModel predicts the flow velocity
    log.event("model_loaded", f"loaded {m.kind} ({pred}) in {dt:.1f} s"
              + (f", VAE in {vae}" if m.vae_dtype not in (None, m.dtype) else ""), kind=m.kind,
              prediction_type=pred, vae_dtype=vae, seconds=round(dt, 3))
    return m, dt


def load_editor(path: Path, inpaint_path: Path | None, settings: EditSettings, c: Common, log: Log,
                max_images: int | None = None):
    """(Editor, model info, seconds): the engine, with an inpainting model for --editor inpaint."""
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
    ed = Editor(m, EditorOptions(compile=c.compile, max_images=max_images, threads=c.threads), inpaint_model=im,
                preset=c.preset)
    log.event("engine", "engine: " + ", ".join(f"{k} {ed.info[k]}" for k in ("dtype", "vae_dtype", "compiled",
                                                                              "cuda_graphs", "threads")), **ed.info)
    return ed, dt + time.perf_counter() - t0


def engine_record(ed) -> dict:
    """What the engine applied, for the sidecar. unet_max_batch (a flow model: transformer_max_batch): denoiser
    samples per call by latent size ("hxw"), as the runner chose them from free memory (a fixed int when set): a
    run that chose batch 1 on a CPU with a full page cache was 0.91x diffusers, and nothing in its outputs said
    why."""
    mb = ed.max_batch
    name = "transformer_max_batch" if ed.info.get("denoiser") == "transformer" else "unet_max_batch"
    return {**{k: ed.info.get(k) for k in ("device", "dtype", "vae_dtype", "compiled", "cuda_graphs", "channels_last",
                                           "fused_attention_modules", "heap_buffers", "threads")},
            name: mb if not isinstance(mb, dict) else {f"{h}x{w}": n for (h, w), n in mb.items()}}


def models_record(ed, path, ipath, is_random, hashes) -> dict:
    model = outputs.model_info(path, ed.base, is_random, hashes)
    if ipath is not None:
        model["inpaint_model"] = outputs.model_info(ipath, ed.inpaint_model, False, model_hash(ipath))
    return model


class unet_progress:
    """A tqdm bar (with ETA) advanced by a forward hook on the engine's denoiser runner (the UNet, a flow model's
    transformer): the engine needs no callback argument, and the count is exact whatever the runner splits.
    total: expected denoiser calls."""
    def __init__(self, ed, total: int, disable: bool = False, desc: str = "unet"):
        self.ed, self.total, self.disable, self.desc = ed, total, disable, desc

    def __enter__(self):
        self.bar = tqdm(total=self.total, unit="step", desc=self.desc, disable=self.disable, dynamic_ncols=True,
                        leave=False)
        self.hook = self.ed.runner.register_forward_hook(lambda *_: self.bar.update(1) and None)
        return self.bar

    def __exit__(self, *exc):
        self.hook.remove()
        self.bar.close()


def expected_unet_calls(s: EditSettings, masks_only: bool = False, flow: bool = False) -> int:
    """One batched mask-pass call, then S inversion and as many decoding steps (FlowEdit: no inversion, one call
    per step). S: int(steps·strength) on SD; steps − int(steps − steps·strength) on a flow model (SD3's img2img
    rule, samplers.flow.strength_skip)."""
    S = s.steps - int(max(s.steps - s.steps * s.strength, 0)) if flow else int(s.steps * s.strength)
    return 1 if masks_only else 1 + (S if s.editor == "flowedit" else 2 * S)


def refuse_overwrites(outputs_, inputs, flag: str = "--out") -> None:
    """UsageError when an output path resolves to an input (same file, hard link, symlink), or names an
    existing file the engine did not write (a user's file is never overwritten)."""
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


def check_compat(s: EditSettings, path: Path, flag: str = "--compat") -> None:
    """--compat diffusers on an SD-XL model is refused from the checkpoint's names or header, before loading it:
    diffusers has no SD-XL DiffEdit pipeline to reproduce."""
    if s.compat == "diffusers" and model_is_sdxl(path):
        raise UsageError(f"{flag} diffusers: {path} is an SD-XL model, and diffusers has no SD-XL DiffEdit "
                         f"pipeline to reproduce; leave --compat out (the engine's own DiffEdit runs SD-XL)")


def write_error(out: Path, e: OSError) -> str:
    what = "disk full" if atomic.is_disk_full(e) else (e.strerror or str(e))
    return f"writing {out}: {what}; nothing written (an older complete output there is kept)"




def model_summary(path, m, is_random: bool, hashes: dict) -> tuple[dict, str]:
    """`diffedit info`: (the record, its text) of a loaded model: family, architecture, dtype and parameter counts;
    a flow model's transformer size and whether its T5 encoder is there (SD 3.x runs without one, zeros in its
    place; FLUX.1 needs it)."""
    fmt = lambda v: f"{v / 1e6:.2f}M"  # noqa: E731
    size = lambda mod: sum(p.numel() for p in mod.parameters()) if mod is not None else 0  # noqa: E731
    base = outputs.model_info(path, m, is_random, hashes)
    head = f"model:            {base['source']}" + ("  (random weights: proves the pipeline, not the picture)"
                                                    if is_random else "")
    tail = (f"dtype / device:   {base['dtype']} / {base['device']}\n"
            f"hash ({base['hash_scheme']}): {base['sha256']} (short {base['short_hash']})")
    if getattr(m, "transformer", None) is None:
        counts = {name: size(getattr(m, name)) for name in ("unet", "text_encoder", "vae")}
        ucfg = getattr(m.unet, "config", None)
        unet = {k: getattr(ucfg, k, None) for k in ("in_channels", "block_out_channels", "cross_attention_dim")}
        info = {**base, "unet": unet, "vae_scaling_factor": m.vae_scaling_factor,
                "parameters": {**counts, "total": sum(counts.values())}}
        return info, (f"{head}\narchitecture:     {info['kind']} (UNet in_channels {unet['in_channels']}, "
                      f"cross-attention {unet['cross_attention_dim']}, blocks {unet['block_out_channels']})\n"
                      f"prediction type:  {info['prediction_type']}\n{tail.splitlines()[0]}\n"
                      f"parameters:       unet {fmt(counts['unet'])}, text_encoder {fmt(counts['text_encoder'])}, "
                      f"vae {fmt(counts['vae'])}, total {fmt(info['parameters']['total'])}\n{tail.splitlines()[1]}")
    t5_name = "text_encoder_2" if m.kind == "flux" else "text_encoder_3"
    names = ("transformer", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if m.kind == "sd3" else ()) + ("vae",)
    counts = {name: size(getattr(m, name)) for name in names}
    cfg = m.transformer.config
    variant = ("dev" if m.guidance_embeds else "schnell") if m.kind == "flux" else None
    tr = {"layers": getattr(cfg, "num_layers", None), "single_layers": getattr(cfg, "num_single_layers", None),
          "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
          "parameters": counts["transformer"]}
    info = {**base, "prediction_type": "flow", "variant": variant, "transformer": tr,
            "t5": getattr(m, t5_name) is not None, "max_sequence_length": m.max_sequence_length,
            "vae_scaling_factor": m.vae_scaling_factor, "vae_shift_factor": m.vae_shift_factor,
            "parameters": {**counts, "total": sum(counts.values())}}
    layers = f"{tr['layers']} blocks" + (f" + {tr['single_layers']} single" if tr["single_layers"] else "")
    return info, (f"{head}\narchitecture:     {m.kind}{' ' + variant if variant else ''} (transformer {layers}, "
                  f"{tr['heads']} heads x {tr['head_dim']}, {fmt(tr['parameters'])} parameters)\n"
                  f"prediction type:  flow (velocity)\n"
                  f"T5 encoder:       {'present' if info['t5'] else 'absent (zeros in its place, as diffusers)'}"
                  f" (max_sequence_length {m.max_sequence_length})\n{tail.splitlines()[0]}\n"
                  f"parameters:       " + ", ".join(f"{k} {fmt(v)}" for k, v in counts.items())
                  + f", total {fmt(info['parameters']['total'])}\n{tail.splitlines()[1]}")
