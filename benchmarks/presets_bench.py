"""Time and work of the speed presets (issue 23 item 5) on a random-weight SD 1.5 with the real shapes: one edit
per preset through the Editor (the CLI's engine), each run in its own process, presets interleaved over rounds,
median per preset; wall and process CPU seconds, and the edit's work counted with hooks on the UNet:

  - UNet samples: every UNet evaluation of one latent (full or DeepCache-shallow), from conv_in's batch;
  - work: samples × latent pixels (a crop counts its own pixels), in "full-frame samples" (/ h·w);
  - deep calls: samples that ran the UNet's deep blocks (mid_block), which DeepCache skips between its steps.

    python benchmarks/presets_bench.py --size 256 --rounds 2 --write          # the RESULTS.md section presets_time
    python benchmarks/presets_bench.py --model /tmp/diffedit-bench/sd15 --presets exact,fast

With random weights the masks are noise: their bounding box is about the whole frame, so the crop lever saves
nothing here; its gain is measured on the shapes model (benchmarks/shapes_quality.py, rows crop* and fastest).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_md  # noqa: E402

SECTION = "presets_time"
PAIRS = [("a photo of a cat", "a photo of a dog")]


def count_work(unet) -> dict:
    """Forward hooks on the UNet's conv_in (every evaluation) and mid_block (the deep part): the counts dict they
    fill (samples, pixel_samples, deep_samples)."""
    c = {"samples": 0, "pixel_samples": 0, "deep_samples": 0}

    def on_in(_, args, __):
        x = args[0]
        c["samples"] += x.shape[0]
        c["pixel_samples"] += x.shape[0] * x.shape[-2] * x.shape[-1]

    def on_mid(_, args, __):
        c["deep_samples"] += args[0].shape[0]

    unet.conv_in.register_forward_hook(on_in)
    unet.mid_block.register_forward_hook(on_mid)
    return c


def shapes_case(seed: int):
    """(image (3, 128, 128), pairs): held-out shapes scene `seed` and a colour edit of its first object."""
    import torch

    from diffedit_engine.engine import shapes

    sc = shapes.heldout_scene(seed, 2)
    o = sc.objects[0]
    other = next(c for c in shapes.COLOURS if c != o.colour)
    img = torch.from_numpy(sc.render()).permute(2, 0, 1).float() / 255
    return img, [(o.phrase, o.phrase.replace(o.colour, other))]


def child(preset: str, model: str, size: int, threads: int, seed: int, scene: bool = False) -> dict:
    """One edit with `preset` in this process: seconds, CPU seconds, work counts, dtype. scene: a shapes-world
    scene and edit (shapes_case; the shapes model's own world, so its masks are real) instead of noise."""
    import torch

    from diffedit_engine.engine.runtime import Editor

    ed = Editor.from_pretrained(model, device="cpu", preset=preset, threads=threads)
    counts = count_work(ed.runner.module)
    g = torch.Generator().manual_seed(seed)
    img, pairs = shapes_case(seed) if scene else (torch.rand(3, size, size, generator=g), PAIRS)
    size = img.shape[-1]
    t0, c0 = time.perf_counter(), time.process_time()
    r = ed.edit(img, pairs, seed=seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    h = w = size // 8
    return {"preset": preset, "seconds": wall, "cpu_seconds": cpu, "dtype": str(ed.base.dtype).replace("torch.", ""),
            "samples": counts["samples"], "deep_samples": counts["deep_samples"],
            "full_frame_samples": counts["pixel_samples"] / (h * w), "settings": ed.defaults.to_dict(),
            "mask_coverage": float((r.masks > 0.5).float().mean()), "load": os.getloadavg()[0]}


def run_child(preset: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", preset, "--model", str(a.model), "--size", str(a.size),
           "--threads", str(a.threads), "--seed", str(a.seed)] + (["--scene"] if a.scene else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode:
        raise RuntimeError(f"preset {preset}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def report(runs: list[dict], a, load: dict) -> str:
    by = {}
    for r in runs:
        by.setdefault(r["preset"], []).append(r)
    med = {p: {k: results_md.median([r[k] for r in rs]) for k in ("seconds", "cpu_seconds")} for p, rs in by.items()}
    base = med.get("exact")
    rows = []
    for p, rs in by.items():
        r0 = rs[0]
        s = r0["settings"]
        lever = (f"{s['scheduler']} {s['steps']}, maps {s['num_maps']}, cache {s['cache_interval']}, "
                 f"crop {s['crop_margin']}")
        speed = (f"{base['seconds'] / med[p]['seconds']:.2f}x / {base['cpu_seconds'] / med[p]['cpu_seconds']:.2f}x"
                 if base else "—")
        rows.append([p, r0["dtype"], lever, len(rs), round(med[p]["seconds"], 1), round(med[p]["cpu_seconds"], 1),
                     speed, r0["samples"], r0["deep_samples"], round(r0["full_frame_samples"], 1)])
    m = results_md.machine()
    what = (f"The shapes model ({a.model}), held-out scene {a.seed} (2 objects, 128×128), a colour edit of its "
            f"first object" if a.scene else f"Random-weight SD 1.5 (real shapes, {a.model}), {a.size}×{a.size} noise")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/presets_bench.py " + " ".join(sys.argv[1:])
    head = (f"## Speed presets: time and work of one edit (issue 23, item 5)\n\nCommand: `{cmd}`  \nDate: {when}  \n"
            f"Machine: {results_md.machine_line(m)}; {a.threads} torch thread(s); 1-min load average during the runs "
            f"{load['min']:.1f}–{load['max']:.1f} (median {load['median']:.1f})\n\n"
            f"{what}, one pair, seed {a.seed}, each preset's own "
            f"settings and dtype (`--preset NAME`); each run a fresh process, presets interleaved over {a.rounds} "
            f"round(s), median. Work: UNet samples (every evaluation of one latent), deep samples (those that ran "
            f"the mid block: DeepCache skips it between its full steps), full-frame samples (samples × latent "
            f"pixels / the frame's: a crop counts its own area).\n\n")
    return head + results_md.table(["preset", "dtype", "levers", "runs", "s (median)", "CPU s", "speed-up vs exact "
                                    "(wall / CPU)", "UNet samples", "deep samples", "full-frame samples"], rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(os.environ.get("DIFFEDIT_BENCH_DIR", "/tmp/diffedit-bench")) / "sd15")
    p.add_argument("--presets", default="exact,fast,fastest")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--write", action="store_true", help=f"write the section {SECTION} of RESULTS.md")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--scene", action="store_true", help="a shapes-world scene and colour edit (for the shapes "
                                                         "model: real masks, so the crop lever counts)")
    p.add_argument("--section", default=SECTION)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, str(a.model), a.size, a.threads, a.seed, a.scene)))
        return
    if not (a.model / "model_index.json").is_file():
        raise SystemExit(f"--model {a.model}: no diffusers folder (build one: python benchmarks/make_model.py "
                         f"--kind sd15 --out {a.model})")
    sampler = results_md.LoadSampler()
    runs = []
    for rnd in range(a.rounds):
        for preset in a.presets.split(","):
            r = run_child(preset, a)
            runs.append(r)
            print(f"round {rnd + 1} {preset}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU s), "
                  f"{r['samples']} samples, load {r['load']:.1f}", flush=True)
    text = report(runs, a, sampler.stop())
    print(text)
    if a.json:
        results_md.dump_json({"runs": runs}, a.json)
    if a.write:
        results_md.write_section(a.section, text)


if __name__ == "__main__":
    main()
