"""The greedy selection shared by ZOO-Prune, its sum ablation and DivPrune, batched over scopes.

One loop, three scores (``fuse``): ZOO-Prune's ``"product"`` S_hat(i) * Div(i, P) (Alg. 1), the
sum ablation's ``"sum"`` S_hat(i) + Div(i, P) (Table 5), DivPrune's ``None`` Div(i, P) alone,
with Div(i, P) = 1 - max_{j in P} cos(Z_i, Z_j). The first pick is argmax of ``first`` (S_hat,
or DivPrune's nearest-other distance). Picks are distinct, in order, and past a row's valid count
they are -1.

**Gram form.** The greedy needs only cosines between tokens, so G = Zn Zn^T is formed once per
call (one batched matmul; [B, N, N] float32, 6.6 MB for LLaVA-NeXT's 5 x 576) and turned, in
place, into the score matrix P (``score_matrix``): P[i, j] = the score token j would have if i
were the only pick. The score against the picked set is the running min of the picked rows of P
(exactly, in float32: the fused scores are monotone in the distance), so a greedy step reads one
row of P. Two backends run the loop on it and give the same picks, bit for bit (the same float32
operations on the same P):

- ``"torch"``: a Python loop of 4 tensor ops per step (argmax, the row's flat index, the row
  read, the running min), all on the device (no host read);
- ``"triton"``: one fused kernel launch (``zoocli.greedy_triton``) that runs the whole k-step loop,
  one program per scope, each scope with its own length and budget;
- ``"auto"``: triton on CUDA tensors when Triton imports, else torch.

When G would exceed ``GRAM_MAX_MB`` (very large Qwen2.5-VL images, say), the torch backend runs the
row form instead: one matrix-vector product per step, no N x N matrix (``_greedy_rows``), and
``"triton"`` is refused for that size with a one-line error.

**Rounding and ties.** G row b is computed from scope b's real tokens alone (one bmm when every
scope has the same length, else one mm per scope), so a padded row gets bitwise the picks of the
unbatched call. Distances below ``COS_EPS`` are float32 rounding of identical directions and count
as 0, so duplicate tokens tie exactly; every argmax goes to the lowest index among equal scores.
Against exact (float64) arithmetic the picks agree except where two candidates' scores differ by
float32 rounding (about 1e-7 relative): there either may win. The Gram form and the row form
round the dot products differently (matmul vs matrix-vector blocking), so they too can differ
only on such near-ties.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import torch
from zoocli.ops import COS_EPS

if TYPE_CHECKING:
    from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
FUSES = (None, "product", "sum")
# The Gram matrix of one call is formed when it fits in this (B * N * N * 4 bytes); LLaVA-NeXT's
# global scope (2,880 tokens) takes 33 MB, a 12-megapixel Qwen2.5-VL image (~16k tokens) 1 GB.
GRAM_MAX_MB = 512


class BackendError(UsageError, ValueError):
    """A selection backend that cannot run here (Triton missing, CPU tensors, too large)."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown selection backend {backend!r}; known: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# scopes: padding, lengths, masks


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


def pad_rows(rows: list[Tensor], fill: float = 0.0) -> Tensor:
    """Scopes of different sizes [N_b, ...] -> one padded batch [B, max N_b, ...] (``fill`` past a
    row's length)."""
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), n, *rows[0].shape[1:]), fill)
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
    return out


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


def picks_done(picked: Tensor, valid: Tensor, squeeze: bool) -> Tensor:
    """Entries past a row's valid count become -1; [1, k] -> [k] for an unbatched call."""
    k = picked.shape[1]
    picked = picked.masked_fill(torch.arange(k, device=picked.device) >= valid.sum(1, keepdim=True), -1)
    return picked[0] if squeeze else picked


# ---------------------------------------------------------------------------------------------
# the Gram matrix and what is read from it


def gram_fits(b: int, n: int) -> bool:
    return b * n * n * 4 <= GRAM_MAX_MB * 2**20


def gram(zn: Tensor, lengths: list[int]) -> Tensor:
    """G [B, N, N] = Zn Zn^T per row over its real tokens (padding rows / columns 0): one bmm when
    every row is full, else one mm per row on its real tokens (so a padded row rounds exactly like
    the unbatched call)."""
    b, n, _ = zn.shape
    if all(nr == n for nr in lengths):
        return torch.bmm(zn, zn.transpose(1, 2))
    g = zn.new_zeros(b, n, n)
    for r, nr in enumerate(lengths):
        torch.mm(zn[r, :nr], zn[r, :nr].T, out=g[r, :nr, :nr])
    return g


def snap(d: Tensor) -> Tensor:
    """Cosine distances below ``COS_EPS`` (float32 rounding of identical directions) become 0."""
    return d.masked_fill(d < COS_EPS, 0.0)


def blocked(valid: Tensor) -> Tensor:
    """[B, N, N] bool: entry (b, i, j) is a token's own column (i == j) or a padding column."""
    n = valid.shape[-1]
    return ~valid[:, None, :] | torch.eye(n, dtype=torch.bool, device=valid.device)


def nearest_other(d: Tensor, block: Tensor, valid: Tensor) -> Tensor:
    """[B, N]: each real token's cosine distance to its nearest other real token, from the
    snapped distance matrix ``d`` = snap(1 - G) (0 when a row has one real token, and on
    padding). DivPrune's first-pick score."""
    near = d.masked_fill(block, float("inf")).amin(-1)
    return torch.where(torch.isinf(near) | ~valid, 0.0, near)


def score_matrix(d: Tensor, block: Tensor, fuse, s_hat: Tensor | None) -> Tensor:
    """P [B, N, N] with P[b, i, j] the score of token j against pick i alone: the snapped distance
    d = 1 - cos (DivPrune), S_hat(j) * d (ZOO-Prune) or S_hat(j) + d (sum), and -inf on the
    blocked entries (j == i, padding), in place of ``d``.

    The greedy's score of j against the picked set P is then min_{i in P} P[i, j], because
    x -> s * x (s >= 0) and x -> s + x are monotone, in float32 too: min_i fl(s * d_ij) equals
    fl(s * min_i d_ij), bit for bit. So a step is one row read and one running min, and a picked
    token's score is -inf (its own column) without a separate mask."""
    if fuse == "product":
        d.mul_(s_hat[:, None, :])
    elif fuse == "sum":
        d.add_(s_hat[:, None, :])
    return d.masked_fill_(block, float("-inf"))


def _greedy_gram(first: Tensor, p: Tensor, valid: Tensor, k: int) -> Tensor:
    """The torch loop on the score matrix P (``score_matrix``): picks [B, k] (entries past a row's
    valid count are garbage, see ``picks_done``). Four tensor ops per step (argmax, the row's
    flat index, the row read, the running min); no host read."""
    b, n = valid.shape
    rows = p.view(b * n, n)
    offset = torch.arange(0, b * n, n, device=p.device)  # row b's first flat row
    i = torch.argmax(first.masked_fill(~valid, float("-inf")), -1)  # [B]
    picks = [i]
    score = rows.index_select(0, i + offset)
    for _ in range(1, k):
        i = torch.argmax(score, -1)
        picks.append(i)
        torch.minimum(score, rows.index_select(0, i + offset), out=score)
    return torch.stack(picks, 1)


def _row_distance(zn: Tensor, i: Tensor, lengths: list[int]) -> Tensor:
    """The row form's 1 - cos(z_bj, z_b,i_b) -> [B, N] (snapped; padding 0): one matrix-vector
    product per row on the row's real tokens (so a padded row rounds like the unbatched call)."""
    b, n, dim = zn.shape
    zi = zn.gather(1, i.view(-1, 1, 1).expand(-1, 1, dim))[:, 0]  # [B, D]
    dots = zn.new_ones(b, n)
    for r, nr in enumerate(lengths):
        torch.mv(zn[r, :nr], zi[r], out=dots[r, :nr])
    return snap(1 - dots)


_ROW_CHUNK = 1024


def nearest_other_rows(zn: Tensor, lengths: list[int]) -> Tensor:
    """``nearest_other`` without an N x N matrix: row by row on the row's real tokens, in chunks
    of ``_ROW_CHUNK`` rows."""
    b, n, _ = zn.shape
    nearest = torch.zeros(b, n, device=zn.device)
    for r, nr in enumerate(lengths):
        zr = zn[r, :nr]
        for s in range(0, nr, _ROW_CHUNK):  # N / 1024 chunks
            c = min(_ROW_CHUNK, nr - s)
            d = snap(1 - zr[s:s + c] @ zr.T)  # [c, n_r]
            d[torch.arange(c), torch.arange(s, s + c)] = float("inf")  # the token itself
            nearest[r, s:s + c] = d.amin(-1)
    return torch.where(torch.isinf(nearest), 0.0, nearest)


def _greedy_rows(first: Tensor, zn: Tensor, valid: Tensor, lengths: list[int], k: int, fuse,
                 s_hat) -> Tensor:
    """The row form, for scopes whose G does not fit: one matrix-vector product per row and step,
    no N x N matrix. The same scores as the Gram form (up to the dot products' rounding)."""
    b, n = valid.shape
    picked = torch.empty(b, k, dtype=torch.long, device=zn.device)
    taken = ~valid
    i = torch.argmax(first.masked_fill(taken, float("-inf")), -1)
    picked[:, 0] = i
    taken = taken.scatter(1, i[:, None], True)
    div = _row_distance(zn, i, lengths)
    for t in range(1, k):
        score = div if fuse is None else (s_hat * div if fuse == "product" else s_hat + div)
        i = torch.argmax(score.masked_fill(taken, float("-inf")), -1)
        picked[:, t] = i
        taken.scatter_(1, i[:, None], True)
        div = torch.minimum(div, _row_distance(zn, i, lengths))
    return picked


def resolve_backend(backend: str, device) -> str:
    """``auto`` -> ``triton`` for CUDA tensors when Triton imports, else ``torch``; ``triton``
    where it cannot run is a ``BackendError`` that says why."""
    check_backend(backend)
    if backend == "torch":
        return backend
    dev = torch.device(device)
    if backend == "auto" and (dev.type != "cuda" or not torch.cuda.is_available()):
        return "torch"
    try:
        from zoocli import greedy_triton
    except Exception as e:  # noqa: BLE001 - ImportError, or a Triton that finds no driver
        if backend == "auto":
            return "torch"
        raise BackendError(f"select backend 'triton' needs Triton ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]}); use --select-backend torch") from e
    why = greedy_triton.unavailable(dev)
    if why and backend == "auto":
        return "torch"
    if why:
        raise BackendError(f"select backend 'triton' cannot run here: {why}; use --select-backend torch")
    return "triton"


def greedy(first: Tensor | None, zn: Tensor, lengths=None, k: int | list[int] = 1, *, fuse=None,
           s_hat: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Run the greedy on a batch: unit rows ``zn`` [B, N, D], first-pick scores ``first`` [B, N]
    (None: DivPrune's nearest-other distance), ``s_hat`` [B, N] for the fused scores, ``lengths``
    (None: all real) -> picks [B, K], K = min(max(k), N); -1 past a row's valid count and, when
    ``k`` is a list (one budget per row), past its own budget."""
    if fuse not in FUSES:
        raise ValueError(f"fuse must be one of {FUSES}, got {fuse!r}")
    b, n, _ = zn.shape
    ks = [int(k)] * b if isinstance(k, int) else [int(v) for v in k]
    if len(ks) != b:
        raise ValueError(f"{len(ks)} budgets for {b} rows")
    rows = host_lengths(lengths, b, n)  # before the loop: at most one read
    valid = valid_mask(None if lengths is None else rows, b, n, zn.device)
    kmax = min(max(ks), n)
    backend = resolve_backend(backend, zn.device)
    if kmax == 0:
        return torch.empty(b, 0, dtype=torch.long, device=zn.device)
    if not gram_fits(b, n):
        if backend == "triton":
            raise BackendError(f"select backend 'triton' needs the {b} x {n} x {n} Gram matrix, "
                               f"over {GRAM_MAX_MB} MB; use --select-backend torch")
        if first is None:
            first = nearest_other_rows(zn, rows)
        picked = _greedy_rows(first, zn, valid, rows, kmax, fuse, s_hat)
        return _budgets_done(picks_done(picked, valid, False), ks)
    d = snap(1 - gram(zn, rows))
    block = blocked(valid)
    if first is None:
        first = nearest_other(d, block, valid)
    p = score_matrix(d, block, fuse, s_hat)
    if backend == "triton":
        from zoocli import greedy_triton

        return greedy_triton.greedy(first, p, rows, [min(v, nr) for v, nr in zip(ks, rows)], kmax)
    return _budgets_done(picks_done(_greedy_gram(first, p, valid, kmax), valid, False), ks)


def _budgets_done(picked: Tensor, ks: list[int]) -> Tensor:
    """Entries past a row's own budget become -1 (nothing to do when every row has the same)."""
    if len(set(ks)) <= 1:
        return picked
    kk = torch.tensor(ks, device=picked.device)
    return picked.masked_fill(torch.arange(picked.shape[1], device=picked.device) >= kk[:, None], -1)
