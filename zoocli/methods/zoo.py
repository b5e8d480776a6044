"""ZOO-Prune: zeroth-order sensitivity-aware diversity selection of visual tokens.

"Zeroth-Order Gradient Estimation for Training-Free Visual Token Pruning" (ZOO-Prune; paper in
shared/papers). Sensitivity S(i) = mean_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h at the
multimodal projector M, over m unit Gaussian directions shared by all tokens (Eq. 2-3, see
``zoocli.sensitivity``). By default (``estimator="exact"``) its closed-form limit
||J(x_i)||_F / sqrt(d_in) is used instead: no sampling noise and about m times fewer FLOPs;
``estimator="fd"`` is the paper's sampled form (m=64, h=0.01 unless given). Selection (Alg. 1):
min-max normalise S, pick argmax S first, then greedily argmax S_hat(i) * (1 - max_{j in P} cos(Z_i, Z_j)) on the projected tokens Z.

Also the paper's ablations (Table 5): ``sensitivity`` (top-k by S) and ``sum`` (S_hat + Div).

Deviations from the official code (AIM-SKKU/ZOO-Prune ``llava_arch.py``): by default S is the
exact closed form above (the m -> inf, h -> 0 limit of Eq. 2-3 in root-mean-square form), not a
64-direction sample (its matrix products run in bf16 on CUDA for a bf16 model, TF32 for fp32,
fp32 on CPU; ``precision=fp32`` forces fp32; norms and accumulations stay fp32); with
``estimator="fd"`` S is estimated in
float32 whatever the model dtype (the official code runs the finite differences in fp16, where
h*u is mostly rounded away); the directions come from a generator seeded per call, not the global
CUDA RNG; (token, direction) pairs are processed in memory-capped chunks; the low-rank option
factorises the *loaded* projector weights (the official NeXT code factorises them in ``__init__``,
before the checkpoint is loaded). Ties go to the lowest index, as with ``torch.argmax``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.greedy import check_backend, greedy, pad_rows
from zoocli.lazy import torch
from zoocli.methods import Method, PruneInputs, Selection, check_budgets, register
from zoocli.ops import stable_topk, unit_rows

if TYPE_CHECKING:
    from torch import Tensor

# m / h are None ("not given"): the exact estimator takes neither; fd / jvp / naive then use the
# paper's m=64, h=0.01 (zoocli.sensitivity.SAMPLED_DEFAULTS). precision: the exact estimator's
# matrix products (auto: bf16 on CUDA for a bf16 / fp16 model, TF32 on CUDA for fp32, fp32 on CPU)
ZOO_OPTIONS = {"m": None, "h": None, "estimator": "exact", "rank": None, "chunk_mb": 256,
               "precision": "auto"}
PAPER = "ZOO-Prune (zeroth-order sensitivity-aware diversity), 2025"


def _batched(sensitivity: Tensor, z: Tensor, k, lengths, fuse: str, backend: str) -> Tensor:
    check_backend(backend)
    squeeze = z.dim() == 2
    if z.dim() not in (2, 3) or sensitivity.dim() != z.dim() - 1:
        raise ValueError(f"sensitivity [B, N] / [N] and z [B, N, D] / [N, D] expected, got "
                         f"{tuple(sensitivity.shape)} and {tuple(z.shape)}")
    if squeeze:
        sensitivity, z = sensitivity[None], z[None]
    if sensitivity.shape != z.shape[:2]:
        raise ValueError(f"{sensitivity.shape[-1]} sensitivities for {z.shape[-2]} tokens")
    ks = check_budgets(k, z.shape[0])
    picked = greedy(unit_rows(z), lengths, ks, s=sensitivity.to(z.device).float(), fuse=fuse,
                    backend=backend)
    return picked[0] if squeeze else picked


def zoo_select(sensitivity: Tensor, z: Tensor, k, lengths=None, *, backend: str = "auto") -> Tensor:
    """ZOO-Prune's sensitivity-aware diversity selection (Alg. 1): ``k`` indices, in pick order.

    ``sensitivity`` [N] and ``z`` [N, D] -> [min(k, N)]; or a batch [B, N] and [B, N, D] -> [B, K]
    where every row equals the unbatched call on that row. ``lengths`` [B] (optional): row b's
    first lengths[b] tokens are real, the rest padding; its picks past lengths[b] are -1. ``k`` may
    be one budget per row (a list), K its max, and a row's picks past its own budget are -1. No
    host read in the greedy loop; ``lengths`` given as a device tensor is read once, before it.
    ``backend``: ``auto`` / ``torch`` / ``triton`` (``zoocli.greedy``), the same picks."""
    return _batched(sensitivity, z, k, lengths, "product", backend)


def sum_select(sensitivity: Tensor, z: Tensor, k, lengths=None, *, backend: str = "auto") -> Tensor:
    """The paper's sum-fusion ablation: argmax S_hat first, then argmax S_hat(i) + Div(i, P)."""
    return _batched(sensitivity, z, k, lengths, "sum", backend)


def check_zoo_options(m, h, estimator, rank, chunk_mb, precision="auto", backend=None) -> None:
    from zoocli.sensitivity import check_options

    check_options(m=m, h=h, estimator=estimator, rank=rank, chunk_mb=chunk_mb, precision=precision)
    if backend is not None:
        check_backend(backend)


def _sensitivity(inp: PruneInputs, m, h, estimator, rank, chunk_mb, precision="auto") -> Tensor:
    from zoocli.sensitivity import run_seed, token_sensitivity

    return token_sensitivity(
        inp.vision, inp.projector, m=m, h=h, seed=run_seed(estimator, inp.seed),
        estimator=estimator, rank=rank, chunk_mb=chunk_mb, precision=precision,
    )


def zoo(inp: PruneInputs, keep: int, backend: str = "auto", **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=zoo_select(s, inp.features, keep, backend=backend), scores=s)


def sensitivity(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=stable_topk(s, keep).to(inp.features.device), scores=s)  # ties: lowest index


def sum_fusion(inp: PruneInputs, keep: int, backend: str = "auto", **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=sum_select(s, inp.features, keep, backend=backend), scores=s)


def scope_sensitivities(inps: list[PruneInputs], **opt) -> list[Tensor]:
    """S of every scope from one call over all their tokens (S is per token: the sampled
    estimators share their directions across tokens), split back per scope."""
    from dataclasses import replace

    sizes = [inp.n for inp in inps]
    s = _sensitivity(replace(inps[0], vision=torch.cat([inp.vision for inp in inps])), **opt)
    return list(s.split(sizes))


def _batched_greedy(select_fn):
    """A ``Method.batch`` for a greedy on (S, Z): all scopes as one padded batch, min-max
    normalised per scope over its real tokens (``normalize_scores`` with the valid mask), each
    scope with its own budget (the fused kernel stops each scope at its own; the torch loop runs
    max-budget steps and cuts: the greedy picks one token per step, in order, whatever k is)."""
    def batch(inps: list[PruneInputs], keeps: list[int], backend: str = "auto", **opt) -> list[Selection]:
        ss = scope_sensitivities(inps, **opt)
        dev = inps[0].features.device
        picks = select_fn(pad_rows([s.to(dev) for s in ss]), pad_rows([inp.features for inp in inps]),
                          list(keeps), lengths=[inp.n for inp in inps], backend=backend)
        return [Selection(idx=picks[b, :k], scores=s) for b, (k, s) in enumerate(zip(keeps, ss))]
    return batch


def sensitivity_batch(inps: list[PruneInputs], keeps: list[int], **opt) -> list[Selection]:
    """``sensitivity`` over several scopes: one padded stable sort (padding -inf sorts last)."""
    ss = scope_sensitivities(inps, **opt)
    order = stable_topk(pad_rows([s.float() for s in ss], float("-inf")), max(keeps))
    dev = inps[0].features.device
    return [Selection(idx=order[b, :k].to(dev), scores=s) for b, (k, s) in enumerate(zip(keeps, ss))]


_NEEDS = frozenset({"vision", "projector"})
_ZOO = dict(paper=PAPER, needs=_NEEDS, check=check_zoo_options)
# the greedy methods also take the selection backend (zoocli.greedy): the same picks on each
GREEDY_OPTIONS = {**ZOO_OPTIONS, "backend": "auto"}

ZOO = register(Method(
    name="zoo", fn=zoo, summary="ZOO-Prune: zeroth-order sensitivity x diversity, greedy",
    deviation=("default S is the exact closed form ||J||_F/sqrt(d_in), its products in bf16 / TF32 on "
               "CUDA (precision=auto; fp32 on CPU) (estimator=fd: the paper's sampled Eq. 2-3, in fp32 "
               "whatever the model dtype, seeded directions)"),
    batch=_batched_greedy(zoo_select), options=GREEDY_OPTIONS, **_ZOO,
))
SENSITIVITY = register(Method(
    name="sensitivity", fn=sensitivity, summary="ablation: top-k by zeroth-order sensitivity alone",
    batch=sensitivity_batch, options=ZOO_OPTIONS, **_ZOO,
))
SUM = register(Method(
    name="sum", fn=sum_fusion, summary="ablation: sensitivity + diversity (sum fusion), greedy",
    batch=_batched_greedy(sum_select), options=GREEDY_OPTIONS, **_ZOO,
))
