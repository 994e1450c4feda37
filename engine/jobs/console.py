"""The console of a job run: one-line errors and warnings on stderr, progress events as human lines or JSON
lines (--json), and the one exception that means "bad input" (exit status 2, before any work)."""
import json
import sys
import time

from tqdm import tqdm


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any work is done."""


class Log:
    """Human lines on stderr, or JSON lines on stdout (--json); nothing but errors with --quiet."""
    def __init__(self, quiet=False, json_lines=False):
        self.quiet, self.json = quiet, json_lines

    def event(self, name: str, message: str = "", **fields):
        if self.json:
            print(json.dumps({"event": name, "time": round(time.time(), 3), **({"message": message} if message else {}),
                              **fields}, default=str), flush=True)
        elif not self.quiet and message:
            tqdm.write(message, file=sys.stderr)  # keeps an active progress bar intact

    def warning(self, message: str, category: str = "warning"):
        """One line `diffedit: warning: ...` on stderr (a `warning` event with --json), even with --quiet."""
        message = " ".join(str(message).split())
        if self.json:
            print(json.dumps({"event": "warning", "category": category, "message": message}), flush=True)
        else:
            tqdm.write(f"diffedit: warning: {message}", file=sys.stderr)

    def error(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever the exception text held
        if self.json:
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"diffedit: error: {message}", file=sys.stderr, flush=True)


