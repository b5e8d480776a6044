"""The contract between the rest of zoo and a model family. Adapters are the only code that
touches transformers' model classes; they use public submodules and public forward / generate
arguments only (no monkeypatching, no hard-coded sequence offsets).

What the rest may ask an ``Adapter`` for: ``prepare`` / ``encode`` / ``build_inputs`` /
``generate(_batch)`` for an answer; ``provides`` (the signals it can fill, matched against a
method's ``needs``); ``vision_signals`` (VisionZip's, where provided); ``embed_ids`` (token
embeddings); ``decoder()`` (the decoder pieces the prune loop drives) and ``visual_positions``;
``answer_ids`` + ``decode`` (the one EOS rule and text decoding); ``llm_dims`` (parameter counts
and dims for FLOP estimates); ``encoder_probe`` (``score --vs-encoder``). ``Encoded.state`` is
private to the adapter that wrote it.

Index spaces:
- *candidates*: the visual tokens a method may keep, rows of ``Encoded.vision`` / ``.features``.
  LLaVA-1.5: the 576 patch tokens. LLaVA-NeXT: the live patch rows of every crop (rows removed by
  unpadding are not candidates; newline tokens are not candidates, they are always kept).
  Qwen2.5-VL / Qwen3-VL: the merged (2x2) tokens in raster order. LLaVA-OneVision: as LLaVA-NeXT
  (the slots after anyres_max downsampling where it applies).
- *scopes*: the groups a per-crop budget is split over (LLaVA-NeXT: base image, then each crop);
  one scope for the other families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from zoocli.errors import ZooError


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
    # Qwen3-VL's deepstack: the visual slots [B, L] (bool) and, per injection layer, the [n, D] features
    # added to the hidden states at those slots (row-major over the batch); None for other families
    visual_mask: Tensor | None = None
    deepstack: list[Tensor] | None = None


@dataclass
class Generation:
    ids: list[int]  # new token ids (prompt excluded, EOS excluded)
    text: str
    prefill_ms: float  # generate() call to the first token's logits, device-synchronised
    decode_ms: float  # first token to the last


@dataclass
class EncoderProbe:
    """The vision encoder as a function of its input embeddings, for ``score --vs-encoder``.

    ``emb`` [T, S, Dv] float32 input embeddings per tile; ``rows`` [N] candidate -> tile * P + patch;
    ``patches`` P patches per tile; ``offset`` the row of patch 0 in a tile (1 when a CLS row leads);
    ``features(x [B, S, Dv]) -> [B, P, D]`` the encoder up to the feature layer, then the projector.
    """

    emb: Tensor
    rows: Tensor
    patches: int
    offset: int
    features: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LLMDims:
    """What FLOP estimates read of the language model and the projector (HF config field names)."""

    hidden_size: int  # D
    intermediate_size: int  # MLP width
    num_hidden_layers: int
    n_params: int  # language-model parameters without the input embedding
    projector: dict[str, int]  # d_in, d_hidden, d of the projector's first / last Linear


def cut_at_eos(ids: list[int], eos: set[int] | frozenset[int], pad: int | None = None) -> list[int]:
    """THE EOS rule: the ids before the first EOS, padding ids dropped (batched generate pads rows
    that finished early)."""
    out = []
    for t in ids:
        if t in eos:
            break
        if pad is None or t != pad:
            out.append(t)
    return out


class Adapter:
    """One VLM family. Subclasses set ``family`` and ``provides`` and implement the methods below."""

    family: ClassVar[str] = ""
    # signals a method may declare in ``needs`` that this adapter fills
    provides: ClassVar[frozenset[str]] = frozenset({"vision", "projector", "prompt", "decoder"})
    # the longest image (long side : short side) the family's processor takes, and why; None: any
    max_aspect: ClassVar[float | None] = None
    aspect_reason: ClassVar[str] = ""

    @classmethod
    def family_name(cls) -> str:
        """The family as users know it, for messages."""
        return cls.family

    @classmethod
    def check_image(cls, size: tuple[int, int], name=None) -> None:
        """Refuse (``ZooError``, one line with the limit and why) an image this family cannot take."""
        from zoocli.images import check_aspect

        check_aspect(size, cls.max_aspect, cls.family_name(), cls.aspect_reason, name)

    def __init__(self, model: nn.Module, processor: Any, model_id: str, meaningless: bool = False):
        from zoocli.adapters.decoder import greedy_config

        # decoding is pure greedy: of the checkpoint's generation config only the token ids stay
        # (its sampling / beam / penalty / bad-words settings would change answers silently)
        model.generation_config = greedy_config(getattr(model, "generation_config", None))
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.meaningless = meaningless  # random weights: answers carry no meaning
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @property
    def context_length(self) -> int | None:
        """The language model's context (``max_position_embeddings`` of the text config), or None."""
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text, "max_position_embeddings", None)
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def check_context(self, n_tokens: int) -> None:
        """Refuse (one line with the limit and the length) a prompt longer than the model's context,
        before any prefill: past it the positions are ones the model never saw, and the work grows
        with the square of the length."""
        limit = self.context_length
        if limit is not None and n_tokens > limit:
            raise ZooError(f"the prompt is {n_tokens:,} tokens (the image's and the question's), over "
                           f"the model's context of {limit:,} tokens (max_position_embeddings); shorten "
                           "the question")

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

    def vision_signals(self, prepared: Prepared, encoded: Encoded) -> dict[str, Tensor]:
        """``cls_attn`` [N] / ``vision_keys`` [N, Dk] (VisionZip), where ``provides`` says so."""
        raise NotImplementedError

    def decoder(self):
        """The language model's pieces for the prune loop (``zoocli.adapters.decoder.Decoder``)."""
        from zoocli.adapters.decoder import decoder_of

        return decoder_of(self.model)

    @torch.no_grad()
    def embed_ids(self, ids: Tensor) -> Tensor:
        """Token ids [T] -> LLM input embeddings [T, D]."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @property
    def eos_ids(self) -> frozenset[int]:
        """EOS ids: the generation config's, else the tokenizer's."""
        from zoocli.adapters.decoder import eos_ids

        ids = eos_ids(self.model)
        if not ids and getattr(self.processor.tokenizer, "eos_token_id", None) is not None:
            ids = frozenset({int(self.processor.tokenizer.eos_token_id)})
        return ids

    def answer_ids(self, ids: list[int], pad: int | None = None) -> list[int]:
        """Generated ids -> the answer's ids (``cut_at_eos`` with this model's EOS ids)."""
        return cut_at_eos(ids, self.eos_ids, pad)

    def decode(self, ids: list[int]) -> str:
        """Answer ids -> text, special tokens skipped."""
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    def llm_dims(self) -> LLMDims:
        """Language-model and projector sizes for FLOP estimates."""
        from zoocli.adapters.decoder import language_model

        lm = language_model(self.model)
        emb = lm.get_input_embeddings().weight.numel()
        cfg = lm.config
        lin = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        return LLMDims(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, n_params=sum(p.numel() for p in lm.parameters()) - emb,
            projector={"d_in": lin[0].in_features, "d_hidden": lin[0].out_features, "d": lin[-1].out_features},
        )

    def encoder_probe(self, prepared: Prepared, encoded: Encoded, float32: bool = True) -> EncoderProbe:
        """The vision encoder as a function of its input embeddings (``score --vs-encoder``)."""
        from zoocli.errors import UsageError

        raise UsageError(f"--vs-encoder supports LLaVA-1.5 and LLaVA-NeXT, not {self.family}")

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
    if len({r.deepstack is None for r in rows}) != 1:
        raise ValueError("rows mix inputs with and without deepstack features")
    vmask = None if rows[0].visual_mask is None else rows[0].visual_mask.new_zeros(len(rows), length)
    for b, r in enumerate(rows):
        n = r.inputs_embeds.shape[1]
        embeds[b, length - n:] = r.inputs_embeds[0]
        mask[b, length - n:] = r.attention_mask[0]
        if pos is not None:
            pos[..., b, length - n:] = r.position_ids[..., 0, :]
        if vmask is not None:
            vmask[b, length - n:] = r.visual_mask[0]
    deepstack = None
    if rows[0].deepstack is not None:  # row-major over the batch, as ``hidden[visual_mask]`` reads them
        deepstack = [torch.cat([r.deepstack[j] for r in rows]) for j in range(len(rows[0].deepstack))]
    return LLMInputs(embeds, mask, pos, n_visual=max(r.n_visual for r in rows), visual_mask=vmask,
                     deepstack=deepstack)


def unpad_row(inputs: LLMInputs, b: int) -> LLMInputs:
    """Row ``b`` of a left-padded batch as a single-row ``LLMInputs`` without its padding."""
    keep = inputs.attention_mask[b].bool()
    start = int(keep.float().argmax()) if bool(keep.any()) else keep.numel()
    pos = None if inputs.position_ids is None else inputs.position_ids[..., b:b + 1, start:]
    vmask = deepstack = None
    if inputs.visual_mask is not None:
        vmask = inputs.visual_mask[b:b + 1, start:]
        if inputs.deepstack is not None:  # this row's block of the row-major deepstack rows
            counts = inputs.visual_mask.sum(1).tolist()
            lo = int(sum(counts[:b]))
            deepstack = [d[lo:lo + int(counts[b])] for d in inputs.deepstack]
    return LLMInputs(inputs.inputs_embeds[b:b + 1, start:], inputs.attention_mask[b:b + 1, start:], pos,
                     n_visual=inputs.n_visual, visual_mask=vmask, deepstack=deepstack)
