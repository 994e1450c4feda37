"""Atomic file writes, output sets replaced as a unit, and the checks that keep outputs off the user's files.

One file (atomic_open, write_*): the data goes to a hidden temp file in the destination's own folder
(os.replace is only atomic within one file system), is fsync'ed, then renamed over the destination; the
folder is fsync'ed so the rename itself survives a power cut on POSIX.

A set of files (replace_set): one output's files (OUT.png, OUT.mask<i>.png, OUT.overlay.png, OUT.grid.png and
the sidecar OUT.json) are all staged under temp names beside the old ones; only when every one of them is
complete are they swapped in, the sidecar last: the sidecar is the commit marker. So
- a failure while staging (disk full, an exception, SIGKILL) leaves the old set exactly as it was, still
  consistent with its old sidecar; the staged temp files are removed (or, after SIGKILL, left for
  clean_temps);
- during the swap the old sidecar is withdrawn first, so a kill between renames (only directory entries
  change, no data is written) leaves no sidecar claiming a mix of old and new files: the output reads as
  incomplete and is redone;
- once the new sidecar is in, the files of the older set that the new one does not have (the files its
  sidecar listed, and any `stale` paths the caller names, e.g. masks no longer requested) are removed, and
  so are leftover temp files of killed runs for these names.

Temp names are `.<name>.<8 random chars>.tmp` (TEMP_PATTERN), TEMP_OVERHEAD bytes longer than the name; a
name is usable when its temp name fits the file system's NAME_MAX (check_name).
"""
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, outputs get the usual 0666 & ~umask

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # mkstemp's 8 random chars
TEMP_OVERHEAD = len("." + "." + "x" * 8 + ".tmp")  # 14 bytes around the name
NAME_MAX = 255  # bytes; POSIX file systems (ext4, xfs, btrfs, APFS) all use 255


class OutputError(ValueError):
    """An output that cannot or must not be written; the message is one line naming the path."""


def _mkstemp(path: Path):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
    except OSError:
        pass
    return fd, Path(tmp)


@contextlib.contextmanager
def _staged(path: Path, mode: str):
    """A temp file beside `path`, fsync'ed and closed on a clean exit (yields (file, temp path)); removed on
    an exception."""
    fd, tmp = _mkstemp(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temp file next to `path`; on a clean exit it replaces `path`, on an exception it is removed."""
    path = Path(path)
    with _staged(path, mode) as (f, tmp):
        yield f
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_text(obj, strict: bool = True) -> str:
    """Indented UTF-8 JSON; strict: NaN/Infinity raise ValueError (they are not JSON; readers reject them)."""
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str, allow_nan=not strict) + "\n"


def write_json(path, obj, strict: bool = False) -> None:
    write_text(path, json_text(obj, strict))


# ---- output sets ------------------------------------------------------------------------------------------

class OutputSet:
    """The files of one output, staged beside their destinations until commit(); see the module docstring.
    Every file must be in the sidecar's folder; the sidecar must be among them."""

    def __init__(self, sidecar, stale=()):
        self.sidecar = Path(sidecar)
        self.folder = self.sidecar.parent
        self.stale = {self._own(p) for p in stale}
        self._staged: dict[Path, Path] = {}  # final path -> temp path, in write order

    def _own(self, path) -> Path:
        path = Path(path)
        if path.parent != self.folder:
            raise OutputError(f"{path}: not in the output set's folder {self.folder}")
        return path

    @contextlib.contextmanager
    def open(self, path, mode: str = "wb"):
        """A file object whose content becomes `path` when the set is committed."""
        path = self._own(path)
        if path in self._staged:
            raise OutputError(f"{path}: written twice in one output set")
        with _staged(path, mode) as (f, tmp):
            yield f
        self._staged[path] = tmp

    def write_bytes(self, path, data: bytes) -> Path:
        with self.open(path, "wb") as f:
            f.write(data)
        return Path(path)

    def write_text(self, path, text: str) -> Path:
        return self.write_bytes(path, text.encode("utf-8"))

    def write_json(self, path, obj, strict: bool = True) -> Path:
        """Strict by default: a sidecar with NaN/Infinity would be invalid JSON, so it is refused here."""
        return self.write_text(path, json_text(obj, strict))

    def commit(self) -> None:
        if self.sidecar not in self._staged:
            raise OutputError(f"{self.sidecar}: the sidecar (the set's commit marker) was not written")
        finals = list(self._staged)
        stale = (listed_files(self.sidecar) | self.stale) - set(finals)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sidecar)  # withdraw the old commit marker before any file of its set changes
            _fsync_dir(self.folder)
        for path in finals:
            if path != self.sidecar:
                os.replace(self._staged[path], path)
                del self._staged[path]
        _fsync_dir(self.folder)
        os.replace(self._staged[self.sidecar], self.sidecar)
        del self._staged[self.sidecar]
        _fsync_dir(self.folder)
        for path in stale:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(path)
        clean_temps(self.folder, names={p.name for p in [*finals, *stale]})

    def abort(self) -> None:
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._staged.clear()


@contextlib.contextmanager
def replace_set(sidecar, stale=()):
    """`with replace_set(OUT.json, stale=[...]) as s: s.write_bytes(OUT.png, ...); ...; s.write_json(OUT.json,
    meta)`: commit on a clean exit, abort (old set untouched) on an exception."""
    s = OutputSet(sidecar, stale)
    try:
        yield s
    except BaseException:
        s.abort()
        raise
    try:
        s.commit()
    except BaseException:
        s.abort()
        raise


def listed_files(sidecar) -> set[Path]:
    """The files an existing sidecar's "files" entry lists ({kind: name or [names]}), as paths in its folder.
    Names with a folder part are ignored (a sidecar never lists files elsewhere); an unreadable sidecar
    lists nothing."""
    sidecar = Path(sidecar)
    try:
        with open(sidecar, "rb") as f:
            files = json.loads(f.read(16 << 20)).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    names = []
    for v in (files.values() if isinstance(files, dict) else []):
        names += v if isinstance(v, list) else [v]
    return {sidecar.parent / n for n in names
            if isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") and "\0" not in n}


def clean_temps(folder, names=None, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temp files (TEMP_PATTERN) left in `folder` by killed runs: those of `names` only when
    given, else all that are at least min_age_s old (another process may be writing the younger ones).
    Returns the removed paths."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = TEMP_PATTERN.match(e.name)
        if not m or (names is not None and m["name"] not in names):
            continue
        try:
            if not e.is_file(follow_symlinks=False) or now - e.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


# ---- checks before any work -------------------------------------------------------------------------------

def same_file(a, b) -> bool:
    """True when a and b are the same file: the same path, a hard link or a symlink to it (os.path.samefile,
    i.e. st_dev + st_ino). False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # missing, unreadable, or a NUL byte in the path
        return False


def find_overwrites(outputs, inputs) -> list[tuple[Path, Path]]:
    """(output, input) pairs where an output path resolves to an input file (same_file), in output order.
    Outputs that do not exist yet are never an input."""
    keys = {}
    for p in inputs:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(p)
            keys.setdefault((st.st_dev, st.st_ino), Path(p))
    hits = []
    for p in outputs:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(p)
            if (st.st_dev, st.st_ino) in keys:
                hits.append((Path(p), keys[(st.st_dev, st.st_ino)]))
    return hits


def temp_name(name: str) -> str:
    """The longest temp name staging `name` uses (for length checks)."""
    return f".{name}.{'x' * 8}.tmp"


def name_max(folder) -> int:
    """The file system's limit on a file name in bytes (NAME_MAX; from the nearest existing ancestor)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.pathconf(existing_ancestor(folder), "PC_NAME_MAX")
    return NAME_MAX


def check_name(path) -> None:
    """Raise OutputError unless `path`'s name, with the temp suffix staging adds, fits NAME_MAX."""
    path = Path(path)
    if "\0" in str(path):
        raise OutputError(f"{str(path)!r}: a path cannot contain a NUL byte")
    n = len(os.fsencode(temp_name(path.name)))
    limit = min(name_max(path.parent), NAME_MAX)
    if n > limit:
        raise OutputError(f"{path}: file name too long: {len(os.fsencode(path.name))} bytes, and writing it "
                          f"needs a temp name {TEMP_OVERHEAD} bytes longer; the limit is {limit} bytes")


def existing_ancestor(path) -> Path:
    """`path` itself if it exists, else its nearest existing parent folder."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def png_bound(width: int, height: int, channels: int = 3, text_bytes: int = 0) -> int:
    """An upper bound on the size of a PNG (8 bits per channel): the raw scanlines (plus the filter byte of
    each), zlib's stored-block worst case (5 bytes per 16 KiB), chunk headers and text chunks."""
    raw = height * (width * channels + 1)
    return raw + 5 * (raw // 16384 + 1) + 1024 + 12 * (raw // 8192 + 1) + text_bytes


def check_free_space(folder, need_bytes: int, margin_bytes: int = 16 << 20) -> None:
    """Raise OutputError when the file system holding `folder` (or its nearest existing parent) has less than
    need_bytes + margin_bytes free. Staging writes a new set beside the old one, so `need_bytes` is the whole
    new set, whatever it replaces."""
    where = existing_ancestor(folder)
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        raise OutputError(f"{folder}: cannot read the free disk space ({e.strerror or e})") from None
    if free < need_bytes + margin_bytes:
        raise OutputError(f"{folder}: not enough free disk space: the outputs need about "
                          f"{_mib(need_bytes)} (+{_mib(margin_bytes)} margin), {_mib(free)} free on {where}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def is_disk_full(err: BaseException) -> bool:
    """An OSError meaning "no space" (ENOSPC) or "quota exceeded" (EDQUOT)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
