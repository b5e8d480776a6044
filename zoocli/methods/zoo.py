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
64-direction sample; with ``estimator="fd"`` S is estimated in
float32 whatever the model dtype (the official code runs the finite differences in fp16, where
h*u is mostly rounded away); the directions come from a generator seeded per call, not the global
CUDA RNG; (token, direction) pairs are processed in memory-capped chunks; the low-rank option
factorises the *loaded* projector weights (the official NeXT code factorises them in ``__init__``,
before the checkpoint is loaded). Ties go to the lowest index, as with ``torch.argmax``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.lazy import torch
from zoocli.methods import Method, PruneInputs, Selection, check_keep, register
from zoocli.ops import COS_EPS, stable_topk, unit_rows

if TYPE_CHECKING:
    from torch import Tensor

# m / h are None ("not given"): the exact estimator takes neither; fd / jvp / naive then use the
# paper's m=64, h=0.01 (zoocli.sensitivity.SAMPLED_DEFAULTS)
ZOO_OPTIONS = {"m": None, "h": None, "estimator": "exact", "rank": None, "chunk_mb": 256}
PAPER = "ZOO-Prune (zeroth-order sensitivity-aware diversity), 2025"


def cosine_distance_rows(zn: Tensor, i: Tensor, lengths: list[int]) -> Tensor:
    """Batched ``zoocli.ops.cosine_distance``: 1 - cos(z_bj, z_b,i_b) for unit rows ``zn`` [B, N, D]
    and one index per row ``i`` [B] (a device tensor, never read) -> [B, N], float32 noise below
    ``COS_EPS`` snapped to 0; padding entries (past ``lengths[b]``) are 0. One matrix-vector
    product per row on the row's real tokens (B crops, not per token): ``bmm`` would round
    differently with B and N (BLAS blocking), and an elementwise dot is ~20x slower on CPU, so this
    is what gives a padded row bitwise the distances, hence the picks, of the unbatched call."""
    b, n, dim = zn.shape
    zi = zn.gather(1, i.view(-1, 1, 1).expand(-1, 1, dim))[:, 0]  # [B, D]
    dots = zn.new_ones(b, n)
    for r, nr in enumerate(lengths):
        torch.mv(zn[r, :nr], zi[r], out=dots[r, :nr])
    d = 1 - dots
    return d.masked_fill(d < COS_EPS, 0.0)


def valid_mask(lengths, b: int, n: int, device) -> Tensor:
    """[B, N] bool: row b's first ``lengths[b]`` tokens are real, the rest padding (None: all real)."""
    if lengths is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    lengths = torch.as_tensor(lengths, device=device).view(-1)
    if lengths.shape[0] != b:
        raise ValueError(f"{lengths.shape[0]} lengths for {b} rows")
    return torch.arange(n, device=device) < lengths[:, None]


def host_lengths(lengths, b: int, n: int) -> list[int]:
    """``lengths`` as Python ints (one host read when it is a tensor), or [n] * b."""
    if lengths is None:
        return [n] * b
    if isinstance(lengths, torch.Tensor):
        return [int(v) for v in lengths.cpu().tolist()]
    return [int(v) for v in lengths]


def normalize_scores(s: Tensor, valid: Tensor | None = None) -> Tensor:
    """Min-max normalise to [0, 1] along the last dim (over the ``valid`` entries); a constant (or
    non-finite span) row becomes all ones, never NaN. No host read."""
    s = s.float()
    if valid is None:
        lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    else:
        lo = s.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
        hi = s.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    return torch.where(ok, (s - lo) / torch.where(ok, span, 1.0), torch.ones_like(s))


def _picks_done(picked: Tensor, valid: Tensor, squeeze: bool) -> Tensor:
    """Entries past a row's valid count become -1; [1, k] -> [k] for an unbatched call."""
    k = picked.shape[1]
    picked = picked.masked_fill(torch.arange(k, device=picked.device) >= valid.sum(1, keepdim=True), -1)
    return picked[0] if squeeze else picked


def greedy_rows(first_score: Tensor, zn: Tensor, valid: Tensor, lengths: list[int], k: int,
                fuse=None, s_hat: Tensor | None = None) -> Tensor:
    """The greedy shared by ZOO-Prune (``fuse="product"``), its sum ablation (``"sum"``) and
    DivPrune (``None``: max-min distance alone), batched: [B, N] first-pick scores, unit rows ``zn``
    [B, N, D], ``valid`` [B, N] (and its ``lengths`` on the host) -> picks [B, k] (k <= N). Argmax ties go to the lowest index. All on
    the device: no host read in the loop (the picks past a row's valid count are garbage, see
    ``_picks_done``)."""
    b, n = valid.shape
    picked = torch.empty(b, k, dtype=torch.long, device=zn.device)
    if k == 0:
        return picked
    taken = ~valid
    i = torch.argmax(first_score.masked_fill(taken, float("-inf")), -1)  # [B]
    picked[:, 0] = i
    taken = taken.scatter(1, i[:, None], True)
    div = cosine_distance_rows(zn, i, lengths)  # [B, N] Div(j, P) = 1 - max cosine to the picked set
    for t in range(1, k):
        score = div if fuse is None else (s_hat * div if fuse == "product" else s_hat + div)
        i = torch.argmax(score.masked_fill(taken, float("-inf")), -1)
        picked[:, t] = i
        taken.scatter_(1, i[:, None], True)
        div = torch.minimum(div, cosine_distance_rows(zn, i, lengths))
    return picked


def _batched(sensitivity: Tensor, z: Tensor, k: int, lengths, fuse: str) -> Tensor:
    check_keep(k)  # k = 0 or a non-integer: a clear ValueError (UsageError), not an IndexError
    squeeze = z.dim() == 2
    if z.dim() not in (2, 3) or sensitivity.dim() != z.dim() - 1:
        raise ValueError(f"sensitivity [B, N] / [N] and z [B, N, D] / [N, D] expected, got "
                         f"{tuple(sensitivity.shape)} and {tuple(z.shape)}")
    if squeeze:
        sensitivity, z = sensitivity[None], z[None]
    if sensitivity.shape != z.shape[:2]:
        raise ValueError(f"{sensitivity.shape[-1]} sensitivities for {z.shape[-2]} tokens")
    b, n = sensitivity.shape
    valid = valid_mask(lengths, b, n, z.device)
    rows = host_lengths(lengths, b, n)  # before the loop: at most one read
    s_hat = normalize_scores(sensitivity.to(z.device), valid)
    picked = greedy_rows(s_hat, unit_rows(z), valid, rows, min(int(k), n), fuse, s_hat)
    return _picks_done(picked, valid, squeeze)


def zoo_select(sensitivity: Tensor, z: Tensor, k: int, lengths=None) -> Tensor:
    """ZOO-Prune's sensitivity-aware diversity selection (Alg. 1): ``k`` indices, in pick order.

    ``sensitivity`` [N] and ``z`` [N, D] -> [min(k, N)]; or a batch [B, N] and [B, N, D] -> [B, k]
    where every row equals the unbatched call on that row. ``lengths`` [B] (optional): row b's
    first lengths[b] tokens are real, the rest padding; its picks past lengths[b] are -1. No host
    read in the greedy loop; ``lengths`` given as a device tensor is read once, before it."""
    return _batched(sensitivity, z, k, lengths, "product")


def sum_select(sensitivity: Tensor, z: Tensor, k: int, lengths=None) -> Tensor:
    """The paper's sum-fusion ablation: argmax S_hat first, then argmax S_hat(i) + Div(i, P)."""
    return _batched(sensitivity, z, k, lengths, "sum")


def check_zoo_options(m, h, estimator, rank, chunk_mb) -> None:
    from zoocli.sensitivity import check_options

    check_options(m=m, h=h, estimator=estimator, rank=rank, chunk_mb=chunk_mb)


def _sensitivity(inp: PruneInputs, m, h, estimator, rank, chunk_mb) -> Tensor:
    from zoocli.sensitivity import run_seed, token_sensitivity

    return token_sensitivity(
        inp.vision, inp.projector, m=m, h=h, seed=run_seed(estimator, inp.seed),
        estimator=estimator, rank=rank, chunk_mb=chunk_mb,
    )


def zoo(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=zoo_select(s, inp.features, keep), scores=s)


def sensitivity(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=stable_topk(s, keep).to(inp.features.device), scores=s)  # ties: lowest index


def sum_fusion(inp: PruneInputs, keep: int, **opt) -> Selection:
    s = _sensitivity(inp, **opt)
    return Selection(idx=sum_select(s, inp.features, keep), scores=s)


def pad_rows(rows: list[Tensor], fill: float = 0.0) -> Tensor:
    """Scopes of different sizes [N_b, ...] -> one padded batch [B, max N_b, ...] (``fill`` past a
    row's length)."""
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), n, *rows[0].shape[1:]), fill)
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
    return out


def scope_sensitivities(inps: list[PruneInputs], **opt) -> list[Tensor]:
    """S of every scope from one call over all their tokens (S is per token: the sampled
    estimators share their directions across tokens), split back per scope."""
    from dataclasses import replace

    sizes = [inp.n for inp in inps]
    s = _sensitivity(replace(inps[0], vision=torch.cat([inp.vision for inp in inps])), **opt)
    return list(s.split(sizes))


def _batched_greedy(select_fn):
    """A ``Method.batch`` for a greedy on (S, Z): all scopes as one padded batch, min-max
    normalised per scope over its real tokens (``normalize_scores`` with the valid mask), run with
    k = the largest quota; each scope keeps its first ``keep`` picks, which are its picks with
    k = keep (the greedy picks one token per step, in order, whatever k is)."""
    def batch(inps: list[PruneInputs], keeps: list[int], **opt) -> list[Selection]:
        ss = scope_sensitivities(inps, **opt)
        dev = inps[0].features.device
        picks = select_fn(pad_rows([s.to(dev) for s in ss]), pad_rows([inp.features for inp in inps]),
                          max(keeps), lengths=[inp.n for inp in inps])
        return [Selection(idx=picks[b, :k], scores=s) for b, (k, s) in enumerate(zip(keeps, ss))]
    return batch


def sensitivity_batch(inps: list[PruneInputs], keeps: list[int], **opt) -> list[Selection]:
    """``sensitivity`` over several scopes: one padded stable sort (padding -inf sorts last)."""
    ss = scope_sensitivities(inps, **opt)
    order = stable_topk(pad_rows([s.float() for s in ss], float("-inf")), max(keeps))
    dev = inps[0].features.device
    return [Selection(idx=order[b, :k].to(dev), scores=s) for b, (k, s) in enumerate(zip(keeps, ss))]


_NEEDS = frozenset({"vision", "projector"})
_ZOO = dict(paper=PAPER, needs=_NEEDS, options=ZOO_OPTIONS, check=check_zoo_options)

ZOO = register(Method(
    name="zoo", fn=zoo, summary="ZOO-Prune: zeroth-order sensitivity x diversity, greedy",
    deviation=("default S is the exact closed form ||J||_F/sqrt(d_in) (estimator=fd: the paper's "
               "sampled Eq. 2-3, in fp32 whatever the model dtype, seeded directions)"),
    batch=_batched_greedy(zoo_select), **_ZOO,
))
SENSITIVITY = register(Method(
    name="sensitivity", fn=sensitivity, summary="ablation: top-k by zeroth-order sensitivity alone",
    batch=sensitivity_batch, **_ZOO,
))
SUM = register(Method(
    name="sum", fn=sum_fusion, summary="ablation: sensitivity + diversity (sum fusion), greedy",
    batch=_batched_greedy(sum_select), **_ZOO,
))
