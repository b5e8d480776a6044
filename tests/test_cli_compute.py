"""The computation the CLI delegates (score statistics, speed-ups, Jaccard rows, the eval summary)
and the views render builds for it: exact values and exact strings, no model."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from zoocli import render
from zoocli.compare import compare_rows, speedup, speedups
from zoocli.evaluation.summary import metrics, plan_records, throughput, with_throughput
from zoocli.score import positions, summary

SCOPES = [{"name": "base", "grid": [1, 2], "cells": [[0, 0], [0, 1]], "index": [0, 1]},
          {"name": "crop1", "grid": [1, 2], "cells": [[0, 0], [0, 1]], "index": [1, 2]}]


def _text(renderable, width=80) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_score_summary_stats_and_top_tokens_with_places():
    out = summary([0.5, 2.0, 2.0], SCOPES, top=2)
    assert out["stats"] == {"min": 0.5, "median": 2.0, "max": 2.0}
    assert [t["index"] for t in out["top"]] == [1, 2]  # tie -> lowest index first
    assert out["top"][0] == {"index": 1, "scope": "base", "row": 0, "col": 1, "sensitivity": 2.0}
    assert out["tokens"][2] == {"index": 2, "scope": "crop1", "row": 0, "col": 1, "sensitivity": 2.0}
    assert positions(SCOPES)[1] == ("base", 0, 1)  # first scope holding the token
    assert summary([1.0], SCOPES[:1], top=0)["top"] == []


def test_speedups_are_ratios_against_the_baseline():
    assert speedups({"prefill": 10.0, "e2e": 30.0}, {"prefill": 5.0, "e2e": 40.0}, ("prefill", "e2e")) == {
        "speedup_prefill": 2.0, "speedup_e2e": 0.75}
    assert speedup(1.0, 0.0) == float("inf")


def _res(kept, e2e, stage="pre_llm"):
    t = {"selection": 1.0, "prefill": e2e / 2, "ttft": e2e / 2, "e2e": e2e}
    return SimpleNamespace(stage=stage, kept_indices=kept, n_visual_tokens=4, n_llm_visual_kept=len(kept),
                           answer="a", timings_ms=t, llm_stages=[])


def test_compare_rows_speedups_and_jaccard_against_the_first_zoo_spec():
    results = {"none": _res([0, 1, 2, 3], 40.0), "divprune": _res([0, 1], 20.0),
               "zoo:m=8": _res([1, 2], 10.0)}
    rows = compare_rows(results, {"none": "none", "divprune": "divprune", "zoo:m=8": "zoo"})
    by = {r["method"]: r for r in rows}
    assert by["divprune"]["speedup_e2e"] == 2.0 and by["zoo:m=8"]["speedup_prefill"] == 4.0
    assert by["divprune"]["jaccard_vs_zoo"] == pytest.approx(1 / 3) and by["zoo:m=8"]["jaccard_vs_zoo"] == 1.0
    assert compare_rows({"none": _res([0], 1.0)}, {"none": "none"})[0]["jaccard_vs_zoo"] is None


def _rec(method, budget, i, score, e2e, dataset="pope", kind="yesno", answers=("yes",), extracted="yes"):
    return {"dataset": dataset, "id": i, "method": method, "budget": budget, "score": score,
            "kind": kind, "answers": list(answers), "extracted": extracted, "kept_tokens": 4,
            "timings_ms": {"e2e": e2e}}


def test_eval_throughput_metrics_order_and_plan_filter():
    recs = [_rec("zoo", 4.0, 1, 1.0, 500.0), _rec("zoo", 4, 2, 0.0, 1500.0, extracted="no"),
            _rec("none", None, 1, 1.0, 1000.0), _rec("none", None, 2, 1.0, None)]
    tput = throughput(recs)
    assert tput[("zoo", 4)] == {"n": 2, "samples_per_s": 1.0}  # 64.0 and 64 are one budget
    assert tput[("none", None)]["samples_per_s"] is None  # a missing time: no rate
    rows = [{"method": "none", "budget": None}, {"method": "zoo", "budget": 4}]
    m = metrics(recs, rows)
    assert [(r["method"], r["budget"]) for r in m] == [("none", None), ("zoo", 4)]
    assert m[1]["score"] == 0.5 and m[1]["yesno"]["accuracy"] == 0.5 and m[1]["mean_kept_tokens"] == 4
    assert with_throughput(rows, tput)[1]["samples_per_s"] == 1.0
    assert plan_records(recs, {("pope", "1", "zoo", 4)}) == [recs[0]]


def test_eval_view_exact_run_line_and_notes():
    run = {"predictions": 15, "seconds": 3.21, "samples_per_s": 4.7, "batch_size": 2, "world_size": 2,
           "resumed": 6}
    views = render.eval_view([], ["pope"], {}, True, run, "r.jsonl", "r.jsonl", "chance!")
    assert _text(views[1], 120) == ("15 predictions in 3.2 s (4.70 samples/s, batch size 2, 2 processes); "
                               "6 already in r.jsonl\n")
    assert _text(views[2]) == "predictions: r.jsonl\n" and _text(views[3]) == "chance!\n"
    quiet = dict(run, samples_per_s=None, resumed=0, world_size=1)
    assert _text(render.eval_run_line(quiet, "x")) == "15 predictions in 3.2 s\n"


def test_eval_table_columns_per_dataset_and_average():
    rows = [{"method": "none", "budget": None, "dataset": d, "score": 0.5, "retention": 1.0}
            for d in ("a", "b", "mean")]
    text = _text(render.eval_table(rows, ["a", "b"], {("none", None): {"samples_per_s": 2.0}}, False))
    assert "Avg" in text and "50.0" in text and "100.0" in text and "2.00" in text
    assert "all" in text  # the baseline's budget


def test_score_view_lines():
    out = {"m": 8, "h": 0.01, "estimator": "fd", "stats": {"min": 0.5, "median": 1.0, "max": 2.0},
           "top": [{"index": 1, "scope": "base", "row": 0, "col": 1, "sensitivity": 2.0}],
           "spearman_encoder_vs_projector": 0.25}
    layout = [dict(SCOPES[0], kept=[False, False])]
    views = render.score_view(out, layout, [0.5, 2.0])
    assert _text(views[1]) == "sensitivity over 2 tokens (fd, m=8, h=0.01): min 0.5 · median 1 · max 2\n"
    assert "top 1 token" in _text(views[2]) and "top 1 tokens" not in _text(views[2])
    exact = render.score_view(dict(out, m=None, h=None, estimator="exact"), layout, [0.5, 2.0])
    assert _text(exact[1]) == "sensitivity over 2 tokens (exact): min 0.5 · median 1 · max 2\n"  # no None
    assert _text(views[3]) == "Spearman(encoder-input sensitivity, projector sensitivity) = 0.250\n"


def test_bench_planned_runs_counts_warmup_repeats_images_and_the_baseline():
    from zoocli.bench import BenchSpec, planned_runs

    spec = BenchSpec(model="m", methods=["zoo", "none", "divprune"], budgets=["8", "4", "2"],
                     images=["a", "b"], repeats=3, warmup=1)
    assert planned_runs(spec) == (1 + 3 * 2) * (3 + 1) * 2
