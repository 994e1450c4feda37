"""The README's command 2 with the shipped shapes model: two edits at once on the example scene (engine.shapes.
EXAMPLE, "a red circle and a yellow triangle on a white background") through the CLI's engine with its defaults.
Each mask lies on its own object, each object takes its target colour and keeps its shape, and every pixel beyond
the masks' reach is the input's. Scored with the world's own readers (engine/shapes.py: nearest_colour,
classify_shape) against the ground truth the scene knows exactly. The shipped model is weak on harder edits
(benchmarks/RESULTS.md, "Shapes world"); this one it must get right, or command 2 shows a user a wrong picture.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import one_thread  # noqa: F401  (autouse: one torch thread, a small UNet on a shared CPU)

from diffedit_engine.engine import shapes
from diffedit_engine.engine.runtime import Editor

MODEL = Path(__file__).resolve().parent.parent / "weights" / "data" / "shapes"
EDITS = [("a red circle", "a blue circle"), ("a yellow triangle", "a blue triangle")]  # README, command 2


@pytest.fixture(scope="module")
def edited():
    ed = Editor.from_pretrained(MODEL, "cpu", torch.float32, compile=False)
    x = torch.from_numpy(shapes.EXAMPLE.render()).permute(2, 0, 1).float() / 255
    r = ed.edit(x, EDITS, seed=0)
    img = (r.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return x, r, img


def cells(obj) -> np.ndarray:
    """(16, 16) latent cells (8 px) at least half covered by the object's own shape (a triangle fills half
    its box: its box's cells would count background the mask rightly leaves out)."""
    return obj.coverage().reshape(16, 8, 16, 8).mean((1, 3)) >= 0.5


def test_each_mask_is_on_its_own_object(edited):
    _, r, _ = edited
    circle, triangle = shapes.EXAMPLE.objects
    for mask, mine, other in ((r.masks[0], circle, triangle), (r.masks[1], triangle, circle)):
        m = mask.numpy() > 0.5
        assert m[cells(mine)].mean() >= 0.5, "the mask misses its object"
        assert m[cells(other)].mean() <= 0.1, "the mask covers the other object"


def test_each_object_takes_its_target(edited):
    _, _, img = edited
    for obj, (_, target) in zip(shapes.EXAMPLE.objects, EDITS):
        colour, shape = target.split()[1:]
        inside = obj.coverage() >= 0.9
        assert shapes.nearest_colour(np.median(img[inside], 0)) == colour
        bg = np.asarray(shapes.BACKGROUNDS[shapes.EXAMPLE.background], np.float32)
        x0, y0, x1, y1 = obj.box
        fg = np.zeros(inside.shape, bool)
        fg[y0:y1, x0:x1] = np.linalg.norm(img[y0:y1, x0:x1].astype(np.float32) - bg, axis=-1) > 60
        assert shapes.classify_shape(fg, obj.box) == shape


def test_the_background_beyond_the_masks_is_the_input(edited):
    x, r, img = edited
    near = torch.nn.functional.max_pool2d(r.masks.amax(0)[None, None], 5, stride=1, padding=2)  # 16 px = 2 cells
    far = near[0, 0].repeat_interleave(8, 0).repeat_interleave(8, 1).numpy() == 0
    assert far.mean() > 0.25 and np.array_equal(img[far], shapes.EXAMPLE.render()[far])
