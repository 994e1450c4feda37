"""The shape of the public API (docs/design.md §House style): no public function takes more than ten parameters, settings
travel as engine.settings objects, and the keyword style and the object style of a call are the same call."""
import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffedit_engine.engine.edit import diffedit, multidiffusion, regions
from diffedit_engine.engine.edit.settings import EditSettings, MaskSpec
from diffedit_engine.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("a cat", "a dog"), ("", "a red ball")]


def parameter_counts():
    """(count, 'file:line name') of every public function and method of the engine's own code."""
    files = [ROOT / "cli.py"] + [f for d in ("engine", "weights", "kernels") for f in (ROOT / d).rglob("*.py")]
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                a = node.args
                names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                n = len(names) - (names[:1] in (["self"], ["cls"]))
                yield n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def test_no_public_function_takes_more_than_ten_parameters():
    counts = list(parameter_counts())
    assert len(counts) > 200  # the scan saw the code base
    assert [c for c in counts if c[0] > 10] == []


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    return load_model(tiny_folder("sd1"))


def image(seed=0):
    return torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(seed))


def gen():
    return torch.Generator().manual_seed(1)


def test_edit_many_keywords_equal_objects(sd1):
    kw = regions.edit_many(sd1, image(), PAIRS, steps=3, num_maps=2, threshold="otsu", overlap="subtract",
                           smooth=1.0, close=3, strength=0.7, guidance_scale=5.0, output="latent", generator=gen())
    s = EditSettings(steps=3, num_maps=2, threshold="otsu", overlap="subtract", strength=0.7, guidance_scale=5.0)
    obj = regions.edit_many(sd1, image(), PAIRS, s, mask=replace(s.mask(), smooth=1.0, close=3), output="latent",
                            generator=gen())
    assert torch.equal(kw.latents, obj.latents) and torch.equal(kw.masks, obj.masks)
    # an option names a field of both: it sets both (here over an explicit mask spec)
    over = regions.edit_many(sd1, image(), PAIRS, s, mask=MaskSpec(num_maps=2, smooth=1.0, close=3),
                             threshold="otsu", overlap="subtract", output="latent", generator=gen())
    assert torch.equal(over.masks, kw.masks)
    other = regions.edit_many(sd1, image(), PAIRS, s, output="latent", generator=gen())  # no smoothing/closing
    assert not torch.equal(other.masks, kw.masks)  # the mask spec's own fields do reach the masks


def test_masks_alone_equal_edit_many_masks(sd1):
    spec = MaskSpec(num_maps=2, threshold="median", extremes=0.05)
    mr = regions.masks(sd1, image(), PAIRS, spec, steps=3, generator=gen())
    em = regions.edit_many(sd1, image(), PAIRS, EditSettings(steps=3), mask=spec, output="latent", generator=gen())
    assert torch.equal(mr.weights, em.masks)


def test_extremes_clip_min_max_rules_only(sd1):
    maps = torch.rand(1, 2, 8, 8, generator=gen()) ** 4
    maps[0, 0, 0, 0] = 50.0  # one outlier: min–max rescaling squashes every other score towards 0
    plain = regions.make_masks(maps, MaskSpec(threshold="fixed:0.3"))[0]
    clipped = regions.make_masks(maps, MaskSpec(threshold="fixed:0.3", extremes=0.02))[0]
    assert plain[0, 0].sum() == 1 and clipped[0, 0].sum() > 1
    clamp = regions.make_masks(maps, MaskSpec(threshold="clamp:3"))  # not min–max: extremes do not apply
    assert all(torch.equal(a, b) for a, b in zip(clamp, regions.make_masks(maps, MaskSpec(threshold="clamp:3",
                                                                                          extremes=0.02))))


def test_generate_mask_closes_and_refuses_what_one_mask_cannot_use(sd1):
    base = diffedit.generate_mask(sd1, image(), "a cat", "a dog", num_maps=2, steps=3, generator=gen())
    closed = diffedit.generate_mask(sd1, image(), "a cat", "a dog", diffedit.PAPER, num_maps=2, close=3, steps=3,
                                    generator=gen())
    assert torch.equal(closed, regions.close_masks(base, 3)) and (closed >= base).all()
    with pytest.raises(ValueError, match="overlap"):
        diffedit.generate_mask(sd1, image(), "a cat", "a dog", overlap="soft", num_maps=1, steps=2)
    with pytest.raises(ValueError, match="no smoothing, closing or clipping"):
        diffedit.generate_mask(sd1, image(), "a cat", "a dog", compat="diffusers", extremes=0.01, num_maps=1, steps=2)


def test_unknown_and_bad_options_are_errors_before_any_work(sd1):
    class NoUNet:
        def __call__(self, *a, **k):
            raise AssertionError("the UNet ran")

    unet, sd1.unet = sd1.unet, NoUNet()
    try:
        with pytest.raises(TypeError, match="edit_many.*tresh"):
            regions.edit_many(sd1, image(), PAIRS, tresh="otsu")
        with pytest.raises(TypeError, match="masks.*strength"):
            regions.masks(sd1, image(), PAIRS, strength=0.5)  # a field of EditSettings, not of the mask step
        with pytest.raises(TypeError, match="generate_mask.*editor"):
            diffedit.generate_mask(sd1, image(), "a", "b", editor="inpaint")
        with pytest.raises(TypeError, match="edit.*threshold"):
            diffedit.edit(sd1, torch.zeros(3, 4, 6, 8), torch.ones(6, 8), "b", threshold="otsu")
        with pytest.raises(TypeError, match="generate.*strength"):
            multidiffusion.generate(sd1, torch.ones(1, 6, 8), ["a"], strength=0.5)
        with pytest.raises(ValueError, match="num_maps"):
            regions.masks(sd1, image(), PAIRS, num_maps=0)
        with pytest.raises(ValueError, match="extremes"):
            regions.edit_many(sd1, image(), PAIRS, mask=MaskSpec(extremes=0.5))
        with pytest.raises(ValueError, match="compat"):
            regions.edit_many(sd1, image(), PAIRS[:1], compat="diffusers")
    finally:
        sd1.unet = unet
