"""ZOO-Prune: zeroth-order sensitivity-aware diversity selection of visual tokens.

"Zeroth-Order Gradient Estimation for Training-Free Visual Token Pruning" (ZOO-Prune; paper in
shared/papers). Sensitivity S(i) = mean_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h at the
multimodal projector M, over m unit Gaussian directions shared by all tokens (Eq. 2-3, see
``zoocli.sensitivity``); selection (Alg. 1): min-max normalise S, pick argmax S first, then
greedily argmax S_hat(i) * (1 - max_{j in P} cos(Z_i, Z_j)) on the projected tokens Z.

Also the paper's ablations (Table 5): ``sensitivity`` (top-k by S) and ``sum`` (S_hat + Div).

Deviations from the official code (AIM-SKKU/ZOO-Prune ``llava_arch.py``): S is estimated in
float32 whatever the model dtype (the official code runs the finite differences in fp16, where
h*u is mostly rounded away); the directions come from a generator seeded per call, not the global
CUDA RNG; (token, direction) pairs are processed in memory-capped chunks; the low-rank option
factorises the *loaded* projector weights (the official NeXT code factorises them in ``__init__``,
before the checkpoint is loaded). Ties go to the lowest index, as with ``torch.argmax``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoocli.methods import PruneInputs, Selection, register
from zoocli.sensitivity import check_options, token_sensitivity

# m / h are None ("not given"): the exact estimator takes neither; fd / jvp / naive then use the
# paper's m=64, h=0.01 (zoocli.sensitivity.SAMPLED_DEFAULTS)
ZOO_OPTIONS = {"m": None, "h": None, "estimator": "exact", "rank": None, "chunk_mb": 256}
PAPER = "ZOO-Prune (zeroth-order sensitivity-aware diversity), 2025"


# Cosine distances below this are float32 rounding of identical directions: they count as 0, so
# duplicate tokens tie exactly and the tie goes to the lowest index, as in exact arithmetic.
COS_EPS = 1e-6


def _unit(z: Tensor) -> Tensor:
    z = z.float()
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cos_distance(zn: Tensor, i: Tensor) -> Tensor:
    """1 - cos(z_j, z_i) for every j, from unit rows ``zn`` [N, D]; float32 noise snapped to 0."""
    d = 1 - zn @ zn[i]
    return d.masked_fill(d < COS_EPS, 0.0)


def normalize_scores(s: Tensor) -> Tensor:
    """Min-max normalise to [0, 1]; a constant vector becomes all ones (never NaN)."""
    s = s.float()
    lo, hi = s.min(), s.max()
    if not torch.isfinite(hi - lo) or hi - lo <= 0:
        return torch.ones_like(s)
    return (s - lo) / (hi - lo)


def _greedy(s_hat: Tensor, z: Tensor, k: int, fuse: str) -> Tensor:
    """Shared greedy of ``zoo`` (product) and ``sum`` fusion: first argmax S_hat, then the fused score."""
    n = z.shape[0]
    k = min(int(k), n)
    zn = _unit(z)  # [N, D]
    picked = torch.empty(k, dtype=torch.long, device=z.device)
    taken = torch.zeros(n, dtype=torch.bool, device=z.device)
    picked[0] = torch.argmax(s_hat)
    taken[picked[0]] = True
    div = cos_distance(zn, picked[0])  # [N] Div(i, P) = 1 - max cosine to the picked set
    for t in range(1, k):
        score = s_hat * div if fuse == "product" else s_hat + div
        i = torch.argmax(score.masked_fill(taken, float("-inf")))
        picked[t] = i
        taken[i] = True
        div = torch.minimum(div, cos_distance(zn, i))
    return picked


def zoo_select(sensitivity: Tensor, z: Tensor, k: int) -> Tensor:
    """ZOO-Prune's sensitivity-aware diversity selection (Alg. 1): ``k`` indices, in pick order."""
    if sensitivity.shape[0] != z.shape[0]:
        raise ValueError(f"{sensitivity.shape[0]} sensitivities for {z.shape[0]} tokens")
    return _greedy(normalize_scores(sensitivity).to(z.device), z, k, "product")


def sum_select(sensitivity: Tensor, z: Tensor, k: int) -> Tensor:
    """The paper's sum-fusion ablation: argmax S_hat first, then argmax S_hat(i) + Div(i, P)."""
    return _greedy(normalize_scores(sensitivity).to(z.device), z, k, "sum")


def check_zoo_options(m, h, estimator, rank, chunk_mb) -> None:
    check_options(m=m, h=h, estimator=estimator, rank=rank, chunk_mb=chunk_mb)


def _sensitivity(inp: PruneInputs, m, h, estimator, rank, chunk_mb) -> Tensor:
    seed = None if estimator == "exact" else inp.seed  # the run's seed drives sampled directions only
    return token_sensitivity(
        inp.vision, inp.projector, m=m, h=h, seed=seed,
        estimator=estimator, rank=rank, chunk_mb=chunk_mb,
    )


_NEEDS = frozenset({"vision", "projector"})


@register(
    "zoo", summary="ZOO-Prune: zeroth-order sensitivity x diversity, greedy", paper=PAPER,
    needs=_NEEDS, options=ZOO_OPTIONS, check=check_zoo_options,
    deviation="fp32 finite differences whatever the model dtype; seeded directions",
)
def zoo(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=zoo_select(s, inp.features, keep), scores=s)


@register(
    "sensitivity", summary="ablation: top-k by zeroth-order sensitivity alone", paper=PAPER,
    needs=_NEEDS, options=ZOO_OPTIONS, check=check_zoo_options,
)
def sensitivity(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    # stable sort: ties go to the lowest index
    order = torch.sort(s.float(), descending=True, stable=True).indices
    return Selection(idx=order[:keep].to(inp.features.device), scores=s)


@register(
    "sum", summary="ablation: sensitivity + diversity (sum fusion), greedy", paper=PAPER,
    needs=_NEEDS, options=ZOO_OPTIONS, check=check_zoo_options,
)
def sum_fusion(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=sum_select(s, inp.features, keep), scores=s)
