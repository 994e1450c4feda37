"""Load-time benchmark (issue 2, item 5; SD-XL: issue 12, item 5) on random-weight folders with the real
SD 1.5 / SD 2.1 / SD-XL base shapes (benchmarks/make_model.py).

1. Parity: the engine's UNet (weights.load_model) and diffusers' UNet2DConditionModel, loaded from the same
   folder, one forward at the real latent size (64x64 for SD 1.5, 96x96 for SD 2.1), fp32 CPU; reported
   as max|engine - diffusers| / max|diffusers| (target <= 1e-4). The text encoders are compared too.
   SD-XL: a 64x64 latent with the added conditions (pooled text_embeds, time_ids), both tokenizers and
   m.encode_prompt (context of both encoders, pooled) against transformers' encoders. Two ~10 GB fp32 UNets
   do not fit a 24 GiB machine together, so each side runs in its own child process, one after the other:
   diffusers first (it writes the inputs, its embeddings and its UNet output to a file), then the engine
   (its UNet runs on diffusers' embeddings, so the UNet is compared alone); each child's peak RSS is kept.
2. Cold start: a fresh process from its spawn to the first UNet output (interpreter start, imports, load of
   the whole model, tokenize, text encode, one UNet forward at a 32x32 latent, --cold-latent), for the engine and for a
   diffusers/transformers script doing the same work on the same folder. Wall time and the child's peak
   RSS (ru_maxrss from wait4), median of --runs timed runs after one untimed run (warm page cache).
   Target: engine >= 1.5x faster, peak RSS no higher.

    python benchmarks/load_bench.py                       # SD 1.5 and 2.1, 3 runs, RESULTS.md section load_bench
    python benchmarks/load_bench.py --kinds sdxl          # SD-XL (13.9 GB fp32 folder), section load_bench_sdxl
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
LATENT = {"sd15": 64, "sd21": 96, "sdxl": 64}
COLD_LATENT = 32  # side of the cold start's UNet latent (--cold-latent; the children get it as --latent)
XL_PROMPTS = [PROMPT, "ünïcödé, punctuation!!! and a longer prompt " + "word " * 80]  # the second is truncated


# ---------------------------------------------------------------- children (timed from their spawn)
def _stamp(marks: dict, name: str) -> None:
    marks[name] = time.time()


def _cold_latent():
    import torch

    return torch.randn(1, 4, COLD_LATENT, COLD_LATENT, generator=torch.Generator().manual_seed(0))


def _xl_time_ids():
    """SD-XL's size/crop micro-conditioning of the cold start's latent: an uncropped image of 8x its side."""
    import torch

    side = 8.0 * COLD_LATENT
    return torch.tensor([[side, side, 0.0, 0.0, side, side]])


def _rss_split() -> dict:
    """RSS while the model is alive: private memory (weights read or copied in) and mapped page cache (weights
    used in place from the file: shared between processes, reclaimable)."""
    return {"rss_anon_mib": _status_mib("RssAnon"), "rss_file_mib": _status_mib("RssFile")}


def child_engine(folder: str, marks: dict) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    import torch

    from diffedit_engine.weights import load_model

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    m = load_model(folder, device="cpu", dtype=torch.float32)
    _stamp(marks, "loaded")
    ids = m.tokenizer([PROMPT])
    ctx = m.text_encoder(ids)
    _stamp(marks, "encoded")
    x = _cold_latent()
    out = m.unet(x, torch.tensor(500), ctx)
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean()), **_rss_split()}


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
    x = _cold_latent()
    out = unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean()), **_rss_split()}


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
    x = _cold_latent()
    out = pipe.unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean()), **_rss_split()}


def child_engine_xl(folder: str, marks: dict) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    import torch

    from diffedit_engine.weights import load_model

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    m = load_model(folder, device="cpu", dtype=torch.float32)
    _stamp(marks, "loaded")
    ctx, pooled = m.encode_prompt([PROMPT])  # both tokenizers and encoders, the pooled embedding
    _stamp(marks, "encoded")
    x = _cold_latent()
    out = m.unet(x, torch.tensor(500), ctx, text_embeds=pooled, time_ids=_xl_time_ids())
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean()), **_rss_split()}


def _xl_components(folder: Path):
    """SD-XL's six components, each loaded with from_pretrained as the diffusers/transformers docs do."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval(),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float32).eval(),
            UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval(),
            AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval())


def xl_reference_encode(tok, tok_2, te, te_2, prompts: list):
    """SD-XL's prompt embedding with transformers' encoders, as StableDiffusionXLPipeline.encode_prompt makes it:
    both penultimate hidden states side by side (768 + 1280), bigG's projected pooled output. Returns
    (ids, ids_2, context, pooled)."""
    import torch

    def ids(t):
        return t(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    i1, i2 = ids(tok), ids(tok_2)
    h1 = te(i1, output_hidden_states=True).hidden_states[-2]
    o2 = te_2(i2, output_hidden_states=True)
    return i1, i2, torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds


def child_diffusers_xl(folder: str, marks: dict) -> dict:
    """The same work with the reference libraries: components loaded one by one (their documented way)."""
    import torch

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    tok, tok_2, te, te_2, unet, vae = _xl_components(Path(folder))  # noqa: F841 (vae: the same load work)
    _stamp(marks, "loaded")
    _, _, ctx, pooled = xl_reference_encode(tok, tok_2, te, te_2, [PROMPT])
    _stamp(marks, "encoded")
    x = _cold_latent()
    out = unet(x, torch.tensor(500), encoder_hidden_states=ctx,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": _xl_time_ids()}).sample
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean()), **_rss_split()}


def child_diffusers_pipeline_xl(folder: str, marks: dict) -> dict:
    """What most users write: StableDiffusionXLPipeline.from_pretrained, then its encode_prompt."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    _stamp(marks, "imported")
    torch.set_grad_enabled(False)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    _stamp(marks, "loaded")
    ctx, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    _stamp(marks, "encoded")
    x = _cold_latent()
    out = pipe.unet(x, torch.tensor(500), encoder_hidden_states=ctx,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": _xl_time_ids()}).sample
    _stamp(marks, "unet")
    return {"out_abs_mean": float(out.abs().mean()), **_rss_split()}


def xl_parity_inputs():
    """The parity forward's inputs: a batch of two 64x64 latents at two timesteps and two micro-conditionings."""
    import torch

    x = torch.randn(2, 4, LATENT["sdxl"], LATENT["sdxl"], generator=torch.Generator().manual_seed(1))
    time_ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0], [384.0, 640.0, 16.0, 32.0, 512.0, 512.0]])
    return x, torch.tensor([999, 261]), time_ids


def parity_diffusers_xl(folder: str, marks: dict, io: str) -> dict:
    """Reference side of the SD-XL parity: transformers' encoders, then (encoders freed) diffusers' UNet on
    their embeddings; everything the engine side needs is written to `io`."""
    import gc

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.set_grad_enabled(False)
    folder = Path(folder)
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    te_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float32).eval()
    ids, ids_2, ctx, pooled = xl_reference_encode(CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                                  CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), te, te_2,
                                                  XL_PROMPTS)
    del te, te_2
    gc.collect()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    _stamp(marks, "loaded")
    x, t, time_ids = xl_parity_inputs()
    t0 = time.perf_counter()
    out = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    _stamp(marks, "unet")
    torch.save({"ids": ids, "ids_2": ids_2, "context": ctx, "pooled": pooled, "unet": out,
                "unet_forward_s": time.perf_counter() - t0}, io)
    return {}


def parity_engine_xl(folder: str, marks: dict, io: str) -> dict:
    """Engine side: both tokenizers, m.encode_prompt, and the UNet on the reference embeddings (read from `io`,
    the engine's results written beside it as io + '.engine')."""
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    import torch

    from diffedit_engine.weights import load_model

    torch.set_grad_enabled(False)
    ref = torch.load(io)
    m = load_model(folder, device="cpu", dtype=torch.float32)
    _stamp(marks, "loaded")
    ctx, pooled = m.encode_prompt(XL_PROMPTS)
    x, t, time_ids = xl_parity_inputs()
    t0 = time.perf_counter()
    out = m.unet(x, t, ref["context"], text_embeds=ref["pooled"], time_ids=time_ids)
    _stamp(marks, "unet")
    torch.save({"ids": m.tokenizer(XL_PROMPTS), "ids_2": m.tokenizer_2(XL_PROMPTS), "context": ctx, "pooled": pooled,
                "unet": out, "unet_forward_s": time.perf_counter() - t0}, io + ".engine")
    return {}


CHILDREN = {"engine": child_engine, "diffusers": child_diffusers, "diffusers-pipeline": child_diffusers_pipeline}
CHILDREN_XL = {"engine": child_engine_xl, "diffusers": child_diffusers_xl,
               "diffusers-pipeline": child_diffusers_pipeline_xl,
               "parity-diffusers": parity_diffusers_xl, "parity-engine": parity_engine_xl}


def children(kind: str) -> dict:
    return CHILDREN_XL if kind.startswith("sdxl") else CHILDREN


def _status_mib(field: str) -> float | None:
    """A /proc/self/status memory field in MiB (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _vm_hwm_mib() -> float | None:
    """Peak RSS of this process's own address space (reset by exec, unlike ru_maxrss, which Linux carries
    over from the parent through vfork+exec)."""
    return _status_mib("VmHWM")


def run_child(which: str, folder: str, kind: str = "sd15", io: str | None = None, latent: int = 32) -> None:
    global COLD_LATENT
    COLD_LATENT = latent
    t0 = float(os.environ.get("LOAD_BENCH_T0", time.time()))
    marks = {}
    extra = children(kind)[which](folder, marks, **({"io": io} if io else {}))
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


def spawn(which: str, folder: Path, kind: str = "sd15", io: str | None = None) -> dict:
    """One fresh process; wall time from just before spawn to its first UNet output, and its own peak RSS."""
    env = _child_env()
    t0 = time.time()
    env["LOAD_BENCH_T0"] = repr(t0)
    cmd = [sys.executable, __file__, "--child", which, "--folder", str(folder), "--kind", kind,
           "--latent", str(COLD_LATENT)]
    proc = subprocess.Popen(cmd + (["--io", io] if io else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
        spawn(which, folder, kind)  # untimed: warms the page cache and the .pyc files
    samples = {which: [] for which in variants}
    for _ in range(runs):
        for which in variants:
            samples[which].append(spawn(which, folder, kind))
    out = {}
    for which, ss in samples.items():
        out[which] = {
            "first_unet_output_s": median([s["unet"] for s in ss]),
            "imports_s": median([s["imported"] for s in ss]),
            "load_s": median([s["loaded"] - s["imported"] for s in ss]),
            "tokenize_encode_s": median([s["encoded"] - s["loaded"] for s in ss]),
            "unet_forward_s": median([s["unet"] - s["encoded"] for s in ss]),
            "peak_rss_mib": median([s["peak_rss_mib"] for s in ss]),
            "min_first_unet_output_s": min(s["unet"] for s in ss),
            "encoded_s": median([s["encoded"] for s in ss]),
            "process_cpu_s": median([s["cpu_s"] for s in ss]),
            "rss_anon_mib": median([s.get("rss_anon_mib") or 0 for s in ss]),
            "rss_file_mib": median([s.get("rss_file_mib") or 0 for s in ss]),
            "samples": ss,
        }
        each = ", ".join(f"{s['unet']:.1f}" for s in ss)
        print(f"[load_bench] {kind} {which}: first UNet output {out[which]['first_unet_output_s']:.2f} s "
              f"(runs: {each}), peak RSS {out[which]['peak_rss_mib']:.0f} MiB", flush=True)
    e, d = out.get("engine"), out.get("diffusers")
    if e and d:
        out["speedup"] = d["first_unet_output_s"] / e["first_unet_output_s"]
        out["rss_ratio"] = e["peak_rss_mib"] / d["peak_rss_mib"]
        out["speedup_cpu_time"] = d["process_cpu_s"] / e["process_cpu_s"]
        # spawn to the prompt encoded: what differs between the two besides the forward itself (the engine's lazy
        # page-in of the UNet's weights falls in its forward, so this ratio flatters the engine somewhat)
        out["speedup_to_unet_call"] = d["encoded_s"] / e["encoded_s"]
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

    from diffedit_engine.weights import load_model

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


def parity_xl(folder: Path) -> dict:
    """SD-XL parity, each side in its own child process (one ~10 GB fp32 UNet alive at a time; the parent stays
    small): diffusers first, then the engine on the inputs and embeddings it wrote; compared here."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="load-bench-xl-") as tmp:
        io = str(Path(tmp) / "reference.pt")
        rss = {side: spawn(f"parity-{side}", folder, "sdxl", io)["peak_rss_mib"] for side in ("diffusers", "engine")}
        ref, eng = torch.load(io), torch.load(io + ".engine")
    x, _, _ = xl_parity_inputs()
    res = {
        "latent": list(x.shape),
        "tokenizer_ids_equal": bool(torch.equal(eng["ids"], ref["ids"]) and torch.equal(eng["ids_2"], ref["ids_2"])),
        "text_encoder_max_rel_err": rel_err(eng["context"], ref["context"]),
        "pooled_max_rel_err": rel_err(eng["pooled"], ref["pooled"]),
        "unet_max_rel_err": rel_err(eng["unet"], ref["unet"]),
        "unet_out_abs_mean": float(ref["unet"].abs().mean()),
        "unet_finite": bool(torch.isfinite(eng["unet"]).all()),
        "engine_unet_forward_s": eng["unet_forward_s"],
        "diffusers_unet_forward_s": ref["unet_forward_s"],
        "child_peak_rss_mib": rss,
    }
    res["parity_met"] = res["unet_max_rel_err"] <= 1e-4 and res["tokenizer_ids_equal"]
    print(f"[load_bench] sdxl parity: UNet max rel err {res['unet_max_rel_err']:.2e}, context "
          f"{res['text_encoder_max_rel_err']:.2e}, pooled {res['pooled_max_rel_err']:.2e}, ids equal "
          f"{res['tokenizer_ids_equal']}; child peak RSS {rss}", flush=True)
    return res


def fmt_load(la) -> str:
    return "/".join(f"{v:.1f}" for v in la)


def report(results: dict, machine: dict, cmd: str, title: str = "(issue 2, item 5)") -> str:
    from results_md import machine_line, table

    rows = []
    for kind, r in results["kinds"].items():
        p, c = r.get("parity", {}), r.get("cold_start", {})
        for which in ("engine", "diffusers", "diffusers-pipeline"):
            if which not in c:
                continue
            s = c[which]
            rows.append([kind, which, s["first_unet_output_s"], s["min_first_unet_output_s"], s["imports_s"],
                         s["load_s"], s["tokenize_encode_s"], s.get("unet_forward_s", s.get("unet_32x32_s")),
                         s["process_cpu_s"],
                         s["peak_rss_mib"], f"{s.get('rss_anon_mib', 0):.0f} / {s.get('rss_file_mib', 0):.0f}"])

    def parity_row(k, p):
        rss = p.get("child_peak_rss_mib")  # SD-XL: each side in its own process
        return [k, f"{p['unet_max_rel_err']:.2e}", f"{p['text_encoder_max_rel_err']:.2e}",
                f"{p['pooled_max_rel_err']:.2e}" if "pooled_max_rel_err" in p else "—", p["tokenizer_ids_equal"],
                "x".join(map(str, p["latent"])), f"{p['engine_unet_forward_s']:.1f} / {p['diffusers_unet_forward_s']:.1f}",
                f"{rss['engine']:.0f} / {rss['diffusers']:.0f}" if rss else "— (one process)"]

    parity_rows = [parity_row(k, r["parity"]) for k, r in results["kinds"].items() if "parity" in r]
    def ratio_row(k, c):
        extra = [f"{c[key]:.2f}x" if key in c else "—" for key in ("speedup_cpu_time", "speedup_to_unet_call")]
        return [k, f"{c['speedup']:.2f}x", *extra, f"{c['rss_ratio']:.2f}", "met" if c["target_met"] else "MISSED"]

    ratio_rows = [ratio_row(k, r["cold_start"]) for k, r in results["kinds"].items()
                  if "speedup" in r.get("cold_start", {})]
    during = results.get("load_average_during")
    lat = results.get("cold_latent", 32)
    parts = [
        f"## Load and cold start {title}" + (f" — cold start with a {lat}x{lat} latent" if lat != 32 else ""),
        f"Command: `{cmd}`  ",
        f"Machine: {machine_line(machine)}  ",
        f"Date: {results['date']}. Random-weight folders with the real shapes (`benchmarks/make_model.py`), fp32, CPU. "
        f"Load average (1/5/15 min) before {fmt_load(results['load_average_before'])}, after "
        f"{fmt_load(results['load_average_after'])}"
        + (f"; 1-min load sampled every {during['every_s']:.0f} s during the run: min {during['min']:.1f}, median "
           f"{during['median']:.1f}, max {during['max']:.1f}" if during else "")
        + " (the machine is shared: wall times are noisy, CPU times less so).",
        *(["",
           "Parity, one UNet forward at the real latent size (max |engine − diffusers| / max |diffusers|; target ≤ "
           "1e-4). SD-XL: text encoder = the context of both encoders side by side, pooled = bigG's projected "
           "embedding; the UNet gets the added conditions (text_embeds, time_ids) and runs on diffusers' embeddings:",
           "",
           table(["model", "UNet rel err", "text encoder rel err", "pooled rel err", "token ids equal", "latent",
                  "forward s engine / diffusers", "peak RSS MiB engine / diffusers"], parity_rows)]
          if parity_rows else []),
        "",
        f"Cold start, a fresh process from spawn to the first UNet output (median of {results['runs']} runs after one "
        "untimed run; page cache warm); phases are medians too:",
        "",
        table(["model", "script", "first UNet output s (median)", "min s", "imports s", "load s", "tokenize+encode s",
               f"UNet {lat}x{lat} s", "process CPU s", "peak RSS MiB",
               "RSS at the output MiB: private / page cache"], rows),
        "",
        "Target: engine ≥ 1.5x faster than the diffusers components script, peak RSS no higher:",
        "",
        table(["model", "speed-up (wall)", "process CPU time ratio", "speed-up to the UNet call (imports+load+encode)",
               "RSS engine/diffusers", "target"], ratio_rows),
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
    p.add_argument("--json", default="", help="default benchmarks/results/load_bench[_sdxl].json")
    p.add_argument("--section", default="", help="RESULTS.md section (default load_bench, load_bench_sdxl for sdxl)")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--from-json", default="", help="re-render a finished run's JSON (and write its section)")
    p.add_argument("--child", choices=sorted(CHILDREN_XL), help=argparse.SUPPRESS)
    p.add_argument("--folder", help="the model folder of the one kind in --kinds (default: make_model.py's build)")
    p.add_argument("--kind", default="sd15", help=argparse.SUPPRESS)
    p.add_argument("--cold-latent", type=int, default=32, help="side of the cold start's UNet latent")
    p.add_argument("--latent", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--io", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return run_child(a.child, a.folder, a.kind, a.io, a.latent)

    global THREADS, COLD_LATENT
    THREADS, COLD_LATENT = a.threads, a.cold_latent
    sys.path.insert(0, str(ROOT / "tests"))
    import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import make_model
    from results_md import LoadSampler, dump_json, machine, write_section

    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
        xl = all(k.startswith("sdxl") for k in results["kinds"])
        md = report(results, results["machine"], results.get("command", "?"),
                    "(SD-XL, issue 12, item 5)" if xl else "(issue 2, item 5)")
        print(md)
        if not a.no_write:
            write_section(a.section or ("load_bench_sdxl" if xl else "load_bench"), md)
        return results

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": a.runs, "threads": a.threads,
               "cold_latent": a.cold_latent, "load_average_before": os.getloadavg(), "kinds": {}}
    variants = ["engine", "diffusers"] + (["diffusers-pipeline"] if a.pipeline else [])
    kinds = a.kinds.split(",")
    xl = all(k.startswith("sdxl") for k in kinds)
    section = a.section or ("load_bench_sdxl" if xl else "load_bench")
    json_path = Path(a.json or ROOT / "benchmarks" / "results" / f"{section}.json")
    sampler = LoadSampler()
    if a.folder and len(kinds) != 1:
        raise SystemExit("--folder names the folder of one kind: pass one kind in --kinds")
    folders = {k: Path(a.folder) if a.folder else make_model.ensure(k, Path(a.root) / k if a.root else None,
                                                                     device="cpu", dtype="float32") for k in kinds}
    for kind in kinds:  # cold starts first, while this process is small (see spawn)
        r = results["kinds"][kind] = {"folder": str(folders[kind])}
        if not a.skip_cold:
            r["cold_start"] = cold_start(kind, folders[kind], a.runs, variants)
            dump_json(results, json_path)
    for kind in kinds:
        if not a.skip_parity:
            check = parity_xl if kind.startswith("sdxl") else (lambda f, k=kind: parity(k, f))
            results["kinds"][kind]["parity"] = check(folders[kind])
            dump_json(results, json_path)
    mach = machine()
    results["machine"] = mach
    results["load_average_after"] = os.getloadavg()
    results["load_average_during"] = sampler.stop()
    results["command"] = "python benchmarks/load_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    dump_json(results, json_path)
    md = report(results, mach, results["command"], "(SD-XL, issue 12, item 5)" if xl else "(issue 2, item 5)")
    print(md)
    if not a.no_write:
        write_section(section, md)
    return results


if __name__ == "__main__":
    main()
