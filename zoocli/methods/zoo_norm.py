"""ZOO-Prune's norm ablation: the same greedy with the post-projector L2 norm in place of sensitivity.

An ablation in the style of the paper's Table 5 (``sensitivity`` and ``sum`` in ``zoo.py``), added
to test a published audit's claim that ZOO-Prune's sensitivity ranks tokens almost exactly like the
L2 norm of the projected token (Spearman 0.986 on Qwen3-VL). Here S(i) = ||Z_i||_2, with Z the
projected (LLM-input) tokens, and the selection is ZOO-Prune's Algorithm 1 unchanged
(``zoocli.methods.zoo.zoo_select``): min-max normalise S, pick argmax S first, then greedily argmax
S_hat(i) * (1 - max_{j in P} cos(Z_i, Z_j)). So ``zoo compare --methods zoo,norm`` (and
``zoo eval``) shows what the sensitivity adds over the norm, and ``zoo score`` prints the Spearman
between the two.

Not in the paper or its official code (AIM-SKKU/ZOO-Prune): nothing to deviate from. The norm is
computed in float32 whatever the model dtype. Costs no projector pass: works on every family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.methods import Method, PruneInputs, Selection, register
from zoocli.methods.zoo import zoo_select

if TYPE_CHECKING:
    from torch import Tensor


def token_norms(features: Tensor) -> Tensor:
    """||Z_i||_2 of every projected token [N, D] -> [N] float32."""
    return features.float().norm(dim=-1)


def norm(inp: PruneInputs, keep: int) -> Selection:
    s = token_norms(inp.features)
    return Selection(idx=zoo_select(s, inp.features, keep), scores=s)


NORM = register(Method(
    name="norm", fn=norm,
    summary="ablation: ZOO-Prune's greedy with S = post-projector L2 norm ||Z_i||",
    paper="ZOO-Prune ablation (Table-5 style; the audit's norm claim)",
    deviation="not in the paper: S = ||Z_i||_2 replaces the sensitivity; greedy unchanged",
))
