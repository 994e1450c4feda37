"""The synthetic "shapes" world (issue 18): flat coloured circles, squares and triangles on a uniform background,
with their captions. It is what the shipped shapes model is trained on and the ground truth its quality is
judged against, so it depends on numpy and PIL only (no project imports: a leaf of the package).

The world:
- a 128x128 RGB canvas, uniform background: white, gray or black (BACKGROUNDS);
- 1 to 3 objects, each a SHAPES shape in a COLOURS colour inside a square box of side 32..48 px. The circle is
  inscribed in the box, the square fills it, the triangle has its apex at the top middle and its base on the
  bottom edge. Boxes keep >= 4 px from each other and from the border (so they never overlap);
- anti-aliased: each shape is rasterised at 4x and box-filtered down (coverage in [0, 1]);
- caption: the objects from left to right by box centre, "a red circle", "a red circle and a blue square",
  "a red circle, a blue square and a yellow triangle", then " on a white background".

Boxes are (x0, y0, x1, y1) in canvas pixels, x1/y1 exclusive, with x1 - x0 == y1 - y0 == the side.

Seeds. Two disjoint streams of scenes, derived from one SeedSequence with different spawn keys, so a training
index can never produce a held-out scene by accident:
- train_scene(i), i >= 0: the TRAINING stream (benchmarks/train_shapes.py draws only from it);
- heldout_scene(i), i in 0..9999 by convention: the HELD-OUT stream for evaluation, tests and examples.
  scene(seed) is the same as heldout_scene(seed).
sample_scene(rng) draws from any numpy Generator (for callers that manage their own stream).
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased coverage
MIN_SIDE, MAX_SIDE = 32, 48
GAP = 4  # minimum px between two boxes and between a box and the border

BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (24, 24, 24)}
COLOURS = {"red": (215, 48, 39), "green": (26, 152, 80), "blue": (49, 84, 201), "yellow": (240, 200, 40)}
SHAPES = ("circle", "square", "triangle")

_ENTROPY = 18_2026  # the world's root seed (issue 18); changing it changes every scene of both streams
_TRAIN_KEY, _HELDOUT_KEY = 1, 2  # spawn keys of the two streams


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    colour: str  # a key of COLOURS
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive, square

    def __post_init__(self):
        assert self.shape in SHAPES, self.shape
        assert self.colour in COLOURS, self.colour
        x0, y0, x1, y1 = self.box
        assert x1 - x0 == y1 - y0 > 0, f"box {self.box} is not a square"

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def coverage(self) -> np.ndarray:
        return coverage(self.shape, self.box)


@dataclass(frozen=True)
class Scene:
    """objects are kept in caption order (left to right by box centre x, then by centre y for a tie), so
    objects[i] is the i-th phrase of the caption and replace(i, ...) edits that one."""
    background: str  # a key of BACKGROUNDS
    objects: tuple[Obj, ...]

    def __post_init__(self):
        assert self.background in BACKGROUNDS, self.background
        assert 1 <= len(self.objects), "a scene has at least one object"
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.centre)))

    @property
    def caption(self) -> str:
        return f"{objects_phrase(self.objects)} on a {self.background} background"

    def masks(self) -> np.ndarray:
        """(n_objects, SIZE, SIZE) float32 anti-aliased coverage in [0, 1], in caption order."""
        return np.stack([o.coverage() for o in self.objects])

    def render(self) -> np.ndarray:
        """(SIZE, SIZE, 3) uint8: the background, then each object blended by its coverage."""
        img = np.empty((SIZE, SIZE, 3), np.float32)
        img[:] = BACKGROUNDS[self.background]
        for o, m in zip(self.objects, self.masks()):  # boxes never overlap: the blend order does not matter
            img += m[..., None] * (np.asarray(COLOURS[o.colour], np.float32) - img)
        return np.rint(img).astype(np.uint8)

    def replace(self, i: int, shape: str | None = None, colour: str | None = None) -> "Scene":
        """The scene with object i (caption order) changed in shape and/or colour, same box: the ground truth
        of the edit "<objects[i].phrase> -> <new phrase>"."""
        o = self.objects[i]
        new = Obj(shape or o.shape, colour or o.colour, o.box)
        return Scene(self.background, self.objects[:i] + (new,) + self.objects[i + 1:])


def objects_phrase(objects) -> str:
    """'a red circle' / 'a red circle and a blue square' / 'a, b and c' (the objects in the order given)."""
    p = [o.phrase for o in objects]
    return p[0] if len(p) == 1 else ", ".join(p[:-1]) + " and " + p[-1]


def coverage(shape: str, box) -> np.ndarray:
    """(SIZE, SIZE) float32 coverage of `shape` drawn in `box`: rasterised at SUPERSAMPLE x inside the box only,
    then box-filtered (the mean of each SxS block), so edges are anti-aliased and the square's is exact."""
    x0, y0, x1, y1 = box
    s, side = SUPERSAMPLE, (x1 - x0) * SUPERSAMPLE
    hi = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(hi)
    if shape == "circle":
        d.ellipse((0, 0, side - 1, side - 1), fill=255)
    elif shape == "square":
        d.rectangle((0, 0, side - 1, side - 1), fill=255)
    elif shape == "triangle":
        d.polygon([((side - 1) / 2, 0), (0, side - 1), (side - 1, side - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    a = np.asarray(hi, np.float32) / 255.0
    small = a.reshape(side // s, s, side // s, s).mean(axis=(1, 3))
    out = np.zeros((SIZE, SIZE), np.float32)
    out[y0:y1, x0:x1] = small
    return out


def _separated(a, b) -> bool:
    """True when boxes a and b keep at least GAP px apart along x or along y."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def sample_boxes(rng: np.random.Generator, n: int, max_tries: int = 1000) -> list[tuple[int, int, int, int]]:
    """n boxes obeying the rules, by rejection: each box is drawn uniformly (side, then position) until it keeps
    GAP from those already placed; after max_tries failures the whole set is redrawn (a bad early box can leave
    no room for the next)."""
    while True:
        boxes = []
        for _ in range(max_tries):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x0, y0 = (int(v) for v in rng.integers(GAP, SIZE - GAP - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_separated(box, b) for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    return boxes


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: background, n_objects (1..3 uniformly when None), shape and colour uniform and
    independent per object (repeats allowed)."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    assert 1 <= n <= 3, n
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    objs = [Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))], box)
            for box in sample_boxes(rng, n)]
    return Scene(background, tuple(objs))


def _stream_rng(key: int, i: int) -> np.random.Generator:
    assert i >= 0, i
    return np.random.default_rng(np.random.SeedSequence(_ENTROPY, spawn_key=(key, i)))


def train_scene(i: int, n_objects: int | None = None) -> Scene:
    """Scene i of the TRAINING stream (disjoint from the held-out stream)."""
    return sample_scene(_stream_rng(_TRAIN_KEY, i), n_objects)


def heldout_scene(i: int, n_objects: int | None = None) -> Scene:
    """Scene i of the HELD-OUT stream (evaluation, tests, examples: i in 0..9999)."""
    return sample_scene(_stream_rng(_HELDOUT_KEY, i), n_objects)


def scene(seed: int, n_objects: int | None = None) -> Scene:
    """Convenience for examples and evaluation: the held-out scene `seed`."""
    return heldout_scene(seed, n_objects)


def nearest_colour(rgb, palette: dict | None = None) -> str:
    """Name of the palette entry closest to rgb (Euclidean in RGB); palette defaults to the object COLOURS
    (pass BACKGROUNDS to name a background)."""
    palette = COLOURS if palette is None else palette
    names = list(palette)
    d = np.linalg.norm(np.asarray(list(palette.values()), np.float32) - np.asarray(rgb, np.float32)[:3], axis=1)
    return names[int(np.argmin(d))]


def classify_shape(foreground_mask: np.ndarray, box) -> str:
    """The shape whose template drawn in `box` best overlaps the foreground (IoU of the masks thresholded at 0.5);
    foreground_mask is (SIZE, SIZE), bool or coverage in [0, 1]."""
    fg = np.asarray(foreground_mask) > 0.5
    ious = []
    for shape in SHAPES:
        t = coverage(shape, box) > 0.5
        union = np.logical_or(fg, t).sum()
        ious.append(np.logical_and(fg, t).sum() / union if union else 0.0)
    return SHAPES[int(np.argmax(ious))]


# The scene the command line edits when no --image is given with the shapes model (README, command 2): two
# objects far apart on white, so two edits at once each have their own region.
EXAMPLE = Scene("white", (Obj("circle", "red", (12, 40, 56, 84)), Obj("triangle", "yellow", (76, 36, 116, 76))))
