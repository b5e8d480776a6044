"""Rendering apart from compute: functions that turn results into Rich renderables (PNG figures
are in ``zoocli.figures``). Nothing here prints; commands print what these return."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.columns import Columns
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

KEPT, DROPPED, ABSENT = "█", "·", " "
RAMP = " ▁▂▃▄▅▆▇█"
MAX_GRID_COLS = 48


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


def grids_panel(scopes: Sequence[Mapping[str, Any]], title: str = "") -> Columns:
    """One panel per scope (one per crop for LLaVA-NeXT), side by side."""
    panels = []
    for s in scopes:
        k, n = sum(s["kept"]), len(s["kept"])
        panels.append(Panel(token_grid(s), title=f"{s['name']} {k}/{n}", expand=False))
    return Columns(panels, title=title or None)


def heat_panel(scopes, values, lo, hi) -> Columns:
    return Columns([Panel(heat_grid(s, values, lo, hi), title=s["name"], expand=False)
                    for s in scopes])


def answer_panel(result: Mapping[str, Any]) -> Panel:
    note = ""
    if result.get("meaningless"):
        note = "\n[yellow]random weights: this answer is meaningless[/yellow]"
    kept, total = result["n_llm_visual_kept"], result["n_llm_visual_full"]
    title = (f"{result['method']} · kept {len(result['kept_indices'])}/{result['n_visual_tokens']} "
             f"visual tokens ({kept}/{total} in the LLM) · {result['model']}")
    return Panel(Text(result["answer"] or "(empty answer)") if not note else
                 Text.from_markup(_escape(result["answer"] or "(empty answer)") + note),
                 title=title, title_align="left")


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


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
                  in_llm: bool = False) -> Table:
    """``in_llm``: the method prunes inside the LLM, so its selection is part of the prefill."""
    t = Table(title="timings", title_justify="left")
    t.add_column("stage")
    t.add_column("ms", justify="right")
    t.add_column("what")
    for key, what in TIMING_ROWS:
        if key in timings_ms:
            if in_llm and key == "selection":
                what = "token scoring inside the LLM (already counted in prefill)"
            elif in_llm and key == "prefill":
                what = "LLM prefill incl. the in-LLM pruning (to first-token logits)"
            t.add_row(key, f"{timings_ms[key]:.1f}", what)
    if new_tokens:
        t.caption = f"{new_tokens} new tokens"
    return t


def methods_table(methods: Iterable[Any]) -> Table:
    t = Table(title="methods", title_justify="left", show_lines=True)
    t.add_column("name", no_wrap=True)
    t.add_column("stage", no_wrap=True)
    t.add_column("families")
    t.add_column("what it does · paper · deviation from the official code", overflow="fold")
    for m in methods:
        fam = "all" if m.families >= {"llava", "llava_next", "qwen2_5_vl"} else ", ".join(sorted(m.families))
        text = Text(m.summary)
        if m.paper and m.paper != "-":
            text.append("\n" + m.paper, style="dim")
        if m.deviation:
            text.append("\ndeviation: " + m.deviation, style="yellow")
        t.add_row(m.name, m.stage.replace("_", "-"), fam, text)
    return t


def compare_table(rows: Sequence[Mapping[str, Any]], meaningless: bool = False) -> Table:
    t = Table(title="methods on the same image (encoded once)", title_justify="left")
    for col, just in (("method", "left"), ("kept", "right"), ("answer", "left"),
                      ("select ms", "right"), ("prefill ms", "right"), ("e2e ms", "right"),
                      ("speed-up", "right"), ("Jaccard/zoo", "right")):
        answer = col == "answer"
        t.add_column(col, justify=just, no_wrap=True, overflow="ellipsis",
                     max_width=32 if answer else None, min_width=None if answer else len(col))
    in_llm = False
    for r in rows:
        jac = "-" if r["jaccard_vs_zoo"] is None else f"{r['jaccard_vs_zoo']:.2f}"
        mark = IN_LLM_MARK if r.get("stage") == "in_llm" else ""
        in_llm |= bool(mark)
        t.add_row(r["method"] + mark, f"{r['kept']}/{r['total']}", _short(r["answer"]) or "(empty)",
                  f"{r['selection_ms']:.1f}{mark}", f"{r['prefill_ms']:.1f}", f"{r['e2e_ms']:.1f}",
                  f"{r['speedup_e2e']:.2f}x", jac)
    notes = [IN_LLM_NOTE] if in_llm else []
    if meaningless:
        notes.append("random weights: answers are meaningless; timings are real")
    if notes:
        t.caption = "\n".join(notes)
    return t


IN_LLM_MARK = "*"
IN_LLM_NOTE = ("* in-LLM method (prunes inside the LLM): select = its scoring, which runs inside the "
               "prefill and is already counted in prefill and ttft; kept = visual tokens after its last stage")


def _short(text: str, limit: int = 60) -> str:
    """One line of at most ``limit`` characters (full answers are in --json)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _med(stat: Mapping[str, float]) -> str:
    return f"{stat['median']:.1f}"


def bench_table(rows: Sequence[Mapping[str, Any]], spec: Any) -> Table:
    t = Table(title=(f"{spec.model} · {spec.device} {spec.dtype} · {len(spec.images)} image(s) x "
                     f"{spec.repeats} repeats, median ms (warm-up {spec.warmup} excluded)"),
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cols = ["method", "budget", "tokens", "select", "prefill", "ttft", "e2e", "ttft×", "e2e×",
            "sel/ttft"]
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
            *(f"{r[f'speedup_{s}']:.2f}" if f"speedup_{s}" in r else "1.00" for s in ("ttft", "e2e")),
            f"{100 * r['selection_share_of_ttft']:.1f}%",
        )
    t.caption = ("x: speed-up against the unpruned row of this run (ratio of medians). "
                 "--json adds min/max, vision, decode, peak memory and estimated FLOPs.")
    if in_llm:
        t.caption += "\n" + IN_LLM_NOTE
    return t
