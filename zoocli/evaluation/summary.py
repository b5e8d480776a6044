"""The figures ``zoo eval`` reports for one plan: accuracy (``store.summarize``), throughput and
POPE-style metrics per dataset x method x budget, and the run line. No printing here.

``throughput``: per (method, budget), n and samples/s = n / sum(e2e), e2e being each record's own
time (its encode + selection + its share of the batch's build / prefill / decode), so every
configuration is timed as if it ran alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from zoocli.evaluation.metrics import majority, yes_no_metrics
from zoocli.evaluation.store import record_key, summarize

CHANCE_NOTE = ("random weights: the answers carry no meaning, so these scores are at chance level "
               "and say nothing about the methods")


def plan_records(records: Iterable[dict], plan_keys: set) -> list[dict]:
    """The records of this plan (an --out file may hold other methods / budgets too)."""
    return [r for r in records if record_key(r) in plan_keys]


def throughput(records: Iterable[dict]) -> dict[tuple, dict]:
    """``{(method, budget): {"n", "samples_per_s"}}`` (None when a time is missing or zero)."""
    acc: dict[tuple, list[float]] = {}
    for r in records:
        t = (r.get("timings_ms") or {}).get("e2e")
        _d, _i, method, budget = record_key(r)
        acc.setdefault((method, budget), []).append(float(t) if t is not None else float("nan"))
    out = {}
    for key, ts in acc.items():
        total = sum(ts)
        ok = total == total and total > 0
        out[key] = {"n": len(ts), "samples_per_s": len(ts) / (total / 1e3) if ok else None}
    return out


def _metrics_row(dataset: str, method: str, budget, group: Sequence[dict]) -> dict[str, Any]:
    rs = [r for r in group if r.get("score") is not None]
    row: dict[str, Any] = {"dataset": dataset, "method": method, "budget": budget, "n": len(group),
                           "score": sum(r["score"] for r in rs) / len(rs) if rs else None}
    kinds: dict[str, list[float]] = {}
    for r in rs:
        kinds.setdefault(r.get("kind") or "vqa", []).append(float(r["score"]))
    row["by_kind"] = {k: {"n": len(v), "score": sum(v) / len(v)} for k, v in sorted(kinds.items())}
    yn = [r for r in rs if r.get("kind") == "yesno" and r.get("answers")]
    if yn:
        row["yesno"] = yes_no_metrics([r.get("extracted") for r in yn], [majority(r["answers"]) for r in yn])
    kept = [r["kept_tokens"] for r in group if isinstance(r.get("kept_tokens"), int)]
    row["mean_kept_tokens"] = sum(kept) / len(kept) if kept else None
    return row


def metrics(records: Sequence[dict], summary_rows: Sequence[dict]) -> list[dict]:
    """Per dataset x method x budget: n, score, per-kind scores, POPE metrics of the yes/no ones.
    Ordered by dataset, then (method, budget) in ``summarize``'s order (baseline first)."""
    rank = {}
    for r in summary_rows:
        rank.setdefault((r["method"], r["budget"]), len(rank))
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        d, _i, m, b = record_key(r)
        groups.setdefault((d, m, b), []).append(r)
    order = sorted(groups, key=lambda k: (k[0], rank.get((k[1], k[2]), len(rank))))
    return [_metrics_row(d, m, b, groups[(d, m, b)]) for d, m, b in order]


def eval_summary(records: Sequence[dict]) -> tuple[list[dict], list[dict], dict[tuple, dict]]:
    """(accuracy rows of ``store.summarize``, ``metrics`` rows, ``throughput``) of one plan."""
    rows = summarize(records)
    return rows, metrics(records, rows), throughput(records)


def with_throughput(rows: Sequence[dict], tput: dict[tuple, dict]) -> list[dict]:
    """The summary rows with each (method, budget)'s samples/s added (the JSON ``summary``)."""
    return [{**r, "samples_per_s": tput.get((r["method"], r["budget"]), {}).get("samples_per_s")}
            for r in rows]
