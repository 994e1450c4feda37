"""Smoke test of benchmarks/shapes_quality.py's metrics on rendered ground truth (no model): a perfect edit made
by Scene.replace scores success, the true box's mask has IoU 1, identical images have the capped PSNR, a wrong
colour or shape fails, and the edit sampling is deterministic and follows its rules."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_quality as q  # noqa: E402

from diffedit_engine.engine import shapes  # noqa: E402


def box_mask(box):
    return q.box_cells(box).astype(np.float32)


@pytest.mark.parametrize("task", q.TASKS)
def test_perfect_edit_scores_one(task):
    for seed in q.cases(task, 6):
        sc, edits = q.make_case(task, seed)
        want = q.expected_scene(sc, edits).render()
        rec = q.score(sc, edits, want, [box_mask(sc.objects[i].box) for i, _, _ in edits])
        assert rec["success"] and all(rec["colour_ok"]) and all(rec["shape_ok"])
        assert rec["iou"] == [1.0] * len(edits)
        assert rec["all_preserved"] in (True, None)
        assert rec["psnr"] == q.PSNR_CAP  # the edit changes nothing outside the dilated boxes


def test_wrong_colour_or_shape_fails_and_unedited_input_is_preserved():
    seed = q.cases("colour", 1)[0]
    sc, edits = q.make_case("colour", seed)
    (i, shape, colour), = edits
    wrong = next(c for c in shapes.COLOURS if c not in (colour, sc.objects[i].colour))
    rec = q.score(sc, edits, sc.replace(i, colour=wrong).render())
    assert not rec["success"] and rec["colour"] == [wrong] and rec["shape_ok"] == [True]
    rec = q.score(sc, edits, sc.render())  # nothing changed: the edit failed, the rest is preserved
    assert not rec["success"] and rec["all_preserved"] in (True, None)
    other = next(s for s in shapes.SHAPES if s != shape)
    rec = q.score(sc, edits, sc.replace(i, shape=other, colour=colour).render())
    assert rec["colour_ok"] == [True] and rec["shape"] == [other] and not rec["success"]


def test_readers_on_every_shape_colour_background():
    box = (40, 30, 80, 70)
    for bg in shapes.BACKGROUNDS:
        empty = shapes.Scene(bg, (shapes.Obj("square", "red", (4, 4, 36, 36)),)).render()
        assert q.read_shape(empty, box, bg) == "none"  # nothing drawn there
        assert q.read_colour(empty, shapes.Obj("circle", "red", box), bg) == "background"
        for s in shapes.SHAPES:
            for c in shapes.COLOURS:
                img = shapes.Scene(bg, (shapes.Obj(s, c, box),)).render()
                assert q.read_shape(img, box, bg) == s == shapes.classify_shape(q.foreground(img, box, bg), box)
                assert q.read_colour(img, shapes.Obj(s, c, box), bg) == c


def test_box_cells_iou_psnr():
    cells = q.box_cells((8, 8, 40, 40))  # on the cell grid: cells 1..4 in both directions
    assert cells.shape == (16, 16) and cells.sum() == 16 and cells[1:5, 1:5].all()
    # 4 px past the grid: the edge cells are 50 % inside (kept), the corner cells 25 % (dropped): 9 + 4·3
    cells = q.box_cells((4, 4, 36, 36))
    assert cells.sum() == 21 and cells[1:4, 0].all() and not cells[0, 0] and not cells[4, 4]
    assert q.mask_iou(q.box_cells((8, 8, 40, 40)), (8, 8, 40, 40)) == 1.0
    assert q.mask_iou(np.zeros((16, 16)), (8, 8, 40, 40)) == 0.0
    half = np.zeros((16, 16)); half[1:5, 1:3] = 1; half[10, 10] = 0.7  # 8 cells of the box, 1 outside
    assert q.mask_iou(half, (8, 8, 40, 40)) == pytest.approx(8 / 17)
    a = np.full((128, 128, 3), 100, np.uint8)
    b = a.copy(); b[0, 0, 0] += 10
    assert q.psnr(a, a) == q.PSNR_CAP
    assert q.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / (100 / (128 * 128 * 3))))
    assert q.psnr(a, b, q.outside_boxes([(0, 0, 4, 4)])) == q.PSNR_CAP  # the differing pixel is excluded


def test_interior_is_eroded_high_coverage():
    o = shapes.Obj("square", "red", (10, 10, 42, 42))
    inside = q.interior(o)
    assert inside.sum() == (32 - 4) ** 2 and inside[12:40, 12:40].all()


def test_edit_sampling_is_deterministic_and_follows_the_rules():
    for task in q.TASKS:
        seeds = q.cases(task, 30)
        assert seeds == q.cases(task, 30) and seeds[0] >= q.FIRST_SEED[task]
        for seed in seeds:
            sc, edits = q.make_case(task, seed)
            assert (sc, edits) == q.make_case(task, seed)
            idx = [i for i, _, _ in edits]
            assert len(set(idx)) == len(idx) == (2 if task == "two" else 1)
            assert set(idx) <= set(q.unique_objects(sc))
            for i, s, c in edits:
                o = sc.objects[i]
                assert (s != o.shape) + (c != o.colour) == 1  # exactly one attribute changes per edit
                if task == "colour":
                    assert c != o.colour
                if task == "shape":
                    assert s != o.shape
            pairs = q.pairs_for(sc, edits)
            assert all(src == sc.objects[i].phrase and src != tgt for (src, tgt), i in zip(pairs, idx))
            targets = [t for _, t in pairs]
            assert len(set(targets)) == len(targets) and not set(targets) & {o.phrase for o in sc.objects}
            if task == "two":
                assert 2 <= len(sc.objects) <= 3


def test_statistics():
    p, lo, hi = q.wilson(9, 10)
    assert p == 0.9 and 0.55 < lo < 0.6 and 0.98 < hi < 0.99  # the textbook Wilson interval
    assert q.wilson(10, 10)[1] < 1.0 == q.wilson(10, 10)[2]
    m, se = q.mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1 / np.sqrt(3))


def test_report_from_scored_records():
    """The table, the paired columns and the targets from records scored on ground truth (perfect edits for
    `paper`, unedited inputs for `sequential`): no model involved."""
    recs = []
    for task in ("colour", "two"):
        for seed in q.cases(task, 3):
            sc, edits = q.make_case(task, seed)
            masks = [q.box_cells(sc.objects[i].box).astype(np.float32) for i, _, _ in edits]
            for row, out in (("paper", q.expected_scene(sc, edits).render()), ("sequential", sc.render())):
                if row == "sequential" and task != "two":
                    continue
                rec = q.score(sc, edits, out, masks)
                rec.update(row=row, task=task, seed=seed, seconds=1.0 if row == "paper" else 2.0, load=1.0)
                recs.append(rec)
    meta = dict(command="c", date="d", model="m", model_id="i", model_note="n", machine="x", workers=1, threads=1,
                load="1")
    md, summary = q.report(recs, meta, ["paper", "sequential"])
    assert "| paper | colour | 3 | 1.00 ± 0.00 |" in md
    assert summary["fused_vs_sequential"]["success_diff_points"] == 100.0
    assert summary["fused_vs_sequential"]["time_ratio"] == 0.5
    assert "| sequential | two | 3 | 1.00 ± 0.00 | 100.0 % (44–100) | 0.0 % (0–56) | -100.0 ± 0.0 (n 3) |" in md
    tg = {r[0]: r[3] for r in q.targets(summary)}
    assert tg["colour edit: success"] == "met" and tg["fused vs sequential: time"] == "met"
    assert tg["two edits: success"] == "met"
