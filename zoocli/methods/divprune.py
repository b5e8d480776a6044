"""DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models.

Alvar et al., CVPR 2025, arXiv:2503.02175. Token selection as a max-min diversity problem on the
projected (LLM-input) tokens, solved greedily: the first pick is the most isolated token (largest
cosine distance to its nearest other token), then farthest-point sampling on the minimum cosine
distance to the picked set.

Deviations from the official code (vbdi/divprune ``llava_arch.py`` L152-171): picked tokens are
masked explicitly, so a token is never picked twice even when duplicates have zero distance (the
official greedy relies on self-distance 0 and can repeat); the nearest-other distance ignores the
token itself instead of taking the second-smallest entry; distances are computed in float32 in
row chunks, so no N x N matrix is held for large N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.lazy import torch
from zoocli.methods import Method, PruneInputs, Selection, register
from zoocli.methods.zoo import COS_EPS, _unit, cos_distance

if TYPE_CHECKING:
    from torch import Tensor

_ROW_CHUNK = 1024


def divprune_select(z: Tensor, k: int) -> Tensor:
    """DivPrune's greedy max-min cosine diversity: ``k`` indices into ``z`` [N, D], in pick order."""
    n = z.shape[0]
    k = min(int(k), n)
    zn = _unit(z)  # [N, D]
    nearest = torch.empty(n, device=z.device)
    for s in range(0, n, _ROW_CHUNK):
        d = 1 - zn[s : s + _ROW_CHUNK] @ zn.T  # [c, N] cosine distance
        d = d.masked_fill(d < COS_EPS, 0.0)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        nearest[s : s + d.shape[0]] = d.min(dim=1).values
    if n == 1:
        nearest.zero_()
    picked = torch.empty(k, dtype=torch.long, device=z.device)
    picked[0] = torch.argmax(nearest)
    mindist = cos_distance(zn, picked[0])  # [N] distance to the picked set
    taken = torch.zeros(n, dtype=torch.bool, device=z.device)
    taken[picked[0]] = True
    for t in range(1, k):
        i = torch.argmax(mindist.masked_fill(taken, float("-inf")))
        picked[t] = i
        taken[i] = True
        mindist = torch.minimum(mindist, cos_distance(zn, i))
    return picked


def divprune(inp: PruneInputs, keep: int) -> Selection:
    return Selection(idx=divprune_select(inp.features, keep))


DIVPRUNE = register(Method(
    name="divprune", fn=divprune,
    summary="greedy max-min cosine diversity on the projected tokens",
    paper="DivPrune, Alvar et al., CVPR 2025 (arXiv:2503.02175)",
    deviation="picked tokens masked explicitly (the official greedy can repeat duplicates)",
))
