"""The pipeline: image + question -> encode -> select k visual tokens -> LLM -> answer, timed.

Two paths, chosen by the method's ``stage``: a pre-LLM method selects on the encoded tokens
(``select_tokens``: per scope, with exactly the signals it ``needs``, checked against the adapter's
``provides``) and the adapter generates on the pruned sequence; an in-LLM method's ``plan`` gives
prune stages that ``zoocli.prune_loop.generate_in_llm`` runs inside the LLM on the unpruned
sequence. TTFT and end to end come from ``zoocli.timing.add_ttft_e2e`` on both paths.

No printing here: commands render the ``RunResult``. Budgets: ``keep`` counts candidate visual
tokens (LLaVA-NeXT newline tokens are kept on top and reported in ``n_llm_visual``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zoocli.adapters.base import Adapter, Encoded, Prepared
from zoocli.errors import UsageError
from zoocli.methods import LLMView, Method, PruneInputs, get_method, select_scopes
from zoocli.timing import Timer, add_ttft_e2e, device_sync

BUDGET_SCOPES = ("crop", "global")


def parse_keep(spec: str | int, n: int, option: str = "--keep") -> tuple[int, str | None]:
    """``"64"`` or ``"11%"`` (of the ``n`` candidates) -> (tokens, warning). More than ``n`` is
    clamped to ``n`` with a warning; zero or less is an error. ``option`` names the flag in messages."""
    text = str(spec).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UsageError(f"{option} {text}: a percentage must be in (0, 100]")
        keep = max(1, round(n * pct / 100))
    elif re.fullmatch(r"-?\d+", text):
        if len(text.lstrip("-")) > 18:  # no model has 10**18 tokens; int() refuses 4300+ digits
            raise UsageError(f"{option} {text[:24]}… ({len(text)} digits): give a token count of at "
                             f"most {10**18 - 1} or a percentage (11%)")
        keep = int(text)
        if keep < 1:
            raise UsageError(f"{option} {text}: keep must be at least 1 visual token (a count such "
                             f"as 64, or a percentage such as 11%)")
    else:
        raise UsageError(f"{option} {text!r}: give a token count (64) or a percentage (11%)")
    if keep > n:
        return n, f"{option} {text} is more than the {n} visual tokens: keeping all {n}"
    return keep, None


def split_budget(keep: int, sizes: list[int]) -> list[int]:
    """Split ``keep`` equally over scopes of ``sizes`` tokens; the remainder goes to the first
    scopes, and a scope smaller than its share keeps all it has, its surplus shared by the rest."""
    quota = [0] * len(sizes)
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    left = min(keep, sum(sizes))
    while left > 0 and open_:
        share, rem = divmod(left, len(open_))
        give = {i: share + (1 if r < rem else 0) for r, i in enumerate(open_)}
        for i in open_:
            g = min(give[i], sizes[i] - quota[i])
            quota[i] += g
            left -= g
        open_ = [i for i in open_ if quota[i] < sizes[i]]
    return quota


@dataclass
class SelectionResult:
    kept: Tensor  # [K] ascending candidate indices
    tokens: Tensor | None  # [K, D] replacement embeddings aligned with ``kept`` (merging methods)
    scores: Tensor | None  # [N] per-candidate scores, if the method has them
    per_scope: list[int]  # kept tokens per scope


PROMPT_SCOPES = ("question", "all_text", "keywords")


@torch.no_grad()
def prompt_embeddings(adapter: Adapter, prepared: Prepared, scope: str = "question") -> Tensor:
    """LLM input embeddings of the prompt tokens [T, D] (for prompt-aware methods): ``question``:
    the question's tokens alone; ``all_text``: every non-image token of the prompt (system prompt,
    chat template, question); ``keywords``: the question's descriptive words (MMTok's stop-word
    filter, ``zoocli.methods.mmtok.question_keywords``) as plain text."""
    if scope == "question":
        ids = prepared.question_ids
    elif scope == "keywords":
        from zoocli.adapters.prompt import question_ids
        from zoocli.methods.mmtok import question_keywords

        ids = torch.tensor(question_ids(adapter.processor.tokenizer, question_keywords(prepared.question)),
                           dtype=torch.long, device=prepared.question_ids.device)
    elif scope == "all_text":
        ids = prepared.inputs["input_ids"][0]
        mask = prepared.inputs["attention_mask"][0].bool()
        ids = ids[mask & (ids != adapter.image_token_id)]
    else:
        raise UsageError(f"prompt_scope must be one of {', '.join(PROMPT_SCOPES)}, got {scope!r}")
    return adapter.embed_ids(ids)


def prune_inputs(
    method: Method, encoded: Encoded, projector, index: Tensor, grid, seed: int,
    signals: dict[str, Tensor], cells: Tensor | None = None,
) -> PruneInputs:
    """The ``PruneInputs`` of one scope, holding exactly the signals ``method`` needs (and, like
    ``grid``, the scope's ``cells`` when it has a grid)."""
    kw: dict[str, Any] = {}
    if "vision" in method.needs:
        kw["vision"] = encoded.vision[index]
    if "projector" in method.needs:
        kw["projector"] = projector
    for name in ("cls_attn", "vision_keys"):
        if name in method.needs:
            kw[name] = signals[name][index]
    if "prompt" in method.needs:
        kw["prompt"] = signals["prompt"]
    return PruneInputs(features=encoded.features[index], grid=grid, cells=cells, seed=seed, **kw)


def _check_provides(method: Method, adapter: Adapter) -> None:
    missing = sorted(method.needs - adapter.provides)
    if missing:
        raise UsageError(f"method '{method.name}' needs {', '.join(missing)}, which the "
                         f"{adapter.family} adapter does not provide")


def select_tokens(
    adapter: Adapter, prepared: Prepared, encoded: Encoded, method_name: str, keep: int, *,
    scope: str = "crop", seed: int = 0, options: dict[str, Any] | None = None,
    signals: dict[str, Tensor] | None = None,
) -> SelectionResult:
    """Run a pre-LLM method over the scopes (per crop, or once globally) and merge the picks. The
    crops go through ``zoocli.methods.select_scopes``: one padded batch for the methods with a
    batched kernel (zoo, sum, sensitivity, divprune), one crop after another for the rest."""
    method = get_method(method_name)
    options = {k: v for k, v in (options or {}).items() if k in method.options}
    signals = dict(signals or {})
    _check_provides(method, adapter)
    if {"cls_attn", "vision_keys"} & method.needs - signals.keys():
        signals.update(adapter.vision_signals(prepared, encoded))  # the method's cost: timed as selection
    if "prompt" in method.needs and "prompt" not in signals:
        scope_opt = options.get("prompt_scope", method.options.get("prompt_scope", "question"))
        signals["prompt"] = prompt_embeddings(adapter, prepared, scope_opt)
    return select_encoded(method_name, encoded, keep, projector=adapter.projector, scope=scope, seed=seed,
                          options=options, signals=signals)


def select_encoded(
    method_name: str, encoded: Encoded, keep: int, *, projector=None, scope: str = "crop", seed: int = 0,
    options: dict[str, Any] | None = None, signals: dict[str, Tensor] | None = None,
) -> SelectionResult:
    """``select_tokens`` once the signals are gathered: the budget split over the scopes (or one
    global scope), the method per scope, the picks merged in ascending order. No adapter, no
    prompt: what a serving engine that holds only the encoded image calls (``zoocli.integrations.vllm``)."""
    if scope not in BUDGET_SCOPES:
        raise UsageError(f"--budget-scope {scope!r}: choose one of {', '.join(BUDGET_SCOPES)}")
    method = get_method(method_name)
    options = {k: v for k, v in (options or {}).items() if k in method.options}
    signals = signals or {}
    n, dev = encoded.features.shape[0], encoded.features.device
    if scope == "global" and len(encoded.scopes) > 1:  # one selection over all crops, no grid
        groups = [(torch.arange(n, device=dev), None, None)]
    else:
        groups = [(s.index.to(dev), s.grid, s.cells) for s in encoded.scopes]
    quotas = split_budget(keep, [len(index) for index, _, _ in groups])
    kept, tokens = [], []
    scores = torch.full((n,), float("nan"), device=dev)  # stays on the device: no host read here
    live = [(index, grid, cells, q) for (index, grid, cells), q in zip(groups, quotas) if q > 0]
    inps = [prune_inputs(method, encoded, projector, index, grid, seed, signals, cells)
            for index, grid, cells, _ in live]
    sels = select_scopes(method_name, inps, [q for *_, q in live], **options)
    has_tokens = has_scores = False
    for (index, *_), sel in zip(live, sels):
        kept.append(index[sel.idx])
        tokens.append(sel.tokens if sel.tokens is not None else encoded.features[index[sel.idx]])
        has_tokens |= sel.tokens is not None
        if sel.scores is not None:
            scores[index] = sel.scores.float().to(dev)
            has_scores = True
    all_kept = torch.cat(kept)
    order = torch.argsort(all_kept)
    merged = torch.cat(tokens)[order] if has_tokens else None
    return SelectionResult(
        kept=all_kept[order], tokens=merged,
        scores=scores if has_scores else None,
        per_scope=quotas,
    )


@dataclass
class RunResult:
    model: str
    family: str
    method: str
    keep: int
    n_visual_tokens: int  # candidates
    n_llm_visual_full: int
    n_llm_visual_kept: int
    kept_indices: list[int]
    per_scope: list[int]
    answer: str
    new_tokens: int
    timings_ms: dict[str, float]
    meaningless: bool
    scopes: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] | None = None
    stage: str = "pre_llm"  # in_llm: selection_ms is the scoring inside the LLM, already in prefill_ms
    llm_stages: list[dict[str, int]] = field(default_factory=list)  # in-LLM prune stages (layer, before, kept)
    warmup_runs: int = 0  # untimed runs before this one (``run_warm``)
    first_call_ms: dict[str, float] | None = None  # the first (warm-up) run's timings, one-time costs included
    answer_ids: list[int] = field(default_factory=list)  # the answer's token ids (EOS cut), for exact comparisons
    # every timed run's timings when the run was repeated (``run_warm``); timings_ms: their medians
    repeat_ms: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scope_layout(encoded: Encoded, kept: Tensor) -> list[dict[str, Any]]:
    """Per scope: its grid, each candidate's cell and whether it was kept (for grids/overlays)."""
    kept_set = torch.zeros(encoded.features.shape[0], dtype=torch.bool)
    kept_set[kept.cpu()] = True
    return [
        {
            "name": s.name, "grid": list(s.grid), "box": list(s.box),
            "cells": s.cells.tolist(), "index": s.index.tolist(),
            "kept": kept_set[s.index.cpu()].tolist(),
        }
        for s in encoded.scopes
    ]


@dataclass
class EncodedImage:
    """An image prepared and encoded once, reusable by several methods (``zoo compare``)."""

    prepared: Prepared
    encoded: Encoded
    timings_ms: dict[str, float]  # preprocess, vision

    @property
    def n(self) -> int:
        return int(self.encoded.features.shape[0])


def encode_image(adapter: Adapter, image, question: str) -> EncodedImage:
    timer = Timer(sync=lambda: device_sync(adapter.device))
    with timer("preprocess"):
        prepared = adapter.prepare(image, question)
    with timer("vision"):
        encoded = adapter.encode(prepared)
    return EncodedImage(prepared, encoded, dict(timer.ms))


def run_one(
    adapter: Adapter, image, question: str, method_name: str, keep_spec: str | int = "64", *,
    scope: str = "crop", seed: int = 0, options: dict[str, Any] | None = None,
    max_new_tokens: int = 64, warnings: list[str] | None = None,
) -> RunResult:
    """One full pruned answer with its timings (ms): preprocess, vision, selection, build,
    prefill, ttft (start to first token), decode, e2e."""
    check_family(adapter, method_name)
    enc = encode_image(adapter, image, question)
    keep, warn = parse_keep(keep_spec, enc.n)
    if warn and warnings is not None:
        warnings.append(warn)
    return run_method(adapter, enc, method_name, keep, scope=scope, seed=seed, options=options,
                      max_new_tokens=max_new_tokens)


def median_timings(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per stage, the median over repeated runs' timings (the stages of the first run)."""
    import statistics

    return {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}


def run_warm(run, warmup: bool = True, repeats: int = 1) -> RunResult:
    """``run()`` once untimed, then ``repeats`` times timed: the timed runs are warm, so one-time
    costs (caches such as the exact estimator's M matrix or the SVD factor, the first call of each
    kernel) never show up in their selection time. The result is the first timed run's (greedy
    decoding: every run answers the same) with ``timings_ms`` the per-stage medians over the timed
    runs and ``repeat_ms`` each one's timings. The warm-up run's own timings, those costs
    included, are kept apart in ``first_call_ms``. ``warmup=False``: the first timed run is cold,
    ``first_call_ms`` None."""
    first = run() if warmup else None
    timed = [run() for _ in range(repeats)]
    res = timed[0]
    res.repeat_ms = [dict(r.timings_ms) for r in timed]
    res.timings_ms = median_timings(res.repeat_ms)
    res.warmup_runs = int(warmup)
    res.first_call_ms = None if first is None else dict(first.timings_ms)
    return res


def run_one_warm(adapter: Adapter, image, question: str, method_name: str, keep_spec: str | int = "64",
                 *, warmup: bool = True, repeats: int = 1, warnings: list[str] | None = None,
                 **kw) -> RunResult:
    """``run_one`` timed warm (``run_warm``): one untimed warm-up run (image encode included)
    first, then ``repeats`` timed runs. Keeps ``run_one``'s keywords; ``warnings`` are collected
    from the first timed run only."""
    calls = iter([None] * int(warmup) + [warnings] + [None] * (repeats - 1))
    return run_warm(lambda: run_one(adapter, image, question, method_name, keep_spec,
                                    warnings=next(calls), **kw), warmup, repeats)


def check_family(adapter: Adapter, method_name: str) -> Method:
    method = get_method(method_name)
    if adapter.family not in method.families:
        raise UsageError(f"method '{method_name}' does not support {adapter.family} models "
                         f"(supports {', '.join(sorted(method.families))})")
    return method


def run_method(
    adapter: Adapter, enc: EncodedImage, method_name: str, keep: int, *, scope: str = "crop",
    seed: int = 0, options: dict[str, Any] | None = None, max_new_tokens: int = 64,
) -> RunResult:
    """Select, build and generate on an already encoded image. The image's preprocess and vision
    times count towards this run's ttft and e2e (as if it had been encoded for this run alone)."""
    method = check_family(adapter, method_name)
    prepared, encoded = enc.prepared, enc.encoded
    timer = Timer(sync=lambda: device_sync(adapter.device))
    timer.ms.update(enc.timings_ms)
    if method.stage == "in_llm":
        return _run_in_llm(adapter, enc, method, keep, timer, max_new_tokens, options or {})
    with timer("selection"):
        sel = select_tokens(adapter, prepared, encoded, method_name, keep, scope=scope, seed=seed,
                            options=options)
    with timer("build"):
        inputs = adapter.build_inputs(prepared, encoded, sel.kept, sel.tokens)
    gen = adapter.generate(inputs, max_new_tokens)
    timer.add("prefill", gen.prefill_ms)
    timer.add("decode", gen.decode_ms)
    ms = add_ttft_e2e(timer.ms)
    n = enc.n
    return RunResult(
        model=adapter.model_id, family=adapter.family, method=method_name, keep=n if method_name == "none" else min(keep, n),
        n_visual_tokens=n, n_llm_visual_full=encoded.n_llm_visual, n_llm_visual_kept=inputs.n_visual,
        kept_indices=sel.kept.tolist(), per_scope=sel.per_scope, answer=gen.text.strip(),
        new_tokens=len(gen.ids), answer_ids=list(gen.ids), timings_ms={k: round(v, 3) for k, v in ms.items()},
        meaningless=adapter.meaningless, scopes=scope_layout(encoded, sel.kept),
        scores=_rounded(sel.scores),
    )


def llm_view(adapter: Adapter, prepared: Prepared, inputs, visual: Tensor) -> LLMView:
    """What an in-LLM method's plan sees of one prompt: candidate positions, the text after the
    image, the layer-0 states and the decoder depth."""
    ids = prepared.inputs["input_ids"][0]
    last_image = int((ids == adapter.image_token_id).nonzero().max())
    after = torch.arange(ids.numel(), device=ids.device) > last_image
    text_after = (after & prepared.inputs["attention_mask"][0].bool()).nonzero().squeeze(1)
    return LLMView(n_layers=len(adapter.decoder().layers), visual=visual,
                   text_after=text_after.to(adapter.device), layer0=inputs.inputs_embeds[0])


def _run_in_llm(adapter, enc: EncodedImage, method: Method, keep, timer, max_new_tokens, options):
    """Methods that prune inside the LLM (FastV, SparseVLM): the unpruned sequence goes in and the
    prune loop runs the method's ``plan`` stages (``zoocli.prune_loop``). Selection (plan + scoring)
    happens inside the prefill: ``selection`` is reported but is already part of ``prefill`` and
    ``ttft``. Kept tokens / the grid: what is left after the last stage."""
    from zoocli.prune_loop import generate_in_llm

    _check_provides(method, adapter)
    opts = method.validate({k: v for k, v in options.items() if k in method.options})
    prepared, encoded, n = enc.prepared, enc.encoded, enc.n
    with timer("build"):
        inputs = adapter.build_inputs(prepared, encoded, torch.arange(n))
        visual = adapter.visual_positions(prepared, encoded).to(adapter.device)
    view = llm_view(adapter, prepared, inputs, visual)
    res = generate_in_llm(adapter, inputs, visual, lambda: method.plan(view, keep, **opts), max_new_tokens)
    timer.add("selection", res.selection_ms)  # inside prefill: not added to ttft
    timer.add("prefill", res.prefill_ms)
    timer.add("decode", res.decode_ms)
    ms = add_ttft_e2e(timer.ms, selection_in_prefill=True)
    kept = torch.as_tensor(res.kept, dtype=torch.long).cpu()
    return RunResult(
        model=adapter.model_id, family=adapter.family, method=method.name, keep=min(keep, n),
        n_visual_tokens=n, n_llm_visual_full=encoded.n_llm_visual,
        n_llm_visual_kept=encoded.n_llm_visual - n + int(kept.numel()), kept_indices=kept.tolist(),
        per_scope=_per_scope(encoded, kept), answer=res.text.strip(), new_tokens=len(res.ids), answer_ids=list(res.ids),
        timings_ms={k: round(v, 3) for k, v in ms.items()}, meaningless=adapter.meaningless,
        scopes=scope_layout(encoded, kept), scores=_rounded(res.scores), stage="in_llm", llm_stages=res.stages,
    )


def _per_scope(encoded: Encoded, kept: Tensor) -> list[int]:
    in_kept = torch.zeros(encoded.features.shape[0], dtype=torch.bool)
    in_kept[kept] = True
    return [int(in_kept[s.index.cpu()].sum()) for s in encoded.scopes]


def _rounded(scores: Tensor | None) -> list[float | None] | None:
    """Scores for JSON: 6 decimals, NaN (no score) as None."""
    return None if scores is None else [None if v != v else round(float(v), 6) for v in scores.tolist()]
