"""The engine against diffusers on the same work (issue 5, item 2), on a random-weight SD 1.5 folder with the
real shapes (benchmarks/make_model.py).

Systems, each in its own fresh process (clean peak memory, no shared compile state):
  diffusers-eager     StableDiffusionDiffEditPipeline, SDPA attention (its default processor)
  diffusers-compiled  the same with torch.compile on its UNet (channels_last; mode reduce-overhead on CUDA)
  engine-eager        engine.runtime.Editor(compile=False)
  engine-compiled     engine.runtime.Editor(compile=True) (CUDA: + CUDA graphs)
  cli-eager           the command line's own path: `python cli.py batch --no-compile` in a fresh process on
                      the same folder, --cli-jobs jobs of the compat work (seeds 0, 1, ...; --batch-size 1:
                      each job one engine call at batch 1, as the compat rows), timed from spawn to exit
  cli-compiled        the same with `--compile`
Work:
  compat        DiffEdit with diffusers' defaults (mask: n maps at strength 0.5, CFG 7.5; inversion and
                decoding: strength 0.8, CFG 7.5) — the same work; the engine in compat="diffusers" mode
  default       the engine's own mode (paper DiffEdit through engine.regions; less UNet work by design)
  3-pair fused  engine.regions.edit_many with three pairs; 3-pair sequential: three 1-pair edits in a row
  batch 8       eight images of the same job in one batch (GPU mode)
  guided step   one UNet call at batch 2 (CFG) at the latent size, the rate in guided steps/s
  CLI batch     (cli-*) the whole process (imports, model load, compile, every job, outputs written), in
                images/s, and per job: the first job (with the compiles) and the later jobs' median, wall and
                CPU time (the CLI process's CPU read from /proc at each job's --json log line)
Each row: median latency over --repeats timed runs after a warm-up run with the same shapes (steps=2),
peak memory (CUDA: max_memory_allocated during the timed runs; CPU: the process's peak RSS), and for the
compiled systems the warm-up (compile) time.

    python benchmarks/compare.py                 # CPU mode (default without CUDA): 256², 2 maps, 10 steps
    python benchmarks/compare.py --gpu           # GPU mode: 512², diffusers' defaults (10 maps, 50 steps)

GPU machine (torch there, diffusers not): carry diffusers as a wheel, see benchmarks/RESULTS.md:
    pip download --no-deps diffusers==0.42.1 -d .device/wheels        # here, once (.device/ is git-ignored)
    pip install -q --no-deps --target /tmp/site .device/wheels/*.whl && PYTHONPATH=/tmp/site \
        python benchmarks/compare.py --gpu --json $OUT/compare_gpu.json --results $OUT/RESULTS_gpu.md
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIR = ("a cat sitting on a sofa", "a dog sitting on a sofa")
PAIRS3 = [PAIR, ("a wooden floor", "a marble floor"), ("a window", "a painting")]
SYSTEMS = ["diffusers-eager", "engine-eager", "engine-compiled", "diffusers-compiled", "cli-eager",
           "cli-compiled"]  # run in this order


@dataclass(frozen=True)
class Mode:
    name: str
    size: int
    num_maps: int
    steps: int
    strength: float = 0.8
    encode_strength: float = 0.5
    guidance: float = 7.5
    repeats: int = 1
    dtype: str = "float32"
    max_batch: int | None = None   # engine UNet samples per call (None: from free memory)
    buckets: tuple | None = None   # compiled engine: batch sizes calls are padded to (one graph each)
    batch8: bool = False
    micro_iters: int = 2
    timeouts: tuple = (("diffusers-eager", 420), ("engine-eager", 420), ("engine-compiled", 420),
                       ("diffusers-compiled", 420), ("cli-eager", 420), ("cli-compiled", 900))
    cli_jobs: int = 3              # jobs of the CLI batch rows (the first pays the compiles)
    budget_s: int = 1800           # all children together (the GPU run must fit one 10-minute device call)
    rows_engine_compiled: tuple = ("compat", "default")


# CPU: every engine UNet call runs at batch 2 (chunks of 2, padded to 2), so the compiled engine is one graph:
# inductor's CPU code generation of the full UNet takes about a minute per graph here, and with freezing each
# graph holds its own prepacked copy of the weights (3.4 GB fp32), on a machine shared with others.
CPU = Mode("cpu", size=256, num_maps=2, steps=10, max_batch=2, buckets=(2,))
# GPU: calls padded to batch 1/2/4/8/16 (5 graphs; batch 1, the decoding step of one pair's inversion, is its own
# bucket, never padded); time budget per system so the whole run fits 10 minutes.
GPU = Mode("gpu", size=512, num_maps=10, steps=50, repeats=3, dtype="float16", max_batch=16, buckets=(1, 2, 4, 8, 16),
           batch8=True, micro_iters=20, budget_s=530, cli_jobs=4,
           timeouts=(("diffusers-eager", 90), ("engine-eager", 90), ("engine-compiled", 230),
                     ("diffusers-compiled", 200), ("cli-eager", 60), ("cli-compiled", 120)),
           rows_engine_compiled=("compat", "default", "3-pair fused", "batch 8"))


def unet_samples(mode: Mode, system: str, row: str, batch: int = 1) -> int:
    """UNet samples a row spends (for the table; the formulas follow the implementations)."""
    n, S = mode.num_maps, int(mode.steps * mode.strength)
    if row == "compat":
        mask = 4 * n if system.startswith("diffusers") else 3 * n  # the engine runs the 3 distinct prompts
        return batch * (mask + 2 * S + 2 * S)
    if row == "default":
        return batch * (2 * n + S + 2 * S)
    if row == "3-pair fused":
        return n * 6 + S + 4 * S
    if row == "3-pair sequential":
        return 3 * (2 * n + S + 2 * S)
    if row == "batch 8":  # diffusers: its pipeline on 8 images; the engine: 8 default-mode jobs batched
        return unet_samples(mode, system, "compat" if system.startswith("diffusers") else "default", batch)
    return 0


# ---------------------------------------------------------------- children
def _image(size: int):
    import torch
    from PIL import Image

    from diffedit_engine.engine.files.images import to_tensor

    img = Image.open(ROOT / "engine" / "data" / "chelsea.png").convert("RGB").resize((size, size), Image.BICUBIC)
    return to_tensor(img)  # (3, size, size) in [0, 1]


class Clock:
    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda

    def __call__(self, fn):
        if self.cuda:
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0, out


def _peak_mem_mib(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()


class Recorder:
    """Row results, written to disk after each row so a timed-out child still reports what it finished."""

    def __init__(self, path: Path, system: str):
        self.path, self.data = path, {"system": system, "rows": {}}

    def set(self, key, value):
        self.data[key] = value
        self.flush()

    def row(self, name, **kw):
        self.data["rows"][name] = kw
        self.flush()
        print(f"[compare] {self.data['system']} {name}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items() if k != "runs_s"),
            flush=True)

    def flush(self):
        self.path.write_text(json.dumps(self.data, indent=1))


def _timed_rows(rec: Recorder, clock: Clock, cuda: bool, mode: Mode, rows: dict, outdir: Path, system: str,
                warm: bool):
    """rows: name -> (warm-up callable, timed callable, images in the row). With warm=True (compiled systems)
    each row first runs its warm-up (same shapes, steps=2: the compiles); then `repeats` timed runs. CPU time
    (all threads of this process) is recorded beside the wall time: on a shared machine it moves less."""
    import statistics

    import torch

    for name, (warmup, run, nimg) in rows.items():
        tw = clock(warmup)[0] if warm else None
        _reset_peak(cuda)
        runs, cpu, out = [], [], None
        for _ in range(mode.repeats):
            c0 = time.process_time()
            dt, out = clock(run)
            runs.append(dt)
            cpu.append(time.process_time() - c0)
        med = statistics.median(runs)
        rec.row(name, median_s=med, runs_s=runs, cpu_s=statistics.median(cpu), warmup_s=tw, images=nimg,
                images_per_s=nimg / med, peak_mem_mib=_peak_mem_mib(cuda),
                unet_samples=unet_samples(mode, system, name, nimg))
        if out is not None:
            torch.save(out.detach().float().cpu(), outdir / f"{system}.{name.replace(' ', '_')}.pt")


def _micro(rec: Recorder, clock: Clock, mode: Mode, unet_call, latent: int, dim: int, device, dtype):
    """Guided steps/s: one UNet call at batch 2 (CFG's uncond + cond), median over micro_iters calls."""
    import statistics

    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    ctx = torch.randn(2, 77, dim, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    tw, _ = clock(lambda: unet_call(x, t, ctx))
    c0 = time.process_time()
    times = [clock(lambda: unet_call(x, t, ctx))[0] for _ in range(mode.micro_iters)]
    cpu = (time.process_time() - c0) / mode.micro_iters
    med = statistics.median(times)
    rec.row("guided step", median_s=med, guided_steps_per_s=1 / med, cpu_s=cpu, warmup_s=tw)


def _tokenizer(tok):
    tok.model_max_length = min(tok.model_max_length, 77)  # folders saved without it (tests/tiny.py) say 1e30
    return tok


def child_diffusers(mode: Mode, folder: Path, compiled: bool, rec: Recorder, outdir: Path):
    import torch
    from diffusers import (AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    cuda = torch.cuda.is_available() and mode.name == "gpu"
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, mode.dtype)
    clock = Clock(cuda)
    t0 = time.perf_counter()
    sch = DDIMScheduler.from_pretrained(folder / "scheduler")
    pipe = StableDiffusionDiffEditPipeline(
        AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype),
        CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
        _tokenizer(CLIPTokenizer.from_pretrained(folder / "tokenizer")),
        UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype),
        scheduler=sch, inverse_scheduler=DDIMInverseScheduler.from_config(sch.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        # diffusers' documented recipe (docs: "Accelerate inference of text-to-image diffusion models"); on CPU
        # without channels_last (slower there) and without inductor freezing (not part of the recipe)
        if cuda:
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead" if cuda else None, fullgraph=True)
    rec.set("load_s", time.perf_counter() - t0)
    img = _image(mode.size)

    def diffedit(b: int, steps: int):
        imgs = img[None].expand(b, -1, -1, -1).to(device)
        gen = torch.Generator().manual_seed(0)
        src, tgt = [PAIR[0]] * b, [PAIR[1]] * b
        mask = pipe.generate_mask(image=imgs, source_prompt=src, target_prompt=tgt, num_maps_per_mask=mode.num_maps,
                                  mask_encode_strength=mode.encode_strength, guidance_scale=mode.guidance,
                                  num_inference_steps=steps, generator=gen)  # numpy (B, h, w), as its docs use
        mask = torch.from_numpy(mask).float()
        inv = pipe.invert(prompt=src, image=imgs, num_inference_steps=steps, inpaint_strength=mode.strength,
                          guidance_scale=mode.guidance, generator=gen).latents
        return pipe(prompt=tgt, mask_image=mask, image_latents=inv, num_inference_steps=steps,
                    inpaint_strength=mode.strength, guidance_scale=mode.guidance, generator=gen,
                    output_type="pt").images

    with torch.inference_mode():
        rows = {"compat": (lambda: diffedit(1, 2), lambda: diffedit(1, mode.steps), 1)}
        if mode.batch8 and not compiled:
            rows["batch 8"] = (lambda: diffedit(8, 2), lambda: diffedit(8, mode.steps), 8)
        if not compiled:  # eager: the micro benchmark's first call is the warm-up (weights paged in)
            _micro(rec, clock, mode, lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c).sample,
                   mode.size // 8, pipe.unet.config.cross_attention_dim, device, dtype)
        _timed_rows(rec, clock, cuda, mode, rows, outdir, rec.data["system"], warm=compiled)
        if compiled:  # after the rows: batch 2 is compiled by then
            _micro(rec, clock, mode, lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c).sample,
                   mode.size // 8, pipe.unet.config.cross_attention_dim, device, dtype)
    rec.set("peak_rss_or_gpu_mib", _peak_mem_mib(cuda))


def child_engine(mode: Mode, folder: Path, compiled: bool, rec: Recorder, outdir: Path):
    import torch

    from diffedit_engine.engine.runtime import Editor, Job

    cuda = torch.cuda.is_available() and mode.name == "gpu"
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, mode.dtype)
    clock = Clock(cuda)
    ed = Editor.from_pretrained(folder, device, dtype, compile=compiled, max_batch=mode.max_batch,
                                buckets=tuple(mode.buckets) if mode.buckets else None)
    rec.set("load_s", ed.timings["load_s"])
    rec.set("editor", ed.info)
    img = _image(mode.size)
    opts = dict(num_maps=mode.num_maps, encode_strength=mode.encode_strength, strength=mode.strength,
                guidance_scale=mode.guidance, seed=0, background="latent")  # as diffusers: the whole latent decoded

    def edit(pairs, steps, **kw):
        return ed.edit(img, pairs, steps=steps, **opts, **kw).image

    def sequential(steps):
        x = img
        for pair in PAIRS3:
            x = ed.edit(x, [pair], steps=steps, **opts).image
        return x

    def batch8(steps):
        out = ed.edit_batch([Job(img, [PAIR], {**opts, "steps": steps}) for _ in range(8)])
        return torch.stack([r.image for r in out])

    rows = {
        "compat": (lambda: edit([PAIR], 2, compat="diffusers"), lambda: edit([PAIR], mode.steps, compat="diffusers"), 1),
        "default": (lambda: edit([PAIR], 2), lambda: edit([PAIR], mode.steps), 1),
        "3-pair fused": (lambda: edit(PAIRS3, 2), lambda: edit(PAIRS3, mode.steps), 1),
        "3-pair sequential": (lambda: sequential(2), lambda: sequential(mode.steps), 1),
    }
    if mode.batch8:
        rows["batch 8"] = (lambda: batch8(2), lambda: batch8(mode.steps), 8)
    if compiled:
        rows = {k: v for k, v in rows.items() if k in mode.rows_engine_compiled}
    with torch.inference_mode():
        micro = lambda: _micro(rec, clock, mode, ed.model.unet, mode.size // 8,  # noqa: E731
                               ed.base.unet.config.cross_attention_dim, device, dtype)
        if not compiled:
            micro()
        _timed_rows(rec, clock, cuda, mode, rows, outdir, rec.data["system"], warm=compiled)
        if compiled:
            micro()
    rec.set("peak_rss_or_gpu_mib", _peak_mem_mib(cuda))
    rec.set("vae_fp32_fallbacks", getattr(ed.model.vae, "fallbacks", 0))


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_cli(mode: Mode, folder: Path, compiled: bool, rec: Recorder, outdir: Path):
    """The command line's own path: `cli.py batch` on cli_jobs compat jobs in a fresh process (this child waits
    on it, so RUSAGE_CHILDREN is that process alone). Its --json log gives each job's end; the CLI process's
    CPU time is read at each one."""
    import resource

    from PIL import Image

    import torch

    cuda = torch.cuda.is_available() and mode.name == "gpu"
    work = outdir / rec.data["system"]
    work.mkdir(parents=True, exist_ok=True)
    img = work / "image.png"
    Image.open(ROOT / "engine" / "data" / "chelsea.png").convert("RGB").resize((mode.size, mode.size),
                                                                             Image.BICUBIC).save(img)
    manifest = work / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(img), "edits": [f"{PAIR[0]} -> {PAIR[1]}"], "seed": i,
                                            "out": f"{i}.png"}) + "\n" for i in range(mode.cli_jobs)))
    cmd = [sys.executable, str(ROOT / "cli.py"), "batch", "--model", str(folder), "--manifest", str(manifest),
           "--out-dir", str(work / "out"), "--compat", "diffusers", "--steps", str(mode.steps),
           "--maps", str(mode.num_maps), "--strength", str(mode.strength), "--mask-strength",
           str(mode.encode_strength), "--guidance", str(mode.guidance), "--batch-size", "1", "--dtype", mode.dtype,
           "--device", "cuda" if cuda else "cpu", "--compile" if compiled else "--no-compile", "--json"]
    rec.set("command", " ".join(["python cli.py"] + cmd[2:]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    marks = []  # [event, wall s since spawn, CLI CPU s, job status]
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") in ("engine", "job"):
            try:
                cpu = _proc_cpu_s(proc.pid)
            except (OSError, IndexError):
                cpu = float("nan")
            marks.append([ev["event"], time.perf_counter() - t0, cpu, ev.get("status")])
            rec.set("marks", marks)
            if ev["event"] == "job":  # the row so far: a child stopped at its limit keeps the jobs it finished
                rec.data["rows"]["CLI batch"] = cli_row(marks, mode)
                rec.flush()
    err = proc.stderr.read()
    rc = proc.wait()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"cli.py batch exited {rc}: {err.strip()[-1500:]}")
    row = cli_row(marks, mode, process_s=time.perf_counter() - t0, process_cpu_s=ru.ru_utime + ru.ru_stime,
                  peak_mib=ru.ru_maxrss / 1024)
    if row["jobs"] != mode.cli_jobs:
        raise RuntimeError(f"cli.py batch finished {row['jobs']} of {mode.cli_jobs} jobs: {marks}")
    rec.set("load_s", row["ready_s"])
    rec.row("CLI batch", **row)
    rec.set("peak_rss_or_gpu_mib", ru.ru_maxrss / 1024)


def cli_row(marks: list, mode: Mode, process_s=None, process_cpu_s=None, peak_mib=None) -> dict:
    """The CLI batch row from its marks: per job wall and CPU from the engine's ready line on (the first job pays
    the compiles); median_s / cpu_s are the later jobs' medians (the first job's when it is the only one)."""
    import statistics

    ready = next(mk for mk in marks if mk[0] == "engine")
    steps = [ready] + [mk for mk in marks if mk[0] == "job" and mk[3] == "done"]
    per_wall = [b[1] - a[1] for a, b in zip(steps, steps[1:])]
    per_cpu = [b[2] - a[2] for a, b in zip(steps, steps[1:])]
    later = slice(1, None) if len(per_wall) > 1 else slice(0, 1)
    med = statistics.median(per_wall[later])
    return dict(median_s=med, runs_s=per_wall, cpu_s=statistics.median(per_cpu[later]), warmup_s=None, images=1,
                images_per_s=1 / med, peak_mem_mib=peak_mib, unet_samples=unet_samples(mode, "engine", "compat"),
                process_s=process_s, process_cpu_s=process_cpu_s, jobs=len(per_wall),
                process_images_per_s=None if process_s is None else len(per_wall) / process_s,
                first_job_s=per_wall[0], first_job_cpu_s=per_cpu[0], ready_s=ready[1])


def run_child(system: str, mode: Mode, folder: Path, out: Path, outdir: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    import torch

    torch.set_grad_enabled(False)
    rec = Recorder(out, system)
    kind, compiled = system.split("-")
    fn = {"diffusers": child_diffusers, "engine": child_engine, "cli": child_cli}[kind]
    fn(mode, folder, compiled == "compiled", rec, outdir)


# ---------------------------------------------------------------- parent
def spawn(system: str, mode: Mode, folder: Path, tmp: Path, timeout: float) -> dict:
    out = tmp / f"{system}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_NO_ADVISORY_WARNINGS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if mode.name == "cpu":
        # Idle OpenMP threads sleep instead of spinning, so a run's CPU time counts its work, not the waits
        # the machine's other users cause (wall times here vary 3x with their load; CPU times much less).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if system.endswith("compiled"):  # a fresh, empty compile cache each: compile times are cold for both
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{system}")
        env["TRITON_CACHE_DIR"] = str(tmp / f"triton-{system}")
    cmd = [sys.executable, __file__, "--child", system, "--mode-json", json.dumps(asdict(mode)),
           "--folder", str(folder), "--out", str(out), "--tmp", str(tmp)]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    # its own process group: at the time limit the child and what it started (the CLI rows' cli.py) stop together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1))
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode}): {stderr.strip()[-1500:]}"
        sys.stdout.write("".join(ln + "\n" for ln in stdout.splitlines() if ln.startswith("[compare]")))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        status = f"stopped at its time limit, {timeout:.0f} s (rows finished before are kept)"
    data = json.loads(out.read_text()) if out.exists() else {"system": system, "rows": {}}
    data["status"], data["process_s"] = status, time.perf_counter() - t0
    data["load_average_1min"] = [load0, os.getloadavg()[0]]
    print(f"[compare] {system}: {status} in {data['process_s']:.0f} s", flush=True)
    return data


def _get(res, system, row, key):
    return res.get(system, {}).get("rows", {}).get(row, {}).get(key)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarise(res: dict, mode: Mode, tmp: Path) -> dict:
    import torch

    s = {}
    de, dc, ee, ec = "diffusers-eager", "diffusers-compiled", "engine-eager", "engine-compiled"
    lat = lambda sy, row="compat": _get(res, sy, row, "median_s")  # noqa: E731
    s["same_work_engine_eager_vs_diffusers_eager"] = _ratio(lat(de), lat(ee))
    s["same_work_engine_compiled_vs_diffusers_eager"] = _ratio(lat(de), lat(ec))
    s["same_work_engine_compiled_vs_diffusers_compiled"] = _ratio(lat(dc), lat(ec))
    s["default_mode_engine_compiled_vs_diffusers_eager"] = _ratio(lat(de), lat(ec, "default"))
    s["default_mode_engine_eager_vs_diffusers_eager"] = _ratio(lat(de), lat(ee, "default"))
    for sy in (ee, ec):
        s[f"{sy}_3pair_fused_over_1pair"] = _ratio(lat(sy, "3-pair fused"), lat(sy, "default"))
        s[f"{sy}_3pair_sequential_over_fused"] = _ratio(lat(sy, "3-pair sequential"), lat(sy, "3-pair fused"))
    cpu = lambda sy, row="compat": _get(res, sy, row, "cpu_s")  # noqa: E731
    s["same_work_engine_eager_vs_diffusers_eager_cpu_time"] = _ratio(cpu(de), cpu(ee))
    s["same_work_engine_compiled_vs_diffusers_eager_cpu_time"] = _ratio(cpu(de), cpu(ec))
    # the CLI: its later jobs (compiles done) against diffusers eager's timed compat run, the same work
    # (a row with one job has no later job: its only job carries the compiles, so it gives no ratio)
    later = lambda sy, key: _get(res, sy, "CLI batch", key) if (_get(res, sy, "CLI batch", "jobs") or 0) > 1 \
        else None  # noqa: E731
    for sy in ("cli-eager", "cli-compiled"):
        s[f"same_work_{sy.replace('-', '_')}_vs_diffusers_eager"] = _ratio(lat(de), later(sy, "median_s"))
        s[f"same_work_{sy.replace('-', '_')}_vs_diffusers_eager_cpu_time"] = _ratio(cpu(de), later(sy, "cpu_s"))
    s["cli_compiled_vs_cli_eager"] = _ratio(later("cli-eager", "median_s"), later("cli-compiled", "median_s"))
    s["cli_compiled_vs_cli_eager_cpu_time"] = _ratio(later("cli-eager", "cpu_s"), later("cli-compiled", "cpu_s"))
    a, b = tmp / f"{de}.compat.pt", tmp / f"{ee}.compat.pt"
    if a.exists() and b.exists():  # the same work gives the same image (compat mode, same seed)
        s["compat_image_max_abs_diff_engine_vs_diffusers"] = float((torch.load(a)[0] - torch.load(b)).abs().max())
    return s


def report(res: dict, summary: dict, mode: Mode, machine: dict, cmd: str, title: str = "") -> str:
    from results_md import machine_line, table

    rows = []
    for sy in SYSTEMS:
        for row, r in res.get(sy, {}).get("rows", {}).items():
            if row == "guided step":
                continue
            if row == "CLI batch" and r["jobs"] == 1:
                row = "CLI batch (one job only: the first, with any compiles)"
            rows.append([sy, row, r["median_s"], r["cpu_s"], r["images_per_s"], r.get("unet_samples") or "",
                         "—" if r["peak_mem_mib"] is None else r["peak_mem_mib"],
                         "—" if r["warmup_s"] is None else r["warmup_s"]])
    micro = [[sy, res[sy]["rows"]["guided step"]["guided_steps_per_s"], res[sy]["rows"]["guided step"]["cpu_s"],
              res[sy]["rows"]["guided step"]["warmup_s"]]
             for sy in SYSTEMS if "guided step" in res.get(sy, {}).get("rows", {})]
    dash = lambda v: "—" if v is None else v  # noqa: E731  (a child stopped at its limit: no process totals)
    cli = [[sy, r["jobs"], dash(r["process_s"]), dash(r["process_cpu_s"]), dash(r["process_images_per_s"]),
            r["ready_s"], r["first_job_s"], r["first_job_cpu_s"], r["median_s"] if r["jobs"] > 1 else "—",
            r["cpu_s"] if r["jobs"] > 1 else "—", dash(r["peak_mem_mib"])]
           for sy in SYSTEMS for name, r in res.get(sy, {}).get("rows", {}).items() if name == "CLI batch"]
    ran = [sy for sy in SYSTEMS if sy in res]
    status = [[sy, res[sy].get("status", "not run"), f"{res[sy].get('process_s', 0):.0f}",
               f"{res[sy].get('load_s', float('nan')):.1f}",
               "/".join(f"{v:.1f}" for v in res[sy].get("load_average_1min", []))] for sy in ran]
    fmt = lambda k, v: "—" if v is None else (f"{v:.2e}" if k.startswith("compat_image") else f"{v:.2f}x")  # noqa: E731
    ratio_rows = [[k.replace("_", " "), fmt(k, v)] for k, v in summary.items() if v is not None]
    mem = "peak GPU memory allocated MiB" if mode.name == "gpu" else "peak RSS MiB (process)"
    S = int(mode.steps * mode.strength)
    parts = [
        f"## Engine vs diffusers, {mode.name.upper()} mode{title or ' (issue 5, item 2)'}",
        f"Command: `{cmd}`  ",
        f"Machine: {machine_line(machine)}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Random-weight SD 1.5 (real shapes), "
        f"{mode.dtype}, {mode.size}x{mode.size}, {mode.num_maps} maps, {mode.steps} steps (strength {mode.strength}: "
        f"{S} inversion + {S} decoding steps), mask strength {mode.encode_strength}, CFG {mode.guidance}; "
        f"median of {mode.repeats} timed run(s); compiled systems warm up each row first with the same shapes "
        f"(steps=2; these are the compiles, with an empty compile cache), eager ones with one UNet call. "
        f"CPU s: process CPU time (all threads) of a run. Engine max UNet batch: {mode.max_batch or 'from free memory'}.",
        "",
        table(["system", "work", "median s", "CPU s", "images/s", "UNet samples", mem, "warm-up (compile) s"], rows),
        "",
        "Guided UNet step (one call at batch 2), the rate:",
        "",
        table(["system", "guided steps/s", "CPU s per step", "first call s"], micro),
        "",
        *([f"The CLI's own path (`cli.py batch --compat diffusers --batch-size 1` on {mode.cli_jobs} jobs of the compat "
           "work, a fresh process each; its command is in the JSON): the whole process from spawn to exit, and per "
           "job from the engine's ready line (first job: with the compiles) — the main table's `CLI batch` row is "
           "the later jobs' median. Ready s: spawn to engine ready (imports, model hash, load, optimisation).",
           "",
           table(["system", "jobs", "process s", "process CPU s", "images/s (process)", "ready s", "first job s",
                  "first job CPU s", "later jobs s (median)", "later jobs CPU s", mem.replace("(process)", "")], cli),
           ""] if cli else []),
        "Ratios (higher is better for the engine; `3pair fused over 1pair` is a latency ratio, lower is better). "
        "On the shared CPU machine the CPU-time ratios are the ones to read: wall times move with other users' load.",
        "",
        table(["ratio", "value"], ratio_rows),
        "",
        table(["system", "status", "process s", "load s", "machine load avg (1 min) before/after"], status),
    ]
    return "\n".join(parts)


def rerender(a):
    """--from-json: the report of a finished (or partly finished) run, written to its section."""
    from results_md import dump_json, write_section

    full = json.loads(Path(a.from_json).read_text())
    m = full["mode"]
    mode = Mode(**{**m, "rows_engine_compiled": tuple(m["rows_engine_compiled"]),
                   "timeouts": tuple(map(tuple, m["timeouts"])), "buckets": m["buckets"] and tuple(m["buckets"])})
    for sy, data in full["systems"].items():
        if sy.startswith("cli-") and "CLI batch" not in data.get("rows", {}) and \
                any(mk[0] == "job" for mk in data.get("marks", [])):
            data.setdefault("rows", {})["CLI batch"] = cli_row(data["marks"], mode)
    full["summary"] = summarise(full["systems"], mode, Path(full.get("tmp", "/nonexistent")))
    dump_json(full, Path(a.from_json))
    md = report(full["systems"], full["summary"], mode, full["machine"], a.command or full.get("command", "?"),
                a.title)
    print(md)
    if not a.no_write:
        write_section(a.section or f"compare_{mode.name}", md, Path(a.results))
    return full


def main(argv=None):
    p = argparse.ArgumentParser(description="Engine vs diffusers DiffEdit benchmark (issue 5, item 2)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: 512², diffusers' defaults, fp16")
    p.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA is available")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--steps", type=int)
    p.add_argument("--maps", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--folder", default="", help="SD 1.5 folder (default: built by make_model.py)")
    p.add_argument("--json", default="")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--cli-jobs", type=int, help="jobs of the CLI batch rows (default: the mode's)")
    p.add_argument("--section", default="", help="RESULTS.md section to write (default compare_MODE)")
    p.add_argument("--title", default="", help="the section heading's tail")
    p.add_argument("--budget", type=int, help="seconds for all systems together (default: the mode's)")
    p.add_argument("--from-json", default="", help="re-render a run's JSON (and write its section) without running; "
                   "a CLI system stopped at its limit gets its row from the jobs it finished")
    p.add_argument("--command", default="", help="with --from-json: the command line to record")
    p.add_argument("--timeouts", default="", help="per-system limits, e.g. cli-eager=600,cli-compiled=900")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode-json", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        m = json.loads(a.mode_json)
        m["rows_engine_compiled"] = tuple(m["rows_engine_compiled"])
        m["timeouts"] = tuple(map(tuple, m["timeouts"]))
        return run_child(a.child, Mode(**m), Path(a.folder), Path(a.out), Path(a.tmp))

    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))

    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_model
    import torch
    from results_md import dump_json, machine, write_section

    if a.from_json:
        return rerender(a)
    gpu = a.gpu or (torch.cuda.is_available() and not a.cpu)
    mode = GPU if gpu else CPU
    for k, f in (("steps", "steps"), ("maps", "num_maps"), ("size", "size"), ("repeats", "repeats"),
                 ("cli_jobs", "cli_jobs")):
        if getattr(a, k):
            mode = replace(mode, **{f: getattr(a, k)})
    if a.budget:
        mode = replace(mode, budget_s=a.budget)
    if a.timeouts:
        mode = replace(mode, timeouts=tuple({**dict(mode.timeouts), **{k: int(v) for k, v in (
            kv.split("=") for kv in a.timeouts.split(","))}}.items()))
    t0 = time.perf_counter()
    folder = Path(a.folder) if a.folder else make_model.ensure(
        "sd15", make_model.DEFAULT_ROOT / ("sd15-fp16" if gpu else "sd15"), device="cuda" if gpu else "cpu",
        dtype=mode.dtype)
    build_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="diffedit-compare-"))
    limits, res = dict(mode.timeouts), {}
    deadline = time.perf_counter() + mode.budget_s
    for sy in a.systems.split(","):
        left = deadline - time.perf_counter()
        if left < 20:
            res[sy] = {"system": sy, "rows": {}, "status": "skipped: time budget spent", "process_s": 0}
            continue
        res[sy] = spawn(sy, mode, folder, tmp, min(limits.get(sy, 420), left))
    summary = summarise(res, mode, tmp)
    mach = machine()
    full = {"command": "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tmp": str(tmp), "mode": asdict(mode), "folder": str(folder), "model_build_or_check_s": build_s, "machine": mach,
            "systems": res, "summary": summary, "total_s": time.perf_counter() - t0}
    dump_json(full, Path(a.json or ROOT / "benchmarks" / "results" / f"compare_{mode.name}.json"))
    md = report(res, summary, mode, mach, "python benchmarks/compare.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), a.title)
    print(md)
    print(f"[compare] total {full['total_s']:.0f} s")
    if not a.no_write:
        write_section(a.section or f"compare_{mode.name}", md, Path(a.results))
    return full


if __name__ == "__main__":
    main()
