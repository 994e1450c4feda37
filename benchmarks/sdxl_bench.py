"""SD-XL: the engine against a diffusers reference loop on the same work (issue 12, item 5), CPU, fp32, on the
random-weight SD-XL base folder with the real shapes (benchmarks/make_model.py --kind sdxl, 13.9 GB).

diffusers has no SD-XL DiffEdit pipeline (and the engine's compat="diffusers" mode is SD 1.x/2.x only), so the
reference is a loop written here over diffusers' SD-XL UNet2DConditionModel and AutoencoderKL, DDIMScheduler /
DDIMInverseScheduler and transformers' two CLIP encoders, doing the engine's algorithm step for step:
  1. VAE encode (posterior mean, times the scaling factor 0.13025);
  2. mask: n noise draws of the latent at the encode strength, ONE UNet batch of 2n samples (source, target),
     map = mean over draws and channels of |CFG·(ε_tgt − ε_src)|, thresholded by the engine's "median" rule
     (min–max scores above their median: half the latent). Not diffusers' clamp:3 (map > 1.5·mean): on the
     random-weight SD-XL the map is so even that clamp:3 selects no pixel, the decoding's result is then the
     background alone, and the output check below would not see the decoding;
  3. DDIM inversion with ∅ (zeros: force_zeros_for_empty_prompt), unguided, S = int(steps·strength) steps;
  4. masked DDIM decoding with CFG (∅ + target: 2 samples a step), blended after each step with the inverted
     latent at the same level (the last is the clean latent), then the VAE decode.
UNet samples: 2n + S + 2S for both. Every UNet call carries the pooled embedding and time_ids of the image size.

Systems, each in its own fresh process (one ~14 GB model alive at a time on a 24 GiB machine; clean peak RSS):
  diffusers      the reference loop (reference_edit)
  engine         engine.runtime.Editor(compile=False) on one (source, target) pair (regions.edit_many, the path
                 of the CLI). Eager only: the engine's CPU compile uses inductor freezing, whose prepacked second
                 copy of the 10 GB fp32 UNet does not fit beside the first in 24 GiB.
  engine-fused   the same with EditorOptions(fuse_qkv=True) (the fused q/k/v and k/v projections are new
                 tensors beside the file-mapped originals: this row measures what they cost and save on CPU,
                 where the Editor no longer fuses by default: it cost 2.4 GB of peak RSS for no speed)
Each: load, one untimed warm-up edit with the same shapes (steps=2: pages in every weight), then --repeats
timed edits (wall and process CPU time, UNet samples counted by a forward pre-hook on the UNet module), then
the guided step: one UNet call at batch 2 (∅ + target), median of 3 (the UNet alone, same inputs for all).

Check of "the same work": both save the mask, the final latents (the VAE decoder's input) and the image. With
the same weights, noise and algorithm the masks must agree pixel for pixel and the latents to float rounding;
on random weights that is all it proves (the images are noise: nothing about quality).

    python benchmarks/sdxl_bench.py                        # 256², 2 maps, 10 steps; RESULTS.md section sdxl_cpu
    python benchmarks/sdxl_bench.py --size 512 --maps 4 --no-write --json /tmp/sdxl.json
    python benchmarks/sdxl_bench.py --folder TINY_SDXL --size 64 --steps 4 --no-write   # a tiny folder (tests)

Only the standard library is imported at module level: the children import this file.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIR = ("a cat sitting on a sofa", "a dog sitting on a sofa")
SYSTEMS = ("diffusers", "engine", "engine-fused")


@dataclass(frozen=True)
class Work:
    size: int = 256
    num_maps: int = 2
    steps: int = 10
    strength: float = 0.8
    encode_strength: float = 0.5
    guidance: float = 7.5
    threshold: str = "median"      # "median" | "clamp:r" (both implemented by the reference)
    repeats: int = 1
    seed: int = 0

    def unet_samples(self) -> int:
        S = int(self.steps * self.strength)
        return 2 * self.num_maps + S + 2 * S


def load_image(size: int):
    """The test photo, (3, size, size) in [0, 1], made the same way in both children (no engine import)."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(ROOT / "engine" / "data" / "chelsea.png").convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


# ---------------------------------------------------------------- the diffusers reference loop
class Reference:
    """diffusers' SD-XL components loaded from the folder, as their docs load them one by one."""

    def __init__(self, folder: Path):
        import torch
        from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        f32 = torch.float32
        self.tokenizers = (CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                           CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
        self.encoders = (CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=f32).eval(),
                         CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=f32).eval())
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=f32).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=f32).eval()
        # SD-XL base ships an Euler config; DDIM runs from its keys (clip_sample, set_alpha_to_one off)
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        self.inverse = DDIMInverseScheduler.from_config(self.scheduler.config)
        index = json.loads((folder / "model_index.json").read_text())
        self.zeros_for_empty = index.get("force_zeros_for_empty_prompt", True)

    def encode(self, prompts: list):
        """(context (B, 77, 2048), pooled (B, 1280)); ∅ is zeros (force_zeros_for_empty_prompt, as the SD-XL
        pipeline's unconditional embedding)."""
        import torch
        from load_bench import xl_reference_encode

        _, _, ctx, pooled = xl_reference_encode(*self.tokenizers, *self.encoders, prompts)
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts])
            ctx, pooled = ctx.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
        return ctx, pooled

    def eps(self, x, t, ctx, pooled, time_ids):
        return self.unet(x, t, encoder_hidden_states=ctx,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(len(x), 6)}).sample


def threshold_map(diff, rule: str):
    """(h, w) noise-difference map -> binary mask: "median" (min–max scores above their median, the mean of the
    two middle values for an even count) or "clamp:r" (diffusers': clamp(map, 0, r·mean) / (r·mean) > 0.5)."""
    import torch

    if rule == "median":
        lo, hi = diff.min(), diff.max()
        s = (diff - lo) / (hi - lo)
        mid = s.flatten().sort().values
        n = mid.numel()
        t = (mid[(n - 1) // 2] + mid[n // 2]) * 0.5
        return (s > t).float()
    name, _, r = rule.partition(":")
    if name != "clamp":
        raise ValueError(f"the reference implements the median and clamp:r rules, not {rule!r}")
    c = float(r) * diff.mean()
    return (torch.minimum(diff.clamp_min(0), c) / c > 0.5).float()


def reference_edit(ref: Reference, image, pair, work: Work, steps: int) -> dict:
    """The engine's DiffEdit (one pair) written over diffusers' modules and schedulers; see the module docstring."""
    import torch

    src, tgt = pair
    n, g = work.num_maps, work.guidance
    sf = ref.vae.config.scaling_factor
    H, W = image.shape[-2:]
    time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)  # uncropped, shown at its own size
    z0 = ref.vae.encode(image[None] * 2 - 1).latent_dist.mean * sf

    # mask: ∅ cancels from CFG(tgt) − CFG(src) = g·(ε_tgt − ε_src), so the batch is [src, tgt] per draw
    sch = ref.scheduler
    sch.set_timesteps(steps)
    t_mask = sch.timesteps[steps - int(steps * work.encode_strength)]
    noise = torch.randn((n, *z0.shape[1:]), generator=torch.Generator().manual_seed(work.seed))
    zt = sch.add_noise(z0.expand(n, -1, -1, -1), noise, t_mask)
    ctx, pooled = ref.encode([src, tgt])
    e = ref.eps(zt.repeat_interleave(2, 0), t_mask, ctx.repeat(n, 1, 1), pooled.repeat(n, 1), time_ids)
    e = e.view(n, 2, *z0.shape[1:])                                        # (draw, [src, tgt], C, h, w)
    diff = (g * (e[:, 1] - e[:, 0])).abs().mean(1).mean(0)                # (h, w)
    mask = threshold_map(diff, work.threshold)

    # inversion: ∅, no guidance, every level kept
    S = int(steps * work.strength)
    ref.inverse.set_timesteps(steps)
    empty_ctx, empty_pooled = ref.encode([""])
    x, levels = z0, []
    for t in ref.inverse.timesteps[:S]:
        x = ref.inverse.step(ref.eps(x, t, empty_ctx, empty_pooled, time_ids), t, x).prev_sample
        levels.append(x)
    background = levels[::-1][1:] + [z0]                                  # the level each decoding step lands on

    # masked decoding: CFG, then the paper's blend with the inverted latent at the same level
    ctx, pooled = ref.encode(["", tgt])
    sch.set_timesteps(steps)
    for i, t in enumerate(sch.timesteps[steps - S:]):
        e = ref.eps(torch.cat([x, x]), t, ctx, pooled, time_ids)
        y = sch.step(e[:1] + g * (e[1:] - e[:1]), t, x).prev_sample
        x = mask * y + (1 - mask) * background[i]
    latents = x / sf
    image = (ref.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    return {"mask": mask, "latents": latents[0], "image": image[0]}


def diffusers_system(folder: Path, work: Work):
    """(edit(image, steps) -> outputs, the UNet module to count samples on, step(x, t): one guided UNet call)."""
    import torch

    ref = Reference(folder)
    ctx, pooled = ref.encode(["", PAIR[1]])
    time_ids = torch.tensor([[work.size, work.size, 0, 0, work.size, work.size]], dtype=torch.float32)
    return ((lambda image, steps: reference_edit(ref, image, PAIR, work, steps)), ref.unet,
            lambda x, t: ref.eps(x, t, ctx, pooled, time_ids))


# ---------------------------------------------------------------- the engine
def engine_system(folder: Path, work: Work, fuse_qkv: bool | None = None):
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    import warnings

    import torch

    from diffedit_engine.engine.models import sdxl
    from diffedit_engine.engine.runtime import Editor

    warnings.simplefilter("ignore", sdxl.ResolutionWarning)  # a small size is the point here
    ed = Editor.from_pretrained(folder, "cpu", torch.float32, compile=False, fuse_qkv=fuse_qkv)
    seen = {}
    decode = ed.model.vae.decode

    def keep_latents(z):  # the decoder's input (unscaled), the same tensor the reference keeps
        seen["latents"] = z.detach().clone()
        return decode(z)

    ed.model.vae.decode = keep_latents

    def edit(image, steps):
        r = ed.edit(image, [PAIR], steps=steps, num_maps=work.num_maps, encode_strength=work.encode_strength,
                    strength=work.strength, guidance_scale=work.guidance, threshold=work.threshold, seed=work.seed,
                    background="latent")  # the reference decodes the whole latent: the same work, the same image
        return {"mask": r.masks[0], "latents": seen["latents"][0], "image": r.image}

    ctx, pooled = ed.model.encode_prompt(["", PAIR[1]])
    time_ids = sdxl.time_ids((work.size, work.size)).expand(2, 6)
    return edit, ed.base.unet, lambda x, t: ed.model.unet(x, t, ctx, text_embeds=pooled, time_ids=time_ids)


# ---------------------------------------------------------------- child
def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


SYSTEM_FNS = {"diffusers": diffusers_system, "engine": engine_system,
              "engine-fused": lambda folder, work: engine_system(folder, work, fuse_qkv=True)}


def run_child(system: str, folder: Path, work: Work, out: Path) -> dict:
    import torch

    torch.set_grad_enabled(False)
    res = {"system": system}
    t0 = time.perf_counter()
    edit, unet, step = SYSTEM_FNS[system](folder, work)
    res["load_s"] = time.perf_counter() - t0
    samples = [0]
    unet.register_forward_pre_hook(lambda mod, args: samples.__setitem__(0, samples[0] + args[0].shape[0]))
    image = load_image(work.size)
    t0 = time.perf_counter()
    edit(image, 2)  # same shapes, fewer steps: every weight paged in, allocator warm
    res["warmup_s"] = time.perf_counter() - t0
    runs, cpus, counts = [], [], []
    for _ in range(work.repeats):
        samples[0] = 0
        c0, t0 = time.process_time(), time.perf_counter()
        outputs = edit(image, work.steps)
        runs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        counts.append(samples[0])
    torch.save({k: v.detach().float() for k, v in outputs.items()}, out.with_suffix(".pt"))
    x = torch.randn(2, 4, work.size // 8, work.size // 8, generator=torch.Generator().manual_seed(0))
    steps_s, steps_cpu = [], []
    for _ in range(3):
        c0, t0 = time.process_time(), time.perf_counter()
        step(x, torch.tensor(500))
        steps_s.append(time.perf_counter() - t0)
        steps_cpu.append(time.process_time() - c0)
    # while the model is alive: private memory, and file pages mapped from the page cache (shared, reclaimable)
    res.update(runs_s=runs, cpu_s=cpus, unet_samples=counts, step_s=steps_s, step_cpu_s=steps_cpu,
               peak_rss_mib=_status_mib("VmHWM"), rss_anon_mib=_status_mib("RssAnon"),
               rss_file_mib=_status_mib("RssFile"))
    out.write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------- parent
def spawn(system: str, folder: Path, work: Work, tmp: Path, timeout: float) -> dict:
    """One fresh process with a time limit; its JSON, wall time, CPU time and the load before/after."""
    out = tmp / f"{system}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_NO_ADVISORY_WARNINGS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    # PASSIVE: idle OpenMP threads sleep, so CPU time counts work, not spinning while other users hold the cores
    cmd = [sys.executable, __file__, "--child", system, "--folder", str(folder), "--work", json.dumps(asdict(work)),
           "--out", str(out)]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with open(tmp / f"{system}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0) if timeout is None else _wait_limited(proc, timeout)
        except TimeoutError:
            return {"system": system, "status": f"stopped at its time limit, {timeout:.0f} s"}
    rc = os.waitstatus_to_exitcode(status)
    res = json.loads(out.read_text()) if rc == 0 and out.exists() else {"system": system}
    res.update(status="ok" if rc == 0 else f"failed (rc {rc}): {(tmp / f'{system}.log').read_text()[-1500:]}",
               process_s=time.perf_counter() - t0, process_cpu_s=usage.ru_utime + usage.ru_stime,
               process_user_s=usage.ru_utime, process_sys_s=usage.ru_stime, major_faults=usage.ru_majflt,
               minor_faults=usage.ru_minflt, load_1min=[load0, os.getloadavg()[0]])
    print(f"[sdxl_bench] {system}: {res['status'][:200]} in {res['process_s']:.0f} s", flush=True)
    return res


def _wait_limited(proc, timeout: float):
    """wait4 on the child (its own rusage) with a time limit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        time.sleep(0.5)
    proc.kill()
    os.wait4(proc.pid, 0)
    raise TimeoutError


def compare_outputs(a: dict, b: dict) -> dict:
    """Engine (a) against the reference (b): mask agreement, latent and image differences."""
    ma, mb = a["mask"], b["mask"]
    return {"mask_agreement": float((ma == mb).float().mean()), "mask_fraction": float(mb.mean()),
            "latent_max_rel_diff": float((a["latents"] - b["latents"]).abs().max() / b["latents"].abs().max()),
            "image_max_abs_diff": float((a["image"] - b["image"]).abs().max()),
            "image_saturated_fraction": float(((b["image"] == 0) | (b["image"] == 1)).float().mean())}


def summarise(res: dict, tmp: Path) -> dict:
    import statistics

    import torch

    s = {}
    ok = [sy for sy in SYSTEMS if res.get(sy, {}).get("runs_s")]  # --systems may run a subset
    for sy in ok:
        res[sy]["median_s"] = statistics.median(res[sy]["runs_s"])
        res[sy]["median_cpu_s"] = statistics.median(res[sy]["cpu_s"])
    for sy in ok:
        res[sy]["step_median_s"] = statistics.median(res[sy]["step_s"])
        res[sy]["step_median_cpu_s"] = statistics.median(res[sy]["step_cpu_s"])
    if "diffusers" not in ok:
        return s
    d = res["diffusers"]
    for sy in (sy for sy in ok if sy != "diffusers"):
        e, k = res[sy], sy.replace("-", "_")
        s[k] = {"wall": d["median_s"] / e["median_s"], "cpu_time": d["median_cpu_s"] / e["median_cpu_s"],
                "load": d["load_s"] / e["load_s"], "guided_step_cpu_time": d["step_median_cpu_s"] / e["step_median_cpu_s"],
                "peak_rss_over_diffusers": e["peak_rss_mib"] / d["peak_rss_mib"],
                **compare_outputs(torch.load(tmp / f"{sy}.pt"), torch.load(tmp / "diffusers.pt"))}
    return s


def report(full: dict) -> str:
    from results_md import machine_line, table

    w, res, s = Work(**full["work"]), full["systems"], full["summary"]
    S = int(w.steps * w.strength)
    dash = lambda r, k: r.get(k, "—")  # noqa: E731
    rows = [[sy, r.get("status", "?")[:60], dash(r, "load_s"), dash(r, "warmup_s"), dash(r, "median_s"),
             dash(r, "median_cpu_s"), r["unet_samples"][0] if r.get("unet_samples") else "—",
             r["median_cpu_s"] / r["unet_samples"][0] if r.get("unet_samples") else "—", dash(r, "step_median_s"),
             dash(r, "step_median_cpu_s"), dash(r, "peak_rss_mib"),
             f"{r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f}" if "rss_anon_mib" in r else "—",
             f"{r['process_user_s']:.0f} / {r['process_sys_s']:.0f}" if "process_user_s" in r else "—",
             dash(r, "major_faults"), "/".join(f"{v:.1f}" for v in r.get("load_1min", []))]
            for sy, r in res.items()]
    ratios = [[sy, f"{v['wall']:.2f}x", f"{v['cpu_time']:.2f}x", f"{v['guided_step_cpu_time']:.2f}x",
               f"{v['load']:.2f}x", f"{v['peak_rss_over_diffusers']:.2f}", f"{v['mask_agreement']:.2%}",
               f"{v['mask_fraction']:.1%}", f"{v['latent_max_rel_diff']:.1e}", f"{v['image_max_abs_diff']:.1e}"]
              for sy, v in s.items()]
    d = full["load_average_during"]
    return "\n".join([
        "## SD-XL engine vs a diffusers reference loop, CPU (issue 12, item 5)",
        f"Command: `{full['command']}`  ",
        f"Machine: {machine_line(full['machine'])}  ",
        f"Date: {full['date']}. Random-weight SD-XL base (real shapes, {full['folder']}), float32, {w.size}x{w.size} "
        f"({w.size // 8}x{w.size // 8} latent), 1 pair, {w.num_maps} maps, {w.steps} steps (strength {w.strength}: "
        f"{S} inversion + {S} decoding steps), mask strength {w.encode_strength}, CFG {w.guidance}, threshold "
        f"{w.threshold}; {w.repeats} timed run(s) after one untimed warm-up edit (steps=2). The engine: Editor eager "
        f"(regions.edit_many); diffusers: the hand-written loop over its SD-XL UNet, VAE and DDIM schedulers "
        f"(benchmarks/sdxl_bench.py). CPU s: process CPU time of a timed run (all threads; OMP_WAIT_POLICY=PASSIVE). "
        f"Guided step: one UNet call at batch 2 after the edits, median of 3. 1-min load sampled every "
        f"{d['every_s']:.0f} s during the run: min {d['min']:.1f}, median {d['median']:.1f}, max {d['max']:.1f}.",
        "",
        table(["system", "status", "load s", "warm-up s", "edit s", "edit CPU s", "UNet samples",
               "CPU s per UNet sample", "guided step s", "guided step CPU s", "peak RSS MiB",
               "RSS MiB private / page cache", "process user / sys CPU s", "major faults", "load avg before/after"],
              rows),
        "",
        "Each engine row over diffusers (speed: higher is better for the engine; RSS: lower is) and the same-work "
        "check against the reference's outputs (mask agreement over the latent pixels, the reference mask's size, "
        "final latents max |Δ| / max |ref|, images max |Δ|). Equal masks and latents to float rounding show both "
        "loops do the same computation on the same inputs; on random weights they say nothing about edit quality.",
        "",
        table(["system", "edit wall", "edit CPU time", "guided step CPU time", "load", "peak RSS / diffusers",
               "mask agreement", "mask size", "latent rel diff", "image max diff"], ratios),
    ])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="SD-XL engine vs a diffusers reference loop, same work (issue 12, item 5)")
    p.add_argument("--size", type=int, default=Work.size)
    p.add_argument("--maps", type=int, default=Work.num_maps)
    p.add_argument("--steps", type=int, default=Work.steps)
    p.add_argument("--repeats", type=int, default=Work.repeats)
    p.add_argument("--threshold", default=Work.threshold, help="mask rule: median | clamp:r")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--folder", default="", help="SD-XL folder (default: make_model.py --kind sdxl's build)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sdxl_cpu.json"))
    p.add_argument("--section", default="sdxl_cpu")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--from-json", default="", help="re-render a finished run's JSON (and write its section)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return run_child(a.child, Path(a.folder), Work(**json.loads(a.work)), Path(a.out))

    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_model
    from results_md import LoadSampler, dump_json, machine, write_section

    if a.from_json:
        full = json.loads(Path(a.from_json).read_text())
        md = report(full)
        print(md)
        if not a.no_write:
            write_section(a.section, md)
        return full

    work = Work(size=a.size, num_maps=a.maps, steps=a.steps, repeats=a.repeats, threshold=a.threshold)
    folder = Path(a.folder) if a.folder else make_model.ensure("sdxl")
    tmp = Path(tempfile.mkdtemp(prefix="sdxl-bench-"))
    full = {"command": "python benchmarks/sdxl_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "folder": str(folder), "work": asdict(work),
            "tmp": str(tmp), "expected_unet_samples": work.unet_samples()}
    sampler = LoadSampler()
    full["systems"] = {sy: spawn(sy, folder, work, tmp, a.timeout) for sy in a.systems.split(",")}
    full["load_average_during"] = sampler.stop()
    full["summary"] = summarise(full["systems"], tmp)
    full["machine"] = machine()
    dump_json(full, Path(a.json))
    md = report(full)
    print(md)
    if not a.no_write:
        write_section(a.section, md)
    return full


if __name__ == "__main__":
    main()
