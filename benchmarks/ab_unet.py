"""Interleaved A/B timing of one guided UNet step (batch 2, CFG) on the random-weight SD 1.5 folder: the
variants take turns call by call in one process, so the load other users put on a shared machine hits all
of them alike (compare.py's end-to-end rows run the systems one after another and cannot do that).

Phase 1: diffusers eager, engine eager, and engine eager with contiguous hidden states in Transformer2D
(forward pre-hooks here, to size a possible engine.models.unet change: its (B, C, H, W) -> (B, HW, C) view stays
transposed through the transformer blocks, so every LayerNorm/Linear works on a strided tensor).
Phase 2 (the diffusers model freed): engine eager vs engine compiled (engine.runtime.optimize, inductor + freezing).

    python benchmarks/ab_unet.py [--latent 32] [--rounds 5]
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)
sys.path.insert(0, str(ROOT / "benchmarks"))


def contiguous_inputs(unet_mod, unet) -> list:
    """Hooks (returned, for .remove()) that hand proj_in, the first transformer block and proj_out of every
    Transformer2D a contiguous copy of their input: on SD 1.5 (1x1-conv projections) exactly the token-major and
    NCHW copies diffusers makes (permute + reshape) around the blocks. The variant is applied from outside, so
    the model's own Transformer2D.forward is what runs (no copy of it here to drift)."""
    def contiguous(module, args):
        return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)

    return [child.register_forward_pre_hook(contiguous) for mod in unet.modules()
            if isinstance(mod, unet_mod.Transformer2D)
            for child in (mod.proj_in, mod.transformer_blocks[0], mod.proj_out)]


def interleave(variants: dict, rounds: int) -> dict:
    """name -> fn; one warm-up call each, then `rounds` rounds calling every variant once per round."""
    for fn in variants.values():
        fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: {"median_s": statistics.median(wall[k]), "min_s": min(wall[k]), "cpu_s": statistics.median(cpu[k])}
            for k in variants}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--folder", default="/tmp/diffedit-bench/sd15")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    from diffusers import UNet2DConditionModel

    from diffedit_engine.engine.models import unet as unet_mod
    from diffedit_engine.engine.runtime.optimize import EditorOptions, optimize
    from results_md import machine, machine_line, table, write_section
    from diffedit_engine.weights import load_model

    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.latent, a.latent, generator=g)
    ctx, t = torch.randn(2, 77, 768, generator=g), torch.tensor(500)
    la0 = __import__("os").getloadavg()
    d = UNet2DConditionModel.from_pretrained(Path(a.folder) / "unet").eval()
    m = load_model(a.folder)

    def engine_contig():
        hooks = contiguous_inputs(unet_mod, m.unet)
        try:
            return m.unet(x, t, ctx)
        finally:
            for h in hooks:
                h.remove()

    ref = d(x, t, encoder_hidden_states=ctx).sample
    assert (engine_contig() - ref).abs().max() / ref.abs().max() < 1e-5
    r1 = interleave({"diffusers eager": lambda: d(x, t, encoder_hidden_states=ctx).sample,
                     "engine eager": lambda: m.unet(x, t, ctx),
                     "engine eager, contiguous Transformer2D": engine_contig}, a.rounds)
    del d
    gc.collect()
    opt, info = optimize(m, EditorOptions(compile=True))
    t0 = time.perf_counter()
    opt.unet(x, t, ctx)
    compile_s = time.perf_counter() - t0
    r2 = interleave({"engine eager (phase 2)": lambda: opt.unet.module(x, t, ctx),
                     "engine compiled": lambda: opt.unet(x, t, ctx)}, a.rounds)
    res = {**r1, **r2}
    base = res["diffusers eager"]["median_s"]
    ratio = {k: base / v["median_s"] for k, v in r1.items()}
    scale = r1["engine eager"]["median_s"] / r2["engine eager (phase 2)"]["median_s"]  # phase-2 load vs phase-1
    ratio["engine compiled"] = base / (r2["engine compiled"]["median_s"] * scale)
    ratio["engine eager (phase 2)"] = ratio["engine eager"]
    rows = [[k, v["median_s"], v["min_s"], v["cpu_s"], f"{ratio[k]:.2f}x"] for k, v in res.items()]
    md = "\n".join([
        "## Guided UNet step, interleaved A/B (controls for the shared machine's load)",
        f"Command: `python benchmarks/ab_unet.py --latent {a.latent} --rounds {a.rounds}`  ",
        f"Machine: {machine_line(machine())}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before "
        f"{'/'.join(f'{v:.1f}' for v in la0)}. SD 1.5 random weights, fp32, batch 2, latent {a.latent}x{a.latent}; "
        f"variants alternate call by call, {a.rounds} rounds after one warm-up call each. Engine compiled = "
        f"engine.runtime.optimize (fused q/k/v, inductor with freezing, fullgraph, static shapes), compile + first "
        f"call {compile_s:.0f} s. The compiled ratio is scaled by phase 2's engine-eager time to phase 1's.",
        "",
        table(["variant", "median s", "min s", "CPU s", "vs diffusers eager"], rows),
    ])
    print(md)
    if not a.no_write:
        write_section("ab_unet", md)
    return res


if __name__ == "__main__":
    main()
