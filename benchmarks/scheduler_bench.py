"""DDIM-50 against DPM-Solver++(2M) at fewer steps on the same default edit (issue 11, items 4 and 5): for each
(scheduler, steps) the distance of the final latents and of the masks to DDIM-50's, UNet samples and wall time.

    python benchmarks/scheduler_bench.py [--model PATH] [--size 256] [--steps 10 15 20 25 30]

Without --model a tiny random SD1 folder (tests/tiny.py) is written to a temp folder. The edit is the engine's
default (10 maps, strength 0.8, guidance 7.5, fused editor) with a quantile:0.7 mask (see --threshold). Distances:
  latent_rel  ‖z − z_ddim50‖ / ‖z_ddim50 − x0‖ inside the masks' union (the edit's own size as the unit)
  mask_iou    IoU of the binary masks with DDIM-50's
Random weights show how close the samplers' trajectories stay for the same network and inputs (solver error);
they say nothing about image quality on a trained model.
"""
import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

from diffedit_engine.engine.edit import regions, toolkit  # noqa: E402
from diffedit_engine.weights import load_model  # noqa: E402


def run(m, img, scheduler, steps, threshold="quantile:0.7", seed=0):
    t0 = time.perf_counter()
    r = regions.edit_many(m, img, [("a cat", "a dog")], steps=steps, generator=torch.Generator().manual_seed(seed),
                          output="latent", scheduler=scheduler, threshold=threshold)
    return r, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 30])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", default="quantile:0.7",
                    help="mask rule (random weights leave clamp:3's mask empty: the edit would be a no-op)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.model is None:
        import tiny
        a.model = str(tiny.make_folder(Path(tempfile.mkdtemp()) / "tiny-sd1", "sd1"))
    m = load_model(a.model)
    img = torch.rand(3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    x0 = toolkit.encode_image(m, img[None])[0]
    ref, t_ref = run(m, img, "ddim", 50, a.threshold)
    union = ref.masks.amax(0) > 0
    unit = (ref.latents - x0)[:, union].norm()
    print(f"# {a.model} {a.size}x{a.size}, {platform.processor() or platform.machine()}, torch threads {a.threads}")
    print("| scheduler | steps | UNet samples | seconds | latent_rel | mask_iou |")
    print("|---|---|---|---|---|---|")
    print(f"| ddim | 50 | {ref.unet_samples} | {t_ref:.2f} | 0 | 1 |")
    for sched in ("dpm++2m", "ddim"):
        for steps in a.steps:
            r, t = run(m, img, sched, steps, a.threshold)
            rel = float((r.latents - ref.latents)[:, union].norm() / unit)
            mk, mr = r.masks > 0, ref.masks > 0
            iou = float((mk & mr).sum() / (mk | mr).sum().clamp(min=1))
            print(f"| {sched} | {steps} | {r.unet_samples} | {t:.2f} | {rel:.4f} | {iou:.3f} |", flush=True)


if __name__ == "__main__":
    main()
