"""Batch jobs: edit strings, manifests (JSONL / CSV), sharding, and what makes an output "complete".

Manifest: one job per JSONL line {"image": path, "edits": ["cat -> dog", ...], "seed": 1, "out": "name.png"}
(only image and edits required; any engine.settings.EditSettings field, e.g. "steps": 30 or
"threshold": "otsu", overrides the command line's setting for that job), or a CSV with a header row and the same columns; in CSV the edits cell is
either a JSON list or edits separated by ";". Blank lines and lines starting with "#" are not jobs. A relative
image path is relative to the manifest's folder; `out` is a relative name inside the output folder (default
`<index:06d>-<image stem>.png`). A job's index is its 0-based position among the manifest's jobs; it names
the job in reports and decides its shard.

Sharding: shard K/N (0 ≤ K < N) takes the jobs with index % N == K — a deterministic partition, so N
processes (--shard, or RANK/WORLD_SIZE under torchrun) never do a job twice and together do every job.

Complete: an output counts as done when its PNG and its JSON sidecar both exist, the sidecar parses, records
"status": "ok", and carries the job's fingerprint (inputs + settings + model), so a re-run skips it; a changed
job or setting is redone. Both files are written atomically and the sidecar last, so a killed run never
leaves an output that looks complete.
"""
import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from engine.settings import EditSettings

SETTING_KEYS = set(EditSettings.names())
JOB_KEYS = {"image", "edits", "seed", "out"} | SETTING_KEYS


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing, unreadable, unknown format)."""


def parse_edit(s: str) -> tuple[str, str]:
    """'source -> target' -> (source, target). An empty source means ∅ (the paper's reference); the target
    must not be empty. Splits at the first '->'."""
    if not isinstance(s, str):
        raise ValueError(f"edit must be a string 'source -> target', got {s!r}")
    if "->" not in s:
        raise ValueError(f"edit {s!r} has no '->' (write it as 'source -> target', e.g. 'cat -> dog')")
    src, tgt = (x.strip() for x in s.split("->", 1))
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

    def record(self) -> dict:
        return {"index": self.index, "image": str(self.image) if self.image else None,
                "edits": [f"{s} -> {t}" for s, t in self.pairs], "seed": self.seed, "out": self.out,
                **({"settings": self.settings} if self.settings else {})}


def _setting(name: str, v):
    """A manifest value for an EditSettings field; CSV cells are strings, converted by the field's type."""
    default = getattr(EditSettings(), name)
    if isinstance(v, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(v.strip())
        except ValueError:
            raise ValueError(f"{name} must be a {type(default).__name__}, got {v!r}") from None
    if name == "compat" and v in ("", "none", "None"):
        return None
    return v


def _job_from_dict(index: int, d, base: Path, default_seed: int) -> Job:
    job = Job(index=index, seed=default_seed)
    try:
        if not isinstance(d, dict):
            raise ValueError("a job must be a JSON object with 'image' and 'edits'")
        unknown = set(d) - JOB_KEYS
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} (allowed: {sorted(JOB_KEYS)})")
        if not d.get("image"):
            raise ValueError("missing 'image'")
        img = Path(str(d["image"])).expanduser()
        job.image = img if img.is_absolute() else base / img
        edits = d.get("edits")
        if isinstance(edits, str):
            edits = [edits]
        if not edits or not isinstance(edits, list):
            raise ValueError("missing 'edits' (a list of 'source -> target' strings)")
        job.pairs = [parse_edit(e) for e in edits]
        if d.get("seed") not in (None, ""):
            seed = d["seed"]
            if isinstance(seed, bool) or not (isinstance(seed, int) or (isinstance(seed, str) and seed.strip().lstrip("-").isdigit())):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            job.seed = int(seed)
        job.settings = {k: _setting(k, d[k]) for k in sorted(SETTING_KEYS & set(d))}
        EditSettings().updated(**job.settings)  # bad values fail this job now, before any work
        out = d.get("out") or f"{index:06d}-{job.image.stem}.png"
        job.out = check_out_name(str(out))
    except ValueError as e:
        job.error = str(e)
    return job


def check_out_name(out: str) -> str:
    """A job's output name must be a relative .png path that stays inside the output folder."""
    p = PurePosixPath(out.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"out {out!r} must be a relative name inside the output folder")
    if p.suffix.lower() != ".png":
        raise ValueError(f"out {out!r} must end in .png")
    return str(p)


def read_manifest(path, default_seed: int = 0) -> list[Job]:
    """All jobs of a .jsonl/.json-lines or .csv manifest; bad entries come back as jobs with .error set."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found" if not path.exists() else f"{path}: manifest is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    base = path.parent
    suffix = path.suffix.lower()
    jobs = []
    if suffix == ".csv":
        rows = list(csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
        if rows and not {"image", "edits"} <= set(rows[0]):
            raise ManifestError(f"{path}: CSV needs a header row with at least 'image' and 'edits' columns")
        for i, row in enumerate(rows):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            cell = row.get("edits", "")
            try:
                row["edits"] = json.loads(cell) if cell.startswith("[") else [e for e in cell.split(";") if e.strip()]
            except json.JSONDecodeError as e:
                jobs.append(Job(index=i, error=f"edits cell is not a valid JSON list ({e})"))
                continue
            jobs.append(_job_from_dict(i, {k: v for k, v in row.items() if v != "" or k in ("image", "edits")}, base, default_seed))
    elif suffix in (".jsonl", ".ndjson", ".json"):
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        for i, line in enumerate(lines):
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                jobs.append(Job(index=i, error=f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            jobs.append(_job_from_dict(i, d, base, default_seed))
    else:
        raise ManifestError(f"{path}: unknown manifest format {suffix!r} (use .jsonl or .csv)")
    seen = {}
    for job in jobs:  # two jobs writing one file would overwrite each other: the later one is an error
        if job.error is None:
            key = job.out.lower()
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
    """A short hash of everything that determines an output; a sidecar with another fingerprint is stale."""
    blob = json.dumps({"job": job_record, "settings": settings, "model": model_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(png: Path, fp: str | None = None) -> bool:
    """True when png and its sidecar exist, the sidecar says status ok (and matches fp, when given)."""
    png = Path(png)
    side = sidecar_path(png)
    if not (png.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("status") == "ok" and (fp is None or meta.get("fingerprint") == fp)
