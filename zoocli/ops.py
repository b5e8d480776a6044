"""Small tensor helpers shared by the methods, the prune loop and the analyses: one helper per job.

- ``unit_rows``: rows scaled to unit L2 norm (float32).
- ``cosine_distance``: 1 - cos(z_j, z_i) from unit rows, float32 rounding of identical directions
  snapped to exactly 0 (``COS_EPS``) so duplicate tokens tie and ties go to the lowest index.
- ``stable_topk``: the k highest scores, descending, ties to the lowest index (``torch.topk`` leaves
  ties unspecified).
- ``spearman``: Spearman rank correlation with AVERAGE ranks for ties (the textbook rule, the same
  as ``scipy.stats.spearmanr``); NaN when either side is constant.
- ``jaccard``: |A & B| / |A | B| of two index sets (1.0 for two empty sets).
"""

from __future__ import annotations

from collections.abc import Iterable

from typing import TYPE_CHECKING

from zoocli.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

# Cosine distances below this are float32 rounding of identical directions: they count as 0, so
# duplicate tokens tie exactly and the tie goes to the lowest index, as in exact arithmetic.
COS_EPS = 1e-6


def unit_rows(z: Tensor) -> Tensor:
    """[..., D] -> the same rows in float32, scaled to unit norm (zero rows stay zero)."""
    z = z.float()
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_distance(zn: Tensor, i: Tensor | int) -> Tensor:
    """1 - cos(z_j, z_i) for every row j of unit rows ``zn`` [N, D] -> [N]; noise below COS_EPS is 0."""
    d = 1 - zn @ zn[i]
    return d.masked_fill(d < COS_EPS, 0.0)


def stable_topk(score: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest entries of ``score`` [..., N] along the last dim, descending;
    ties go to the lowest index."""
    return torch.sort(score.float(), dim=-1, descending=True, stable=True).indices[..., :k]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..N-1 of a 1-D tensor in float64, tied values sharing the mean of their ranks."""
    x = x.detach().flatten().double().cpu()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    # run boundaries of equal values in sorted order
    new_run = torch.ones(n, dtype=torch.bool)
    if n > 1:
        new_run[1:] = xs[1:] != xs[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1  # [N] run index of each sorted position
    pos = torch.arange(n, dtype=torch.float64)
    n_runs = int(run_id[-1]) + 1 if n else 0
    run_sum = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, pos)
    run_len = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, torch.ones(n, dtype=torch.float64))
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (run_sum / run_len)[run_id]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors; average ranks for ties; NaN if one is constant."""
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs two vectors of one length, got {a.numel()} and {b.numel()}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra @ rb) / den) if den > 0 else float("nan")


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """Jaccard overlap of two index sets; 1.0 when both are empty."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
