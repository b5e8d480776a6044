"""The synthetic world of the demo model follows issue 14's spec (pixel checks on seeded scenes)."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from zoocli.demo import world
from zoocli.demo.evalset import qtype_of, write_eval_set

ALLOWED = {world.BACKGROUND, *world.COLORS.values()}


def _scenes(seed: int, n: int):
    gen = world.scenes(seed)
    return [next(gen) for _ in range(n)]


def test_canvas_background_and_exact_colours():
    for shapes, _ in _scenes(3, 20):
        img = world.render(shapes)
        assert img.size == (336, 336) and img.mode == "RGB"
        px = np.asarray(img).reshape(-1, 3)
        colours = {tuple(int(c) for c in p) for p in np.unique(px, axis=0)}
        assert colours <= ALLOWED  # no anti-aliasing: no blended pixel anywhere
        assert tuple(int(c) for c in np.asarray(img)[0, 0]) == world.BACKGROUND or any(
            s.box[0] == 0 and s.box[1] == 0 for s in shapes)


def test_boxes_inside_canvas_sized_and_apart():
    for shapes, _ in _scenes(4, 200):
        assert 1 <= len(shapes) <= 4
        for i, s in enumerate(shapes):
            x0, y0, x1, y1 = s.box
            assert x1 - x0 == y1 - y0 and 48 <= x1 - x0 <= 96
            assert 0 <= x0 and 0 <= y0 and x1 <= 336 and y1 <= 336
            for t in shapes[i + 1:]:
                gap = max(t.box[0] - x1, x0 - t.box[2], t.box[1] - y1, y0 - t.box[3])
                assert gap >= 8


def test_every_shape_pixel_is_inside_its_box_in_its_colour():
    for shapes, _ in _scenes(5, 20):
        px = np.asarray(world.render(shapes))
        inside = np.zeros(px.shape[:2], dtype=bool)
        for s in shapes:
            x0, y0, x1, y1 = s.box
            inside[y0:y1, x0:x1] = True
            region = px[y0:y1, x0:x1].reshape(-1, 3)
            got = {tuple(int(c) for c in p) for p in np.unique(region, axis=0)}
            assert got <= {world.BACKGROUND, world.COLORS[s.color]}
        assert (px[~inside] == world.BACKGROUND).all()


@pytest.mark.parametrize("kind", world.KINDS)
def test_kind_geometry(kind):
    s = world.Shape(kind, "red", (100, 60, 180, 140))  # side 80
    px = np.asarray(world.render([s]))
    red, bg = world.COLORS["red"], world.BACKGROUND

    def at(x, y):
        return tuple(int(c) for c in px[y, x])

    x0, y0, x1, y1 = s.box
    cx = (x0 + x1 - 1) // 2
    if kind == "square":
        assert (px[y0:y1, x0:x1] == red).all()
    elif kind == "circle":
        assert at(cx, (y0 + y1) // 2) == red
        for x, y in ((x0, y0), (x1 - 1, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)):
            assert at(x, y) == bg  # box corners lie outside the ellipse
        assert at(cx, y0) == red and at(cx, y1 - 1) == red and at(x0, (y0 + y1) // 2) == red
    else:
        assert at(cx, y0) == red  # apex at the top centre
        assert at(x0, y0) == bg and at(x1 - 1, y0) == bg
        assert at(x0, y1 - 1) == red and at(x1 - 1, y1 - 1) == red  # base along the bottom edge
        assert at(x0 + 4, y0 + 10) == bg  # upper corners of the box are empty


def _answer(shapes, question: str) -> str:
    """An independent reading of the question text against the shapes."""
    words = question.rstrip("?").split()
    if question.startswith("What color is the "):
        kind = words[-1]
        (s,) = [s for s in shapes if s.kind == kind]
        return s.color
    if question.startswith("Is there a "):
        return "yes" if any((s.color, s.kind) == (words[-2], words[-1]) for s in shapes) else "no"
    if question.startswith("How many "):
        return str(sum(s.kind + "s" == words[2] for s in shapes))
    color, kind = words[2], words[3]
    (s,) = [s for s in shapes if (s.color, s.kind) == (color, kind)]
    cx = (s.box[0] + s.box[2]) / 2
    assert abs(cx - 168) >= 40
    return "left" if cx < 168 else "right"


def test_answers_are_correct_and_types_balanced():
    kinds, yes_no = Counter(), Counter()
    for shapes, qs in _scenes(6, 400):
        for q in qs:
            assert q.answer == _answer(shapes, q.question)
            kinds[q.qtype] += 1
            if q.qtype == "exists":
                yes_no[q.answer] += 1
    assert set(kinds) == set(world.QTYPES)
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_scenes_are_seeded():
    a, b = _scenes(7, 5), _scenes(7, 5)
    assert a == b and a != _scenes(8, 5)
    assert np.array_equal(np.asarray(world.render(a[0][0])), np.asarray(world.render(b[0][0])))


def test_eval_set_writer(tmp_path):
    path = write_eval_set(tmp_path, seed=99, questions=20)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) >= 20 and {"id", "image", "question", "answer"} <= set(rows[0])
    for r in rows:
        assert (tmp_path / r["image"]).is_file() and qtype_of(r["id"]) in world.QTYPES
    from zoocli.evaluation.samples import load_samples

    samples = load_samples(path, image_root=tmp_path)
    assert [s.answers[0] for s in samples] == [r["answer"] for r in rows]


def test_shipped_eval_set_matches_its_seed(tmp_path):
    from zoocli.demo.evalset import SHIPPED_SEED, shipped_eval_dir

    shipped = shipped_eval_dir() / "questions.jsonl"
    lines = shipped.read_text().splitlines()
    assert len(lines) >= 400
    again = write_eval_set(tmp_path, seed=SHIPPED_SEED, questions=400).read_text().splitlines()
    assert lines == again
    first = json.loads(lines[0])["image"]
    assert np.array_equal(np.asarray(_open(shipped_eval_dir() / first)), np.asarray(_open(tmp_path / first)))


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_rng_is_private():
    random.seed(0)
    before = random.random()
    random.seed(0)
    _scenes(1, 3)
    assert random.random() == before  # the generator never touches the global RNG


def test_demo_commands_describe_themselves_plainly():
    """``python -m zoocli.demo.X --help`` opens with the module's first line, without the
    ``python -m`` literal or the colon the docstring introduces itself with."""
    import importlib

    from zoocli.demo import cli_description

    for name in ("train", "projector", "heat", "evalset", "table"):
        text = cli_description(importlib.import_module(f"zoocli.demo.{name}").__doc__)
        assert text and "``" not in text and not text.endswith(":") and not text.endswith(" ")
    assert cli_description("Do X? ``python -m y``.\nmore") == "Do X?"


@pytest.mark.parametrize("module, argv, needle", [
    ("heat", ["--images", "0"], "--images: must be at least 1"),
    ("heat", ["--top", "2"], "--top: must be above 0 and at most 1"),
    ("projector", ["--images", "-1"], "--images: must be at least 1"),
    ("evalset", ["{tmp}/file", "--questions", "5"], "exists and is not an empty folder"),
    ("evalset", ["{tmp}/new", "--questions", "0"], "--questions: must be at least 1"),
    ("train", ["--init", "{tmp}/nowhere", "--out", "{tmp}/t"], "--init"),
    ("train", ["--out", "{tmp}/file"], "exists and is not an empty folder"),
    ("heat", ["--model", "{tmp}/nowhere"], "error: model"),
])
def test_demo_scripts_refuse_bad_input_in_one_line(tmp_path, capsys, module, argv, needle):
    """The demo scripts' bad input: one ``error`` line on stderr, a non-zero exit, no traceback,
    nothing written."""
    import importlib

    from zoocli.demo import run_cli

    (tmp_path / "file").write_text("mine\n")
    mod = importlib.import_module(f"zoocli.demo.{module}")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = run_cli(lambda: mod.main(argv))
    except SystemExit as e:  # argparse's own one-line usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine\n"
