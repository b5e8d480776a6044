"""CDPruner: visual tokens chosen by a determinantal point process conditioned on the instruction.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", arXiv:2506.10967. Official code: Theia-4869/CDPruner (Apache-2.0), read at commit 9541616
(``llava/model/llava_arch.py`` ``encode_images``, ``multimodal_encoder/clip_encoder.py``). Written
here from the paper and that reading; no code copied.

For one scope of N candidates:

- similarity S_ij = cos(Z_i, Z_j) on the projected (LLM-input) tokens Z, in float32;
- relevance: c_it = cos(V_i, T_t) between each visual token and each instruction token, then
  r_i = -mean_t c_it (the official code negates the mean; ``negate=false`` drops the minus), then
  min-max normalised as the official code does, r = (r - min r + 1e-6) / (max r - min r);
  ``theta`` (optional, commented out in the official code) re-weights r -> exp(theta / (2 (1 -
  theta)) * r);
- kernel L = diag(r) S diag(r), and the greedy MAP inference of the DPP with incremental Cholesky
  updates (Chen et al., NeurIPS 2018, the official code's fast loop): d_i^2 = L_ii; each step picks
  j = argmax d^2, e = (L_j - sum_t c_t[j] c_t) / sqrt(d_j^2), appends e to the c vectors,
  d^2 -= e^2, and retires j.

What zoo feeds as V and T (the deviation that matters): the official code takes V = CLIP's
``visual_projection(post_layernorm(X))`` (the feature layer's patch tokens in CLIP's joint space) and
T = CLIP's text tower on the question (77-token segments). Hugging Face LLaVA / Qwen2.5-VL
checkpoints ship neither CLIP's text tower nor its visual projection, so here V = Z (the projected
tokens) and T = the question's LLM input embeddings (``PruneInputs.prompt``, the question's tokens
only, as the official code passes the question text): both in the LLM's input space, the choice of
the openvino.genai port for Qwen2-VL, which also keeps the negation.

Other deviations from the official code:
- Relevance is min-max normalised per scope (the official code normalises over all tiles of a
  LLaVA-NeXT image at once) and a constant relevance becomes all ones (official: 0/0).
- Picked tokens are retired explicitly and a step whose largest remaining gain d^2 is at most
  1e-5 x max_i L_ii (the kernel's rank is spent: with D-dimensional Z, at most D tokens) starts a
  new greedy round over the tokens not yet picked; the official loop takes square roots of rounding
  noise there (NaN or arbitrary picks). Tokens with no gain at all (relevance 0) come last, in
  descending L_ii, ties to the lowest index.
- LLaVA-NeXT: one selection per scope (base image and each live crop, after unpadding); the
  official code prunes each 576-token tile before unpadding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import ops, torch
from zoocli.methods import Method, PruneInputs, Selection, register

if TYPE_CHECKING:
    from torch import Tensor

GAIN_EPS = 1e-5  # a marginal gain below GAIN_EPS * max L_ii counts as 0 (rank exhausted)


def cdpruner_relevance(features: Tensor, text: Tensor, negate: bool = True, theta: float | None = None) -> Tensor:
    """[N] relevance of each visual token to the instruction tokens ``text`` [T, D] (float32)."""
    z = ops.unit_rows(features)
    t = ops.unit_rows(text.to(z.device))
    rel = (z @ t.T).mean(dim=1)  # [N]
    if negate:
        rel = -rel
    lo, hi = rel.min(), rel.max()
    span = hi - lo
    if not bool(torch.isfinite(span)) or float(span) <= 0:
        rel = torch.ones_like(rel)
    else:
        rel = (rel - lo + 1e-6) / span
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel


def cdpruner_kernel(features: Tensor, relevance: Tensor) -> Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the projected tokens [N, N] (float32)."""
    z = ops.unit_rows(features)
    r = relevance.to(z.device).float()
    return r[:, None] * (z @ z.T) * r[None, :]


def dpp_greedy(kernel: Tensor, k: int) -> Tensor:
    """Greedy MAP inference of the DPP with kernel ``kernel`` [N, N]: ``k`` distinct indices in pick
    order (incremental Cholesky; a new round when the rank is spent, see the module docstring)."""
    n = kernel.shape[0]
    k = min(int(k), n)
    diag = torch.diagonal(kernel).clone()
    floor = GAIN_EPS * float(diag.max()) if n else 0.0
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picks: list[int] = []
    while len(picks) < k:
        left = k - len(picks)
        cis = kernel.new_zeros(left, n)
        d2 = diag.masked_fill(taken, float("-inf"))
        got = 0
        for i in range(left):
            j = int(torch.argmax(d2))
            g = float(d2[j])
            if not g > floor:  # rank spent (or only zero-quality tokens left)
                break
            e = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(g)
            cis[i] = e
            d2 = d2 - e * e
            d2[j] = float("-inf")
            taken[j] = True
            picks.append(j)
            got += 1
        if got == 0:  # nothing has any gain left: the rest by quality L_ii, ties to the lowest index
            rest = ops.stable_topk(diag.masked_fill(taken, float("-inf")), left)
            picks.extend(int(i) for i in rest)
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)


def cdpruner_select(features: Tensor, text: Tensor, keep: int, negate: bool = True,
                    theta: float | None = None) -> tuple[Tensor, Tensor]:
    """(indices in pick order [keep], relevance [N])."""
    rel = cdpruner_relevance(features, text, negate, theta)
    return dpp_greedy(cdpruner_kernel(features, rel), keep), rel


def check_cdpruner_options(negate=True, theta=None) -> None:
    if not isinstance(negate, bool):
        raise UsageError(f"cdpruner: negate must be true or false, got {negate!r}")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                              or not 0.0 < float(theta) < 1.0):
        raise UsageError(f"cdpruner: theta must be a number in (0, 1), got {theta!r}")


def cdpruner(inp: PruneInputs, keep: int, negate: bool = True, theta: float | None = None) -> Selection:
    idx, rel = cdpruner_select(inp.features, inp.prompt, keep, negate,
                               None if theta is None else float(theta))
    return Selection(idx=idx.to(inp.features.device), scores=rel)


CDPRUNER = register(Method(
    name="cdpruner", fn=cdpruner,
    summary="conditional DPP: cosine similarity x instruction relevance, greedy MAP",
    paper="CDPruner, Zhang et al., 2025 (arXiv:2506.10967)",
    needs=frozenset({"prompt"}),
    deviation=("relevance from the question's LLM input embeddings vs the projected tokens (no CLIP "
               "text tower in HF VLMs); per-scope min-max; new greedy round when the rank is spent"),
    options={"negate": True, "theta": None},
    check=check_cdpruner_options,
))
