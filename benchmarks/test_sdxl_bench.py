"""The SD-XL benchmarks' code paths on a tiny SD-XL folder (tests/tiny_sdxl.py), in-process, seconds: the diffusers
reference loop of sdxl_bench.py does the engine's work (same masks, latents to float rounding, same UNet sample
count), and load_bench.py's SD-XL parity and cold-start scripts compute the same things on both sides. The
real-shape runs (13.9 GB folder) are for the benchmark commands, never CI."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_bench  # noqa: E402
import sdxl_bench  # noqa: E402
import tiny_sdxl  # noqa: E402
from tiny import one_thread  # noqa: E402,F401  (autouse)

# load_bench's prompt set includes an over-long prompt on purpose (both sides must truncate it alike); its warning
# is asserted in tests/test_prompt_truncation.py, not here.
pytestmark = pytest.mark.filterwarnings("ignore::diffedit_engine.weights.tokenizer.PromptTruncatedWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sdxl.make_folder(tmp_path_factory.mktemp("sdxl-bench"), "xl")


def counted(system, folder, work):
    """(edit, calls, step) with every UNet call's batch size recorded."""
    edit, unet, step = system(folder, work)
    calls = []
    unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return edit, calls, step


@torch.no_grad()
def test_reference_loop_does_the_engines_work(folder):
    work = sdxl_bench.Work(size=64, num_maps=3, steps=4)
    S = int(work.steps * work.strength)
    image = sdxl_bench.load_image(work.size)
    engine, e_calls, e_step = counted(sdxl_bench.engine_system, folder, work)
    ref, d_calls, d_step = counted(sdxl_bench.diffusers_system, folder, work)
    a, b = engine(image, work.steps), ref(image, work.steps)
    # the same UNet work, call by call: one mask-pass batch of 2n, S unguided inversion calls, S CFG calls of 2
    assert d_calls == [2 * work.num_maps] + [1] * S + [2] * S
    assert sum(e_calls) == sum(d_calls) == work.unet_samples()
    c = sdxl_bench.compare_outputs(a, b)
    assert c["mask_agreement"] == 1.0 and 0 < c["mask_fraction"] < 1  # a real mask, the same one
    assert c["latent_max_rel_diff"] < 1e-4 and c["image_max_abs_diff"] < 1e-3
    assert a["image"].shape == (3, 64, 64) and a["latents"].shape == (4, 8, 8)
    # the guided-step rows time the same call: ∅ + target at batch 2 with the image's micro-conditioning
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(e_step(x, torch.tensor(500)), d_step(x, torch.tensor(500)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rule", ["median", "clamp:3"])
def test_reference_threshold_rules_are_the_engines(rule):
    from diffedit_engine.kernels import noise_diff

    maps = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(3)) ** 3  # skewed, as noise maps are
    engine = noise_diff.masks_from_maps(maps[:, None], rule, "argmax", impl="torch").weights[:, 0]
    for b in range(2):
        assert torch.equal(sdxl_bench.threshold_map(maps[b], rule), engine[b])


@torch.no_grad()
def test_load_bench_sdxl_parity_sides_agree(folder, tmp_path):
    io = str(tmp_path / "reference.pt")
    load_bench.parity_diffusers_xl(str(folder), {}, io)
    load_bench.parity_engine_xl(str(folder), {}, io)
    ref, eng = torch.load(io), torch.load(io + ".engine")
    assert torch.equal(eng["ids"], ref["ids"]) and torch.equal(eng["ids_2"], ref["ids_2"])
    assert not torch.equal(ref["ids"], ref["ids_2"])  # the two tokenizers pad differently: both are checked
    for k in ("context", "pooled", "unet"):
        assert load_bench.rel_err(eng[k], ref[k]) <= 1e-5, k
    assert eng["unet"].shape == (2, 4, load_bench.LATENT["sdxl"], load_bench.LATENT["sdxl"])


@torch.no_grad()
def test_load_bench_sdxl_cold_start_scripts_do_the_same_work(folder):
    marks_e, marks_d = {}, {}
    e = load_bench.child_engine_xl(str(folder), marks_e)
    d = load_bench.child_diffusers_xl(str(folder), marks_d)
    assert e["out_abs_mean"] == pytest.approx(d["out_abs_mean"], rel=1e-5)
    assert list(marks_e) == list(marks_d) == ["imported", "loaded", "encoded", "unet"]
