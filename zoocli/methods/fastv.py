"""FastV: An Image is Worth 1/2 Tokens After Layer 2.

Chen et al., ECCV 2024, arXiv:2403.06764 (official code: pkunlp-icler/FastV, ``modeling_llama.py``
L717-800). At LLM layer K the visual tokens are ranked by the attention the LAST prompt token gives
them at layer K-1 (mean over heads, batch 0), the top ``keep`` are kept and layers >= K run on the
shortened sequence; the kept tokens keep their original position ids ("inplace" mode).

The selection itself is a pure top-k: the registered function ranks ``text_attn`` [N] (filled by the
in-LLM driver ``zoocli.llm_loop`` from layer K-1) and returns the top ``keep``, ties to the lowest
index. ``fastv_stage`` builds the driver stage that computes that signal during prefill.

Deviations from the official code: the layer K-1 attention row is recomputed for the last query
only, from that layer's input hidden states (no eager attention for the whole model, so SDPA/flash
keep working); ties go to the lowest index (``torch.topk`` leaves them unspecified); with a KV cache
the pruning happens once at prefill (as the official KV-cache mode and the llava-hf port do); on an LLM
with at most K layers (the offline tiny models have 2) K is clamped to ``n_layers - 1``
(``zoocli.in_llm``). LLaVA-NeXT newline tokens are not candidates and are never pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoocli.methods import PruneInputs, Selection, register


def topk_lowest_index(score: Tensor, k: int) -> Tensor:
    """The ``k`` highest scores, descending; ties go to the lowest index."""
    return torch.sort(score.float(), descending=True, stable=True).indices[:k]


def fastv_stage(keep: int, K: int = 2):
    """The ``zoocli.llm_loop.PruneStage`` for FastV: prune before layer ``K`` to ``keep`` tokens."""
    from zoocli.llm_loop import PruneStage, last_token_scorer

    return PruneStage(layer=K, n_keep=keep, scorer=last_token_scorer)


@register(
    "fastv",
    summary="top-k by the attention of the last prompt token at LLM layer K-1 (pruned at layer K)",
    paper="FastV, Chen et al., ECCV 2024 (arXiv:2403.06764)",
    needs=frozenset({"text_attn"}),
    stage="in_llm",
    deviation=(
        "layer K-1 attention recomputed for the last query row only; ties to the lowest index; "
        "K clamped to n_layers-1 on LLMs with <= K layers (the offline tiny models)"
    ),
    options={"K": 2},
)
def fastv(inp: PruneInputs, keep: int, K: int = 2) -> Selection:
    idx = topk_lowest_index(inp.text_attn, keep).to(inp.features.device)
    return Selection(idx=idx, scores=inp.text_attn)
