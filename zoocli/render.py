"""Rendering apart from compute: functions that turn results into Rich renderables (PNG figures
are in ``zoocli.figures``). Nothing here prints; commands print what these return."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.columns import Columns
from rich.console import Group, RenderableType
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from zoocli.text import plural, shown

KEPT, DROPPED, ABSENT = "█", "·", " "
RAMP = " ▁▂▃▄▅▆▇█"
MAX_GRID_COLS = 48


TEXT_FLOOR = 4  # a text column (answer, method name) is never shortened below this many cells


class NumTable(Table):
    """A table that fits the width it is rendered at without losing a number: first the columns
    close up to one space apart, numeric headers wrap (``prefill ms`` over two lines), then the
    text columns (answers, names) are
    shortened, widest first, to one line ending in an ellipsis; numeric cells are never cut. If
    the numbers alone are too wide, a line under the table says so (never a silent loss)."""

    def __rich_console__(self, console, options):
        width = options.max_width
        short = self._fit(console, options, width)
        yield from super().__rich_console__(console, options)
        if short > 0:
            yield Text(f"(this table needs {width + short} columns, the terminal has {width}: "
                       "columns on the right are cut; widen the terminal or use --json)",
                       style="yellow")

    def _natural(self, console, options) -> int:
        return Measurement.get(console, options.update_width(10**6), self).maximum

    def _fit(self, console, options, width: int) -> int:
        """Set the columns' widths for ``width``; returns by how much the table is still too wide."""
        numeric = [c for c in self.columns if c.justify == "right"]
        text = [c for c in self.columns if c.justify != "right"]
        if not hasattr(self, "_caps"):
            self._caps = {id(c): c.max_width for c in self.columns}
            self._wide_padding = self.padding
        for c in self.columns:
            c.max_width = self._caps[id(c)]
        self.padding = self._wide_padding
        if self._natural(console, options) <= width:
            return 0
        spaced = self.box is None or not self.box.mid_vertical.strip()  # columns apart by a blank
        self.padding = (0, 0, 0, 0) if spaced else (0, 1, 0, 0)  # one cell between columns
        for c in numeric:  # labels next: numeric headers wrap at their spaces
            c.max_width = c.min_width
        excess = self._natural(console, options) - width
        widths = {id(c): min(max(_plain_len(x) for x in [c.header, *c._cells]),
                             c.max_width or 10**6) for c in text}
        for floor in ("header", "floor"):  # down to the header's width first, then further
            while excess > 0:
                left = [c for c in text if widths[id(c)] > _floor(c, floor)]
                if not left:
                    break
                widest = max(left, key=lambda c: widths[id(c)])
                widths[id(widest)] -= 1
                excess -= 1
        for c in text:
            c.max_width = widths[id(c)]
        return excess


def _floor(col, stage: str) -> int:
    header = max((len(w) for w in col.header.plain.split()), default=0) if stage == "header" else 0
    return max(TEXT_FLOOR, header)


def _plain_len(cell) -> int:
    if isinstance(cell, Text):
        return max((len(line) for line in cell.plain.split("\n")), default=0)
    return _plain_len(Text(str(cell)))


def keep_numbers(t: Table) -> Table:
    """Ready ``t`` for any width: right-justified (numeric) columns never shrink below their
    widest cell (headers may wrap at spaces); the text columns' cells are one line each, ending
    in an ellipsis when ``NumTable`` shortens them."""
    for col in t.columns:
        header = col.header if isinstance(col.header, Text) else Text(str(col.header))
        header.no_wrap = False
        col.header = header
        if col.justify == "right":
            cells = [_plain_len(c) for c in col._cells]
            words = [len(w) for w in header.plain.split()] or [0]
            col.no_wrap = True
            col.min_width = max([*cells, *words, col.min_width or 0])
        else:
            col._cells = [Text(c) if isinstance(c, str) else c for c in col._cells]  # user text: never markup
            for c in col._cells:
                if isinstance(c, Text):
                    c.no_wrap, c.overflow = True, "ellipsis"
    return t


def _cells(scope: Mapping[str, Any]) -> tuple[int, int, dict[tuple[int, int], int]]:
    rows, cols = scope["grid"]
    pos = {(int(r), int(c)): i for i, (r, c) in enumerate(scope["cells"])}
    return rows, cols, pos


def _step(cols: int) -> int:
    return max(1, math.ceil(cols / MAX_GRID_COLS))


def token_grid(scope: Mapping[str, Any]) -> Text:
    """The kept-token map of one scope, laid out like the image: █ kept, · dropped, blank for
    positions that are not candidates (LLaVA-NeXT unpadding). Wide grids are shown at a coarser
    step (a cell shows kept if any token under it was kept)."""
    rows, cols, pos = _cells(scope)
    kept = scope["kept"]
    step = _step(cols)
    text = Text()
    for r in range(0, rows, step):
        for c in range(0, cols, step):
            under = [pos[(rr, cc)] for rr in range(r, min(r + step, rows))
                     for cc in range(c, min(c + step, cols)) if (rr, cc) in pos]
            if not under:
                text.append(ABSENT)
            elif any(kept[i] for i in under):
                text.append(KEPT, style="green")
            else:
                text.append(DROPPED, style="dim")
        text.append("\n")
    text.rstrip()
    return text


def heat_grid(scope: Mapping[str, Any], values: Sequence[float], lo: float, hi: float) -> Text:
    """A per-token value map of one scope as a colour ramp (low ▁ blue ... high █ red)."""
    rows, cols, pos = _cells(scope)
    step = _step(cols)
    text = Text()
    span = hi - lo if hi > lo else 1.0
    for r in range(0, rows, step):
        for c in range(0, cols, step):
            under = [pos[(rr, cc)] for rr in range(r, min(r + step, rows))
                     for cc in range(c, min(c + step, cols)) if (rr, cc) in pos]
            vals = [values[scope["index"][i]] for i in under]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            if not vals:
                text.append(ABSENT)
                continue
            t = min(1.0, max(0.0, (max(vals) - lo) / span))
            ch = RAMP[1 + round(t * (len(RAMP) - 2))]
            red, blue = round(255 * t), round(255 * (1 - t))
            text.append(ch, style=f"rgb({red},64,{blue})")
        text.append("\n")
    text.rstrip()
    return text


UNPADDED_NOTE = ("blank rows or columns in a grid: positions LLaVA-NeXT's unpadding removed "
                 "(the padding around the image; the model never sees them)")


def unpadded(scopes: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any grid has positions that are no candidate (LLaVA-NeXT unpadding)."""
    return any(len(s["cells"]) < s["grid"][0] * s["grid"][1] for s in scopes)


def _with_note(columns: Columns, scopes, note: bool) -> RenderableType:
    if note and unpadded(scopes):
        return Group(columns, Text(UNPADDED_NOTE, style="dim"))
    return columns


def grids_panel(scopes: Sequence[Mapping[str, Any]], title: str = "", note: bool = True):
    """One panel per scope (one per crop for LLaVA-NeXT, each titled with its name and kept /
    total), side by side as the width allows; ``note``: one line under them explaining blank
    (unpadded) rows if there are any."""
    panels = []
    for s in scopes:
        k, n = sum(s["kept"]), len(s["kept"])
        panels.append(Panel(token_grid(s), title=f"{s['name']} {k}/{n}", expand=False))
    return _with_note(Columns(panels, title=title or None), scopes, note)


def heat_panel(scopes, values, lo, hi):
    return _with_note(Columns([Panel(heat_grid(s, values, lo, hi), title=s["name"], expand=False)
                               for s in scopes]), scopes, True)


def answer_panel(result: Mapping[str, Any]) -> Panel:
    text = Text(shown(result["answer"]) or "(empty answer)")
    if result.get("meaningless"):
        text.append("\nrandom weights: this answer is meaningless", style="yellow")
    kept, total = result["n_llm_visual_kept"], result["n_llm_visual_full"]
    title = (f"{result['method']} · kept {len(result['kept_indices'])}/{result['n_visual_tokens']} "
             f"visual tokens ({kept}/{total} in the LLM) · {result['model']}")
    return Panel(text, title=title, title_align="left")


def ask_view(result: Mapping[str, Any], scopes, timings_ms: Mapping[str, float],
             new_tokens: int | None) -> list[RenderableType]:
    """`zoo ask`: the answer, the kept-token grids, the timings."""
    return [answer_panel(result), grids_panel(scopes),
            timings_table(timings_ms, new_tokens, in_llm=result.get("stage") == "in_llm",
                          repeat_ms=result.get("repeat_ms"))]


TIMING_ROWS = [
    ("preprocess", "image preprocessing + chat template"),
    ("vision", "vision encoder + projector"),
    ("selection", "token selection"),
    ("build", "LLM inputs with kept tokens"),
    ("prefill", "LLM prefill (to first-token logits)"),
    ("ttft", "time to first token"),
    ("decode", "decode (remaining tokens)"),
    ("e2e", "end to end"),
]


def timings_table(timings_ms: Mapping[str, float], new_tokens: int | None = None,
                  in_llm: bool = False, repeat_ms: Sequence[Mapping[str, float]] | None = None) -> Table:
    """``in_llm``: the method prunes inside the LLM, so its selection is part of the prefill.
    ``repeat_ms``: every timed run's timings (``timings_ms`` their medians): a min-max column, and
    a warning when the end-to-end time spreads too much to trust."""
    from zoocli.compare import NOISE_LIMIT, relative_spread

    reps = list(repeat_ms or [])
    many = len(reps) > 1
    t = Table(title=f"timings (median of {len(reps)} runs)" if many else "timings", title_justify="left")
    t.add_column("stage")
    t.add_column("ms", justify="right")
    if many:
        t.add_column("min-max", justify="right")
    t.add_column("what")
    for key, what in TIMING_ROWS:
        if key in timings_ms:
            if in_llm and key == "selection":
                what = "token scoring inside the LLM (already counted in prefill)"
            elif in_llm and key == "prefill":
                what = "LLM prefill incl. the in-LLM pruning (to first-token logits)"
            cells = [key, f"{timings_ms[key]:.1f}"]
            if many:
                vals = [r[key] for r in reps if key in r]
                cells.append(f"{min(vals):.1f}-{max(vals):.1f}")
            t.add_row(*cells, what)
    notes = [plural(new_tokens, "new token")] if new_tokens else []
    if many and (spread := relative_spread([r["e2e"] for r in reps if "e2e" in r])) > NOISE_LIMIT:
        notes.append(f"NOISY: end to end spread {100 * spread:.0f}% (max-min over median, > "
                     f"{100 * NOISE_LIMIT:.0f}%) over the runs; treat these times with care")
    if notes:
        t.caption = "\n".join(notes)
    return t


def methods_table(methods: Iterable[Any]) -> Table:
    t = Table(title="methods", title_justify="left", show_lines=True)
    t.add_column("name", no_wrap=True)
    t.add_column("stage", no_wrap=True)
    t.add_column("families")
    t.add_column("what it does · paper · deviation from the official code", overflow="fold")
    from zoocli.methods import FAMILIES

    for m in methods:
        fam = "all" if m.families >= FAMILIES else ", ".join(sorted(m.families))
        text = Text(m.summary)
        if m.paper and m.paper != "-":
            text.append("\n" + m.paper, style="dim")
        if m.deviation:
            text.append("\ndeviation: " + m.deviation, style="yellow")
        t.add_row(m.name, m.stage.replace("_", "-"), fam, text)
    return t


def compare_table(rows: Sequence[Mapping[str, Any]], meaningless: bool = False) -> Table:
    t = NumTable(title="methods on the same image (encoded once per round of runs)", title_justify="left",
                 box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("method", "left"), ("kept", "right"), ("answer", "left"),
                      ("select ms", "right"), ("prefill ms", "right"), ("e2e ms", "right"),
                      ("speed-up", "right"), ("spread", "right"), ("Jaccard vs zoo", "right")):
        answer = col == "answer"
        t.add_column(col, justify=just, no_wrap=True, overflow="ellipsis",
                     max_width=32 if answer else None, min_width=6 if answer else None)
    in_llm = wide = False
    for r in rows:
        jac = "-" if r["jaccard_vs_zoo"] is None else f"{r['jaccard_vs_zoo']:.2f}"
        mark = IN_LLM_MARK if r.get("stage") == "in_llm" else ""
        in_llm |= bool(mark)
        sp = (r.get("speedup_spread") or {}).get("e2e")
        spread = ""
        if sp and r.get("repeats", 1) > 1 and r["method"] != "none":
            spread = f"{sp['min']:.2f}-{sp['max']:.2f}"
            if r["speedup_e2e"] and (sp["max"] - sp["min"]) / r["speedup_e2e"] > WIDE_SPREAD:
                spread += WIDE_MARK
                wide = True
        t.add_row(r["method"] + mark, f"{r['kept']}/{r['total']}", _short(r["answer"]) or "(empty)",
                  f"{r['selection_ms']:.1f}{mark}", f"{r['prefill_ms']:.1f}", f"{r['e2e_ms']:.1f}",
                  f"{r['speedup_e2e']:.2f}x", spread, jac)
    reps = rows[0].get("repeats", 1) if rows else 1
    notes = [f"ms: median of {reps} interleaved runs; speed-up: end to end, median of the per-run ratios "
             f"against the unpruned run of the same round; spread: their min-max"
             if reps > 1 else "one run: the speed-up is one ratio (--repeats 3 or `zoo bench` for a spread)"]
    if wide:
        notes.append(f"{WIDE_MARK} too wide to trust: the ratios spread by more than {100 * WIDE_SPREAD:.0f}% "
                     "of their median (a busy machine, or too little work: try --repeats 5 or `zoo bench`)")
    if rows and rows[0].get("noisy"):
        notes.append(f"NOISY MACHINE: the unpruned end-to-end time spread {100 * rows[0]['baseline_e2e_spread']:.0f}% "
                     "(max-min over median, > 10%) over the runs; treat the speed-ups with care")
    if in_llm:
        notes.append(IN_LLM_NOTE)
    if meaningless:
        notes.append("random weights: answers are meaningless; timings are real")
    if notes:
        t.caption = "\n".join(notes)
    return keep_numbers(t)


IN_LLM_MARK = "*"
WIDE_MARK = "?"
WIDE_SPREAD = 0.20  # a speed-up whose per-run ratios spread by more than this share of their median
IN_LLM_NOTE = ("* in-LLM method (prunes inside the LLM): select = its scoring, which runs inside the "
               "prefill and is already counted in prefill and ttft; kept = visual tokens after its last stage")


def _short(text: str, limit: int = 60) -> str:
    """One line of at most ``limit`` characters (full answers are in --json)."""
    text = shown(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _med(stat: Mapping[str, float]) -> str:
    return f"{stat['median']:.1f}"


def _spread(row: Mapping[str, Any]) -> str:
    """The TTFT speed-up's min-max over repeats, or "" (the baseline, rows from older files)."""
    sp = row.get("speedup_spread", {}).get("ttft")
    return f"{sp['min']:.2f}-{sp['max']:.2f}" if sp else ""


def warm_note(warmup_runs: int, repeats: int = 1) -> str:
    """One line under `zoo ask` / `zoo compare`: how the timings were taken."""
    runs = "run" if repeats == 1 else f"median of {repeats} runs (--repeats)"
    if warmup_runs:
        return (f"timings: warm {runs}, one warm-up run excluded (one-time costs: first_call_ms in --json; "
                "every run's timings: repeat_ms)" if repeats > 1 else
                "timings: warm run, one warm-up run excluded (one-time costs: first_call_ms in --json)")
    if repeats == 1:
        return "timings: cold run (--no-warmup), one-time costs (caches, first kernel calls) included"
    return (f"timings: {runs}, the first cold (--no-warmup): one-time costs (caches, first kernel calls) "
            "included there")


def bench_table(rows: Sequence[Mapping[str, Any]], spec: Any, meaningless: bool = False) -> Table:
    meaningless = meaningless or getattr(spec, "random_weights", False)
    weights = " · random weights" if meaningless else ""
    t = NumTable(title=(f"{spec.model}{weights} · {spec.device} {spec.dtype} · {plural(len(spec.images), 'image')} x "
                     f"{plural(spec.repeats, 'repeat')}, median ms (warm-up {spec.warmup} excluded)"),
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cols = ["method", "budget", "tokens", "select", "prefill", "ttft", "e2e", "ttft×", "spread",
            "e2e×", "sel/ttft"]
    for c in cols:
        left = c in ("method", "budget")
        t.add_column(c, justify="left" if left else "right", no_wrap=True)
    in_llm = False
    for r in rows:
        mark = IN_LLM_MARK if r.get("stage") == "in_llm" else ""
        in_llm |= bool(mark)
        t.add_row(
            r["method"] + mark, str(r["budget"]), f"{r['llm_visual_tokens']:.0f}", _med(r["selection"]) + mark,
            _med(r["prefill"]), _med(r["ttft"]), _med(r["e2e"]),
            f"{r['speedup_ttft']:.2f}" if "speedup_ttft" in r else "1.00", _spread(r),
            f"{r['speedup_e2e']:.2f}" if "speedup_e2e" in r else "1.00",
            f"{100 * r['selection_share_of_ttft']:.1f}%",
        )
    t.caption = ("x: speed-up against the unpruned row, median of per-repeat ratios (same repeat); "
                 "spread: their min-max. --json adds min/max, vision, decode, peak memory, FLOPs.")
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        t.caption += (f"\nNOISY MACHINE: the unpruned TTFT spread {100 * noisy[0]['baseline_ttft_spread']:.0f}% "
                      "(max-min over median, > 10%) over repeats; treat the speed-ups with care.")
    if in_llm:
        t.caption += "\n" + IN_LLM_NOTE
    if meaningless:
        t.caption += "\nrandom weights: the timings are real; what the model generates is meaningless"
    return keep_numbers(t)


def vllm_bench_table(rows: Sequence[Mapping[str, Any]], spec: Any) -> Table:
    """`zoo bench --engine vllm`: vLLM's request metrics per row, speed-ups per round."""
    t = NumTable(title=(f"{spec.model} · vLLM {spec.vllm_version} · {spec.dtype} · {spec.concurrency} at once x "
                        f"{spec.repeats} rounds (+{spec.warmup} warm-up)"),
                 title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for c in ("method", "budget", "prompt", "ttft ms", "p90", "req/s", "tok/s", "ttft×", "spread", "req/s×"):
        t.add_column(c, justify="left" if c in ("method", "budget") else "right", no_wrap=True)
    for r in rows:
        sp = r.get("speedup")
        t.add_row(r["method"], str(r["budget"]), f"{r['prompt_tokens']:.0f}", f"{r['ttft_ms']['median']:.0f}",
                  f"{r['ttft_ms']['p90']:.0f}", f"{r['requests_per_s']['median']:.2f}",
                  f"{r['output_tokens_per_s']['median']:.1f}",
                  f"{sp['ttft']['median']:.2f}" if sp else "1.00",
                  f"{sp['ttft']['min']:.2f}-{sp['ttft']['max']:.2f}" if sp else "",
                  f"{sp['requests_per_s']['median']:.2f}" if sp else "1.00")
    t.caption = ("prompt: prompt tokens per request; ttft: vLLM's first-token latency, median and p90 over "
                 "every timed request; req/s, tok/s: per round, median; x: speed-up against the unpruned row, "
                 "median of per-round ratios (spread: min-max). Every request encodes its own image (no cache "
                 "hits) and generates exactly --max-new-tokens tokens.")
    return keep_numbers(t)


# ----------------------------------------------------------------------------- views of commands

def compare_view(rows: Sequence[Mapping[str, Any]], results: Mapping[str, Any],
                 meaningless: bool) -> list[RenderableType]:
    """`zoo compare`: the table, then each method's kept-token grids (the baseline keeps all)."""
    shown = [(name, r) for name, r in results.items() if name != "none"]
    views = [compare_table(rows, meaningless)] + [grids_panel(r.scopes, title=name, note=False)
                                                  for name, r in shown]
    if any(unpadded(r.scopes) for _, r in shown):  # explained once, under the last grids
        views.append(Text(UNPADDED_NOTE, style="dim"))
    return views


def top_tokens_table(top: Sequence[Mapping[str, Any]]) -> Table:
    t = NumTable(title=f"top {plural(len(top), 'token')}", title_justify="left")
    for col in ("rank", "token", "scope", "row", "col", "sensitivity"):
        t.add_column(col, justify="right")
    for r, tok in enumerate(top, 1):
        t.add_row(str(r), str(tok["index"]), tok["scope"], str(tok["row"]), str(tok["col"]),
                  f"{tok['sensitivity']:.4g}")
    return keep_numbers(t)


def estimator_label(out: Mapping[str, Any]) -> str:
    """``exact``, or ``fd, m=64, h=0.01`` (``rank 16``): only the settings the estimator uses."""
    parts = [out.get("estimator") or "exact"]
    parts += [f"{key}={out[key]:g}" for key in ("m", "h") if out.get(key) is not None]
    if out.get("rank"):
        parts.append(f"rank {out['rank']}")
    return ", ".join(parts)


def score_view(out: Mapping[str, Any], scopes, values: Sequence[float]) -> list[RenderableType]:
    """`zoo score`: the heatmap, the statistics line, the top tokens, the norm and encoder Spearmans."""
    st = out["stats"]
    views: list[RenderableType] = [
        heat_panel(scopes, values, st["min"], st["max"]),
        Text(f"sensitivity over {plural(len(values), 'token')} ({estimator_label(out)}): min {st['min']:.4g} · median {st['median']:.4g} · "
             f"max {st['max']:.4g}"),
        top_tokens_table(out["top"]),
    ]
    if "spearman_sensitivity_vs_norm" in out:
        views.append(Text(f"Spearman(sensitivity, post-projector L2 norm) = "
                          f"{out['spearman_sensitivity_vs_norm']:.3f}"))
    if "spearman_encoder_vs_projector" in out:
        views.append(Text(f"Spearman(encoder-input sensitivity, projector sensitivity) = "
                          f"{out['spearman_encoder_vs_projector']:.3f}"))
    return views


def size_text(n_bytes: int | None) -> str:
    """``4.2 MB``, ``13.5 GB`` (decimal units, as disks are sold); ``-`` for None."""
    if n_bytes is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def models_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`zoo models`: ``zoocli.adapters.catalog`` rows, one section per source; the default marked."""
    t = Table(title="models (* the default --model)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("name", "left"), ("HF id / family", "left"), ("tokens", "right"), ("on disk", "right")):
        t.add_column(col, justify=just, no_wrap=col != "HF id / family", overflow="fold")
    for i, r in enumerate(rows):
        t.add_row(r["name"] + (" *" if r["default"] else ""), r["target"], r["visual_tokens"],
                  size_text(r["size_bytes"]) if r["cached"] else "no",
                  end_section=i + 1 < len(rows) and rows[i + 1]["source"] != r["source"])
    t.caption = ("aliases: weights from the Hugging Face Hub (on disk: in its cache); demo-llava: "
                 "shipped, trained here (shapes world only); tiny-/small-: built offline on first use "
                 "(seconds), random weights. tokens: visual tokens per image (a range: by image size).")
    return t


def kernel_table(rows: Sequence[Mapping[str, Any]], *, n: int, m: int, repeats: int,
                 warmup: int) -> Table:
    """`zoo bench-kernel`: one row per estimator."""
    r0 = rows[0]
    t = NumTable(title=(f"sensitivity estimators · N={n}, m={m}, {r0['d_in']}->{r0['d_hidden']}->"
                     f"{r0['d_out']} GELU, fp32 · {r0['device']}, torch {r0['torch']}, "
                     f"{r0['threads']} threads · median of {repeats} (warm-up {warmup} excluded)"),
              title_justify="left")
    for col in ("estimator", "W2 spectrum", "median ms", "min ms", "max ms", "vs naive",
                "Spearman vs naive"):
        t.add_column(col, justify="left" if col in ("estimator", "W2 spectrum") else "right")
    for r in rows:
        sp, rho = r.get("speedup_vs_naive"), r.get("spearman_vs_naive")
        t.add_row(r["name"], r["spectrum"], f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}",
                  f"{r['max_ms']:.0f}", "" if sp is None else f"{sp:.1f}x",
                  "" if rho is None else f"{rho:.4f}")
    t.caption = "the SVD row is paid once per projector (cached), not per call"
    ref = [r for r in rows if "spearman_vs_ref" in r and r.get("spectrum") == "decay"]
    if ref:
        t.caption += (f"\nSpearman vs float64 reference ({ref[0]['ref_tokens']} tokens x "
                      f"{ref[0]['ref_dirs']} directions, split-half {ref[0]['ref_split_half_spearman']:.3f}): "
                      + ", ".join(f"{r['name']} {r['spearman_vs_ref']:.3f}" for r in ref))
    return keep_numbers(t)


def selection_table(rows: Sequence[Mapping[str, Any]], *, repeats: int, warmup: int) -> Table:
    """`zoo bench-kernel`: one row per selection shape x backend (``zoocli.selection_bench``);
    min / max ms are in --json."""
    t = NumTable(title=(f"greedy selection (zoo_select) · {rows[0]['device']} · median of {repeats}, "
                        f"warm-up {warmup} excluded, backends interleaved"), title_justify="left")
    for col in ("shape", "backend", "ATen ops", "host syncs", "launches", "median ms", "same picks"):
        t.add_column(col, justify="left" if col in ("shape", "backend") else "right")
    for r in rows:
        if r.get("unavailable"):
            t.add_row(r["shape"], r["backend"], "-", "-", "-", "-", "-")
            continue
        interp = r["interpreted"]
        t.add_row(r["shape"], r["backend"] + ("*" if interp else ""), str(r["ops"]), str(r["syncs"]),
                  str(r["launches"]), f"({r['median_ms']:.0f})" if interp else f"{r['median_ms']:.2f}",
                  "yes" if r["same_picks"] else "NO")
    t.caption = ("ATen ops: dispatched per call, each a kernel launch or host work on a GPU; "
                 "launches: zoo's fused kernels")
    for be, why in dict((r["backend"], r["unavailable"]) for r in rows if r.get("unavailable")).items():
        t.caption += f"\n{be}: {why}" + (" (`pip install triton`; the torch backend gives the same picks)"
                                          if why == "triton not installed" else "")
    if any(r.get("interpreted") for r in rows):
        t.caption += ("\n*: Triton's CPU interpreter running the GPU kernel: its counts are a GPU's, "
                      "its times (in brackets) mean nothing")
    return keep_numbers(t)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def eval_table(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str], tput: Mapping[tuple, dict],
               meaningless: bool, mean_name: str = "mean") -> Table:
    """`zoo eval`: score % and retention % per dataset (and their mean), samples/s."""
    title = "accuracy retention (score %, retention % of the unpruned model)"
    if meaningless:
        title += " — RANDOM WEIGHTS: scores at chance"
    t = NumTable(title=title, title_justify="left")
    t.add_column("method")
    t.add_column("budget", justify="right")
    cols = list(datasets) + ([mean_name] if len(datasets) > 1 else [])
    for header in list(datasets) + (["Avg"] if len(datasets) > 1 else []):
        t.add_column(f"{header}\nscore", justify="right")
        t.add_column("ret.", justify="right")
    t.add_column("samples/s", justify="right")
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["method"], r["budget"]), {})[r["dataset"]] = r
    for (m, b), per in by.items():
        cells = [m, "all" if b is None else str(b)]
        for d in cols:
            r = per.get(d)
            cells += ["-", "-"] if r is None else [_pct(r["score"]), _pct(r["retention"])]
        sp = tput.get((m, b), {}).get("samples_per_s")
        cells.append("-" if sp is None else f"{sp:.2f}")
        t.add_row(*cells)
    return keep_numbers(t)


def eval_run_line(run: Mapping[str, Any], out: str) -> Text:
    """``15 predictions in 3.2 s (4.70 samples/s, batch size 2, 2 processes); 6 already in run.jsonl``."""
    sp = run["samples_per_s"]
    line = f"{run['predictions']} predictions in {run['seconds']:.1f} s"
    if sp:
        line += f" ({sp:.2f} samples/s, batch size {run['batch_size']}"
        line += (f", {run['world_size']} processes" if run["world_size"] > 1 else "") + ")"
    if run["resumed"]:
        line += f"; {run['resumed']} already in {out}"
    return Text(line)


def eval_view(rows, datasets, tput, meaningless: bool, run: Mapping[str, Any], out: str,
              kept_out: str | None, chance_note: str, mean_name: str = "mean") -> list[RenderableType]:
    """`zoo eval`: the table, the run line, where the predictions are, the chance note."""
    views: list[RenderableType] = [eval_table(rows, datasets, tput, meaningless, mean_name),
                                   eval_run_line(run, out)]
    if kept_out:
        views.append(Text(f"predictions: {kept_out}"))
    if meaningless:
        views.append(Text(chance_note, style="bold yellow"))
    return views
