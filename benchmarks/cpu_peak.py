"""This machine's measured CPU peak in GFLOP/s, fp32 and bf16: large square GEMMs (torch.mm: MKL in fp32, oneDNN in
bf16) and the SD UNet's 3x3 convolutions (oneDNN), best of N. The UNet benchmark (unet_cpu.py) divides its
GFLOP/s by these, so "how far from the limit" is a measured number, not a vendor's peak.

    python benchmarks/cpu_peak.py [--repeats 3] [--threads N]
"""
import argparse
import os
import time

import torch

GEMMS = (2048, 4096)
# (batch, channels, size): the SD 1.5 UNet's widest 3x3 convolutions at a 32x32 latent, batch 2
CONVS = ((2, 640, 16), (2, 1280, 8), (2, 320, 32))


def _best_s(fn, repeats: int) -> tuple[float, float]:
    """The shortest wall time and the shortest process CPU time (all threads) of `repeats` calls. On a machine
    shared with other work the wall time measures the share we got; the CPU time, what the work itself costs."""
    fn()  # warm-up: oneDNN's primitive creation, page faults of the output
    wall = cpu = float("inf")
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def _rates(flops: int, times: tuple[float, float]) -> tuple[float, float]:
    """(GFLOP/s of wall time, GFLOP per CPU second)."""
    return flops / times[0] / 1e9, flops / times[1] / 1e9


def gemm_gflops(n: int, dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    return _rates(2 * n ** 3, _best_s(lambda: torch.mm(a, b), repeats))


def conv_gflops(batch: int, ch: int, size: int, dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ch, size, size, generator=g).to(dtype)
    w = (torch.randn(ch, ch, 3, 3, generator=g) / (9 * ch) ** 0.5).to(dtype)
    flops = 2 * batch * ch * ch * 9 * size * size
    return _rates(flops, _best_s(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats))


@torch.no_grad()
def measure(repeats: int = 3, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """{dtype name: {"gemm N": GFLOP/s, "conv3x3 CxS": GFLOP/s, ..., "peak": the best of them, "peak_per_cpu_s":
    the best GFLOP per CPU second (a per-core rate, robust to other users' load)}}."""
    out = {}
    for dt in dtypes:
        rates = {f"gemm {n}": gemm_gflops(n, dt, repeats) for n in GEMMS}
        rates.update({f"conv3x3 {c}@{s}x{s} b{b}": conv_gflops(b, c, s, dt, repeats) for b, c, s in CONVS})
        row = {k: v[0] for k, v in rates.items()}
        row["peak"] = max(row.values())
        row["peak_per_cpu_s"] = max(v[1] for v in rates.values())
        out[str(dt).replace("torch.", "")] = row
    return out


def best_of(runs: list[dict]) -> dict:
    """The element-wise best of several measure() results (rounds measured between other work)."""
    return {dt: {k: max(r[dt][k] for r in runs) for k in runs[0][dt]} for dt in runs[0]}


def table_md(peaks: dict) -> str:
    names = list(next(iter(peaks.values())))  # "peak_per_cpu_s": GFLOP per CPU second, not GFLOP/s
    lines = ["| GFLOP/s | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {dt} | " + " | ".join(f"{row[k]:.0f}" for k in names) + " |" for dt, row in peaks.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    la = os.getloadavg()[0]
    peaks = measure(a.repeats)
    print(f"threads {torch.get_num_threads()}, load average {la:.2f} -> {os.getloadavg()[0]:.2f}")
    print(table_md(peaks))
    return peaks


if __name__ == "__main__":
    main()
