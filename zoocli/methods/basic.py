"""Reference points for every comparison: keep all tokens (``none``) or a seeded random subset."""

from __future__ import annotations

from zoocli.lazy import torch
from zoocli.methods import Method, PruneInputs, Selection, register


def none(inp: PruneInputs, keep: int) -> Selection:
    return Selection(idx=torch.arange(inp.n, device=inp.features.device))


def random(inp: PruneInputs, keep: int) -> Selection:
    g = torch.Generator(device="cpu").manual_seed(int(inp.seed))
    idx = torch.randperm(inp.n, generator=g)[:keep]
    return Selection(idx=idx.to(inp.features.device))


NONE = register(Method(
    name="none", fn=none, paper="-",
    summary="keep every visual token (the unpruned baseline)",
))
RANDOM = register(Method(
    name="random", fn=random, paper="-",
    summary="a uniformly random subset, seeded (the floor any method must beat)",
))
