"""FastV: An Image is Worth 1/2 Tokens After Layer 2.

Chen et al., ECCV 2024, arXiv:2403.06764 (official code: pkunlp-icler/FastV, ``modeling_llama.py``
L717-800). At LLM layer K the visual tokens are ranked by the attention the LAST prompt token gives
them at layer K-1 (mean over heads, batch 0), the top ``keep`` are kept and layers >= K run on the
shortened sequence; the kept tokens keep their original position ids ("inplace" mode).

``FASTV.plan`` returns one ``zoocli.prune_loop.PruneStage`` (``fastv_stage``): before layer K keep
the ``keep`` candidates the last token attends to most at layer K-1 (the prune loop recomputes that
attention row and takes a stable top-k, ties to the lowest index). ``K`` is checked when the method
spec is parsed (``fastv:K=abc`` fails before any model loads).

Deviations from the official code: the layer K-1 attention row is recomputed for the last query
only, from that layer's input hidden states (no eager attention for the whole model, so SDPA/flash
keep working); ties go to the lowest index (``torch.topk`` leaves them unspecified); with a KV cache
the pruning happens once at prefill (as the official KV-cache mode and the llava-hf port do); on an LLM
with at most K layers (the offline tiny models have 2) K is clamped to ``n_layers - 1``
(``plan``). LLaVA-NeXT newline tokens are not candidates and are never pruned.
"""

from __future__ import annotations

from zoocli.errors import UsageError
from zoocli.methods import LLMView, Method, register


def check_fastv_options(K=2) -> None:
    """Raise ``UsageError`` unless ``K`` is an integer >= 1 (also from a spec: ``fastv:K=abc``)."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise UsageError(f"fastv: K must be an integer >= 1, got {K!r}")


def fastv_stage(keep: int, K: int = 2):
    """The ``zoocli.prune_loop.PruneStage`` for FastV: prune before layer ``K`` to ``keep`` tokens."""
    from zoocli.prune_loop import PruneStage, last_token_scorer

    return PruneStage(layer=K, n_keep=keep, scorer=last_token_scorer)


def plan(view: LLMView, keep: int, K: int = 2) -> list:
    """One stage before layer ``min(K, n_layers - 1)`` keeping ``keep`` candidates."""
    check_fastv_options(K)
    if view.n_layers < 2:
        raise UsageError(f"fastv needs at least 2 LLM layers, this model has {view.n_layers}")
    return [fastv_stage(min(keep, view.n), min(K, view.n_layers - 1))]


FASTV = register(Method(
    name="fastv", fn=None, plan=plan, stage="in_llm", needs=frozenset({"decoder"}),
    summary="top-k by the attention of the last prompt token at LLM layer K-1 (pruned at layer K)",
    paper="FastV, Chen et al., ECCV 2024 (arXiv:2403.06764)",
    deviation=(
        "layer K-1 attention recomputed for the last query row only; ties to the lowest index; "
        "K clamped to n_layers-1 on LLMs with <= K layers (the offline tiny models)"
    ),
    options={"K": 2}, check=check_fastv_options,
))
