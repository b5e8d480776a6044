"""The contract between the pipeline and a model family. Adapters are the only code that touches
transformers' model classes; they use public submodules and public forward / generate arguments
only (no monkeypatching, no hard-coded sequence offsets).

Index spaces:
- *candidates*: the visual tokens a method may keep, rows of ``Encoded.vision`` / ``.features``.
  LLaVA-1.5: the 576 patch tokens. LLaVA-NeXT: the live patch rows of every crop (rows removed by
  unpadding are not candidates; newline tokens are not candidates, they are always kept).
  Qwen2.5-VL: the merged (2x2) tokens in raster order.
- *scopes*: the groups a per-crop budget is split over (LLaVA-NeXT: base image, then each crop);
  one scope for the other families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn


@dataclass
class Scope:
    """One selection scope laid out as a grid, for budgets and for drawing kept-token grids."""

    name: str  # "image", "base", "crop 1", ...
    index: Tensor  # [n] candidate indices in this scope, ascending
    grid: tuple[int, int]  # (rows, cols) of the layout
    cells: Tensor  # [n, 2] (row, col) of each candidate of ``index`` in the grid
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1): the grid's area in original-image pixels


@dataclass
class Prepared:
    """One (image, question) turned into model inputs by the processor and chat template."""

    image: Image.Image  # RGB, original size
    question: str
    inputs: dict[str, Tensor]  # processor output on the model device: input_ids [1, L], attention_mask, pixel values...
    question_ids: Tensor  # [T] token ids of the question text alone (for prompt-aware methods)


@dataclass
class Encoded:
    """The image through the vision tower and projector."""

    vision: Tensor  # [N, Dv] pre-projector candidates, projector input layout, model dtype
    features: Tensor  # [N, D] projector(vision), model dtype
    scopes: list[Scope]
    n_llm_visual: int  # visual positions in the unpruned LLM sequence (incl. LLaVA-NeXT newlines)
    state: dict[str, Any] = field(default_factory=dict)  # adapter-private


@dataclass
class LLMInputs:
    """What goes into the language model's forward / generate."""

    inputs_embeds: Tensor  # [B, L, D]
    attention_mask: Tensor  # [B, L]
    position_ids: Tensor | None  # None: contiguous; Qwen2.5-VL: [4, B, L] (text row + 3 M-RoPE rows)
    n_visual: int  # visual tokens in the sequence (incl. newlines)
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific forward kwargs


@dataclass
class Generation:
    ids: list[int]  # new token ids (prompt excluded, EOS excluded)
    text: str
    prefill_ms: float  # generate() call to the first token's logits, device-synchronised
    decode_ms: float  # first token to the last


class Adapter:
    """One VLM family. Subclasses set ``family`` and implement the methods below."""

    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module, processor: Any, model_id: str, meaningless: bool = False):
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.meaningless = meaningless  # random weights: answers carry no meaning
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @property
    def projector(self) -> nn.Module:
        """M: maps [..., Dv] rows of ``Encoded.vision`` to [..., D] rows of ``Encoded.features``."""
        raise NotImplementedError

    def prepare(self, image: Image.Image, question: str) -> Prepared:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prepared: Prepared) -> Encoded:
        raise NotImplementedError

    @torch.no_grad()
    def build_inputs(
        self, prepared: Prepared, encoded: Encoded, kept: Tensor, tokens: Tensor | None = None
    ) -> LLMInputs:
        """The LLM inputs with only ``kept`` (ascending candidate indices) in the visual span.
        ``tokens`` [K, D], if given, replace ``encoded.features[kept]`` row for row."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int) -> Generation:
        raise NotImplementedError

    def visual_positions(self, prepared: Prepared, encoded: Encoded) -> Tensor:
        """[N] positions of the candidates in the unpruned LLM sequence (ascending = candidate
        order), for in-LLM pruning."""
        raise NotImplementedError

    @torch.no_grad()
    def generate_in_llm(self, inputs: LLMInputs, visual: Tensor, make_stages, max_new_tokens: int):
        """Greedy answer with in-LLM prune stages (FastV, SparseVLM) on the unpruned ``inputs``
        (batch size 1): ``zoocli.in_llm.generate_in_llm`` over this model's decoder layers, no
        patched classes. ``visual`` from ``visual_positions``; ``make_stages()`` runs inside the
        timed prefill. Returns ``zoocli.in_llm.InLLMResult``."""
        from zoocli.in_llm import generate_in_llm

        return generate_in_llm(self, inputs, visual, make_stages, max_new_tokens)

    @torch.no_grad()
    def build_inputs_batch(self, items) -> LLMInputs:
        """Batched ``build_inputs``: ``items`` is a list of ``(prepared, encoded, kept, tokens)``;
        each row is built alone, then the rows are LEFT-padded to one length (``left_pad``), so
        every row keeps its own positions and greedy answers equal those of batch size 1."""
        return left_pad([self.build_inputs(p, e, k, t) for p, e, k, t in items])

    @torch.no_grad()
    def generate_batch(self, inputs: LLMInputs, max_new_tokens: int) -> list[Generation]:
        """Greedy answers for every row of ``inputs``. Fallback: one row at a time (families
        override it with one batched ``generate``)."""
        return [self.generate(unpad_row(inputs, b), max_new_tokens)
                for b in range(inputs.inputs_embeds.shape[0])]


def left_pad(rows: list[LLMInputs]) -> LLMInputs:
    """Stack single-row ``LLMInputs`` [1, L_b, ...] into one batch [B, max L] with LEFT padding:
    padded slots have zero embeddings, attention mask 0 and position 0 in every position row
    (``generate`` extends positions from the last column, a real token in every row, and the
    text row of real tokens is unchanged, as it is ``mask.cumsum - 1``)."""
    if not rows:
        raise ValueError("no rows to batch")
    if any(r.inputs_embeds.shape[0] != 1 for r in rows):
        raise ValueError("left_pad takes single-row inputs")
    if any(r.extra for r in rows):
        raise NotImplementedError("inputs with family-specific extras cannot be batched")
    if len({r.position_ids is None for r in rows}) != 1:
        raise ValueError("rows mix implicit and explicit position ids")
    length = max(r.inputs_embeds.shape[1] for r in rows)
    e0 = rows[0].inputs_embeds
    embeds = e0.new_zeros(len(rows), length, e0.shape[2])
    mask = rows[0].attention_mask.new_zeros(len(rows), length)
    pos = None
    if rows[0].position_ids is not None:
        p0 = rows[0].position_ids
        pos = p0.new_zeros(*p0.shape[:-2], len(rows), length)  # [..., B, L]
    for b, r in enumerate(rows):
        n = r.inputs_embeds.shape[1]
        embeds[b, length - n:] = r.inputs_embeds[0]
        mask[b, length - n:] = r.attention_mask[0]
        if pos is not None:
            pos[..., b, length - n:] = r.position_ids[..., 0, :]
    return LLMInputs(embeds, mask, pos, n_visual=max(r.n_visual for r in rows))


def unpad_row(inputs: LLMInputs, b: int) -> LLMInputs:
    """Row ``b`` of a left-padded batch as a single-row ``LLMInputs`` without its padding."""
    keep = inputs.attention_mask[b].bool()
    start = int(keep.float().argmax()) if bool(keep.any()) else keep.numel()
    pos = None if inputs.position_ids is None else inputs.position_ids[..., b:b + 1, start:]
    return LLMInputs(inputs.inputs_embeds[b:b + 1, start:], inputs.attention_mask[b:b + 1, start:], pos,
                     n_visual=inputs.n_visual, extra=dict(inputs.extra))
