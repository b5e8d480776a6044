"""In-LLM methods (FastV, SparseVLM) through an adapter: plan the prune stages, drive the layers.

The methods' kernels live in ``zoocli.methods.fastv`` / ``sparsevlm``; the layer loop in
``zoocli.llm_loop`` (no library class is patched). This module joins them for the pipeline:

- ``plan_stages(name, keep, ...)`` -> the ``PruneStage`` list of one method on one prompt.
  FastV: one stage before layer ``K`` (option, default 2) keeping ``keep`` visual tokens.
  SparseVLM: ``sparsevlm_stages``, raters chosen from the layer-0 states (the LLM input embeddings)
  of the text tokens after the image.
- ``generate_in_llm(adapter, inputs, visual, make_stages, max_new_tokens)`` -> ``InLLMResult``:
  greedy answer, kept candidates after the last stage and honest timings.

Timings: ``prefill_ms`` runs from the call to the first token's logits and INCLUDES everything the
method does inside the LLM (the full-length early layers, the rater choice, the recomputed
attention rows and the top-k); ``selection_ms`` is that method-only part (rater choice + scorers),
reported separately but already inside ``prefill_ms`` (so it must not be added to ttft again).
Every clock read is device-synchronised.

Shallow LLMs (the offline tiny models have 2 layers): FastV's ``K`` is clamped to ``n_layers - 1``
and SparseVLM (3 stages need >= 4 layers) keeps the last ``n_layers - 1`` stage counts of its
schedule, placed before layers 1 .. n_layers-1. Both are recorded in ``InLLMResult.stages``.

``visual`` are the sequence positions of the CANDIDATES only (LLaVA-NeXT newline slots are not
candidates: they stay, like in the pre-LLM methods), so the loop's visual-span indices are candidate
indices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from zoocli.errors import UsageError
from zoocli.llm_loop import PruneStage, _eos_set, generate_pruned, language_model, rows_scorer
from zoocli.timing import device_sync


@dataclass
class InLLMResult:
    ids: list[int]  # new token ids, EOS excluded
    text: str
    prefill_ms: float  # call -> first-token logits, method work included
    decode_ms: float  # first token -> last token
    selection_ms: float  # rater choice + stage scorers (already inside prefill_ms)
    kept: Tensor  # [k] candidate indices kept after the last stage, ascending
    scores: Tensor | None  # [N] the last stage's scores per candidate (NaN where already pruned)
    stages: list[dict[str, int]] = field(default_factory=list)  # per stage: layer, scored_layer, before, kept


def n_llm_layers(model) -> int:
    return len(language_model(model).layers)


def _fastv(keep: int, n: int, inputs, visual, text_after, n_layers, options) -> list[PruneStage]:
    from zoocli.methods.fastv import fastv_stage

    k = options.get("K", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"fastv: K must be an integer >= 1, got {k!r}")
    if n_layers < 2:
        raise UsageError(f"fastv needs at least 2 LLM layers, this model has {n_layers}")
    return [fastv_stage(min(keep, n), min(k, n_layers - 1))]


def _sparsevlm(keep: int, n: int, inputs, visual, text_after, n_layers, options) -> list[PruneStage]:
    from zoocli.methods.sparsevlm import sparsevlm_raters, sparsevlm_schedule, sparsevlm_stages

    if text_after.numel() == 0:
        raise UsageError("sparsevlm needs text tokens after the image to rate the visual tokens")
    emb = inputs.inputs_embeds[0]  # layer-0 states [L, D]
    raters = sparsevlm_raters(emb[visual], emb[text_after])
    if raters.numel() == 0:  # all text tokens score the same: every one rates
        raters = torch.arange(text_after.numel(), device=text_after.device)
    rater_pos = text_after[raters]
    if n_layers >= 4:
        return sparsevlm_stages(keep, n, n_layers, rater_pos)
    if n_layers < 2:
        raise UsageError(f"sparsevlm needs at least 2 LLM layers, this model has {n_layers}")
    counts = [c for _, c in sparsevlm_schedule(keep, n)][-(n_layers - 1):]
    scorer = rows_scorer(rater_pos)
    return [PruneStage(layer=i + 1, n_keep=c, scorer=scorer) for i, c in enumerate(counts)]


PLANNERS: dict[str, Callable[..., list[PruneStage]]] = {"fastv": _fastv, "sparsevlm": _sparsevlm}


def plan_stages(name: str, keep: int, inputs, visual: Tensor, text_after: Tensor, n_layers: int,
                options: dict[str, Any]) -> list[PruneStage]:
    """The prune stages of in-LLM method ``name`` for one prompt (``inputs``: the unpruned LLM
    inputs, ``visual`` [N] candidate positions, ``text_after`` positions of the text after the image)."""
    if name not in PLANNERS:
        raise UsageError(f"method '{name}' has no in-LLM driver")
    return PLANNERS[name](keep, int(visual.numel()), inputs, visual, text_after, n_layers, options)


@torch.no_grad()
def generate_in_llm(adapter, inputs, visual: Tensor, make_stages: Callable[[], list[PruneStage]],
                    max_new_tokens: int) -> InLLMResult:
    """Prefill with the stages ``make_stages()`` returns (called inside the timed prefill), then
    greedy-decode, on ``adapter.model`` through ``zoocli.llm_loop.generate_pruned`` (batch size 1)."""
    dev = adapter.device
    sel_ms = [0.0]
    marks: dict[str, float] = {}

    def clock() -> float:
        device_sync(dev)
        return time.perf_counter()

    def timed(scorer):
        def run(ctx):
            t = clock()
            out = scorer(ctx)
            sel_ms[0] += (clock() - t) * 1e3
            return out
        return run

    def on_prefill_end():
        marks["first"] = clock()

    def on_token(step: int, tok: int):
        marks["last"] = clock()

    t0 = clock()
    stages = make_stages()
    sel_ms[0] += (clock() - t0) * 1e3
    stages = [replace(s, scorer=timed(s.scorer)) for s in stages]
    res = generate_pruned(adapter.model, inputs.inputs_embeds, visual, stages,
                          attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                          max_new_tokens=max_new_tokens, on_prefill_end=on_prefill_end, on_token=on_token)
    first = marks.get("first", t0)
    last = marks.get("last", first)

    eos = _eos_set(adapter.model, None)
    ids = []
    for t in res.tokens.tolist():
        if t in eos:
            break
        ids.append(t)
    text = adapter.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    n = int(visual.numel())
    if res.stages:
        last_stage = res.stages[-1]
        kept = last_stage.kept.cpu()
        scores = torch.full((n,), float("nan"))
        scores[last_stage.present.cpu()] = last_stage.scores.float().cpu()
    else:
        kept, scores = torch.arange(n), None
    info = [{"layer": r.layer, "scored_layer": r.layer - 1, "before": int(r.present.numel()),
             "kept": int(r.kept.numel())} for r in res.stages]
    return InLLMResult(ids=ids, text=text, prefill_ms=(first - t0) * 1e3, decode_ms=(last - first) * 1e3,
                       selection_ms=sel_ms[0], kept=kept, scores=scores, stages=info)
