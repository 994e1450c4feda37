"""SD-XL: the engine against a diffusers reference loop on the same work (issue 12, item 5), CPU, fp32, on the
random-weight SD-XL base folder with the real shapes (benchmarks/make_model.py --kind sdxl, 13.9 GB).

diffusers has no SD-XL DiffEdit pipeline (and the engine's compat="diffusers" mode is SD 1.x/2.x only), so the
reference is a loop written here over diffusers' SD-XL UNet2DConditionModel and AutoencoderKL, DDIMScheduler /
DDIMInverseScheduler and transformers' two CLIP encoders, doing the engine's algorithm step for step:
  1. VAE encode (posterior mean, times the scaling factor 0.13025);
  2. mask: n noise draws of the latent at the encode strength, ONE UNet batch of 2n samples (source, target),
     map = mean over draws and channels of |CFG·(ε_tgt − ε_src)|, diffusers' clamp:3 threshold;
  3. DDIM inversion with ∅ (zeros: force_zeros_for_empty_prompt), unguided, S = int(steps·strength) steps;
  4. masked DDIM decoding with CFG (∅ + target: 2 samples a step), blended after each step with the inverted
     latent at the same level (the last is the clean latent), then the VAE decode.
UNet samples: 2n + S + 2S for both. Every UNet call carries the pooled embedding and time_ids of the image size.

Systems, each in its own fresh process (one ~14 GB model alive at a time on a 24 GiB machine; clean peak RSS):
  engine     engine.pipeline.Editor(compile=False) on one (source, target) pair (regions.edit_many, the path of
             the CLI). Eager only: the engine's CPU compile uses inductor freezing, whose prepacked second copy
             of the 10 GB fp32 UNet does not fit beside the first in 24 GiB.
  diffusers  the reference loop (reference_edit)
Each: load, one untimed warm-up edit with the same shapes (steps=2: pages in every weight), then --repeats
timed edits (wall and process CPU time, UNet samples counted by a forward pre-hook on the UNet module).

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
SYSTEMS = ("diffusers", "engine")


@dataclass(frozen=True)
class Work:
    size: int = 256
    num_maps: int = 2
    steps: int = 10
    strength: float = 0.8
    encode_strength: float = 0.5
    guidance: float = 7.5
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
    c = 3 * diff.mean()                                                   # clamp:3
    mask = (diff.clamp(0, c) / c > 0.5).float()

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
    """(edit(image, steps) -> outputs, the UNet module to count samples on)."""
    ref = Reference(folder)
    return (lambda image, steps: reference_edit(ref, image, PAIR, work, steps)), ref.unet


# ---------------------------------------------------------------- the engine
def engine_system(folder: Path, work: Work):
    sys.path.insert(0, str(ROOT))
    import warnings

    import torch

    from engine import sdxl
    from engine.pipeline import Editor

    warnings.simplefilter("ignore", sdxl.ResolutionWarning)  # a small size is the point here
    ed = Editor.from_pretrained(folder, "cpu", torch.float32, compile=False)
    seen = {}
    decode = ed.model.vae.decode

    def keep_latents(z):  # the decoder's input (unscaled), the same tensor the reference keeps
        seen["latents"] = z.detach().clone()
        return decode(z)

    ed.model.vae.decode = keep_latents

    def edit(image, steps):
        r = ed.edit(image, [PAIR], steps=steps, num_maps=work.num_maps, encode_strength=work.encode_strength,
                    strength=work.strength, guidance_scale=work.guidance, seed=work.seed)
        return {"mask": r.masks[0], "latents": seen["latents"][0], "image": r.image}

    return edit, ed.base.unet


# ---------------------------------------------------------------- child
def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(system: str, folder: Path, work: Work, out: Path) -> dict:
    import torch

    torch.set_grad_enabled(False)
    res = {"system": system}
    t0 = time.perf_counter()
    edit, unet = {"engine": engine_system, "diffusers": diffusers_system}[system](folder, work)
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
    res.update(runs_s=runs, cpu_s=cpus, unet_samples=counts, peak_rss_mib=_vm_hwm_mib())
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
               load_1min=[load0, os.getloadavg()[0]])
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
    ok = [sy for sy in SYSTEMS if res[sy].get("runs_s")]
    for sy in ok:
        res[sy]["median_s"] = statistics.median(res[sy]["runs_s"])
        res[sy]["median_cpu_s"] = statistics.median(res[sy]["cpu_s"])
    if set(ok) == set(SYSTEMS):
        e, d = res["engine"], res["diffusers"]
        s["engine_vs_diffusers_wall"] = d["median_s"] / e["median_s"]
        s["engine_vs_diffusers_cpu_time"] = d["median_cpu_s"] / e["median_cpu_s"]
        s["engine_vs_diffusers_load"] = d["load_s"] / e["load_s"]
        s["peak_rss_engine_over_diffusers"] = e["peak_rss_mib"] / d["peak_rss_mib"]
        s.update(compare_outputs(torch.load(tmp / "engine.pt"), torch.load(tmp / "diffusers.pt")))
    return s


def report(full: dict) -> str:
    from results_md import machine_line, table

    w, res, s = Work(**full["work"]), full["systems"], full["summary"]
    S = int(w.steps * w.strength)
    rows = [[sy, r.get("status", "?")[:60], r.get("load_s", "—"), r.get("warmup_s", "—"), r.get("median_s", "—"),
             r.get("median_cpu_s", "—"), r["unet_samples"][0] if r.get("unet_samples") else "—",
             r["median_s"] / r["unet_samples"][0] if r.get("unet_samples") else "—", r.get("peak_rss_mib", "—"),
             r.get("process_s", "—"), "/".join(f"{v:.1f}" for v in r.get("load_1min", []))]
            for sy, r in res.items()]
    d = full["load_average_during"]
    ratio = lambda k: f"{s[k]:.2f}x" if k in s else "—"  # noqa: E731
    check = ([f"Same-work check (engine against the reference): masks agree on {s['mask_agreement']:.2%} of the "
              f"latent pixels (mask covers {s['mask_fraction']:.1%}); final latents max |Δ| / max |ref| "
              f"{s['latent_max_rel_diff']:.1e}; images max |Δ| {s['image_max_abs_diff']:.1e} "
              f"({s['image_saturated_fraction']:.0%} of the reference's pixels saturated at 0 or 1: random VAE weights)."
              " Equal masks and latents to float rounding show the two loops do the same computation on the same "
              "inputs; on random weights they say nothing about edit quality."] if "mask_agreement" in s else [])
    return "\n".join([
        "## SD-XL engine vs a diffusers reference loop, CPU (issue 12, item 5)",
        f"Command: `{full['command']}`  ",
        f"Machine: {machine_line(full['machine'])}  ",
        f"Date: {full['date']}. Random-weight SD-XL base (real shapes, {full['folder']}), float32, {w.size}x{w.size} "
        f"({w.size // 8}x{w.size // 8} latent), 1 pair, {w.num_maps} maps, {w.steps} steps (strength {w.strength}: "
        f"{S} inversion + {S} decoding steps), mask strength {w.encode_strength}, CFG {w.guidance}; "
        f"{w.repeats} timed run(s) after one untimed warm-up edit (steps=2). The engine: Editor eager (regions."
        f"edit_many); diffusers: the hand-written loop over its SD-XL UNet, VAE and DDIM schedulers "
        f"(benchmarks/sdxl_bench.py). CPU s: process CPU time of a timed run (all threads; OMP_WAIT_POLICY=PASSIVE). "
        f"1-min load sampled every {d['every_s']:.0f} s during the run: min {d['min']:.1f}, median {d['median']:.1f}, "
        f"max {d['max']:.1f}.",
        "",
        table(["system", "status", "load s", "warm-up s", "edit s (median)", "edit CPU s", "UNet samples",
               "s per UNet sample", "peak RSS MiB", "process s", "load avg before/after"], rows),
        "",
        f"Engine over diffusers (higher is better for the engine): wall {ratio('engine_vs_diffusers_wall')}, CPU time "
        f"{ratio('engine_vs_diffusers_cpu_time')}, load {ratio('engine_vs_diffusers_load')}; peak RSS engine/diffusers "
        + (f"{s['peak_rss_engine_over_diffusers']:.2f}." if "peak_rss_engine_over_diffusers" in s else "—."),
        *([""] + check if check else []),
    ])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="SD-XL engine vs a diffusers reference loop, same work (issue 12, item 5)")
    p.add_argument("--size", type=int, default=Work.size)
    p.add_argument("--maps", type=int, default=Work.num_maps)
    p.add_argument("--steps", type=int, default=Work.steps)
    p.add_argument("--repeats", type=int, default=Work.repeats)
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

    work = Work(size=a.size, num_maps=a.maps, steps=a.steps, repeats=a.repeats)
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
