"""SD 3.5 Medium on a CPU: the engine against diffusers (issue 21, item 6), fp32, on the random-weight SD 3.5 Medium
folder with the real shapes and no T5 (benchmarks/make_model.py --kind sd35m, 13.5 GB; T5-XXL would add 19 GB in
fp32, 9.5 GB in bf16: it is left out, and both sides put zeros in its place as StableDiffusion3Pipeline does).

Three parts, every side in its own fresh process (one ~10 GB fp32 transformer alive at a time on a 24 GiB
machine; clean peak RSS):
  parity  one transformer forward at a 64x64 latent (batch 2, 1024 image + 333 text tokens), the engine's
          m.transformer against diffusers' SD3Transformer2DModel from the same folder, on diffusers' prompt
          embedding (so the transformer is compared alone); the engine's m.encode_prompt against it too.
          max |Δ| / max |ref| and max |Δ|.
  cold    a fresh process from spawn to the first transformer output (imports, load, tokenize + encode one
          prompt, one forward at a 32x32 latent): the engine's load_model against diffusers' components loaded one
          by one (CLIPTokenizer x2, CLIPTextModelWithProjection x2, SD3Transformer2DModel, AutoencoderKL) and
          against StableDiffusion3Pipeline.from_pretrained + its encode_prompt; median of --runs after one
          untimed run (warm page cache); peak RSS. Target: >= 1.5x the components script, peak RSS no higher.
  edit    the same work: the engine (the Editor when it takes a flow model, else regions.edit_many: the path is
          recorded) against a loop written here over diffusers' SD3Transformer2DModel, AutoencoderKL,
          FlowMatchEulerDiscreteScheduler and transformers' CLIP encoders, doing engine/edit/flow.py step for step:
            1. VAE encode: z0 = (posterior mean − shift 0.0609) · scale 1.5305;
            2. mask: n draws x_r = (1 − r) z0 + r ε (scheduler.scale_noise) at the σ where the run from the
               encode strength starts, ONE transformer batch of 2n samples ([source, target] per draw), map =
               mean over draws and channels of |g·(v_tgt − v_src)|, thresholded by the "median" rule;
            3. inversion: the flow ODE from z0 up the σ grid the decoder walks down (x += (σ_up − σ)·v(x, t_up)),
               "" (SD 3 encodes it like any prompt), unguided, every level kept;
            4. masked Euler decoding (scheduler.step) with CFG ("" + target: 2 samples a step), blended after each
               step with the inverted latent at the same level, then the VAE decode of z / scale + shift.
          Transformer samples, both: 2n + S + 2S (S = steps − int(steps − steps·strength), SD 3's img2img rule).
          Each: load, one untimed warm-up edit (steps=2: pages every weight in), --repeats timed edits (wall and
          process CPU time), then the guided step: one transformer call at batch 2, median of --step-repeats.
          Check of the same work: masks equal pixel for pixel, final latents (the VAE decoder's input) and images
          to float rounding. On random weights that is all it proves (the images are noise).

    python benchmarks/sd3_bench.py                          # 256², 2 maps, 6 steps; RESULTS.md section sd3_cpu
    python benchmarks/sd3_bench.py --parts edit --size 512 --no-write --json /tmp/sd3.json
    python benchmarks/sd3_bench.py --folder TINY --size 64 --steps 2 --no-write   # a tiny SD3 folder (tests)

Only the standard library is imported at module level: the children import this file, and their import cost
is part of what the cold start measures.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from sdxl_bench import _status_mib, _wait_limited, compare_outputs, load_image, threshold_map  # noqa: E402

PAIR = ("a cat sitting on a sofa", "a dog sitting on a sofa")
PROMPT = "a photograph of an astronaut riding a horse"
EDIT_SYSTEMS = ("diffusers", "engine")
COLD = ("engine", "diffusers", "diffusers-pipeline")


@dataclass(frozen=True)
class Work:
    size: int = 256
    num_maps: int = 2
    steps: int = 6
    strength: float = 0.8
    encode_strength: float = 0.5
    guidance: float = 7.0          # StableDiffusion3Pipeline's default
    threshold: str = "median"      # on random weights clamp:3 may select nothing (see sdxl_bench.py)
    repeats: int = 1
    step_repeats: int = 3
    seed: int = 0
    parity_latent: int = 64
    cold_latent: int = 32

    def decode_steps(self, steps: int | None = None) -> int:
        steps = self.steps if steps is None else steps
        return steps - int(max(steps - min(steps * self.strength, steps), 0))

    def samples(self, steps: int | None = None) -> int:
        S = self.decode_steps(steps)
        return 2 * self.num_maps + S + 2 * S


# ---------------------------------------------------------------- the diffusers side
def _hook_samples(module, counter: list) -> None:
    """Count the samples of every forward of `module` (hidden states positional or by keyword)."""
    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        counter[0] += x.shape[0]
    module.register_forward_pre_hook(pre, with_kwargs=True)


def clip_components(folder: Path):
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    f32 = torch.float32
    return (CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", dtype=f32).eval(),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=f32).eval())


def reference_encode(tok, tok_2, te, te_2, prompts: list, joint_dim: int, max_sequence_length: int = 256):
    """SD 3's prompt embedding without T5, as StableDiffusion3Pipeline.encode_prompt makes it: both CLIPs'
    penultimate states side by side (768 + 1280), zero-padded to T5's width, then T5's place as zeros
    (max_sequence_length tokens); pooled = both projected pooled outputs. Returns (ids, ids_2, context, pooled)."""
    import torch
    import torch.nn.functional as F

    def run(tok, te):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        return ids, out.hidden_states[-2], out.text_embeds

    i1, h1, p1 = run(tok, te)
    i2, h2, p2 = run(tok_2, te_2)
    clip = F.pad(torch.cat([h1, h2], -1), (0, joint_dim - h1.shape[-1] - h2.shape[-1]))
    t5 = torch.zeros(len(prompts), max_sequence_length, joint_dim)
    return i1, i2, torch.cat([clip, t5], 1), torch.cat([p1, p2], -1)


class Reference:
    """diffusers' SD 3 components loaded from the folder, as their docs load them one by one."""

    def __init__(self, folder: Path):
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        folder = Path(folder)
        self.clip = clip_components(folder)
        self.transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")

    def encode(self, prompts: list):
        return reference_encode(*self.clip, prompts, self.transformer.config.joint_attention_dim)[2:]

    def velocity(self, x, t, ctx, pooled):
        return self.transformer(x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                timestep=t.expand(len(x))).sample


def reference_edit(ref: Reference, image, pair, work: Work, steps: int) -> dict:
    """engine/edit/flow.py's DiffEdit (one pair) over diffusers' modules and scheduler; see the module docstring."""
    import torch

    src, tgt = pair
    n, g = work.num_maps, work.guidance
    sf, sh = ref.vae.config.scaling_factor, ref.vae.config.shift_factor
    z0 = (ref.vae.encode(image[None] * 2 - 1).latent_dist.mean - sh) * sf
    sch = ref.scheduler

    # mask: the σ where a run from encode_strength starts; [src, tgt] per draw (CFG's "" cancels: g·(v_t − v_s))
    sch.set_timesteps(steps)
    k = int(max(steps - min(steps * work.encode_strength, steps), 0))
    t_mask = sch.timesteps[k]
    noise = torch.randn((n, *z0.shape[1:]), generator=torch.Generator().manual_seed(work.seed))
    zr = sch.scale_noise(z0.expand(n, -1, -1, -1), t_mask[None], noise)
    ctx, pooled = ref.encode([src, tgt])
    v = ref.velocity(zr.repeat_interleave(2, 0), t_mask, ctx.repeat(n, 1, 1), pooled.repeat(n, 1))
    v = v.view(n, 2, *z0.shape[1:])
    mask = threshold_map((g * (v[:, 1] - v[:, 0])).abs().mean(1).mean(0), work.threshold)

    # inversion: the decoder's steps reversed, each with the timestep of the level it climbs to; "", unguided
    S = work.decode_steps(steps)
    sig = sch.sigmas
    ctx_e, pooled_e = ref.encode([""])
    x, levels = z0, []
    for i in reversed(range(steps - S, steps)):
        v = ref.velocity(x, sch.timesteps[i], ctx_e, pooled_e)
        x = (x.float() + (sig[i] - sig[i + 1]) * v).to(v.dtype)
        levels.append(x)
    background = levels[::-1][1:] + [z0]

    # masked decoding: CFG, the scheduler's Euler step, then the blend with the inverted latent at the same level
    ctx, pooled = ref.encode(["", tgt])
    sch.set_timesteps(steps)
    sch.set_begin_index(steps - S)
    for i, t in enumerate(sch.timesteps[steps - S:]):
        v = ref.velocity(torch.cat([x, x]), t, ctx, pooled)
        y = sch.step(v[:1] + g * (v[1:] - v[:1]), t, x).prev_sample
        x = mask * y + (1 - mask) * background[i]
    latents = x / sf + sh
    image = (ref.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    return {"mask": mask, "latents": latents[0], "image": image[0]}


def diffusers_system(folder: Path, work: Work):
    """(edit(image, steps) -> outputs, the transformer module, step(x, t): one guided call, note)."""
    ref = Reference(folder)
    ctx, pooled = ref.encode(["", PAIR[1]])
    return ((lambda image, steps: reference_edit(ref, image, PAIR, work, steps)), ref.transformer,
            (lambda x, t: ref.velocity(x, t, ctx, pooled)), "diffusers components, the loop above")


# ---------------------------------------------------------------- the engine side
def _engine():
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)


def engine_system(folder: Path, work: Work):
    """The engine's edit of one pair: the Editor (the CLI's path) when it takes a flow model, else
    regions.edit_many on the loaded model (the path the Editor calls); the one used is returned as the note."""
    _engine()
    import torch

    from diffedit_engine.engine.edit import regions
    from diffedit_engine.weights import load_model

    m = load_model(folder, device="cpu", dtype=torch.float32)
    opts = dict(steps=0, num_maps=work.num_maps, encode_strength=work.encode_strength, strength=work.strength,
                guidance_scale=work.guidance, threshold=work.threshold, background="latent")
    try:
        from diffedit_engine.engine.runtime import Editor, EditorOptions

        ed = Editor(m, EditorOptions(compile=False))
        run = lambda image, o: ed.edit(image, [PAIR], seed=work.seed, **o)  # noqa: E731
        note = "Editor(compile=False)"
    except Exception as e:  # the Editor does not take flow models yet: the call it makes
        run = lambda image, o: regions.edit_many(m, image, [PAIR], generator=torch.Generator().manual_seed(work.seed),  # noqa: E731
                                                 **o)
        note = f"regions.edit_many (the Editor refused the flow model: {type(e).__name__}: {str(e)[:120]})"
    seen, decode = {}, m.vae.decode

    def keep_latents(z):  # the decoder's input (unscaled), the same tensor the reference keeps
        seen["latents"] = z.detach().clone()
        return decode(z)

    m.vae.decode = keep_latents

    def edit(image, steps):
        with torch.inference_mode():
            r = run(image, dict(opts, steps=steps))
        return {"mask": r.masks[0], "latents": seen["latents"][0], "image": r.image}

    ctx, pooled = m.encode_prompt(["", PAIR[1]])
    return edit, m.transformer, (lambda x, t: m.transformer(x, t, ctx, pooled)), note


SYSTEMS = {"diffusers": diffusers_system, "engine": engine_system}


# ---------------------------------------------------------------- children
def child_edit(system: str, folder: Path, work: Work, out: Path) -> dict:
    import torch

    torch.set_grad_enabled(False)
    res = {"system": system}
    t0 = time.perf_counter()
    edit, transformer, step, res["path"] = SYSTEMS[system](folder, work)
    res["load_s"] = time.perf_counter() - t0
    samples = [0]
    _hook_samples(transformer, samples)
    image = load_image(work.size)
    t0 = time.perf_counter()
    edit(image, 2)  # same shapes, two steps (the fewest EditSettings takes): every weight paged in, allocator warm
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
    lat = work.size // 8
    x = torch.randn(2, 16, lat, lat, generator=torch.Generator().manual_seed(0))
    steps_s, steps_cpu = [], []
    for _ in range(work.step_repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        step(x, torch.tensor(500.0))
        steps_s.append(time.perf_counter() - t0)
        steps_cpu.append(time.process_time() - c0)
    res.update(runs_s=runs, cpu_s=cpus, samples=counts, step_s=steps_s, step_cpu_s=steps_cpu,
               peak_rss_mib=_status_mib("VmHWM"), rss_anon_mib=_status_mib("RssAnon"),
               rss_file_mib=_status_mib("RssFile"))
    return res


def parity_inputs(work: Work):
    import torch

    n = work.parity_latent
    x = torch.randn(2, 16, n, n, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([1000.0, 400.0])  # σ·1000: the first level and a middle one


def child_parity_diffusers(folder: Path, work: Work, out: Path) -> dict:
    """Transformers' CLIPs encode [PROMPT, ""], are freed, then diffusers' transformer runs on their embedding."""
    import gc

    import torch
    from diffusers import SD3Transformer2DModel

    torch.set_grad_enabled(False)
    clip = clip_components(folder)
    joint = json.loads((folder / "transformer" / "config.json").read_text())["joint_attention_dim"]
    ids, ids_2, ctx, pooled = reference_encode(*clip, [PROMPT, ""], joint)
    del clip
    gc.collect()
    tr = SD3Transformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32).eval()
    x, t = parity_inputs(work)
    t0 = time.perf_counter()
    v = tr(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    fwd = time.perf_counter() - t0
    torch.save({"ids": ids, "ids_2": ids_2, "context": ctx, "pooled": pooled, "velocity": v}, out.with_suffix(".pt"))
    return {"forward_s": fwd, "peak_rss_mib": _status_mib("VmHWM")}


def child_parity_engine(folder: Path, work: Work, out: Path) -> dict:
    """The engine's tokenizers, m.encode_prompt and m.transformer (on the reference's embedding, read from its file)."""
    _engine()
    import torch

    from diffedit_engine.weights import load_model

    torch.set_grad_enabled(False)
    ref = torch.load(out.with_name("parity-diffusers.pt"))
    m = load_model(folder, device="cpu", dtype=torch.float32)
    ctx, pooled = m.encode_prompt([PROMPT, ""])
    x, t = parity_inputs(work)
    t0 = time.perf_counter()
    v = m.transformer(x, t, ref["context"], ref["pooled"])
    fwd = time.perf_counter() - t0
    torch.save({"ids": m.tokenizer([PROMPT, ""]), "ids_2": m.tokenizer_2([PROMPT, ""]), "context": ctx,
                "pooled": pooled, "velocity": v}, out.with_suffix(".pt"))
    return {"forward_s": fwd, "peak_rss_mib": _status_mib("VmHWM")}


def _cold_inputs(work: Work):
    import torch

    n = work.cold_latent
    return torch.randn(1, 16, n, n, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])


def cold_engine(folder: Path, work: Work, marks: dict) -> dict:
    _engine()
    import torch

    from diffedit_engine.weights import load_model

    marks["imported"] = time.time()
    torch.set_grad_enabled(False)
    m = load_model(folder, device="cpu", dtype=torch.float32)
    marks["loaded"] = time.time()
    ctx, pooled = m.encode_prompt([PROMPT])
    marks["encoded"] = time.time()
    x, t = _cold_inputs(work)
    out = m.transformer(x, t, ctx, pooled)
    marks["forward"] = time.time()
    return {"out_abs_mean": float(out.abs().mean())}


def cold_diffusers(folder: Path, work: Work, marks: dict) -> dict:
    """The same work with the reference libraries, components loaded one by one (their documented way)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    marks["imported"] = time.time()
    torch.set_grad_enabled(False)
    clip = clip_components(folder)
    tr = SD3Transformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).eval()  # noqa: F841 (same load)
    marks["loaded"] = time.time()
    _, _, ctx, pooled = reference_encode(*clip, [PROMPT], tr.config.joint_attention_dim)
    marks["encoded"] = time.time()
    x, t = _cold_inputs(work)
    out = tr(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    marks["forward"] = time.time()
    return {"out_abs_mean": float(out.abs().mean())}


def cold_diffusers_pipeline(folder: Path, work: Work, marks: dict) -> dict:
    """What most users write: StableDiffusion3Pipeline.from_pretrained (without T5), then its encode_prompt."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    marks["imported"] = time.time()
    torch.set_grad_enabled(False)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32, text_encoder_3=None,
                                                    tokenizer_3=None)
    marks["loaded"] = time.time()
    ctx, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu", do_classifier_free_guidance=False)
    marks["encoded"] = time.time()
    x, t = _cold_inputs(work)
    out = pipe.transformer(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    marks["forward"] = time.time()
    return {"out_abs_mean": float(out.abs().mean())}


COLD_FNS = {"engine": cold_engine, "diffusers": cold_diffusers, "diffusers-pipeline": cold_diffusers_pipeline}


def run_child(kind: str, folder: Path, work: Work, out: Path) -> dict:
    if kind.startswith("cold-"):
        t0 = float(os.environ["SD3_BENCH_T0"])
        marks = {}
        res = COLD_FNS[kind[5:]](folder, work, marks)
        res.update({k: v - t0 for k, v in marks.items()}, peak_rss_mib=_status_mib("VmHWM"),
                   rss_anon_mib=_status_mib("RssAnon"), rss_file_mib=_status_mib("RssFile"))
    elif kind.startswith("parity-"):
        res = (child_parity_engine if kind == "parity-engine" else child_parity_diffusers)(folder, work, out)
    else:
        res = child_edit(kind, folder, work, out)
    out.write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------- parent
def spawn(kind: str, folder: Path, work: Work, tmp: Path, timeout: float) -> dict:
    """One fresh process under a time limit: its JSON, wall and CPU time (wait4: this child alone), faults."""
    out = tmp / f"{kind}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_NO_ADVISORY_WARNINGS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--work", json.dumps(asdict(work)),
           "--out", str(out)]
    load0, t0 = os.getloadavg()[0], time.time()
    env["SD3_BENCH_T0"] = repr(t0)
    with open(tmp / f"{kind}.log", "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = _wait_limited(proc, timeout)
        except TimeoutError:
            return {"status": f"stopped at its time limit, {timeout:.0f} s"}
    rc = os.waitstatus_to_exitcode(status)
    res = json.loads(out.read_text()) if rc == 0 and out.exists() else {}
    res.update(status="ok" if rc == 0 else f"failed (rc {rc}): {(tmp / f'{kind}.log').read_text()[-1500:]}",
               process_s=time.time() - t0, process_cpu_s=usage.ru_utime + usage.ru_stime,
               major_faults=usage.ru_majflt, load_1min=[load0, os.getloadavg()[0]])
    print(f"[sd3_bench] {kind}: {res['status'][:300]} in {res['process_s']:.0f} s", flush=True)
    return res


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def run_parity(folder: Path, work: Work, tmp: Path, timeout: float) -> dict:
    import torch

    sides = {s: spawn(f"parity-{s}", folder, work, tmp, timeout) for s in ("diffusers", "engine")}
    out = {"sides": sides, "latent": [2, 16, work.parity_latent, work.parity_latent]}
    if all(s["status"] == "ok" for s in sides.values()):
        ref, eng = torch.load(tmp / "parity-diffusers.pt"), torch.load(tmp / "parity-engine.pt")
        out.update(ids_equal=bool(torch.equal(ref["ids"], eng["ids"]) and torch.equal(ref["ids_2"], eng["ids_2"])),
                   context_rel_err=rel_err(eng["context"], ref["context"]),
                   pooled_rel_err=rel_err(eng["pooled"], ref["pooled"]),
                   transformer_rel_err=rel_err(eng["velocity"], ref["velocity"]),
                   transformer_abs_err=float((eng["velocity"] - ref["velocity"]).abs().max()),
                   velocity_abs_max=float(ref["velocity"].abs().max()),
                   finite=bool(torch.isfinite(eng["velocity"]).all()))
        out["met"] = out["transformer_rel_err"] <= 1e-5 and out["ids_equal"]
    return out


def run_cold(folder: Path, work: Work, tmp: Path, runs: int, variants, timeout: float) -> dict:
    """Interleaved (engine, diffusers, pipeline, engine, ...) after one untimed run each (page cache, .pyc)."""
    for v in variants:
        spawn(f"cold-{v}", folder, work, tmp, timeout)
    samples = {v: [] for v in variants}
    for _ in range(runs):
        for v in variants:
            samples[v].append(spawn(f"cold-{v}", folder, work, tmp, timeout))
    med = statistics.median
    out = {}
    for v, ss in samples.items():
        ok = [s for s in ss if s["status"] == "ok"]
        if not ok:
            out[v] = {"status": ss[0]["status"] if ss else "no timed run"}
            continue
        out[v] = {"status": "ok", "first_output_s": med([s["forward"] for s in ok]),
                  "min_first_output_s": min(s["forward"] for s in ok), "imports_s": med([s["imported"] for s in ok]),
                  "load_s": med([s["loaded"] - s["imported"] for s in ok]),
                  "encode_s": med([s["encoded"] - s["loaded"] for s in ok]),
                  "forward_s": med([s["forward"] - s["encoded"] for s in ok]),
                  "process_cpu_s": med([s["process_cpu_s"] for s in ok]),
                  "peak_rss_mib": med([s["peak_rss_mib"] for s in ok]),
                  "rss_anon_mib": med([s["rss_anon_mib"] for s in ok]),
                  "rss_file_mib": med([s["rss_file_mib"] for s in ok]),
                  "out_abs_mean": ok[0]["out_abs_mean"], "runs": [s["forward"] for s in ok]}
    e, d = out.get("engine", {}), out.get("diffusers", {})
    if e.get("status") == "ok" and d.get("status") == "ok":
        out["speedup"] = d["first_output_s"] / e["first_output_s"]
        out["speedup_cpu_time"] = d["process_cpu_s"] / e["process_cpu_s"]
        out["rss_ratio"] = e["peak_rss_mib"] / d["peak_rss_mib"]
        out["same_output"] = abs(e["out_abs_mean"] / d["out_abs_mean"] - 1) < 1e-4
        out["met"] = out["speedup"] >= 1.5 and out["rss_ratio"] <= 1.0
    return out


def run_edit(folder: Path, work: Work, tmp: Path, timeout: float) -> dict:
    import torch

    res = {sy: spawn(sy, folder, work, tmp, timeout) for sy in EDIT_SYSTEMS}
    for r in res.values():
        if r.get("runs_s"):
            r.update(median_s=statistics.median(r["runs_s"]), median_cpu_s=statistics.median(r["cpu_s"]),
                     step_median_s=statistics.median(r["step_s"]), step_median_cpu_s=statistics.median(r["step_cpu_s"]))
    out = {"systems": res, "expected_samples": work.samples()}
    d, e = res["diffusers"], res["engine"]
    if d.get("runs_s") and e.get("runs_s"):
        out["summary"] = {"wall": d["median_s"] / e["median_s"], "cpu_time": d["median_cpu_s"] / e["median_cpu_s"],
                          "guided_step_cpu_time": d["step_median_cpu_s"] / e["step_median_cpu_s"],
                          "guided_step_wall": d["step_median_s"] / e["step_median_s"],
                          "load": d["load_s"] / e["load_s"], "peak_rss_over_diffusers": e["peak_rss_mib"] / d["peak_rss_mib"],
                          **compare_outputs(torch.load(tmp / "engine.pt"), torch.load(tmp / "diffusers.pt"))}
        s = out["summary"]
        s["same_work"] = (s["mask_agreement"] == 1.0 and s["latent_max_rel_diff"] < 1e-3
                          and d["samples"][0] == e["samples"][0] == work.samples())
        s["met"] = s["cpu_time"] >= 1.0
    return out


def report(full: dict) -> str:
    from results_md import machine_line, table

    w = Work(**full["work"])
    S = w.decode_steps()
    f = lambda v, fmt="{:.2e}": "—" if v is None else fmt.format(v)  # noqa: E731
    parts = ["## SD 3.5 Medium engine vs diffusers, CPU (issue 21, item 6)",
             f"Command: `{full['command']}`  ",
             f"Machine: {machine_line(full['machine'])}  ",
             f"Date: {full['date']}. Random-weight SD 3.5 Medium (real shapes: MMDiT-X 24 blocks, 13 dual-attention, "
             f"QK RMSNorm, 2.47e9 parameters; CLIP-L and CLIP-G; 16-channel VAE) from `{full['folder']}`, float32, "
             f"**without T5-XXL** (4.7e9 parameters, 19 GB in fp32, 9.5 GB in bf16, would not fit beside the "
             f"transformer on a 24 GiB machine shared with other jobs): both sides put zeros in T5's 256 tokens, as "
             f"StableDiffusion3Pipeline does without text_encoder_3, so the transformer sees the full 77 + 256 token "
             f"context. Each side in its own fresh process. 1-min load sampled every "
             f"{full['load_average_during']['every_s']:.0f} s during the run: min {full['load_average_during']['min']:.1f}, "
             f"median {full['load_average_during']['median']:.1f}, max {full['load_average_during']['max']:.1f} "
             f"(the machine is shared: CPU times are the figures to read, wall times are noisy)."]
    p = full.get("parity")
    if p:
        sd = p["sides"]
        parts += ["", f"Parity: one transformer forward at a {w.parity_latent}x{w.parity_latent} latent, batch 2 (σ·1000 = "
                  "1000 and 400), on diffusers' prompt embedding of [prompt, \"\"]; max |Δ| / max |ref| (target ≤ 1e-5):", "",
                  table(["transformer rel err", "transformer max abs err (max abs velocity)", "context rel err",
                         "pooled rel err", "token ids equal", "forward s engine / diffusers",
                         "peak RSS MiB engine / diffusers", "target"],
                        [[f(p.get("transformer_rel_err")),
                          f"{f(p.get('transformer_abs_err'))} ({f(p.get('velocity_abs_max'), '{:.3g}')})",
                          f(p.get("context_rel_err")), f(p.get("pooled_rel_err")), p.get("ids_equal", "—"),
                          f"{f(sd['engine'].get('forward_s'), '{:.1f}')} / {f(sd['diffusers'].get('forward_s'), '{:.1f}')}",
                          f"{f(sd['engine'].get('peak_rss_mib'), '{:.0f}')} / {f(sd['diffusers'].get('peak_rss_mib'), '{:.0f}')}",
                          "met" if p.get("met") else "MISSED"]])]
    c = full.get("cold")
    if c:
        rows = [[v, r.get("status", "?")[:40], *(r.get(k, "—") for k in (
                 "first_output_s", "min_first_output_s", "imports_s", "load_s", "encode_s", "forward_s",
                 "process_cpu_s", "peak_rss_mib")),
                 f"{r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f}" if "rss_anon_mib" in r else "—"]
                for v, r in c.items() if isinstance(r, dict)]
        parts += ["", f"Cold start: a fresh process from spawn to the first transformer output ({w.cold_latent}x"
                  f"{w.cold_latent} latent, one prompt), median of {full['runs']} run(s) after one untimed run each "
                  "(page cache warm); phases are medians too:", "",
                  table(["script", "status", "first output s", "min s", "imports s", "load s", "tokenize+encode s",
                         "forward s", "process CPU s", "peak RSS MiB", "RSS at the output MiB: private / page cache"],
                        rows)]
        if "speedup" in c:
            parts += ["", table(["speed-up over the components script (wall)", "process CPU time ratio",
                                 "peak RSS engine / diffusers", "same output", "target ≥ 1.5x, RSS ≤ 1"],
                                [[f"{c['speedup']:.2f}x", f"{c['speedup_cpu_time']:.2f}x", f"{c['rss_ratio']:.2f}",
                                  c["same_output"], "met" if c["met"] else "MISSED"]])]
    e = full.get("edit")
    if e:
        rows = [[sy, r.get("status", "?")[:40], r.get("path", "—")[:90], *(r.get(k, "—") for k in (
                 "load_s", "warmup_s", "median_s", "median_cpu_s")),
                 r["samples"][0] if r.get("samples") else "—",
                 r["median_cpu_s"] / r["samples"][0] if r.get("samples") else "—",
                 r.get("step_median_s", "—"), r.get("step_median_cpu_s", "—"), r.get("peak_rss_mib", "—"),
                 f"{r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f}" if "rss_anon_mib" in r else "—",
                 "/".join(f"{v:.1f}" for v in r.get("load_1min", []))]
                for sy, r in e["systems"].items()]
        parts += ["", f"Same-work edit: {w.size}x{w.size} ({w.size // 8}x{w.size // 8} latent, {(w.size // 16) ** 2} "
                  f"image tokens), 1 pair, {w.num_maps} maps, {w.steps} steps (strength {w.strength}: {S} inversion + "
                  f"{S} decoding steps), mask strength {w.encode_strength}, CFG {w.guidance}, threshold {w.threshold}; "
                  f"{w.repeats} timed run(s) after one untimed warm-up edit (steps=2). Transformer samples: "
                  f"{e['expected_samples']} expected (2n + S + 2S). Guided step: one transformer call at batch 2, "
                  f"median of {w.step_repeats}. CPU s: process CPU time (all threads; OMP_WAIT_POLICY=PASSIVE).", "",
                  table(["system", "status", "path", "load s", "warm-up s", "edit s", "edit CPU s",
                         "transformer samples", "CPU s per sample", "guided step s", "guided step CPU s",
                         "peak RSS MiB", "RSS MiB private / page cache", "load avg before/after"], rows)]
        s = e.get("summary")
        if s:
            parts += ["", "The engine over diffusers (speed: higher is better for the engine; RSS: lower is) and the "
                      "same-work check (mask agreement over the latent pixels, the mask's size, final latents max "
                      "|Δ| / max |ref|, images max |Δ|):", "",
                      table(["edit wall", "edit CPU time", "guided step CPU time", "guided step wall", "load",
                             "peak RSS / diffusers", "mask agreement", "mask size", "latent rel diff", "image max diff",
                             "same work", "target ≥ 1.0x (CPU time)"],
                            [[f"{s['wall']:.2f}x", f"{s['cpu_time']:.2f}x", f"{s['guided_step_cpu_time']:.2f}x",
                              f"{s['guided_step_wall']:.2f}x", f"{s['load']:.2f}x", f"{s['peak_rss_over_diffusers']:.2f}",
                              f"{s['mask_agreement']:.2%}", f"{s['mask_fraction']:.1%}", f"{s['latent_max_rel_diff']:.1e}",
                              f"{s['image_max_abs_diff']:.1e}", s["same_work"], "met" if s["met"] else "MISSED"]])]
    if full.get("notes"):
        parts += ["", *full["notes"]]
    return "\n".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="SD 3.5 Medium engine vs diffusers on a CPU (issue 21, item 6)")
    p.add_argument("--parts", default="parity,cold,edit", help="comma-separated subset of parity,cold,edit")
    p.add_argument("--size", type=int, default=Work.size)
    p.add_argument("--maps", type=int, default=Work.num_maps)
    p.add_argument("--steps", type=int, default=Work.steps)
    p.add_argument("--repeats", type=int, default=Work.repeats)
    p.add_argument("--step-repeats", type=int, default=Work.step_repeats)
    p.add_argument("--threshold", default=Work.threshold, help="mask rule: median | clamp:r")
    p.add_argument("--parity-latent", type=int, default=Work.parity_latent)
    p.add_argument("--cold-latent", type=int, default=Work.cold_latent)
    p.add_argument("--runs", type=int, default=2, help="timed cold starts per script")
    p.add_argument("--cold", default=",".join(COLD), help="cold-start scripts")
    p.add_argument("--folder", default="", help="SD 3.x folder (default: make_model.py --kind sd35m's build)")
    p.add_argument("--timeout", type=float, default=2400, help="seconds per child process")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sd3_cpu.json"))
    p.add_argument("--section", default="sd3_cpu")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md nor --json")
    p.add_argument("--from-json", default="", help="re-render a finished run's JSON (and write its section)")
    p.add_argument("--note", action="append", default=[], help="a line added under the tables (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return run_child(a.child, Path(a.folder), Work(**json.loads(a.work)), Path(a.out))

    import tempfile

    import make_model
    from results_md import LoadSampler, dump_json, machine, write_section

    if a.from_json:
        full = json.loads(Path(a.from_json).read_text())
        full["notes"] = full.get("notes", []) + a.note
        md = report(full)
        print(md)
        if not a.no_write:
            dump_json(full, Path(a.from_json))
            write_section(a.section, md)
        return full
    parts = [s for s in a.parts.split(",") if s]
    bad = [s for s in parts if s not in ("parity", "cold", "edit")]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from parity, cold, edit")
    work = Work(size=a.size, num_maps=a.maps, steps=a.steps, repeats=a.repeats, step_repeats=a.step_repeats,
                threshold=a.threshold, parity_latent=a.parity_latent, cold_latent=a.cold_latent)
    folder = Path(a.folder) if a.folder else make_model.ensure("sd35m")
    tmp = Path(tempfile.mkdtemp(prefix="sd3-bench-"))
    full = {"command": "python benchmarks/sd3_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "folder": str(folder), "work": asdict(work),
            "runs": a.runs, "tmp": str(tmp), "notes": a.note}
    sampler = LoadSampler()
    save = (lambda: None) if a.no_write else (lambda: dump_json(full, Path(a.json)))
    # the edit first (the longest and the one that matters most); peak RSS is the child's own VmHWM (reset at exec),
    # so what this parent holds does not enter it
    if "edit" in parts:
        full["edit"] = run_edit(folder, work, tmp, a.timeout)
        save()
    if "parity" in parts:
        full["parity"] = run_parity(folder, work, tmp, a.timeout)
        save()
    if "cold" in parts:
        full["cold"] = run_cold(folder, work, tmp, a.runs, [v for v in a.cold.split(",") if v], a.timeout)
    full["load_average_during"] = sampler.stop()
    full["machine"] = machine()
    save()
    md = report(full)
    print(md)
    if not a.no_write:
        write_section(a.section, md)
    return full


if __name__ == "__main__":
    main()
