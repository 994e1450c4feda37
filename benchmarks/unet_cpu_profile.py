"""Where one UNet call's time goes, op class by op class, for one of unet_cpu.py's systems: torch.profiler's CPU
self time for the torch systems (eager and compiled), OpenVINO's per-layer PERF_COUNT for OpenVINO, both summed
into the same classes (convolution, GEMM, attention, normalisation, the rest) so the systems compare row by row.

    python benchmarks/unet_cpu_profile.py SYSTEM [--calls 2]      # one system per process, as in unet_cpu.py
    python benchmarks/unet_cpu_profile.py linears --threads 1      # the fp32 linears: aten, MKL, oneDNN
    python benchmarks/unet_cpu_profile.py attention --threads 1    # self-attention: SDPA vs math, fp32 / bf16
"""
import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unet_cpu  # noqa: E402

# first match wins; names are torch ops (aten::, mkldnn::, inductor's graph kernels) and OpenVINO layer types
CLASSES = (("convolution", r"conv|Convolution"),
           ("attention", r"scaled_dot_product|attention|ScaledDotProduct|Softmax|softmax|bmm"),
           ("GEMM", r"addmm|\bmm\b|aten::mm|linear|matmul|MatMul|FullyConnected|_linear_pointwise|mkl_linear"),
           ("normalisation", r"group_norm|layer_norm|native_layer_norm|GroupNorm|MVN|Normalize"),
           ("layout / copies", r"copy_|clone|contiguous|permute|transpose|Reorder|Transpose|reorder|cat\b|Concat"))


def op_class(name: str) -> str:
    for cls, pattern in CLASSES:
        if re.search(pattern, name):
            return cls
    return "elementwise / other"


def profile_torch(fn, calls: int) -> dict:
    """op name -> self CPU seconds per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return {e.key: e.self_cpu_time_total / 1e6 / calls for e in prof.key_averages()}


def profile_openvino(system: str, folder, latent: int, batch: int, calls: int) -> dict:
    """layer type (exec type) -> seconds per call, from OpenVINO's own counters."""
    import openvino as ov

    prec = system.rsplit("-", 1)[1]
    cfg = json.loads((Path(folder) / "unet" / "config.json").read_text())
    x, t, ctx = unet_cpu.inputs(latent, batch, cross_dim=cfg["cross_attention_dim"])
    compiled = ov.Core().compile_model(unet_cpu.ir_path(folder, latent, batch), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32" if prec == "fp32" else "bf16", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    feed = {"sample": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy()}
    request.infer(feed)
    out = defaultdict(float)
    for _ in range(calls):
        request.infer(feed)
        for p in request.profiling_info:
            out[f"{p.node_type} ({p.exec_type})"] += p.real_time.total_seconds() / calls
    return dict(out)


def linear_backends(repeats: int = 3) -> dict:
    """GFLOP per CPU second of the SD 1.5 UNet's fp32 linear shapes at a 32x32 latent, batch 2 (M = 2 * tokens):
    aten (MKL sgemm), MKL's packed linear (what inductor's freezing picks for fp32 on x86) and oneDNN's packed
    linear (what it picks for bf16); "total" is the CPU seconds of the whole set."""
    shapes = [(tok, K, N) for C, tok in ((320, 2048), (640, 512), (1280, 128))
              for K, N in ((C, 3 * C), (C, C), (C, 8 * C), (4 * C, C))]
    out = {"aten": {}, "mkl packed": {}, "onednn packed": {}}
    for M, K, N in shapes:
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        pm, pd = torch.ops.mkl._mkl_reorder_linear_weight(w, M), torch.ops.mkldnn._reorder_linear_weight(w, None)
        fns = {"aten": lambda: torch.nn.functional.linear(x, w, b),
               "mkl packed": lambda: torch.ops.mkl._mkl_linear(x, pm, w, b, M),
               "onednn packed": lambda: torch.ops.mkldnn._linear_pointwise(x, pd, b, "none", [], "")}
        for name, fn in fns.items():
            fn()
            cpu = min(_cpu_s(fn) for _ in range(repeats))
            out[name][f"{M}x{K}x{N}"] = 2 * M * K * N / cpu / 1e9
            out[name]["total"] = out[name].get("total", 0.0) + cpu
    return out


def attention_backends(repeats: int = 3) -> dict:
    """GFLOP per CPU second of the SD 1.5 UNet's self-attention shapes at a 32x32 latent, batch 2 ((B, heads,
    tokens, head dim); q·kᵀ and p·v counted), fp32 and bf16, through SDPA (the flash CPU kernel, what the engine
    runs eager and compiled) and the unfused math (two batched GEMMs around a softmax)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for N, d in ((1024, 40), (256, 80), (64, 160)):
            q, k, v = (torch.randn(2, 8, N, d).to(dtype) for _ in range(3))
            fns = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                   "math": lambda: ((q @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v}
            for name, fn in fns.items():
                fn()
                cpu = min(_cpu_s(fn) for _ in range(repeats))
                row = out.setdefault(f"{name} {str(dtype).replace('torch.', '')}", {})
                row[f"{N}x{d}"] = 4 * 2 * 8 * N * N * d / cpu / 1e9
    return out


def _cpu_s(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def by_class(per_op: dict) -> dict:
    out = defaultdict(float)
    for name, s in per_op.items():
        out[op_class(name)] += s
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("system", choices=(*unet_cpu.SYSTEMS, *unet_cpu.AB_SYSTEMS, "linears", "attention"),
                   help="a system, or 'linears': the fp32 linear shapes through aten, MKL's and oneDNN's packed linear, "
                   "or 'attention': the self-attention shapes through SDPA and the math, fp32 and bf16")
    p.add_argument("--folder", default="/tmp/diffedit-bench/sd15")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch (and OpenVINO) threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.system == "linears":
        res = linear_backends()
        print(f"fp32 linears, GFLOP per CPU s (total: CPU s), threads {torch.get_num_threads()}, load "
              f"{os.getloadavg()[0]:.2f}")
        for name, row in res.items():
            print(f"  {name:14s} " + " ".join(f"{k}={v:.3g}" for k, v in row.items()))
        return res
    if a.system == "attention":
        res = attention_backends()
        print(f"self-attention, GFLOP per CPU s, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
        for name, row in res.items():
            print(f"  {name:14s} " + " ".join(f"{k}={v:.3g}" for k, v in row.items()))
        return res
    if a.system.startswith("openvino"):
        per_op = profile_openvino(a.system, a.folder, a.latent, a.batch, a.calls)
    else:
        fn = unet_cpu.build(a.system, a.folder, a.latent, a.batch)
        fn(), fn()
        per_op = profile_torch(fn, a.calls)
    classes = by_class(per_op)
    print(f"{a.system}: load {os.getloadavg()[0]:.2f}, seconds per call (self time, all threads' ops summed)")
    for cls, s in classes.items():
        print(f"  {cls:22s} {s:7.3f}")
    print(f"  {'total':22s} {sum(classes.values()):7.3f}")
    for name, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"    {s:7.3f}  {name[:110]}")
    return classes


if __name__ == "__main__":
    main()
