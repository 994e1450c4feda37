"""Finding checkpoint files and reading safetensors headers, with errors that name the file.

A checkpoint is a diffusers folder (model_index.json), a single CompVis/A1111 `.safetensors` file, or a hub
id ("org/name") found in the local Hugging Face cache. Pickled formats are never opened: unpickling runs
arbitrary code from the file.
"""
import json
import os
import re
import socket
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the engine reads: diffusers component folders (no root-level single files, no safety checker).
HUB_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")  # + SD-XL
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 << 20  # the safetensors format caps headers at 100 MB
PROBE_TIMEOUT_S = 3.0  # one TCP connect to the hub (or the proxy) before a download; DNS included


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: bad file, unsupported format, or keys/shapes that do not match."""


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: refusing to load a pickled checkpoint ({path.suffix}); unpickling can run arbitrary code. "
        f"Convert it to .safetensors first, or use the model's .safetensors release.")


def check_local(path: Path) -> None:
    """Refuse, from names and the header alone (before any loading), a local path that is not a checkpoint this
    engine reads: a folder without model_index.json (naming a pickle inside when that is all it holds), a
    pickled file, any other suffix than .safetensors, a renamed pickle or a truncated download."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return
        pickles = sorted(q.name for q in path.rglob("*") if q.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(path.rglob("*.safetensors")):
            raise CheckpointError(f"{path}: only pickle checkpoints inside ({pickles[0]}); refusing to unpickle "
                                  f"(arbitrary code) — use a .safetensors release")
        raise CheckpointError(f"{path}: not a checkpoint folder (no model_index.json); pass a diffusers folder "
                              f"or a single .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file or a diffusers folder")
    read_header(path)


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) from a safetensors file, after checking that the header is well-formed and that
    the file holds every byte the header promises (a truncated download fails here, not mid-load)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n) if n <= min(_MAX_HEADER, size - 8) else b""
    if not raw.startswith(b"{"):
        # torch.save writes a zip archive ("PK") or, in the legacy format, a raw pickle (protocol byte 0x80).
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(f"{path}: this is a pickled (torch.save) checkpoint, not safetensors; "
                                  f"refusing to unpickle it")
        raise CheckpointError(f"{path}: not a safetensors file, or truncated (its first 8 bytes announce a "
                              f"{n}-byte header; the file has {size} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)") from None
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors header entry for {key!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype not in _DTYPE_BYTES or stop - start != numel * _DTYPE_BYTES[dtype] or start > stop:
            raise CheckpointError(f"{path}: malformed safetensors header entry for {key!r}: {info}")
        out[key] = (dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: the header needs {8 + n + end} bytes, "
                              f"the file has {size} (incomplete download?)")
    return out


def weights_file(folder: Path, stem: str, prefer_fp16: bool) -> Path:
    """`stem.safetensors` or its `stem.fp16.safetensors` variant in folder (or, for sharded weights, the
    `stem.safetensors.index[.fp16].json` listing the shards), preferring the one that matches the requested
    dtype and falling back to the other (the loader casts)."""
    variants = [(f"{stem}.safetensors", f"{stem}.safetensors.index.json"),
                (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json")]
    for names in (variants[::-1] if prefer_fp16 else variants):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    pickles = sorted(p.name for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise CheckpointError(f"{folder}: no weights file ({variants[0][0]} or {variants[1][0]})")


def folder_tensors(folder: Path, stem: str, prefer_fp16: bool):
    """(file, key, shape) for every tensor of one diffusers component, single file or shards."""
    path = weights_file(folder, stem, prefer_fp16)
    shards = [path]
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{path}: malformed shard index (no weight_map)") from None
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{path}: lists shard {shard.name}, which is missing")
    for shard in shards:
        for key, (_, shape) in read_header(shard).items():
            yield shard, key, shape


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder of a model repo in the local hub cache (models--org--name/snapshots/<commit>), the
    one refs/<revision> points to; None if the repo is not cached."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    if (snapshots / commit).is_dir():
        return snapshots / commit
    if revision == "main" and snapshots.is_dir():
        # No ref file (a hand-copied cache): take the most recently written snapshot.
        found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def download(repo_id: str, revision: str, prefer_fp16: bool) -> Path:
    """Fetch the diffusers components through huggingface_hub: safetensors, json and txt only, and only one
    precision variant where the repo has both."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id, revision=revision)
    weights = [f for f in files if f.endswith(".safetensors") and f.split("/")[0] in HUB_COMPONENTS]
    keep = [f for f in weights if f.endswith(".fp16.safetensors") == prefer_fp16]
    # A component with only the other variant still needs its file.
    have = {f.split("/")[0] for f in keep}
    keep += [f for f in weights if f.split("/")[0] not in have]
    patterns = ["model_index.json"] + [f"{c}/*.json" for c in HUB_COMPONENTS] + [f"{c}/*.txt" for c in HUB_COMPONENTS]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns + keep))


def hub_endpoint() -> tuple[str, int]:
    """(host, port) a download connects to first: the HTTPS proxy when one is set, else HF_ENDPOINT's host
    (default huggingface.co)."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            u = urlsplit(os.environ[var] if "://" in os.environ[var] else "http://" + os.environ[var])
            return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    u = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return u.hostname or "", u.port or (80 if u.scheme == "http" else 443)


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds (name lookup included), else
    why not. The lookup has no timeout of its own, so the attempt runs in a daemon thread that is abandoned
    when the time is up."""
    result = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e.strerror or str(e) or type(e).__name__)

    t = threading.Thread(target=attempt, daemon=True, name="hub-probe")
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def resolve(path, prefer_fp16: bool = False, revision: str = "main") -> Path:
    """A local folder or file, or a hub id looked up in the local cache first (downloaded only where
    huggingface_hub is installed, HF_HUB_OFFLINE is not set and the hub answers a connect probe within
    PROBE_TIMEOUT_S). Raises FileNotFoundError, one line naming the path, otherwise."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if HUB_ID.match(s) and not s.startswith((".", "/")):
        snap = cached_snapshot(s, revision)
        if snap is not None:
            return snap
        where = f"{s}: not a local path and not in the Hugging Face cache ({hub_cache_dir()})"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            huggingface_hub = None
        if huggingface_hub is not None and not offline:
            host, port = hub_endpoint()
            # Without this, an unreachable hub costs ~25 s of huggingface_hub's retries before the same error.
            why = probe(host, port)
            if why is not None:
                raise FileNotFoundError(f"{where}, and the hub is unreachable ({host}:{port}: {why}); "
                                        f"download it where the network is reachable, or pass a local path")
            try:
                return download(s, revision, prefer_fp16)
            except Exception as e:  # network errors, missing repos, gated repos: all mean "not available"
                msg = " ".join(str(e).split())  # one line
                raise FileNotFoundError(f"{where}, and the download failed: {msg}") from e
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface_hub is not installed"
        raise FileNotFoundError(f"{where}; not downloading because {why}")
    raise FileNotFoundError(f"{path}: no such file or folder")
