"""Random weights, shared by the adapters' ``--random-weights`` loaders and the offline builders."""

from __future__ import annotations

import torch


def round_up(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k`` (a vocabulary padded to 64 rows)."""
    return (n + k - 1) // k * k


def init_on(model_cls, config, device, dtype):
    """Random-init a model directly on ``device`` in ``dtype`` (no fp32 CPU detour)."""
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()
