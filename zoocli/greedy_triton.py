"""The greedy of ``zoocli.greedy`` as one Triton kernel launch: the whole k-step loop on the device.

One program per scope (a LLaVA-NeXT crop, or the whole image): it reads its row of the score
matrix P (``zoocli.greedy.score_matrix``) for each pick, keeps the running min in a [B, N]
scratch row, takes the argmax (ties to the lowest index: ``tl.argmax`` keeps the first maximum
of a tile and a later tile wins only when strictly larger) and writes the pick, for as many steps
as the scope's own budget; the rest of its output row is -1. The same float32 operations as the
torch loop on the same P, so the same picks.

Each step is one pass over the scope's tokens in tiles of ``BLOCK``: min with the newly picked
row, store, argmax. A ``debug_barrier`` ends each step, so the next step's loads see every
thread's stores (one program is one thread block).

Triton runs on CUDA; on a CPU machine its interpreter (``TRITON_INTERPRET=1``, Triton's own
switch, read by Triton when this module is imported) runs the same kernel on CPU tensors, which
is how the tests run it without a GPU (slowly: its timings mean nothing).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from zoocli.errors import UsageError
from zoocli.ops import COS_EPS
from zoocli.opcount import count_launch

MAX_BLOCK = 4096


FUSE_CODES = {None: 0, "product": 1, "sum": 2}


@triton.jit
def _argmax_row(row_ptr, n_cols, BLOCK: tl.constexpr):
    """(max, lowest index of the max) over ``row_ptr[0:n_cols]``, in tiles."""
    offs = tl.arange(0, BLOCK)
    best_v = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, BLOCK):
        j = start + offs
        v = tl.load(row_ptr + j, mask=j < n_cols, other=float("-inf"))
        tile_v = tl.max(v, 0)
        tile_i = tl.argmax(v, 0).to(tl.int64) + start
        better = tile_v > best_v
        best_i = tl.where(better, tile_i, best_i)
        best_v = tl.where(better, tile_v, best_v)
    return best_i


@triton.jit
def _scores(g_row, s_hat_row, j, i, n, n_cols, FUSE: tl.constexpr, COS_EPS: tl.constexpr):
    """Row i of the score matrix at columns j (``zoocli.greedy.score_matrix``, the same float32
    operations): snap(1 - G[i, j]), fused with S_hat[j], -inf at j == i and on padding."""
    d = 1.0 - tl.load(g_row + j, mask=j < n_cols, other=0.0)
    d = tl.where(d < COS_EPS, 0.0, d)
    if FUSE == 1:
        d = tl.load(s_hat_row + j, mask=j < n_cols, other=0.0) * d
    elif FUSE == 2:
        d = tl.load(s_hat_row + j, mask=j < n_cols, other=0.0) + d
    return tl.where((j == i) | (j >= n), float("-inf"), d)


@triton.jit
def _greedy_kernel(g_ptr, s_ptr, first_ptr, len_ptr, k_ptr, out_ptr, scratch_ptr, n_rows, n_cols,
                   k_out, FUSE: tl.constexpr, NORMALIZE: tl.constexpr, COS_EPS: tl.constexpr,
                   BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(len_ptr + b).to(tl.int64)
    kb = tl.load(k_ptr + b).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g_scope = g_ptr + b * n_cols * n_cols
    score_row = scratch_ptr + b * n_cols
    s_hat_row = scratch_ptr + (n_rows + b) * n_cols
    first_row = first_ptr + b * n_cols
    out_row = out_ptr + b * k_out

    if NORMALIZE:
        # min-max normalisation over the real tokens (``zoocli.greedy.normalize_scores``): S_hat,
        # the first-pick score too; padding -inf
        lo = tl.full((), float("inf"), tl.float32)
        hi = tl.full((), float("-inf"), tl.float32)
        for start in range(0, n_cols, BLOCK):
            j = start + offs
            v = tl.load(s_ptr + b * n_cols + j, mask=j < n, other=float("nan"))
            lo = tl.minimum(lo, tl.min(tl.where(j < n, v, float("inf")), 0))
            hi = tl.maximum(hi, tl.max(tl.where(j < n, v, float("-inf")), 0))
        span = hi - lo
        ok = (span > 0) & (span < float("inf"))
        for start in range(0, n_cols, BLOCK):
            j = start + offs
            v = tl.load(s_ptr + b * n_cols + j, mask=j < n_cols, other=0.0)
            sh = tl.where(ok, tl.math.div_rn(v - lo, tl.where(ok, span, 1.0)), 1.0)
            tl.store(s_hat_row + j, sh, mask=j < n_cols)
            tl.store(score_row + j, tl.where(j < n, sh, float("-inf")), mask=j < n_cols)
    else:
        for start in range(0, n_cols, BLOCK):
            j = start + offs
            v = tl.load(first_row + j, mask=j < n, other=float("-inf"))
            tl.store(score_row + j, v, mask=j < n_cols)
    tl.debug_barrier()

    # the first pick, then the running score: the first pick's row of the score matrix
    i = _argmax_row(score_row, n_cols, BLOCK)
    if kb > 0:
        tl.store(out_row, i)
    for start in range(0, n_cols, BLOCK):
        j = start + offs
        p = _scores(g_scope + i * n_cols, s_hat_row, j, i, n, n_cols, FUSE, COS_EPS)
        tl.store(score_row + j, p, mask=j < n_cols)
    tl.debug_barrier()

    for t in range(1, kb):
        i = _argmax_row(score_row, n_cols, BLOCK)
        tl.store(out_row + t, i)
        for start in range(0, n_cols, BLOCK):
            j = start + offs
            p = _scores(g_scope + i * n_cols, s_hat_row, j, i, n, n_cols, FUSE, COS_EPS)
            s = tl.load(score_row + j, mask=j < n_cols, other=float("-inf"))
            tl.store(score_row + j, tl.minimum(s, p), mask=j < n_cols)
        tl.debug_barrier()

    for t in range(kb, k_out):
        tl.store(out_row + t, tl.full((), -1, tl.int64))


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (its own ``TRITON_INTERPRET`` switch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device) -> str | None:
    """Why the kernel cannot run on tensors of ``device`` (None: it can)."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu" and interpreted():
        return None
    return (f"the tensors are on {device.type} (Triton runs on CUDA, or on the CPU through its "
            f"interpreter, TRITON_INTERPRET=1)")


def greedy(g, lengths: list[int], budgets: list[int], k_out: int, *, fuse=None, s=None, first=None):
    """Picks [B, k_out] int64 from the Gram matrix ``g`` [B, N, N] float32 and either the raw
    scores ``s`` [B, N] (ZOO-Prune / sum: min-max normalised here, per scope over its real tokens,
    and the first pick is argmax S_hat) or the first-pick scores ``first`` [B, N] (DivPrune);
    scope b takes ``budgets[b]`` (<= lengths[b]) picks, then -1."""
    b, n, _ = g.shape
    if g.dtype != torch.float32 or not g.is_contiguous():
        raise UsageError("the fused greedy takes a contiguous float32 Gram matrix")
    dev = g.device
    meta = torch.tensor([lengths, budgets], dtype=torch.int32).to(dev, non_blocking=True)
    out = torch.empty(b, k_out, dtype=torch.long, device=dev)
    scratch = torch.empty(2 * b, n, dtype=torch.float32, device=dev)  # running scores, S_hat
    scores = (s if s is not None else first).float().contiguous()
    block = min(triton.next_power_of_2(n), MAX_BLOCK)
    count_launch()
    _greedy_kernel[(b,)](g, scores, scores, meta[0], meta[1], out, scratch, b, n, k_out,
                         FUSE=FUSE_CODES[fuse], NORMALIZE=s is not None, COS_EPS=COS_EPS,
                         BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out
