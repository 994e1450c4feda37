"""The console of a job run: one-line errors and warnings on stderr, progress events as human lines or JSON
lines (--json), and the one exception that means "bad input" (exit status 2, before any work).

A reader that goes away (`diffedit ... --json | head -1`, a log pipe that dies) must never cost the work: a
write to a closed pipe turns that stream off for the rest of the run (its descriptor now points at
/dev/null, so neither a later line nor the interpreter's final flush raises), and the run goes on to write
its outputs and exits with the status of its work."""
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

PACKAGE = Path(__file__).resolve().parents[2]  # the diffedit_engine folder (a checkout's root)
NOTICES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any work is done."""


def _silence(stream) -> None:
    """Point a stream whose reader is gone at /dev/null (the descriptor itself: buffered bytes go there too)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def write(stream, text: str) -> bool:
    """text + newline on stream, flushed; False (and the stream off for good) when its reader is gone."""
    try:
        if stream is sys.stderr:
            tqdm.write(text, file=stream)  # keeps an active progress bar intact
        else:
            print(text, file=stream)
        stream.flush()
        return True
    except BrokenPipeError:
        _silence(stream)
        return False


class Log:
    """Human lines on stderr, or JSON lines on stdout (--json); nothing but errors with --quiet."""
    def __init__(self, quiet=False, json_lines=False):
        self.quiet, self.json = quiet, json_lines

    def event(self, name: str, message: str = "", **fields):
        if self.json:
            write(sys.stdout, json.dumps({"event": name, "time": round(time.time(), 3),
                                          **({"message": message} if message else {}), **fields}, default=str))
        elif not self.quiet and message:
            write(sys.stderr, message)

    def warning(self, message: str, category: str = "warning", source: str | None = None):
        """One line `diffedit: warning: ...` on stderr (a `warning` event with --json), even with --quiet.
        source: another package that raised it (torch, ray): the line is in its name, `torch: warning: ...`."""
        message = " ".join(str(message).split())
        if self.json:
            write(sys.stdout, json.dumps({"event": "warning", "category": category, "message": message,
                                          **({"source": source} if source else {})}))
        else:
            write(sys.stderr, f"{source or 'diffedit'}: warning: {message}")

    def python_warning(self, message, category, filename):
        """A Python warning (warnings.showwarning) as one line: ours as `diffedit: warning: ...`; another
        package's in its own name (`torch: warning: ...`), and its deprecation notices, which are for its
        developers, not our user (torch.jit.script_method under a CPU --compile), not at all (DIFFEDIT_DEBUG=1
        shows them)."""
        source = warning_source(filename)
        if source and issubclass(category, NOTICES) and not os.environ.get("DIFFEDIT_DEBUG"):
            return
        self.warning(message, category.__name__, source)

    def error(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever the exception text held
        if self.json:
            write(sys.stdout, json.dumps({"event": "error", "message": message}))
        write(sys.stderr, f"diffedit: error: {message}")

    def result(self, text: str):
        """A plain result line on stdout (the output path of `edit`, `info`'s table)."""
        write(sys.stdout, text)


def warning_source(filename) -> str | None:
    """None for a warning raised by this package; else the top-level package it came from (torch, ray, ...)."""
    path = Path(str(filename))
    parts = path.parts
    for where in ("site-packages", "dist-packages"):  # checked first: a venv may live inside the checkout
        if where in parts and parts.index(where) + 1 < len(parts):
            top = Path(parts[parts.index(where) + 1]).stem
            return None if top == "diffedit_engine" else top
    try:
        path.resolve().relative_to(PACKAGE)
        return None
    except (ValueError, OSError):
        return path.stem or "python"
