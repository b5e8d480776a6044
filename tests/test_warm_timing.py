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


# ---- no single-run numbers passed off as results (issue 24): ask and compare repeat the warm run

def test_run_warm_repeats_and_reports_medians_with_every_run():
    times = iter([100.0, 5.0, 1.0, 3.0])
    res = run_warm(lambda: _result(next(times)), repeats=3)
    assert res.timings_ms == {"selection": 3.0} and res.first_call_ms == {"selection": 100.0}
    assert res.repeat_ms == [{"selection": 5.0}, {"selection": 1.0}, {"selection": 3.0}]


def test_compare_speedups_are_medians_of_per_repeat_ratios():
    from zoocli.compare import compare_rows

    def res(e2e):
        r = _result(0.0)
        r.repeat_ms = [{"selection": 0.0, "prefill": x, "ttft": x, "e2e": x} for x in e2e]
        r.timings_ms = {"selection": 0.0, "prefill": sorted(e2e)[1], "ttft": sorted(e2e)[1], "e2e": sorted(e2e)[1]}
        return r

    # the same round is slow for both: the ratio of medians (100/50 = 2) is not what is reported
    rows = compare_rows({"none": res([100.0, 200.0, 100.0]), "zoo": res([50.0, 100.0, 40.0])},
                        {"none": "none", "zoo": "zoo"})
    zoo = rows[1]
    assert zoo["speedup_e2e"] == 2.0 and zoo["speedup_spread"]["e2e"] == {"min": 2.0, "max": 2.5}
    assert zoo["repeats"] == 3 and rows[0]["noisy"]  # the baseline spread 100% over its runs


def test_ask_and_compare_repeat_the_warm_run_and_show_the_spread():
    d = run_json(*ASK)
    assert len(d["repeat_ms"]) == 3 and d["warmup_runs"] == 1
    assert d["timings_ms"]["e2e"] == sorted(r["e2e"] for r in d["repeat_ms"])[1]
    out = run(*ASK).stdout
    assert "timings (median of 3 runs)" in out and "min-max" in out
    assert len(run_json(*ASK, "--repeats", "1")["repeat_ms"]) == 1
    cmp = ["compare", CUP, "what?", "--model", "tiny-llava", "--keep", "5", "--max-new-tokens", "2",
           "--methods", "zoo,random"]
    rows = run_json(*cmp)["rows"]
    assert all(r["repeats"] == 3 and set(r["speedup_spread"]) == {"e2e", "prefill"} for r in rows)
    text = run(*cmp).stdout
    assert "spread" in text and "median of 3 interleaved runs" in text
    one = run(*cmp, "--repeats", "1").stdout
    assert "one run: the speed-up is one ratio" in one
