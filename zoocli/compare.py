"""`zoo compare`: several methods on one image encoded once, against the unpruned model.

``run_methods`` runs the baseline ``none`` (all tokens) and every method spec on the same
``EncodedImage``; ``compare_rows`` turns the results into the rows `compare` prints and returns
as JSON: speed-ups against the baseline (``speedups``, shared with ``zoo bench``) and the
Jaccard overlap of each kept set with the first ZOO spec's (``zoocli.ops.jaccard``).
``run_compare`` times a warm run: every method once untimed (image encode included), then the
timed pass, the first pass's timings kept apart as each result's ``first_call_ms``. No printing here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

BASELINE = "none"


def speedup(base_ms: float, ms: float) -> float:
    """How many times faster than the baseline: ``base_ms / ms`` (inf for a zero time)."""
    return base_ms / ms if ms > 0 else float("inf")


def speedups(base: Mapping[str, float], ms: Mapping[str, float],
             stages: Sequence[str] = ("prefill", "ttft", "e2e")) -> dict[str, float]:
    """``{"speedup_<stage>": base / ms}`` for each stage (times in ms, or medians of them)."""
    return {f"speedup_{s}": speedup(base[s], ms[s]) for s in stages}


def run_methods(adapter, enc, specs: Mapping[str, tuple[str, dict]], keep: int, *, scope: str,
                seed: int, options: Mapping[str, Any], max_new_tokens: int,
                advance: Callable[[], None] | None = None,
                on_done: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{spec: RunResult}``, the baseline first (all tokens), then each method spec in order;
    ``specs`` maps a spec as written to its parsed ``(name, options)``. After each run:
    ``advance()`` and ``on_done(spec)``."""
    from zoocli.pipeline import run_method

    order = [BASELINE] + [n for n in specs if n != BASELINE]
    parsed = {BASELINE: (BASELINE, {}), **specs}
    results = {}
    for spec in order:
        name, extra = parsed[spec]
        results[spec] = run_method(adapter, enc, name, enc.n if spec == BASELINE else keep,
                                   scope=scope, seed=seed, options={**options, **extra},
                                   max_new_tokens=max_new_tokens)
        if advance is not None:
            advance()
        if on_done is not None:
            on_done(spec)
    return results


def run_compare(adapter, image, question: str, specs: Mapping[str, tuple[str, dict]], keep_spec,
                *, warmup: bool = True, advance: Callable[[], None] | None = None,
                warnings: list[str] | None = None, on_done: Callable[[str], None] | None = None,
                on_warm: Callable[[], None] | None = None, **kw) -> tuple[Any, int, dict[str, Any]]:
    """Encode ``image`` and ``run_methods`` at ``keep_spec`` (parsed against the image's tokens),
    timed warm as ``zoocli.pipeline.run_warm`` times one run: with ``warmup`` the whole pass
    (encode + every method) runs once untimed first, and each result carries that pass's timings
    as ``first_call_ms``; ``on_warm()`` after it, ``on_done(spec)`` after each timed run. ``kw``:
    ``run_methods``' scope, seed, options, max_new_tokens.
    -> (the encoded image, keep, results)."""
    from zoocli.pipeline import encode_image, parse_keep

    first = None
    if warmup:
        enc = encode_image(adapter, image, question)
        first = run_methods(adapter, enc, specs, parse_keep(keep_spec, enc.n)[0], advance=advance, **kw)
        if on_warm is not None:
            on_warm()
    enc = encode_image(adapter, image, question)
    keep, warning = parse_keep(keep_spec, enc.n)
    if warning and warnings is not None:
        warnings.append(warning)
    results = run_methods(adapter, enc, specs, keep, advance=advance, on_done=on_done, **kw)
    for spec, res in results.items():
        res.warmup_runs = int(warmup)
        res.first_call_ms = None if first is None else dict(first[spec].timings_ms)
    return enc, keep, results


def compare_rows(results: Mapping[str, Any], method_of: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per result (``results`` holds the baseline first); ``method_of`` maps each spec
    to its method name (the first ``zoo`` spec is the Jaccard reference)."""
    from zoocli.ops import jaccard

    base = results[BASELINE].timings_ms
    zoo_specs = [n for n in results if method_of.get(n) == "zoo"]
    ref = results[zoo_specs[0]].kept_indices if zoo_specs else None
    rows = []
    for name, r in results.items():
        t = r.timings_ms
        up = speedups(base, t, ("e2e", "prefill"))
        rows.append({
            "method": name, "stage": r.stage, "kept": len(r.kept_indices), "total": r.n_visual_tokens,
            "llm_visual_tokens": r.n_llm_visual_kept, "answer": r.answer,
            "selection_ms": t.get("selection", 0.0), "prefill_ms": t["prefill"],
            "ttft_ms": t["ttft"], "e2e_ms": t["e2e"],
            "speedup_e2e": up["speedup_e2e"], "speedup_prefill": up["speedup_prefill"],
            "jaccard_vs_zoo": None if ref is None else jaccard(r.kept_indices, ref),
            "kept_indices": r.kept_indices, "llm_stages": r.llm_stages,
            "warmup_runs": getattr(r, "warmup_runs", 0), "first_call_ms": getattr(r, "first_call_ms", None),
        })
    return rows
