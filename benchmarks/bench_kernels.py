"""Effective bandwidth of the Triton kernels against torch eager and torch.compile of their references.

    python benchmarks/bench_kernels.py [--json out.json] [--iters 50]

On CUDA: per kernel and shape, the median time of the Triton kernel, the eager torch reference and the
torch.compile'd reference, each as effective GB/s = the minimal bytes the op must move (every input read
once, every output written once) / time. The latent shapes are small (64×64 fits in L2), so the SD rows
measure launch-bound latency; the B=8 / 128×128 rows show bandwidth. On CPU the Triton path only runs
under the interpreter (TRITON_INTERPRET=1, set here when there is no GPU): it is checked against the
reference for correctness and not timed; the eager reference's CPU time is reported for information.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

from diffedit_engine.kernels import fusion  # noqa: E402
from diffedit_engine.kernels import noise_diff as nd  # noqa: E402


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def fusion_case(B, N, hw, dtype, device, pred="epsilon"):
    g = torch.Generator(device="cpu").manual_seed(0)
    C, (h, w) = 4, hw
    eps = torch.randn(B, N + 1, C, h, w, generator=g).to(device, dtype)
    x = torch.randn(B, C, h, w, generator=g).to(device, dtype)
    bg = torch.randn(B, C, h, w, generator=g).to(device, dtype)
    W = (torch.rand(B, N, h, w, generator=g) > 0.5).float().to(device)
    a_t, a_p = torch.tensor(0.3, device=device), torch.tensor(0.5, device=device)
    args = (eps, x, bg, W, 7.5, a_t, a_p, pred)
    return dict(kernel="fused_step", shape=f"B={B} N={N} {h}x{w} {str(dtype)[6:]} {pred}",
                triton=lambda: fusion.fused_step(*args, impl="triton"),
                ref=fusion.fused_step_reference, args=args, bytes=_nbytes(eps, x, bg, W, x))


def noise_maps_case(B, n, N, hw, dtype, device, reduction="l1"):
    g = torch.Generator(device="cpu").manual_seed(0)
    h, w = hw
    eps = torch.randn(B, n, 2 * N + 1, 4, h, w, generator=g).to(device, dtype)
    src, tgt = torch.arange(1, N + 1), torch.arange(N + 1, 2 * N + 1)
    args = (eps, 0, src, tgt, 7.5, reduction)
    out_bytes = B * N * h * w * 4
    return dict(kernel="noise_maps", shape=f"B={B} n={n} N={N} {h}x{w} {str(dtype)[6:]} {reduction}",
                triton=lambda: nd.noise_maps(*args, impl="triton"),
                ref=nd.noise_maps_reference, args=args, bytes=_nbytes(eps) + out_bytes)


def masks_case(B, N, hw, rule, overlap, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h, w = hw
    maps = torch.rand(B, N, h, w, generator=g).to(device)
    args = (maps, rule, overlap)
    return dict(kernel="masks_from_maps", shape=f"B={B} N={N} {h}x{w} {rule} {overlap}",
                triton=lambda: nd.masks_from_maps(*args, impl="triton"),
                ref=nd.masks_from_maps_reference, args=args, bytes=3 * _nbytes(maps) + B * N * 4)


def cases(device):
    f16 = torch.float16
    if device == "cpu":  # interpreter: small shapes, correctness only
        return [fusion_case(1, 2, (37, 53), f16, device), fusion_case(1, 1, (64, 64), torch.float32, device,
                                                                      "v_prediction"),
                noise_maps_case(1, 2, 2, (37, 53), f16, device), noise_maps_case(1, 1, 1, (64, 64), f16, device, "l2"),
                masks_case(1, 2, (37, 53), "median", "argmax", device),
                masks_case(1, 2, (37, 53), "otsu", "subtract", device)]
    return [fusion_case(1, 1, (64, 64), f16, device), fusion_case(1, 3, (64, 64), f16, device),
            fusion_case(1, 5, (96, 96), f16, device), fusion_case(1, 3, (64, 64), f16, device, "v_prediction"),
            fusion_case(8, 3, (128, 128), f16, device),
            noise_maps_case(1, 10, 1, (64, 64), f16, device), noise_maps_case(1, 10, 3, (64, 64), f16, device),
            noise_maps_case(1, 10, 5, (96, 96), f16, device), noise_maps_case(8, 10, 3, (128, 128), f16, device),
            masks_case(1, 3, (64, 64), "clamp:3", "argmax", device),
            masks_case(1, 3, (64, 64), "median", "argmax", device),
            masks_case(1, 3, (64, 64), "otsu", "subtract", device),
            masks_case(1, 5, (96, 96), "quantile:0.8", "average", device)]


def time_cuda(fn, iters):
    """Median ms per call over `iters` timed groups of 10 calls (after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            fn()
        e.record()
        e.synchronize()
        ms.append(s.elapsed_time(e) / 10)
    return statistics.median(ms)


def time_cpu(fn, iters):
    fn()
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms)


def outputs(res):
    return list(res) if isinstance(res, tuple) else [res]


def check(case):
    """Max |Triton − reference| / max(|reference|, 1) over all outputs (NaN counts as a mismatch)."""
    got, ref = outputs(case["triton"]()), outputs(case["ref"](*case["args"]))
    err = lambda a, b: (a.double() - b.double()).abs() / b.double().abs().clamp(min=1)  # noqa: E731
    return max(float(err(a, b).nan_to_num(float("inf")).max()) for a, b in zip(got, ref))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows = []
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter: correctness only)'}")
    for case in cases(device):
        row = dict(kernel=case["kernel"], shape=case["shape"], bytes=case["bytes"], max_rel_diff=check(case))
        ref_fn = lambda c=case: c["ref"](*c["args"])  # noqa: E731
        if cuda:
            row["triton_ms"] = time_cuda(case["triton"], a.iters)
            row["eager_ms"] = time_cuda(ref_fn, a.iters)
            if not a.no_compile:
                try:
                    comp = torch.compile(case["ref"])
                    row["compile_ms"] = time_cuda(lambda c=case: comp(*c["args"]), a.iters)
                except Exception as e:  # report, keep benchmarking the others
                    row["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for k in ("triton", "eager", "compile"):
                if f"{k}_ms" in row:
                    row[f"{k}_GBps"] = row["bytes"] / (row[f"{k}_ms"] * 1e-3) / 1e9
        else:
            row["eager_cpu_ms"] = time_cpu(ref_fn, max(1, a.iters // 10))
        rows.append(row)
        cols = "  ".join(f"{k}={row[k]:.4g}" for k in row if k.endswith(("_ms", "_GBps")))
        print(f"{row['kernel']:16s} {row['shape']:40s} max|d|/max(|ref|,1)={row['max_rel_diff']:.2e}  {cols}")
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                  triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1", rows=rows,
                  note=None if cuda else "CPU: the Triton interpreter is for correctness only; no GB/s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")
    bad = [r for r in rows if not r["max_rel_diff"] <= 2e-3]  # one fp16 ulp
    if bad:
        print(f"MISMATCH in {len(bad)} case(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
