"""Cost of a 3-pair edit: regions.edit_many (one mask pass, one inversion, one fused trajectory) against the
sequential route (diffedit.generate_mask + invert + edit once per pair, each pass editing the previous
pass's output), in the same run on the same model. Counts UNet samples and calls (by wrapping m.unet), VAE
encodes/decodes, and wall time; prints JSON.

    python benchmarks/regions_cost.py                                   # tiny random model, 64×64
    python benchmarks/regions_cost.py --model /tmp/diffedit-bench/sd15 --size 256 --steps 10 --num-maps 4

The sequential route runs DiffEdit's paper mode (it skips ∅ in the mask pass, like edit_many); the
diffusers pipeline's own count per pair (4n mask samples, CFG inversion and decoding) is given for reference.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

PAIRS = [("a cat", "a dog"), ("a wooden table", "a marble table"), ("", "a red balloon")]


class Counter:
    """Wraps a callable and counts calls and the batch size (samples) of its first argument."""

    def __init__(self, fn):
        self.fn, self.calls, self.samples = fn, 0, 0

    def __call__(self, x, *args, **kw):
        self.calls += 1
        self.samples += x.shape[0]
        return self.fn(x, *args, **kw)


class CountingVAE:
    def __init__(self, vae):
        self.vae, self.encode, self.decode = vae, Counter(vae.encode), Counter(vae.decode)


def instrument(m):
    m.unet, m.vae = Counter(m.unet), CountingVAE(m.vae)
    return m


def take(m) -> dict:
    """The counters' values since the last take, reset."""
    out = {"unet_calls": m.unet.calls, "unet_samples": m.unet.samples,
           "vae_encode_images": m.vae.encode.samples, "vae_decode_images": m.vae.decode.samples}
    for c in (m.unet, m.vae.encode, m.vae.decode):
        c.calls = c.samples = 0
    return out


def fused(m, image, a, generator):
    from diffedit_engine.engine.edit import regions
    r = regions.edit_many(m, image, PAIRS, steps=a.steps, strength=a.strength, num_maps=a.num_maps,
                          guidance_scale=a.guidance, generator=generator)
    return r.image


def sequential(m, image, a, generator):
    from diffedit_engine.engine.edit import diffedit
    img = image
    for src, tgt in PAIRS:
        mask = diffedit.generate_mask(m, img, src, tgt, num_maps=a.num_maps, steps=a.steps,
                                      guidance_scale=a.guidance, threshold="clamp:3", generator=generator)
        inv = diffedit.invert(m, img, "", steps=a.steps, strength=a.strength)
        img = diffedit.edit(m, inv, mask, tgt, steps=a.steps, strength=a.strength, guidance_scale=a.guidance)
    return img


def diffusers_count(a) -> int:
    """UNet samples of StableDiffusionDiffEditPipeline per pair (generate_mask 4n, invert and __call__ with
    CFG: 2 per step each), times the pairs."""
    S = int(a.steps * a.strength)
    return len(PAIRS) * (4 * a.num_maps + 2 * S + 2 * S)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="diffusers folder (default: a tiny random model in a temp dir)")
    p.add_argument("--size", type=int, default=0, help="image side (default 64 tiny, 256 otherwise)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--num-maps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of each route; the median time")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffedit_engine.weights import load_model

    folder = a.model
    if not folder:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny
        folder = tiny.make_folder(Path(tempfile.mkdtemp(prefix="regions-cost-")) / "sd1", "sd1")
    size = a.size or (256 if a.model else 64)
    t0 = time.perf_counter()
    m = instrument(load_model(folder, device=a.device, dtype=getattr(torch, a.dtype)))
    load_s = time.perf_counter() - t0
    image = torch.rand((3, size, size), generator=torch.Generator().manual_seed(a.seed))
    out = {"model": str(a.model or "tiny sd1"), "size": size, "pairs": len(PAIRS), "steps": a.steps,
           "strength": a.strength, "num_maps": a.num_maps, "device": a.device, "dtype": a.dtype,
           "threads": torch.get_num_threads(), "load_s": round(load_s, 2)}
    times = {"fused": [], "sequential": []}
    with torch.inference_mode():
        for _ in range(a.repeats):  # interleaved, so a change in machine load hits both routes alike
            for name, fn in (("fused", fused), ("sequential", sequential)):
                take(m)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                img = fn(m, image, a, torch.Generator().manual_seed(a.seed))
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
                out[name] = {**take(m), "finite": bool(torch.isfinite(img).all())}
    for name, ts in times.items():
        out[name]["seconds"] = round(sorted(ts)[len(ts) // 2], 3)
        out[name]["all_seconds"] = [round(t, 3) for t in ts]
    out["diffusers_pipeline_unet_samples"] = diffusers_count(a)
    out["sample_ratio_sequential_over_fused"] = round(out["sequential"]["unet_samples"] / out["fused"]["unet_samples"], 3)
    out["time_ratio_sequential_over_fused"] = round(out["sequential"]["seconds"] / out["fused"]["seconds"], 3)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
