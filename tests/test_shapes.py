"""The shapes world generator (engine/shapes.py): deterministic scenes, the box rules, captions, and the small
classifiers the quality suite judges generated images with."""
import numpy as np
import pytest

from diffedit_engine.engine import shapes

SEEDS = range(40)


def test_render_is_deterministic_per_seed_and_streams_differ():
    a, b = shapes.scene(3), shapes.scene(3)
    assert a == b
    assert np.array_equal(a.render(), b.render())
    assert shapes.scene(3) == shapes.heldout_scene(3)
    # The training and held-out streams share no scene among the first indices (disjoint spawn keys).
    train = {shapes.train_scene(i) for i in range(50)}
    assert not train & {shapes.heldout_scene(i) for i in range(50)}
    assert len(train) == 50


@pytest.mark.parametrize("seed", SEEDS)
def test_boxes_obey_the_rules(seed):
    s = shapes.train_scene(seed)
    assert 1 <= len(s.objects) <= 3
    for o in s.objects:
        x0, y0, x1, y1 = o.box
        assert shapes.MIN_SIDE <= x1 - x0 == y1 - y0 <= shapes.MAX_SIDE
        assert min(x0, y0) >= 4 and max(x1, y1) <= shapes.SIZE - 4
    for i, a in enumerate(s.objects):
        for b in s.objects[i + 1:]:
            gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
            gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gap_x, gap_y) >= 4, (a.box, b.box)


def test_object_count_is_uniform_and_forced_counts_work():
    counts = np.bincount([len(shapes.train_scene(i).objects) for i in range(300)], minlength=4)
    assert counts[0] == 0 and all(70 <= c <= 130 for c in counts[1:]), counts
    assert all(len(shapes.heldout_scene(i, n_objects=3).objects) == 3 for i in range(10))


def test_captions_read_left_to_right():
    s = shapes.Scene("gray", (shapes.Obj("triangle", "yellow", (80, 10, 112, 42)),
                              shapes.Obj("circle", "red", (4, 60, 40, 96)),
                              shapes.Obj("square", "blue", (44, 20, 76, 52))))
    assert s.caption == "a red circle, a blue square and a yellow triangle on a gray background"
    assert s.objects[0].phrase == "a red circle"
    two = shapes.Scene("white", s.objects[1:])
    assert two.caption == "a blue square and a yellow triangle on a white background"
    assert shapes.Scene("black", s.objects[:1]).caption == "a red circle on a black background"
    for seed in SEEDS:
        xs = [o.centre[0] for o in shapes.scene(seed).objects]
        assert xs == sorted(xs)


def test_render_masks_and_replace():
    s = shapes.scene(7, n_objects=2)
    img, m = s.render(), s.masks()
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert m.shape == (2, 128, 128) and m.min() >= 0 and m.max() <= 1
    # Anti-aliased: circle and triangle edges have partial coverage (a square's integer box has none).
    assert any(((0.05 < mm) & (mm < 0.95)).any() for mm, o in zip(m, s.objects) if o.shape != "square")
    bg = np.asarray(shapes.BACKGROUNDS[s.background])
    assert (img[m.sum(0) == 0] == bg).all()
    for o, mm in zip(s.objects, m):
        assert (img[mm == 1] == np.asarray(shapes.COLOURS[o.colour])).all()
    e = s.replace(1, colour="green" if s.objects[1].colour != "green" else "red", shape="square")
    assert e.objects[1].box == s.objects[1].box and e.objects[1].shape == "square"
    assert e.objects[0] == s.objects[0] and e.background == s.background
    assert not np.array_equal(e.render(), img)


def test_circle_is_inscribed_square_fills_triangle_apex_top():
    box = (10, 20, 50, 60)
    sq, ci, tr = (shapes.coverage(k, box) for k in ("square", "circle", "triangle"))
    assert sq.sum() == 40 * 40 and sq[20:60, 10:50].min() == 1
    assert abs(ci.sum() - np.pi * 20 ** 2) < 0.02 * np.pi * 20 ** 2
    assert abs(tr.sum() - 40 * 40 / 2) < 0.03 * 800
    assert tr[20, 29:31].max() > 0.3 and tr[20, 10:20].max() == 0  # apex at the top middle only
    assert tr[59, 11:49].min() > 0.5  # base along the bottom edge


@pytest.mark.parametrize("seed", SEEDS)
def test_classify_shape_and_nearest_colour_recover_rendered_objects(seed):
    s = shapes.scene(seed)
    img = s.render()
    bg = np.asarray(shapes.BACKGROUNDS[s.background], np.float32)
    fg = np.linalg.norm(img.astype(np.float32) - bg, axis=-1) > 40
    for o, m in zip(s.objects, s.masks()):
        x0, y0, x1, y1 = o.box
        inside = np.zeros_like(fg)
        inside[y0:y1, x0:x1] = True
        assert shapes.classify_shape(fg & inside, o.box) == o.shape
        assert shapes.nearest_colour(np.median(img[m > 0.99], axis=0)) == o.colour
    assert shapes.nearest_colour(img[0, 0], shapes.BACKGROUNDS) == s.background
    assert shapes.nearest_colour((200, 60, 60)) == "red" and shapes.nearest_colour((60, 90, 180)) == "blue"
