"""MMTok: visual tokens chosen to cover both the question's tokens and the whole visual token set.

Dong, Hu, Zhang, Yin, Fu, Qian, "MMTok: Multimodal Coverage Maximization for Efficient Inference of
VLMs", arXiv:2508.18264. Official code: Ironieser/MMTok (Apache-2.0), read at commit d1522cd
(``mmtok/core/semantic_selector.py`` ``mm_coverage_selection``, ``mmtok/core/mmtok_core.py``,
``mmtok/core/text_processor.py``, ``mmtok/llava/clip_encoder_mmtok.py``). Written here from the
paper and that reading; no code copied.

For one scope of N candidates and the question's m text tokens:

- text-vision coverage P [m, N] = softmax_j(cos(T_t, Z_j) / tau_tv) / m, with T the text tokens'
  LLM input embeddings and Z the projected visual tokens (both in the LLM's input space);
- vision-vision coverage Q [N, N] = softmax_j(cos(X_i, X_j) / tau_vv) / N on the pre-projector
  tokens X (LLaVA: the CLIP feature layer, CLS dropped);
- C = [P; alpha Q] (rows: everything to cover; columns: candidates), and the greedy for maximum
  coverage: with b the best coverage of each row so far (0 at start), pick
  argmax_j sum_rows max(0, C[row, j] - b[row]), then b = max(b, C[:, j]).

Defaults are the official ones: alpha 0.5, tau_tv 0.02, tau_vv 0.2. The text is the question's
keywords (the official ``extract_keywords_simple``: the two lmms-eval answer-format sentences
removed, words ``\\b\\w+\\b`` whose lower case is not in the official stop-word list, the whole text
when none is left), through ``prompt_scope="keywords"``; ``question`` / ``all_text`` use every
question token / every non-image prompt token instead.

Deviations from the official code:
- The keywords are tokenised as one plain string without special tokens; the official code
  tokenises the word list with ``is_split_into_words=True`` and drops the BOS token, which can split
  a word into different sub-tokens. The official Qwen2.5-VL path uses "Question: {question}"
  unfiltered; here every family uses the keywords (``prompt_scope`` picks otherwise).
- Qwen2.5-VL: Q is computed on each merged token's merger-input row (its four patches side by
  side, raster order); the official Qwen path hands the pre-merger patch states to the same code.
- LLaVA-1.5 with a padding processor: the official code can exclude patches covering the pad
  (``remove_padding_indices``); llava-hf's LLaVA-1.5 processor centre-crops, so there is no pad to
  exclude and no such option here. LLaVA-NeXT: one selection per scope after unpadding (the official
  code selects per 576-token tile).
- Ties go to the lowest index (as the official ``argmax``); the picks are returned in pick order.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import ops, torch
from zoocli.methods import Method, PruneInputs, Selection, register

if TYPE_CHECKING:
    from torch import Tensor

# the official text processor's stop words and answer-format sentences (facts, re-typed)
STOP_WORDS = frozenset("""
    a an the is are was were be been being have has had do does did it they he she we you i
    what where when why how who which and or but so if then question answer
    to for with by from at into onto upon
""".split())
FORMAT_SENTENCES = ("Answer the question using a single word or phrase.",
                    "Answer with the option's letter from the given choices directly.")
PROMPT_SCOPES = ("keywords", "question", "all_text")


def question_keywords(text: str) -> str:
    """The question's descriptive words, space-joined (the whole text when none is left)."""
    if not text:
        return ""
    for s in FORMAT_SENTENCES:
        text = text.replace(s, "")
    words = [w for w in re.findall(r"\b\w+\b", text) if w.lower() not in STOP_WORDS]
    return " ".join(words) if words else text


def coverage_matrix(features: Tensor, vision: Tensor, text: Tensor, alpha: float = 0.5,
                    tau_tv: float = 0.02, tau_vv: float = 0.2) -> Tensor:
    """C = [P; alpha Q] [m + N, N] in float32 (see the module docstring)."""
    z = ops.unit_rows(features)
    x = ops.unit_rows(vision.to(z.device))
    t = ops.unit_rows(text.to(z.device))
    m, n = t.shape[0], z.shape[0]
    p = torch.softmax((t @ z.T) / tau_tv, dim=1) / max(m, 1)
    q = torch.softmax((x @ x.T) / tau_vv, dim=1) / n
    return torch.cat([p, alpha * q])


def max_coverage_greedy(cover: Tensor, k: int) -> Tensor:
    """Greedy maximum coverage on ``cover`` [R, N]: ``k`` column indices in pick order."""
    n = cover.shape[1]
    k = min(int(k), n)
    best = cover.new_zeros(cover.shape[0])
    taken = torch.zeros(n, dtype=torch.bool, device=cover.device)
    picks = torch.empty(k, dtype=torch.long, device=cover.device)
    for i in range(k):  # on the device: no host read per step
        gain = (cover - best[:, None]).clamp_min(0).sum(dim=0)
        j = torch.argmax(gain.masked_fill(taken, float("-inf")))
        picks[i] = j
        taken[j] = True
        best = torch.maximum(best, cover.index_select(1, j.view(1))[:, 0])
    return picks


def check_mmtok_options(alpha=0.5, tau_tv=0.02, tau_vv=0.2, prompt_scope="keywords") -> None:
    for name, v in (("alpha", alpha), ("tau_tv", tau_tv), ("tau_vv", tau_vv)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) > 0:
            raise UsageError(f"mmtok: {name} must be a positive number, got {v!r}")
    if prompt_scope not in PROMPT_SCOPES:
        raise UsageError(f"mmtok: prompt_scope must be one of {', '.join(PROMPT_SCOPES)}, got {prompt_scope!r}")


def mmtok(inp: PruneInputs, keep: int, alpha: float = 0.5, tau_tv: float = 0.02, tau_vv: float = 0.2,
          prompt_scope: str = "keywords") -> Selection:
    cover = coverage_matrix(inp.features, inp.vision, inp.prompt, float(alpha), float(tau_tv), float(tau_vv))
    return Selection(idx=max_coverage_greedy(cover, keep).to(inp.features.device))


MMTOK = register(Method(
    name="mmtok", fn=mmtok,
    summary="greedy maximum coverage of the question's tokens and of the visual token set",
    paper="MMTok, Dong et al., 2025 (arXiv:2508.18264)",
    needs=frozenset({"prompt", "vision"}),
    deviation=("keywords tokenised as one string; Qwen2.5-VL: merger-input rows for vision-vision "
               "coverage and keywords (official: 'Question: q'); LLaVA-NeXT per scope"),
    options={"alpha": 0.5, "tau_tv": 0.02, "tau_vv": 0.2, "prompt_scope": "keywords"},
    check=check_mmtok_options,
))
