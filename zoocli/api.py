"""zoo from Python: pruned answers (``ask``), method comparisons (``compare_methods``) and
sensitivity maps (``score_tokens``), as `zoo ask`, `zoo compare` and `zoo score` compute them (the
commands are built on these functions; ``zoocli.compare`` and ``zoocli.score`` are the modules
with their computation, hence the longer names).

A model is an ``Adapter``: ``load_adapter(name_or_path)`` loads one by name (alias, offline model,
HF id or local dir); ``wrap_model(model, processor)`` wraps a transformers model and processor you
already have (LLaVA-1.5 / NeXT / OneVision, Qwen2.5-VL, Qwen3-VL; dispatched on
``model.config.model_type``). Then::

    res = ask(adapter, "photo.jpg", "What is on the table?", keep="11%", method="zoo:estimator=fd")
    res.answer, res.kept, res.keep, res.timings_ms, res.warnings

Methods are the CLI's specs (``"zoo"``, ``"zoo:estimator=fd:m=64"``, ``"fastv:K=3"``; see
``zoocli.METHODS``), budgets the CLI's ``--keep`` syntax (``64`` tokens or ``"11%"`` of the
image's visual tokens). Images are a path or a PIL image. Decoding is greedy. Bad arguments raise
``UsageError`` (a ``ValueError``) with a one-line message; nothing is printed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoocli.adapters import load_adapter, wrap_model  # noqa: F401  (the two ways to get a model)
from zoocli.text import question_text

DEFAULT_QUESTION = "Describe the image."  # score's question when none is given (it sets the chat context)


def parse_methods(methods: str | Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``"divprune,zoo:estimator=fd"`` or a list of specs -> ``{spec: (method name, options)}``,
    every spec validated (``zoocli.methods.parse_method_spec``)."""
    from zoocli.errors import UsageError
    from zoocli.methods import parse_method_spec

    specs = [s.strip() for s in (methods.split(",") if isinstance(methods, str) else methods)]
    specs = [s for s in specs if s]
    if not specs:
        raise UsageError("no methods given")
    return {s: parse_method_spec(s) for s in specs}


@dataclass
class Answer:
    """One pruned answer (``ask``; each method of ``compare_methods``).

    ``kept``: the kept visual tokens, ascending candidate indices (what ``Adapter.build_inputs``
    takes). ``scopes``: per selection scope (LLaVA-NeXT: base image, then each crop; one
    ``"image"`` scope elsewhere) its ``name``, ``grid`` (rows, cols), each candidate's ``cells``
    (row, col) and ``index``, and whether it was ``kept``; ``grids()`` gives them as row-major
    masks. ``budget`` is the budget as written (``"11%"``), ``keep`` the tokens it came to out of
    ``n_visual_tokens``. ``timings_ms``: preprocess, vision, selection, build, prefill, ttft,
    decode, e2e of this run (warm if it was asked with ``warmup=True``). ``warnings``: what the
    CLI prints as ``warning:`` lines (a budget over the image's tokens, clamped). ``run``: the
    pipeline's full record (``RunResult``: scores, in-LLM stages, first-call timings...)."""

    question: str
    method: str  # the spec as given
    budget: str
    keep: int
    n_visual_tokens: int
    answer: str
    kept: list[int]
    scopes: list[dict[str, Any]]
    timings_ms: dict[str, float]
    model: str
    random_weights: bool
    warnings: list[str] = field(default_factory=list)
    run: Any = None  # zoocli.pipeline.RunResult

    def grids(self) -> dict[str, list[list[bool | None]]]:
        """``{scope name: rows x cols}`` of True (kept) / False (dropped) / None (no candidate
        there: LLaVA-NeXT rows removed by unpadding)."""
        out = {}
        for s in self.scopes:
            rows, cols = s["grid"]
            g: list[list[bool | None]] = [[None] * cols for _ in range(rows)]
            for (r, c), k in zip(s["cells"], s["kept"]):
                g[r][c] = bool(k)
            out[s["name"]] = g
        return out


@dataclass
class Comparison:
    """``compare_methods``: the unpruned baseline (``"none"``) and each method on one image
    encoded once. ``answers`` in run order (the baseline first); ``rows`` as `zoo compare --json` prints them
    (speed-ups against the baseline of this one run, Jaccard overlap with the first zoo spec)."""

    question: str
    budget: str
    keep: int
    n_visual_tokens: int
    model: str
    random_weights: bool
    answers: dict[str, Answer]
    rows: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Scores:
    """``score_tokens``: ZOO-Prune's sensitivity of every visual token (``values``, candidate
    order), ``scopes`` laid out like ``Answer.scopes`` (nothing kept), ``units`` what a value measures,
    ``stats`` (min / median / max), ``top`` the most sensitive tokens with their (scope, row, col),
    ``tokens`` every token so, ``norms`` the post-projector L2 norms and their Spearman with the
    values; ``encoder`` (with ``vs_encoder``) the sensitivity at the vision encoder's input and its
    Spearman with the projector's."""

    question: str
    model: str
    random_weights: bool
    n_visual_tokens: int
    values: list[float]
    scopes: list[dict[str, Any]]
    units: str
    options: dict[str, Any]
    stats: dict[str, float]
    top: list[dict[str, Any]]
    tokens: list[dict[str, Any]]
    norms: list[float]
    spearman_sensitivity_vs_norm: float
    encoder: dict[str, Any] | None = None


def _image(image):
    """A path or a PIL image -> an RGB PIL image (a path is read as `zoo` reads it)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        from zoocli.images import load_image

        return load_image(image)
    from zoocli.errors import UsageError

    raise UsageError(f"image must be a file path or a PIL image, not {type(image).__name__}")


def _check_budget(keep) -> str:
    """The budget as written; its syntax checked now (the token count needs the image)."""
    from zoocli.pipeline import parse_keep

    budget = str(keep).strip()
    parse_keep(budget, 10**9)
    return budget


def _answer(run, question: str, spec: str, budget: str, warnings: list[str]) -> Answer:
    return Answer(question=question, method=spec, budget=budget, keep=run.keep,
                  n_visual_tokens=run.n_visual_tokens, answer=run.answer,
                  kept=sorted(run.kept_indices), scopes=run.scopes, timings_ms=dict(run.timings_ms),
                  model=run.model, random_weights=run.meaningless, warnings=list(warnings), run=run)


def ask(adapter, image, question: str, keep: int | str = 64, method: str = "zoo", *,
        seed: int = 0, budget_scope: str = "crop", options: Mapping[str, Any] | None = None,
        max_new_tokens: int = 64, warmup: bool = False, repeats: int = 1) -> Answer:
    """Answer ``question`` about ``image`` keeping ``keep`` visual tokens chosen by ``method``.

    ``budget_scope``: ``"crop"`` (split over LLaVA-NeXT's crops) or ``"global"``. ``options``:
    defaults for the method's options (what `zoo`'s ``--estimator`` / ``--m`` ... flags give;
    the spec's own options win). ``warmup``: one untimed run first, so ``timings_ms`` are warm
    (`zoo ask` does this; the answer is the same either way). ``repeats``: timed runs;
    ``timings_ms`` are their per-stage medians, ``run.repeat_ms`` each one's."""
    from zoocli.pipeline import check_family, run_one_warm

    question = question_text(question)
    [(spec, (name, extra))] = parse_methods([method]).items()
    budget = _check_budget(keep)
    img = _image(image)
    adapter.check_image(img.size)
    check_family(adapter, name)
    warnings: list[str] = []
    run = run_one_warm(adapter, img, question, name, budget, warmup=warmup, repeats=repeats, scope=budget_scope,
                       seed=seed, options={**(options or {}), **extra},
                       max_new_tokens=max_new_tokens, warnings=warnings)
    return _answer(run, question, spec, budget, warnings)


def compare_methods(adapter, image, question: str, methods: str | Sequence[str] = ("divprune", "zoo"),
                    keep: int | str = 64, *, seed: int = 0, budget_scope: str = "crop",
                    options: Mapping[str, Any] | None = None, max_new_tokens: int = 64,
                    warmup: bool = False, repeats: int = 1, on_warm: Callable[[], None] | None = None,
                    on_done: Callable[[str], None] | None = None) -> Comparison:
    """Run the unpruned baseline and each of ``methods`` (specs, a list or comma-separated) on
    ``image`` encoded once, at the same budget. ``warmup``: the whole pass runs once untimed
    first (`zoo compare` does this); ``on_warm()`` after it, ``on_done(spec)`` after each timed
    run. ``repeats``: timed passes, in `zoo bench`'s interleaved order; timings are per-stage
    medians and the rows' speed-ups medians of per-pass ratios. Other arguments as ``ask``."""
    from zoocli.compare import BASELINE, compare_rows, run_compare
    from zoocli.pipeline import check_family

    question = question_text(question)
    specs = parse_methods(methods)
    budget = _check_budget(keep)
    img = _image(image)
    adapter.check_image(img.size)
    for name, _ in specs.values():
        check_family(adapter, name)
    warnings: list[str] = []
    enc, k, runs = run_compare(adapter, img, question, specs, budget, warmup=warmup, repeats=repeats,
                               scope=budget_scope,
                               seed=seed, options=dict(options or {}), max_new_tokens=max_new_tokens,
                               warnings=warnings, on_warm=on_warm, on_done=on_done)
    rows = compare_rows(runs, {s: p[0] for s, p in specs.items()} | {BASELINE: BASELINE})
    answers = {s: _answer(r, question, s, budget if s != BASELINE else "all", warnings)
               for s, r in runs.items()}
    return Comparison(question=question, budget=budget, keep=k, n_visual_tokens=enc.n,
                      model=adapter.model_id, random_weights=adapter.meaningless, answers=answers,
                      rows=rows, warnings=warnings)


def score_tokens(adapter, image, question: str | None = None, *, estimator: str = "exact",
                 m: int | None = None, h: float | None = None, rank: int | None = None, seed: int = 0,
                 top: int = 10, vs_encoder: bool = False, encoder_m: int | None = None,
                 encoder_h: float | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Scores:
    """ZOO-Prune's sensitivity of every visual token of ``image`` (``question`` sets the chat
    context; default "Describe the image."). ``estimator``: ``"exact"`` (closed form) or a
    sampled one (``"fd"`` the paper's Eq. 2-3, ``"jvp"``, ``"naive"``) with ``m`` directions
    (default 64), step ``h`` (default 0.01) and ``rank`` (low-rank second Linear), as the zoo
    method's options. ``vs_encoder``: also at the vision encoder's input (``encoder_m`` /
    ``encoder_h``: its directions and step; ``progress(done, total)`` as it goes)."""
    from zoocli.methods import get_method
    from zoocli.score import encoder_agreement, norm_agreement, score_image, summary

    question = DEFAULT_QUESTION if question is None else question_text(question)
    zoo = {"estimator": estimator}
    if estimator != "exact":
        zoo |= {"m": 64 if m is None else m, "h": 0.01 if h is None else h, "rank": rank}
    else:
        zoo |= {k: v for k, v in (("m", m), ("h", h), ("rank", rank)) if v is not None}
    get_method("zoo").validate(zoo)
    if not isinstance(top, int) or top < 0:
        from zoocli.errors import UsageError

        raise UsageError(f"top must be a count of at least 0, got {top!r}")
    img = _image(image)
    adapter.check_image(img.size)
    scored = score_image(adapter, img, question, seed=seed, zoo=zoo)
    summ = summary(scored.values, scored.layout, top)
    norms = norm_agreement(scored)
    encoder = None
    if vs_encoder:
        encoder = encoder_agreement(adapter, scored, m=encoder_m, h=encoder_h, seed=seed, progress=progress)
    return Scores(question=question, model=adapter.model_id, random_weights=adapter.meaningless,
                  n_visual_tokens=len(scored.values), values=scored.values, scopes=scored.layout,
                  units=scored.units, options=zoo, stats=summ["stats"], top=summ["top"],
                  tokens=summ["tokens"], norms=norms["norms"],
                  spearman_sensitivity_vs_norm=norms["spearman_sensitivity_vs_norm"], encoder=encoder)
