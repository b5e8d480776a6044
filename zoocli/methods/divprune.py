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
from zoocli.methods import Method, PruneInputs, Selection, check_keep, register
from zoocli.methods.zoo import _picks_done, greedy_rows, host_lengths, pad_rows, valid_mask
from zoocli.ops import COS_EPS, unit_rows

if TYPE_CHECKING:
    from torch import Tensor

_ROW_CHUNK = 1024


def _nearest_other(zn: Tensor, lengths: list[int]) -> Tensor:
    """[B, N]: each real token's cosine distance to its nearest other real token (0 when a row has
    one real token). Row by row on the row's real tokens (B crops, not per token: the Gram block's
    rounding depends on its shape, so a padded row must see the same shape as the unbatched call),
    in row chunks of ``_ROW_CHUNK``, so no N x N tensor."""
    b, n, _ = zn.shape
    nearest = torch.zeros(b, n, device=zn.device)
    for r, nr in enumerate(lengths):
        zr = zn[r, :nr]
        for s in range(0, nr, _ROW_CHUNK):  # N / 1024 chunks
            c = min(_ROW_CHUNK, nr - s)
            d = 1 - zr[s:s + c] @ zr.T  # [c, n_r]
            d = d.masked_fill(d < COS_EPS, 0.0)
            d[torch.arange(c), torch.arange(s, s + c)] = float("inf")  # the token itself
            nearest[r, s:s + c] = d.amin(-1)
    return torch.where(torch.isinf(nearest), 0.0, nearest)


def divprune_select(z: Tensor, k: int, lengths=None) -> Tensor:
    """DivPrune's greedy max-min cosine diversity: ``k`` indices into ``z`` [N, D], in pick order.

    A batch ``z`` [B, N, D] -> [B, k], every row equal to the unbatched call on that row;
    ``lengths`` [B] (optional): row b's first lengths[b] tokens are real, the rest padding, and its
    picks past lengths[b] are -1. No host read in the greedy (``zoocli.methods.zoo.greedy_rows``);
    ``lengths`` given as a tensor is read once, before it."""
    check_keep(k)  # k = 0 or a non-integer: a clear ValueError (UsageError), not an IndexError
    if z.dim() not in (2, 3):
        raise ValueError(f"z must be [N, D] or [B, N, D], got {tuple(z.shape)}")
    squeeze = z.dim() == 2
    if squeeze:
        z = z[None]
    b, n, _ = z.shape
    valid = valid_mask(lengths, b, n, z.device)
    zn = unit_rows(z)
    rows = host_lengths(lengths, b, n)  # before the loop: at most one read
    picked = greedy_rows(_nearest_other(zn, rows), zn, valid, rows, min(int(k), n))
    return _picks_done(picked, valid, squeeze)


def divprune(inp: PruneInputs, keep: int) -> Selection:
    return Selection(idx=divprune_select(inp.features, keep))


def divprune_batch(inps: list[PruneInputs], keeps: list[int]) -> list[Selection]:
    """Several scopes as one padded batch, k = the largest quota; each keeps its first ``keep``
    picks (its picks with k = keep: the greedy picks in order)."""
    picks = divprune_select(pad_rows([inp.features for inp in inps]), max(keeps),
                            lengths=[inp.n for inp in inps])
    return [Selection(idx=picks[b, :k]) for b, k in enumerate(keeps)]


DIVPRUNE = register(Method(
    name="divprune", fn=divprune, batch=divprune_batch,
    summary="greedy max-min cosine diversity on the projected tokens",
    paper="DivPrune, Alvar et al., CVPR 2025 (arXiv:2503.02175)",
    deviation="picked tokens masked explicitly (the official greedy can repeat duplicates)",
))
