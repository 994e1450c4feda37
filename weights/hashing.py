"""Model hashes for output metadata, cached so that only the first use of a checkpoint pays for reading it.

- A single file: sha256 of its bytes. The short hash (first 10 hex digits) is what A1111 prints as
  "Model hash" for safetensors files (its "AutoV2" hash), so PNG metadata matches A1111's for the same file.
- A folder: sha256 over the lines "relative/path<TAB>sha256-of-file\n" of every .safetensors, .json and .txt
  file in it, sorted by path (weights, configs and tokenizer files: everything that changes the output).
Per-file hashes are cached in <cache>/hashes.json keyed by absolute path, size and mtime_ns; a changed file
is rehashed.
"""
import hashlib
import json
from pathlib import Path

from ..engine.files import atomic
from .random_model import cache_root

_SUFFIXES = (".safetensors", ".json", ".txt")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def model_hash(path, on_miss=None) -> dict:
    """{"sha256": full hex, "short": first 10 hex, "scheme": "file-sha256" | "folder-sha256"} for a checkpoint.
    on_miss(path) is called once before the first file that has to be read (to say why there is a pause)."""
    path = Path(path).resolve()
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    dirty = False

    def file_hash(p: Path) -> str:
        nonlocal dirty
        st = p.stat()
        key, stamp = str(p), [st.st_size, st.st_mtime_ns]
        hit = cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        if not dirty and on_miss is not None:
            on_miss(path)
        digest = _file_sha256(p)
        cache[key] = [stamp, digest]
        dirty = True
        return digest

    if path.is_file():
        digest, scheme = file_hash(path), "file-sha256"
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES and not p.name.startswith("."))
        lines = "".join(f"{p.relative_to(path).as_posix()}\t{file_hash(p)}\n" for p in files)
        digest, scheme = hashlib.sha256(lines.encode()).hexdigest(), "folder-sha256"
    if dirty:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(cache_path, cache)
        except OSError:  # a read-only cache only costs speed
            pass
    return {"sha256": digest, "short": digest[:10], "scheme": scheme}

