"""The shipped shapes model (weights/data/shapes/, issue 18 item 4) edits what it is told and nothing else, through
the CLI's engine (Editor, EditSettings() defaults: DDIM 50, clamp:3, argmax), on a handful of held-out scenes:
- a colour edit's mask covers its object and not the others, the object changes colour, the rest is unchanged;
- two edits at once give two masks on the two objects, and both objects change;
- an edit whose source names no object in the scene gives a (near-)empty mask, and a warning.
Scored with benchmarks/shapes_quality.py's exact metrics (its docstring defines them).

The scenes are not picked by looking at results. They are the FIRST held-out seeds from 9000 up (the suite uses
0..~400 and 5000..~5400; the training run's midway checks 9500+) that qualify under the suite's own edit rule
(shapes_quality.make_case), with >= 2 objects for the colour edit so that "not the others" can be checked:
colour edits on seeds 9001 and 9002, two edits on 9001 and 9002, the absent source on 9001. The edits are the
rule's, the generator seed is the scene's seed, as in the suite. Thresholds are the issue's targets (mask IoU
>= 0.5 per mask, background PSNR >= 30 dB here against the suite's 32 dB mean target: one scene, not a mean).
"""
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import shapes_quality as q  # noqa: E402
from tiny import one_thread  # noqa: E402,F401  (one torch thread in this module: a small UNet, a shared CPU)

from diffedit_engine.engine import shapes  # noqa: E402

MODEL = Path(os.environ.get("DIFFEDIT_SHAPES_MODEL", ROOT / "weights" / "data" / "shapes"))  # the env: a dev export
FIRST = 9000
PSNR_MIN = 30.0
IOU_MIN = 0.5
OTHER_MAX = 0.1  # share of another object's box cells a mask may cover
EMPTY_MAX = 0.05  # share of all latent cells a "near-empty" mask may cover

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(),
                                reason=f"the shipped shapes model {MODEL}/ is absent "
                                       "(benchmarks/train_shapes.py exports it there)")


def first_cases(task, n, min_objects=1):
    out, s = [], FIRST
    while len(out) < n:
        c = q.make_case(task, s)
        if c is not None and len(c[0].objects) >= min_objects:
            out.append(s)
        s += 1
    return out


COLOUR_SEEDS = first_cases("colour", 2, min_objects=2)
TWO_SEEDS = first_cases("two", 2)
ABSENT_SEED = COLOUR_SEEDS[0]


def test_seeds_are_the_rule():
    """The documented seeds are what the rule gives (a change to the rule or the world shows up here)."""
    assert COLOUR_SEEDS == [9001, 9002] and TWO_SEEDS == [9001, 9002] and ABSENT_SEED == 9001


@pytest.fixture(scope="module")
def editor():
    from diffedit_engine.engine.runtime import Editor, EditorOptions
    from diffedit_engine.weights import load_model

    return Editor(load_model(MODEL), EditorOptions())


def run(editor, sc, pairs, seed):
    x = q.to_tensor(sc.render())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = editor.edit(x, pairs, seed=seed)
    return q.to_uint8(r.image), [m.float().numpy() for m in r.masks], caught


def covered(mask, box) -> float:
    """Share of box's latent cells (>= 50 % inside the box) that the mask covers."""
    b = q.box_cells(box)
    return float(np.logical_and(np.asarray(mask) > 0.5, b).sum() / b.sum())


# The shipped model (3600 UNet steps, exported 19:04 UTC 2026-12-07) does not meet these yet: on these scenes its
# masks have IoU 0.05-0.53 with the edited box and the absent source's mask covers 12 % of the image
# (benchmarks/RESULTS.md, shapes_quality: mean IoU and success far below the targets). The checks stay,
# marked; a model that passes them shows as XPASS: then drop SHORT.
SHORT = pytest.mark.xfail(strict=True, reason="the shipped shapes model falls short of issue 18's targets "
                                               "(benchmarks/RESULTS.md, shapes_quality)")


@pytest.fixture(scope="module")
def results(editor):
    """Every edit of the module once: {(task, seed): (scene, edits, output, masks, warnings)}."""
    out = {}
    for task, seeds in (("colour", COLOUR_SEEDS), ("two", TWO_SEEDS)):
        for seed in seeds:
            sc, edits = q.make_case(task, seed)
            out[(task, seed)] = (sc, edits, *run(editor, sc, q.pairs_for(sc, edits), seed))
    return out


@pytest.mark.parametrize("task", ["colour", "two"])
def test_one_mask_per_pair_disjoint_and_the_image(results, task):
    """What the engine guarantees whatever the weights: one latent-resolution mask per pair, argmax masks
    disjoint, an image of the input's size."""
    for seed in (COLOUR_SEEDS if task == "colour" else TWO_SEEDS):
        sc, edits, out, masks, _ = results[(task, seed)]
        assert len(masks) == len(edits) and all(m.shape == (16, 16) for m in masks)
        assert (np.sum([m > 0.5 for m in masks], 0) <= 1).all()
        assert out.shape == (shapes.SIZE, shapes.SIZE, 3) and out.dtype == np.uint8


@SHORT
@pytest.mark.parametrize("seed", COLOUR_SEEDS)
def test_colour_edit_changes_its_object_only(results, seed):
    sc, edits, out, (mask,), _ = results[("colour", seed)]
    (i, shape, colour), = edits
    rec = q.score(sc, edits, out, [mask])
    assert rec["iou"][0] >= IOU_MIN, f"mask IoU {rec['iou'][0]:.2f} with the edited object's box"
    for j, o in enumerate(sc.objects):
        if j != i:
            assert covered(mask, o.box) <= OTHER_MAX, f"the mask covers {covered(mask, o.box):.0%} of {o.phrase}"
    assert rec["colour"] == [colour] and rec["shape"] == [shape], f"read {rec['colour']} {rec['shape']}"
    assert rec["all_preserved"], "an object that was not edited changed"
    assert rec["psnr"] >= PSNR_MIN, f"background PSNR {rec['psnr']:.1f} dB"


@SHORT
@pytest.mark.parametrize("seed", TWO_SEEDS)
def test_two_edits_two_masks_both_change(results, seed):
    sc, edits, out, masks, _ = results[("two", seed)]
    rec = q.score(sc, edits, out, masks)
    assert min(rec["iou"]) >= IOU_MIN, f"mask IoUs {rec['iou']}"
    for (i, _, _), other in zip(edits, edits[::-1]):  # each mask on its own object, not on the other
        m = masks[[e[0] for e in edits].index(i)]
        assert covered(m, sc.objects[other[0]].box) <= OTHER_MAX
    assert rec["success"], f"read colours {rec['colour']} shapes {rec['shape']}, wanted {edits}"
    assert rec["all_preserved"] in (True, None)


def absent_pair(sc):
    """A source naming no object of the scene: the first (shape, colour) in the world's order with neither the
    shape nor the colour in the scene (else only the phrase absent), and a target in another absent colour."""
    have = {o.phrase for o in sc.objects}
    cols, shps = {o.colour for o in sc.objects}, {o.shape for o in sc.objects}
    opts = [(s, c) for s in shapes.SHAPES for c in shapes.COLOURS if f"a {c} {s}" not in have]
    s, c = next(((s, c) for s, c in opts if s not in shps and c not in cols), opts[0])
    free = [k for k in shapes.COLOURS if k != c and f"a {k} {s}" not in have]
    t = next((k for k in free if k not in cols), free[0])
    return f"a {c} {s}", f"a {t} {s}"


def test_absent_pair_is_the_rule():
    assert absent_pair(shapes.heldout_scene(ABSENT_SEED)) == ("a red square", "a yellow square")


@pytest.fixture(scope="module")
def absent(editor):
    sc = shapes.heldout_scene(ABSENT_SEED)
    pair = absent_pair(sc)
    out, (mask,), caught = run(editor, sc, [pair], ABSENT_SEED)
    return sc, pair, out, mask, caught


@SHORT
def test_absent_source_gives_a_near_empty_mask(absent):
    sc, pair, out, mask, _ = absent
    share = float((mask > 0.5).mean())
    assert share <= EMPTY_MAX, f"{pair}: the mask covers {share:.0%} of the image"
    assert all(covered(mask, o.box) <= OTHER_MAX for o in sc.objects)
    rec = q.score(sc, [], out)
    assert rec["all_preserved"], "an edit of nothing changed an object"


@pytest.mark.xfail(strict=True, reason="the engine does not warn when a mask is (near-)empty yet (reported, issue 18 "
                                       "item 4); remove this mark when it does")
def test_absent_source_warns(absent):
    _, _, _, _, caught = absent
    assert any(issubclass(w.category, UserWarning) for w in caught), [str(w.message) for w in caught]
