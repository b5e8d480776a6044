"""The synthetic world of the demo model (issue 14), exactly as specified there.

A 336 x 336 RGB canvas, background (200, 200, 200), 1 to 4 shapes drawn with PIL ``ImageDraw``
(no anti-aliasing), each inside an axis-aligned square box of side 48 to 96 px that lies fully
inside the canvas, boxes at least 8 px apart. Kinds: circle (the ellipse filling the box), square
(the box), triangle (isosceles, apex at the top centre of the box, base along its bottom edge).
Four colours. Four question types with one-word lower-case answers (see ``questions``).

A box is ``(x0, y0, x1, y1)`` with ``x1 = x0 + side`` exclusive: it covers pixels x0..x1-1.
"Apart" means at least 8 background columns or rows between two boxes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 336
BACKGROUND = (200, 200, 200)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40),
}
KINDS = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE, MIN_GAP = 48, 96, 8
MAX_SHAPES = 4
MIDLINE = SIZE / 2
LR_MARGIN = 40  # left/right is asked only when the box centre is this far from the midline
QTYPES = ("color", "exists", "count", "leftright")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1 (exclusive), y1 (exclusive)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Question:
    qtype: str
    question: str
    answer: str


def gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Background columns / rows between two boxes (negative when they overlap on both axes)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def sample_scene(rng: random.Random) -> list[Shape]:
    """1 to 4 shapes of uniform kind and colour, placed by rejection sampling."""
    n = rng.randint(1, MAX_SHAPES)
    shapes: list[Shape] = []
    while len(shapes) < n:
        side = rng.randint(MIN_SIDE, MAX_SIDE)
        x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
        box = (x0, y0, x0 + side, y0 + side)
        if all(gap(box, s.box) >= MIN_GAP for s in shapes):
            shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLORS)), box))
    return shapes


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def render(shapes: list[Shape]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(draw, s, COLORS[s.color])
    return img


def label_map(shapes: list[Shape]) -> Image.Image:
    """An "L" image: 0 = background, 1 + index into ``shape_classes()`` where a shape is drawn
    (same drawing calls as ``render``, so the pixels match exactly)."""
    img = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(img)
    classes = shape_classes()
    for s in shapes:
        draw_shape(draw, s, 1 + classes.index((s.color, s.kind)))
    return img


def shape_classes() -> list[tuple[str, str]]:
    return [(c, k) for c in COLORS for k in KINDS]


def questions(shapes: list[Shape], rng: random.Random) -> list[Question]:
    """At most one question of each type for a scene (a type with nothing to ask is skipped)."""
    out = []
    for make in (_color_q, _exists_q, _count_q, _leftright_q):
        q = make(shapes, rng)
        if q is not None:
            out.append(q)
    return out


def _color_q(shapes, rng):
    single = [k for k in KINDS if sum(s.kind == k for s in shapes) == 1]
    if not single:
        return None
    kind = rng.choice(single)
    return color_question(kind, next(s.color for s in shapes if s.kind == kind))


def _exists_q(shapes, rng):
    present = sorted({(s.color, s.kind) for s in shapes})
    if rng.random() < 0.5:
        color, kind = rng.choice(present)
        answer = "yes"
    else:
        color, kind = rng.choice([ck for ck in shape_classes() if ck not in present])
        answer = "no"
    return exists_question(color, kind, answer)


def _count_q(shapes, rng):
    kind = rng.choice(KINDS)
    return count_question(kind, sum(s.kind == kind for s in shapes))


def _leftright_q(shapes, rng):
    ok = leftright_candidates(shapes)
    if not ok:
        return None
    return leftright_question(rng.choice(ok))


# The question texts and answers, one place for the eval questions above and the training
# questions (``train.dense_questions``).
def color_question(kind: str, color: str) -> Question:
    return Question("color", f"What color is the {kind}?", color)


def exists_question(color: str, kind: str, answer: str) -> Question:
    return Question("exists", f"Is there a {color} {kind}?", answer)


def count_question(kind: str, n: int) -> Question:
    return Question("count", f"How many {kind}s are there?", str(n))


def leftright_candidates(shapes: list[Shape]) -> list[Shape]:
    """The shapes left/right is asked about: the only one of its colour and kind, with its box
    centre at least ``LR_MARGIN`` from the midline."""
    pairs = [(s.color, s.kind) for s in shapes]
    return [s for s in shapes if pairs.count((s.color, s.kind)) == 1 and abs(s.cx - MIDLINE) >= LR_MARGIN]


def leftright_question(s: Shape) -> Question:
    return Question("leftright", f"Is the {s.color} {s.kind} on the left or the right?",
                    "left" if s.cx < MIDLINE else "right")


def scenes(seed: int):
    """An endless, seeded stream of (shapes, questions)."""
    rng = random.Random(seed)
    while True:
        shapes = sample_scene(rng)
        yield shapes, questions(shapes, rng)
