"""Claims: which run is working on which output, so that two runs on one --out-dir share the work instead of
each redoing every job (two `diffedit batch` commands started by hand, or a re-run started while the first
still runs).

A claim is an exclusive flock on a lock file beside the output (`.NAME.png.lock`), taken without waiting:
taking it is atomic (the kernel grants it to one process), and it is released when the job's files have
landed, when the run ends (^C included), and by the kernel when the process dies however it dies (SIGKILL,
out of memory): a dead run's claim is never stale. A released lock file is removed; a SIGKILLed run's is left
behind unlocked, and the next run simply takes it. The file holds the holder's pid and host, for the log.
flock is per open file, so even two claims in one process exclude each other.
"""
import fcntl
import hashlib
import os
import socket
from pathlib import Path


def lock_path(png) -> Path:
    """`.NAME.lock` beside the output; for a name too long for that (255 bytes), a digest of it."""
    png = Path(png)
    name = f".{png.name}.lock"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        name = f".{hashlib.sha256(png.name.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.png.lock"
    return png.parent / name


def holder(png) -> str:
    """Who holds (or last held) png's claim: 'pid P on HOST', or '?'."""
    try:
        pid, host = lock_path(png).read_text().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "?"


class Claims:
    """The claims this process holds, by output path."""

    def __init__(self):
        self.held: dict = {}

    def take(self, png) -> bool:
        """True when this process now holds png's claim; False when another live process holds it."""
        png = Path(png)
        if png in self.held:
            return True
        path = lock_path(png)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the holder may have released and removed the file between our open and our lock
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.held[png] = fd
        return True

    def release(self, png) -> None:
        fd = self.held.pop(Path(png), None)
        if fd is None:
            return
        try:  # removed while still locked, so no other process can lock this inode and think it holds the claim
            os.unlink(lock_path(png))
        except OSError:
            pass
        os.close(fd)

    def release_all(self) -> None:
        for png in list(self.held):
            self.release(png)
