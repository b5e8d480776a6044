"""`zoo score`: ZOO-Prune's zeroth-order sensitivity of every visual token of one image, with the
statistics and the most sensitive tokens (by grid position) that the command shows.

``score_image`` encodes the image once and estimates the sensitivity at the projector
(``zoocli.sensitivity.token_sensitivity``); ``summary`` turns the values into min / median / max
and the top tokens with their (scope, row, col); ``encoder_agreement`` adds the paper's Fig. 2
check (sensitivity at the vision encoder's input) and its Spearman correlation with the
projector's (``zoocli.ops.spearman``: average ranks for ties, the one Spearman of the package);
``norm_agreement`` the Spearman between the sensitivity and the post-projector L2 norm ||Z_i||
(a published audit's claim that the two rank tokens alike; the ``norm`` method is the greedy on it).
No printing here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Scored:
    """One image's sensitivities: the encoded image, one float per candidate, the grid layout."""

    enc: Any  # pipeline.EncodedImage
    values: list[float]
    layout: list[dict[str, Any]]  # pipeline.scope_layout, nothing kept
    units: str = ""  # what the values measure, for legends
    norms: list[float] = field(default_factory=list)  # ||Z_i||_2 of each projected token


def units(zoo: Mapping[str, Any]) -> str:
    """What a sensitivity value is, in plain characters (for the heatmap's colour bar)."""
    est = zoo.get("estimator") or "exact"
    if est == "exact":
        return "RMS projector gain ||J(x)||_F / sqrt(d_in), exact"
    rank = f", rank {zoo['rank']}" if zoo.get("rank") else ""
    return f"mean |M(x+hu) - M(x-hu)| / 2h ({est}, m={zoo.get('m')}, h={zoo.get('h')}{rank})"


def score_image(adapter, image, question: str, *, seed: int, zoo: Mapping[str, Any]) -> Scored:
    """Encode ``image`` and estimate every candidate token's sensitivity (``zoo``: m, h,
    estimator, rank)."""
    import torch

    from zoocli.pipeline import encode_image, scope_layout
    from zoocli.sensitivity import run_seed, token_sensitivity

    enc = encode_image(adapter, image, question)
    s = token_sensitivity(enc.encoded.vision, adapter.projector, seed=run_seed(zoo.get("estimator", "exact"), seed),
                          **zoo).cpu()
    layout = scope_layout(enc.encoded, torch.zeros(0, dtype=torch.long))
    norms = enc.encoded.features.float().norm(dim=-1).cpu()
    return Scored(enc, [float(v) for v in s], layout, units(zoo), [float(v) for v in norms])


def norm_agreement(scored: Scored) -> dict[str, Any]:
    """The post-projector L2 norms and their Spearman correlation with the sensitivity."""
    import torch

    from zoocli.ops import spearman

    return {"norms": scored.norms,
            "spearman_sensitivity_vs_norm": spearman(torch.tensor(scored.values), torch.tensor(scored.norms))}


def positions(scopes: Sequence[Mapping[str, Any]]) -> dict[int, tuple[str, int, int]]:
    """Candidate index -> (scope name, row, col) for the first scope holding it."""
    pos: dict[int, tuple[str, int, int]] = {}
    for s in scopes:
        for i, (r, c) in zip(s["index"], s["cells"]):
            pos.setdefault(i, (s["name"], r, c))
    return pos


def summary(values: Sequence[float], scopes: Sequence[Mapping[str, Any]], top: int) -> dict[str, Any]:
    """``{"stats": {min, median, max}, "tokens": [...], "top": [...]}``: every token with its
    place, and the ``top`` most sensitive (ties to the lowest index)."""
    pos = positions(scopes)

    def token(i: int) -> dict[str, Any]:
        return {"index": i, "scope": pos[i][0], "row": pos[i][1], "col": pos[i][2],
                "sensitivity": values[i]}

    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[: max(0, top)]
    stats = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return {"stats": stats, "tokens": [token(i) for i in range(len(values))],
            "top": [token(i) for i in order]}


def encoder_agreement(adapter, scored: Scored, *, m: int | None, h: float | None, seed: int,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Sensitivity at the vision encoder's input and its Spearman correlation with the projector's."""
    import torch

    from zoocli.analysis import encoder_sensitivity
    from zoocli.ops import spearman

    given = {k: v for k, v in (("m", m), ("h", h)) if v is not None}  # else the probe's defaults
    enc_s = encoder_sensitivity(adapter, scored.enc, seed=seed, progress=progress, **given)
    return {"encoder_sensitivity": [float(v) for v in enc_s],
            "spearman_encoder_vs_projector": spearman(enc_s, torch.tensor(scored.values))}
