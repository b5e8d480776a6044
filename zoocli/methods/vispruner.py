"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing duplicates.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025, arXiv:2412.01818. Official code: Theia-4869/VisPruner (Apache-2.0), read at
commit aefa01a (``llava/model/llava_arch.py`` ``encode_images``, ``multimodal_encoder/clip_encoder.py``
``feature_select``). Written here from the paper and that reading; no code copied.

For one scope of N candidates and a budget of ``keep`` tokens:

- important: ``n_imp = int(keep * important_ratio)`` (truncated, as the official code does; default
  ratio 0.5, the official scripts' default) tokens with the most [CLS] attention at the vision
  layer the features come from (CLS query row, CLS column dropped);
- diverse: the other N - n_imp tokens, in descending [CLS] attention, are thinned by repeated
  matching until ``keep - n_imp`` remain. One round on the current list R: split it alternately into
  A = R[0::2] and B = R[1::2]; score every a in A by its largest cosine similarity to B (on the
  unit-normalised pre-projector tokens X); drop the ``r = min(8, |R| - target)`` highest-scoring a;
  the new list is the kept a (in descending score order) followed by all of B.

``Selection.idx`` lists the important tokens (descending attention) then the diverse ones (in the
final list's order); ``scores`` is the [CLS] attention.

Deviations from the official code:
- The [CLS] attention comes from ``LlavaAdapter.vision_signals`` (the feature layer's CLS query row
  recomputed from its input, summed over heads); the official code averages the heads of
  ``output_attentions``. Sum and mean rank identically up to rounding.
- Sorting is stable (ties to the lowest index / earliest list position); the official code uses
  ``torch.argsort``, whose tie order is unspecified. The similarity is computed in float32 (the
  official one in the model dtype).
- A list of odd length, or an A shorter than r, is handled (A takes the extra token; at most |A|
  tokens are dropped in a round); the official indexing only works for even |R| and |A| >= r.
- LLaVA-NeXT: one selection per scope (the base image and each live crop, budget split by
  ``--budget-scope``); the official code prunes each 576-token tile to the full budget before
  unpadding. Qwen2.5-VL is unsupported: its vision encoder has no [CLS] token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import ops, torch
from zoocli.methods import Method, PruneInputs, Selection, register

if TYPE_CHECKING:
    from torch import Tensor

ROUND = 8  # the official code drops at most 8 tokens per matching round


def remove_duplicates(xn: Tensor, rest: Tensor, target: int) -> Tensor:
    """VisPruner's iterative matching on unit rows ``xn`` [N, D]: thin the ordered index list
    ``rest`` [R] down to ``target`` entries (in their final order)."""
    while target > 0:
        r = min(ROUND, rest.numel() - target)
        if r <= 0:
            break
        a, b = rest[0::2], rest[1::2]
        sim = (xn[a] @ xn[b].T).amax(dim=1)  # [|A|] each a's best match in B
        order = torch.sort(sim, descending=True, stable=True).indices[r:]  # the A tokens kept
        rest = torch.cat([a[order], b])
    return rest


def vispruner_select(cls_attn: Tensor, vision: Tensor, keep: int, important_ratio: float = 0.5) -> Tensor:
    """[keep] indices: the important tokens, then the diverse ones (see the module docstring)."""
    n = cls_attn.shape[0]
    keep = min(int(keep), n)
    n_imp = int(keep * important_ratio)
    order = ops.stable_topk(cls_attn.to(vision.device), n)  # every token, descending attention
    important, rest = order[:n_imp], order[n_imp:]
    if keep - n_imp <= 0:
        return important
    diverse = remove_duplicates(ops.unit_rows(vision), rest, keep - n_imp)
    return torch.cat([important, diverse])


def check_vispruner_options(important_ratio=0.5) -> None:
    if (isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float))
            or not 0.0 <= float(important_ratio) <= 1.0):
        raise UsageError(f"vispruner: important_ratio must be a number in [0, 1], got {important_ratio!r}")


def vispruner(inp: PruneInputs, keep: int, important_ratio: float = 0.5) -> Selection:
    idx = vispruner_select(inp.cls_attn, inp.vision, keep, float(important_ratio))
    return Selection(idx=idx.to(inp.features.device), scores=inp.cls_attn)


VISPRUNER = register(Method(
    name="vispruner", fn=vispruner,
    summary="important tokens by [CLS] attention + duplicates removed by matching (diverse)",
    paper="VisPruner, Zhang et al., ICCV 2025 (arXiv:2412.01818)",
    needs=frozenset({"cls_attn", "vision"}),
    families=frozenset({"llava", "llava_next"}),
    deviation=("stable tie order; odd-length lists handled; LLaVA-NeXT per scope after unpad; "
               "Qwen2.5-VL unsupported (no CLS token)"),
    options={"important_ratio": 0.5},
    check=check_vispruner_options,
))
