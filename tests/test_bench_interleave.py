"""`zoo bench` interleaving: rounds, per-repeat ratios against the same repeat's baseline, noise."""

import pytest
import torch

import zoocli.bench as bench
from zoocli.pipeline import RunResult


class _Cfg:
    hidden_size, num_hidden_layers, n_params = 8, 2, 10
    projector = {"d_in": 4, "d_hidden": 8, "d": 8}


class _Adapter:
    device = torch.device("cpu")

    def llm_dims(self):
        return _Cfg()


class _Enc:
    n = 4
    prepared = type("P", (), {"inputs": {"input_ids": torch.zeros(1, 10)}})()


# per timed repeat, every stage's ms: the baseline's and "divprune"'s; "random" is always 10
TIMES = {"none": [10.0, 30.0, 20.0], "divprune": [10.0, 10.0, 20.0]}


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def run(adapter, enc, name, keep, **kw):
        calls.append(name)
        rep = calls.count(name) - 2  # one warm-up round, one image
        ms = 99.0 if rep < 0 else TIMES.get(name, [10.0] * 3)[rep]
        return RunResult("m", "llava", name, keep, 4, 4, keep, list(range(keep)), [keep], "", 1,
                         {s: ms for s in bench.STAGES}, True)

    monkeypatch.setattr(bench, "encode_image", lambda *a: _Enc())
    monkeypatch.setattr(bench, "run_method", run)
    monkeypatch.setattr(bench, "check_family", lambda *a: None)
    return calls


def _spec(**kw):
    return bench.BenchSpec(model="m", methods=["divprune", "random"], budgets=["2"], images=["x"],
                           repeats=3, warmup=1, seed=kw.pop("seed", 0), **kw)


def test_rounds_run_every_row_once_plan_order_first_then_seeded_shuffles(fake):
    spec = _spec(seed=3)
    rows = list(bench.bench_rows(_Adapter(), [object()], spec))
    plan = ["none", "divprune", "random"]
    rounds = [fake[i:i + 3] for i in range(0, 12, 3)]
    assert len(fake) == 12 and rounds[0] == plan
    assert all(sorted(r) == sorted(plan) for r in rounds)
    want = bench.round_orders(bench.planned_rows(spec), 4, 3)
    assert rounds == [[m for m, _ in order] for order in want]
    assert bench.round_orders(bench.planned_rows(spec), 4, 3) == want  # seeded: the same again
    assert sorted(r["method"] for r in rows) == sorted(plan)


def test_speedup_is_the_median_of_per_repeat_ratios_with_spread_and_noise(fake):
    rows = {r["method"]: r for r in bench.bench_rows(_Adapter(), [object()], _spec())}
    d = rows["divprune"]
    # ratios 10/10, 30/10, 20/20 -> median 1 (the ratio of medians would be 20/10 = 2)
    assert d["speedup_ttft"] == 1.0 and d["speedup_spread"]["ttft"] == {"min": 1.0, "max": 3.0}
    assert d["ttft"] == {"median": 10.0, "min": 10.0, "max": 20.0}  # warm-up (99) left out
    assert rows["random"]["speedup_e2e"] == 2.0
    assert "speedup_ttft" not in rows["none"]
    for r in rows.values():  # baseline ttft spread (30 - 10) / 20 = 1 > 10%
        assert r["baseline_ttft_spread"] == 1.0 and r["noisy"] is True


def test_a_quiet_baseline_is_not_noisy(fake, monkeypatch):
    monkeypatch.setitem(TIMES, "none", [20.0, 21.0, 20.0])
    rows = list(bench.bench_rows(_Adapter(), [object()], _spec()))
    assert all(r["noisy"] is False and r["baseline_ttft_spread"] == pytest.approx(0.05) for r in rows)


def test_skipped_rows_are_not_run_and_the_baseline_is_remeasured_but_not_yielded(fake):
    spec = _spec()
    skip = {bench.key_str(spec.key("none", "all")), bench.key_str(spec.key("divprune", "2"))}
    rows = list(bench.bench_rows(_Adapter(), [object()], spec, skip))
    assert [r["method"] for r in rows] == ["random"]
    assert "divprune" not in fake and fake.count("none") == 4
