"""Interleaved A/B timing of one guided UNet step (batch 2, CFG) on the random-weight SD 1.5 folder: the
variants take turns call by call in one process, so the load other users put on a shared machine hits all
of them alike (compare.py's end-to-end rows run the systems one after another and cannot do that).

Phase 1: diffusers eager, engine eager, and engine eager with contiguous hidden states in Transformer2D
(a monkeypatch here, to size a possible engine.unet change: its (B, C, H, W) -> (B, HW, C) view stays
transposed through the transformer blocks, so every LayerNorm/Linear works on a strided tensor).
Phase 2 (the diffusers model freed): engine eager vs engine compiled (engine.pipeline, inductor + freezing).

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


def contiguous_forward(self, x, ctx):
    """engine.unet.Transformer2D.forward with the token-major copies diffusers makes (permute + reshape)."""
    h, w = x.shape[-2:]
    y = self.norm(x)
    if not self.linear:
        y = self.proj_in(y)
    y = y.flatten(2).transpose(1, 2).contiguous()  # (B, C, H, W) -> (B, H*W, C), row-major
    if self.linear:
        y = self.proj_in(y)
    for block in self.transformer_blocks:
        y = block(y, ctx)
    if self.linear:
        y = self.proj_out(y)
    y = y.transpose(1, 2).unflatten(2, (h, w)).contiguous()  # (B, H*W, C) -> (B, C, H, W), NCHW
    if not self.linear:
        y = self.proj_out(y)
    return x + y


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

    from diffedit_engine.engine.runtime import pipeline
    from diffedit_engine.engine.models import unet as unet_mod
    from results_md import machine, machine_line, table, write_section
    from diffedit_engine.weights import load_model

    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.latent, a.latent, generator=g)
    ctx, t = torch.randn(2, 77, 768, generator=g), torch.tensor(500)
    la0 = __import__("os").getloadavg()
    d = UNet2DConditionModel.from_pretrained(Path(a.folder) / "unet").eval()
    m = load_model(a.folder)
    plain = unet_mod.Transformer2D.forward

    def engine_contig():
        unet_mod.Transformer2D.forward = contiguous_forward
        try:
            return m.unet(x, t, ctx)
        finally:
            unet_mod.Transformer2D.forward = plain

    ref = d(x, t, encoder_hidden_states=ctx).sample
    assert (engine_contig() - ref).abs().max() / ref.abs().max() < 1e-5
    r1 = interleave({"diffusers eager": lambda: d(x, t, encoder_hidden_states=ctx).sample,
                     "engine eager": lambda: m.unet(x, t, ctx),
                     "engine eager, contiguous Transformer2D": engine_contig}, a.rounds)
    del d
    gc.collect()
    opt, info = pipeline.optimize(m, pipeline.EditorOptions(compile=True))
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
        f"engine.pipeline.optimize (fused q/k/v, inductor with freezing, fullgraph, static shapes), compile + first "
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
