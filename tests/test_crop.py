"""engine/edit/crop.py (issue 23, lever 2): the crop box's arithmetic, the cropped route equal to the full frame
bit for bit when the margin covers the latent, the background exact with a small margin, and the refusals."""
import pytest
import torch
from PIL import Image

from diffedit_engine import cli
from diffedit_engine.engine.edit import crop, regions, toolkit
from diffedit_engine.engine.edit.settings import EditSettings
from diffedit_engine.weights import load_model

STEPS = 3
KW = dict(steps=STEPS, num_maps=2, output="latent")


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    return load_model(tiny_folder("sd1"))


@pytest.fixture(scope="module")
def deep(tiny_folder):
    return load_model(tiny_folder("deep"))


def image(seed=0, b=None, size=64):
    shape = (3, size, size) if b is None else (b, 3, size, size)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def masks_at(h, w, *cells, B=1):
    """(B, len(cells), h, w) masks, mask i one at each (row, col) of cells[i] (in every image)."""
    out = torch.zeros(B, len(cells), h, w)
    for i, group in enumerate(cells):
        for r, c in group:
            out[:, i, r, c] = 1.0
    return out


# ---- the box -----------------------------------------------------------------------------------------------


def test_size_multiple_counts_the_down_blocks(sd1, deep):
    assert crop.size_multiple(sd1) == 2 and crop.size_multiple(deep) == 4


def test_box_is_grown_rounded_up_and_centred():
    # one cell at (10, 20) of 32 x 40; margin 1 -> 3 cells, rounded up to 4: the extra cell below / right
    assert crop.crop_box(masks_at(32, 40, [(10, 20)]), 1, 4) == crop.Box(9, 19, 4, 4)
    # margin 0, multiple 8: rows 10..12 (3) -> 8 from row 8 (5 extra: 2 before); column 20 (1) -> 8 from 17
    assert crop.crop_box(masks_at(32, 40, [(10, 20), (12, 20)]), 0, 8) == crop.Box(8, 17, 8, 8)
    # already a multiple: no change
    assert crop.crop_box(masks_at(32, 40, [(8, 8), (11, 11)]), 0, 4) == crop.Box(8, 8, 4, 4)


def test_box_shifts_at_the_borders_and_clamps_to_the_latent():
    b = crop.crop_box(masks_at(32, 40, [(0, 39)]), 2, 4)  # top-right corner: shifted inside, size kept
    assert b == crop.Box(0, 32, 8, 8)
    b = crop.crop_box(masks_at(32, 40, [(31, 0)]), 1, 8)  # bottom-left
    assert b == crop.Box(24, 0, 8, 8)
    assert crop.crop_box(masks_at(32, 40, [(5, 5)]), 1024, 8) == crop.Box(0, 0, 32, 40)  # the whole latent
    # rows: 9 cells -> 12 from row -1, shifted to 0; columns: 12 > 10 cells (no multiple): the whole side
    assert crop.crop_box(masks_at(16, 10, [(4, 5)]), 4, 4) == crop.Box(0, 0, 12, 10)


def test_box_is_the_union_over_pairs_and_batch():
    m = torch.zeros(2, 2, 32, 32)
    m[0, 0, 4, 4] = 1.0      # image 0, pair 0
    m[1, 1, 20, 27] = 0.25   # image 1, pair 1: a soft weight counts as nonzero
    assert crop.crop_box(m, 0, 4) == crop.Box(3, 4, 20, 24)  # rows 4..20 (17) -> 20 from 3; columns 4..27 (24)
    assert crop.crop_box(m[:1], 0, 4) == crop.Box(3, 3, 4, 4)


def test_empty_masks_have_no_box_and_run_no_unet(sd1):
    assert crop.crop_box(torch.zeros(2, 3, 8, 8), 2, 4) is None
    z0 = torch.randn(2, 4, 8, 8, generator=gen())

    class Refuse:
        config = sd1.unet.config

        def __call__(self, *a, **k):
            raise AssertionError("the UNet ran on empty masks")

    unet, sd1.unet = sd1.unet, Refuse()
    try:
        z, samples, cells = regions.fused_edit_cropped(sd1, z0, torch.zeros(2, 1, 8, 8), ["a dog"],
                                                    EditSettings(steps=STEPS, crop_margin=2))
    finally:
        sd1.unet = unet
    assert torch.equal(z, z0) and z is not z0 and samples == 0 and cells == 0


@pytest.mark.parametrize("masks, margin, why", [
    (torch.zeros(8, 8), 1, r"masks must be \(B, N, h, w\)"),
    (torch.zeros(1, 1, 8, 8), -1, "crop margin must be an integer >= 0"),
    (torch.zeros(1, 1, 8, 8), 1.5, "crop margin must be an integer >= 0"),
])
def test_box_bad_inputs_are_one_line_errors(masks, margin, why):
    with pytest.raises(ValueError, match=why):
        crop.crop_box(masks, margin, 4)


# ---- the route ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
@pytest.mark.parametrize("pairs", [[("a cat", "a dog")], [("a cat", "a dog"), ("", "a red ball")]])
def test_margin_over_the_whole_latent_is_the_full_frame_bit_for_bit(sd1, scheduler, pairs):
    img = image(3)
    full = regions.edit_many(sd1, img, pairs, scheduler=scheduler, generator=gen(), **KW)
    cropped = regions.edit_many(sd1, img, pairs, scheduler=scheduler, crop_margin=1024, generator=gen(), **KW)
    assert full.masks.sum() > 0 and torch.equal(cropped.masks, full.masks)
    assert torch.equal(cropped.latents, full.latents)
    assert cropped.unet_samples == full.unet_samples and cropped.work == full.work == full.unet_samples * 64


def test_margin_over_the_whole_latent_with_deepcache_is_the_full_frame_bit_for_bit(sd1):
    """The "fastest" preset's combination: the crop route passes cache_interval on."""
    img, pairs = image(7), [("a cat", "a dog")]
    full = regions.edit_many(sd1, img, pairs, cache_interval=2, generator=gen(), **KW)
    cropped = regions.edit_many(sd1, img, pairs, cache_interval=2, crop_margin=1024, generator=gen(), **KW)
    exact = regions.edit_many(sd1, img, pairs, generator=gen(), **KW)
    assert full.masks.sum() > 0 and torch.equal(cropped.latents, full.latents)
    assert not torch.equal(full.latents, exact.latents)  # the cache did change the computation


def test_margin_over_the_whole_latent_batch_with_a_generator_list(sd1):
    img, pairs = image(4, b=2), [("a cat", "a dog"), ("", "a red ball")]
    full = regions.edit_many(sd1, img, pairs, generator=[gen(1), gen(2)], **KW)
    cropped = regions.edit_many(sd1, img, pairs, crop_margin=1024, generator=[gen(1), gen(2)], **KW)
    assert full.latents.shape == (2, 4, 8, 8) and full.masks.sum() > 0
    assert torch.equal(cropped.latents, full.latents) and cropped.unet_samples == full.unet_samples


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_small_crop_keeps_the_background_exact_and_changes_the_masked_cells(deep, scheduler):
    """Given masks on a 16 x 16 latent (batch 2): outside the masks the result is z0 bit for bit, inside it is
    an edit, and with two cells of margin it differs from the full frame's (the context is smaller)."""
    z0 = toolkit.encode_image(deep, image(5, b=2, size=128))
    w = masks_at(16, 16, [(6, 6), (6, 7), (7, 6)], [(8, 9)], B=2)
    kw = dict(steps=STEPS, scheduler=scheduler)
    z, samples, cells = regions.fused_edit_cropped(deep, z0, w, ["a dog", "a red ball"],
                                                EditSettings(crop_margin=2, **kw))
    assert crop.crop_box(w, 2, 4) == crop.Box(4, 4, 8, 8) and cells == 64
    inv = regions.invert_shared(deep, z0, **kw)
    ref = regions.fused_edit(deep, inv, w, ["a dog", "a red ball"], **kw)
    assert samples == 2 * (inv.shape[1] - 1) * 4  # B · S · (inversion + ∅ + 2 targets), as the full frame's
    bg = (w.sum(1, keepdim=True) == 0).expand_as(z0)
    assert torch.equal(z[bg], z0[bg]) and torch.equal(ref[bg], z0[bg])
    assert not torch.equal(z[~bg], z0[~bg])
    assert not torch.equal(z[~bg], ref[~bg])


def test_edit_many_small_margin_background_exact_and_less_work(deep):
    """Through edit_many with the masks of the mask pass: the latent is z0 wherever the masks are zero; the
    image is the full frame's beyond the masks' reach (background "pixels" keeps the input there); the work is
    the mask pass's plus the crop's."""
    img, pairs = image(6, size=128), [("a cat", "a dog")]
    opts = dict(threshold="quantile:0.97", smooth=1.5, steps=STEPS, num_maps=2)
    full = regions.edit_many(deep, img, pairs, output="latent", generator=gen(3), **opts)
    box = crop.crop_box(full.masks[None], 1, 4)
    assert box is not None and box.cells < 16 * 16
    r = regions.edit_many(deep, img, pairs, output="latent", crop_margin=1, generator=gen(3), **opts)
    z0 = toolkit.encode_image(deep, img[None])[0]
    bg = (r.masks.sum(0, keepdim=True) == 0).expand_as(z0)
    assert torch.equal(r.masks, full.masks) and torch.equal(r.latents[bg], z0[bg])
    ms = regions.masks(deep, img, pairs, steps=STEPS, num_maps=2, threshold="quantile:0.97", smooth=1.5,
                       generator=gen(3)).unet_samples
    assert r.unet_samples == full.unet_samples and full.work == full.unet_samples * 256
    assert r.work == ms * 256 + (r.unet_samples - ms) * box.cells < full.work
    # beyond the masks, dilated by keep_pixels' 8 + 8 px, both images are the input's own pixels
    a = regions.edit_many(deep, img, pairs, crop_margin=1, generator=gen(3), **opts).image
    b = regions.edit_many(deep, img, pairs, generator=gen(3), **opts).image
    reach = torch.nn.functional.max_pool2d(r.masks.amax(0)[None, None], 5, stride=1, padding=2)[0, 0] > 0
    far = ~torch.nn.functional.interpolate(reach[None, None].float(), size=(128, 128))[0, 0].bool()
    assert far.any() and torch.equal(a[:, far], img[:, far]) and torch.equal(b[:, far], img[:, far])
    assert not torch.equal(a, b)


# ---- refusals ----------------------------------------------------------------------------------------------


def test_flow_model_refuses_crop_margin_before_any_work(tmp_path_factory):
    import tiny_sd3

    m = load_model(tiny_sd3.make_folder(tmp_path_factory.mktemp("sd3"), "sd3"))

    def refuse(*a, **k):
        raise AssertionError("work ran before the refusal")

    m.transformer, m.encode_prompt = refuse, refuse
    with pytest.raises(ValueError, match="crop_margin applies to SD models' UNet; a flow model"):
        regions.edit_many(m, torch.rand(3, 32, 32), [("a cat", "a dog")], crop_margin=2, steps=2)


@pytest.mark.parametrize("args, words", [
    (["--crop-margin", "2", "--editor", "inpaint"], "--crop-margin 2: applies to the fused editor"),
    (["--crop-margin", "-1"], "-1"),
])
def test_cli_refuses_in_one_line(capsys, tmp_path, tiny_folder, args, words):
    photo = tmp_path / "cat.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(photo)
    rc = cli.main(["edit", "--model", str(tiny_folder("sd1")), "--image", str(photo), "--edit", "cat -> dog",
                   "--out", str(tmp_path / "r.png"), "--steps", "2", "--maps", "1", *args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("diffedit: error: ") and words in lines[0], err
    assert not (tmp_path / "r.png").exists()
