"""diffedit — the command line: argparse → an options dataclass → engine calls (engine/runner.py).

  diffedit edit  [--model M] [--image IN] --edit "cat -> dog" [--edit ...] --out OUT.png [flags]
  diffedit mask  [--model M] [--image IN] --edit "cat -> dog" --out OUT.png        (masks + overlay only)
  diffedit batch [--model M] --manifest jobs.jsonl|jobs.csv --out-dir DIR [--shard K/N] [flags]
  diffedit info  [--model M]
  diffedit bench [args for benchmarks/compare.py]

No --model: the engine builds a small random-weight model (weights/random_model.py) — it proves the pipeline,
not the picture. No --image: the bundled CC0 sample photo (engine/data/chelsea.png).
Every bad input ends with one line `diffedit: error: ...` on stderr, a non-zero exit (2: bad input,
1: a job or the engine failed, 130: interrupted) and no output files. No model math in this file.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


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
    prediction_type: str | None = None
    max_pixels: int = 2048 * 2048
    quiet: bool = False
    json: bool = False


@dataclass(frozen=True)
class EditOptions:
    command: str                    # "edit" | "mask"
    image: Path
    pairs: tuple                    # ((source, target), ...)
    out: Path
    seed: int = 0
    settings: object = None         # engine.runner.EditSettings
    save_masks: bool = False
    inpaint_model: str | None = None
    common: Common = field(default_factory=Common)


@dataclass(frozen=True)
class BatchOptions:
    manifest: Path
    out_dir: Path
    shard: tuple | None = None      # (K, N); None: RANK/WORLD_SIZE from the environment, else (0, 1)
    batch_size: int = 4
    seed: int = 0
    settings: object = None
    save_masks: bool = False
    inpaint_model: str | None = None
    common: Common = field(default_factory=Common)


@dataclass(frozen=True)
class InfoOptions:
    common: Common = field(default_factory=Common)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffedit", description="Text-driven image editing (DiffEdit, N edits in one pass) with Stable Diffusion.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(sp):
        g = sp.add_argument_group("model and runtime")
        g.add_argument("--model", help="diffusers folder, single .safetensors file, or hub id in the local cache "
                                        "(default: a small random-weight model the engine builds: proves the pipeline, not the picture)")
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda:$LOCAL_RANK or cuda if available, else cpu)")
        g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (auto: float16 on CUDA, float32 on CPU)")
        g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the checkpoint's (single SD2 files do not record it)")
        g.add_argument("--max-pixels", type=int, default=2048 * 2048, help="refuse larger input images (default 4194304 = 2048²)")
        g.add_argument("--quiet", action="store_true", help="no progress or info output (errors still go to stderr)")
        g.add_argument("--json", action="store_true", help="machine-readable JSON log lines on stdout")

    def edit_flags(sp, single: bool):
        g = sp.add_argument_group("edit")
        g.add_argument("--seed", type=int, default=0, help="CPU torch.Generator seed (default 0; a manifest's seed wins)")
        g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
        g.add_argument("--strength", type=float, default=0.8, help="encoding strength in (0, 1] (default 0.8)")
        g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
        g.add_argument("--maps", type=int, default=10, help="noise draws per mask (default 10)")
        g.add_argument("--mask-strength", type=float, default=0.5, help="noise level of the mask pass in (0, 1] (default 0.5)")
        g.add_argument("--threshold", default="clamp:3", help="mask threshold rule: clamp:r | fixed:v | mean[:k] | median | otsu | quantile:q (default clamp:3)")
        g.add_argument("--overlap", default="argmax", help="overlapping masks: argmax | average | subtract | soft (default argmax)")
        g.add_argument("--editor", choices=["fused", "inpaint"], default="fused",
                       help="fused: one fused trajectory for all edits (default); inpaint: one inpainting pass per edit")
        g.add_argument("--inpaint-model", help="inpainting checkpoint (9-channel UNet) for --editor inpaint when --model is not one")
        g.add_argument("--compat", choices=["diffusers"], help="reproduce diffusers' StableDiffusionDiffEditPipeline")
        g.add_argument("--negative-prompt", default="")
        g.add_argument("--save-masks", action="store_true", help="also write OUT.mask<i>.png, OUT.overlay.png, OUT.grid.png")
        if single:
            g.add_argument("--image", help="input image (default: the bundled sample photo)")
            g.add_argument("--edit", action="append", required=True, metavar='"SOURCE -> TARGET"',
                           help="an edit; repeat for several (empty source = ∅)")
            g.add_argument("--out", required=True, help="output .png (a .json sidecar is written next to it)")

    for name, helptext in (("edit", "edit one image"), ("mask", "compute the edit masks and an overlay only")):
        sp = sub.add_parser(name, help=helptext)
        edit_flags(sp, True)
        common(sp)
    sp = sub.add_parser("batch", help="run a manifest of jobs (resumable, shardable)")
    sp.add_argument("--manifest", required=True, help="jobs.jsonl or jobs.csv")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--shard", help="K/N: this process does the jobs with index %% N == K (default: RANK/WORLD_SIZE, else all)")
    sp.add_argument("--batch-size", type=int, default=4, help="same-size images with the same edits per engine call (default 4)")
    edit_flags(sp, False)
    common(sp)
    common(sub.add_parser("info", help="architecture, prediction type, dtype and parameter counts of a model"))
    sub.add_parser("bench", help="run benchmarks/compare.py (arguments are passed through)", add_help=False)
    return p


def _settings(a):
    from engine.runner import EditSettings

    if a.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {a.steps}")
    if not 0 < a.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {a.strength}")
    if not 0 < a.mask_strength <= 1:
        raise UsageError(f"--mask-strength must be in (0, 1], got {a.mask_strength}")
    if a.maps <= 0:
        raise UsageError(f"--maps must be > 0, got {a.maps}")
    if a.guidance < 0:
        raise UsageError(f"--guidance must be >= 0, got {a.guidance}")
    from kernels import noise_diff

    try:
        noise_diff.parse_rule(a.threshold)
    except ValueError as e:
        raise UsageError(f"--threshold: {e}") from None
    if a.overlap not in noise_diff.OVERLAPS:
        raise UsageError(f"--overlap {a.overlap!r}: use one of {', '.join(noise_diff.OVERLAPS)}")
    if int(a.steps * a.strength) < 1:
        raise UsageError(f"--steps {a.steps} × --strength {a.strength} leaves no denoising step")
    return EditSettings(steps=a.steps, strength=a.strength, guidance=a.guidance, maps=a.maps, mask_strength=a.mask_strength,
                        threshold=a.threshold, overlap=a.overlap, editor=a.editor, compat=a.compat,
                        negative_prompt=a.negative_prompt)


def options_from_args(a):
    """argparse namespace -> options dataclass, with every check that needs no file or model."""
    from engine import jobs

    common = Common(model=a.model, device=a.device, dtype=a.dtype, prediction_type=a.prediction_type,
                    max_pixels=a.max_pixels, quiet=a.quiet, json=a.json)
    if a.dtype != "auto" and a.dtype not in DTYPES:
        raise UsageError(f"--dtype {a.dtype!r}: use auto, float32, float16 or bfloat16")
    if a.max_pixels <= 0:
        raise UsageError(f"--max-pixels must be > 0, got {a.max_pixels}")
    if a.command == "info":
        return InfoOptions(common)
    settings = _settings(a)
    if a.inpaint_model and a.editor != "inpaint":
        raise UsageError("--inpaint-model is used only with --editor inpaint")
    if a.editor == "inpaint" and a.compat:
        raise UsageError("--compat diffusers reproduces the fused single-pair pipeline, not --editor inpaint")
    if a.command == "batch":
        if a.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {a.batch_size}")
        try:
            shard = jobs.parse_shard(a.shard) if a.shard else None
        except ValueError as e:
            raise UsageError(str(e)) from None
        return BatchOptions(manifest=Path(a.manifest), out_dir=Path(a.out_dir), shard=shard, batch_size=a.batch_size,
                            seed=a.seed, settings=settings, save_masks=a.save_masks, inpaint_model=a.inpaint_model,
                            common=common)
    pairs = []
    for e in a.edit:
        try:
            pairs.append(jobs.parse_edit(e))
        except ValueError as err:
            raise UsageError(f"--edit: {err}") from None
    if len(pairs) > 1 and settings.compat:
        raise UsageError("--compat diffusers reproduces the single-pair pipeline: give one --edit")
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {a.out!r} must end in .png")
    return EditOptions(command=a.command, image=Path(a.image) if a.image else sample_image(), pairs=tuple(pairs),
                       out=out, seed=a.seed, settings=settings, save_masks=a.save_masks,
                       inpaint_model=a.inpaint_model, common=common)


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

    def error(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever the exception text held
        if self.json:
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"diffedit: error: {message}", file=sys.stderr, flush=True)


def sample_image() -> Path:
    import engine

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
    from weights import files

    if spec is None:
        from weights import random_model

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
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    return dev


def pick_dtype(spec: str, device):
    import torch

    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, DTYPES[spec])


def load(path: Path, c: Common, log: Log, flag: str = "--model"):
    """The model, once: (model, seconds)."""
    from weights import CheckpointError, load_model

    device = pick_device(c.device)
    dtype = pick_dtype(c.dtype, device)
    t0 = time.perf_counter()
    log.event("load_model", f"loading {path} on {device} as {str(dtype).replace('torch.', '')} ...", model=str(path))
    try:
        m = load_model(str(path), device=device, dtype=dtype, prediction_type=c.prediction_type)
    except (CheckpointError, FileNotFoundError, AssertionError, KeyError) as e:
        msg = str(e)
        raise UsageError(f"{flag} {msg}" if msg.startswith(str(path)) else f"{flag} {path}: {msg}") from None
    dt = time.perf_counter() - t0
    log.event("model_loaded", f"loaded {m.kind} ({m.prediction_type}) in {dt:.1f} s", kind=m.kind,
              prediction_type=m.prediction_type, seconds=round(dt, 3))
    return m, dt


def load_models(path: Path, inpaint_path: Path | None, settings, c: Common, log: Log):
    """(model, inpainting model or None, seconds), checking that --editor inpaint has an inpainting UNet."""
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
    return m, im, dt


def model_info(path: Path, m, is_random: bool, hashes: dict) -> dict:
    return {"source": str(path), "name": Path(path).stem if Path(path).is_file() else Path(path).name,
            "random_weights": is_random, "kind": getattr(m, "kind", None),
            "prediction_type": getattr(m, "prediction_type", None),
            "dtype": str(getattr(m, "dtype", "")).replace("torch.", ""), "device": str(getattr(m, "device", "")),
            "sha256": hashes["sha256"], "short_hash": hashes["short"], "hash_scheme": hashes["scheme"]}


def parameters_text(pairs, seed: int, s, size, model: dict) -> str:
    """A1111-style `parameters`: target prompt(s), negative prompt, then the settings line."""
    from engine.images import format_parameters

    return format_parameters(" | ".join(t for _, t in pairs), s.negative_prompt, {
        "Steps": s.steps, "Sampler": "DDIM", "CFG scale": s.guidance, "Seed": seed, "Size": f"{size[1]}x{size[0]}",
        "Model hash": model["short_hash"], "Model": model["name"], "Denoising strength": s.strength,
        "DiffEdit": " | ".join(f"{src or '∅'} -> {tgt}" for src, tgt in pairs), "Mask maps": s.maps,
        "Mask threshold": s.threshold, "Mask overlap": s.overlap, "Editor": s.editor, "Compat": s.compat,
        "Version": "diffedit-engine 0.1.0"})


def sidecar(command, image_path, pairs, seed, s, size, model, outcome, timings, fp=None, batch=None) -> dict:
    from engine.runner import mask_stats

    return {"status": "ok", "command": command, "fingerprint": fp, "image": str(image_path),
            "size": [size[1], size[0]], "edits": [{"source": a, "target": b} for a, b in pairs], "seed": seed,
            "settings": s.to_dict(), "thresholds": outcome.thresholds, "mask_coverage": mask_stats(outcome.masks),
            "model": model, "timings": {k: round(v, 4) for k, v in timings.items()}, "batch": batch,
            "note": "random-weight model: proves the pipeline, not the picture" if model["random_weights"] else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---- commands ----------------------------------------------------------------------------------------------

def cmd_edit(o: EditOptions, log: Log) -> int:
    from engine import images, runner
    from weights.hashing import model_hash

    c = o.common
    check_writable(o.out.parent, "output folder")
    t0 = time.perf_counter()
    pil = images.load_image(o.image, c.max_pixels)
    x = images.to_tensor(pil)
    t_img = time.perf_counter() - t0
    path, is_random = resolve_model(c.model, log)
    ipath = resolve_model(o.inpaint_model, log, "--inpaint-model")[0] if o.inpaint_model else None
    hashes = model_hash(path, on_miss=lambda p: hashing_note(p, log))
    m, im, t_load = load_models(path, ipath, o.settings, c, log)
    log.event("start", f"{o.command}: {o.image} ({x.shape[2]}x{x.shape[1]}) with "
              + "; ".join(f"{a or '∅'} -> {b}" for a, b in o.pairs), image=str(o.image))
    with runner.unet_progress(m, runner.expected_unet_calls(o.settings, o.command == "mask"),
                              disable=c.quiet or c.json, desc=o.command):
        outcome = (runner.run_masks(m, x[None], o.pairs, o.settings, o.seed) if o.command == "mask" else
                   runner.run_edit(m, x[None], o.pairs, o.settings, o.seed, inpaint_model=im))[0]
    size = tuple(x.shape[-2:])
    model = model_info(path, m, is_random, hashes)
    if ipath is not None:
        model["inpaint_model"] = model_info(ipath, im, False, model_hash(ipath))
    meta = sidecar(o.command, o.image, o.pairs, o.seed, o.settings, size, model, outcome,
                   {"load_image_s": t_img, "model_load_s": t_load, "engine_s": outcome.seconds})
    paths = runner.write_outputs(o.out, x, outcome, meta, parameters_text(o.pairs, o.seed, o.settings, size, model),
                                 extras=o.save_masks, masks_only=o.command == "mask")
    written = [str(p) for v in paths.values() for p in (v if isinstance(v, list) else [v])]
    log.event("done", f"wrote {', '.join(written)} (engine {outcome.seconds:.1f} s)", outputs=written,
              seconds=round(outcome.seconds, 3), mask_coverage=meta["mask_coverage"])
    if not c.quiet and not c.json:
        print(o.out)
    return 0


def cmd_batch(o: BatchOptions, log: Log) -> int:
    import torch
    from tqdm import tqdm

    from engine import images, jobs, runner
    from weights.hashing import model_hash

    c = o.common
    try:
        all_jobs = jobs.read_manifest(o.manifest, o.seed)
    except jobs.ManifestError as e:
        raise UsageError(str(e)) from None
    try:
        k, n = o.shard or jobs.shard_from_env()
    except ValueError as e:
        raise UsageError(f"RANK/WORLD_SIZE: {e}") from None
    mine = jobs.select_shard(all_jobs, k, n)
    check_writable(o.out_dir, "--out-dir")
    path, is_random = resolve_model(c.model, log)
    ipath = resolve_model(o.inpaint_model, log, "--inpaint-model")[0] if o.inpaint_model else None
    hashes = model_hash(path, on_miss=lambda p: hashing_note(p, log))
    ihash = model_hash(ipath)["sha256"] if ipath else None
    report_path = o.out_dir / ("report.json" if n == 1 else f"report.{k}-of-{n}.json")
    settings_d = {**o.settings.to_dict(), "save_masks": o.save_masks}
    records, pending = {}, []
    for job in mine:
        if job.error:
            records[job.index] = {**job.record(), "status": "failed", "error": job.error}
            continue
        fp = jobs.fingerprint(job.record(), settings_d, hashes["sha256"] + (f"+{ihash}" if ihash else ""))
        if jobs.is_complete(o.out_dir / job.out, fp):
            records[job.index] = {**job.record(), "status": "skipped", "reason": "complete output exists"}
        else:
            pending.append((job, fp))
    log.event("plan", f"manifest {o.manifest}: {len(all_jobs)} jobs; shard {k}/{n}: {len(mine)}, "
              f"{sum(r['status'] == 'skipped' for r in records.values())} already complete, {len(pending)} to run",
              jobs=len(all_jobs), shard=[k, n], in_shard=len(mine), pending=len(pending))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    interrupted = False
    model, m, im = None, None, None
    bar = tqdm(total=len(pending), unit="job", desc="batch", disable=c.quiet or c.json or not pending,
               dynamic_ncols=True, mininterval=1.0)

    def finish(job, status, **kw):
        records[job.index] = {**job.record(), "status": status, **kw}
        log.event("job", "" if status == "done" else f"job {job.index} ({job.image}): {status}: {kw.get('error', '')}",
                  index=job.index, status=status, out=job.out, **kw)
        bar.update(1)

    def flush(items):
        """One engine call for same-size images with the same edits (each with its own seed's generator, so
        batching does not change a job's output); a failed batch is retried image by image so that one bad
        job cannot fail the others."""
        nonlocal m, im, model
        if m is None:  # loaded on first use: a re-run with nothing left to compute never loads it
            m, im, _ = load_models(path, ipath, o.settings, c, log)
            model = model_info(path, m, is_random, hashes)
            if ipath is not None:
                model["inpaint_model"] = model_info(ipath, im, False, model_hash(ipath))
        job0 = items[0][0]
        try:
            outs = runner.run_edit(m, torch.stack([x for _, _, x, _ in items]), job0.pairs, o.settings,
                                   [job.seed for job, _, _, _ in items], inpaint_model=im)
        except Exception as e:
            if len(items) > 1:
                for it in items:
                    flush([it])
                return
            finish(job0, "failed", error=f"engine: {type(e).__name__}: {e}")
            return
        for (job, fp, x, t_img), out in zip(items, outs):
            size = tuple(x.shape[-2:])
            meta = sidecar("batch", job.image, job.pairs, job.seed, o.settings, size, model, out,
                           {"load_image_s": t_img, "engine_s": out.seconds}, fp=fp,
                           batch={"size": len(items)} if len(items) > 1 else None)
            try:
                runner.write_outputs(o.out_dir / job.out, x, out, meta,
                                     parameters_text(job.pairs, job.seed, o.settings, size, model), extras=o.save_masks)
            except OSError as e:
                finish(job, "failed", error=f"writing output: {e}")
                continue
            finish(job, "done", seconds=round(out.seconds, 3))

    try:
        if pending:
            buckets = {}
            for job, fp in pending:
                t0 = time.perf_counter()
                try:
                    x = images.to_tensor(images.load_image(job.image, c.max_pixels))
                except images.ImageError as e:
                    finish(job, "failed", error=str(e))
                    continue
                key = (tuple(x.shape), tuple(job.pairs))  # seeds may differ: each job has its own generator
                buckets.setdefault(key, []).append((job, fp, x, time.perf_counter() - t0))
                if len(buckets[key]) >= o.batch_size:
                    flush(buckets.pop(key))
            for key in list(buckets):
                flush(buckets.pop(key))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    failed = sorted(i for i, r in records.items() if r["status"] == "failed")
    counts = {s: sum(r["status"] == s for r in records.values()) for s in ("done", "skipped", "failed")}
    report = {"manifest": str(o.manifest), "out_dir": str(o.out_dir), "shard": [k, n], "jobs_in_manifest": len(all_jobs),
              "jobs_in_shard": len(mine), **counts, "not_run": len(mine) - len(records), "interrupted": interrupted,
              "model": model or {"source": str(path), "sha256": hashes["sha256"], "random_weights": is_random},
              "settings": settings_d, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "jobs": [records[i] for i in sorted(records)]}
    from engine import atomic

    o.out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(report_path, report)
    log.event("report", f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
              + (f" (jobs {failed[:20]})" if failed else "") + f"; report: {report_path}", report=str(report_path), **counts)
    if interrupted:
        log.error(f"interrupted; {len(mine) - len(records)} jobs not run (re-run to resume)")
        return 130
    return 1 if failed else 0


def cmd_info(o: InfoOptions, log: Log) -> int:
    from weights.hashing import model_hash

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
    from engine.images import ImageError

    try:
        a = build_parser().parse_args(argv)
        o = options_from_args(a)
        log = Log(o.common.quiet, o.common.json)
        if threading_main():
            signal.signal(signal.SIGTERM, _terminate)
        if isinstance(o, InfoOptions):
            return cmd_info(o, log)
        if isinstance(o, BatchOptions):
            return cmd_batch(o, log)
        return cmd_edit(o, log)
    except (UsageError, ImageError) as e:
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
