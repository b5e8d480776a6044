"""Tables at any width (issue 12): at 80 columns every numeric column and every number is still
there (text columns are shortened instead); narrower than the numbers a line says so."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from zoocli import render

LONG = "The image shows two cats sleeping on a red couch next to three remote controls " * 2


def _text(renderable, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def _compare_rows():
    rows = []
    for i, (m, stage) in enumerate([("none", "pre_llm"), ("divprune", "pre_llm"),
                                    ("zoo:estimator=jvp:rank=128", "pre_llm"),
                                    ("sparsevlm", "in_llm")]):
        rows.append({"method": m, "stage": stage, "kept": 64, "total": 2880, "answer": LONG,
                     "selection_ms": 1234.5 + i, "prefill_ms": 98765.4, "e2e_ms": 123456.7,
                     "speedup_e2e": 12.34, "jaccard_vs_zoo": 0.876, "repeats": 3,
                     "speedup_spread": {"e2e": {"min": 12.01, "max": 13.5}}})
    return rows


def _bench_rows():
    stat = {"median": 12345.6, "min": 1.0, "max": 2.0}
    return [{"method": m, "budget": b, "stage": "pre_llm", "llm_visual_tokens": 2880.0,
             "selection": stat, "prefill": stat, "ttft": stat, "e2e": stat,
             "speedup_ttft": 3.21, "speedup_e2e": 4.56, "selection_share_of_ttft": 0.123}
            for m, b in (("none", "all"), ("zoo:estimator=jvp", "11%"), ("divprune", "640"))]


SPEC = SimpleNamespace(model="small-llava-next", device="cpu", dtype="float32", images=["a", "b"],
                       repeats=5, warmup=1)


def _tables():
    eval_rows = [{"method": m, "budget": b, "dataset": d, "score": 0.5678, "retention": 0.9876}
                 for m, b in (("none", None), ("zoo", 64)) for d in ("textvqa", "pope", "mean")]
    return {
        "compare": (render.compare_table(_compare_rows()),
                    ["select", "prefill", "e2e", "speed-up", "spread", "Jaccard"],
                    ["64/2880", "1234.5", "98765.4", "123456.7", "12.34x", "12.01-13.50", "0.88"]),
        "bench": (render.bench_table(_bench_rows(), SPEC),
                  ["tokens", "select", "prefill", "ttft", "e2e", "ttft×", "e2e×", "sel/ttft"],
                  ["2880", "12345.6", "3.21", "4.56", "12.3%"]),
        "eval": (render.eval_table(eval_rows, ["textvqa", "pope"],
                                   {("none", None): {"samples_per_s": 2.345}}, False),
                 ["budget", "textvqa", "pope", "Avg", "score", "ret.", "samples/s"],
                 ["56.8", "98.8", "2.35", "64"]),
    }


@pytest.mark.parametrize("name", ["compare", "bench", "eval"])
def test_every_numeric_column_and_number_survives_80_columns(name):
    table, headers, numbers = _tables()[name]
    text = _text(table, 80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for h in headers:
        assert h in text, (h, text)
    for n in numbers:
        assert n in text, (n, text)
    assert "cut" not in text


def test_compare_shortens_the_answer_not_the_numbers_and_keeps_it_wide_when_there_is_room():
    narrow, wide = _text(render.compare_table(_compare_rows()), 80), _text(render.compare_table(_compare_rows()), 200)
    assert "…" in narrow and "The im" in narrow
    assert "The image shows two cats sleepi…" in wide  # the answer column is capped at 32 cells
    assert "0.88" in narrow and "12.34x" in narrow


def test_too_narrow_for_the_numbers_says_so_in_a_line():
    text = _text(render.compare_table(_compare_rows()), 40)
    flat = " ".join(text.split())
    assert "columns on the right are cut" in flat and "--json" in flat


def test_next_grids_explain_unpadded_rows_and_fit_80_columns():
    rows, cols = 24, 24
    cells = [[r, c] for r in range(3, 21) for c in range(cols)]  # rows 0-2 and 21-23 unpadded
    scopes = [{"name": f"crop {i}" if i else "base", "grid": [rows, cols], "cells": cells,
               "kept": [j % 3 == 0 for j in range(len(cells))], "index": list(range(len(cells)))}
              for i in range(5)]
    text = _text(render.grids_panel(scopes, title="zoo"), 80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert all(f"crop {i}" in text for i in range(1, 5)) and "base" in text
    assert text.count("unpadding") == 1


@pytest.mark.parametrize("answer", ["[/x] closed", "[bold]cat[/bold]", "a [red]b"])
def test_table_cells_and_headers_are_never_read_as_markup(answer):
    """A model answer (compare) or a question-file name (eval column header) with square
    brackets is printed as written: ``keep_numbers`` once parsed every string cell as Rich
    markup, so ``[/x]`` raised MarkupError and ``[bold]cat[/bold]`` lost its brackets."""
    rows = _compare_rows()
    rows[1]["answer"] = answer
    out = _text(render.compare_table(rows), 160)
    assert answer in out
    t = render.NumTable()
    t.add_column(f"set {answer}", justify="right")
    t.add_row("1.0")
    assert answer in _text(render.keep_numbers(t), 160)


def test_answer_panel_prints_the_answer_literally_with_the_random_weights_note():
    res = {"answer": "[bold]cat[/bold]", "meaningless": True, "n_llm_visual_kept": 1,
           "n_llm_visual_full": 2, "method": "zoo", "kept_indices": [0], "n_visual_tokens": 2,
           "model": "m"}
    out = _text(render.answer_panel(res), 100)
    assert "[bold]cat[/bold]" in out and "random weights: this answer is meaningless" in out
