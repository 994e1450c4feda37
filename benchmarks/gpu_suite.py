"""The staged GPU suite: everything CUDA about the engine, in one command that fits one device call.

    python benchmarks/gpu_suite.py --out DIR              # on the GPU machine (DIR = $OUT there)
    python benchmarks/gpu_suite.py --out DIR --tiny       # dry run on a CPU: the tiny model, 64², 4 steps

Stages, each in its own process under its own time limit (a stage cut by its limit loses only itself;
the results of every finished stage are in DIR/suite.json as soon as it ends):
  env       torch / CUDA / cuDNN / Triton / NumPy versions, the GPU, free memory, diffusers importable
  kernels   the kernel tests on the GPU (never under TRITON_INTERPRET: NumPy >= 2.4 breaks Triton 3.6's
            interpreter), then bench_kernels.py: GB/s of each kernel against torch eager and compiled, and
            the share of the device's copy bandwidth measured here
  build     the random-weight SD 1.5 folder (real shapes), drawn on the GPU in fp16
  eager     end-to-end edits at 512², 50 steps (N=1, N=3, compat): latency, peak memory, finiteness, VAE fp32
            fallbacks, and the host syncs seen under torch.cuda.set_sync_debug_mode("warn"), by source line
  sdpa      one guided step (UNet batch 2) eager with each SDPA backend, cudnn.benchmark off/on
  compiled  one compiled bucket (batch 2, CUDA graphs), TORCH_LOGS=recompiles,cudagraphs, an empty cache:
            compile seconds, replay rate, then 50-step edits (default and compat); "skipping cudagraphs" in
            the log is a defect and is counted
  bucket2   a fresh process on the now warm cache: warm compile of bucket 2, cold compile of bucket 4, and
            the 3-pair fused edit against the 1-pair one
Tuning stages, not in the default list (a second device call: `--stages build,tune,vae`):
  tune      inductor options (conv_1x1_as_mm, coordinate-descent tuning, max-autotune GEMMs) against the default
  vae       VAE decode eager / compiled, NCHW / channels_last
  sdxl      the random-weight SD-XL base folder (real shapes) built on the GPU in fp16 (VAE fp32 by force_upcast),
            compiled with CUDA graphs: compile seconds and guided steps/s at 1024² (UNet batch 2; target >= 20,
            TensorRT's published H100 rate), then 50-step 1024² edits (N=1, N=3). Its own device call:
            `--stages env,sdxl` (the build alone writes ~7 GB; later calls on a warm machine reuse it)
  sd3       the random-weight SD 3.5 Medium folder (real shapes, no T5: zeros in its place) built in bf16
            (make_model.py --kind sd35m, ~6.7 GB), loaded in bf16 on the GPU: guided steps/s of the transformer at
            1024² (batch 2: 4096 image + 333 text tokens), then 1024² edits (N=1, N=3). Compiled (CUDA graphs)
            when the Editor compiles a flow model's transformer; the runtime compiles m.unet only today, so the
            stage runs eager through the Editor when it takes a flow model, else through regions.edit_many (the
            path and the reason are recorded). Its own device call: `--stages env,sd3`
  flux      the random-weight FLUX.1-dev folder (make_model.py --kind fluxdev, bf16, ~25 GB: the real transformer,
            VAE and CLIP-L, a REDUCED T5 of 2 layers with the real width 4096, which costs one encode per prompt,
            not per step), loaded in bf16: steps/s of one transformer call at 1024² (batch 1: dev is guidance-
            distilled, one sample per prompt; 4096 image + 512 text tokens), then 1024² edits (N=1, N=3) through
            the Editor, compiled (CUDA graphs) when it compiles the transformer (recorded). `--stages env,flux`
Outputs (the device tool returns at most 8 files): DIR/suite.json, DIR/suite.log, DIR/RESULTS_gpu_suite.md
(a generated section for benchmarks/RESULTS.md: `python benchmarks/results_md.py merge DIR/RESULTS_gpu_suite.md`).
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "kernels", "build", "eager", "sdpa", "compiled", "bucket2", "kbench")
TUNING = ("tune", "vae", "sdxl", "sd3", "flux")  # opt-in rows for a second device call: `--stages build,tune,vae`, `env,sdxl`
LIMITS = dict(env=40, kernels=120, build=90, eager=120, sdpa=60, compiled=180, bucket2=150, kbench=120, tune=420,
              vae=240, sdxl=520, sd3=520, flux=590)
PAIR = ("a cat sitting on a sofa", "a dog sitting on a sofa")
PAIRS3 = [PAIR, ("a wooden floor", "a marble floor"), ("a window", "a painting")]


@dataclass(frozen=True)
class Work:
    size: int = 512
    steps: int = 50
    maps: int = 10
    repeats: int = 3
    replay_iters: int = 100
    tiny: bool = False


TINY = Work(size=64, steps=4, maps=2, repeats=1, replay_iters=5, tiny=True)


# ---------------------------------------------------------------- child side
class Rec:
    """A stage's results, rewritten to disk after every key (a stage killed at its limit keeps what it had)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"[{self.path.stem}] {key}: {json.dumps(value, default=str)[:400]}", flush=True)


def _torch_device():
    import torch

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float16)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats=1):
    """Median wall seconds of `repeats` calls (device-synchronised) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def cuda_rate(fn, iters):
    """Calls per second of fn over `iters` calls, timed with CUDA events after 3 warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return iters / (time.perf_counter() - t0)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    return iters / (s.elapsed_time(e) / 1e3)


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _image(size):
    from PIL import Image

    from diffedit_engine.engine.files.images import to_tensor

    img = Image.open(ROOT / "engine" / "data" / "chelsea.png").convert("RGB").resize((size, size), Image.BICUBIC)
    return to_tensor(img)


def _folder(work: Work, tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if work.tiny:
        from diffedit_engine.weights.random_model import random_model_path

        return random_model_path(tmp / "random-model")
    import make_model

    return make_model.DEFAULT_ROOT / "sd15-fp16"


def _editor(work: Work, tmp: Path, **options):
    from diffedit_engine.engine.runtime import Editor, EditorOptions
    from diffedit_engine.weights import load_model

    device, dtype = _torch_device()
    t0 = time.perf_counter()
    m = load_model(_folder(work, tmp), device=device, dtype=dtype)
    ed = Editor(m, EditorOptions(**options))
    return ed, time.perf_counter() - t0


def _guided_inputs(ed, work: Work, batch=2):
    """Inputs made in inference mode, as the editing path makes them (compiled graphs guard on the
    dispatch keys: a plain tensor after an inference tensor is a recompile)."""
    import torch

    with torch.inference_mode():
        return _make_inputs(ed, work, batch)


def _make_inputs(ed, work: Work, batch):
    import torch

    device, dtype = _torch_device()
    g = torch.Generator().manual_seed(0)
    lat = work.size // 8
    x = torch.randn(batch, 4, lat, lat, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, ed.base.unet.config.cross_attention_dim, generator=g).to(device, dtype)
    return x, torch.tensor(500, device=device), ctx


class SyncLog:
    """Host syncs reported by torch.cuda.set_sync_debug_mode("warn"), counted by the innermost project frame."""

    def __init__(self):
        self.sites: dict = {}

    def __enter__(self):
        import torch

        self._show = warnings.showwarning
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if str(ROOT) in f.filename
                  and not f.filename.endswith("gpu_suite.py")]
        site = (f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno} {frames[-1].line}"
                if frames else f"{filename}:{lineno}")
        self.sites[site] = self.sites.get(site, 0) + 1

    def __exit__(self, *exc):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._show
        self._cm.__exit__(*exc)


def stage_env(rec: Rec, work: Work, tmp: Path):
    import numpy
    import torch

    rec["python"] = sys.version.split()[0]
    rec["torch"] = torch.__version__
    rec["cuda"] = torch.version.cuda
    rec["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rec["numpy"] = numpy.__version__
    rec["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    for mod in ("triton", "transformers", "diffusers", "tokenizers", "safetensors"):
        try:
            rec[mod] = __import__(mod).__version__
        except Exception as e:  # report what is missing; the stages that need it will say so too
            rec[mod] = f"not importable: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec["gpu"] = dict(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                          memory_gib=round(p.total_memory / 2**30, 1))
        free, total = torch.cuda.mem_get_info()
        rec["free_gib"] = round(free / 2**30, 1)
        x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        rate = cuda_rate(lambda: y.copy_(x), 20)
        rec["copy_GBps"] = round(2 * x.numel() * rate / 1e9, 1)  # read + write
    else:
        rec["gpu"] = None


def stage_kernels(rec: Rec, work: Work, tmp: Path):
    import torch

    env = dict(os.environ)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/test_kernels_fusion.py", "tests/test_kernels_noise_diff.py",
                        "-q", "-p", "no:cacheprovider", "-rfE"], cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (p.stdout + p.stderr).strip().splitlines()
    print("\n".join(tail[-40:]), flush=True)
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed)", ln)), tail[-1] if tail else "")
    rec["tests"] = dict(rc=p.returncode, summary=summary, seconds=round(time.perf_counter() - t0, 1),
                        failures=[ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20])


def stage_kbench(rec: Rec, work: Work, tmp: Path):
    """bench_kernels.py's cases, one row written at a time (a row is a Triton launch, the eager reference and
    a torch.compile of the reference: the compiles dominate this stage)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_kernels as bk

    cuda = torch.cuda.is_available()
    iters = 20 if cuda else 1
    for i, case in enumerate(bk.cases("cuda" if cuda else "cpu")):
        row = dict(kernel=case["kernel"], shape=case["shape"], bytes=case["bytes"], max_rel_diff=bk.check(case))
        if cuda:
            ref = lambda c=case: c["ref"](*c["args"])  # noqa: E731
            row["triton_ms"] = bk.time_cuda(case["triton"], iters)
            row["eager_ms"] = bk.time_cuda(ref, iters)
            try:
                comp = torch.compile(case["ref"])
                row["compile_ms"] = bk.time_cuda(lambda c=case: comp(*c["args"]), iters)
            except Exception as e:  # report, keep measuring the others
                row["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for k in ("triton", "eager", "compile"):
                if f"{k}_ms" in row:
                    row[f"{k}_GBps"] = round(row["bytes"] / (row[f"{k}_ms"] * 1e-3) / 1e9, 1)
        rec[f"row{i:02d}"] = row


def stage_build(rec: Rec, work: Work, tmp: Path):
    t0 = time.perf_counter()
    if work.tiny:
        folder = _folder(work, tmp)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import make_model

        folder = make_model.ensure("sd15", make_model.DEFAULT_ROOT / "sd15-fp16", device="cuda", dtype="float16")
    rec["folder"] = str(folder)
    rec["seconds"] = round(time.perf_counter() - t0, 1)


def _edit_rows(ed, work: Work, rows: dict, rec: Rec, syncs: bool):
    import torch

    img = _image(work.size)
    common = dict(num_maps=work.maps, seed=0)
    for name, (pairs, kw) in rows.items():
        warm_s, _ = timed(lambda: ed.edit(img, pairs, steps=2, **common, **kw))
        fb0 = getattr(ed.model.vae, "fallbacks", 0)
        _peak_reset()
        lat, r = timed(lambda: ed.edit(img, pairs, steps=work.steps, **common, **kw), work.repeats)
        row = dict(median_s=round(lat, 4), warmup_s=round(warm_s, 2), peak_mib=_peak_mib(),
                   finite=bool(torch.isfinite(r.image).all()), image_mean=float(r.image.float().mean()),
                   mask_coverage=[round(float(v), 3) for v in r.masks.float().flatten(1).mean(1)],
                   vae_fp32_fallbacks=getattr(ed.model.vae, "fallbacks", 0) - fb0)
        if syncs:
            with SyncLog() as log:
                ed.edit(img, pairs, steps=work.steps, **common, **kw)
                _sync()
            row["host_syncs"] = log.sites
        rec[name] = row


def stage_eager(rec: Rec, work: Work, tmp: Path):
    ed, load_s = _editor(work, tmp, compile=False)
    rec["load_s"] = round(load_s, 2)
    rec["editor"] = ed.info
    rec["max_batch_from_free_memory"] = ed.model.unet.limit(work.size // 8, work.size // 8)
    _edit_rows(ed, work, {"N=1": ([PAIR], {}), "N=3": (PAIRS3, {}), "compat": ([PAIR], {"compat": "diffusers"})},
               rec, syncs=True)


def stage_sdpa(rec: Rec, work: Work, tmp: Path):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ed, _ = _editor(work, tmp, compile=False)
    x, t, ctx = _guided_inputs(ed, work)
    unet = ed.model.unet
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    iters = 30 if torch.cuda.is_available() else 2
    with torch.inference_mode():
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            for name, be in backends.items():
                key = f"{name} cudnn.benchmark={'on' if bench else 'off'}"
                try:
                    if be is None:
                        rate = cuda_rate(lambda: unet(x, t, ctx), iters)
                    else:
                        with sdpa_kernel([be]):
                            rate = cuda_rate(lambda: unet(x, t, ctx), iters)
                    rec[key] = dict(guided_steps_per_s=round(rate, 2))
                except Exception as e:  # a backend that cannot run this shape/dtype says why
                    rec[key] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        torch.backends.cudnn.benchmark = False
        ed.base.unet.to(memory_format=torch.channels_last)
        rate = cuda_rate(lambda: unet(x.contiguous(memory_format=torch.channels_last), t, ctx), iters)
        rec["default channels_last (eager)"] = dict(guided_steps_per_s=round(rate, 2))


def _compiled_editor(work, tmp, rec, buckets):
    import torch

    ed, load_s = _editor(work, tmp, compile=True, max_batch=max(buckets), buckets=buckets)
    rec["load_s"] = round(load_s, 2)
    rec["editor"] = ed.info
    return ed, torch


def _dynamo_counters():
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles") and v}


def stage_compiled(rec: Rec, work: Work, tmp: Path):
    ed, torch = _compiled_editor(work, tmp, rec, (2,))
    x, t, ctx = _guided_inputs(ed, work)
    unet = ed.model.unet
    with torch.inference_mode():
        rec["compile_bucket2_s"] = round(timed(lambda: unet(x, t, ctx))[0], 1)
        rec["guided_steps_per_s"] = round(cuda_rate(lambda: unet(x, t, ctx), work.replay_iters), 2)
        x1, t1, ctx1 = _guided_inputs(ed, work, batch=1)
        rec["unguided_batch1_padded_steps_per_s"] = round(cuda_rate(lambda: unet(x1, t1, ctx1), work.replay_iters), 2)
    _edit_rows(ed, work, {"default N=1": ([PAIR], {}), "compat": ([PAIR], {"compat": "diffusers"})}, rec,
               syncs=False)
    rec["dynamo"] = _dynamo_counters()
    rec["vae_fp32_fallbacks_total"] = getattr(ed.model.vae, "fallbacks", 0)


def stage_bucket2(rec: Rec, work: Work, tmp: Path):
    ed, torch = _compiled_editor(work, tmp, rec, (2, 4))
    unet = ed.model.unet
    with torch.inference_mode():
        x, t, ctx = _guided_inputs(ed, work)
        rec["warm_compile_bucket2_s"] = round(timed(lambda: unet(x, t, ctx))[0], 1)
        x4, t4, ctx4 = _guided_inputs(ed, work, batch=4)
        rec["cold_compile_bucket4_s"] = round(timed(lambda: unet(x4, t4, ctx4))[0], 1)
        rec["batch4_calls_per_s"] = round(cuda_rate(lambda: unet(x4, t4, ctx4), work.replay_iters), 2)
    _edit_rows(ed, work, {"1-pair": ([PAIR], {}), "3-pair fused": (PAIRS3, {})}, rec, syncs=False)
    one, three = rec.data["1-pair"]["median_s"], rec.data["3-pair fused"]["median_s"]
    rec["fused3_over_1pair"] = round(three / one, 3)
    rec["dynamo"] = _dynamo_counters()


def _patched_compile_rate(unet, x, t, ctx, inductor_cfg: dict, iters: int):
    """Compile seconds and guided steps/s of the UNet compiled under inductor options (CUDA graphs on CUDA)."""
    import torch
    import torch._inductor.config as ic

    from diffedit_engine.engine.runtime import UNetRunner

    torch._dynamo.reset()
    cuda = torch.cuda.is_available()
    with ic.patch(inductor_cfg):
        fn = torch.compile(unet, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
        run = UNetRunner(unet, fn, channels_last=cuda, cudagraphs=cuda)
        compile_s = timed(lambda: run(x, t, ctx))[0]
        return dict(compile_s=round(compile_s, 1), guided_steps_per_s=round(cuda_rate(lambda: run(x, t, ctx), iters), 2))


def stage_tune(rec: Rec, work: Work, tmp: Path):
    """Inductor options against the engine's default compile, one guided step (batch 2) each; every variant is
    a fresh compile (torch._dynamo.reset), so the cache does not carry one variant's code into another."""
    import torch

    ed, _ = _editor(work, tmp, compile=False)
    if torch.cuda.is_available():
        ed.base.unet.to(memory_format=torch.channels_last)
    x, t, ctx = _guided_inputs(ed, work)
    variants = {"default": {}, "conv_1x1_as_mm": {"conv_1x1_as_mm": True},
                "coordinate_descent_tuning": {"coordinate_descent_tuning": True},
                "max_autotune_gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"}}
    iters = work.replay_iters
    with torch.inference_mode():
        for name, cfg in variants.items():
            try:
                rec[name] = _patched_compile_rate(ed.base.unet, x, t, ctx, cfg, iters)
            except Exception as e:
                rec[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def stage_vae(rec: Rec, work: Work, tmp: Path):
    """VAE decode (the 512² image of a 64² latent) eager and compiled, NCHW and channels_last."""
    import torch

    ed, _ = _editor(work, tmp, compile=False)
    vae = ed.base.vae
    device, dtype = _torch_device()
    lat = work.size // 8
    with torch.inference_mode():
        z = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        iters = 10 if torch.cuda.is_available() else 1
        for fmt in ("nchw", "channels_last"):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            vae.to(memory_format=mf)
            zz = z.contiguous(memory_format=mf)
            rec[f"decode eager {fmt}"] = dict(per_s=round(cuda_rate(lambda: vae.decode(zz), iters), 2))
            torch._dynamo.reset()
            dec = torch.compile(vae.decode, fullgraph=True, dynamic=False)
            try:
                c = timed(lambda: dec(zz))[0]
                rec[f"decode compiled {fmt}"] = dict(compile_s=round(c, 1),
                                                     per_s=round(cuda_rate(lambda: dec(zz), iters), 2))
            except Exception as e:
                rec[f"decode compiled {fmt}"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _sdxl_folder(work: Work, tmp: Path) -> Path:
    """The tiny SD-XL test folder (dry run) or the real-shape fp16 one, built on the GPU on first need."""
    if work.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_sdxl

        folder = tmp / "tiny-sdxl"
        return folder if (folder / "model_index.json").exists() else tiny_sdxl.make_folder(folder)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_model

    return make_model.ensure("sdxl", make_model.DEFAULT_ROOT / "sdxl-fp16", device="cuda", dtype="float16")


def stage_sdxl(rec: Rec, work: Work, tmp: Path):
    import dataclasses

    import torch

    from diffedit_engine.engine.runtime import Editor, EditorOptions
    from diffedit_engine.weights import load_model

    t0 = time.perf_counter()
    folder = _sdxl_folder(work, tmp)
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    device, dtype = _torch_device()
    t0 = time.perf_counter()
    m = load_model(folder, device=device, dtype=dtype)  # SD-XL fp16: the VAE in fp32 (force_upcast)
    # The dry run stays eager: compiling even the tiny SD-XL UNet on 2 CPU cores takes minutes per bucket.
    ed = Editor(m, EditorOptions(compile=not work.tiny, max_batch=4, buckets=(1, 2, 4)))
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    rec["editor"] = ed.info
    xl = dataclasses.replace(work, size=64 if work.tiny else 1024)
    lat = xl.size // 8
    with torch.inference_mode():  # inputs as the editing path makes them (see _guided_inputs)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
        ctx, pooled = m.encode_prompt(["", PAIR[1]])
        ids = torch.tensor([[xl.size, xl.size, 0, 0, xl.size, xl.size]], device=device, dtype=torch.float32)
        t = torch.tensor(500, device=device)
        unet = ed.model.unet
        rec["compile_bucket2_s"] = round(timed(lambda: unet(x, t, ctx, pooled, ids))[0], 1)
        rec["guided_steps_per_s"] = round(cuda_rate(lambda: unet(x, t, ctx, pooled, ids), xl.replay_iters), 2)
    rec["target_guided_steps_per_s"] = 20.0
    _edit_rows(ed, xl, {"SD-XL N=1": ([PAIR], {}), "SD-XL N=3": (PAIRS3, {})}, rec, syncs=False)
    rec["dynamo"] = _dynamo_counters()
    rec["vae_fp32_fallbacks_total"] = getattr(ed.model.vae, "fallbacks", 0)



def _sd3_folder(work: Work, tmp: Path) -> Path:
    """The tiny SD 3.5 Medium test folder without T5 (dry run) or the real-shape bf16 one, built on first need."""
    if work.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_sd3

        folder = tmp / "tiny-sd35m"
        return folder if (folder / "model_index.json").exists() else tiny_sd3.make_folder(folder, "sd3.5-medium", t5=False)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_model

    return make_model.ensure("sd35m", make_model.DEFAULT_ROOT / "sd35m-bfloat16", device="cpu", dtype="bfloat16")


class FlowEdits:
    """regions.edit_many on a loaded flow model behind the Editor's edit(image, pairs, steps=, num_maps=, seed=)
    (what _edit_rows calls), for as long as the Editor does not take flow models."""

    def __init__(self, m):
        self.model = self.base = m

    def edit(self, image, pairs, *, seed=0, **opts):
        import torch

        from diffedit_engine.engine.edit import regions

        with torch.inference_mode():
            return regions.edit_many(self.model, image, pairs, generator=torch.Generator().manual_seed(seed), **opts)


def stage_sd3(rec: Rec, work: Work, tmp: Path):
    import dataclasses

    import torch

    from diffedit_engine.engine.runtime import Editor, EditorOptions
    from diffedit_engine.weights import load_model

    t0 = time.perf_counter()
    folder = _sd3_folder(work, tmp)
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 matmuls on a CPU are slow, not the point
    t0 = time.perf_counter()
    m = load_model(folder, device=device, dtype=dtype)
    try:  # compiled with CUDA graphs when the Editor compiles the transformer (the dry run stays eager)
        ed = Editor(m, EditorOptions(compile=not work.tiny, max_batch=4, buckets=(1, 2, 4)))
        rec["editor"] = ed.info
        call = ed.model.transformer if hasattr(ed.model, "transformer") else m.transformer
    except Exception as e:  # the runtime wraps m.unet only: eager, through the call the Editor would make
        ed, call = FlowEdits(m), m.transformer
        rec["editor"] = f"regions.edit_many, eager (the Editor refused the flow model: {type(e).__name__}: {str(e)[:160]})"
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    rec["dtype"] = str(dtype).replace("torch.", "")
    size = 64 if work.tiny else 1024
    sd3w = dataclasses.replace(work, size=size)
    lat = size // 8
    with torch.inference_mode():  # inputs as the editing path makes them (see _guided_inputs)
        x = torch.randn(2, 16, lat, lat, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        ctx, pooled = m.encode_prompt(["", PAIR[1]])
        rec["context_tokens"] = ctx.shape[1]
        t = torch.tensor(500.0, device=device)
        rec["first_call_s"] = round(timed(lambda: call(x, t, ctx, pooled))[0], 1)  # the compile, when compiled
        rec["guided_steps_per_s"] = round(cuda_rate(lambda: call(x, t, ctx, pooled), sd3w.replay_iters), 2)
    _edit_rows(ed, sd3w, {"SD3.5M N=1": ([PAIR], {}), "SD3.5M N=3": (PAIRS3, {})}, rec, syncs=False)
    rec["dynamo"] = _dynamo_counters()


# The dry run's FLUX.1-dev: make_model.FLUX_DEV with every width cut (heads of 128 and the rotary axes kept: the
# transformer's shape rules), so the test checks build_flux's folder loads, not only the tiny tests' folders.
def _flux_tiny_spec() -> dict:
    import make_model as mm

    return dict(transformer=dict(mm.FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, num_attention_heads=1,
                                 joint_attention_dim=64, pooled_projection_dim=32),
                vae=dict(mm.FLUX_DEV_VAE, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 16, 16, 16)),
                clip=dict(mm.FLUX_DEV_CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=1, projection_dim=32),
                t5=dict(mm.FLUX_DEV_T5, d_model=64, d_kv=16, d_ff=96, num_heads=4), scheduler=mm.FLUX_DEV_SCHEDULER)


def _flux_folder(work: Work, tmp: Path) -> Path:
    """make_model.build_flux's folder: a tiny spec (dry run) or FLUX.1-dev's shapes in bf16, built on first need."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_model

    if work.tiny:
        return make_model.build_flux(make_model.Options(kind="fluxdev", out=str(tmp / "tiny-fluxdev")), _flux_tiny_spec())
    return make_model.ensure("fluxdev", make_model.DEFAULT_ROOT / "fluxdev-bfloat16", device="cpu", dtype="bfloat16")


def stage_flux(rec: Rec, work: Work, tmp: Path):
    import dataclasses

    import torch

    from diffedit_engine.engine.runtime import Editor, EditorOptions
    from diffedit_engine.weights import load_model

    t0 = time.perf_counter()
    folder = _flux_folder(work, tmp)
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    rec["t5"] = "REDUCED: 2 layers (FLUX.1-dev: 24), vocabulary 128, d_model 4096 (the real context width); random"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 matmuls on a CPU are slow, not the point
    t0 = time.perf_counter()
    m = load_model(folder, device=device, dtype=dtype)
    rec["model"] = dict(kind=m.kind, guidance_embeds=m.guidance_embeds, max_sequence_length=m.max_sequence_length)
    # compiled with CUDA graphs when the Editor compiles the transformer (the dry run stays eager)
    ed = Editor(m, EditorOptions(compile=not work.tiny, max_batch=4, buckets=(1, 2, 4)))
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    rec["editor"] = ed.info
    rec["compiled"] = bool(ed.info.get("compiled"))
    rec["dtype"] = str(dtype).replace("torch.", "")
    size = 64 if work.tiny else 1024
    fw = dataclasses.replace(work, size=size)
    lat = size // 8
    call = ed.model.transformer  # the runner: the compiled graph when compiled
    with torch.inference_mode():  # inputs as the editing path makes them (see _guided_inputs)
        x = torch.randn(1, 16, lat, lat, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        ctx, pooled = m.encode_prompt([PAIR[1]])
        rec["context_tokens"], rec["image_tokens"] = ctx.shape[1], (lat // 2) ** 2
        t = torch.tensor(500.0, device=device)
        g = torch.tensor([3.5], device=device)  # dev's distilled guidance: an input, one sample per prompt
        rec["first_call_s"] = round(timed(lambda: call(x, t, ctx, pooled, g))[0], 1)  # the compile, when compiled
        rec["steps_per_s_batch1"] = round(cuda_rate(lambda: call(x, t, ctx, pooled, g), fw.replay_iters), 2)
    _edit_rows(ed, fw, {"FLUX.1-dev N=1": ([PAIR], {}), "FLUX.1-dev N=3": (PAIRS3, {})}, rec, syncs=False)
    rec["dynamo"] = _dynamo_counters()


def run_stage(name: str, work: Work, out: Path, tmp: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    import torch

    torch.set_grad_enabled(False)
    globals()[f"stage_{name}"](Rec(out), work, tmp)


# ---------------------------------------------------------------- parent side
def _stage_env(name: str, tmp: Path) -> dict:
    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)  # NumPy >= 2.4 breaks Triton 3.6's interpreter: GPU kernels only
    else:
        env["TRITON_INTERPRET"] = "1"
    if name in ("compiled", "bucket2", "tune", "sdxl", "sd3", "flux"):
        env["TORCH_LOGS"] = "recompiles,cudagraphs"
        env["DIFFEDIT_CACHE_DIR"] = str(tmp / "compile-cache")  # empty for `compiled`, warm for `bucket2`
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        env.pop("TRITON_CACHE_DIR", None)
    return env


def spawn(name: str, work: Work, tmp: Path, log, limit: float) -> dict:
    res_path = tmp / f"{name}.json"
    cmd = [sys.executable, __file__, "--stage", name, "--work", json.dumps(asdict(work)), "--res", str(res_path),
           "--tmp", str(tmp)]
    log.write(f"\n===== stage {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    start = log.tell()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_stage_env(name, tmp), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=max(limit, 1))
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"stopped at its limit ({limit:.0f} s); the keys written before are kept"
    log.flush()
    with open(log.name, errors="replace") as f:
        f.seek(start)
        text = f.read()
    data = json.loads(res_path.read_text()) if res_path.exists() else {}
    data["_status"], data["_seconds"] = status, round(time.perf_counter() - t0, 1)
    if name in ("compiled", "bucket2", "sdxl", "sd3", "flux"):
        data["_log_skipping_cudagraphs"] = len(re.findall(r"skipping cudagraphs", text))
        data["_log_recompiles"] = len(re.findall(r"Recompiling function", text))
    if status != "ok":
        data["_error_tail"] = text.strip().splitlines()[-15:]
    print(f"[suite] {name}: {status} in {data['_seconds']} s", flush=True)
    return data


def report(res: dict, work: Work, cmd: str) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_md import table

    st = res["stages"]
    env = st.get("env", {})
    gpu = env.get("gpu") or {}
    lines = [f"## GPU suite (issue 13): {gpu.get('name', 'no GPU')}",
             f"Command: `{cmd}`  ",
             f"Versions: torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, triton "
             f"{env.get('triton')}, transformers {env.get('transformers')}, diffusers {env.get('diffusers')}, NumPy "
             f"{env.get('numpy')}; free memory {env.get('free_gib')} GiB; copy bandwidth {env.get('copy_GBps')} GB/s  ",
             f"Date: {res['date']}. {'The tiny random model (dry run)' if work.tiny else 'Random-weight SD 1.5 (real shapes)'}, fp16, {work.size}², {work.steps} steps, "
             f"{work.maps} maps, median of {work.repeats}.", "",
             table(["stage", "status", "seconds"], [[k, v.get("_status"), v.get("_seconds")] for k, v in st.items()]), ""]
    k = st.get("kernels", {})
    if k.get("tests"):
        lines += [f"Kernel tests on the device: {k['tests']['summary']} (rc {k['tests']['rc']})", ""]
    bench = [v for kk, v in st.get("kbench", {}).items() if kk.startswith("row")]
    if bench:
        bw = env.get("copy_GBps") or float("nan")
        rows = [[r["kernel"], r["shape"], r.get("max_rel_diff"), r.get("triton_GBps"), r.get("eager_GBps"),
                 r.get("compile_GBps"), (r.get("triton_GBps") or float("nan")) / bw] for r in bench]
        lines += [table(["kernel", "shape", "max rel diff", "Triton GB/s", "eager GB/s", "compiled GB/s",
                         "Triton / copy bandwidth"], rows), ""]
    edit_rows = []
    for sname in ("eager", "compiled", "bucket2", "sdxl", "sd3", "flux"):
        for rname, r in st.get(sname, {}).items():
            if isinstance(r, dict) and "median_s" in r:
                edit_rows.append([sname, rname, r["median_s"], r["warmup_s"], r["peak_mib"], r["finite"],
                                  r["vae_fp32_fallbacks"], sum(r.get("host_syncs", {}).values()) if "host_syncs" in r
                                  else "—"])
    if edit_rows:
        lines += ["End-to-end edits:", "", table(["stage", "work", "median s", "warm-up s", "peak MiB", "finite",
                                                  "VAE fp32 fallbacks", "host syncs (whole edit)"], edit_rows), ""]
    syncs = {f"{r}: {site}": n for r, v in st.get("eager", {}).items() if isinstance(v, dict)
             for site, n in v.get("host_syncs", {}).items()}
    if syncs:
        lines += ["Host syncs by site (eager stage, one edit each):", "",
                  table(["site", "count"], [[s, n] for s, n in syncs.items()]), ""]
    sd = {kk: v for kk, v in st.get("sdpa", {}).items() if isinstance(v, dict) and not kk.startswith("_")}
    if sd:
        lines += ["Guided step (UNet batch 2), eager, by SDPA backend:", "",
                  table(["backend", "guided steps/s or error"],
                        [[kk, v.get("guided_steps_per_s", v.get("error"))] for kk, v in sd.items()]), ""]
    c, b = st.get("compiled", {}), st.get("bucket2", {})
    keys = [("compiled", "compile_bucket2_s"), ("compiled", "guided_steps_per_s"),
            ("compiled", "unguided_batch1_padded_steps_per_s"), ("compiled", "_log_skipping_cudagraphs"),
            ("compiled", "_log_recompiles"), ("bucket2", "warm_compile_bucket2_s"), ("bucket2", "cold_compile_bucket4_s"),
            ("bucket2", "batch4_calls_per_s"), ("bucket2", "fused3_over_1pair"), ("bucket2", "_log_skipping_cudagraphs")]
    vals = [[f"{s}: {kk}", (c if s == "compiled" else b).get(kk, "—")] for s, kk in keys]
    lines += ["Compiled (CUDA graphs):", "", table(["figure", "value"], vals)]
    xl = st.get("sdxl", {})
    if xl:
        size = 64 if work.tiny else 1024
        lines += ["", f"SD-XL ({'the tiny test model' if work.tiny else 'random weights, real shapes'}, fp16 UNet, "
                      f"fp32 VAE, {size}², {'eager' if work.tiny else 'compiled with CUDA graphs'}):", "",
                  table(["figure", "value"], [[kk, xl.get(kk, "—")] for kk in (
                      "build_s", "load_s", "compile_bucket2_s", "guided_steps_per_s", "target_guided_steps_per_s",
                      "vae_fp32_fallbacks_total", "_log_skipping_cudagraphs", "_log_recompiles")])]
    s3 = st.get("sd3", {})
    if s3:
        size = 64 if work.tiny else 1024
        editor = s3.get("editor")
        how = (editor if isinstance(editor, str) else
               "Editor, " + ("compiled with CUDA graphs" if editor and editor.get("compiled") else "eager"))
        lines += ["", f"SD 3.5 Medium ({'the tiny test model' if work.tiny else 'random weights, real shapes'}, "
                      f"{s3.get('dtype', '?')}, no T5 (zeros in its place), {size}², {how}):", "",
                  table(["figure", "value"], [[kk, s3.get(kk, "—")] for kk in (
                      "build_s", "load_s", "context_tokens", "first_call_s", "guided_steps_per_s",
                      "_log_skipping_cudagraphs", "_log_recompiles")])]
    fx = st.get("flux", {})
    if fx:
        size = 64 if work.tiny else 1024
        how = "Editor, " + ("compiled with CUDA graphs" if fx.get("compiled") else "eager")
        lines += ["", f"FLUX.1-dev ({'the tiny spec of make_model.build_flux' if work.tiny else 'random weights, real shapes'}"
                      f", {fx.get('dtype', '?')}, T5 REDUCED to 2 layers{'' if work.tiny else ' of width 4096'} (one encode per "
                      f"prompt), {size}², guidance 3.5 as an input, batch 1, {how}):", "",
                  table(["figure", "value"], [[kk, fx.get(kk, "—")] for kk in (
                      "build_s", "load_s", "compiled", "context_tokens", "image_tokens", "first_call_s",
                      "steps_per_s_batch1", "_log_skipping_cudagraphs", "_log_recompiles")])]
    for sname, title in (("tune", "Inductor options, guided step (batch 2), compiled with CUDA graphs:"),
                         ("vae", "VAE decode, one image:")):
        rows = [[kk, json.dumps(v)] for kk, v in st.get(sname, {}).items() if not kk.startswith("_")]
        if rows:
            lines += ["", title, "", table(["variant", "figures"], rows)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=False, help="folder for suite.json, suite.log, RESULTS_gpu_suite.md")
    p.add_argument("--tiny", action="store_true", help="dry run: the engine's tiny random model, 64², 4 steps")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in this order")
    p.add_argument("--budget", type=float, default=560, help="seconds for all stages together")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--res", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage:
        return run_stage(a.stage, Work(**json.loads(a.work)), Path(a.res), Path(a.tmp))
    if not a.out:
        p.error("--out is required")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES + TUNING]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES + TUNING)}")
    work = TINY if a.tiny else Work()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="diffedit-gpu-suite-"))
    cmd = "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "work": asdict(work), "stages": {}}
    deadline = time.perf_counter() + a.budget
    with open(out / "suite.log", "a") as log:
        for name in stages:
            left = deadline - time.perf_counter()
            if left < 10:
                res["stages"][name] = {"_status": "skipped: the suite's time budget is spent", "_seconds": 0}
                continue
            res["stages"][name] = spawn(name, work, tmp, log, min(LIMITS[name], left))
            (out / "suite.json").write_text(json.dumps(res, indent=1, default=str))
            (out / "RESULTS_gpu_suite.md").write_text(
                f"<!-- BEGIN gpu_suite -->\n{report(res, work, cmd)}\n<!-- END gpu_suite -->\n")
    print((out / "RESULTS_gpu_suite.md").read_text())
    return res


if __name__ == "__main__":
    main()
