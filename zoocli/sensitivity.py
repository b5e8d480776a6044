"""Zeroth-order token sensitivity at the projector (ZOO-Prune Eq. 2-3).

Work in progress: this first version is the plain two-pass float32 finite difference, correct but
unoptimised; the structured estimators replace it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError


def directions(m: int, d: int, seed: int, device) -> Tensor:
    """m unit-norm Gaussian directions [m, d], float32, from a generator seeded with ``seed``."""
    g = torch.Generator(device=device).manual_seed(int(seed))
    u = torch.randn(m, d, generator=g, device=device, dtype=torch.float32)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def token_sensitivity(x: Tensor, projector: nn.Module, m: int = 64, h: float = 0.01, seed: int = 0,
                      estimator: str = "fd", rank=None, chunk_mb: int = 256) -> Tensor:
    if not isinstance(m, int) or m <= 0:
        raise UsageError(f"m must be a positive integer, got {m!r}")
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise UsageError(f"h must be a positive finite number, got {h!r}")
    p = copy.deepcopy(projector).float()
    x = x.float()
    u = directions(m, x.shape[-1], seed, x.device)
    out = []
    for s in range(0, x.shape[0], 16):
        xc = x[s:s + 16, None, :]
        d = p(xc + h * u) - p(xc - h * u)
        out.append((d.norm(dim=-1) / (2 * h)).mean(dim=1))
    return torch.cat(out)
