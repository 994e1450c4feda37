"""Content fingerprints for resume: a job is skipped only when its input file, settings and model are what
the finished output's sidecar recorded.

fingerprint(path) = {"size", "mtime_ns", "sha256"}: the hash decides (a photo replaced in place by `cp -p`
keeps its size and mtime, not its bytes); size and mtime are recorded too, for people reading the sidecar and
as a cheap first test. Files are read through images.open_regular (regular files only, size-limited) in
1 MiB chunks. Hashes are cached per process by (device, inode, size, mtime_ns, ctime_ns), so a batch that
uses one photo in many jobs reads it once; ctime changes on every write and cannot be set by a user. As in git's "racy" rule, a file changed in the
last RACY_NS is hashed every time (two writes within one tick of the file-system clock share their times).
"""
import hashlib
import json
import os
import time
from pathlib import Path

from ..files import images

CHUNK = 1 << 20
RACY_NS = 2_000_000_000  # file times tick in coarse steps (ms): a file changed this recently is not cached
_cache: dict[tuple, str] = {}


def sha256_file(path, max_bytes: int | None = images.MAX_BYTES) -> str:
    """The hex sha256 of a regular file's bytes, streamed (ImageError if not a readable regular file)."""
    f, _ = images.open_regular(path, max_bytes)
    h = hashlib.sha256()
    with f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _cache:
            return _cache[key]
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    if time.time_ns() - st.st_ctime_ns > RACY_NS:
        _cache[key] = h.hexdigest()
    return h.hexdigest()


def fingerprint(path, max_bytes: int | None = images.MAX_BYTES) -> dict:
    """{"size": bytes, "mtime_ns": int, "sha256": hex} of a regular file."""
    digest = sha256_file(path, max_bytes)
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def unchanged(path, recorded, max_bytes: int | None = images.MAX_BYTES) -> bool:
    """True when `path` still has the content `recorded` (a fingerprint() dict) describes. A different size
    answers without reading; otherwise the hash decides. A missing or unreadable file, or a malformed record,
    is "changed"."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return False
    try:
        if os.stat(path).st_size != recorded.get("size"):
            return False
        return sha256_file(path, max_bytes) == recorded["sha256"]
    except (OSError, ValueError):
        return False


def digest(obj) -> str:
    """A stable hex sha256 of a JSON-able value (settings, a model description): keys sorted, no spaces,
    NaN refused; the same value always gives the same digest across runs and machines."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def job_key(input_path, settings, model) -> dict:
    """What a resumed job must match: {"input": fingerprint, "settings": digest, "model": digest}."""
    return {"input": fingerprint(Path(input_path)), "settings": digest(settings), "model": digest(model)}


def same_job(input_path, recorded, settings, model) -> bool:
    """True when a sidecar's recorded job_key still holds for this input, settings and model."""
    if not isinstance(recorded, dict):
        return False
    return (recorded.get("settings") == digest(settings) and recorded.get("model") == digest(model)
            and unchanged(input_path, recorded.get("input")))
