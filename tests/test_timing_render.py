"""Timing discipline (fake clock, counting sync) and rendering (exact strings)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from zoocli.pipeline import parse_keep, split_budget
from zoocli.render import token_grid
from zoocli.timing import Timer, summarize


def test_timer_syncs_before_every_clock_read_and_sums_sections():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 3.0, 3.5])
    syncs = []
    t = Timer(sync=lambda: syncs.append(1), clock=lambda: next(ticks))
    with t("a"):
        pass
    with t("b"):
        pass
    with t("a"):
        pass
    assert t.ms == {"a": 1500.0 + 500.0, "b": 250.0}
    assert len(syncs) == 6  # two synchronised reads per section


def test_summarize_is_median_min_max():
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    with pytest.raises(ValueError):
        summarize([])


def test_bench_leaves_warmup_out(monkeypatch):
    """Warm-up rounds are executed but never reach the figures (``bench_rows``, the runner
    ``zoo bench`` uses)."""
    import zoocli.bench as bench
    from zoocli.pipeline import RunResult

    calls = []

    class Enc:
        n = 4
        prepared = type("P", (), {"inputs": {"input_ids": __import__("torch").zeros(1, 10)}})()

    def fake_run(adapter, enc, name, keep, **kw):
        calls.append(name)
        ms = float(len(calls))  # 1, 2, 3...: the first (warm-up) run is the fastest
        return RunResult("m", "llava", name, keep, 4, 4, keep, list(range(keep)), [keep], "", 1,
                         {s: ms for s in bench.STAGES}, True)

    monkeypatch.setattr(bench, "encode_image", lambda *a: Enc())
    monkeypatch.setattr(bench, "run_method", fake_run)
    spec = bench.BenchSpec(model="m", methods=["none"], budgets=[], images=["x"], repeats=3, warmup=2)
    rows = list(bench.bench_rows(_FakeAdapter(), [object()], spec))
    assert len(calls) == 5 and len(rows) == 1
    assert rows[0]["e2e"] == {"median": 4.0, "min": 3.0, "max": 5.0}


_DIMS = {"d_in": 4, "d_hidden": 8, "d": 8}


class _Cfg:
    hidden_size, num_hidden_layers, n_params, projector = 8, 2, 10, _DIMS


class _FakeAdapter:
    import torch as _t

    device = _t.device("cpu")
    family = "llava"

    def llm_dims(self):
        return _Cfg()


def _render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(renderable)
    return buf.getvalue()


def test_token_grid_exact():
    scope = {"name": "image", "grid": [2, 3], "cells": [[0, 0], [0, 1], [0, 2], [1, 0], [1, 2]],
             "index": [0, 1, 2, 3, 4], "kept": [True, False, True, False, True]}
    assert _render(token_grid(scope)) == "█·█\n· █\n"


@pytest.mark.parametrize("spec,n,want", [("64", 576, 64), ("11%", 576, 63), ("100%", 10, 10),
                                         ("1000", 576, 576)])
def test_parse_keep(spec, n, want):
    assert parse_keep(spec, n)[0] == want


def test_split_budget_even_remainder_and_surplus():
    assert split_budget(10, [5, 5, 5]) == [4, 3, 3]
    assert split_budget(12, [2, 10, 10]) == [2, 5, 5]
    assert split_budget(100, [3, 4]) == [3, 4]
    assert sum(split_budget(160, [576, 500, 480, 576, 0])) == 160
