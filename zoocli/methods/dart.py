"""DART: Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More.

Wen et al., 2025, arXiv:2502.11494 (official code: ZichenWen1/DART, Apache-2.0, read at its last
upstream commit 5a19452fc173017191c247848673e0bde755695a, 2025-08-31: ``llava/model/language_model/
modeling_llama_self.py`` ``DART.forward`` / ``get_retained_image_token``, the Qwen2.5-VL port
``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py``, defaults in ``llava/eval/model_vqa_loader.py``
and ``scripts/v1_5/eval/*.sh``; read in the history of the fork xqy1111111/DART, whose commits up to
that one are the upstream's: no snapshot of the upstream itself was available here).

Duplication-aware pruning inside the LLM, once, before layer K (default 2):

1. Pivots: the ``image_pivots`` (4) visual tokens and the ``text_pivots`` (4) text tokens after the
   image whose layer K-1 keys (post-RoPE, heads concatenated) have the largest L1 norm.
2. States: the input of layer K (the output of layer K-1) through the LLM's final norm.
3. Visiting the pivots in the order the official code does (the iteration order of a Python
   ``set`` of their sequence positions), each pivot takes from the not-yet-kept visual tokens the
   ones LEAST cosine-similar to it (its non-duplicates); they join the kept set. The visual tokens
   kept are the image pivots and everything the pivots took; layers >= K run on them.

Budget (``keep``): exactly ``keep`` visual tokens remain after layer K (as FastV's K). The official
code takes ``max_num_trunction // (image_pivots + text_pivots)`` tokens per pivot, so it keeps
``image_pivots + pivots * (budget // pivots)`` (132 at its "128 tokens"); zoo splits the
``keep - image_pivots`` tokens to take over the pivots as evenly as possible (the first visited
take one more). At ``keep = image_pivots + pivots * t`` every pivot takes ``t``: the official
arithmetic exactly (``tests/test_dart_pyramiddrop.py`` checks the kept sets). ``keep <=
image_pivots`` keeps the top-``keep`` image pivots.

Deviations from the official code: per-pivot counts as above (exact budget); ties go to the lowest
index (``torch.topk`` leaves them unspecified); the similarities are computed in float32 (official:
the model dtype); the keys' L1 norm is over the KV heads (official LLaVA: after ``repeat_kv``, each
KV head repeated, the same ranking); the keys are recomputed from layer K-1's input (official:
returned by that layer's patched forward); with a KV cache the pruning happens once at prefill (as
in the official code); on an LLM with at most K layers K is clamped to ``n_layers - 1`` (the offline tiny
models); LLaVA-NeXT newline tokens are not candidates and are never pruned (official: part of the
image span).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import torch
from zoocli.methods import LLMView, Method, register

if TYPE_CHECKING:
    from torch import Tensor


def check_dart_options(K=2, image_pivots=4, text_pivots=4) -> None:
    """Raise ``UsageError`` unless K >= 1, image_pivots >= 1 and text_pivots >= 0 are integers."""
    for name, value, low in (("K", K, 1), ("image_pivots", image_pivots, 1), ("text_pivots", text_pivots, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"dart: {name} must be an integer >= {low}, got {value!r}")


def dart_keep(img_keys: Tensor, txt_keys: Tensor, img_states: Tensor, txt_states: Tensor, keep: int,
              img_pos: list[int], txt_pos: list[int], image_pivots: int = 4, text_pivots: int = 4) -> Tensor:
    """DART's kept visual tokens: indices [min(keep, N)] into the N visual tokens, in pick order
    (image pivots first). ``*_keys`` [., Dk] the layer K-1 keys, ``*_states`` [., D] the normed
    layer K inputs, ``*_pos`` the tokens' sequence positions (they fix the pivots' visit order)."""
    from zoocli.ops import stable_topk

    n, t = img_keys.shape[0], txt_keys.shape[0]
    if keep >= n:
        return torch.arange(n, device=img_keys.device)
    p_img = min(image_pivots, keep)
    img_piv = stable_topk(img_keys.float().abs().sum(-1), p_img)
    if keep == p_img:
        return img_piv
    txt_piv = stable_topk(txt_keys.float().abs().sum(-1), min(text_pivots, t))
    positions = [img_pos[i] for i in img_piv.tolist()] + [txt_pos[j] for j in txt_piv.tolist()]
    state_of = dict(zip(positions, [img_states[i] for i in img_piv.tolist()]
                        + [txt_states[j] for j in txt_piv.tolist()]))
    per, extra = divmod(keep - p_img, len(positions))
    states = img_states.float()
    free = torch.ones(n, dtype=torch.bool, device=img_keys.device)
    free[img_piv] = False
    picks = [img_piv]
    # the official visit order: a Python set built from this list, iterated (CPython's int hashing
    # makes it deterministic)
    for rank, pos in enumerate(list(set(positions))):
        m = per + (rank < extra)
        if m == 0:
            continue
        cand = free.nonzero().squeeze(1)
        sim = torch.nn.functional.cosine_similarity(state_of[pos].float()[None], states[cand], dim=-1)
        take = cand[stable_topk(-sim, m)]
        free[take] = False
        picks.append(take)
    return torch.cat(picks)


def pick_scores(picks: Tensor, n: int) -> Tensor:
    """Scores [n] whose top-``len(picks)`` are exactly ``picks``: (k - rank) / k in pick order, 0 elsewhere."""
    k = picks.numel()
    scores = torch.zeros(n, device=picks.device)
    scores[picks] = (k - torch.arange(k, device=picks.device)).float() / k
    return scores


def dart_scorer(keep: int, text_after: Tensor, image_pivots: int = 4, text_pivots: int = 4):
    """A ``zoocli.prune_loop`` scorer: DART's kept set as scores (``pick_scores``) from the stage
    context's layer K-1 keys and normed layer K inputs; ``text_after`` original positions."""

    def score(ctx) -> Tensor:
        txt = ctx.rows_of(text_after)
        keys = ctx.keys()  # [S, Dk]
        vis_states = ctx.final_norm(ctx.state[ctx.visual])
        txt_states = ctx.final_norm(ctx.state[txt])
        picks = dart_keep(keys[ctx.visual], keys[txt], vis_states, txt_states, keep,
                          ctx.orig[ctx.visual].tolist(), ctx.orig[txt].tolist(), image_pivots, text_pivots)
        return pick_scores(picks, ctx.visual.numel())

    return score


def plan(view: LLMView, keep: int, K: int = 2, image_pivots: int = 4, text_pivots: int = 4) -> list:
    """One stage before layer ``min(K, n_layers - 1)`` keeping ``min(keep, N)`` candidates."""
    from zoocli.prune_loop import PruneStage

    check_dart_options(K, image_pivots, text_pivots)
    if view.n_layers < 2:
        raise UsageError(f"dart needs at least 2 LLM layers, this model has {view.n_layers}")
    n_keep = min(keep, view.n)
    return [PruneStage(layer=min(K, view.n_layers - 1), n_keep=n_keep,
                       scorer=dart_scorer(n_keep, view.text_after, image_pivots, text_pivots))]


DART = register(Method(
    name="dart", fn=None, plan=plan, stage="in_llm", needs=frozenset({"decoder"}),
    summary="duplication-aware: K-norm pivots keep their least-similar tokens (pruned at layer K)",
    paper="DART, Wen et al., 2025 (arXiv:2502.11494)",
    deviation=(
        "exactly keep tokens (pivots' shares split evenly; official keeps 4 + 8*(budget//8)); ties to "
        "the lowest index; similarities in fp32; K clamped to n_layers-1 on LLMs with <= K layers"
    ),
    options={"K": 2, "image_pivots": 4, "text_pivots": 4}, check=check_dart_options,
))
