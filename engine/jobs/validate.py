"""Checks of user-given values before any work: each returns the clean value or raises ValidationError, a
one-line message that names the option and the value as given (the CLI prints it and exits 2).

Ranges the engine documents:
- numbers: finite (nan, inf and overflowing literals such as 1e400 are refused), within the option's range;
- steps: 1 ..= the schedule's num_train_timesteps (1000 for SD): DDIM takes every T // steps-th training
  timestep, so more steps than T would repeat timesteps;
- seeds: SEED_MIN ..= SEED_MAX = 0 ..= 2**63 - 1. torch.Generator.manual_seed takes -2**63 ..= 2**64 - 1 (a
  negative seed s is used as s + 2**64, 2**64 overflows); the engine keeps to non-negative int64 so a seed
  means one thing, fits every int64 reader of the sidecar, and job seeds derived by adding an index stay
  inside torch's range;
- an edit's settings (steps, strength, guidance, maps, threshold rules, ...): EditSettings.checked, the one
  place their limits live (manifest.check_settings names the flag or field);
- output paths: not a directory or other non-file; the folder exists or can be created, on a writable file
  system; every file name of the output set, with the temp suffix staging adds, within NAME_MAX bytes;
  the whole path within PATH_MAX bytes.
"""
import math
import os
import stat
from pathlib import Path

import torch

from ..files import atomic

SEED_MIN, SEED_MAX = 0, 2**63 - 1
PATH_MAX = 4096  # bytes, Linux; macOS allows 1024
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ValidationError(ValueError):
    """A value that cannot be used; the message is one line naming the option and the value."""


def _fail(name: str, value, problem: str) -> ValidationError:
    shown = os.fspath(value) if isinstance(value, (str, os.PathLike)) else repr(value)
    shown = " ".join(str(shown).split()) or repr(shown)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ValidationError(f"{name} {shown}: {problem}")


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """A finite float (from a number or a numeric string; not a bool) within [lo, hi] (open ends on request)."""
    if isinstance(value, bool):
        raise _fail(name, value, "must be a number")
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise _fail(name, value, "not a number") from None
    if not math.isfinite(x):
        raise _fail(name, value, "not a finite number")
    if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and (x > hi or (hi_open and x == hi))):
        raise _fail(name, value, f"must be {_range_text(lo, hi, lo_open, hi_open)}")
    return x


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (from an int, an integral string such as "12" or "-3", or an integral float like 12.0; not a
    bool) within [lo, hi]."""
    if isinstance(value, bool):
        raise _fail(name, value, "must be an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and value.strip().isascii():
        n = int(value.strip())
    else:
        raise _fail(name, value, "must be an integer")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        if hi is None:
            raise _fail(name, value, f"must be >= {lo}")
        if lo is None:
            raise _fail(name, value, f"must be <= {hi}")
        raise _fail(name, value, f"must be in [{lo}, {hi}]")
    return n


def steps(value, num_train_timesteps: int = 1000, name: str = "--steps") -> int:
    """Sampling steps: 1 ..= the schedule's num_train_timesteps."""
    return integer(name, value, 1, num_train_timesteps)


def seed(value, name: str = "--seed") -> int:
    """A seed in SEED_MIN ..= SEED_MAX (0 ..= 2**63 - 1; see the module docstring)."""
    return integer(name, value, SEED_MIN, SEED_MAX)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise _fail(name, value, f"use one of {', '.join(map(str, options))}")
    return value


def dtype(value, name: str = "--dtype") -> str:
    return choice(name, value, DTYPES)


def device(value, name: str = "--device"):
    """A torch device string that parses and exists here ("auto" passes through): cuda:N within the GPU
    count, mps where available. Returns the string."""
    if value == "auto":
        return value
    try:
        d = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise _fail(name, value, "not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise _fail(name, value, "CUDA is not available here")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise _fail(name, value, f"only {torch.cuda.device_count()} CUDA device(s) here")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise _fail(name, value, "MPS is not available here")
    elif d.type != "cpu":
        raise _fail(name, value, "unsupported device type (use auto, cpu, cuda, cuda:N or mps)")
    return value


def output_path(path, name: str = "--out", suffix: str | None = ".png", also=()) -> Path:
    """An output file that can be created: `path` (and `also`, the rest of its output set: sidecar, masks,
    overlay, grid) checked as in the module docstring. Nothing is created. Returns Path(path)."""
    raw = path
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise _fail(name, raw, "must be a file path")
    if "\0" in str(path):
        raise _fail(name, str(path).replace("\0", "\\0"), "a path cannot contain a NUL byte")
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise _fail(name, raw, f"must end in {suffix}")
    for p in (path, *map(Path, also)):
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):  # the folder check below names what is in the way
            st = None
        except OSError as e:
            raise _fail(name, raw, f"cannot check {p} ({e.strerror or e})") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise _fail(name, raw, f"{p} is an existing directory, not a file")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _fail(name, raw, f"{p} exists and is not a regular file")
        if len(os.fsencode(os.path.abspath(p))) > PATH_MAX:
            raise _fail(name, raw, f"the path is longer than {PATH_MAX} bytes")
        try:
            atomic.check_name(p)
        except atomic.OutputError as e:
            raise _fail(name, raw, str(e).partition(": ")[2]) from None
    folder = path.parent
    ancestor = atomic.existing_ancestor(folder)
    if not ancestor.is_dir():
        raise _fail(name, raw, f"{ancestor} is not a directory, so {folder} cannot be created")
    if _read_only(ancestor):
        raise _fail(name, raw, f"{ancestor} is on a read-only file system")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _fail(name, raw, f"no permission to write in {ancestor}")
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will tell
        return False


def free_space(folder, need_bytes: int, name: str = "--out") -> None:
    """ValidationError when the file system of `folder` lacks need_bytes (+ a margin); see atomic."""
    try:
        atomic.check_free_space(folder, need_bytes)
    except atomic.OutputError as e:
        raise _fail(name, str(folder), str(e).partition(": ")[2]) from None


def collisions(files_by_job: dict, reserved=()) -> dict:
    """Output names that clash, before any work: {job: reason} for every job that claims a file another job
    claimed first (in dict order), or one of the `reserved` files the run itself writes (report.json, ...).
    files_by_job: {job: iterable of paths} — each job's whole output set, with every file it could write
    (all masks and extras), so no job's set can overwrite or later delete (as stale) another's files.
    Names are compared case-folded, as on case-insensitive file systems (macOS, Windows)."""
    def key(p) -> str:
        return os.path.normcase(os.path.abspath(p)).casefold()

    owner = {key(p): f"the run's own {Path(p).name}" for p in reserved}
    bad = {}
    for job, paths in files_by_job.items():
        mine = {}
        for p in paths:
            k = key(p)
            if k in owner and job not in bad:
                bad[job] = f"output {Path(p).name} would overwrite {owner[k]}"
            mine.setdefault(k, f"job {job}'s {Path(p).name}")
        if job not in bad:
            owner.update(mine)
    return bad
