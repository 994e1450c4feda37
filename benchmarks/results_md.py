"""Shared helpers for the benchmark scripts: machine description, medians, markdown tables, and
replacing one generated section of benchmarks/RESULTS.md (between BEGIN/END markers) in place."""
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict:
    """What the figures were measured on (CPU model and cores from lscpu; GPU when there is one)."""
    info = {"python": platform.python_version(), "os": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cpus"] = int(fields.get("CPU(s)", "0").strip() or 0)
    except (OSError, subprocess.SubprocessError, ValueError):
        info["cpu"], info["cpus"] = platform.processor() or "?", os.cpu_count()
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    for mod in ("diffusers", "transformers", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    libs = ", ".join(f"{k} {m[k]}" for k in ("torch", "diffusers", "transformers", "triton") if m.get(k))
    return f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, {m.get('mem_gib', '?')} GiB RAM{gpu}; Python {m['python']}; {libs}"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section delimited by <!-- BEGIN name --> ... <!-- END name -->."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


class LoadSampler:
    """The machine's 1-minute load average sampled every `every_s` seconds by a daemon thread while a benchmark
    runs (the machine is shared: the figures are read with the load they were taken under)."""

    def __init__(self, every_s: float = 15.0):
        import threading

        self.every_s, self.samples, self._stop = every_s, [os.getloadavg()[0]], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"every_s": self.every_s, "n": len(s), "min": min(s), "median": median(s), "max": max(s)}


def dump_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def merge(src: Path, dst: Path = RESULTS) -> list[str]:
    """Copy every generated section of `src` (e.g. a RESULTS.md written on the GPU machine) into `dst`."""
    names = re.findall(r"<!-- BEGIN (\S+) -->", Path(src).read_text())
    text = Path(src).read_text()
    for name in names:
        body = re.search(rf"<!-- BEGIN {re.escape(name)} -->\n(.*?)\n<!-- END {re.escape(name)} -->", text, re.S)
        write_section(name, body.group(1), dst)
    return names


if __name__ == "__main__":  # python benchmarks/results_md.py merge FILE: bring a device run's sections in
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "merge":
        print("merged:", ", ".join(merge(Path(sys.argv[2]))))
    else:
        print("usage: python benchmarks/results_md.py merge FILE")
