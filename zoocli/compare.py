"""`zoo compare`: several methods on one image encoded once, against the unpruned model.

``run_methods`` runs the baseline ``none`` (all tokens) and every method spec on the same
``EncodedImage``; ``compare_rows`` turns the results into the rows `compare` prints and returns
as JSON: speed-ups against the baseline (``speedups``, shared with ``zoo bench``) and the
Jaccard overlap of each kept set with the first ZOO spec's (``zoocli.ops.jaccard``).
``run_compare`` times warm runs: every method once untimed (image encode included), then
``repeats`` timed passes, interleaved as `zoo bench` interleaves its rows (the first pass in plan
order, the later ones shuffled); the first pass's timings are kept apart as each result's
``first_call_ms``. A speed-up is the median of the per-repeat ratios (baseline / method, the same
repeat) with their min-max (``repeat_speedups``, shared with `zoo bench`); when the baseline's own
end-to-end time spreads by more than ``NOISE_LIMIT`` over the repeats, the rows say ``noisy``.
No printing here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

BASELINE = "none"
NOISE_LIMIT = 0.10  # the baseline's (max - min) / median over repeats above this: a noisy machine


def speedup(base_ms: float, ms: float) -> float:
    """How many times faster than the baseline: ``base_ms / ms`` (inf for a zero time)."""
    return base_ms / ms if ms > 0 else float("inf")


def speedups(base: Mapping[str, float], ms: Mapping[str, float],
             stages: Sequence[str] = ("prefill", "ttft", "e2e")) -> dict[str, float]:
    """``{"speedup_<stage>": base / ms}`` for each stage (times in ms, or medians of them)."""
    return {f"speedup_{s}": speedup(base[s], ms[s]) for s in stages}


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median of repeated measurements (0 for one, or a zero median): above
    ``NOISE_LIMIT`` for the baseline, the machine was too noisy to trust the speed-ups."""
    from zoocli.timing import summarize

    st = summarize(list(values))
    return (st["max"] - st["min"]) / st["median"] if st["median"] else 0.0


def repeat_speedups(base: Sequence[Mapping[str, float]], ms: Sequence[Mapping[str, float]],
                    stages: Sequence[str]) -> dict[str, Any]:
    """Speed-ups from interleaved repeats: per stage the median of the per-repeat ratios (baseline
    / method, the same repeat), with their min-max (``speedup_spread``). ``base`` and ``ms``: one
    dict of stage times per repeat, in repeat order."""
    import statistics

    out: dict[str, Any] = {}
    spread = {}
    for s in stages:
        ratios = [speedup(b[s], r[s]) for b, r in zip(base, ms, strict=True)]
        out[f"speedup_{s}"] = statistics.median(ratios)
        spread[s] = {"min": min(ratios), "max": max(ratios)}
    out["speedup_spread"] = spread
    out["speedup_spread_kind"] = "min-max of per-repeat ratios"
    return out


def plan_order(specs: Mapping[str, Any]) -> list[str]:
    """The baseline first, then each method spec as given."""
    return [BASELINE] + [n for n in specs if n != BASELINE]


def run_methods(adapter, enc, specs: Mapping[str, tuple[str, dict]], keep: int, *, scope: str,
                seed: int, options: Mapping[str, Any], max_new_tokens: int,
                advance: Callable[[], None] | None = None,
                on_done: Callable[[str], None] | None = None,
                order: Sequence[str] | None = None) -> dict[str, Any]:
    """``{spec: RunResult}``, the baseline first (all tokens), then each method spec in order
    (``order``: run them in this order instead; the dict keeps plan order); ``specs`` maps a spec
    as written to its parsed ``(name, options)``. After each run: ``advance()`` and ``on_done(spec)``."""
    from zoocli.pipeline import run_method

    plan = plan_order(specs)
    parsed = {BASELINE: (BASELINE, {}), **specs}
    results = {}
    for spec in order or plan:
        name, extra = parsed[spec]
        results[spec] = run_method(adapter, enc, name, enc.n if spec == BASELINE else keep,
                                   scope=scope, seed=seed, options={**options, **extra},
                                   max_new_tokens=max_new_tokens)
        if advance is not None:
            advance()
        if on_done is not None:
            on_done(spec)
    return {spec: results[spec] for spec in plan}


def round_orders(plan: Sequence[Any], rounds: int, seed: int) -> list[list[Any]]:
    """The order of the rows in each round: the plan order first, then seeded shuffles."""
    rng = random.Random(seed)
    orders = [list(plan)]
    for _ in range(1, rounds):
        order = list(plan)
        rng.shuffle(order)
        orders.append(order)
    return orders[:rounds]


def run_compare(adapter, image, question: str, specs: Mapping[str, tuple[str, dict]], keep_spec,
                *, warmup: bool = True, repeats: int = 1, advance: Callable[[], None] | None = None,
                warnings: list[str] | None = None, on_done: Callable[[str], None] | None = None,
                on_warm: Callable[[], None] | None = None, on_repeat: Callable[[int, int], None] | None = None,
                **kw) -> tuple[Any, int, dict[str, Any]]:
    """Encode ``image`` and ``run_methods`` at ``keep_spec`` (parsed against the image's tokens),
    timed warm as ``zoocli.pipeline.run_warm`` times a run: with ``warmup`` the whole pass
    (encode + every method) runs once untimed first, and each result carries that pass's timings
    as ``first_call_ms``; then ``repeats`` timed passes (each encodes the image again), in the
    order `zoo bench` uses (``round_orders``, seeded by ``kw["seed"]``). Each result is
    the first timed pass's (answers and kept sets do not change between passes: greedy) with
    ``timings_ms`` the per-stage medians and ``repeat_ms`` every pass's timings. ``on_warm()``
    after the warm-up, ``on_done(spec)`` after each timed run, ``on_repeat(i, n)`` after each
    timed pass. ``kw``: ``run_methods``' scope, seed, options, max_new_tokens.
    -> (the encoded image, keep, results)."""
    from zoocli.pipeline import encode_image, median_timings, parse_keep

    first = None
    if warmup:
        enc = encode_image(adapter, image, question)
        first = run_methods(adapter, enc, specs, parse_keep(keep_spec, enc.n)[0], advance=advance, **kw)
        if on_warm is not None:
            on_warm()
    passes = []
    for i, order in enumerate(round_orders(plan_order(specs), repeats, kw.get("seed", 0))):
        enc = encode_image(adapter, image, question)
        keep, warning = parse_keep(keep_spec, enc.n)
        if i == 0 and warning and warnings is not None:
            warnings.append(warning)
        passes.append(run_methods(adapter, enc, specs, keep, advance=advance, order=order,
                                  on_done=on_done, **kw))
        if on_repeat is not None:
            on_repeat(i + 1, repeats)
    results = passes[0]
    for spec, res in results.items():
        res.warmup_runs = int(warmup)
        res.first_call_ms = None if first is None else dict(first[spec].timings_ms)
        res.repeat_ms = [dict(p[spec].timings_ms) for p in passes]
        res.timings_ms = median_timings(res.repeat_ms)
    return enc, keep, results


def compare_rows(results: Mapping[str, Any], method_of: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per result (``results`` holds the baseline first); ``method_of`` maps each spec
    to its method name (the first ``zoo`` spec is the Jaccard reference)."""
    from zoocli.ops import jaccard

    base_res = results[BASELINE]
    base = base_res.timings_ms
    base_reps = getattr(base_res, "repeat_ms", None) or [base]
    spread = relative_spread([t["e2e"] for t in base_reps])
    zoo_specs = [n for n in results if method_of.get(n) == "zoo"]
    ref = results[zoo_specs[0]].kept_indices if zoo_specs else None
    rows = []
    for name, r in results.items():
        t = r.timings_ms
        reps = getattr(r, "repeat_ms", None) or [t]
        up = repeat_speedups(base_reps, reps, ("e2e", "prefill"))
        rows.append({
            "method": name, "stage": r.stage, "kept": len(r.kept_indices), "total": r.n_visual_tokens,
            "llm_visual_tokens": r.n_llm_visual_kept, "answer": r.answer,
            "selection_ms": t.get("selection", 0.0), "prefill_ms": t["prefill"],
            "ttft_ms": t["ttft"], "e2e_ms": t["e2e"],
            "speedup_e2e": up["speedup_e2e"], "speedup_prefill": up["speedup_prefill"],
            "speedup_spread": up["speedup_spread"], "repeats": len(reps),
            "baseline_e2e_spread": spread, "noisy": spread > NOISE_LIMIT,
            "jaccard_vs_zoo": None if ref is None else jaccard(r.kept_indices, ref),
            "kept_indices": r.kept_indices, "llm_stages": r.llm_stages,
            "warmup_runs": getattr(r, "warmup_runs", 0), "first_call_ms": getattr(r, "first_call_ms", None),
        })
    return rows
