"""PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction.

Xing et al., CVPR 2025, arXiv:2410.17247 (official code: Cooperx521/PyramidDrop, MIT, read at
6444f304aee4b7edcb022839fb9e8cd07859704a: ``llava/model/modeling_llama_pdrop.py`` ``pdrop_forward``
/ ``pdrop_rank_drop``, ``llava/eval/model_vqa_loader.py``, ``scripts/v1_5/pdrop_eval/*.sh``; the
authors' budget rule in issue #29). Training-free use (the paper's inference-only setting):

- Stages: the LLM is cut at layers l1 < l2 < l3 (official 8, 16, 24 of 32). Before layer l_s the
  visual tokens still present are ranked by the attention the LAST instruction token (the last
  prompt token) gives them in layer l_s's OWN attention over its input (its input norm, q/k
  projections and rotary; softmax over the whole causal row, mean over heads), and the top
  ``int(N * lam**s)`` stay (official: ``image_token_ratio_list`` [lam, lam^2, lam^3], counts
  truncated with ``int``). In ``zoocli.prune_loop`` terms: ``PruneStage(l_s, n, own_layer=True)``
  with the last-token scorer.
- Budget (``keep``): the visual token count AVERAGED over the LLM layers, as the paper's Table 2
  reports it and the authors prescribe for other budgets (issue #29: keep the lam, lam^2, lam^3
  pyramid, move the first drop earlier, solve for lam so the average matches; e.g. layers 2/8/16,
  lam = 0.19 for 64 of 576). Rule (``pdrop_schedule``): the layers are the official 8/16/24 when
  the budget is reachable with them (average >= N/4 at depth 32), else the authors' 2/8/16; lam is
  the largest value in [0, 1] whose schedule averages at most ``keep`` tokens (counts at least 1;
  below N/16 at depth 32, lam = 0 and every stage keeps 1). The layers are scaled by n_layers / 32.
  The official default (8/16/24, lam = 0.5: 288/144/72 of 576) is the schedule for keep = 270.

Deviations from the official code: kept tokens keep their original position ids (official:
renumbered contiguously after each drop, in prefill and decode); ties go to the lowest index
(``torch.topk`` leaves them unspecified); batch size 1 (the official code loops over the batch);
with a KV cache the pruning happens once at prefill (as the official KV-cache mode); on an LLM with
fewer than 4 layers (the offline tiny models) the schedule is computed for depth 32 and its last
``n_layers - 1`` stage counts run before layers 1 .. n_layers-1. LLaVA-NeXT newline tokens are never
pruned (official: part of the image span).
"""

from __future__ import annotations

from zoocli.errors import UsageError
from zoocli.methods import LLMView, Method, register

LAYOUTS = ((8, 16, 24), (2, 8, 16))  # official default; the authors' low-budget layout (issue #29)
_REF_LAYERS = 32


def pdrop_layers(layout: tuple[int, ...], n_layers: int) -> list[int]:
    """Stage layers ``layout`` (at depth 32) scaled to ``n_layers``, strictly increasing in [1, n_layers)."""
    if n_layers < len(layout) + 1:
        raise ValueError(f"PyramidDrop needs at least {len(layout) + 1} LLM layers, got {n_layers}")
    out, prev = [], 0
    for i, l in enumerate(layout):
        x = max(prev + 1, round(l * n_layers / _REF_LAYERS))
        out.append(min(x, n_layers - len(layout) + i))
        prev = out[-1]
    return out


def pdrop_counts(n: int, lam: float, stages: int = 3) -> list[int]:
    """Visual tokens kept after each stage: ``int(n * lam**s)`` (official truncation), at least 1."""
    return [max(1, int(n * lam ** s)) for s in range(1, stages + 1)]


def average_tokens(n: int, layers: list[int], counts: list[int], n_layers: int) -> float:
    """Visual tokens per layer, averaged over the ``n_layers`` layers (n before ``layers[0]``)."""
    bounds = [*layers, n_layers]
    return (n * layers[0] + sum(c * (b - a) for c, a, b in zip(counts, layers, bounds[1:]))) / n_layers


def pdrop_schedule(keep: int, n: int, n_layers: int = _REF_LAYERS) -> tuple[float, list[tuple[int, int]]]:
    """(lam, [(layer, n_keep)]) for an average budget of ``keep`` of ``n`` visual tokens; the rule
    is in the module docstring."""
    if keep < 1 or n < 1:
        raise ValueError(f"keep and n must be positive, got {keep}, {n}")
    for layout in LAYOUTS:
        layers = pdrop_layers(layout, n_layers)
        if average_tokens(n, layers, pdrop_counts(n, 0.0), n_layers) <= keep:
            break

    def avg(lam: float) -> float:
        return average_tokens(n, layers, pdrop_counts(n, lam), n_layers)

    lo, hi = 0.0, 1.0
    if avg(hi) <= keep:
        lo = hi
    else:
        for _ in range(60):  # avg is non-decreasing in lam: the largest lam with avg <= keep
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if avg(mid) <= keep else (lo, mid)
    return lo, list(zip(layers, pdrop_counts(n, lo)))


def pdrop_stages(keep: int, n: int, n_layers: int) -> list:
    """``zoocli.prune_loop.PruneStage`` list: each stage ranks on its own layer's last-token attention.
    LLMs with fewer than 4 layers run the last ``n_layers - 1`` counts of the depth-32 schedule."""
    from zoocli.prune_loop import PruneStage, last_token_scorer

    if n_layers >= len(LAYOUTS[0]) + 1:
        sched = pdrop_schedule(keep, n, n_layers)[1]
    elif n_layers >= 2:
        counts = [c for _, c in pdrop_schedule(keep, n)[1]][-(n_layers - 1):]
        sched = [(i + 1, c) for i, c in enumerate(counts)]
    else:
        raise UsageError(f"pyramiddrop needs at least 2 LLM layers, this model has {n_layers}")
    return [PruneStage(layer=l, n_keep=c, scorer=last_token_scorer, own_layer=True) for l, c in sched]


def plan(view: LLMView, keep: int) -> list:
    """The pyramid schedule for ``keep`` (an average) of the prompt's N candidates."""
    return pdrop_stages(min(keep, view.n), view.n, view.n_layers)


PYRAMIDDROP = register(Method(
    name="pyramiddrop", fn=None, plan=plan, stage="in_llm", needs=frozenset({"decoder"}),
    summary="staged drops (layers 8/16/24 or 2/8/16, ratio lam) by the last token's attention",
    paper="PyramidDrop, Xing et al., CVPR 2025 (arXiv:2410.17247)",
    deviation=(
        "budget = tokens averaged over layers, lam solved per budget (layers 2/8/16 below N/4, as the "
        "authors advise); original position ids kept; ties to the lowest index; on LLMs with < 4 layers "
        "only the last n_layers-1 stages run"
    ),
))
