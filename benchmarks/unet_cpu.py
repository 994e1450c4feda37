"""One SD 1.5 UNet call on this CPU, per system, against the machine's measured peak (issue 23 items 0 and 1).

The call: latent 32x32, batch 2 (360 GFLOP, counted by torch.utils.flop_counter on the engine's UNet built on the
meta device), random weights with the SD 1.5 shapes (make_model.py's sd15 folder). Every system runs in its own
process (load, build, warm-up calls, then --calls timed calls, median); the processes run in interleaved rounds
(every system once per round, --rounds rounds) so another user's load on the shared machine falls on all of them
alike; the table has the median over rounds of each process's median, wall and process CPU time, GFLOP/s = FLOPs /
wall time and the fraction of this machine's peak in that precision (cpu_peak.py, measured in its own process
before the rounds).

Systems (SYSTEMS): the engine eager and compiled as the Editor runs them (engine.runtime.optimize; compiled:
fused q/k/v, inductor with freezing), fp32 and bf16; diffusers eager fp32; OpenVINO fp32 and bf16 (diffusers' UNet
converted once with ov.convert_model at a static shape and saved as IR next to the model folder; each process
compiles the IR for the CPU plugin with INFERENCE_PRECISION_HINT f32 / bf16). OpenVINO is a benchmark peer only.

    python benchmarks/unet_cpu.py [--rounds 3] [--calls 3] [--systems a,b] [--section unet_cpu]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
sys.path.insert(0, str(HERE))

SYSTEMS = ("engine-eager-fp32", "engine-eager-bf16", "engine-compiled-fp32", "engine-compiled-bf16",
           "diffusers-eager-fp32", "openvino-fp32", "openvino-bf16")
# A/B only (not in the default set): the compiled engine with its fp32 linears left to MKL (EditorOptions
# onednn_linear=False), as it ran before runtime.onednn
AB_SYSTEMS = ("engine-compiledmkl-fp32",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(latent: int, batch: int, dtype=torch.float32, cross_dim: int = 768, device="cpu"):
    """The call's (sample, timestep, context), seeded: every system gets the same numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cross_dim, generator=g).to(device, dtype)
    return x, torch.tensor(500, device=device), ctx


def unet_flops(folder, latent: int, batch: int) -> int:
    """FLOPs of one call of the engine's UNet (torch.utils.flop_counter: convolutions, GEMMs, attention), built on
    the meta device from the folder's config: no weights read, no arithmetic done."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffedit_engine.engine.models.unet import UNet, UNetConfig

    cfg = UNetConfig.from_json(json.loads((Path(folder) / "unet" / "config.json").read_text()))
    with torch.device("meta"):
        unet = UNet(cfg)
    x, t, ctx = inputs(latent, batch, cross_dim=cfg.cross_attention_dim, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, ctx)
    return counter.get_total_flops()


def ir_path(folder, latent: int, batch: int) -> Path:
    return Path(folder) / "openvino" / f"unet_{latent}x{latent}_b{batch}.xml"


def convert_openvino(folder, latent: int, batch: int) -> Path:
    """diffusers' UNet from the folder's weights, converted by ov.convert_model at a static shape and saved as IR
    (weights kept fp32); skipped when the IR exists."""
    out = ir_path(folder, latent, batch)
    if out.exists():
        return out
    import openvino as ov
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet").eval()

    class Call(torch.nn.Module):  # the tensors in, the noise prediction out (no output dataclass to trace)
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, context):
            return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    x, t, ctx = inputs(latent, batch, cross_dim=unet.config.cross_attention_dim)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # diffusers' shape asserts, constant at one shape
        model = ov.convert_model(Call(unet), example_input=(x, t, ctx),
                                 input=[("sample", list(x.shape)), ("timestep", []), ("context", list(ctx.shape))])
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.stem + ".part.xml")  # renamed when whole: an interrupted save is not an IR
    ov.save_model(model, part, compress_to_fp16=False)
    part.with_suffix(".bin").replace(out.with_suffix(".bin"))
    part.replace(out)
    return out


def _engine(folder, dtype, compiled: bool, onednn_linear: bool | None = None):
    from diffedit_engine.engine.runtime.optimize import EditorOptions, optimize
    from diffedit_engine.weights import load_model

    # the Editor's path either way (runtime.optimize: its runner, heap buffers kept on CPU, and for compiled the
    # fused q/k/v and inductor with freezing); batch 2 is one call of the runner, no padding or splitting
    opt, _ = optimize(load_model(folder, dtype=dtype), EditorOptions(compile=compiled, max_batch=2,
                                                                 onednn_linear=onednn_linear))
    return opt.unet


def build(system: str, folder, latent: int, batch: int):
    """A function running one call of `system` and returning its output, with its inputs bound (the model loaded,
    compiled, prepacked)."""
    if system not in SYSTEMS + AB_SYSTEMS:
        raise ValueError(f"unknown system {system!r}; one of {', '.join(SYSTEMS + AB_SYSTEMS)}")
    parts = system.split("-")  # kind[-mode]-precision
    kind, mode, prec = parts[0], parts[1] if len(parts) == 3 else "", parts[-1]
    dtype = DTYPES[prec]
    cfg = json.loads((Path(folder) / "unet" / "config.json").read_text())
    x, t, ctx = inputs(latent, batch, dtype, cfg["cross_attention_dim"])
    if kind == "engine":
        unet = _engine(folder, dtype, compiled=mode.startswith("compiled"),
                       onednn_linear=False if mode == "compiledmkl" else None)
        return lambda: unet(x, t, ctx)
    if kind == "diffusers":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet", torch_dtype=dtype).eval()
        return lambda: unet(x, t, encoder_hidden_states=ctx).sample
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(ir_path(folder, latent, batch), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32" if prec == "fp32" else "bf16", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    feed = {"sample": x.float().numpy(), "timestep": t.numpy(), "context": ctx.float().numpy()}
    return lambda: torch.from_numpy(request.infer(feed)[0])


@torch.no_grad()
def run_system(system: str, folder, latent: int = 32, batch: int = 2, calls: int = 3, warmup: int = 2) -> dict:
    """Build `system` and time `calls` calls after `warmup` (the compiled systems compile in their first)."""
    t0 = time.perf_counter()
    fn = build(system, folder, latent, batch)
    for _ in range(warmup):
        fn()
    setup_s = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(calls):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"system": system, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "walls": wall, "setup_s": setup_s, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def _child(args: list, timeout: float) -> dict:
    """Run this script with `args` in a fresh process; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rounds(systems, folder, latent: int, batch: int, n_rounds: int, calls: int, threads: int | None,
           timeout: float = 900) -> dict:
    """system -> the per-round results, the systems interleaved round by round, each in its own process. The
    system "peak" is cpu_peak.measure (put it in the rounds: the machine's peak under the rounds' load)."""
    common = ["--folder", str(folder), "--latent", str(latent), "--batch", str(batch), "--calls", str(calls)]
    common += ["--threads", str(threads)] if threads else []
    out = {s: [] for s in systems}
    for r in range(n_rounds):
        for s in systems:
            res = _child(["--child", s, *common], timeout)
            res["load"] = res.get("load", os.getloadavg()[0])
            print(f"[unet_cpu] round {r + 1} {s}: {res}", flush=True)
            out[s].append(res)
    return out


def summarise(per_round: dict, flops: int, peaks: dict) -> list[dict]:
    """One row per system: medians over the rounds, GFLOP/s, and the fraction of the peak in its precision."""
    rows = []
    for s, results in per_round.items():
        if s == "peak":
            continue
        ok = [r for r in results if "wall_s" in r]
        if not ok:
            rows.append({"system": s, "error": results[-1].get("error", "no result") if results else "not run"})
            continue
        wall = statistics.median(r["wall_s"] for r in ok)
        prec = s.rsplit("-", 1)[1]
        cpu = statistics.median(r["cpu_s"] for r in ok)
        peak = peaks.get({"fp32": "float32", "bf16": "bfloat16"}[prec], {})
        gflops, per_cpu = flops / wall / 1e9, flops / cpu / 1e9
        rows.append({"system": s, "precision": prec, "wall_s": wall, "cpu_s": cpu, "gflops": gflops,
                     "peak_frac": gflops / peak["peak"] if peak.get("peak") else None, "gflop_per_cpu_s": per_cpu,
                     "peak_frac_cpu": per_cpu / peak["peak_per_cpu_s"] if peak.get("peak_per_cpu_s") else None,
                     "rounds": len(ok),
                     "load": [round(r["load"], 2) for r in ok], "setup_s": statistics.median(r["setup_s"] for r in ok)})
    return rows


def markdown(rows: list[dict], flops: int, peaks: dict, cmd: str, meta: dict) -> str:
    from cpu_peak import table_md
    from results_md import table

    ov = {r["precision"]: r["wall_s"] for r in rows if r["system"].startswith("openvino") and "wall_s" in r}
    ov_cpu = {r["precision"]: r["cpu_s"] for r in rows if r["system"].startswith("openvino") and "wall_s" in r}
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["system"], "failed: " + r["error"][:80], "", "", "", "", "", "", "", "", ""])
            continue
        vs = f"{ov[r['precision']] / r['wall_s']:.2f}x" if r["precision"] in ov else "-"
        vs_cpu = f"{ov_cpu[r['precision']] / r['cpu_s']:.2f}x" if r["precision"] in ov_cpu else "-"
        pct = [f"{100 * r[k]:.0f} %" if r[k] else "-" for k in ("peak_frac", "peak_frac_cpu")]
        body.append([r["system"], r["wall_s"], r["cpu_s"], f"{r['gflops']:.0f}", pct[0], f"{r['gflop_per_cpu_s']:.0f}",
                     pct[1], vs, vs_cpu, f"{r['setup_s']:.0f}", " ".join(f"{v:.1f}" for v in r["load"])])
    return "\n".join([
        "## SD 1.5 UNet call on this CPU against its measured peak and OpenVINO (issue 23 items 0 and 1)",
        f"Command: `{cmd}`  ",
        f"Machine: {meta['machine']}; openvino {meta.get('openvino', '-')}  ",
        f"Date: {meta['date']}; load average before {meta['load_before']}, after {meta['load_after']}. One UNet call, "
        f"latent {meta['latent']}x{meta['latent']}, batch {meta['batch']}, {flops / 1e9:.0f} GFLOP "
        f"(torch.utils.flop_counter), random SD 1.5 weights; each system in its own process, {meta['rounds']} "
        f"interleaved rounds, {meta['calls']} timed calls per process after {meta['warmup']} warm-up; median of the "
        f"per-process medians; CPU s = process CPU time of a call (all threads); torch threads {meta['threads']}. "
        f"% of peak: GFLOP/s over the best GEMM/convolution rate (cpu_peak.py, measured in each round as one more "
        f"process, best over the rounds, below); the CPU-time columns divide by process CPU seconds instead (a "
        f"per-core rate, what the work costs whatever share of the cores other users left). setup s: load + build "
        f"(+ compile) + warm-up.",
        "",
        table(["system", "wall s", "CPU s", "GFLOP/s", "% of peak", "GFLOP per CPU s", "% of peak (CPU time)",
               "vs OpenVINO, wall", "vs OpenVINO, CPU time", "setup s", "1-min load per round"], body),
        "",
        "Peak (cpu_peak.py, best of 3 per round, best over the rounds, same threads; peak_per_cpu_s in GFLOP per CPU "
        "second):",
        "",
        table_md(peaks),
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="", help="an SD 1.5-shaped diffusers folder (default: make_model's sd15)")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--section", default="unet_cpu")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one system, print JSON
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        if a.child == "peak":
            from cpu_peak import measure
            print(json.dumps(measure()))
        elif a.child == "convert":
            print(json.dumps({"ir": str(convert_openvino(a.folder, a.latent, a.batch))}))
        else:
            print(json.dumps(run_system(a.child, a.folder, a.latent, a.batch, a.calls, a.warmup)))
        return None
    systems = [s for s in a.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS + AB_SYSTEMS:
            raise ValueError(f"unknown system {s!r}; one of {', '.join(SYSTEMS + AB_SYSTEMS)}")
    from results_md import dump_json, machine, machine_line, write_section

    if not a.folder:
        import make_model
        a.folder = str(make_model.ensure("sd15"))
    la0 = "/".join(f"{v:.1f}" for v in os.getloadavg())
    extra = ["--folder", a.folder, "--latent", str(a.latent), "--batch", str(a.batch)]
    extra += ["--threads", str(a.threads)] if a.threads else []
    if any(s.startswith("openvino") for s in systems):
        print("[unet_cpu] openvino IR:", _child(["--child", "convert", *extra], 1800), flush=True)
    flops = unet_flops(a.folder, a.latent, a.batch)
    per_round = rounds(["peak", *systems], a.folder, a.latent, a.batch, a.rounds, a.calls, a.threads)
    from cpu_peak import best_of
    peaks = best_of([{k: v for k, v in r.items() if isinstance(v, dict)} for r in per_round["peak"] if "error" not in r])
    rows = summarise(per_round, flops, peaks)
    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        ov_version = "not installed"
    meta = {"machine": machine_line(machine()), "openvino": ov_version, "latent": a.latent, "batch": a.batch,
            "rounds": a.rounds, "calls": a.calls, "warmup": a.warmup, "threads": a.threads or torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": la0,
            "load_after": "/".join(f"{v:.1f}" for v in os.getloadavg())}
    cmd = "python benchmarks/unet_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(rows, flops, peaks, cmd.strip(), meta)
    print(md)
    if a.json:
        dump_json({"rows": rows, "per_round": per_round, "flops": flops, "peaks": peaks, "meta": meta}, Path(a.json))
    if not a.no_write:
        write_section(a.section, md)
    return rows


if __name__ == "__main__":
    main()
