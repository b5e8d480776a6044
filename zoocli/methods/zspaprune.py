"""ZSPAPrune: Zero-Shot Prompt-Aware Token Pruning for Vision-Language Models.

Zhang, Li, Xian, Tang, arXiv:2510.17197. Pruning as a balance of task relevance and diversity,
hierarchical: a core set of prompt-relevant visual tokens, then diversity tokens for context.

This is a READING of the abstract plus third-party reimplementations, not the authors' code (none
was found; see shared/notes/toolkits.md section 9). What is implemented:

- relevance_i = cosine(features_i, mean(prompt)), with ``features`` the projected (LLM-input)
  visual tokens and ``prompt`` [T, D] the LLM input embeddings of the prompt tokens;
- core = the top ``max(1, round(core_ratio * keep))`` tokens by relevance (ties to the lowest
  index); ``core_ratio = 0.6`` is the third-party default, unverified against the paper;
- fill = greedy farthest-point selection on cosine similarity, seeded with the whole core: each step
  adds the token whose MAXIMUM cosine similarity to the selected set is smallest (max-min diversity;
  one third-party adapter tracks the minimum instead, which is not max-min and is avoided here).

``prompt_scope`` ("question" or "all_text") only records which tokens the adapter put in ``prompt``
(the user question alone, or every non-image token including system prompt and chat template); the
method itself uses whatever ``prompt`` holds. Unverified choices: the split ratio, the prompt scope,
input embeddings rather than hidden states, and cosine max-min as the diversity measure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import ops, torch
from zoocli.methods import Method, PruneInputs, Selection, register

if TYPE_CHECKING:
    from torch import Tensor

PROMPT_SCOPES = ("question", "all_text")


def zspaprune_select(features: Tensor, prompt: Tensor, keep: int, core_ratio: float = 0.6) -> tuple[Tensor, Tensor]:
    """(indices in pick order [keep]: core first, then diversity fill; relevance [N])."""
    n = features.shape[0]
    keep = min(int(keep), n)
    z = ops.unit_rows(features)  # [N, D]
    q = ops.unit_rows(prompt.float().mean(dim=0).to(z.device))  # [D]
    relevance = z @ q  # [N]
    n_core = min(keep, max(1, round(core_ratio * keep)))
    core = ops.stable_topk(relevance, n_core)
    picked = [core]
    taken = torch.zeros(n, dtype=torch.bool, device=z.device)
    taken[core] = True
    maxsim = (z @ z[core].T).max(dim=1).values  # [N] max cosine to the selected set
    fill = torch.empty(keep - n_core, dtype=torch.long, device=z.device)
    for t in range(keep - n_core):  # on the device: index tensors, no host read per step
        i = torch.argmin(maxsim.masked_fill(taken, float("inf"))).view(1)
        fill[t] = i[0]
        taken.scatter_(0, i, True)
        maxsim = torch.maximum(maxsim, (z @ z.index_select(0, i).T)[:, 0])
    picked.append(fill)
    return torch.cat(picked), relevance


def check_zspaprune_options(core_ratio=0.6, prompt_scope="question") -> None:
    """Raise ``UsageError`` for option values ``zspaprune`` cannot take (also from a method spec)."""
    if (isinstance(core_ratio, bool) or not isinstance(core_ratio, (int, float))
            or not 0.0 <= float(core_ratio) <= 1.0):
        raise UsageError(f"zspaprune: core_ratio must be a number in [0, 1], got {core_ratio!r}")
    if prompt_scope not in PROMPT_SCOPES:
        raise UsageError(f"zspaprune: prompt_scope must be one of {', '.join(PROMPT_SCOPES)}, got {prompt_scope!r}")


def zspaprune(inp: PruneInputs, keep: int, core_ratio: float = 0.6, prompt_scope: str = "question") -> Selection:
    check_zspaprune_options(core_ratio, prompt_scope)
    idx, relevance = zspaprune_select(inp.features, inp.prompt, keep, float(core_ratio))
    return Selection(idx=idx.to(inp.features.device), scores=relevance)


ZSPAPRUNE = register(Method(
    name="zspaprune", fn=zspaprune,
    summary="prompt-relevant core (cosine to the mean prompt embedding) + max-min diverse fill",
    paper="ZSPAPrune, Zhang et al., 2025 (arXiv:2510.17197)",
    needs=frozenset({"prompt"}),
    deviation="reconstructed from the abstract and third-party code (no official code); core_ratio unverified",
    options={"core_ratio": 0.6, "prompt_scope": "question"},
    check=check_zspaprune_options,
))
