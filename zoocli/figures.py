"""PNG figures that explain themselves: which visual tokens a method kept, or a per-token heatmap,
drawn over the image with a title band, a legend (or a colour bar) and the regions the model never
sees (LLaVA-1.5's centre crop, LLaVA-NeXT tile padding and unpadded rows) hatched in grey.

Inputs are plain data: a PIL image and ``scopes`` as ``RunResult.scopes`` holds them (see
``zoocli.pipeline.scope_layout``: name, grid, box in original-image pixels, cells, index, kept).
Figures are drawn at the image's resolution, enlarged when the image is small so that every label
stays readable at 100% zoom. LLaVA-NeXT is drawn as separate panels: the base image, then each
crop at its place in the tile grid. Nothing here computes results or prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BG, INK, MUTED = (255, 255, 255), (20, 20, 20), (90, 90, 90)
UNSEEN, HATCH = (64, 64, 64), (120, 120, 120)  # hatched dark grey: never seen by the model
DIM = 0.7  # dropped tokens: the image darkened by this fraction
MIN_SIDE = 480  # images whose longer side is shorter are enlarged to it
GAP = 12  # px between panels
# a viridis-like ramp (low -> high) for heatmaps
RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
READ_WIDTH, READ_PX = 1200, 13  # a figure shown 1200 px wide keeps text of at least 13 px

Scopes = Sequence[Mapping[str, Any]]


# ----------------------------------------------------------------------------------------------
# public figures
#
# Every figure says what it shows without the command line beside it: the question, each method's
# answer (shortened), the model (and "random weights" where its answers mean nothing) and the budget
# as it was written ("11% = 16 tokens"). Text is sized so that it stays readable when the whole
# figure is shown 1200 px wide (``READ_WIDTH``).


def overlay(image: Image.Image, scopes: Scopes, *, model: str = "", method: str = "",
            budget: int | str | None = None, keep: int | None = None, question: str = "",
            answer: str | None = None, random_weights: bool = False, dim: float = DIM) -> Image.Image:
    """Kept tokens over the image: a title band (model, method, kept/total, budget as written and
    the tokens it came to, the question, the answer), the panels (kept patches as is, dropped
    ones darkened, unseen regions hatched) and a legend."""
    scale = display_scale(image)
    font = _font_for(image, scale)
    body = body_image(image, scopes, scale, font, dim=dim)
    font = _readable(font, body.width)
    body = body_image(image, scopes, scale, font, dim=dim)
    lines = overlay_title(scopes, model=model, method=method, budget=budget, keep=keep,
                          question=question, answer=answer, random_weights=random_weights)
    legend = _legend(image, body.width, font, dim, _note(image, scopes))
    return _stack([_phrase_band(lines, body.width, _bigger(font)), body, legend])


def heat_overlay(image: Image.Image, scopes: Scopes, values: Sequence[float | None], *,
                 model: str = "", label: str = "sensitivity", units: str = "", question: str = "",
                 random_weights: bool = False) -> Image.Image:
    """Per-token ``values`` (indexed by candidate, as ``scope["index"]``) as opaque cells in the
    colours of the colour bar (``ramp``), beside the image itself; the colour bar names ``label``
    and ``units`` and the min/max values. Pillow's default font draws Latin text: write units in
    plain characters (e.g. "|M(x+hu) - M(x-hu)| / 2h")."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    scale = display_scale(image)
    font = _font_for(image, scale)
    for _ in range(2):  # the second pass with the font the whole width needs
        heat = body_image(image, scopes, scale, font, values=values, lo=lo, hi=hi)
        photo = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                            Image.Resampling.BILINEAR)
        width = photo.width + GAP + heat.width
        font = _readable(font, width)
    panels = [_stack([_text_band(text, p.width, font), p], width=p.width)
              for text, p in (("the image", photo), (f"{label} per visual token", heat))]
    body = _row(panels)
    lines = heat_title(len(finite), model=model, label=label, question=question,
                       random_weights=random_weights)
    bar = _colour_bar(body.width, font, lo, hi, f"{label} ({units})" if units else label,
                      _note(image, scopes))
    return _stack([_phrase_band(lines, body.width, _bigger(font)), body, bar])


def compare_sheet(image: Image.Image, runs: Sequence[tuple[str, Scopes]], *, model: str = "",
                  budget: int | str | None = None, keep: int | None = None, question: str = "",
                  answers: Mapping[str, str] | None = None, random_weights: bool = False,
                  baseline: str = "none", dim: float = DIM) -> Image.Image:
    """`zoo compare --overlay`: one labelled panel per run ("method: kept k/n" and its answer; the
    ``baseline`` run is labelled as the unpruned model and not counted as a method), one title
    (model, methods, budget, question) and one legend for the whole grid."""
    if not runs:
        raise ValueError("compare_sheet needs at least one (method, scopes) run")
    answers = answers or {}
    scale = display_scale(image)
    font = _font_for(image, scale)
    first = body_image(image, runs[0][1], scale, font, dim=dim)
    cols = _grid_cols(len(runs), first.width, first.height)
    font = _readable(font, cols * first.width + (cols - 1) * GAP)
    bodies, labels = [], []
    for method, scopes in runs:
        kept, total = _counts(scopes)
        bodies.append(body_image(image, scopes, scale, font, dim=dim))
        name = f"{method} (unpruned)" if method == baseline else method
        label = [f"{name}: kept {kept}/{total}"]
        if method in answers:
            label.append(quoted(answers[method], 60))
        labels.append(label)
    lines = compare_title([m for m, _ in runs], model=model, budget=budget, keep=keep,
                          question=question, random_weights=random_weights, baseline=baseline)
    return contact_sheet(bodies, labels, title=lines,
                         legend=lambda w: _legend(image, w, font, dim, _note(image, runs[0][1])),
                         font=font)


def overlay_title(scopes: Scopes, *, model: str = "", method: str = "", budget=None, keep=None,
                  question: str = "", answer: str | None = None,
                  random_weights: bool = False) -> list[list[str]]:
    """The title of ``overlay``: lines of phrases (wrapped between phrases only)."""
    kept, total = _counts(scopes)
    lines = [[model_text(model, random_weights), method, f"kept {kept}/{total} visual tokens",
              budget_text(budget, keep)], _question_line(question)]
    if answer is not None:
        lines.append([f"A: {quoted(answer)}"])
    return [line for line in lines if line]


def heat_title(n_values: int, *, model: str = "", label: str = "sensitivity", question: str = "",
               random_weights: bool = False) -> list[list[str]]:
    """The title of ``heat_overlay``: lines of phrases."""
    lines = [[model_text(model, random_weights, "no trained model's values"),
              f"{label} of {n_values} visual tokens"],
             _question_line(question, "question (sets the chat context; nothing is generated)")]
    return [line for line in lines if line]


def compare_title(methods: Sequence[str], *, model: str = "", budget=None, keep=None,
                  question: str = "", random_weights: bool = False,
                  baseline: str = "none") -> list[list[str]]:
    """The title of ``compare_sheet``: the ``baseline`` run is the unpruned model, not a method."""
    n = sum(m != baseline for m in methods)
    what = f"{n} method{'s' if n != 1 else ''}"
    if n < len(methods):
        what += " vs the unpruned model"
    lines = [[model_text(model, random_weights), what, budget_text(budget, keep)], _question_line(question)]
    return [line for line in lines if line]


def model_text(model: str, random_weights: bool = False, why: str = "meaningless answers") -> str:
    """The model as a figure names it: "tiny-llava (random weights: meaningless answers)"."""
    if not random_weights:
        return model
    return f"{model} (random weights: {why})" if model else f"random weights: {why}"


def budget_text(budget: int | str | None, keep: int | None = None) -> str:
    """The budget as written and what it came to: "budget 11% = 16 tokens", "budget 64 tokens"."""
    if budget is None:
        return ""
    written = str(budget).strip()
    if keep is None:
        return f"budget {written}" + ("" if written.endswith("%") else " tokens")
    tokens = f"{keep} token{'s' if keep != 1 else ''}"
    if written == str(keep):
        return f"budget {tokens}"
    if not written.endswith("%"):  # a count over the image's tokens, clamped
        return f"budget {written}: all {tokens}"
    return f"budget {written} = {tokens}"


def _shown(c: str) -> str:
    """One character as a figure writes it: whitespace as a space, a control or unprintable
    character (and U+FFFD, undecodable bytes) as its escape, every other character as is."""
    if c.isspace():
        return " "
    if c.isprintable() and c != "\ufffd":
        return c
    return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"


def quoted(text: str, limit: int = 120) -> str:
    """``text`` in quotes on one line, control characters and U+FFFD written as escapes,
    shortened to about ``limit`` characters with an ellipsis."""
    one = " ".join("".join(_shown(c) for c in str(text)).split())
    if len(one) > limit:
        one = one[: limit - 1].rstrip() + "…"
    return f'"{one}"'


def _question_line(question: str, what: str = "Q") -> list[str]:
    return [f"{what}: {quoted(question)}"] if question else []


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str | Sequence[str]],
                  cols: int | None = None, *, title: str | Sequence[Sequence[str]] = "", legend=None,
                  font=None) -> Image.Image:
    """Images in a grid, each under its label band; an optional title band on top and
    ``legend(width) -> Image`` band at the bottom. ``cols`` default: a near-square grid. A label
    is a string or a list of phrases (wrapped between phrases); a title a string or lines of
    phrases."""
    if len(images) != len(labels) or not images:
        raise ValueError("contact_sheet needs one label per image and at least one image")
    w, h = max(i.width for i in images), max(i.height for i in images)
    font = font or _font(max(14, round(min(w, h) / 30)))
    if cols is None:
        cols = _grid_cols(len(images), w, h)
    bands = [_phrase_band([[lab] if isinstance(lab, str) else lab], w, _bigger(font)) for lab in labels]
    band_h = max(b.height for b in bands)  # every panel starts at the same height in its row
    cells = [_stack([_pad(b, w, band_h), im], width=w)
             for im, b in zip(images, bands)]
    ch = max(c.height for c in cells)
    rows = math.ceil(len(cells) / cols)
    grid = Image.new("RGB", (cols * w + (cols - 1) * GAP, rows * ch + (rows - 1) * GAP), BG)
    for k, c in enumerate(cells):
        grid.paste(c, ((k % cols) * (w + GAP), (k // cols) * (ch + GAP)))
    parts = []
    if title:
        parts.append(_phrase_band([[title]] if isinstance(title, str) else title, grid.width, _bigger(font)))
    parts.append(grid)
    if legend is not None:
        parts.append(legend(grid.width))
    return _stack(parts)


def _grid_cols(n: int, w: int, h: int) -> int:
    """A near-square grid of ``n`` panels of ``w`` x ``h``."""
    return max(1, min(n, math.ceil(math.sqrt(n * h / w))))


# ----------------------------------------------------------------------------------------------
# panels


def display_scale(image: Image.Image) -> float:
    """1 (the image's resolution), or more for a small image so panels stay readable."""
    return max(1.0, MIN_SIDE / max(image.size))


def body_image(image: Image.Image, scopes: Scopes, scale: float, font, *, dim: float = DIM,
               values=None, lo: float = 0.0, hi: float = 1.0) -> Image.Image:
    """The panels without title or legend: one panel for a single scope; for LLaVA-NeXT the base
    image, then the crops laid out at their place in the tile grid, each under its label."""
    full = (0.0, 0.0, float(image.width), float(image.height))
    if len(scopes) == 1:
        return mark(image, scopes, full, scale, dim=dim, values=values, lo=lo, hi=hi)
    panels = next_panels(image, scopes, scale, dim=dim, values=values, lo=lo, hi=hi)
    heat = values is not None
    base = _stack([_text_band(_scope_label(scopes[0], "base image (resized to one tile)", heat),
                              panels[0].width, font), panels[0]], width=panels[0].width)
    crops = list(zip(scopes[1:], panels[1:]))
    if not crops:
        return base
    mosaic = _crop_mosaic(crops, font, heat)
    return _row([base, mosaic])


def next_panels(image: Image.Image, scopes: Scopes, scale: float, *, dim: float = DIM,
                values=None, lo: float = 0.0, hi: float = 1.0) -> list[Image.Image]:
    """One panel per scope: the first over the whole image, every other over its own box (which
    may reach past the image where the tile covers padding: drawn as unseen)."""
    full = (0.0, 0.0, float(image.width), float(image.height))
    return [mark(image, [s], full if k == 0 else tuple(s["box"]), scale, dim=dim, values=values,
                 lo=lo, hi=hi) for k, s in enumerate(scopes)]


def mark(image: Image.Image, scopes: Scopes, region, scale: float = 1.0, *, dim: float = DIM,
         values=None, lo: float = 0.0, hi: float = 1.0) -> Image.Image:
    """``region`` (x0, y0, x1, y1 in original-image pixels) of the image at ``scale``: kept
    patches as they are, dropped ones darkened by ``dim`` (or, with ``values``, each candidate's
    value as an opaque cell of its ``ramp`` colour), and every pixel that no candidate covers, or that lies outside the image,
    hatched grey (the model never sees it)."""
    rx0, ry0, rx1, ry1 = region
    size = (max(1, round((rx1 - rx0) * scale)), max(1, round((ry1 - ry0) * scale)))
    canvas = Image.new("RGB", size, UNSEEN)
    src = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                      Image.Resampling.BILINEAR)
    canvas.paste(src, (round(-rx0 * scale), round(-ry0 * scale)))
    seen, dropped = Image.new("L", size, 0), Image.new("L", size, 0)
    layer = Image.new("RGB", size, (0, 0, 0)) if values is not None else None
    ds, dd = ImageDraw.Draw(seen), ImageDraw.Draw(dropped)
    dl = ImageDraw.Draw(layer) if layer is not None else None
    for s in scopes:
        for box, i in _cell_boxes(s, region, scale):
            ds.rectangle(box, fill=255)
            if dl is not None:
                v = values[s["index"][i]]
                if v is not None and math.isfinite(v):
                    dl.rectangle(box, fill=ramp((v - lo) / (hi - lo) if hi > lo else 0.5))
                    dd.rectangle(box, fill=255)  # opaque: the colour is the bar's
            elif not s["kept"][i]:
                dd.rectangle(box, fill=round(255 * dim))
    inside = Image.new("L", size, 0)
    ImageDraw.Draw(inside).rectangle((round(-rx0 * scale), round(-ry0 * scale),
                                      round((image.width - rx0) * scale) - 1,
                                      round((image.height - ry0) * scale) - 1), fill=255)
    seen = Image.composite(seen, Image.new("L", size, 0), inside)
    out = Image.composite(layer if layer is not None else Image.new("RGB", size, (0, 0, 0)),
                          canvas, dropped)
    return Image.composite(out, hatch(size), seen)


def _cell_boxes(scope: Mapping[str, Any], region, scale: float):
    """(pixel box in the region's canvas, candidate position in the scope) per candidate cell;
    cell edges are rounded once, so neighbouring cells tile without gaps."""
    rows, cols = scope["grid"]
    x0, y0, x1, y1 = scope["box"]
    rx0, ry0 = region[0], region[1]
    xs = [round((x0 + (x1 - x0) * c / cols - rx0) * scale) for c in range(cols + 1)]
    ys = [round((y0 + (y1 - y0) * r / rows - ry0) * scale) for r in range(rows + 1)]
    for i, (r, c) in enumerate(scope["cells"]):
        r, c = int(r), int(c)
        if xs[c + 1] > xs[c] and ys[r + 1] > ys[r]:
            yield (xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1), i


def _crop_mosaic(crops, font, heat: bool) -> Image.Image:
    """Crop panels placed in their tile grid: (row, col) from each box's corner in tile units (a
    tile that only covered padding has no scope and leaves its place empty)."""
    bx0 = min(s["box"][0] for s, _ in crops)
    by0 = min(s["box"][1] for s, _ in crops)
    place = [(round((s["box"][1] - by0) / (s["box"][3] - s["box"][1])),
              round((s["box"][0] - bx0) / (s["box"][2] - s["box"][0]))) for s, _ in crops]
    w = max(p.width for _, p in crops)
    labelled = [_stack([_text_band(_scope_label(s, s["name"], heat), w, font), p], width=w)
                for s, p in crops]
    h = max(p.height for p in labelled)
    rows, cols = 1 + max(r for r, _ in place), 1 + max(c for _, c in place)
    out = Image.new("RGB", (cols * w + (cols - 1) * GAP, rows * h + (rows - 1) * GAP), BG)
    for (row, col), p in zip(place, labelled):
        out.paste(p, (col * (w + GAP), row * (h + GAP)))
    return out


def _scope_label(scope: Mapping[str, Any], name: str, heat: bool = False) -> str:
    n = len(scope["index"])
    if heat:
        return f"{name}: {n} tokens"
    return f"{name}: kept {sum(bool(k) for k in scope['kept'])}/{n}"


def any_unseen(image: Image.Image, scopes: Scopes) -> bool:
    """Whether some part of a drawn panel is never seen: a grid cell that is not a candidate, the
    first scope's box not covering the whole image (a crop), or a crop box reaching past the image."""
    w, h = image.size
    for k, s in enumerate(scopes):
        rows, cols = s["grid"]
        x0, y0, x1, y1 = s["box"]
        if len(s["cells"]) < rows * cols:
            return True
        covers = x0 <= 0.5 and y0 <= 0.5 and x1 >= w - 0.5 and y1 >= h - 0.5
        inside = x0 >= -0.5 and y0 >= -0.5 and x1 <= w + 0.5 and y1 <= h + 0.5
        if (k == 0 and not covers) or (k > 0 and not inside):
            return True
    return False


def unseen_note(scopes: Scopes) -> str:
    """What the hatched regions are, for the legend."""
    if len(scopes) > 1:
        return "not seen by the model (tile padding, rows removed by unpadding)"
    return "not seen by the model (cut off by the processor's crop)"


# ----------------------------------------------------------------------------------------------
# bands, legend, colour bar


def _legend(image: Image.Image, width: int, font, dim: float, note: str) -> Image.Image:
    """Swatches: a patch of the image as kept (as is), the same patch dropped, and hatched unseen."""
    side = max(12, round(_line_h(font) * 1.2))
    patch = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    darker = Image.blend(patch, Image.new("RGB", patch.size, (0, 0, 0)), dim)
    items = [(patch, "kept (as the model sees it)"), (darker, "dropped (darkened)")]
    if note:
        items.append((hatch((side, side)), note))
    return _swatch_band(items, width, font)


def _colour_bar(width: int, font, lo: float, hi: float, label: str, note: str) -> Image.Image:
    """A horizontal colour bar from ``lo`` to ``hi`` with its label, and the unseen swatch."""
    line = _line_h(font)
    bar_w, bar_h = max(120, width // 3), max(12, round(line * 1.1))
    low, high = f"{lo:.4g}", f"{hi:.4g}"
    tw = lambda t: round(font.getlength(t))  # noqa: E731
    band_w = max(width, tw(low) + tw(high) + bar_w + 4 * GAP)
    top = Image.new("RGB", (band_w, bar_h + 2 * GAP), BG)
    d = ImageDraw.Draw(top)
    x = GAP
    d.text((x, GAP + (bar_h - line) // 2), low, fill=INK, font=font)
    x += tw(low) + GAP // 2
    d.rectangle((x - 1, GAP - 1, x + bar_w, GAP + bar_h), outline=INK)
    for k in range(bar_w):
        d.line((x + k, GAP, x + k, GAP + bar_h - 1), fill=ramp(k / max(1, bar_w - 1)))
    d.text((x + bar_w + GAP // 2, GAP + (bar_h - line) // 2), high, fill=INK, font=font)
    label_band = _text_band(f"colour = {label}, from min {low} (left) to max {high} (right)", band_w, font)
    if not note:
        return _stack([top, label_band])
    side = max(12, round(line * 1.2))
    return _stack([top, label_band, _swatch_band([(hatch((side, side)), note)], band_w, font)])


def _swatch_band(items, width: int, font) -> Image.Image:
    """Swatch + text items flowed left to right, wrapping to new lines within ``width``."""
    line = _line_h(font)
    placed, x, y, row_h = [], GAP, GAP, 0
    for sw, text in items:
        w = sw.width + GAP // 2 + round(font.getlength(text))
        if x > GAP and x + w > width - GAP:
            x, y = GAP, y + row_h + GAP // 2
        h = max(sw.height, line)
        placed.append((x, y, sw, text, h))
        x, row_h = x + w + 2 * GAP, max(row_h, h)
    out = Image.new("RGB", (width, y + row_h + GAP), BG)
    d = ImageDraw.Draw(out)
    for x, y, sw, text, h in placed:
        out.paste(sw, (x, y + (h - sw.height) // 2))
        d.rectangle((x, y + (h - sw.height) // 2, x + sw.width - 1, y + (h + sw.height) // 2 - 1),
                    outline=MUTED)
        d.text((x + sw.width + GAP // 2, y + (h - line) // 2), text, fill=INK, font=font)
    return out


def _text_band(text: str, width: int, font) -> Image.Image:
    """``text`` wrapped to ``width`` on a white band."""
    return _lines_band(_wrap(text, font, width - 2 * (GAP // 2)), width, font)


def _phrase_band(lines: Sequence[Sequence[str]], width: int, font) -> Image.Image:
    """Lines of phrases on a white band (``wrap_phrases``)."""
    return _lines_band(wrap_phrases(lines, font, width - 2 * (GAP // 2)), width, font)


def wrap_phrases(lines: Sequence[Sequence[str]], font, width: int) -> list[str]:
    """Text lines of at most ``width`` px: each line's phrases joined by " · " and wrapped between
    phrases, never inside one (unless a phrase alone is wider than ``width``: then at spaces)."""
    out: list[str] = []
    for phrases in lines:
        cur = ""
        for ph in (p for p in phrases if p):
            cand = f"{cur} · {ph}" if cur else ph
            if cur and font.getlength(cand) > width:
                out.append(cur)
                cur = ph
            else:
                cur = cand
        if cur:
            out.append(cur)
    return [piece for line in out for piece in _wrap(line, font, width)]


def _lines_band(lines: Sequence[str], width: int, font) -> Image.Image:
    line = _line_h(font)
    out = Image.new("RGB", (width, len(lines) * (line + 2) + GAP), BG)
    d = ImageDraw.Draw(out)
    for k, t in enumerate(lines):
        d.text((GAP // 2, GAP // 2 + k * (line + 2)), t, fill=INK, font=font)
    return out


def _wrap(text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        cand = f"{cur} {word}" if cur else word
        if cur and font.getlength(cand) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    return lines + [cur] if cur or not lines else lines


# ----------------------------------------------------------------------------------------------
# small helpers


def ramp(t: float) -> tuple[int, int, int]:
    """The heatmap colour of ``t`` in [0, 1] (clamped), linear between the ``RAMP`` stops."""
    t = min(1.0, max(0.0, float(t))) * (len(RAMP) - 1)
    k = min(int(t), len(RAMP) - 2)
    f = t - k
    a, b = RAMP[k], RAMP[k + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))  # type: ignore[return-value]


def hatch(size: tuple[int, int]) -> Image.Image:
    """Dark grey with lighter diagonal stripes: the 'not seen by the model' fill."""
    out = Image.new("RGB", size, UNSEEN)
    d = ImageDraw.Draw(out)
    w, h = size
    for k in range(-h, w, 10):
        d.line((k, h, k + h, 0), fill=HATCH, width=2)
    return out


def _note(image: Image.Image, scopes: Scopes) -> str:
    return unseen_note(scopes) if any_unseen(image, scopes) else ""


def _counts(scopes: Scopes) -> tuple[int, int]:
    return (sum(sum(bool(k) for k in s["kept"]) for s in scopes),
            sum(len(s["kept"]) for s in scopes))


def _font(size: int):
    return ImageFont.load_default(size=size)


def _font_for(image: Image.Image, scale: float):
    """Text height about 1/30 of the panel's shorter side, at least 14 px."""
    return _font(max(14, round(min(image.size) * scale / 30)))


def _readable(font, width: int):
    """``font``, or a larger one if the figure, ``width`` px wide, would otherwise show text under
    ``READ_PX`` px when displayed ``READ_WIDTH`` px wide."""
    need = math.ceil(READ_PX * max(1.0, width / READ_WIDTH))
    return font if font.size >= need else _font(need)


def _bigger(font):
    return _font(round(font.size * 1.25))


def _line_h(font) -> int:
    box = font.getbbox("Hg")
    return box[3] - min(0, box[1])


def _stack(parts: Sequence[Image.Image], width: int | None = None) -> Image.Image:
    """Parts one above the other, left-aligned on white."""
    w = width or max(p.width for p in parts)
    out = Image.new("RGB", (w, sum(p.height for p in parts)), BG)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _pad(part: Image.Image, width: int, height: int) -> Image.Image:
    """``part`` at the top left of a white ``width`` x ``height`` band."""
    out = Image.new("RGB", (width, height), BG)
    out.paste(part, (0, 0))
    return out


def _row(parts: Sequence[Image.Image]) -> Image.Image:
    """Parts side by side, top-aligned on white, ``GAP`` apart."""
    out = Image.new("RGB", (sum(p.width for p in parts) + GAP * (len(parts) - 1),
                            max(p.height for p in parts)), BG)
    x = 0
    for p in parts:
        out.paste(p, (x, 0))
        x += p.width + GAP
    return out
