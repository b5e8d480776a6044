"""`zoo ask` / `zoo compare` time a warm run: one untimed warm-up run first, its timings (one-time
costs included) kept apart as ``first_call_ms``; ``--no-warmup`` times the cold run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import run, run_json
from zoocli.pipeline import RunResult, run_warm

CUP = str(Path(__file__).resolve().parent.parent / "sample_images" / "coffee_cup.jpg")
pytestmark = pytest.mark.usefixtures("offline_models")  # tiny-llava is built in the session's tmp dir

ASK = ["ask", CUP, "what?", "--model", "tiny-llava", "--keep", "5", "--max-new-tokens", "2"]


def _result(ms: float) -> RunResult:
    return RunResult("m", "llava", "zoo", 1, 4, 4, 1, [0], [1], "", 1, {"selection": ms}, True)


def test_run_warm_times_the_second_run_and_keeps_the_first_apart():
    times = iter([100.0, 2.0])
    res = run_warm(lambda: _result(next(times)))
    assert res.timings_ms == {"selection": 2.0} and res.first_call_ms == {"selection": 100.0}
    assert res.warmup_runs == 1
    cold = run_warm(lambda: _result(7.0), warmup=False)
    assert cold.timings_ms == {"selection": 7.0} and cold.first_call_ms is None and cold.warmup_runs == 0


def test_ask_json_reports_the_warm_run_and_first_call_times():
    d = run_json(*ASK)
    assert d["warmup_runs"] == 1 and set(d["first_call_ms"]) >= {"selection", "ttft", "e2e"}
    cold = run_json(*ASK, "--no-warmup")
    assert cold["warmup_runs"] == 0 and cold["first_call_ms"] is None
    assert cold["kept_indices"] == d["kept_indices"]


def test_ask_and_compare_say_how_they_timed():
    assert "one warm-up run excluded" in run(*ASK).stdout
    assert "cold run" in run(*ASK, "--no-warmup").stdout
    rows = run_json("compare", CUP, "what?", "--model", "tiny-llava", "--keep", "5",
                    "--max-new-tokens", "2", "--methods", "zoo,random", "--json")["rows"]
    assert [r["method"] for r in rows] == ["none", "zoo", "random"]
    assert all(r["warmup_runs"] == 1 and "selection" in r["first_call_ms"] for r in rows)
