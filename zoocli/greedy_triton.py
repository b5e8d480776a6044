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

MAX_BLOCK = 4096


@triton.jit
def _greedy_kernel(p_ptr, first_ptr, len_ptr, k_ptr, out_ptr, score_ptr, n_cols, k_out,
                   BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(len_ptr + b).to(tl.int64)
    kb = tl.load(k_ptr + b).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    first_row = first_ptr + b * n_cols
    score_row = score_ptr + b * n_cols
    p_scope = p_ptr + b * n_cols * n_cols
    out_row = out_ptr + b * k_out

    # the first pick: argmax of the first-pick scores over the real tokens
    best_v = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, BLOCK):
        j = start + offs
        v = tl.load(first_row + j, mask=j < n, other=float("-inf"))
        tile_v = tl.max(v, 0)
        tile_i = tl.argmax(v, 0).to(tl.int64) + start
        better = tile_v > best_v
        best_i = tl.where(better, tile_i, best_i)
        best_v = tl.where(better, tile_v, best_v)
    if kb > 0:
        tl.store(out_row, best_i)
    # the running score starts as the first pick's row of P
    row = p_scope + best_i * n_cols
    for start in range(0, n_cols, BLOCK):
        j = start + offs
        tl.store(score_row + j, tl.load(row + j, mask=j < n_cols), mask=j < n_cols)
    tl.debug_barrier()

    for t in range(1, kb):
        best_v = tl.full((), float("-inf"), tl.float32)
        best_i = tl.full((), 0, tl.int64)
        for start in range(0, n_cols, BLOCK):
            j = start + offs
            v = tl.load(score_row + j, mask=j < n_cols, other=float("-inf"))
            tile_v = tl.max(v, 0)
            tile_i = tl.argmax(v, 0).to(tl.int64) + start
            better = tile_v > best_v
            best_i = tl.where(better, tile_i, best_i)
            best_v = tl.where(better, tile_v, best_v)
        tl.store(out_row + t, best_i)
        row = p_scope + best_i * n_cols
        for start in range(0, n_cols, BLOCK):
            j = start + offs
            s = tl.load(score_row + j, mask=j < n_cols, other=float("-inf"))
            r = tl.load(row + j, mask=j < n_cols, other=float("-inf"))
            tl.store(score_row + j, tl.minimum(s, r), mask=j < n_cols)
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


def greedy(first, p, lengths: list[int], budgets: list[int], k_out: int):
    """Picks [B, k_out] int64 from the score matrix ``p`` [B, N, N] float32 and the first-pick
    scores ``first`` [B, N]; scope b takes ``budgets[b]`` (<= lengths[b]) picks, then -1."""
    b, n, _ = p.shape
    if p.dtype != torch.float32 or not p.is_contiguous():
        raise UsageError("the fused greedy takes a contiguous float32 score matrix")
    dev = p.device
    first = first.float().contiguous()
    lens = torch.tensor(lengths, dtype=torch.int32).to(dev, non_blocking=True)
    ks = torch.tensor(budgets, dtype=torch.int32).to(dev, non_blocking=True)
    out = torch.empty(b, k_out, dtype=torch.long, device=dev)
    score = torch.empty(b, n, dtype=torch.float32, device=dev)
    block = min(triton.next_power_of_2(n), MAX_BLOCK)
    _greedy_kernel[(b,)](p, first, lens, ks, out, score, n, k_out, BLOCK=block,
                         num_warps=4 if block <= 1024 else 8)
    return out
