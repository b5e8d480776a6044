"""Downsampling: average-pool each scope's token grid to the budget, the baseline benchmark studies recommend.

Benchmark studies of visual-token pruning (e.g. VTC-Bench, Liao et al., arXiv:2510.07143) find that
plain image downsampling is a strong baseline. Resizing the image itself would change each family's
preprocessing (LLaVA-1.5's fixed 336 px input cannot take a smaller image at all), so zoo downsamples
inside the pipeline, the same way for every family: the pre-projector tokens X of a scope are
average-pooled over its (rows, cols) grid into exactly ``keep`` bins and each pooled row is
projected (``projector(mean of X over the bin)``), like an encoder output at a lower resolution.

The bins: ``h = round(sqrt(keep * rows / cols))`` output rows (at least 1, at most min(rows, keep),
raised until ``ceil(keep / h) <= cols``); output row i gets ``keep // h`` columns, the first
``keep % h`` rows one more, so the count is exactly ``keep`` and the grid keeps the image's aspect.
Row band i spans grid rows [floor(i rows / h), ceil((i + 1) rows / h)) and its column bins are
split the same way (``adaptive_avg_pool2d``'s bins; neighbouring bins overlap by a row or column
when the sizes do not divide). When ``keep`` is a product that fits, this is exactly
``adaptive_avg_pool2d`` (e.g. 144 tokens at 25% = 36: 2x2 average pooling of the 12x12 grid).
Each pooled token stands at its bin's centre cell (``Selection.idx``; the LLM sees it there: in
sequence order for LLaVA, at that cell's original M-RoPE position for Qwen2.5-VL).

Per family:
- LLaVA-1.5: one scope, the 24x24 (demo-llava: 12x12) patch grid.
- LLaVA-NeXT: every scope (base image and each crop) is pooled to its share of the budget; a crop
  cut by unpadding is pooled over its live rectangle. ``--budget-scope global`` has no grid and is
  refused.
- Qwen2.5-VL: the merged-token grid (rows, cols of 2x2-merged tokens); X is the merger's input
  row (four patches side by side), so each of the four sub-patch slots is pooled separately and the
  merger (its LayerNorm and MLP) projects the result.

Not a published method's code: the kept count equals the budget exactly (the shared contract), so
the pooled grid is slightly ragged when ``keep`` has no factorisation that fits the aspect.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import torch
from zoocli.methods import Method, PruneInputs, Selection, register

if TYPE_CHECKING:
    from torch import Tensor


def _bins(size: int, parts: int) -> list[tuple[int, int]]:
    """``adaptive_avg_pool``'s bins of ``size`` cells into ``parts``: [lo, hi) per part."""
    return [((i * size) // parts, -((-(i + 1) * size) // parts)) for i in range(parts)]


def pool_plan(rows: int, cols: int, keep: int) -> list[tuple[int, int, int, int]]:
    """Exactly ``keep`` bins (row_lo, row_hi, col_lo, col_hi) over a rows x cols grid, row-major."""
    if not 1 <= keep <= rows * cols:
        raise ValueError(f"keep must be in [1, {rows * cols}], got {keep}")
    h = min(max(1, round(math.sqrt(keep * rows / cols))), rows, keep)
    while -(-keep // h) > cols:
        h += 1
    out = []
    for i, (r0, r1) in enumerate(_bins(rows, h)):
        w = keep // h + (1 if i < keep % h else 0)
        out.extend((r0, r1, c0, c1) for c0, c1 in _bins(cols, w))
    return out


def scope_layout(inp: PruneInputs) -> Tensor:
    """[rows, cols] local token index at each cell of the scope's (live) grid rectangle."""
    n = inp.n
    if inp.cells is not None:
        cells = inp.cells.long().cpu()
        r0, c0 = (int(v) for v in cells.min(dim=0).values)
        r1, c1 = (int(v) for v in cells.max(dim=0).values)
        rows, cols = r1 - r0 + 1, c1 - c0 + 1
        if rows * cols != n:
            raise UsageError(f"downsample: the scope's {n} tokens do not fill a {rows}x{cols} rectangle")
        layout = torch.full((rows, cols), -1, dtype=torch.long)
        layout[cells[:, 0] - r0, cells[:, 1] - c0] = torch.arange(n)
        if bool((layout < 0).any()):
            raise UsageError("downsample: the scope's cells repeat a grid position")
        return layout
    if inp.grid is None:
        raise UsageError("downsample pools a scope's token grid; a global selection over several crops "
                         "has none (use --budget-scope crop)")
    rows, cols = inp.grid
    if rows * cols != n:
        raise UsageError(f"downsample: grid {rows}x{cols} does not hold the scope's {n} tokens")
    return torch.arange(n).view(rows, cols)


def downsample_select(vision: Tensor, layout: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """(index of each bin's centre token [keep], pooled pre-projector rows [keep, Dv] in float32)."""
    rows, cols = layout.shape
    idx, pooled = [], []
    x = vision.float()
    for r0, r1, c0, c1 in pool_plan(rows, cols, keep):
        members = layout[r0:r1, c0:c1].reshape(-1).to(x.device)
        pooled.append(x.index_select(0, members).mean(dim=0))
        idx.append(int(layout[(r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2]))
    return torch.tensor(idx, dtype=torch.long, device=x.device), torch.stack(pooled)


def downsample(inp: PruneInputs, keep: int) -> Selection:
    idx, pooled = downsample_select(inp.vision, scope_layout(inp), keep)
    with torch.no_grad():
        tokens = inp.projector(pooled.to(inp.vision.dtype))
    dev = inp.features.device
    return Selection(idx=idx.to(dev), tokens=tokens.to(device=dev, dtype=inp.features.dtype))


DOWNSAMPLE = register(Method(
    name="downsample", fn=downsample,
    summary="average-pool each scope's pre-projector token grid to k bins, then project",
    paper="baseline (image downsampling, as benchmark studies recommend)",
    needs=frozenset({"vision", "projector"}),
    deviation=("pools the encoder's token grid instead of resizing the image; exactly k bins "
               "(a ragged grid when k does not factor); not with --budget-scope global"),
))
