"""DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models.

Alvar et al., CVPR 2025, arXiv:2503.02175. Token selection as a max-min diversity problem on the
projected (LLM-input) tokens, solved greedily: the first pick is the most isolated token (largest
cosine distance to its nearest other token), then farthest-point sampling on the minimum cosine
distance to the picked set.

Deviations from the official code (vbdi/divprune ``llava_arch.py`` L152-171): picked tokens are
masked explicitly, so a token is never picked twice even when duplicates have zero distance (the
official greedy relies on self-distance 0 and can repeat); the nearest-other distance ignores the
token itself instead of taking the second-smallest entry; distances are computed in float32 from
one N x N Gram matrix per scope (the official code builds the same matrix), or row by row without
one when it would not fit (``zoocli.greedy.GRAM_MAX_MB``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.greedy import check_backend, greedy, pad_rows
from zoocli.methods import Method, PruneInputs, Selection, check_budgets, register
from zoocli.ops import unit_rows

if TYPE_CHECKING:
    from torch import Tensor


def divprune_select(z: Tensor, k, lengths=None, *, backend: str = "auto") -> Tensor:
    """DivPrune's greedy max-min cosine diversity: ``k`` indices into ``z`` [N, D], in pick order.

    A batch ``z`` [B, N, D] -> [B, K], every row equal to the unbatched call on that row;
    ``lengths`` [B] (optional): row b's first lengths[b] tokens are real, the rest padding, and its
    picks past lengths[b] are -1; ``k`` may be one budget per row (a list). The first pick's
    nearest-other distance and every step's distances come from one Gram matrix
    (``zoocli.greedy``); no host read in the greedy; ``lengths`` given as a tensor is read once,
    before it. ``backend``: ``auto`` / ``torch`` / ``triton``, the same picks."""
    check_backend(backend)
    if z.dim() not in (2, 3):
        raise ValueError(f"z must be [N, D] or [B, N, D], got {tuple(z.shape)}")
    squeeze = z.dim() == 2
    if squeeze:
        z = z[None]
    picked = greedy(unit_rows(z), lengths, check_budgets(k, z.shape[0]), backend=backend)
    return picked[0] if squeeze else picked


def divprune(inp: PruneInputs, keep: int, backend: str = "auto") -> Selection:
    return Selection(idx=divprune_select(inp.features, keep, backend=backend))


def divprune_batch(inps: list[PruneInputs], keeps: list[int], backend: str = "auto") -> list[Selection]:
    """Several scopes as one padded batch, each with its own budget."""
    picks = divprune_select(pad_rows([inp.features for inp in inps]), list(keeps),
                            lengths=[inp.n for inp in inps], backend=backend)
    return [Selection(idx=picks[b, :k]) for b, k in enumerate(keeps)]


DIVPRUNE = register(Method(
    name="divprune", fn=divprune, batch=divprune_batch,
    summary="greedy max-min cosine diversity on the projected tokens",
    paper="DivPrune, Alvar et al., CVPR 2025 (arXiv:2503.02175)",
    deviation="picked tokens masked explicitly (the official greedy can repeat duplicates)",
    options={"backend": "auto"}, check=check_backend,
))
