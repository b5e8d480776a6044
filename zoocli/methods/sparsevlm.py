"""SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference (v1).

Zhang et al., ICML 2025, arXiv:2410.04417 (official code: Gumpest/SparseVLMs; v1 =
``llava/model/language_model/modelling_sparse_llama.py`` + ``score.py``). Text-guided, multi-stage
pruning inside the LLM:

1. Raters (``sparsevlm_raters``): from the layer-0 states (the LLM input embeddings), each text
   token after the image gets ``softmax_over_text(V @ T^T).mean(over visual)``; the raters are the
   text tokens scoring above the mean of those scores.
2. Score (``sparsevlm_score``): at a sparse layer, the attention from the rater rows to the visual
   columns, averaged over heads and raters; the top ``n_keep`` visual tokens stay (official:
   ``min(n_keep, n_visual - 1)``).
3. Schedule (``sparsevlm_schedule``): the official code prunes after layers 2, 6 and 15 of the
   32-layer LLaMA, with per-budget lists of visual tokens kept after each of them (``score.py``):
   192 -> [300, 200, 110], 128 -> [303, 110, 36], 96 -> [238, 48, 26], 64 -> [66, 30, 17]. The
   budget is the token count AVERAGED over layers, as the paper reports it, not the count after the
   last stage.

Rule for other budgets (ours; the official code only has those four): stage counts are linearly
interpolated, stage by stage, between the neighbouring official budgets; below 64 the 64 schedule is
scaled by keep/64, above 192 the 192 schedule by keep/192. For a different number of visual tokens
N the budget is read as a ratio of 576 (keep * 576 / N), and the counts scaled back by N / 576; for
a different depth the layers are scaled by n_layers / 32. Counts are clamped to [1, N] and made
non-increasing. The four official budgets at N=576, 32 layers give the official lists exactly.

In ``zoocli.prune_loop`` terms "prune after layer l using layer l's attention" is a ``PruneStage`` at
layer l + 1 (the first layer that runs on the pruned sequence, scored on layer l's attention);
``sparsevlm_stages`` does that conversion. ``SPARSEVLM.plan`` joins the three steps for one prompt:
raters from the layer-0 states, the schedule, and the shallow-model rule below, all in this file.

Deviations from the official v1 code: token recycling (top 30% of the pruned tokens by relevance,
clustered into n/10+1 merged tokens and re-inserted) is left out, so after each stage exactly
``n_keep`` visual tokens remain; kept tokens keep their original position ids (v1 renumbers them
contiguously; v2 keeps them); the sparse layer's attention is recomputed for the rater rows only
(official: a patched SDPA layer); batch size 1 as in the official code; on an LLM with fewer than 4
layers (the offline tiny models) only the last ``n_layers - 1`` stage counts of the schedule run,
before layers 1 .. n_layers-1 (``sparsevlm_stages``). LLaVA-NeXT newline tokens are never pruned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import torch
from zoocli.methods import LLMView, Method, register

if TYPE_CHECKING:
    from torch import Tensor

SPARSE_LAYERS = (2, 6, 15)  # official pruning_loc for the 32-layer LLaMA of LLaVA-1.5-7B
OFFICIAL_SCHEDULES = {  # score.py v1: visual tokens kept after each sparse layer (of 576)
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
_REF_N, _REF_LAYERS = 576, 32


def _schedule_576(keep: float) -> list[float]:
    """Stage counts for ``keep`` of 576 tokens: official lists, interpolated / scaled in between."""
    anchors = sorted(OFFICIAL_SCHEDULES)
    if keep <= anchors[0]:
        return [c * keep / anchors[0] for c in OFFICIAL_SCHEDULES[anchors[0]]]
    if keep >= anchors[-1]:
        return [c * keep / anchors[-1] for c in OFFICIAL_SCHEDULES[anchors[-1]]]
    for lo, hi in zip(anchors, anchors[1:]):
        if lo <= keep <= hi:
            w = (keep - lo) / (hi - lo)
            return [(1 - w) * a + w * b for a, b in zip(OFFICIAL_SCHEDULES[lo], OFFICIAL_SCHEDULES[hi])]
    raise AssertionError(keep)


def sparsevlm_layers(n_layers: int) -> list[int]:
    """The sparse layers (2, 6, 15 at depth 32) scaled to ``n_layers``, strictly increasing."""
    if n_layers < len(SPARSE_LAYERS) + 1:
        raise ValueError(f"SparseVLM needs at least {len(SPARSE_LAYERS) + 1} LLM layers, got {n_layers}")
    layers, prev = [], -1
    for i, l in enumerate(SPARSE_LAYERS):
        x = max(prev + 1, round(l * n_layers / _REF_LAYERS))
        x = min(x, n_layers - 1 - (len(SPARSE_LAYERS) - i))  # leave room for the later stages
        layers.append(x)
        prev = x
    return layers


def sparsevlm_schedule(keep: int, n_visual: int = _REF_N, n_layers: int = _REF_LAYERS) -> list[tuple[int, int]]:
    """[(layer, n_keep)]: after decoder layer ``layer`` (scored on that layer's attention), keep
    ``n_keep`` visual tokens. See the module docstring for the rule; official lists reproduced."""
    if keep < 1 or n_visual < 1:
        raise ValueError(f"keep and n_visual must be positive, got {keep}, {n_visual}")
    counts = _schedule_576(keep * _REF_N / n_visual)
    out, prev = [], n_visual
    for layer, c in zip(sparsevlm_layers(n_layers), counts):
        c = min(prev, max(1, round(c * n_visual / _REF_N)))
        out.append((layer, c))
        prev = c
    return out


def sparsevlm_raters(visual: Tensor, text: Tensor) -> Tensor:
    """Indices into ``text`` [T, D] of the rater tokens, from layer-0 states ``visual`` [N, D].

    Official: ``m = softmax(V @ T^T, dim=text).mean(dim=visual)``; raters = ``m > m.mean()``.
    """
    m = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)  # [T]
    return (m > m.mean()).nonzero().squeeze(1)


def sparsevlm_score(attn: Tensor) -> Tensor:
    """Rater-to-visual attention [H, R, N] -> one score per visual token [N] (mean over heads, raters)."""
    return attn.float().mean(dim=(0, 1))


def sparsevlm_stages(keep: int, n_visual: int, n_layers: int, rater_positions: Tensor):
    """``zoocli.prune_loop.PruneStage`` list for SparseVLM; ``rater_positions`` are the raters'
    indices in the ORIGINAL (unpruned) LLM sequence. LLMs with fewer than 4 layers (the offline tiny
    models) run the last ``n_layers - 1`` stage counts of the schedule before layers 1 .. n_layers-1."""
    from zoocli.prune_loop import PruneStage, rows_scorer

    scorer = rows_scorer(rater_positions)
    if n_layers >= len(SPARSE_LAYERS) + 1:
        sched = sparsevlm_schedule(keep, n_visual, n_layers)
        return [PruneStage(layer=l + 1, n_keep=n, scorer=scorer) for l, n in sched]
    if n_layers < 2:
        raise UsageError(f"sparsevlm needs at least 2 LLM layers, this model has {n_layers}")
    counts = [c for _, c in sparsevlm_schedule(keep, n_visual)][-(n_layers - 1):]
    return [PruneStage(layer=i + 1, n_keep=c, scorer=scorer) for i, c in enumerate(counts)]


def plan(view: LLMView, keep: int) -> list:
    """Raters from the layer-0 states of the text after the image, then ``sparsevlm_stages``."""
    if view.text_after.numel() == 0:
        raise UsageError("sparsevlm needs text tokens after the image to rate the visual tokens")
    raters = sparsevlm_raters(view.layer0[view.visual], view.layer0[view.text_after])
    if raters.numel() == 0:  # all text tokens score the same: every one rates
        raters = torch.arange(view.text_after.numel(), device=view.text_after.device)
    return sparsevlm_stages(keep, view.n, view.n_layers, view.text_after[raters])


SPARSEVLM = register(Method(
    name="sparsevlm", fn=None, plan=plan, stage="in_llm", needs=frozenset({"decoder"}),
    summary="v1: text-rater attention at LLM layers 2/6/15, progressively pruned (no recycling)",
    paper="SparseVLM, Zhang et al., ICML 2025 (arXiv:2410.04417)",
    deviation=(
        "v1 without token recycling; original position ids kept; rater attention recomputed for the "
        "rater rows only; budgets other than 64/96/128/192 interpolated between the official schedules; "
        "on LLMs with < 4 layers only the last n_layers-1 stages run"
    ),
))
