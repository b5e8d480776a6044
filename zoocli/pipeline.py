"""The pipeline: image + question -> encode -> select k visual tokens -> LLM -> answer, timed.

No printing here: commands render the ``RunResult``. Budgets: ``keep`` counts candidate visual
tokens (LLaVA-NeXT newline tokens are kept on top and reported in ``n_llm_visual``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from zoocli.adapters.base import Adapter, Encoded, Prepared
from zoocli.errors import UsageError
from zoocli.methods import Method, PruneInputs, check_keep, get_method, select
from zoocli.timing import Timer, device_sync

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
        keep = check_keep(int(text))
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


PROMPT_SCOPES = ("question", "all_text")


@torch.no_grad()
def prompt_embeddings(adapter: Adapter, prepared: Prepared, scope: str = "question") -> Tensor:
    """LLM input embeddings of the prompt tokens [T, D] (for prompt-aware methods): ``question``:
    the question's tokens alone; ``all_text``: every non-image token of the prompt (system prompt,
    chat template, question)."""
    if scope == "question":
        ids = prepared.question_ids
    elif scope == "all_text":
        ids = prepared.inputs["input_ids"][0]
        mask = prepared.inputs["attention_mask"][0].bool()
        ids = ids[mask & (ids != adapter.image_token_id)]
    else:
        raise UsageError(f"prompt_scope must be one of {', '.join(PROMPT_SCOPES)}, got {scope!r}")
    return adapter.model.get_input_embeddings()(ids.to(adapter.device))


def prune_inputs(
    method: Method, adapter: Adapter, prepared: Prepared, encoded: Encoded, index: Tensor,
    grid, seed: int, signals: dict[str, Tensor],
) -> PruneInputs:
    """The ``PruneInputs`` of one scope, holding exactly the signals ``method`` needs."""
    kw: dict[str, Any] = {}
    if "vision" in method.needs:
        kw["vision"] = encoded.vision[index]
    if "projector" in method.needs:
        kw["projector"] = adapter.projector
    for name in ("cls_attn", "vision_keys", "text_attn"):
        if name in method.needs:
            if name not in signals:
                raise UsageError(f"method '{method.name}' needs {name}, which the "
                                 f"{adapter.family} adapter does not provide")
            kw[name] = signals[name][index]
    if "prompt" in method.needs:
        kw["prompt"] = signals["prompt"]
    return PruneInputs(features=encoded.features[index], grid=grid, seed=seed, **kw)


def select_tokens(
    adapter: Adapter, prepared: Prepared, encoded: Encoded, method_name: str, keep: int, *,
    scope: str = "crop", seed: int = 0, options: dict[str, Any] | None = None,
    signals: dict[str, Tensor] | None = None,
) -> SelectionResult:
    """Run a pre-LLM method over the scopes (per crop, or once globally) and merge the picks."""
    if scope not in BUDGET_SCOPES:
        raise UsageError(f"--budget-scope {scope!r}: choose one of {', '.join(BUDGET_SCOPES)}")
    method = get_method(method_name)
    options = {k: v for k, v in (options or {}).items() if k in method.options}
    signals = dict(signals or {})
    if {"cls_attn", "vision_keys"} & method.needs - signals.keys():
        if not hasattr(adapter, "vision_signals"):
            raise UsageError(f"method '{method.name}' needs vision attention signals, which the "
                             f"{adapter.family} adapter does not provide")
        signals.update(adapter.vision_signals(prepared, encoded))  # the method's cost: timed as selection
    if "prompt" in method.needs and "prompt" not in signals:
        scope_opt = options.get("prompt_scope", method.options.get("prompt_scope", "question"))
        signals["prompt"] = prompt_embeddings(adapter, prepared, scope_opt)
    n, dev = encoded.features.shape[0], encoded.features.device
    if scope == "global" and len(encoded.scopes) > 1:  # one selection over all crops, no grid
        groups = [(torch.arange(n, device=dev), None)]
    else:
        groups = [(s.index.to(dev), s.grid) for s in encoded.scopes]
    quotas = split_budget(keep, [len(index) for index, _ in groups])
    kept, tokens, scores = [], [], torch.full((n,), float("nan"))
    has_tokens = False
    for (index, grid), q in zip(groups, quotas):
        if q == 0:
            continue
        inp = prune_inputs(method, adapter, prepared, encoded, index, grid, seed, signals)
        sel = select(method_name, inp, q, **options)
        kept.append(index[sel.idx])
        tokens.append(sel.tokens if sel.tokens is not None else encoded.features[index[sel.idx]])
        has_tokens |= sel.tokens is not None
        if sel.scores is not None:
            scores[index.cpu()] = sel.scores.float().cpu()
    all_kept = torch.cat(kept)
    order = torch.argsort(all_kept)
    merged = torch.cat(tokens)[order] if has_tokens else None
    return SelectionResult(
        kept=all_kept[order], tokens=merged,
        scores=None if torch.isnan(scores).all() else scores,
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
    t0 = timer.now()
    if method.stage == "in_llm":
        return _run_in_llm(adapter, prepared, encoded, method, keep, timer, t0, max_new_tokens,
                           options or {}, seed)
    with timer("selection"):
        sel = select_tokens(adapter, prepared, encoded, method_name, keep, scope=scope, seed=seed,
                            options=options)
    with timer("build"):
        inputs = adapter.build_inputs(prepared, encoded, sel.kept, sel.tokens)
    gen = adapter.generate(inputs, max_new_tokens)
    timer.add("prefill", gen.prefill_ms)
    timer.add("decode", gen.decode_ms)
    ms = timer.ms
    ms["ttft"] = ms["preprocess"] + ms["vision"] + ms["selection"] + ms["build"] + ms["prefill"]
    ms["e2e"] = (timer.now() - t0) * 1e3 + ms["preprocess"] + ms["vision"]
    n = enc.n
    return RunResult(
        model=adapter.model_id, family=adapter.family, method=method_name, keep=n if method_name == "none" else min(keep, n),
        n_visual_tokens=n, n_llm_visual_full=encoded.n_llm_visual, n_llm_visual_kept=inputs.n_visual,
        kept_indices=sel.kept.tolist(), per_scope=sel.per_scope, answer=gen.text.strip(),
        new_tokens=len(gen.ids), timings_ms={k: round(v, 3) for k, v in ms.items()},
        meaningless=adapter.meaningless, scopes=scope_layout(encoded, sel.kept),
        scores=None if sel.scores is None else [None if v != v else round(float(v), 6) for v in sel.scores.tolist()],
    )


def _run_in_llm(adapter, prepared, encoded, method, keep, timer, t0, max_new_tokens, options, seed):
    """Methods that prune inside the LLM (FastV, SparseVLM): the unpruned sequence goes in and the
    adapter drives the decoder layers with the method's prune stages (``zoocli.in_llm``). Selection
    (the scoring) happens inside the prefill: ``selection`` is reported but is already part of
    ``prefill`` and ``ttft``. Kept tokens / the grid: what is left after the last stage."""
    from zoocli.in_llm import n_llm_layers, plan_stages

    if not hasattr(adapter, "generate_in_llm"):
        raise UsageError(f"method '{method.name}' prunes inside the LLM, which the "
                         f"{adapter.family} adapter does not support yet")
    opts = {**method.options, **{k: v for k, v in options.items() if k in method.options}}
    n = int(encoded.features.shape[0])
    with timer("build"):
        inputs = adapter.build_inputs(prepared, encoded, torch.arange(n))
        visual = adapter.visual_positions(prepared, encoded).to(adapter.device)
    ids = prepared.inputs["input_ids"][0]
    last_image = int((ids == adapter.image_token_id).nonzero().max())
    after = torch.arange(ids.numel(), device=ids.device) > last_image
    text_after = (after & prepared.inputs["attention_mask"][0].bool()).nonzero().squeeze(1).to(adapter.device)
    n_layers = n_llm_layers(adapter.model)
    res = adapter.generate_in_llm(
        inputs, visual,
        lambda: plan_stages(method.name, keep, inputs, visual, text_after, n_layers, opts),
        max_new_tokens)
    timer.add("selection", res.selection_ms)  # inside prefill: not added to ttft
    timer.add("prefill", res.prefill_ms)
    timer.add("decode", res.decode_ms)
    ms = timer.ms
    ms["ttft"] = ms["preprocess"] + ms["vision"] + ms["build"] + ms["prefill"]
    ms["e2e"] = (timer.now() - t0) * 1e3 + ms["preprocess"] + ms["vision"]
    kept = torch.as_tensor(res.kept, dtype=torch.long).cpu()
    in_kept = torch.zeros(n, dtype=torch.bool)
    in_kept[kept] = True
    return RunResult(
        model=adapter.model_id, family=adapter.family, method=method.name, keep=min(keep, n),
        n_visual_tokens=n, n_llm_visual_full=encoded.n_llm_visual,
        n_llm_visual_kept=encoded.n_llm_visual - n + int(kept.numel()), kept_indices=kept.tolist(),
        per_scope=[int(in_kept[s.index.cpu()].sum()) for s in encoded.scopes],
        answer=res.text.strip(), new_tokens=len(res.ids), timings_ms={k: round(v, 3) for k, v in ms.items()},
        meaningless=adapter.meaningless, scopes=scope_layout(encoded, kept),
        scores=None if res.scores is None else [None if v != v else round(float(v), 6) for v in res.scores.tolist()],
        stage="in_llm", llm_stages=res.stages,
    )


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def fmt_ratio(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"
