"""End to end, as a user meets the engine: the command line's fp16 edit on a model whose VAE overflows in fp16,
and one job through every entry point (CLI `edit`, CLI `batch`, engine.runtime.Editor, engine.regions /
engine.diffedit) giving the same pixels. Tiny random models, 4 steps, 1 map: about a minute of CPU time in all."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffedit_engine import cli
from diffedit_engine.engine.edit import diffedit, regions
from diffedit_engine.engine.files import images
from diffedit_engine.engine.runtime import Editor
from diffedit_engine.weights import load_model

PAIR = ("cat", "dog")
SEED = 3
STEPS, MAPS = 4, 1
FAST = ["--steps", str(STEPS), "--maps", str(MAPS)]
# Decoder conv_in scaled by this: its activations on the photo's latents pass fp16's 65504, while fp32 decodes
# them (each GroupNorm divides the scale out again). The test checks both premises.
OVERFLOW_SCALE = 1e5


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Hash cache in a temp folder, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFEDIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """The sample photo at 36x28 (not a multiple of 8: every path pads and crops)."""
    p = tmp_path_factory.mktemp("img") / "cat.png"
    Image.open(cli.sample_image()).convert("RGB").resize((36, 28)).save(p)
    return p


@pytest.fixture(scope="module")
def overflow_folder(tiny_folder, tmp_path_factory):
    """The tiny sd1 folder with its VAE decoder's conv_in scaled by OVERFLOW_SCALE (weight and bias)."""
    dst = tmp_path_factory.mktemp("overflow") / "sd1"
    shutil.copytree(tiny_folder("sd1"), dst)
    f = dst / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    for k in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        sd[k] = sd[k] * OVERFLOW_SCALE
    save_file(sd, f, metadata={"format": "pt"})
    return dst


def run_cli(*args):
    """cli.main in this process, on the CPU (the Python-side runs here are CPU ones: same device, same numbers)."""
    assert cli.main([*map(str, args), "--device", "cpu", "--quiet"]) == 0


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def as_pixels(img: torch.Tensor) -> np.ndarray:
    """A (3, H, W) image in [0, 1] as the CLI writes it (engine.images.to_pil)."""
    return np.asarray(images.to_pil(img), dtype=np.int16)


def sidecar(png):
    return json.loads(png.with_suffix(".json").read_text())


# ---- fp16 with an overflowing VAE --------------------------------------------------------------------------

def test_fp16_overflowing_vae_is_redone_in_fp32(overflow_folder, photo, tmp_path):
    # The premise: this VAE's fp16 decode is not finite, its fp32 decode is.
    z = load_model(str(overflow_folder), device="cpu", dtype=torch.float32).vae.encode(
        images.to_tensor(Image.open(photo))[None, :, :24, :32] * 2 - 1)[0]
    with torch.no_grad():
        m16 = load_model(str(overflow_folder), device="cpu", dtype=torch.float16)
        assert not bool(torch.isfinite(m16.vae.decode(z.half())).all())
        m32 = load_model(str(overflow_folder), device="cpu", dtype=torch.float32)
        assert bool(torch.isfinite(m32.vae.decode(z)).all())
    outs = {}
    for dt in ("float16", "float32"):
        out = tmp_path / dt / "dog.png"
        run_cli("edit", "--model", overflow_folder, "--image", photo, "--edit", "cat -> dog", "--out", out,
                "--seed", SEED, "--dtype", dt, *FAST)
        outs[dt] = out
    meta16, meta32 = sidecar(outs["float16"]), sidecar(outs["float32"])
    assert meta16["engine"]["dtype"] == "float16" and meta16["engine"]["vae_dtype"] == "float16"
    assert meta16["engine"]["vae_fp32_fallbacks"] == 1       # one decode, redone in fp32
    assert meta32["engine"]["vae_fp32_fallbacks"] == 0
    mb = meta32["engine"]["unet_max_batch"]  # by latent size: 28x36 is padded to 32x40, latents 4x5
    assert list(mb) == ["4x5"] and 1 <= mb["4x5"] <= 8
    a16, a32 = pixels(outs["float16"]), pixels(outs["float32"])
    assert a16.shape == a32.shape == (28, 36, 3)
    assert a16.max() > 0                                       # not the black image of a NaN decode
    # Close to the fp32 edit (tolerance: mean |Δ| ≤ 1.5 and max |Δ| ≤ 16 levels of 255): only the UNet, text
    # encoder and VAE encoder ran in fp16; the decode was fp32 either way.
    diff = np.abs(a16 - a32)
    # Measured (tiny sd1, 4 steps): mean 0.51 levels of 255, 99th percentile 2, max 6.
    assert diff.mean() <= 1.5 and diff.max() <= 16, (diff.mean(), diff.max())


# ---- one job, every entry point, the same pixels ----------------------------------------------------------

def _batch(model, photo, tmp_path, seeds, extra=(), **job_opts) -> list:
    """CLI batch of one job per seed (the same image and edit); the jobs' PNG paths."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / "jobs.jsonl"
    jobs = [{"image": str(photo), "edits": ["cat -> dog"], "seed": s, "out": f"{i}.png", **job_opts}
            for i, s in enumerate(seeds)]
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    run_cli("batch", "--model", model, "--manifest", manifest, "--out-dir", tmp_path / "b", *FAST, *extra)
    return [tmp_path / "b" / f"{i}.png" for i in range(len(seeds))]


def check_batches(model, photo, tmp_path, ref, **job_opts):
    """A batch that runs the job alone (--batch-size 1) gives its pixels exactly. A batch that stacks it
    with others (seeds 3, 4, 3 in one engine call) gives them within one intensity level on at most 1 % of
    the values: on CPU oneDNN picks another convolution algorithm for a batch of 3 than for 1 (measured: a
    3x3 conv differs by ~1e-5 relative between the two, while linear, SDPA and GroupNorm are equal), so the
    final latents differ by ~1e-5 and a few pixels round the other way (the two copies of the job inside the
    stacked batch differ from each other in the same way: the rounding depends on the position too)."""
    alone = _batch(model, photo, tmp_path / "alone", [SEED], extra=["--batch-size", "1"], **job_opts)[0]
    assert sidecar(alone)["batch"] is None and np.array_equal(pixels(alone), ref)
    j0, _, j2 = _batch(model, photo, tmp_path / "stacked", [SEED, SEED + 1, SEED], **job_opts)
    assert sidecar(j0)["batch"] == {"size": 3}
    for a in (pixels(j0), pixels(j2)):
        diff = np.abs(a - ref)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


def test_same_pixels_cli_editor_regions_batch(tiny_folder, photo, tmp_path):
    model = tiny_folder("sd1")
    out = tmp_path / "cli.png"
    run_cli("edit", "--model", model, "--image", photo, "--edit", "cat -> dog", "--out", out, "--seed", SEED, *FAST)
    ref = pixels(out)
    pil = Image.open(photo).convert("RGB")
    ed = Editor.from_pretrained(model, "cpu", torch.float32)
    got = {"Editor.edit": as_pixels(ed.edit(pil, [PAIR], steps=STEPS, num_maps=MAPS, seed=SEED).image)}
    m = load_model(str(model), device="cpu", dtype=torch.float32)
    r = regions.edit_many(m, pil, [PAIR], steps=STEPS, num_maps=MAPS, generator=torch.Generator().manual_seed(SEED))
    got["regions.edit_many"] = as_pixels(r.image)
    for name, a in got.items():
        assert a.shape == ref.shape and np.array_equal(a, ref), (name, np.abs(a - ref).max())
    check_batches(model, photo, tmp_path, ref)


def test_same_pixels_compat_cli_editor_diffedit_batch(tiny_folder, photo, tmp_path):
    model = tiny_folder("sd1")
    out = tmp_path / "cli.png"
    run_cli("edit", "--model", model, "--image", photo, "--edit", "cat -> dog", "--out", out, "--seed", SEED,
            "--compat", "diffusers", *FAST)
    ref = pixels(out)
    pil = Image.open(photo).convert("RGB")
    ed = Editor.from_pretrained(model, "cpu", torch.float32)
    got = {"Editor.edit": as_pixels(ed.edit(pil, [PAIR], steps=STEPS, num_maps=MAPS, seed=SEED,
                                            compat="diffusers").image)}
    m = load_model(str(model), device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(SEED)
    mask = diffedit.generate_mask(m, pil, *PAIR, num_maps=MAPS, steps=STEPS, generator=g, compat="diffusers")
    inv = diffedit.invert(m, pil, PAIR[0], steps=STEPS, generator=g, compat="diffusers")
    img = diffedit.edit(m, inv, mask, PAIR[1], steps=STEPS, generator=g, compat="diffusers", size=(28, 36))
    got["diffedit (3 calls)"] = as_pixels(img)
    for name, a in got.items():
        assert a.shape == ref.shape and np.array_equal(a, ref), (name, np.abs(a - ref).max())
    check_batches(model, photo, tmp_path, ref, compat="diffusers")
