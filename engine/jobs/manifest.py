"""Batch jobs: edit strings, manifests (JSONL / CSV), sharding, and what makes an output "complete".

Manifest: one job per JSONL line {"image": path, "edits": ["cat -> dog", ...], "seed": 1, "out": "name.png"}
(only image and edits required; "threads": N, torch's CPU threads for that job; "preset": exact | fast | fastest,
whose settings the job's own fields override (runtime.presets); any engine.settings.EditSettings field, e.g. "steps": 30 or
"threshold": "otsu", or its command-line flag's name ("guidance" for guidance_scale, SETTING_FLAGS) overrides
the command line's setting for that job), a .json file holding one JSON array of such objects, or a CSV with
a header row and the same columns; in CSV the edits cell is
either a JSON list or edits separated by ";". Blank lines and lines starting with "#" are not jobs. A relative
image path is relative to the manifest's folder; `out` is a relative name inside the output folder (default
`<index:06d>-<image stem>.png`). A job's index is its 0-based position among the manifest's jobs; it names
the job in reports and decides its shard.

Sharding: shard K/N (0 ≤ K < N) takes the jobs with index % N == K — a deterministic partition, so N
processes (--shard, or RANK/WORLD_SIZE under torchrun) never do a job twice and together do every job.

Validation, line by line, before any work: a bad line (not JSON, not UTF-8, an unknown field, a seed outside
0..2**63-1, a non-finite or out-of-range setting, a NUL byte or a too-long name in `out`, ...) becomes a job
with .error set, reported as failed; it never stops the batch. check_outputs then fails the jobs whose output
files (PNG, sidecar, every mask, overlay and grid it could write) collide with another job's or with the
run's own report files, or resolve to an input of the manifest (same file, hard link or symlink).

Complete (is_complete_job): an output counts as done when its PNG and its JSON sidecar both exist, the
sidecar parses, records "status": "ok", and its "job_key" (engine.fingerprint.job_key: the input's size,
mtime and sha256, a digest of the job's settings, a digest of the model) still holds, so a re-run skips it;
a changed input, job or setting is redone. Output sets are replaced as a unit, the sidecar last
(engine.outputs.write_outputs), so a killed run never leaves an output that looks complete.
"""
import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..files import atomic, images
from . import outputs, validate
from . import fingerprint as fingerprints
from ..edit.settings import EditSettings
from ..runtime import presets

SETTING_KEYS = set(EditSettings.names())
JOB_KEYS = {"image", "edits", "seed", "out", "threads", "preset"} | SETTING_KEYS
MAX_THREADS = 4096  # --threads' bound too
# command-line flag -> EditSettings field: the one table of setting names. A manifest takes either name (the
# field, or the flag without its dashes, - or _): {"guidance": 5} is {"guidance_scale": 5}
SETTING_FLAGS = {"--steps": "steps", "--strength": "strength", "--guidance": "guidance_scale", "--maps": "num_maps",
                 "--mask-strength": "encode_strength", "--threshold": "threshold", "--overlap": "overlap",
                 "--editor": "editor", "--compat": "compat", "--negative-prompt": "negative_prompt",
                 "--scheduler": "scheduler", "--background": "background", "--crop-margin": "crop_margin",
                 "--cache-interval": "cache_interval"}
FLAG_KEYS = {name: f for flag, f in SETTING_FLAGS.items() for name in (flag[2:], flag[2:].replace("-", "_"))
             if name != f}


MANIFEST_MAX_BYTES = 1 << 30  # read whole: a manifest of 1 GiB is millions of jobs
REPORT_NAME = re.compile(r"^report(\.\d+-of-\d+)?\.json$", re.IGNORECASE)  # report.json, report.K-of-N.json


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing, unreadable, unknown format)."""


def check_settings(s: EditSettings, n_pairs: int | None = None, name=lambda field: field,
                   num_train_timesteps: int = 1000) -> EditSettings:
    """`s` checked by EditSettings.checked (every limit lives there), or a validate.ValidationError whose
    message names the value as name(field): a flag for the CLI, the field for a manifest."""
    try:
        return s.checked(n_pairs, num_train_timesteps)
    except ValueError as e:
        msg = str(e)
        field = next((f for f in sorted(EditSettings.names(), key=len, reverse=True) if msg.startswith(f)), None)
        if field is not None:
            msg = name(field) + msg[len(field):]
        raise validate.ValidationError(msg) from None


def parse_edit(s: str) -> tuple[str, str]:
    """'source -> target' -> (source, target). An empty source means ∅ (the paper's reference); the target
    must not be empty; one '->' only."""
    if not isinstance(s, str):
        raise ValueError(f"edit must be a string 'source -> target', got {s!r}")
    if "->" not in s:
        raise ValueError(f"edit {s!r} has no '->' (write it as 'source -> target', e.g. 'cat -> dog')")
    src, tgt = (x.strip() for x in s.split("->", 1))
    if "->" in tgt:  # 'a -> b -> c' would silently be the target "b -> c"
        raise ValueError(f"edit {s!r} has more than one '->' (one edit is 'source -> target'; give each edit "
                         f"on its own)")
    if not tgt:
        raise ValueError(f"edit {s!r} has an empty target prompt (an empty source is allowed and means ∅)")
    return src, tgt


@dataclass
class Job:
    index: int
    image: Path | None = None
    pairs: list = field(default_factory=list)  # [(source, target), ...]
    seed: int = 0
    out: str = ""
    settings: dict = field(default_factory=dict)  # EditSettings overrides of this job
    error: str | None = None  # set when the manifest entry itself is bad: the job is reported, not run
    # torch's CPU threads for this job's engine call (None: the run's, --threads or torch's default). How the
    # job runs, not what it computes: left out of job_key, so a re-run with another count skips it
    threads: int | None = None

    def record(self) -> dict:
        return {"index": self.index, "image": str(self.image) if self.image else None,
                "edits": [f"{s} -> {t}" for s, t in self.pairs], "seed": self.seed, "out": self.out,
                **({"settings": self.settings} if self.settings else {}),
                **({"threads": self.threads} if self.threads is not None else {})}


def _setting(name: str, v):
    """A manifest value for an EditSettings field; CSV cells are strings, converted by the field's type."""
    default = getattr(EditSettings(), name)
    if isinstance(v, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(v.strip())
        except ValueError:
            raise ValueError(f"{name} must be a {type(default).__name__}, got {v!r}") from None
    if name in ("compat", "crop_margin") and v in ("", "none", "None"):
        return None
    if name == "crop_margin" and isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            raise ValueError(f"crop_margin must be an integer (latent cells) or none, got {v!r}") from None
    return v


def _job_from_dict(index: int, d, base: Path, default_seed: int) -> Job:
    job = Job(index=index, seed=default_seed)
    try:
        if not isinstance(d, dict):
            raise ValueError("a job must be a JSON object with 'image' and 'edits'")
        d = field_names(d)
        unknown = set(d) - JOB_KEYS
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} (allowed: {sorted(JOB_KEYS)})")
        if not d.get("image"):
            raise ValueError("missing 'image'")
        if not isinstance(d["image"], str) or "\0" in d["image"]:
            raise ValueError(f"image {d['image']!r}: must be a path without NUL bytes")
        img = Path(d["image"]).expanduser()
        job.image = img if img.is_absolute() else base / img
        edits = d.get("edits")
        if isinstance(edits, str):
            edits = [edits]
        if not edits or not isinstance(edits, list):
            raise ValueError("missing 'edits' (a list of 'source -> target' strings)")
        job.pairs = [parse_edit(e) for e in edits]
        if d.get("seed") not in (None, ""):
            job.seed = validate.seed(d["seed"], "seed")
        if d.get("threads") not in (None, ""):
            job.threads = validate.integer("threads", d["threads"], 1, MAX_THREADS)
        # a job's preset (runtime.presets) sets its settings under the job's own fields; the precision part of a
        # preset is the run's (--preset, --dtype): one model serves every job
        own = presets.settings(d["preset"]) if d.get("preset") not in (None, "") else {}
        job.settings = {**own, **{k: _setting(k, d[k]) for k in sorted(SETTING_KEYS & set(d))}}
        check_settings(EditSettings().updated(**job.settings), len(job.pairs))  # bad values fail this job now
        out = d.get("out") or f"{index:06d}-{job.image.stem}.png"
        job.out = check_out_name(str(out))
    except ValueError as e:
        job.error = str(e)
    return job


def field_names(d: dict) -> dict:
    """A job's keys with the flag spellings (guidance, maps, mask_strength, mask-strength, negative-prompt)
    renamed to their EditSettings fields; both spellings of one setting are an error."""
    out = {}
    for k, v in d.items():
        name = FLAG_KEYS.get(k, k)
        if name in out:
            raise ValueError(f"{k!r} and {name!r} name the same setting: give one")
        out[name] = v
    return out


def check_out_name(out: str) -> str:
    """A job's output name must be a relative .png path that stays inside the output folder."""
    if "\0" in out:
        raise ValueError(f"out {out!r} contains a NUL byte")
    p = PurePosixPath(out.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"out {out!r} must be a relative name inside the output folder")
    if p.suffix.lower() != ".png":
        raise ValueError(f"out {out!r} must end in .png")
    return str(p)


def read_manifest(path, default_seed: int = 0) -> list[Job]:
    """All jobs of a .jsonl/.json-lines or .csv manifest; bad entries come back as jobs with .error set.
    Each line is decoded on its own: one line that is not UTF-8 (or holds a NUL byte) fails that job only."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found" if not path.exists() else f"{path}: manifest is not a file")
    try:
        f, _ = images.open_regular(path, MANIFEST_MAX_BYTES, "manifest")
        with f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # surrogateescape keeps every line; a line with undecodable bytes is found (and failed) below
    text = data.decode("utf-8", errors="surrogateescape")
    base = path.parent
    suffix = path.suffix.lower()
    jobs = []

    def bad_text(value) -> str | None:
        strings = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else []
        for v in strings:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return "not valid UTF-8"
        return None

    if suffix == ".csv":
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        reader, rows = csv.DictReader(lines), []
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise ManifestError(f"{path}: not a readable CSV file ({e})") from None
        while True:  # a row the csv module refuses (a cell over its field limit, ...) fails that job only
            try:
                rows.append(next(reader))
            except StopIteration:
                break
            except csv.Error as e:
                rows.append(e)
        if rows and not {"image", "edits"} <= set(header or ()):
            raise ManifestError(f"{path}: CSV needs a header row with at least 'image' and 'edits' columns")
        for i, row in enumerate(rows):
            if isinstance(row, csv.Error):
                jobs.append(Job(index=i, error=f"row is not readable CSV ({row})"))
                continue
            row = {k.strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items() if k is not None}
            if bad_text(row):
                jobs.append(Job(index=i, error="row is not valid UTF-8"))
                continue
            cell = row.get("edits", "")
            try:
                row["edits"] = json.loads(cell) if cell.startswith("[") else [e for e in cell.split(";") if e.strip()]
            except json.JSONDecodeError as e:
                jobs.append(Job(index=i, error=f"edits cell is not a valid JSON list ({e})"))
                continue
            jobs.append(_job_from_dict(i, {k: v for k, v in row.items() if v != "" or k in ("image", "edits")}, base, default_seed))
    elif suffix in (".jsonl", ".ndjson", ".json") and text.lstrip().startswith("["):
        # a JSON array of jobs (a .json file written by json.dump): one job per element, not one job
        try:
            items = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ManifestError(f"{path}: starts with '[' but is not a JSON array of jobs "
                                f"({getattr(e, 'msg', 'nested too deeply')}); write one job per line (JSONL), "
                                f"or one JSON array of job objects") from None
        if not isinstance(items, list):
            raise ManifestError(f"{path}: not a JSON array of jobs")
        jobs = [Job(index=i, error="not valid UTF-8") if bad_text(json.dumps(d, ensure_ascii=False))
                else _job_from_dict(i, d, base, default_seed) for i, d in enumerate(items)]
    elif suffix in (".jsonl", ".ndjson", ".json"):
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        for i, line in enumerate(lines):
            if bad_text(line):
                jobs.append(Job(index=i, error="line is not valid UTF-8"))
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                jobs.append(Job(index=i, error=f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            except RecursionError:
                jobs.append(Job(index=i, error="not valid JSON (nested too deeply)"))
                continue
            jobs.append(_job_from_dict(i, d, base, default_seed))
    else:
        raise ManifestError(f"{path}: unknown manifest format {suffix!r} (use .jsonl or .csv)")
    seen = {}
    for job in jobs:  # two jobs writing one file would overwrite each other: the later one is an error
        if job.error is None:
            key = job.out.casefold()
            if key in seen:
                job.error = f"out {job.out!r} is already used by job {seen[key]}"
            else:
                seen[key] = job.index
    return jobs


def parse_shard(s: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 ≤ K < N."""
    try:
        k, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise ValueError(f"--shard {s!r} must be K/N, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {s!r}: need 0 <= K < N")
    return k, n


def shard_from_env(env=os.environ) -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them, else (0, 1)."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")
    return 0, 1


def select_shard(jobs: list[Job], k: int, n: int) -> list[Job]:
    return [j for j in jobs if j.index % n == k]


def sidecar_path(png: Path) -> Path:
    return Path(png).with_suffix(".json")


def fingerprint(job_record: dict, settings: dict, model_id: str) -> str:
    """A short hash of a job record, settings and model id (kept for callers of the older sidecar field;
    resume now uses job_key / is_complete_job, which also fingerprints the input's content)."""
    blob = json.dumps({"job": job_record, "settings": settings, "model": model_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ok_sidecar(png: Path) -> dict | None:
    png = Path(png)
    side = sidecar_path(png)
    if not (png.is_file() and side.is_file()):
        return None
    try:
        with open(side, "rb") as f:
            meta = json.loads(f.read(16 << 20))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("status") == "ok" else None


def is_complete(png: Path, fp: str | None = None) -> bool:
    """True when png and its sidecar exist, the sidecar says status ok (and matches fp, when given)."""
    meta = _ok_sidecar(png)
    return meta is not None and (fp is None or meta.get("fingerprint") == fp)


def job_settings(job: Job, s: EditSettings, save_masks: bool) -> dict:
    """Everything besides the input file and the model that decides a job's outputs (hashed into job_key)."""
    return {"edits": [list(p) for p in job.pairs], "seed": job.seed, "settings": s.identity(),
            "save_masks": bool(save_masks)}


def job_key(job: Job, s: EditSettings, save_masks: bool, model: dict, max_bytes=images.MAX_BYTES) -> dict:
    """The sidecar's "job_key" (engine.fingerprint.job_key of the input, job_settings and the model)."""
    return {"input": fingerprints.fingerprint(job.image, max_bytes),
            "settings": fingerprints.digest(job_settings(job, s, save_masks)), "model": fingerprints.digest(model)}


def is_complete_job(png: Path, job: Job, s: EditSettings, save_masks: bool, model: dict) -> bool:
    """True when png's output set is complete (PNG + ok sidecar) and its sidecar's job_key still holds: the
    same input content (size, mtime, sha256), job settings and model. A changed input is redone."""
    meta = _ok_sidecar(png)
    return meta is not None and fingerprints.same_job(job.image, meta.get("job_key"),
                                                      job_settings(job, s, save_masks), model)


def job_files(out_dir: Path, job: Job) -> list[Path]:
    """Every file a job could write: PNG, sidecar, one mask per pair, overlay, grid."""
    return outputs.files(outputs.output_paths(Path(out_dir) / job.out, len(job.pairs), extras=True))


def reserved_files(out_dir: Path, n_shards: int = 1) -> list[Path]:
    """The run's own files in out_dir: report.json, report.K-of-N.json."""
    out_dir = Path(out_dir)
    return [out_dir / "report.json", *(out_dir / f"report.{k}-of-{n_shards}.json" for k in range(n_shards))]


def check_outputs(all_jobs: list[Job], out_dir, n_shards: int = 1, inputs=()) -> dict:
    """Before any work, fail (set .error on) every job whose output files (job_files) cannot be written or
    must not be: a name clashing with an earlier job's file or with the run's own reports (any K-of-N), a
    name too long with the temp suffix, an existing directory in the way, or an output that resolves to an
    input — any job's image, or one of `inputs` (the manifest, the model file) — as the same file, a hard
    link or a symlink. All jobs of the manifest are checked, not only one shard's, so every shard fails the
    same jobs. Returns {index: error} of the jobs failed here."""
    out_dir = Path(out_dir)
    ok = [j for j in all_jobs if j.error is None]
    files = {j.index: job_files(out_dir, j) for j in ok}
    bad = validate.collisions(files, reserved_files(out_dir, n_shards))
    owners = {os.path.normcase(os.path.abspath(p)).casefold(): j for j, ps in files.items() for p in ps}
    for j in ok:
        if j.index in bad:
            continue
        report = next((p.name for p in files[j.index] if p.parent == out_dir and REPORT_NAME.match(p.name)), None)
        if report:
            bad[j.index] = f"output {report} would overwrite the run's own report file"
            continue
        for parent in (out_dir / j.out).parents:  # a folder of this job's path that is another job's file
            if parent == out_dir or out_dir not in parent.parents:
                break
            other = owners.get(os.path.normcase(os.path.abspath(parent)).casefold())
            if other is not None:
                bad[j.index] = f"out {j.out!r} needs a folder {parent.name!r} that job {other} writes as a file"
                break
        if j.index in bad:
            continue
        try:  # what `edit --out` refuses, refused here too, before the work: a name too long with the temp
            # suffix, a directory or special file in the way, a folder that cannot be created or written
            validate.output_path(out_dir / j.out, "out", also=files[j.index])
        except validate.ValidationError as e:
            bad[j.index] = str(e)
    by_output = {p: j for j, ps in files.items() if j not in bad for p in ps}
    images_in = [j.image for j in all_jobs if j.image is not None and j.error is None] + [Path(p) for p in inputs]
    for out, inp in atomic.find_overwrites(list(by_output), images_in):
        j = by_output[out]
        bad.setdefault(j, f"output {out} is the input {inp} (same file): refusing to overwrite it")
    for j, ps in files.items():  # an existing file the engine did not write is the user's: never overwritten
        foreign = None if j in bad else next(iter(outputs.foreign_files({"files": ps})), None)
        if foreign is not None:
            bad[j] = (f"output {foreign} exists and was not written by diffedit: refusing to overwrite it "
                      f"(move or delete it, or give the job another out)")
    for j in all_jobs:
        if j.index in bad:
            j.error = bad[j.index]
    return bad
