"""VisionZip: Longer is Better but Not Necessary in Vision Language Models.

Yang et al., CVPR 2025, arXiv:2412.04467 (official code: dvlab-research/VisionZip,
``visionzip/clip_encoder.py``). Two token groups, both taken at the vision layer the LLaVA
features come from (``hidden_states[-2]``):

- dominant: the ``dominant`` patches receiving the most CLS attention (CLS->patch, summed over
  heads) at that layer;
- contextual: the remaining patches, compared on that layer's head-averaged keys (L2-normalised);
  ``contextual`` targets evenly spaced among them (``step = max(1, N_rem // C)``,
  ``arange(0, N_rem, step)[:C]``); every other remaining patch goes to its most similar target
  (argmax of the dot product), and each target becomes ``target + mean(assigned)`` (counts clamped
  to >= 1, so an unassigned target stays itself; the target is added to the mean, not averaged in,
  exactly as the official code does). Merging happens in vision (pre-projector) space; the merged
  tokens are then projected.

Default split: ``dominant = round(keep * 54 / 64)``, ``contextual = keep - dominant``, which gives
the official LLaVA-1.5 settings 54+10, 108+20, 162+30 for 64/128/192 tokens.

Deviations from the official code:
- The CLS token itself is not fed to the LLM: llava-hf's "default" feature strategy drops it before
  the projector, so it is not among the candidates. Official VisionZip always keeps CLS as one of the
  dominant tokens (``visionzip(model, dominant=54)`` keeps CLS + 53 patches); here ``dominant``
  counts patches only (54 patches for 64 tokens).
- A merged token stands at its target's index in ``Selection.idx`` (the official code appends the
  contextual tokens after the dominant ones, in no spatial position). Dominant tokens come first in
  ``idx`` (in descending CLS attention, ties to the lowest index), then the targets.
- The merge runs in float32 and is cast back to the vision dtype before projection.
- The signals (``LlavaAdapter.vision_signals``) recompute that one layer's CLS query row from its
  input hidden state (``layer_norm1``, ``q_proj`` / ``k_proj``, CLIP's scale) instead of running the
  whole tower with ``output_attentions=True`` (eager everywhere); the pipeline times this as the
  method's selection cost. LLaVA-NeXT: computed per tile, mapped to the live candidates, and the
  method runs per crop (the budget split over base + crops, as the official code does per crop).
- Qwen2.5-VL is unsupported: its vision encoder has no CLS token (so no CLS->patch attention) and
  uses windowed attention in a permuted token order; the third-party ports (EffiVLM-Bench,
  LightCompress) substitute query-averaged attention of a different block, which is not the
  published method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoocli.errors import UsageError
from zoocli.lazy import ops, torch
from zoocli.methods import Method, PruneInputs, Selection, register

if TYPE_CHECKING:
    from torch import Tensor


def split_budget(keep: int, dominant: int | None = None, contextual: int | None = None) -> tuple[int, int]:
    """(dominant, contextual) summing to ``keep``; defaults to the official 54:10 ratio."""
    if dominant is None and contextual is None:
        dominant = max(1, round(keep * 54 / 64))
    if dominant is None:
        dominant = keep - contextual
    if contextual is None:
        contextual = keep - dominant
    if dominant + contextual != keep or dominant < 1 or contextual < 0:
        raise UsageError(
            f"visionzip: dominant ({dominant}) + contextual ({contextual}) must equal keep ({keep}), "
            "with dominant >= 1 and contextual >= 0"
        )
    return dominant, contextual


def contextual_merge(hidden: Tensor, keys: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """VisionZip's contextual merge of ``hidden`` [M, Dv] on ``keys`` [M, Dk] into ``c`` tokens.

    Returns (target indices into the M rows [c], merged tokens [c, Dv] = target + mean(assigned)).
    """
    m = hidden.shape[0]
    c = min(c, m)
    metric = ops.unit_rows(keys)  # [M, Dk]
    step = max(1, m // c)
    targets = torch.arange(0, m, step, device=hidden.device)[:c]  # [c]
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    # the M - c non-targets in index order (targets are c distinct rows): a stable sort, no host read
    others = torch.argsort(is_target.to(torch.uint8), stable=True)[: m - c]  # [M - c]
    assign = (metric[others] @ metric[targets].T).argmax(dim=1)  # [M - c] -> target slot
    h = hidden.float()
    sums = torch.zeros(c, h.shape[1], device=h.device).index_add_(0, assign, h[others])  # [c, Dv]
    counts = torch.bincount(assign, minlength=c).clamp_min(1).unsqueeze(1).to(h.dtype)  # [c, 1]
    merged = h[targets] + sums / counts
    return targets, merged.to(hidden.dtype)


def check_visionzip_options(dominant=None, contextual=None) -> None:
    """Raise ``UsageError`` for non-integer counts (also from a method spec: ``visionzip:dominant=abc``);
    the split itself is checked against ``keep`` by ``split_budget``."""
    for name, v in (("dominant", dominant), ("contextual", contextual)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise UsageError(f"visionzip: {name} must be an integer number of tokens, got {v!r}")


def visionzip(inp: PruneInputs, keep: int, dominant: int | None = None, contextual: int | None = None) -> Selection:
    n_dom, n_ctx = split_budget(keep, dominant, contextual)
    n = inp.n
    cls_attn = inp.cls_attn.to(inp.features.device)
    dom = ops.stable_topk(cls_attn, n_dom)  # [n_dom], always starts with argmax(cls_attn)
    tokens = inp.features[dom]  # [n_dom, D]
    idx = dom
    if n_ctx > 0:
        rest_mask = torch.ones(n, dtype=torch.bool, device=dom.device)
        rest_mask[dom] = False
        rest = rest_mask.nonzero().squeeze(1)  # [n - n_dom], original order
        vision = inp.vision.to(dom.device)
        keys = inp.vision_keys.to(dom.device)
        targets, merged = contextual_merge(vision[rest], keys[rest], n_ctx)  # [C], [C, Dv]
        with torch.no_grad():
            projected = inp.projector(merged)  # [C, D]
        idx = torch.cat([dom, rest[targets]])
        tokens = torch.cat([tokens, projected.to(tokens.dtype)])
    return Selection(idx=idx, tokens=tokens, scores=inp.cls_attn)


VISIONZIP = register(Method(
    name="visionzip", fn=visionzip,
    summary="dominant tokens by CLS attention + contextual tokens merged on vision keys",
    paper="VisionZip, Yang et al., CVPR 2025 (arXiv:2412.04467)",
    needs=frozenset({"cls_attn", "vision_keys", "vision", "projector"}),
    families=frozenset({"llava", "llava_next"}),
    deviation=(
        "CLS is not fed (llava-hf drops it), so 'dominant' counts patches only (official keeps CLS as "
        "a dominant token); merged tokens stand at their target's index; Qwen2.5-VL, Qwen3-VL and "
        "LLaVA-OneVision (SigLIP) unsupported (no CLS token in their vision encoders)"
    ),
    options={"dominant": None, "contextual": None},
    check=check_visionzip_options,
))

