"""Load-time benchmark (issue 2, item 5) on random-weight folders with the real SD 1.5 / SD 2.1 shapes.

1. Parity: the engine's UNet (weights.load_model) and diffusers' UNet2DConditionModel, loaded from the same
   folder, one forward at the real latent size (64x64 for SD 1.5, 96x96 for SD 2.1), fp32 CPU; reported
   as max|engine - diffusers| / max|diffusers| (target <= 1e-4). The text encoders are compared too.
2. Cold start: a fresh process from its spawn to the first UNet output (interpreter start, imports, load of
   the whole model, tokenize, text encode, one UNet forward at a 32x32 latent), for the engine and for a
   diffusers/transformers script doing the same work on the same folder. Wall time and the child's peak
   RSS (ru_maxrss from wait4), median of --runs timed runs after one untimed run (warm page cache).
   Target: engine >= 1.5x faster, peak RSS no higher.

    python benchmarks/load_bench.py                       # both kinds, 3 runs, writes RESULTS.md section
    python benchmarks/load_bench.py --kinds sd15 --runs 5 --no-write
    python -X importtime benchmarks/load_bench.py --child engine --folder /tmp/diffedit-bench/sd15  # profile

Only the standard library is imported at module level: the child processes import this file, and their
import cost is what is being measured.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse"
LATENT = {"sd15": 64, "sd21": 96}


# ---------------------------------------------------------------- children (timed from their spawn)
def _stamp(marks: dict, name: str) -> None:
    marks[name] = time.time()


def child_engine(folder: str, marks: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from weights import load_model

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    m = load_model(folder, device="cpu", dtype=torch.float32)
    _stamp(marks, "loaded")
    ids = m.tokenizer([PROMPT])
    ctx = m.text_encoder(ids)
    _stamp(marks, "encoded")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = m.unet(x, torch.tensor(500), ctx)
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean())}


def child_diffusers(folder: str, marks: dict) -> dict:
    """The same work with the reference libraries, written the way their documentation loads components."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    folder = Path(folder)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()  # noqa: F841 (same load work)
    _stamp(marks, "loaded")
    ids = tok([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ctx = te(ids).last_hidden_state
    _stamp(marks, "encoded")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean())}


def child_diffusers_pipeline(folder: str, marks: dict) -> dict:
    """What most users write: StableDiffusionPipeline.from_pretrained, then its encode_prompt."""
    import torch
    from diffusers import StableDiffusionPipeline

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    _stamp(marks, "loaded")
    ctx, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    _stamp(marks, "encoded")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pipe.unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean())}


CHILDREN = {"engine": child_engine, "diffusers": child_diffusers, "diffusers-pipeline": child_diffusers_pipeline}


def _vm_hwm_mib() -> float | None:
    """Peak RSS of this process's own address space (reset by exec, unlike ru_maxrss, which Linux carries
    over from the parent through vfork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_child(which: str, folder: str) -> None:
    t0 = float(os.environ.get("LOAD_BENCH_T0", time.time()))
    marks = {}
    extra = CHILDREN[which](folder, marks)
    res = {k: v - t0 for k, v in marks.items()} | extra
    res["child_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["vm_hwm_mib"] = _vm_hwm_mib()
    print("LOAD_BENCH_RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- parent
THREADS = None  # --threads: OMP_NUM_THREADS for the children (None: torch's default, all cores)


def _child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_NO_ADVISORY_WARNINGS="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def spawn(which: str, folder: Path) -> dict:
    """One fresh process; wall time from just before spawn to its first UNet output, and its own peak RSS."""
    env = _child_env()
    t0 = time.time()
    env["LOAD_BENCH_T0"] = repr(t0)
    proc = subprocess.Popen([sys.executable, __file__, "--child", which, "--folder", str(folder)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone (RUSAGE_CHILDREN would be a max over all)
    total = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    line = next((ln for ln in out.splitlines() if ln.startswith("LOAD_BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{which} child failed (rc {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(line.split(" ", 1)[1])
    res["process_total_s"] = total
    # ru_maxrss of this child alone (wait4), in KiB on Linux. It includes the parent's RSS at spawn (kept
    # across vfork+exec), so the parent stays small: cold starts run before anything heavy is loaded here.
    res["ru_maxrss_mib"] = usage.ru_maxrss / 1024
    res["cpu_s"] = usage.ru_utime + usage.ru_stime  # whole process; less sensitive to other users' load
    res["peak_rss_mib"] = res["vm_hwm_mib"] or res["ru_maxrss_mib"]
    return res


def cold_start(kind: str, folder: Path, runs: int, variants: list[str]) -> dict:
    """Runs interleaved (engine, diffusers, engine, ...) so that both see the same background load."""
    from results_md import median

    for which in variants:
        spawn(which, folder)  # untimed: warms the page cache and the .pyc files
    samples = {which: [] for which in variants}
    for _ in range(runs):
        for which in variants:
            samples[which].append(spawn(which, folder))
    out = {}
    for which, ss in samples.items():
        out[which] = {
            "first_unet_output_s": median([s["unet"] for s in ss]),
            "imports_s": median([s["imported"] for s in ss]),
            "load_s": median([s["loaded"] - s["imported"] for s in ss]),
            "tokenize_encode_s": median([s["encoded"] - s["loaded"] for s in ss]),
            "unet_32x32_s": median([s["unet"] - s["encoded"] for s in ss]),
            "peak_rss_mib": median([s["peak_rss_mib"] for s in ss]),
            "min_first_unet_output_s": min(s["unet"] for s in ss),
            "process_cpu_s": median([s["cpu_s"] for s in ss]),
            "samples": ss,
        }
        each = ", ".join(f"{s['unet']:.1f}" for s in ss)
        print(f"[load_bench] {kind} {which}: first UNet output {out[which]['first_unet_output_s']:.2f} s "
              f"(runs: {each}), peak RSS {out[which]['peak_rss_mib']:.0f} MiB", flush=True)
    e, d = out.get("engine"), out.get("diffusers")
    if e and d:
        out["speedup"] = d["first_unet_output_s"] / e["first_unet_output_s"]
        out["rss_ratio"] = e["peak_rss_mib"] / d["peak_rss_mib"]
        out["target_met"] = out["speedup"] >= 1.5 and out["rss_ratio"] <= 1.0
    return out


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def parity(kind: str, folder: Path) -> dict:
    """Engine vs diffusers UNet at the real latent size; one model alive at a time to bound memory."""
    import gc

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from weights import load_model

    torch.set_grad_enabled(False)
    ids_ref = CLIPTokenizer.from_pretrained(folder / "tokenizer")(
        [PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    ctx_ref = te(ids_ref).last_hidden_state
    del te
    gc.collect()

    m = load_model(str(folder), device="cpu", dtype=torch.float32)
    ids = m.tokenizer([PROMPT, ""])
    ctx = m.text_encoder(ids)
    n = LATENT[kind]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, n, n, generator=g)
    t = torch.tensor([999, 261])
    t0 = time.perf_counter()
    out = m.unet(x, t, ctx_ref)
    t_engine = time.perf_counter() - t0
    del m
    gc.collect()

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    t0 = time.perf_counter()
    ref = unet(x, t, encoder_hidden_states=ctx_ref).sample
    t_ref = time.perf_counter() - t0
    del unet
    gc.collect()
    res = {
        "latent": [2, 4, n, n],
        "tokenizer_ids_equal": bool(torch.equal(ids, ids_ref)),
        "text_encoder_max_rel_err": rel_err(ctx, ctx_ref),
        "unet_max_rel_err": rel_err(out, ref),
        "unet_out_abs_mean": float(ref.abs().mean()),
        "unet_finite": bool(torch.isfinite(out).all()),
        "engine_unet_forward_s": t_engine,
        "diffusers_unet_forward_s": t_ref,
    }
    res["parity_met"] = res["unet_max_rel_err"] <= 1e-4 and res["tokenizer_ids_equal"]
    print(f"[load_bench] {kind} parity: UNet max rel err {res['unet_max_rel_err']:.2e}, "
          f"text encoder {res['text_encoder_max_rel_err']:.2e}, ids equal {res['tokenizer_ids_equal']}", flush=True)
    return res


def fmt_load(la) -> str:
    return "/".join(f"{v:.1f}" for v in la)


def report(results: dict, machine: dict, cmd: str) -> str:
    from results_md import machine_line, table

    rows = []
    for kind, r in results["kinds"].items():
        p, c = r.get("parity", {}), r.get("cold_start", {})
        for which in ("engine", "diffusers", "diffusers-pipeline"):
            if which not in c:
                continue
            s = c[which]
            rows.append([kind, which, s["first_unet_output_s"], s["min_first_unet_output_s"], s["imports_s"],
                         s["load_s"], s["tokenize_encode_s"], s["unet_32x32_s"], s["process_cpu_s"],
                         s["peak_rss_mib"]])
    parity_rows = [[k, f"{r['parity']['unet_max_rel_err']:.2e}", f"{r['parity']['text_encoder_max_rel_err']:.2e}",
                    r["parity"]["tokenizer_ids_equal"], "x".join(map(str, r["parity"]["latent"])),
                    f"{r['parity']['engine_unet_forward_s']:.1f} / {r['parity']['diffusers_unet_forward_s']:.1f}"]
                   for k, r in results["kinds"].items() if "parity" in r]
    ratio_rows = [[k, f"{r['cold_start']['speedup']:.2f}x", f"{r['cold_start']['rss_ratio']:.2f}",
                   "met" if r["cold_start"]["target_met"] else "MISSED"]
                  for k, r in results["kinds"].items() if "speedup" in r.get("cold_start", {})]
    parts = [
        "## Load and cold start (issue 2, item 5)",
        f"Command: `{cmd}`  ",
        f"Machine: {machine_line(machine)}  ",
        f"Date: {results['date']}. Random-weight folders with the real shapes (`benchmarks/make_model.py`), fp32, CPU. "
        f"Load average (1/5/15 min) before {fmt_load(results['load_average_before'])}, after "
        f"{fmt_load(results['load_average_after'])} (the machine is shared: wall times are noisy, CPU times less so).",
        "",
        "Parity, one UNet forward at the real latent size (max |engine − diffusers| / max |diffusers|; target ≤ 1e-4):",
        "",
        table(["model", "UNet rel err", "text encoder rel err", "token ids equal", "latent", "forward s engine / diffusers"],
              parity_rows),
        "",
        f"Cold start, a fresh process from spawn to the first UNet output (median of {results['runs']} runs after one "
        "untimed run; page cache warm); phases are medians too:",
        "",
        table(["model", "script", "first UNet output s (median)", "min s", "imports s", "load s", "tokenize+encode s",
               "UNet 32x32 s", "process CPU s", "peak RSS MiB"], rows),
        "",
        "Target: engine ≥ 1.5x faster than the diffusers components script, peak RSS no higher:",
        "",
        table(["model", "speed-up", "RSS engine/diffusers", "target"], ratio_rows),
    ]
    if results.get("notes"):
        parts += ["", *results["notes"]]
    return "\n".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Load parity and cold-start benchmark (issue 2, item 5)")
    p.add_argument("--kinds", default="sd15,sd21")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--root", default="", help="folder holding KIND/ model folders (default /tmp/diffedit-bench)")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the cold-start children")
    p.add_argument("--pipeline", action="store_true", help="also time StableDiffusionPipeline.from_pretrained")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "load_bench.json"))
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return run_child(a.child, a.folder)

    global THREADS
    THREADS = a.threads
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import make_model
    from results_md import dump_json, machine, write_section

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": a.runs, "threads": a.threads,
               "load_average_before": os.getloadavg(), "kinds": {}}
    variants = ["engine", "diffusers"] + (["diffusers-pipeline"] if a.pipeline else [])
    kinds = a.kinds.split(",")
    folders = {k: make_model.ensure(k, Path(a.root) / k if a.root else None, device="cpu", dtype="float32")
               for k in kinds}
    for kind in kinds:  # cold starts first, while this process is small (see spawn)
        r = results["kinds"][kind] = {"folder": str(folders[kind])}
        if not a.skip_cold:
            r["cold_start"] = cold_start(kind, folders[kind], a.runs, variants)
            dump_json(results, Path(a.json))
    for kind in kinds:
        if not a.skip_parity:
            results["kinds"][kind]["parity"] = parity(kind, folders[kind])
            dump_json(results, Path(a.json))
    mach = machine()
    results["machine"] = mach
    results["load_average_after"] = os.getloadavg()
    dump_json(results, Path(a.json))
    md = report(results, mach, "python benchmarks/load_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(md)
    if not a.no_write:
        write_section("load_bench", md)
    return results


if __name__ == "__main__":
    main()
