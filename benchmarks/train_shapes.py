"""Train the shapes-world model (issue 18) from scratch, on one CPU thread, and export it as a diffusers folder.

The model is the engine's own architecture (engine.models: CLIP text encoder with the real CLIP BPE tokenizer,
UNet, VAE) at a small size, trained on engine.shapes' TRAINING stream only. Stages, each resumable:
  vae     the autoencoder (L1 + L2 reconstruction, small KL) on random crops, until the background PSNR of
          held-out scenes after encode -> decode reaches the target (more steps are added if it has not);
  latents the posterior (mean, std) of a fixed set of training scenes, cached; scaling_factor = 1 / their std;
  unet    UNet + text encoder jointly (epsilon prediction, SD's scaled_linear schedule), captions dropped to ""
          (classifier-free guidance) or cut to one object's phrase some of the time; EMA weights are exported.
Every step's data and noise are a function of (seed, stage, step), so --resume continues the same run exactly
from the last checkpoint (models, optimizers, EMA, step). Checkpoints are written atomically every few minutes.

  nohup nice -n 10 .venv/bin/python benchmarks/train_shapes.py > runs/shapes/train.out 2>&1 &
  .venv/bin/python benchmarks/train_shapes.py --resume            # continue after a stop
  .venv/bin/python benchmarks/train_shapes.py --export [FOLDER]   # last checkpoint's EMA weights -> folder (fp16)
  .venv/bin/python benchmarks/train_shapes.py --init-from weights/data/shapes --seed 1 --out runs/shapes2
                        # a new UNet stage that starts from an exported model (its VAE and latent scale kept)
Logs: runs/shapes/log.jsonl (losses, evals, wall time); runs/shapes/NOTES.md (sizes and their measured cost).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffedit_engine.engine import shapes
from diffedit_engine.engine.models.clip import CLIPTextConfig, CLIPTextModel
from diffedit_engine.engine.models.unet import UNet, UNetConfig
from diffedit_engine.engine.models.vae import VAE, VAEConfig
from diffedit_engine.weights import random_model
from diffedit_engine.weights.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / "runs" / "shapes"
EXPORT_DIR = ROOT / "weights" / "data" / "shapes"

# Sizes chosen by measured step cost on one thread (runs/shapes/NOTES.md). 16x16 latents; cross-attention at the
# 16x16 and 8x8 levels (an object is 4-6 latent pixels wide there), self+cross attention in the 4x4 mid block.
UNET = dict(sample_size=16, block_out_channels=(48, 96, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)
# Four blocks: 8x downsampling (128 -> 16). No mid-block attention: the VAE stays local (a shape's edge needs no
# global context), so it trains on crops and costs less.
VAE_SIZES = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
                 mid_block_add_attention=False, sample_size=shapes.SIZE)
CLIP = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
SCHED = random_model.SCHEDULER  # SD's DDIM scaled_linear schedule, epsilon prediction
VAE_SCENE_OFFSET = 10_000_000  # the VAE's scenes come after the cached UNet set in the training stream


@dataclass
class RunConfig:
    seed: int = 0
    vae_steps: int = 1500
    vae_extra_steps: int = 500  # added while the background PSNR is below target, up to vae_max_steps
    vae_max_steps: int = 3000
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5  # per latent element, against the per-pixel reconstruction loss
    bg_psnr_target: float = 32.0
    vae_bf16: bool = True  # measured 1.7x faster for the conv-heavy VAE; the UNet gains only 8%, stays fp32
    n_latents: int = 16_000
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    p_empty: float = 0.1  # caption -> "" (the unconditional of classifier-free guidance)
    p_phrase: float = 0.25  # caption -> one object's phrase alone ("a yellow triangle")
    # Per-sample, per-channel constant added to the noise ("offset noise"). SD's schedule leaks ~7% of the signal
    # at t=999, so a model trained without it reads the background (the latent's mean) off the starting noise's
    # mean instead of the caption; the offset teaches it to set the mean from the prompt.
    offset_noise: float = 0.1
    ckpt_every_s: float = 300.0
    log_every: int = 25
    eval_every: int = 500
    threads: int = 1


RESUME_OVERRIDES = {"unet_steps", "eval_every", "log_every", "ckpt_every_s"}


def build(run: RunConfig):
    torch.manual_seed(run.seed)
    return (VAE(VAEConfig(**VAE_SIZES)), CLIPTextModel(CLIPTextConfig(**CLIP)), UNet(UNetConfig(**UNET)))


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **rec):
        line = json.dumps(rec)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


# ---------------------------------------------------------------- VAE


def vae_batch(run: RunConfig, step: int) -> torch.Tensor:
    rng = np.random.default_rng([run.seed, 1, step])
    crops = []
    for j in range(run.vae_batch):
        img = shapes.train_scene(VAE_SCENE_OFFSET + step * run.vae_batch + j).render()
        y, x = rng.integers(0, shapes.SIZE - run.vae_crop + 1, size=2)
        crops.append(img[y:y + run.vae_crop, x:x + run.vae_crop])
    return to_tensor(np.stack(crops))


def vae_loss(vae: VAE, x: torch.Tensor, gen: torch.Generator, run: RunConfig) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.vae_bf16):
        mean, logvar = vae.encode(x)
        z = mean + torch.randn(mean.shape, generator=gen) * (0.5 * logvar.float()).exp()
        rec = vae.decode(z).float()
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
    return (rec - x).abs().mean() + F.mse_loss(rec, x) + run.kl_weight * kl


@torch.no_grad()
def eval_vae(vae: VAE, n: int = 32) -> dict:
    """PSNR after encode (posterior mean) -> decode on held-out scenes: on background pixels (no object
    coverage at all) and on the whole image, in dB on the 0..255 scale."""
    scenes = [shapes.heldout_scene(9000 + i) for i in range(n)]
    imgs = np.stack([s.render() for s in scenes])
    rec = to_uint8(vae.decode(vae.encode(to_tensor(imgs))[0])).astype(np.float64)
    err = (rec - imgs) ** 2
    bg = np.stack([s.masks().sum(0) == 0 for s in scenes])
    psnr = lambda mse: float(10 * np.log10(255 ** 2 / max(mse, 1e-10)))  # noqa: E731
    return dict(bg_psnr=psnr(err[bg].mean()), psnr=psnr(err.mean()))


# ---------------------------------------------------------------- latents


@torch.no_grad()
def encode_latents(run: RunConfig, vae: VAE, bs: int = 64) -> dict:
    """Posterior (mean, std) of training scenes 0..n_latents-1, with their captions and object phrases."""
    means, stds, captions, phrases = [], [], [], []
    for i in range(0, run.n_latents, bs):
        scenes = [shapes.train_scene(k) for k in range(i, min(i + bs, run.n_latents))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.vae_bf16):
            mean, logvar = vae.encode(to_tensor(np.stack([s.render() for s in scenes])))
        means.append(mean.float())
        stds.append((0.5 * logvar.float()).exp())
        captions += [s.caption for s in scenes]
        phrases += [[o.phrase for o in s.objects] for s in scenes]
    return dict(mean=torch.cat(means), std=torch.cat(stds), captions=captions, phrases=phrases)


def scaling_factor(lat: dict, seed: int) -> float:
    """1 / std of posterior samples (as SD chose 0.18215), so the diffusion sees ~unit-variance latents."""
    g = torch.Generator().manual_seed(seed)
    z = lat["mean"] + lat["std"] * torch.randn(lat["mean"].shape, generator=g)
    return float(1 / z.std())


# ---------------------------------------------------------------- UNet + text encoder


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(SCHED["beta_start"] ** 0.5, SCHED["beta_end"] ** 0.5, SCHED["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def pick_captions(run: RunConfig, lat: dict, idx: np.ndarray, rng: np.random.Generator) -> list[str]:
    out = []
    for i, u in zip(idx, rng.random(len(idx))):
        if u < run.p_empty:
            out.append("")
        elif u < run.p_empty + run.p_phrase:
            ph = lat["phrases"][i]
            out.append(ph[int(rng.integers(len(ph)))])
        else:
            out.append(lat["captions"][i])
    return out


def unet_loss(run, step, lat, sf, tok, te, unet, ac) -> torch.Tensor:
    rng = np.random.default_rng([run.seed, 2, step])
    idx = rng.integers(len(lat["captions"]), size=run.unet_batch)
    ids = tok(pick_captions(run, lat, idx, rng))
    g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    ti = torch.from_numpy(idx)
    z0 = (lat["mean"][ti] + lat["std"][ti] * torch.randn(lat["mean"][ti].shape, generator=g)) * sf
    t = torch.randint(0, len(ac), (run.unet_batch,), generator=g)
    eps = torch.randn(z0.shape, generator=g) + run.offset_noise * torch.randn((*z0.shape[:2], 1, 1), generator=g)
    a = ac[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    return F.mse_loss(unet(zt, t, te(ids)), eps)


@torch.no_grad()
def sample(te, unet, vae, sf, tok, prompts, seed, steps=25, guidance=5.0) -> np.ndarray:
    """DDIM (eta 0, "leading" spacing + steps_offset 1 as the exported scheduler) with classifier-free guidance."""
    ac = alphas_cumprod()
    stride = SCHED["num_train_timesteps"] // steps
    ctx = te(tok([""] * len(prompts) + list(prompts)))
    x = torch.randn((len(prompts), 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    for t in (np.arange(steps) * stride + SCHED["steps_offset"])[::-1]:
        eu, ec = unet(torch.cat([x, x]), int(t), ctx).chunk(2)
        eps = eu + guidance * (ec - eu)
        a, ap = ac[t], ac[t - stride] if t - stride >= 0 else ac[0]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    return to_uint8(vae.decode(x / sf))


def judge(img: np.ndarray) -> tuple[str, str | None, str | None]:
    """(background, colour, shape) read off a generated one-object image with the world's own classifiers:
    background from the border, the object as pixels far from it; None when there is no object to read."""
    border = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                             img[:, -3:].reshape(-1, 3)])
    bg = shapes.nearest_colour(np.median(border, 0), shapes.BACKGROUNDS)
    fg = np.linalg.norm(img.astype(np.float32) - np.asarray(shapes.BACKGROUNDS[bg], np.float32), axis=-1) > 60
    if fg.sum() < 100:
        return bg, None, None
    ys, xs = np.nonzero(fg)
    side = min(shapes.SIZE, max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    x0, y0 = min(xs.min(), shapes.SIZE - side), min(ys.min(), shapes.SIZE - side)
    return bg, shapes.nearest_colour(np.median(img[fg], 0)), shapes.classify_shape(fg, (x0, y0, x0 + side, y0 + side))


def eval_unet(te, unet, vae, sf, tok, n: int = 8) -> dict:
    """Generate n one-object scenes (half from full captions, half from the phrase alone) and score background,
    colour and shape against the prompt. Cheap (~5 s), to tell midway whether the model is learning."""
    scenes = [shapes.heldout_scene(9500 + i, n_objects=1) for i in range(n)]
    prompts = [s.caption if i % 2 == 0 else s.objects[0].phrase for i, s in enumerate(scenes)]
    got = [judge(im) for im in sample(te, unet, vae, sf, tok, prompts, seed=1)]
    full = [(s, g) for i, (s, g) in enumerate(zip(scenes, got)) if i % 2 == 0]
    return dict(bg_acc=sum(g[0] == s.background for s, g in full) / len(full),
                colour_acc=sum(g[1] == s.objects[0].colour for s, g in zip(scenes, got)) / n,
                shape_acc=sum(g[2] == s.objects[0].shape for s, g in zip(scenes, got)) / n)


# ---------------------------------------------------------------- checkpoints and export


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def world_token_ids(tok) -> list[int]:
    """Every token id a caption of the world can produce (all words, ",", "and", the start/end/pad tokens)."""
    boxes = [(4, 4, 36, 36), (44, 4, 76, 36), (84, 4, 116, 36)]
    texts = [""] + [shapes.Scene(bg, tuple(shapes.Obj(s, c, b) for b in boxes)).caption
                    for bg in shapes.BACKGROUNDS for c in shapes.COLOURS for s in shapes.SHAPES]
    return sorted(set(tok(texts).flatten().tolist()))


def export(ckpt: dict, folder: Path) -> Path:
    """The checkpoint's EMA text encoder and UNet and its VAE (with scaling_factor) as a diffusers folder in fp16,
    laid out by weights/random_model.write_folder; token-embedding rows the world never uses are zeroed."""
    run = RunConfig(**ckpt["run"])
    vae, te, unet = build(run)
    vae.load_state_dict(ckpt["vae"])
    vae.config = dataclasses.replace(vae.config, scaling_factor=ckpt["scaling_factor"])
    te.load_state_dict(ckpt["ema_te"])
    unet.load_state_dict(ckpt["ema_unet"])
    emb = te.text_model.embeddings.token_embedding.weight
    keep = torch.zeros(len(emb), dtype=torch.bool)
    keep[world_token_ids(Tokenizer.bundled())] = True
    with torch.no_grad():
        emb[~keep] = 0
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        root = random_model.write_folder(tmp / "m")  # the layout, tokenizer and scheduler; weights replaced below
        for sub, module, cls in (("unet", unet, "UNet2DConditionModel"), ("vae", vae, "AutoencoderKL"),
                                 ("text_encoder", te, None)):
            fname = next((root / sub).glob("*.safetensors")).name
            random_model._save(module.half(), root / sub / fname)
            cfg = root / sub / "config.json"
            cfg.write_text(random_model._config_json(module.config, cls) if cls else
                           json.dumps({**json.loads(cfg.read_text()), **dataclasses.asdict(module.config)}, indent=2))
        index = json.loads((root / "model_index.json").read_text())
        index["_diffedit_note"] = (f"shapes-world model (issue 18) trained by benchmarks/train_shapes.py, seed "
                                   f"{run.seed}, {ckpt['step']} UNet steps, EMA weights")
        (root / "model_index.json").write_text(json.dumps(index, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(root, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@torch.no_grad()
def verify_export(folder: Path) -> dict:
    """Load the folder with the engine's load_model and with diffusers; both must give the same UNet output."""
    from diffedit_engine.weights import load_model

    m = load_model(folder)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500
    ctx = m.encode_prompt(["a red circle on a white background"])[0]
    ours = m.unet(x, t, ctx)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    out = dict(engine_ok=True, size_mb=round(size / 2**20, 2))
    try:
        from diffusers import StableDiffusionPipeline
    except ImportError as e:
        return {**out, "diffusers": f"not checked: {e}"}
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(dtype=torch.float32)  # it keeps the stored fp16; compare with the engine in fp32
    img = pipe("a red circle on a white background", height=shapes.SIZE, width=shapes.SIZE, num_inference_steps=5,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert img.shape == (shapes.SIZE, shapes.SIZE, 3)
    ids = pipe.tokenizer(["a red circle on a white background"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    dctx = pipe.text_encoder(ids)[0]
    theirs = pipe.unet(x, t, dctx).sample
    return {**out, "diffusers_ok": True, "ctx_max_diff": float((dctx - ctx.float()).abs().max()),
            "unet_max_diff": float((theirs - ours.float()).abs().max())}


# ---------------------------------------------------------------- the run


class Trainer:
    def __init__(self, run: RunConfig, out: Path, ckpt: dict | None):
        self.run, self.out, self.log = run, out, Log(out / "log.jsonl")
        self.vae, self.te, self.unet = build(run)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=run.vae_lr, weight_decay=0.0, fused=True)
        decay = [p for n, p in [*self.te.named_parameters(), *self.unet.named_parameters()]
                 if p.ndim >= 2 and "token_embedding" not in n]  # unused vocabulary rows stay untouched
        rest = [p for p in [*self.te.parameters(), *self.unet.parameters()] if all(p is not q for q in decay)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                     lr=run.unet_lr, betas=(0.9, 0.99), fused=True)
        self.ema_te, self.ema_unet = copy.deepcopy(self.te), copy.deepcopy(self.unet)
        self.stage, self.step, self.wall, self.sf, self.vae_total = "vae", 0, 0.0, None, run.vae_steps
        if ckpt:
            self.vae.load_state_dict(ckpt["vae"])
            self.vae_opt.load_state_dict(ckpt["vae_opt"])
            for name in ("te", "unet", "ema_te", "ema_unet"):
                getattr(self, name).load_state_dict(ckpt[name])
            self.opt.load_state_dict(ckpt["opt"])
            self.stage, self.step, self.wall = ckpt["stage"], ckpt["step"], ckpt["wall_s"]
            self.sf, self.vae_total = ckpt["scaling_factor"], ckpt["vae_total"]
            if self.stage == "done" and self.step < run.unet_steps:  # resumed with a longer --unet-steps
                self.stage = "unet"
        self.t0, self.last_ckpt = time.time() - self.wall, time.time()
        self.tok = Tokenizer.bundled()

    def init_from(self, folder: Path) -> None:
        """Start the UNet stage from an exported folder: its VAE (frozen, with its scaling_factor), and its
        text encoder and UNet as both the trained and the EMA weights; a fresh optimizer. The fp16 weights are
        widened to fp32. Give the run another --seed so that its batches are not the first run's again."""
        from safetensors.torch import load_file

        def weights(sub: str) -> dict:
            return {k: v.float() for k, v in load_file(next((Path(folder) / sub).glob("*.safetensors"))).items()}

        self.vae.load_state_dict(weights("vae"))
        for name, sub in (("te", "text_encoder"), ("ema_te", "text_encoder"), ("unet", "unet"), ("ema_unet", "unet")):
            getattr(self, name).load_state_dict(weights(sub))
        self.sf = float(json.loads((Path(folder) / "vae" / "config.json").read_text())["scaling_factor"])
        self.stage, self.step, self.vae_total = "unet", 0, 0
        self.log(stage="init_from", folder=str(folder), scaling_factor=self.sf)
        self.checkpoint(force=True)

    def wall_s(self) -> float:
        return time.time() - self.t0

    def state(self) -> dict:
        return dict(run=dataclasses.asdict(self.run), stage=self.stage, step=self.step, wall_s=self.wall_s(),
                    scaling_factor=self.sf, vae_total=self.vae_total, vae=self.vae.state_dict(),
                    vae_opt=self.vae_opt.state_dict(), te=self.te.state_dict(), unet=self.unet.state_dict(),
                    ema_te=self.ema_te.state_dict(), ema_unet=self.ema_unet.state_dict(), opt=self.opt.state_dict())

    def checkpoint(self, force: bool = False) -> None:
        if force or time.time() - self.last_ckpt >= self.run.ckpt_every_s:
            save_atomic(self.state(), self.out / "ckpt.pt")
            self.last_ckpt = time.time()

    def train_vae(self) -> None:
        run, losses = self.run, []
        while True:
            while self.step < self.vae_total:
                for group in self.vae_opt.param_groups:
                    group["lr"] = lr_at(self.step, self.vae_total, run.vae_lr, run.warmup)
                loss = vae_loss(self.vae, vae_batch(run, self.step),
                                torch.Generator().manual_seed(run.seed * 1_000_003 + self.step), run)
                loss.backward()
                self.vae_opt.step()
                self.vae_opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                self.step += 1
                if self.step % run.log_every == 0:
                    self.log(stage="vae", step=self.step, loss=float(np.mean(losses)), wall_s=round(self.wall_s(), 1))
                    losses = []
                if self.step % run.eval_every == 0:
                    self.log(stage="vae_eval", step=self.step, **eval_vae(self.vae), wall_s=round(self.wall_s(), 1))
                self.checkpoint()
            ev = eval_vae(self.vae)
            self.log(stage="vae_eval", step=self.step, **ev, wall_s=round(self.wall_s(), 1))
            if ev["bg_psnr"] >= run.bg_psnr_target or self.vae_total >= run.vae_max_steps:
                break
            self.vae_total = min(run.vae_max_steps, self.vae_total + run.vae_extra_steps)  # below target: go on
        self.stage, self.step = "latents", 0
        self.checkpoint(force=True)

    def latents(self) -> dict:
        path = self.out / "latents.pt"
        if path.exists():
            return torch.load(path)
        lat = encode_latents(self.run, self.vae)
        save_atomic(lat, path)
        return lat

    def train_unet(self, lat: dict) -> None:
        run, ac, losses = self.run, alphas_cumprod(), []
        params = [*self.te.parameters(), *self.unet.parameters()]
        ema = [*self.ema_te.parameters(), *self.ema_unet.parameters()]
        while self.step < run.unet_steps:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, run.unet_steps, run.unet_lr, run.warmup)
            loss = unet_loss(run, self.step, lat, self.sf, self.tok, self.te, self.unet, ac)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # EMA with the usual warmup, so early exports are not dominated by the init
                d = min(run.ema_decay, (1 + self.step) / (10 + self.step))
                torch._foreach_lerp_(ema, params, 1 - d)
            losses.append(loss.item())
            self.step += 1
            if self.step % run.log_every == 0:
                self.log(stage="unet", step=self.step, loss=float(np.mean(losses)),
                         lr=self.opt.param_groups[0]["lr"], wall_s=round(self.wall_s(), 1))
                losses = []
            if self.step % run.eval_every == 0 or self.step == run.unet_steps:
                ev = eval_unet(self.ema_te, self.ema_unet, self.vae, self.sf, self.tok)
                self.log(stage="unet_eval", step=self.step, **ev, wall_s=round(self.wall_s(), 1))
            self.checkpoint()
        self.stage = "done"
        self.checkpoint(force=True)

    def fit(self) -> None:
        if self.stage == "vae":
            self.train_vae()
        if self.stage in ("latents", "unet"):
            lat = self.latents()
            if self.stage == "latents":
                self.sf = scaling_factor(lat, self.run.seed)
                self.log(stage="latents", n=len(lat["captions"]), scaling_factor=self.sf,
                         wall_s=round(self.wall_s(), 1))
                self.stage, self.step = "unet", 0
                self.checkpoint(force=True)
            self.train_unet(lat)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RUN_DIR, help="checkpoints and logs (default runs/shapes)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--export", nargs="?", const=EXPORT_DIR, type=Path, metavar="FOLDER",
                   help="write the checkpoint's model as a diffusers folder (default weights/data/shapes) and check it")
    p.add_argument("--no-export", action="store_true", help="do not export when training ends")
    p.add_argument("--init-from", type=Path, metavar="FOLDER",
                   help="a new run whose UNet stage starts from an exported model folder (VAE and scale kept)")
    for f in dataclasses.fields(RunConfig):  # default None: "not given", so --resume can tell what was asked
        p.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"default {f.default}",
                       type=int if isinstance(f.default, bool) else type(f.default))  # bools as 0/1
    a = p.parse_args(argv)
    given = {f.name: type(f.default)(getattr(a, f.name)) for f in dataclasses.fields(RunConfig)
             if getattr(a, f.name) is not None}
    ckpt_path = a.out / "ckpt.pt"
    if a.export:
        ckpt = torch.load(ckpt_path)
        assert ckpt["scaling_factor"] is not None, "the checkpoint has no trained latent scale yet (VAE stage)"
        torch.set_num_threads(RunConfig(**ckpt["run"]).threads)
        print(json.dumps({"exported": str(export(ckpt, a.export)), **verify_export(a.export)}))
        return
    if ckpt_path.exists() and not a.resume:
        sys.exit(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    if a.init_from and a.resume:
        sys.exit("--init-from starts a new run; --resume continues one: pass one of them")
    ckpt = torch.load(ckpt_path) if a.resume else None
    if ckpt:
        # The run continues with its own config. Only what does not change the data already consumed may be
        # changed: the UNet's length (its cosine horizon: exact while the UNet stage is not past warmup) and
        # the logging/checkpoint cadence.
        bad = set(given) - RESUME_OVERRIDES
        if bad:
            sys.exit(f"--resume continues the checkpoint's run; {sorted(bad)} cannot change (only "
                     f"{sorted(RESUME_OVERRIDES)})")
        run = RunConfig(**{**ckpt["run"], **given})
    else:
        run = RunConfig(**given)
    torch.set_num_threads(run.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, a.out, ckpt)
    if a.init_from:
        trainer.init_from(a.init_from)
    trainer.log(stage="start", resume=bool(ckpt), run=dataclasses.asdict(run), from_stage=trainer.stage,
                from_step=trainer.step, wall_s=round(trainer.wall_s(), 1))
    trainer.fit()
    if not a.no_export:
        ckpt = trainer.state()
        print(json.dumps({"exported": str(export(ckpt, EXPORT_DIR)), **verify_export(EXPORT_DIR)}))


if __name__ == "__main__":
    main()
