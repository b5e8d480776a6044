"""PNG figures (zoocli/figures.py): pixels, not just sizes: title and legend bands, unseen
regions marked, colour bar on heatmaps, LLaVA-NeXT panels."""

from __future__ import annotations

from PIL import Image

from tests.conftest import make_image
from zoocli import figures
from zoocli.figures import HATCH, INK, UNSEEN, ramp
from zoocli.pipeline import run_one

GREEN = (0, 200, 0)
WHITE = (255, 255, 255)


def test_overlay_dims_dropped_patches_only():  # moved from test_timing_render (render.overlay)
    img = Image.new("RGB", (20, 10), (200, 200, 200))
    scope = {"name": "image", "grid": [1, 2], "cells": [[0, 0], [0, 1]], "index": [0, 1],
             "box": [0, 0, 20, 10], "kept": [True, False]}
    out = figures.mark(img, [scope], (0, 0, 20, 10))
    assert out.size == img.size
    assert out.getpixel((5, 5)) == (200, 200, 200)
    assert out.getpixel((15, 5))[0] < 100


def _centre_crop_scope():
    """A LLaVA-1.5-like scope on a 600x200 image: the centre 200x200 square, 2x2 cells."""
    return {"name": "image", "grid": [2, 2], "cells": [[0, 0], [0, 1], [1, 0], [1, 1]],
            "index": [0, 1, 2, 3], "box": [200, 0, 400, 200], "kept": [True, False, True, False]}


def _rows_with(img, colour):
    return [y for y in range(img.height) if any(img.getpixel((x, y)) == colour for x in range(100, img.width, 2))]


def _non_white(img, y0, y1):
    return sum(img.getpixel((x, y)) != WHITE for y in range(y0, y1) for x in range(0, img.width, 3))


def test_overlay_has_title_legend_and_marks_the_cropped_strips():
    img = Image.new("RGB", (600, 200), GREEN)
    out = figures.overlay(img, [_centre_crop_scope()], model="m", method="zoo", budget=2)
    assert out.width == 600  # the image's resolution (600 px is not enlarged)
    body = _rows_with(out, GREEN)
    top, bottom = body[0], body[-1]
    assert bottom - top + 1 == 200
    assert top > 10 and _non_white(out, 0, top) > 20  # the title band has text
    assert out.height - bottom > 20 and _non_white(out, bottom + 1, out.height) > 50  # legend
    y = top + 50
    assert out.getpixel((250, y)) == GREEN  # kept cell as is
    assert out.getpixel((350, y))[1] < 100  # dropped cell darkened
    for x in (5, 60, 150, 450, 595):  # the strips the centre crop throws away: unseen, never green
        assert out.getpixel((x, y)) in (UNSEEN, HATCH)
    legend = out.crop((0, bottom + 1, out.width, out.height))
    assert any(legend.getpixel((x, yy)) == HATCH for x in range(0, 200) for yy in range(legend.height))


def test_small_image_is_enlarged_to_stay_readable():
    img = Image.new("RGB", (60, 20), GREEN)
    out = figures.overlay(img, [{**_centre_crop_scope(), "box": [20, 0, 40, 20]}])
    assert out.width >= figures.MIN_SIDE and len(_rows_with(out, GREEN)) >= 150


def test_real_llava_centre_crop_strip_is_unseen(tiny_llava):
    img = make_image(300, 100, seed=3)
    res = run_one(tiny_llava, img, "q?", "zoo", "8", max_new_tokens=1)
    x0, _, x1, _ = res.scopes[0]["box"]
    assert x0 > 50 and x1 < 250  # the processor's centre crop
    panel = figures.mark(img, res.scopes, (0, 0, 300, 100))
    for x in (2, int(x0) - 3, int(x1) + 3, 297):
        assert panel.getpixel((x, 50)) in (UNSEEN, HATCH)
    out = figures.overlay(img, res.scopes, model="tiny-llava", method="zoo", budget=8)
    assert _non_white(out, 0, 30) > 20  # title band


def test_heatmap_has_a_colour_bar():
    img = Image.new("RGB", (600, 200), GREEN)
    out = figures.heat_overlay(img, [_centre_crop_scope()], [0.0, 1.0, 2.0, 3.0], units="u")
    lo, hi = ramp(0.0), ramp(1.0)
    rows = [y for y in range(out.height)
            if lo in {out.getpixel((x, y)) for x in range(out.width)}
            and hi in {out.getpixel((x, y)) for x in range(out.width)}]
    body = [y for y in range(out.height)
            if all(out.getpixel((x, y)) in (UNSEEN, HATCH)
                   for x in (600 + figures.GAP + 150, 600 + figures.GAP + 450))]  # the map's cut strips
    assert len(body) > 150
    assert rows and min(rows) > max(body)  # a bar with both ends, below the image
    assert figures.mark(img, [_centre_crop_scope()], (0, 0, 600, 200), values=[0, 1, 2, 3]
                        ).getpixel((5, 5)) in (UNSEEN, HATCH)


def _next_scopes():
    """A LLaVA-NeXT-like layout on a 400x200 image: base + 2 crops whose boxes reach past the
    image (padding) by 50 px at the top and bottom; the crops' bottom rows are unpadded away."""
    cells = [[r, c] for r in range(2) for c in range(2)]
    base = {"name": "base", "grid": [2, 2], "cells": cells, "index": [0, 1, 2, 3],
            "box": [0, 0, 400, 200], "kept": [True] * 4}
    crops = [{"name": f"crop {k + 1}", "grid": [2, 2], "cells": cells[:2],
              "index": [4 + 2 * k, 5 + 2 * k], "box": [200 * k, -50, 200 * (k + 1), 250],
              "kept": [True, False]} for k in range(2)]
    return [base, *crops]


def test_next_is_drawn_as_one_panel_per_scope_with_padding_unseen():
    img = Image.new("RGB", (400, 200), GREEN)
    scopes = _next_scopes()
    panels = figures.next_panels(img, scopes, 1.0)
    assert len(panels) == 1 + 2  # base, then each crop
    assert panels[0].size == (400, 200) and [p.size for p in panels[1:]] == [(200, 300)] * 2
    crop = panels[1]
    assert crop.getpixel((50, 10)) in (UNSEEN, HATCH)  # padding above the image
    assert crop.getpixel((50, 100)) == GREEN  # kept cell inside the image
    assert crop.getpixel((50, 220)) in (UNSEEN, HATCH)  # an unpadded row (not a candidate)
    out = figures.overlay(img, scopes, model="m", method="zoo")
    assert out.width >= 400 + 2 * 200  # base and crops side by side, not stacked layers


def test_real_next_panel_count(tiny_llava_next):
    img = make_image(200, 90, seed=1)
    res = run_one(tiny_llava_next, img, "q?", "zoo", "10", max_new_tokens=1)
    crops = [s for s in res.scopes if s["name"].startswith("crop")]
    assert crops and len(figures.next_panels(img, res.scopes, 1.0)) == 1 + len(crops)


def test_compare_sheet_grid_of_labelled_panels():
    img = Image.new("RGB", (600, 200), GREEN)
    s = _centre_crop_scope()
    runs = [("none", {**s, "kept": [True] * 4}), ("zoo", s), ("divprune", {**s, "kept": [False, True] * 2})]
    sheet = figures.compare_sheet(img, [(m, [sc]) for m, sc in runs], model="m", budget=2)
    body = figures.body_image(img, [s], 1.0, figures._font(14))
    assert sheet.width >= body.width and sheet.height >= 3 * body.height // 2
    assert _non_white(sheet, 0, 30) > 20  # title band


# ------------------------------------------------------------------ pictures that stand alone


def test_budget_is_shown_as_written_with_the_tokens_it_came_to():
    assert figures.budget_text("11%", 16) == "budget 11% = 16 tokens"
    assert figures.budget_text("64", 64) == "budget 64 tokens"
    assert figures.budget_text(64, 64) == "budget 64 tokens"
    assert figures.budget_text("1", 1) == "budget 1 token"
    assert figures.budget_text("999", 144) == "budget 999: all 144 tokens"
    assert figures.budget_text(None, 5) == ""


def test_titles_carry_model_question_answer_budget_and_random_weights():
    s = _centre_crop_scope()
    lines = figures.overlay_title([s], model="tiny-llava", method="zoo", budget="50%", keep=2,
                                  question="What is it?", answer="a cat\x03\ufffd\n", random_weights=True)
    text = "\n".join(" · ".join(line) for line in lines)
    for part in ("tiny-llava (random weights", "zoo", "kept 2/4 visual tokens", "budget 50% = 2 tokens",
                 'Q: "What is it?"', 'A: "a cat\\x03\\ufffd"'):
        assert part in text, (part, text)
    trained = " ".join(" · ".join(line) for line in figures.overlay_title([s], model="demo-llava"))
    assert "random" not in trained
    heat = " ".join(" · ".join(line) for line in figures.heat_title(4, model="m", question="Why?",
                                                                     random_weights=True))
    assert '"Why?"' in heat and "random weights" in heat and "4 visual tokens" in heat


def test_compare_title_does_not_count_the_unpruned_run_as_a_method():
    title = figures.compare_title(["none", "zoo", "divprune"], model="m", budget="11%", keep=16, question="Q?")
    flat = " · ".join(" · ".join(line) for line in title)
    assert "2 methods vs the unpruned model" in flat and "budget 11% = 16 tokens" in flat
    assert "budget 16 " not in flat + " " and '"Q?"' in flat
    assert "1 method · " in " · ".join(figures.compare_title(["zoo"], model="m")[0]) + " · "


def test_answers_are_one_short_line_with_escapes():
    assert figures.quoted("red") == '"red"'
    assert figures.quoted("a\nb\tc") == '"a b c"'
    assert figures.quoted("x\x00\ufffd") == '"x\\x00\\ufffd"'
    long = figures.quoted("word " * 100, 40)
    assert len(long) <= 42 and long.endswith('…"')


def test_titles_wrap_between_phrases_not_inside_them():
    font = figures._font(20)
    phrases = ["demo-llava", "zoo", "kept 36/144 visual tokens", "budget 25% = 36 tokens"]
    for width in (250, 320, 420, 600):
        lines = figures.wrap_phrases([phrases], font, width)
        assert all(font.getlength(t) <= width for t in lines)
        assert [p for t in lines for p in t.split(" · ")] == phrases  # whole phrases on each line


def _ramp_colours() -> set:
    return {ramp(k / 1000) for k in range(1001)}


def test_heat_cells_are_opaque_colours_of_the_colour_bar_beside_the_image():
    img = Image.new("RGB", (600, 200), GREEN)
    values = [0.0, 1.0, 2.0, 3.0]
    out = figures.heat_overlay(img, [_centre_crop_scope()], values, units="u", question="q?")
    bar = _ramp_colours()
    ys = [y for y in range(out.height) if out.getpixel((300, y)) == GREEN]  # the image, as it is
    assert len(ys) >= 190
    y = ys[len(ys) // 2]
    cells = {out.getpixel((x, y)) for x in range(out.width)} - {GREEN, UNSEEN, HATCH, WHITE}
    # the map beside the image: its cells are exactly bar colours (no blend with the green image)
    assert {ramp(0.0), ramp(1 / 3), ramp(2 / 3), ramp(1.0)} & cells
    assert cells <= bar, cells - bar


def _title_text_height(img) -> int:
    """Height in px of the first text line of the title band (dark pixels from the top)."""
    rows = [y for y in range(min(img.height, 400))
            if any(sum(img.getpixel((x, y))) < 200 for x in range(0, min(img.width, 800), 2))]
    first = [rows[0]]
    for y in rows[1:]:
        if y != first[-1] + 1:
            break
        first.append(y)
    return len(first)


def test_next_compare_sheet_text_stays_readable_at_1200_px():
    img = Image.new("RGB", (1600, 800), GREEN)
    s = _next_scopes()
    scaled = [{**sc, "box": [v * 4 for v in sc["box"]]} for sc in s]  # the 400x200 layout at 1600x800
    runs = [(m, scaled) for m in ("none", "zoo", "divprune", "fastv")]
    sheet = figures.compare_sheet(img, runs, model="m", budget="11%", keep=7, question="What?",
                                  answers={m: "an answer" for m, _ in runs})
    assert sheet.width > 2400
    shown = _title_text_height(sheet) * 1200 / sheet.width
    assert shown >= 9, (sheet.width, _title_text_height(sheet))


def test_compare_panels_start_level_whatever_their_label_length():
    img = Image.new("RGB", (400, 400), GREEN)
    s = {**_centre_crop_scope(), "box": [100, 100, 300, 300]}  # a centre square
    runs = [("none", [{**s, "kept": [True] * 4}]), ("zoo", [s])]
    sheet = figures.compare_sheet(img, runs, answers={"none": "a very long answer " * 8, "zoo": "short"})
    w = (sheet.width - figures.GAP) // 2  # two panels side by side
    tops = [next(y for y in range(sheet.height) if sheet.getpixel((x, y)) in (UNSEEN, HATCH))
            for x in (5, w + figures.GAP + 5)]  # the left strip each panel's crop cuts off
    assert tops[0] == tops[1]
